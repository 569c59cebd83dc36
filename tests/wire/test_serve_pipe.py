"""The serve pipe (``fusefs.wire.handoff``, first half): the bytes between whoever launches
``objfs serve`` (``objfs mount``, the node plugin, ``objfs zygote``) and the server.

The config pipe carries ``MountConfig.to_json()`` (sorted keys) until EOF; the ready pipe carries
one line, ``ready\\n`` or ``error: <message>\\n``. A server of an older image may receive a config
written by a newer plugin (and the other way round), so the JSON's field names are pinned here
as well: a new field breaks ``MountConfig.from_json`` of every older server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fusefs.config import Credentials, MountConfig, Tuning
from fusefs.proc import cli
from fusefs.proc.spawn import serve_command
from fusefs.wire import handoff

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": "/", "PYTHONPATH": str(ROOT)}

#: a server's config (``MountConfig.server_view()``) as it travels, every field spelled out
CONFIG_FIELDS = {
    "allow_other": True,
    "backend": "s3",
    "broker_socket": "",
    "bucket": "bkt",
    "cache_dir": None,
    "cache_size": 10 * 1024**3,
    "credentials": {"access_key_id": None, "secret_access_key": None, "service_account_json": None,
                    "session_token": None},
    "dir_mode": 0o755,
    "endpoint_url": None,
    "file_mode": 0o640,
    "fs_name": "objfs:s3://bkt/vol",
    "gid": 1000,
    "metadata_ttl": 60.0,
    "metrics_address": "",
    "metrics_path": "/m/v.prom",
    "metrics_pod": "ns/pod",
    "metrics_volume": "vol-1",
    "prefetch": ["*.bin"],
    "prefix": "vol/",
    "read_only": False,
    "region": None,
    "tuning": {"block_size": 8 * 1024**2, "max_concurrent_requests": 16, "max_prefetch_blocks": 6,
               "max_upload_parts_in_flight": 8, "memory_blocks": 10, "part_size": 8 * 1024**2,
               "passthrough": True, "readahead_kb": 16 * 1024, "request_timeout": 60.0, "retry_deadline": 30.0,
               "small_file_prefetch": 16},
    "uid": 1000,
}
CONFIG_BYTES = json.dumps(CONFIG_FIELDS, sort_keys=True).encode()


def server_config() -> MountConfig:
    full = MountConfig(backend="s3", bucket="bkt", prefix="vol", endpoint_url="http://store:9000", region="r",
                       credentials=Credentials(access_key_id="AK", secret_access_key="SK"), cache_dir="/cache",
                       uid=1000, gid=1000, file_mode=0o640, allow_other=True, prefetch=("*.bin",),
                       fs_name="objfs:s3://bkt/vol", tuning=Tuning(), broker_socket="/b.sock",
                       metrics_path="/m/v.prom", metrics_volume="vol-1", metrics_pod="ns/pod")
    return full.server_view()


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_the_launcher_writes_the_config_as_sorted_json_and_closes_the_pipe() -> None:
    r, w = os.pipe()
    handoff.send_config(w, server_config())
    assert read_all(r) == CONFIG_BYTES  # EOF came: the writer closed its end


def test_the_server_reads_a_config_written_by_hand() -> None:
    r, w = os.pipe()
    os.write(w, CONFIG_BYTES)
    os.close(w)
    assert handoff.receive_config(r) == server_config()


def test_status_lines_are_one_line_each_and_only_the_first_counts() -> None:
    for say, expected in ((lambda s: s.ready(), b"ready\n"),
                          (lambda s: s.error("bucket\nbkt: no such bucket"), b"error: bucket bkt: no such bucket\n")):
        r, w = os.pipe()
        reporter = handoff.StatusReporter(w)
        say(reporter)
        reporter.error("a second word")  # ignored: the fd is closed already
        assert read_all(r) == expected


def test_the_launcher_reads_status_lines_written_by_hand() -> None:
    for raw, status, message in ((b"ready\n", "ready", None), (b"error: no such bucket\n", "error: no such bucket",
                                                                "no such bucket"),
                                 (b"", "", None)):
        r, w = os.pipe()
        os.write(w, raw)
        os.close(w)
        assert handoff.read_status(r, 10) == status
        assert handoff.error_message(status or "") == message
        os.close(r)
    assert (handoff.READY, handoff.ERROR_PREFIX) == ("ready", "error:")


def serve_process(*args: str, config: bytes) -> tuple[int, bytes]:
    """``objfs serve --config-fd N --ready-fd K ...`` fed ``config``: its exit status and ready bytes."""
    cfg_r, cfg_w = os.pipe()
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "fusefs.proc.cli", "serve", "--config-fd", str(cfg_r),
                             "--ready-fd", str(ready_w), *args], pass_fds=(cfg_r, ready_w), env=ENV, cwd="/",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(cfg_r)
    os.close(ready_w)
    os.write(cfg_w, config)
    os.close(cfg_w)
    status = read_all(ready_r)
    return proc.wait(60), status


def test_objfs_serve_takes_the_pinned_flags_and_answers_on_its_ready_fd() -> None:
    """The server end as a process: a config it cannot read, and one it reads (then it finds no
    FUSE fd and no mount point) both end with one ``error:`` line and a non-zero status."""
    rc, status = serve_process(config=b"{not json")
    assert rc == 1 and status.startswith(b"error: unreadable mount config: ") and status.count(b"\n") == 1
    assert status.endswith(b"\n")
    rc, status = serve_process(config=CONFIG_BYTES)
    assert (rc, status) == (2, b"error: objfs serve needs --fuse-fd or --mountpoint\n")


def test_the_serve_command_line_is_pinned_and_parsed_by_objfs() -> None:
    """The flags a launcher passes (``fusefs.proc.spawn``) are those ``objfs serve`` takes: a
    plugin may start a server of another build (a fresh process when the zygote is down)."""
    argv, fds = serve_command(["objfs"], 3, 4, fuse_fd=5, grant_fd=6, regrant_fd=7)
    assert argv == ["objfs", "serve", "--config-fd", "3", "--fuse-fd", "5", "--ready-fd", "4", "--grant-fd", "6",
                    "--regrant-fd", "7"]
    assert fds == [3, 5, 4, 6, 7]
    argv, fds = serve_command(["objfs"], 3, 4, mountpoint="/mnt", service_link_fd=8, debug=True)
    assert argv == ["objfs", "serve", "--config-fd", "3", "--ready-fd", "4", "--service-link-fd", "8",
                    "--mountpoint", "/mnt", "--debug"]
    assert fds == [3, 4, 8]
    args = cli._parser().parse_args(argv[1:])
    assert (args.config_fd, args.ready_fd, args.service_link_fd, args.mountpoint, args.debug) == (3, 4, 8, "/mnt", True)
