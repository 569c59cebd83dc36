"""FUSE passthrough from complete node-cache files (fusefs.backing, fusefs.ops) through real mounts.

The passthrough tests need the patched pyfuse3 built against libfuse >= 3.17 (``make deps``) and a
kernel with FUSE passthrough (>= 6.9); they are skipped, with the reason, where either is missing.
The fallback test runs everywhere."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusefs import backing
from fusefs.config import MiB, MountConfig, Tuning
from tests.fsmount import Mounted
from tests.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse

TUNING = Tuning(block_size=1 * MiB, max_prefetch_blocks=2, memory_blocks=4, readahead_kb=1024)
SIZE = 6 * MiB + 777
STOPPED_READ_LIMIT = 120.0  # seconds: a read the stopped server would have to answer never ends

needs_passthrough = pytest.mark.skipif(
    not backing.patched_pyfuse3(), reason="pyfuse3 without the passthrough API (the patched build is not installed)")


@pytest.fixture
def config(s3_server: RcloneS3, s3_config: MountConfig) -> MountConfig:
    return dataclasses.replace(s3_config, tuning=TUNING, metadata_ttl=0)


@pytest.fixture
def data(s3_server: RcloneS3, config: MountConfig) -> bytes:
    payload = random_bytes(SIZE, 11)
    s3_server.client().put_object(Bucket=config.bucket, Key="w.bin", Body=payload)
    return payload


def cached(mount_fs: Callable[..., Mounted], config: MountConfig, data: bytes) -> None:
    """Read the object once through a mount, so that its complete file is in the node cache."""
    m = mount_fs(config, "filler")
    assert (m.path / "w.bin").read_bytes() == data
    m.unmount()  # the server drains its writer, which publishes the complete file
    assert list(Path(config.cache_dir or "").rglob("*.obj")), "no complete file was published"


def pread_all(fd: int, size: int) -> bytes:
    parts = []
    off = 0
    while off < size:
        chunk = os.pread(fd, 1 * MiB, off)
        if not chunk:
            break
        parts.append(chunk)
        off += len(chunk)
    return b"".join(parts)


@pytest.fixture
def stopped() -> Iterator[Callable[[Mounted], None]]:
    """``stop(m)``: SIGSTOP the mount's server until the test ends (then SIGCONT)."""
    procs: list[Mounted] = []

    def stop(m: Mounted) -> None:
        os.kill(m.proc.pid, signal.SIGSTOP)
        procs.append(m)

    yield stop
    for m in procs:
        os.kill(m.proc.pid, signal.SIGCONT)


def read_while_stopped(fd: int, size: int) -> bytes | None:
    """The bytes, read in a thread; None if the read did not end (it waits for the stopped server)."""
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(pread_all(fd, size)), daemon=True)
    t.start()
    t.join(STOPPED_READ_LIMIT)
    return result[0] if result else None


def test_without_passthrough_reads_go_through_the_server_and_it_says_so_once(
    config: MountConfig, data: bytes, mount_fs: Callable[..., Mounted]
) -> None:
    cached(mount_fs, config, data)
    # an unreachable broker: the build may have passthrough, this server cannot register files
    m = mount_fs(dataclasses.replace(config, broker_socket="/nonexistent/objfs/broker.sock"))
    for _ in range(3):
        assert (m.path / "w.bin").read_bytes() == data
    m.unmount()
    lines = [line for line in m.log_text().splitlines() if "passthrough" in line]
    assert len(lines) == 1, lines


@needs_passthrough
def test_complete_file_is_read_by_the_kernel_with_the_server_stopped(
    config: MountConfig, data: bytes, mount_fs: Callable[..., Mounted], stopped: Callable[[Mounted], None]
) -> None:
    cached(mount_fs, config, data)
    m = mount_fs(config)
    fd = os.open(m.path / "w.bin", os.O_RDONLY)
    try:
        stopped(m)
        got = read_while_stopped(fd, SIZE)
        os.kill(m.proc.pid, signal.SIGCONT)
        assert got is not None, "reads reached the server: the open was not passed through"
        assert got == data
    finally:
        os.close(fd)


@needs_passthrough
def test_an_inode_is_all_passthrough_or_direct_beside_it(
    config: MountConfig, data: bytes, s3_server: RcloneS3, mount_fs: Callable[..., Mounted]
) -> None:
    cached(mount_fs, config, data)
    m = mount_fs(config)
    path = m.path / "w.bin"
    first = os.open(path, os.O_RDONLY)  # passthrough
    try:
        second = os.open(path, os.O_RDONLY)  # the same backing file
        assert pread_all(second, SIZE) == data
        os.close(second)
        # the object replaced: a new open pins the new version, which has no complete file: it is
        # answered by the server in direct I/O (a page-cache open would fail beside passthrough)
        new = random_bytes(SIZE, 12)
        s3_server.client().put_object(Bucket=config.bucket, Key="w.bin", Body=new)
        third = os.open(path, os.O_RDONLY)
        try:
            assert pread_all(third, SIZE) == new
            assert pread_all(first, SIZE) == data  # the first open pinned the old version: its bytes
        finally:
            os.close(third)
        writer = os.open(path, os.O_WRONLY | os.O_TRUNC)  # writes go direct too
        try:
            os.write(writer, b"written")
        finally:
            os.close(writer)
    finally:
        os.close(first)
    # every passthrough open closed: ordinary opens work again
    assert path.read_bytes() == b"written"
