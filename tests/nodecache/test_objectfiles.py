"""Whole-object files of the node cache (fusefs.nodecache.objectfiles via fusefs.nodecache.cache):
filled block by block, verified before they are published complete, never served wrong; block sizes and
tenants in keys."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from fusefs.config import Credentials, MountConfig
from fusefs.errors import ObjectChangedError
from fusefs.nodecache import writer as writer_module
from fusefs.nodecache.cache import BlockKey, NodeCache
from fusefs.nodecache.keys import tenant_of
from testing.servers import random_bytes
from tests.nodecache.test_cache import GatedWriter

KiB = 1024
MiB = 1024 * KiB
BS = 256 * KiB
OBJ = random_bytes(3 * BS + 1000, 7)  # four blocks, the last one short


def key(index: int, bs: int = BS, data: bytes = OBJ, tenant: str = "t1", version: str = "v1") -> BlockKey:
    return BlockKey("s3|http://127.0.0.1:1|b", "models/w.bin", version, index, bs, len(data), tenant)


def block(index: int, bs: int = BS, data: bytes = OBJ) -> bytes:
    return data[index * bs:(index + 1) * bs]


def files(root: Path, suffix: str) -> list[Path]:
    return sorted((root / "objects").rglob(f"*{suffix}"))


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[NodeCache]:
    c = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    yield c
    c.close()


def fill(cache: NodeCache, blocks: range, **kw: object) -> None:
    for i in blocks:
        assert cache.put(key(i, **kw), block(i))  # type: ignore[arg-type]


def test_blocks_fill_one_file_published_read_only_once_complete(tmp_path: Path, cache: NodeCache) -> None:
    root = tmp_path / "cache"
    fill(cache, range(3))
    oid = key(0).object_id()
    assert cache.complete_file(oid) is None  # block 3 is missing
    (part,) = files(root, ".part")
    assert part.stat().st_size == len(OBJ)  # one sparse file of the object's size
    assert all(cache.get(key(i)) == block(i) for i in range(3))
    assert cache.get(key(3)) is None
    fill(cache, range(3, 4))
    path = cache.complete_file(oid)
    assert path is not None and path.endswith(".obj")
    assert not files(root, ".part")
    assert Path(path).read_bytes() == OBJ
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400  # read-only, and private
    assert all(cache.get(key(i)) == block(i) for i in range(4))  # blocks still served, still checked
    # no key, store or tenant in any file name
    assert not any("models" in str(p) or "t1" in p.name for p in root.rglob("*"))


def test_a_file_corrupted_before_publishing_is_never_published(tmp_path: Path, cache: NodeCache) -> None:
    fill(cache, range(3))
    (part,) = files(tmp_path / "cache", ".part")
    with open(part, "r+b") as f:
        f.seek(BS + 5)
        f.write(b"\xff\xfe")
    fill(cache, range(3, 4))
    assert cache.complete_file(key(0).object_id()) is None
    assert not files(tmp_path / "cache", ".obj")
    assert cache.get(key(1)) is None  # its marker went with the check: fetched again
    assert cache.stats()["corrupt"] >= 1
    assert cache.put(key(1), block(1))
    path = cache.complete_file(key(0).object_id())
    assert path is not None and Path(path).read_bytes() == OBJ


def test_a_complete_file_corrupted_later_is_evicted_not_served(tmp_path: Path, cache: NodeCache) -> None:
    fill(cache, range(4))
    path = cache.complete_file(key(0).object_id())
    assert path is not None
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(2 * BS)
        f.write(b"\0\1\2")
    assert cache.get(key(2)) is None
    assert not os.path.exists(path)  # unlinked: no later passthrough open is given it
    assert cache.complete_file(key(0).object_id()) is None
    assert cache.get(key(0)) is None  # markers of the evicted file read as misses


def test_block_size_is_part_of_the_key(cache: NodeCache) -> None:
    fill(cache, range(4))
    # block 1 of 512 KiB blocks is bytes 512K-1M, not what block 1 of 256 KiB blocks holds
    assert cache.get(key(1, bs=2 * BS)) is None
    assert cache.put(key(1, bs=2 * BS), block(1, 2 * BS))
    assert cache.get(key(1, bs=2 * BS)) == block(1, 2 * BS)
    assert cache.get(key(1)) == block(1)
    # an object of one block is the whole object whatever the block size
    small = OBJ[:1000]
    assert cache.put(key(0, data=small), small)
    assert cache.get(key(0, bs=2 * BS, data=small)) == small


def test_tenants_do_not_share_entries(cache: NodeCache) -> None:
    fill(cache, range(4))
    assert cache.get(key(0, tenant="t2")) is None
    assert cache.complete_file(key(0, tenant="t2").object_id()) is None
    assert cache.complete_file(key(0).object_id()) is not None


def test_tenant_is_a_hash_of_endpoint_and_principal_never_a_secret() -> None:
    def cfg(**creds: str) -> MountConfig:
        return MountConfig(backend="s3", bucket="b", endpoint_url="http://127.0.0.1:1",
                           credentials=Credentials(**creds))

    a = tenant_of(cfg(access_key_id="AK1", secret_access_key="S1"))
    assert a == tenant_of(cfg(access_key_id="AK1", secret_access_key="other"))  # same principal
    assert a != tenant_of(cfg(access_key_id="AK2", secret_access_key="S1"))
    assert "AK1" not in a and "S1" not in a and len(a) == 32
    other_endpoint = MountConfig(backend="s3", bucket="b", endpoint_url="http://127.0.0.1:2",
                                 credentials=Credentials("AK1", "S1"))
    assert tenant_of(other_endpoint) != a
    assert tenant_of(cfg()) == ""  # ambient: proven per object version instead
    sa = '{"client_email": "sa@p.iam.gserviceaccount.com", "private_key": "PRIVATE"}'
    g = MountConfig(backend="gcs", bucket="b", credentials=Credentials(service_account_json=sa))
    rotated = Credentials(service_account_json=sa.replace("PRIVATE", "X"))
    assert tenant_of(g) and tenant_of(g) == tenant_of(MountConfig(backend="gcs", bucket="b", credentials=rotated))


async def test_one_fetch_per_block_fills_the_file_through_get_or_fetch(cache: NodeCache) -> None:
    calls = []

    async def fetcher(i: int) -> bytes:
        calls.append(i)
        await trio.lowlevel.checkpoint()
        return block(i)

    async with trio.open_nursery() as nursery:
        for _ in range(3):  # three readers of every block at once
            for i in range(4):
                nursery.start_soon(partial(cache.get_or_fetch, key(i), partial(fetcher, i), wait_for_space=True))
    assert sorted(calls) == [0, 1, 2, 3]
    await trio.to_thread.run_sync(cache.close)  # drains the writer, which publishes
    check_published(cache.directory)


async def test_the_writer_publishes_a_file_whose_last_block_came_first(tmp_path: Path, cache: NodeCache) -> None:
    # Concurrent prefetches finish in any order: the batch with the last block is then not the one
    # that completes the file, and nobody may have to ask for the file for it to be published.
    for i in (3, 1, 0, 2):
        assert await cache.get_or_fetch(key(i), partial(trio.to_thread.run_sync, block, i),
                                        wait_for_space=True) == block(i)
    await _until(lambda: bool(files(tmp_path / "cache", ".obj")))
    (path,) = files(tmp_path / "cache", ".obj")
    assert path.read_bytes() == OBJ
    assert not files(tmp_path / "cache", ".part")


@pytest.fixture
def read_back(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The blocks read back from the disk to be checked (``checks.tag_on_disk``), in order."""
    from fusefs.nodecache import checks

    seen: list[int] = []
    tag_on_disk = checks.tag_on_disk

    def counted(fd: int, bkey: BlockKey, length: int, direct_fd: int | None = None) -> int:
        seen.append(bkey.index)
        return tag_on_disk(fd, bkey, length, direct_fd)

    monkeypatch.setattr(checks, "tag_on_disk", counted)
    return seen


async def test_blocks_a_server_wrote_are_not_read_back(tmp_path: Path, cache: NodeCache, read_back: list[int]) -> None:
    # Reading every block this server wrote back from the disk doubled the disk reads and the CRC
    # work of a cold read (issue 26): its tag covers the bytes as the kernel took them, and the
    # file's seal shows that nothing was written since.
    for i in range(4):  # the read that completes the object returns with its file published
        assert await cache.get_or_fetch(key(i), partial(trio.to_thread.run_sync, block, i)) == block(i)
    await trio.to_thread.run_sync(cache.close)
    check_published(cache.directory)
    assert read_back == []


def test_blocks_another_server_wrote_are_read_back_at_publish(tmp_path: Path, read_back: list[int]) -> None:
    first = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    try:
        for i in range(3):
            assert first.put(key(i), block(i))
    finally:
        first.close()
    second = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    try:
        assert second.put(key(3), block(3))
        path = second.complete_file(key(0).object_id())
        assert path is not None and Path(path).read_bytes() == OBJ
    finally:
        second.close()
    assert sorted(read_back) == [0, 1, 2]  # the first server's blocks, once each


def test_two_servers_publishing_one_file_at_once_leave_it_published(tmp_path: Path, cache: NodeCache,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Server 2 has checked the partial file (its blocks read through an fd opened before the
    # rename) when server 1 publishes it; server 2's publish must then leave the file alone.
    fill(cache, range(4))
    oid = key(0).object_id()
    other = NodeCache(cache.directory, 64 * MiB)
    try:
        assert other._files is not None
        partial = other._files.data_file(oid)
        assert partial is not None and not partial.complete
        monkeypatch.setattr(other._files, "verify", lambda oid, df: True)  # its check passed, before the rename
        path = cache.complete_file(oid)
        assert path is not None
        done = other._files.publish(oid, partial)
        assert done is not None and done.complete
        assert Path(path).read_bytes() == OBJ  # still there
        assert other.complete_file(oid) == path
    finally:
        other.close()


def test_a_lookup_while_the_file_is_renamed_complete_keeps_the_blocks_marked(tmp_path: Path, cache: NodeCache) -> None:
    # A publisher renames the partial file, then re-points the index row: a lookup in between finds
    # a row whose file it cannot open. That is a miss, not a block to forget.
    fill(cache, range(4))
    (part,) = files(tmp_path / "cache", ".part")
    renamed = part.with_suffix(".obj")
    part.rename(renamed)  # the publisher's rename; its row update has not happened yet
    assert cache.get(key(1)) is None
    renamed.rename(part)
    path = cache.complete_file(key(0).object_id())  # every marker is still there: it publishes
    assert path is not None and Path(path).read_bytes() == OBJ


def check_published(directory: str) -> None:
    again = NodeCache(directory, 64 * MiB)
    try:
        path = again.complete_file(key(0).object_id())
        assert path is not None and Path(path).read_bytes() == OBJ
    finally:
        again.close()


async def _until(check: Callable[[], bool], seconds: float = 30.0) -> None:
    with trio.fail_after(seconds):
        while True:
            if await trio.to_thread.run_sync(check):
                return
            await trio.sleep(0.02)


class SlowDisk:
    """A cold read that outruns a stuck disk: a cache whose writer's queue holds one block (two
    of a data file's, which go to no overflow task) and whose writer is held at the door, so of
    the object's four blocks 0 is being written, 1 and 2 are queued, and 3 waits for room until
    the writer is seen stuck (``STALL``, shortened here) and is not cached. Records every fetch;
    ``replaced`` makes later fetches fail as a replaced object's."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(writer_module, "STALL", 0.2)
        self.cache = NodeCache(str(tmp_path / "cache"), 64 * MiB, write_queue_bytes=BS)
        self.writer = GatedWriter(self.cache)
        self.calls: list[int] = []
        self.replaced = False

    def fetcher(self, i: int) -> Callable[[], Awaitable[bytes]]:
        async def fetch() -> bytes:
            self.calls.append(i)
            await trio.lowlevel.checkpoint()
            if self.replaced:  # the store now holds another version: the pinned GET fails
                raise ObjectChangedError("models/w.bin changed", key="models/w.bin")
            return block(i)
        return fetch

    async def read_all(self) -> None:
        c = self.cache
        assert await c.get_or_fetch(key(0), self.fetcher(0)) == block(0)
        await trio.to_thread.run_sync(self.writer.entered.acquire)  # the writer holds block 0
        for i in (1, 2, 3):
            assert await c.get_or_fetch(key(i), self.fetcher(i)) == block(i)
        assert c.stats()["store_skipped"] == 1
        assert c.complete_file(key(0).object_id()) is None

    async def close(self) -> None:
        self.writer.gate.set()
        await trio.to_thread.run_sync(self.cache.close)


async def test_blocks_skipped_behind_a_stuck_writer_are_refilled_until_the_file_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(tmp_path, monkeypatch)
    c = disk.cache
    try:
        await disk.read_all()
        disk.writer.gate.set()  # the disk works again: the refiller fetches 3 again, the writer publishes
        await _until(lambda: bool(files(tmp_path / "cache", ".obj")))
        path = c.complete_file(key(0).object_id())
        assert path is not None and await trio.Path(path).read_bytes() == OBJ
        assert sorted(disk.calls) == [0, 1, 2, 3, 3]
        assert c.stats()["refills"] == 1
    finally:
        await disk.close()


async def test_a_refill_of_a_replaced_object_leaves_its_file_partial_and_never_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = SlowDisk(tmp_path, monkeypatch)
    c = disk.cache
    try:
        await disk.read_all()
        disk.replaced = True
        disk.writer.gate.set()
        await _until(lambda: c.stats()["refill_errors"] == 1)
        assert c.complete_file(key(0).object_id()) is None
        assert c.stats()["refills"] == 0
        assert [c.get(key(i)) for i in range(3)] == [block(i) for i in range(3)]
        assert c.get(key(3)) is None
    finally:
        await disk.close()


def test_a_complete_file_is_checked_whole_once_per_node_until_it_changes(
    tmp_path: Path, cache: NodeCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(cache, range(4))
    oid = key(0).object_id()
    path = cache.complete_file(oid)  # published: checked whole on the way
    assert path is not None and cache.stats()["file_checks"] == 1

    def new_server() -> tuple[str | None, int]:
        other = NodeCache(cache.directory, 64 * MiB)
        try:
            return other.complete_file(oid), other.stats()["file_checks"]
        finally:
            other.close()

    assert new_server() == (path, 0)  # another server of the node trusts that check
    os.utime(path)  # any change to the file moves its change time: checked again, then trusted
    assert new_server() == (path, 1)
    assert new_server() == (path, 0)
    monkeypatch.setattr("fusefs.nodecache.checks.VERIFIED_FOR", 0.0)  # a check older than VERIFIED_FOR: again
    assert new_server() == (path, 1)


# -- a crash while filling a file -------------------------------------------------------------------

def _fill_and_die(directory: str, kill_at: str) -> None:
    """A server process filling the object's file through ``get_or_fetch`` that is killed
    (SIGKILL: nothing runs after it) at ``kill_at``: halfway through writing block 2's bytes,
    after the last block's marker and before the publish, or in the publish after the check and
    before the rename."""
    from fusefs import directio
    from fusefs.nodecache import objectfiles

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    cache = NodeCache(directory, 64 * MiB)
    if kill_at == "mid-block":
        pwrite_all = directio.pwrite_all

        def torn(fd: int, data: bytes | bytearray | memoryview, offset: int, direct_fd: int | None = None,
                 seen: directio.Seen | None = None) -> None:
            if offset == 2 * BS:
                pwrite_all(fd, data[:len(data) // 2], offset, direct_fd, seen)
                die()
            pwrite_all(fd, data, offset, direct_fd, seen)

        directio.pwrite_all = torn  # (the module objectfiles writes through)
    elif kill_at == "before-publish":
        assert cache._writer is not None
        cache._writer._after_batch = lambda oid: die() if all(cache.contains(key(i)) for i in range(4)) else None
    else:
        objectfiles.publish = lambda directory, data: die()  # type: ignore[assignment,return-value]

    async def read_all() -> None:
        for i in range(4):
            await cache.get_or_fetch(key(i), partial(trio.to_thread.run_sync, block, i))

    trio.run(read_all)


@pytest.mark.parametrize("kill_at", ["mid-block", "before-publish", "before-rename"])
def test_a_server_killed_while_filling_a_file_never_leaves_it_published_unchecked(tmp_path: Path, kill_at: str) -> None:
    directory = str(tmp_path / "cache")
    child = multiprocessing.get_context("spawn").Process(target=_fill_and_die, args=(directory, kill_at))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert not files(tmp_path / "cache", ".obj")  # nothing published by the dead server
    (part,) = files(tmp_path / "cache", ".part")
    oid = key(0).object_id()
    if kill_at != "mid-block":
        # Every block and marker is there, but the checks the dead server made as it wrote died
        # with it: the next server reads the whole file back before it publishes anything.
        with open(part, "r+b") as f:
            f.seek(BS + 5)
            f.write(b"\xff\xfe")
    again = NodeCache(directory, 64 * MiB)
    try:
        marked = [again.contains(key(i)) for i in range(4)]
        # (blocks 0 and 1 may have been in the killed transaction with block 2)
        assert marked[2:] == [False, False] if kill_at == "mid-block" else all(marked)
        assert again.complete_file(oid) is None
        assert not files(tmp_path / "cache", ".obj")
        for i in range(4):  # what is missing or damaged is stored again: then it publishes, right
            if again.get(key(i)) is None:
                assert again.put(key(i), block(i))
        path = again.complete_file(oid)
        assert path is not None and Path(path).read_bytes() == OBJ
    finally:
        again.close()
