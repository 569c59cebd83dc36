"""``objfs zygote`` and the plugin's client for it: servers forked from a pre-imported process
speak the same hand-off as ``objfs serve``, serve real mounts, outlive the zygote, and a zygote
that cannot start costs nothing but speed."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.node.launcher import ProcessLauncher, proc_start_time
from csi.node.zygote_client import Zygote
from fusefs import kernel
from fusefs.config import MountConfig
from fusefs.proc.service_process import ServiceProcess
from fusefs.wire import handoff
from testing.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse
OBJFS = [sys.executable, "-m", "fusefs.proc.cli"]
ENV = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": "/", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[Zygote]:
    z = Zygote(OBJFS, ENV, str(tmp_path / "zygote.log"))
    try:
        yield z
    finally:
        z.close()


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while proc_start_time(pid) is not None:  # a zombie counts as gone: the zygote must reap it
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_forked_server_reports_like_objfs_serve_and_is_reaped(zygote: Zygote, tmp_path: Path) -> None:
    assert zygote.ensure()
    cfg_r, cfg_w = os.pipe()
    ready_r, ready_w = os.pipe()
    log_path = tmp_path / "server.log"
    with open(log_path, "ab") as logf, open(os.devnull, "rb") as fuse:
        pid = zygote.start((cfg_r, fuse.fileno(), ready_w, logf.fileno(), fuse.fileno(), fuse.fileno()))
    os.close(cfg_r)
    os.close(ready_w)
    assert pid is not None and pid != zygote.pid
    os.write(cfg_w, b"{not json")
    os.close(cfg_w)
    status = handoff.read_status(ready_r, 30)
    os.close(ready_r)
    assert status is not None and status.startswith("error: unreadable mount config")
    assert wait_gone(pid)
    assert "unreadable mount config" in log_path.read_text()


def test_forked_server_serves_a_mount_and_outlives_the_zygote(
    zygote: Zygote, s3_server: RcloneS3, s3_config: MountConfig, tmp_path: Path
) -> None:
    data = random_bytes(3 * 1024 * 1024 + 5, seed=11)
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="weights.bin", Body=data)
    target = tmp_path / "mnt"
    target.mkdir()
    launcher = ProcessLauncher(str(tmp_path / "logs"), OBJFS, uid=0, gid=0)
    launcher._zygote = zygote  # the fixture's, so that it is closed whatever happens
    service = ServiceProcess(OBJFS, None, 0)
    fuse_fd = kernel.mount_fuse(str(target), read_only=True)
    try:
        with service.grant(str(target), s3_config) as grant:
            handle = launcher.start(s3_config.server_view(), fuse_fd, "zygote-test", grant)
        os.close(fuse_fd)
        fuse_fd = -1
        assert handle.pid != zygote.pid
        assert (target / "weights.bin").read_bytes() == data
        zygote.close()  # the zygote leaves; its server does not
        assert launcher.alive(handle)
        assert (target / "weights.bin").read_bytes() == data
        kernel.unmount(str(target))
        assert wait_gone(handle.pid)  # unmounting ends the server, as with objfs serve
    finally:
        service.close()
        if fuse_fd >= 0:
            os.close(fuse_fd)
        if kernel.find_mount(str(target)) is not None:
            kernel.unmount(str(target), lazy=True)


def test_a_zygote_that_cannot_start_means_direct_starts(tmp_path: Path) -> None:
    broken = Zygote(["/bin/false"], ENV, str(tmp_path / "zygote.log"))
    try:
        assert not broken.ensure()
        with open(os.devnull, "rb") as f:
            assert broken.start((f.fileno(),) * 6) is None
    finally:
        broken.close()
