"""FUSE passthrough from complete node-cache files (fusefs.passthrough.backing, fusefs.fs.ops) through real mounts.

The passthrough tests need the patched pyfuse3 built against libfuse >= 3.17 (``make deps``) and a
kernel with FUSE passthrough (>= 6.9); they are skipped, with the reason, where either is missing.
The fallback test runs everywhere."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi.node.broker import Broker
from fusefs.config import MiB, MountConfig, Tuning
from fusefs.nodecache.cache import NodeCache
from fusefs.nodecache.keys import BlockKey, tenant_of
from fusefs.passthrough import backing
from fusefs.passthrough.broker import BrokerClient
from fusefs.store import open_store
from testing.fsmount import Mounted
from testing.scrape import parse, value
from testing.servers import RcloneS3, random_bytes

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
    """Read the object through a mount: its complete file is in the node cache when the read
    returns (the fill keeps pace with the reader, whose last block waits for the publish)."""
    m = mount_fs(config, "filler")
    assert (m.path / "w.bin").read_bytes() == data
    assert list(Path(config.cache_dir or "").rglob("*.obj"))
    m.unmount()


def figures_at_exit(m: Mounted) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The server's metrics file, written on its way out."""
    m.unmount()
    return parse(Path(m.config.metrics_path).read_text())


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
def test_reads_of_a_complete_file_never_reach_the_server(
    config: MountConfig, data: bytes, mount_fs: Callable[..., Mounted], tmp_path: Path
) -> None:
    cached(mount_fs, config, data)
    m = mount_fs(dataclasses.replace(config, metrics_path=str(tmp_path / "pt.prom")))
    for _ in range(2):
        assert (m.path / "w.bin").read_bytes() == data
    figures = figures_at_exit(m)
    assert value(figures, "objfs_fuse_operation_seconds_count", op="open") == 2
    assert value(figures, "objfs_fuse_passthrough_opens_total") == 2
    assert value(figures, "objfs_fuse_operation_seconds_count", op="read") == 0
    assert value(figures, "objfs_store_requests_total", kind="GET") == 0


#: blocks larger than any one FUSE read (1 MiB at most): a reader needs block 0's fetch through the
#: node cache, not only its first read's own small GET (``BlockReader.read``, urgent)
BIG_BLOCKS = Tuning(block_size=2 * MiB, max_prefetch_blocks=2, memory_blocks=4, readahead_kb=1024)


@needs_passthrough
def test_an_object_is_complete_the_moment_its_first_read_returns(
    s3_server: RcloneS3, config: MountConfig, mount_fs: Callable[..., Mounted], stopped: Callable[[Mounted], None],
    tmp_path: Path,
) -> None:
    config = dataclasses.replace(config, tuning=BIG_BLOCKS)
    payload = random_bytes(9 * MiB + 777, 13)
    s3_server.client().put_object(Bucket=config.bucket, Key="model.bin", Body=payload)
    first = mount_fs(dataclasses.replace(config, metrics_path=str(tmp_path / "first.prom")), "first")
    second = mount_fs(config, "second")
    with open(first.path / "model.bin", "rb") as f:  # read from start to end, and closed
        assert f.read() == payload
    # No wait, no polling: the object's file is complete and published now.
    (done,) = Path(config.cache_dir or "").rglob("*.obj")
    assert done.read_bytes() == payload
    assert not list(Path(config.cache_dir or "").rglob("*.part"))
    # Another mount of the node passes it through: its reads never reach its (stopped) server.
    fd = os.open(second.path / "model.bin", os.O_RDONLY)
    try:
        stopped(second)
        got = read_while_stopped(fd, len(payload))
        os.kill(second.proc.pid, signal.SIGCONT)
        assert got is not None, "the second mount's reads reached its server: the open was not passed through"
        assert got == payload
    finally:
        os.close(fd)
    # And the first mount's next open is passed through too.
    assert (first.path / "model.bin").read_bytes() == payload
    figures = figures_at_exit(first)
    assert value(figures, "objfs_fuse_passthrough_opens_total") == 1
    assert value(figures, "objfs_node_cache_published_objects_total") == 1
    assert value(figures, "objfs_node_cache_skipped_blocks_total") == 0


def cached_blocks(config: MountConfig, key: str) -> set[int]:
    """Which blocks of object ``key`` the node cache holds, asked with no server running (the
    store names the object's version and its identity in cache keys, as a server's does)."""
    store = open_store(config)
    info = store.head(key)
    cache = NodeCache(config.cache_dir or "", 1 << 30)
    try:
        block_size = config.tuning.block_size
        return {i for i in range(-(-info.size // block_size))
                if cache.contains(BlockKey(store.identity, info.key, info.version, i, block_size, info.size,
                                           tenant_of(config)))}
    finally:
        cache.close()


def test_a_second_mount_reads_the_cached_part_of_an_object_from_the_cache_and_completes_it(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted], tmp_path: Path,
) -> None:
    config = dataclasses.replace(s3_config, metadata_ttl=0, tuning=TUNING)
    payload = random_bytes(8 * MiB + 99, 14)  # nine blocks
    s3_server.client().put_object(Bucket=config.bucket, Key="part.bin", Body=payload)
    first = mount_fs(dataclasses.replace(config, metrics_path=str(tmp_path / "first.prom")), "first")
    with open(first.path / "part.bin", "rb") as f:
        assert f.read(3 * MiB) == payload[:3 * MiB]  # a part of it, and closed
    # Its server drains its writer as it stops: the blocks its reads waited for (1 and 2) are
    # cached. Block 0's read was answered by a GET of just the bytes asked for, and the fetch of
    # block 0 that followed it, like the fetches ahead of the reader, may have been cut off by
    # the exit: which of those made it into the cache is asked, not assumed.
    assert value(figures_at_exit(first), "objfs_node_cache_skipped_blocks_total") == 0
    assert not list(Path(config.cache_dir or "").rglob("*.obj"))
    cached = cached_blocks(config, "part.bin")
    assert {1, 2} <= cached and len(cached) < 9
    second = mount_fs(dataclasses.replace(config, metrics_path=str(tmp_path / "second.prom")), "second")
    assert (second.path / "part.bin").read_bytes() == payload
    (done,) = Path(config.cache_dir or "").rglob("*.obj")  # the second reader completed it
    assert done.read_bytes() == payload
    figures = figures_at_exit(second)
    # every cached block came from the node cache, every other one from one fetch of the store
    assert value(figures, "objfs_node_cache_fetches_total") == 9 - len(cached)
    assert value(figures, "objfs_node_cache_hits_total") >= len(cached)
    # One GET per block that was not cached, as the second server counted what it sent (retries of
    # a transient failure aside), and, if block 0 was not cached, the first read's own small GET.
    sent = value(figures, "objfs_store_requests_total", kind="GET") - value(figures, "objfs_store_retries_total",
                                                                           kind="GET")
    assert sent == 9 - len(cached) + (0 if 0 in cached else 1)


@needs_passthrough
def test_a_partial_object_is_read_through_the_server(
    config: MountConfig, data: bytes, mount_fs: Callable[..., Mounted], tmp_path: Path
) -> None:
    # a fresh node cache: no complete file yet, so the first reader is served by the server
    m = mount_fs(dataclasses.replace(config, metrics_path=str(tmp_path / "cold.prom")))
    assert (m.path / "w.bin").read_bytes() == data
    figures = figures_at_exit(m)
    assert value(figures, "objfs_fuse_passthrough_opens_total") == 0
    assert value(figures, "objfs_fuse_operation_seconds_count", op="read") > 0


@needs_passthrough
def test_passthrough_turned_off_reads_through_the_server(
    config: MountConfig, data: bytes, mount_fs: Callable[..., Mounted], tmp_path: Path
) -> None:
    cached(mount_fs, config, data)
    off = dataclasses.replace(config, tuning=dataclasses.replace(TUNING, passthrough=False),
                              metrics_path=str(tmp_path / "off.prom"))
    m = mount_fs(off)
    assert (m.path / "w.bin").read_bytes() == data
    figures = figures_at_exit(m)
    assert value(figures, "objfs_fuse_passthrough_opens_total") == 0
    # The server read it all from the node cache, none from the store. (At least SIZE: under load a
    # late kernel readahead request can find its block already dropped from the server's memory,
    # and that block is read from the node cache again; seen once in a loaded CI run.)
    assert value(figures, "objfs_node_cache_read_bytes_total") >= SIZE
    assert value(figures, "objfs_store_requests_total", kind="GET") == 0


@needs_passthrough
def test_a_new_version_or_a_writer_gets_a_new_inode_beside_passthrough_opens(
    config: MountConfig, data: bytes, s3_server: RcloneS3, mount_fs: Callable[..., Mounted]
) -> None:
    cached(mount_fs, config, data)
    m = mount_fs(config)
    path = m.path / "w.bin"
    first = os.open(path, os.O_RDONLY)  # passthrough
    try:
        held = os.fstat(first).st_ino
        second = os.open(path, os.O_RDONLY)  # the same backing file, the same inode
        assert os.fstat(second).st_ino == held
        assert pread_all(second, SIZE) == data
        os.close(second)
        # A writer cannot share an inode with passthrough opens (the kernel refuses the open):
        # it gets the path's new inode, the readers keep theirs and its bytes.
        writer = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.fstat(writer).st_ino != held
            os.write(writer, b"written")
        finally:
            os.close(writer)
        assert pread_all(first, SIZE) == data
        assert path.read_bytes() == b"written"
    finally:
        os.close(first)


@needs_passthrough
def test_an_object_replaced_in_the_store_is_read_new_by_new_opens(
    config: MountConfig, data: bytes, s3_server: RcloneS3, mount_fs: Callable[..., Mounted]
) -> None:
    cached(mount_fs, config, data)
    m = mount_fs(config)  # metadata_ttl=0: every open asks the store
    path = m.path / "w.bin"
    first = os.open(path, os.O_RDONLY)  # passthrough of the old version's complete file
    try:
        new = random_bytes(SIZE - 1000, 12)
        s3_server.client().put_object(Bucket=config.bucket, Key="w.bin", Body=new)
        third = os.open(path, os.O_RDONLY)  # the new version, which has no complete file yet
        try:
            assert os.fstat(third).st_ino != os.fstat(first).st_ino
            assert os.fstat(third).st_size == len(new)
            assert pread_all(third, SIZE) == new
        finally:
            os.close(third)
        assert pread_all(first, SIZE) == data  # the first open pinned the old version: its bytes
        assert os.fstat(first).st_size == SIZE
    finally:
        os.close(first)
    assert path.read_bytes() == new


@needs_passthrough
def test_a_server_with_a_broker_socket_registers_through_the_broker(
    config: MountConfig, data: bytes, mount_fs: Callable[..., Mounted], tmp_path: Path
) -> None:
    cached(mount_fs, config, data)
    broker = Broker(str(tmp_path / "broker"), config.cache_dir or "", client_uid=65532)
    try:
        m = mount_fs(dataclasses.replace(config, broker_socket=broker.path, metrics_path=str(tmp_path / "b.prom")))
        for _ in range(2):
            assert (m.path / "w.bin").read_bytes() == data
        figures = figures_at_exit(m)
    finally:
        broker.close()
    assert broker.registered == 2  # each open registered the file, each last release closed it
    assert broker.refused == 0
    assert value(figures, "objfs_fuse_passthrough_opens_total") == 2
    assert value(figures, "objfs_fuse_operation_seconds_count", op="read") == 0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[Broker, Path]]:
    objects = tmp_path / "cache" / "objects" / "ab"
    objects.mkdir(parents=True)
    b = Broker(str(tmp_path / "broker"), str(tmp_path / "cache"), client_uid=65532)
    yield b, objects
    b.close()


def _file(path: Path, mode: int) -> Path:
    path.write_bytes(b"x" * 4096)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("case", ["outside the cache", "open for writing", "not complete", "replaced", "not fuse"])
def test_the_broker_registers_only_complete_cache_files_on_a_fuse_fd(
    broker: tuple[Broker, Path], tmp_path: Path, case: str
) -> None:
    b, objects = broker
    fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    fds = [fuse_fd]
    try:
        flags = os.O_RDONLY
        if case == "outside the cache":
            path, code = _file(tmp_path / "x.obj", 0o400), errno.EACCES
        elif case == "open for writing":
            path, code, flags = _file(objects / "w.obj", 0o600), errno.EACCES, os.O_RDWR
        elif case == "not complete":
            path, code = _file(objects / "p.part", 0o400), errno.EACCES
        else:
            path, code = _file(objects / "r.obj", 0o400), errno.ESTALE if case == "replaced" else errno.EINVAL
        file_fd = os.open(path, flags | os.O_CLOEXEC)
        fds.append(file_fd)
        if case == "replaced":
            os.replace(_file(objects / "new", 0o400), path)
        if case == "not fuse":
            fuse_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            fds.append(fuse_fd)
        with pytest.raises(OSError) as err:
            BrokerClient(b.path).open(fuse_fd, file_fd)
        assert err.value.errno == code
        assert b.registered == 0 and b.refused == 1
    finally:
        for fd in fds:
            os.close(fd)
