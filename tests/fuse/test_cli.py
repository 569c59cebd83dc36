"""The ``objfs`` command: mount/unmount end to end, every kind of bad input, and ``objfs serve``'s
fd contract (config pipe, inherited /dev/fuse fd, ready line)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs import kernel
from fusefs.config import MountConfig
from testing.fsmount import start_serve
from testing.servers import RcloneS3, free_port

pytestmark = pytest.mark.fuse

ROOT = Path(__file__).resolve().parents[2]


def objfs(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fusefs.proc.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def aws_env(server: RcloneS3, secret: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=secret or server.secret_key,
               AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    return env


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    t = tmp_path / "mnt"
    t.mkdir()
    yield t
    if kernel.find_mount(str(t)) is not None:
        kernel.unmount(str(t), lazy=True)


def serve_pids(mountpoint: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmd and str(mountpoint).encode() in cmd:
            pids.append(int(entry))
    return pids


def test_mount_daemonizes_and_unmount_stops_the_server(
    s3_server: RcloneS3, bucket: str, target: Path, tmp_path: Path
) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="dir/hello.txt", Body=b"hi")
    r = objfs("mount", f"s3://{bucket}", str(target), "--endpoint-url", s3_server.endpoint,
              "--cache-dir", str(tmp_path / "cache"), env=aws_env(s3_server))
    assert r.returncode == 0, r.stderr
    entry = kernel.find_mount(str(target))
    assert entry is not None and entry.fstype == "fuse.objfs"
    assert (target / "dir" / "hello.txt").read_bytes() == b"hi"
    ra = Path(f"/sys/class/bdi/{entry.major_minor}/read_ahead_kb").read_text().strip()
    assert ra == str(MountConfig(backend="s3", bucket="x").tuning.readahead_kb)
    pids = serve_pids(target)
    assert len(pids) == 1
    # the secret reached the server through the config pipe: not in its argv or environment
    assert s3_server.secret_key.encode() not in Path(f"/proc/{pids[0]}/cmdline").read_bytes()
    assert s3_server.secret_key.encode() not in Path(f"/proc/{pids[0]}/environ").read_bytes()
    r = objfs("unmount", str(target))
    assert r.returncode == 0, r.stderr
    assert kernel.find_mount(str(target)) is None
    deadline = time.monotonic() + 15
    while serve_pids(target) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert serve_pids(target) == []
    r = objfs("unmount", str(target))
    assert r.returncode != 0 and "not mounted" in r.stderr


def test_read_only_flag_mounts_read_only(s3_server: RcloneS3, bucket: str, target: Path) -> None:
    r = objfs("mount", f"s3://{bucket}", str(target), "--endpoint-url", s3_server.endpoint, "--read-only",
              "--no-cache", env=aws_env(s3_server))
    assert r.returncode == 0, r.stderr
    m = kernel.find_mount(str(target))
    assert m is not None and "ro" in m.options.split(",")
    with pytest.raises(OSError):
        (target / "x").write_bytes(b"1")


BAD_INPUTS = {
    "bad url": (["http://bucket"], "malformed source"),
    "no bucket": (["s3://"], "no bucket"),
    "missing bucket": (["s3://no-such-bucket-objfs"], "does not exist"),
    "wrong credentials": (["s3://{bucket}", "--secret"], "access denied"),
    "unreachable endpoint": (["s3://{bucket}", "--unreachable"], "cannot reach"),
    "missing mount point": (["s3://{bucket}", "--missing-target"], "does not exist"),
    "mount point is a file": (["s3://{bucket}", "--file-target"], "not a directory"),
    "malformed size": (["s3://{bucket}", "--cache-size", "12QB"], "malformed size"),
    "malformed uid": (["s3://{bucket}", "--uid", "-5"], "uid"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_no_mount(
    case: str, s3_server: RcloneS3, bucket: str, target: Path, tmp_path: Path
) -> None:
    raw, expected = BAD_INPUTS[case]
    source = raw[0].format(bucket=bucket)
    extra = list(raw[1:])
    endpoint = s3_server.endpoint
    secret = None
    mountpoint = target
    if "--secret" in extra:
        extra.remove("--secret")
        secret = "wrong-secret"
    if "--unreachable" in extra:
        extra.remove("--unreachable")
        endpoint = f"http://127.0.0.1:{free_port()}"
    if "--missing-target" in extra:
        extra.remove("--missing-target")
        mountpoint = tmp_path / "absent"
    if "--file-target" in extra:
        extra.remove("--file-target")
        mountpoint = tmp_path / "a-file"
        mountpoint.write_text("x")
    started = time.monotonic()
    r = objfs("mount", source, str(mountpoint), "--endpoint-url", endpoint, "--no-cache", *extra,
              env=aws_env(s3_server, secret))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert expected in lines[0].lower(), lines[0]
    assert kernel.find_mount(str(mountpoint)) is None
    assert time.monotonic() - started < 60


def test_serve_contract_with_a_mount_made_by_the_caller(
    s3_server: RcloneS3, s3_config: MountConfig, target: Path, tmp_path: Path
) -> None:
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="a.txt", Body=b"served")
    fd = kernel.mount_fuse(str(target))
    try:
        proc, line = start_serve(s3_config, fd, tmp_path / "serve.log")
    finally:
        os.close(fd)
    try:
        assert line == "ready"
        assert (target / "a.txt").read_bytes() == b"served"
    finally:
        kernel.unmount(str(target), lazy=True)
    assert proc.wait(15) == 0  # unmounting ends the server's loop

    bad = dataclasses.replace(s3_config, bucket="no-such-bucket-objfs")
    fd = kernel.mount_fuse(str(target))
    try:
        proc, line = start_serve(bad, fd, tmp_path / "serve-bad.log")
    finally:
        os.close(fd)
        kernel.unmount(str(target), lazy=True)
    assert line.startswith("error: ") and "does not exist" in line
    assert proc.wait(15) != 0


def test_serve_unmounts_cleanly_on_sigterm(
    s3_server: RcloneS3, s3_config: MountConfig, target: Path, tmp_path: Path
) -> None:
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="a.txt", Body=b"x")
    fd = kernel.mount_fuse(str(target))
    try:
        proc, line = start_serve(s3_config, fd, tmp_path / "serve.log", mountpoint=str(target))
    finally:
        os.close(fd)
    assert line == "ready"
    assert (target / "a.txt").read_bytes() == b"x"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert kernel.find_mount(str(target)) is None
