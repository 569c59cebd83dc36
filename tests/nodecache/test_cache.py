"""The node-wide block cache (fusefs.nodecache.cache): real diskcache directories, real processes, real mounts."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusefs import buffers
from fusefs.config import MountConfig
from fusefs.nodecache import index, locks
from fusefs.nodecache.cache import BlockKey, NodeCache
from fusefs.store import AsyncStore, open_store

KiB = 1024
MiB = 1024 * KiB


def bkey(index: int = 0, key: str = "models/w.safetensors", version: str = "etag-1") -> BlockKey:
    return BlockKey("s3|http://127.0.0.1:1|bucket", key, version, index)


def blob(index: int, size: int = 256 * KiB) -> bytes:
    seed = hashlib.sha256(str(index).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class Fetcher:
    """A fetch function that records every call and returns known bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls = 0

    async def __call__(self) -> bytes:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        return self.data


def value_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.val"))


def locks_held(cache_dir: Path) -> int:
    """flock locks held (by any process) on the cache's lock files, from /proc/locks (servers keep
    the files open: ``locks.LockStripes``)."""
    inodes = set()
    for p in (cache_dir / "locks").iterdir():
        st = p.stat()
        inodes.add(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    held = 0
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "FLOCK" in fields and "->" not in fields:  # a lock held, not one blocked waiting
                held += fields[fields.index("FLOCK") + 4] in inodes
    return held


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[NodeCache]:
    c = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    yield c
    c.close()


# -- basic behaviour -------------------------------------------------------------------------------


def test_round_trip(cache: NodeCache) -> None:
    k = bkey(3)
    assert cache.get(k) is None
    assert not cache.contains(k)
    assert cache.put(k, blob(3))
    assert cache.contains(k)
    assert cache.get(k) == blob(3)
    # another version or block of the same object is another entry
    assert cache.get(bkey(3, version="etag-2")) is None
    assert cache.get(bkey(4)) is None
    s = cache.stats()
    assert (s["hits"], s["misses"], s["stores"], s["entries"]) == (1, 3, 1, 1)
    assert s["store_bytes"] == s["hit_bytes"] == len(blob(3))
    assert s["volume"] >= len(blob(3))


def test_overwrite_and_empty_block(cache: NodeCache) -> None:
    assert cache.put(bkey(0), b"old")
    assert cache.put(bkey(0), b"new")
    assert cache.get(bkey(0)) == b"new"
    assert cache.put(bkey(1), b"")
    assert cache.get(bkey(1)) == b""


def test_permissions(tmp_path: Path, cache: NodeCache) -> None:
    assert cache.put(bkey(0), blob(0))
    root = tmp_path / "cache"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    (val,) = value_files(root)
    assert stat.S_IMODE(val.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "cache.db").stat().st_mode) == 0o600


async def test_lock_files_private(tmp_path: Path, cache: NodeCache) -> None:
    await cache.get_or_fetch(bkey(0), Fetcher(blob(0)))
    locks = list((tmp_path / "cache" / "locks").iterdir())
    assert locks
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in locks)


def test_block_directories_made_only_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block file's sub-directory is made when the create finds it missing (made once, or again
    after eviction removed it), not before every block: that cost a walk of small files a tenth
    of the server's CPU (issue 26)."""
    made: list[str] = []
    makedirs = os.makedirs

    def counted(name: str, *args: Any, **kwargs: Any) -> None:
        made.append(name)  # makedirs calls itself for missing parents: those are not counted below
        makedirs(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", counted)
    sub = tmp_path / "ab" / "cd"
    for i in range(3):
        index.write_new_file(str(sub / f"{i}.val"), blob(i, 4 * KiB))
    assert made.count(str(sub)) == 1
    for p in sub.iterdir():  # evicted: diskcache removes the emptied directories too
        p.unlink()
    os.removedirs(sub)
    index.write_new_file(str(sub / "3.val"), blob(3, 4 * KiB))
    assert made.count(str(sub)) == 2
    assert (sub / "3.val").read_bytes() == blob(3, 4 * KiB)
    assert stat.S_IMODE(sub.stat().st_mode) == 0o700


def test_block_files_share_few_directories(cache: NodeCache, tmp_path: Path) -> None:
    """Block files go into one level of 256 sub-directories, not diskcache's 65,536 two levels
    deep, where nearly every block of a walk of small files made a directory of its own."""
    for i in range(300):
        assert cache.put(bkey(i), blob(i, 4 * KiB))
    files = value_files(tmp_path / "cache")
    assert len(files) == 300
    assert all(len(p.relative_to(tmp_path / "cache").parts) == 2 for p in files)
    assert len({p.parent for p in files}) <= 256
    assert all(cache.get(bkey(i)) == blob(i, 4 * KiB) for i in range(300))


def test_lru_eviction(tmp_path: Path) -> None:
    limit, size = 4 * MiB, 256 * KiB
    c = NodeCache(str(tmp_path / "cache"), limit)
    try:
        assert c.put(bkey(0), blob(0, size))
        for i in range(1, 48):
            assert c.put(bkey(i), blob(i, size))
            assert c.get(bkey(0)) == blob(0, size)  # block 0 stays the most recently used
            assert c.stats()["volume"] <= limit + size
        assert c.get(bkey(0)) == blob(0, size)
        assert c.get(bkey(1)) is None  # stored early and never read again: evicted
        assert c.get(bkey(47)) == blob(47, size)
        assert c.stats()["entries"] < 48
        assert len(value_files(tmp_path / "cache")) == c.stats()["entries"]  # evicted files are removed
    finally:
        c.close()


# -- corruption --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "remove"])
async def test_corrupt_block_is_deleted_and_refetched(tmp_path: Path, cache: NodeCache, damage: str) -> None:
    k, data = bkey(7), blob(7)
    assert cache.put(k, data)
    (val,) = value_files(tmp_path / "cache")
    if damage == "flip":
        raw = bytearray(val.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        val.write_bytes(bytes(raw))
    elif damage == "truncate":
        os.truncate(val, len(data) - 1)
    elif damage == "extend":
        await trio.Path(val).write_bytes(val.read_bytes() + b"\0")
    else:
        val.unlink()

    assert cache.get(k) is None
    if damage != "remove":
        assert cache.stats()["corrupt"] == 1
        assert not cache.contains(k)  # the entry is gone, not just skipped
    fetch = Fetcher(data)
    assert await cache.get_or_fetch(k, fetch) == data
    assert fetch.calls == 1
    # this waits for the background write (the lock is held until then) and finds the block
    assert await cache.get_or_fetch(k, Fetcher(b"wrong")) == data
    assert cache.get(k) == data


def test_corrupt_database_degrades_to_direct_reads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "cache.db").write_bytes(b"this is not an SQLite database" * 100)
    c = NodeCache(str(root), 64 * MiB)
    try:
        assert not c.usable
        assert c.get(bkey(0)) is None
        assert not c.put(bkey(0), b"x")

        async def main() -> None:
            for i in range(3):
                fetch = Fetcher(blob(i))
                assert await c.get_or_fetch(bkey(i), fetch) == blob(i)
                assert fetch.calls == 1

        trio.run(main)
        assert c.stats()["fetches"] == 3
    finally:
        c.close()
    warnings = [r for r in caplog.records if r.name == "fusefs.nodecache" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1


# -- unwritable caches (root ignores permissions: real mounts) ---------------------------------------


@pytest.fixture(params=["64k", "512k"])
def tiny_tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """64k: too small for the SQLite database (the cache fails to open); 512k: the database fits
    but no 1 MiB block does (every write fails with ENOSPC)."""
    target = tmp_path / "tiny"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param},mode=0700", "objfs-test", str(target)],
                   check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def readonly_cache_dir(tmp_path: Path) -> Iterator[Path]:
    """A cache directory holding one good block (bkey(0) -> blob(0)), bind-mounted read-only."""
    src = tmp_path / "src"
    c = NodeCache(str(src), 64 * MiB)
    assert c.put(bkey(0), blob(0))
    c.close()
    target = tmp_path / "ro"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(target)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


async def test_full_cache_still_reads(tiny_tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = NodeCache(str(tiny_tmpfs / "cache"), 1024 * MiB)
    try:
        for i in range(6):
            assert await c.get_or_fetch(bkey(i), Fetcher(blob(i, 1 * MiB))) == blob(i, 1 * MiB)
        # again: nothing could be stored, so each read goes to the store and still succeeds
        for i in range(6):
            fetch = Fetcher(blob(i, 1 * MiB))
            assert await c.get_or_fetch(bkey(i), fetch) == blob(i, 1 * MiB)
            assert fetch.calls == 1
        s = c.stats()
        assert s["errors"] > 0 and s["stores"] == 0
    finally:
        c.close()
    assert value_files(tiny_tmpfs) == []  # no partial block files left to eat the space
    warnings = [r for r in caplog.records if r.name == "fusefs.nodecache" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # logged once, not per block


async def test_readonly_cache_still_reads(readonly_cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = NodeCache(str(readonly_cache_dir), 64 * MiB)
    try:
        for i in range(4):
            assert await c.get_or_fetch(bkey(i), Fetcher(blob(i))) == blob(i)
        assert not c.put(bkey(9), b"x")
    finally:
        c.close()
    warnings = [r for r in caplog.records if r.name == "fusefs.nodecache" and r.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 3  # once per kind of failure (open / read / write / lock), not per block


# -- single flight ------------------------------------------------------------------------------------


async def test_single_flight_within_one_process(tmp_path: Path) -> None:
    # two NodeCache objects on one directory: tasks of different objects meet only at the flock
    caches = [NodeCache(str(tmp_path / "cache"), 64 * MiB) for _ in range(2)]
    data = blob(1, 2 * MiB)
    calls = 0

    async def fetch() -> bytes:
        nonlocal calls
        calls += 1
        await trio.sleep(0.05)
        return data

    results: list[bytes] = []

    async def reader(c: NodeCache) -> None:
        results.append(await c.get_or_fetch(bkey(1), fetch))

    try:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(reader, caches[i % 2])
        assert calls == 1
        assert len(results) == 20 and all(r == data for r in results)
    finally:
        for c in caches:
            c.close()


def test_lock_stripes_exclude_within_and_across_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lock files are opened once, not per block, and still exclude: two blocks of one stripe in
    one process take turns, another process (another ``LockStripes``) waits, and releasing an
    acquisition twice does not release the next holder's."""
    monkeypatch.setattr(locks, "LOCK_STRIPES", 1)  # every block in one stripe
    opened: list[str] = []
    real_open = os.open

    def counted(path: str, *args: Any, **kwargs: Any) -> int:
        opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counted)
    (tmp_path / "locks").mkdir()
    ours, theirs = locks.LockStripes(str(tmp_path / "locks")), locks.LockStripes(str(tmp_path / "locks"))
    try:
        a, b = ours.for_block(bkey(0)), ours.for_block(bkey(1))
        assert a.try_acquire()
        assert not b.try_acquire()  # same stripe, same process: waits its turn
        assert not theirs.for_block(bkey(0)).try_acquire()
        a.release()
        assert b.try_acquire()
        a.release()  # a second release of a must not release b
        assert not theirs.for_block(bkey(2)).try_acquire()
        b.release()
        other = theirs.for_block(bkey(3))
        assert other.try_acquire()
        assert not ours.for_block(bkey(4)).try_acquire()
        other.release()
        for i in range(5, 9):
            lock = ours.for_block(bkey(i))
            assert lock.try_acquire()
            lock.release()
        assert len(opened) == 2  # one open per LockStripes, not one per block
    finally:
        ours.close()
        theirs.close()


def test_lock_stripes_keep_few_descriptors_under_a_low_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a low descriptor limit only a few lock files stay open; closing one that is not held
    releases nothing, and a held one is never closed."""
    monkeypatch.setattr(locks, "kept_fds", lambda: 2)
    (tmp_path / "locks").mkdir()
    ours, theirs = locks.LockStripes(str(tmp_path / "locks")), locks.LockStripes(str(tmp_path / "locks"))
    try:
        held = [ours.for_block(bkey(i)) for i in range(6)]
        stripes = {lock._stripe for lock in held}
        taken = [lock for lock in held if lock.try_acquire()]
        assert len(taken) == len(stripes)  # one per stripe, each opened again when needed
        assert locks_held(tmp_path) == len(stripes)
        assert len(ours._fds) == len(stripes)  # a held stripe's descriptor is never closed
        assert not any(theirs.for_block(bkey(i)).try_acquire() for i in range(6))
        assert len(theirs._fds) <= 2
        for lock in taken:
            lock.release()
        assert locks_held(tmp_path) == 0
        again = theirs.for_block(bkey(0))
        assert again.try_acquire()
        again.release()
        assert len(theirs._fds) <= 2
    finally:
        ours.close()
        theirs.close()


async def test_fetch_error_releases_lock_and_propagates(tmp_path: Path) -> None:
    c1, c2 = (NodeCache(str(tmp_path / "cache"), 64 * MiB) for _ in range(2))

    async def broken() -> bytes:
        raise ConnectionError("store unreachable")

    try:
        with pytest.raises(ConnectionError):
            await c1.get_or_fetch(bkey(0), broken)
        assert locks_held(tmp_path / "cache") == 0
        fetch = Fetcher(blob(0))
        assert await c2.get_or_fetch(bkey(0), fetch) == blob(0)  # would hang if the lock were kept
        assert fetch.calls == 1
    finally:
        c1.close()
        c2.close()


async def test_cancellation_releases_lock(tmp_path: Path) -> None:
    c1, c2, c3 = (NodeCache(str(tmp_path / "cache"), 64 * MiB) for _ in range(3))
    fetching = trio.Event()

    async def hang() -> bytes:
        fetching.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c1.get_or_fetch, bkey(0), hang)
            await fetching.wait()  # c1 holds the block's lock now
            waiter = trio.CancelScope()

            async def wait_for_lock() -> None:
                with waiter:
                    await c2.get_or_fetch(bkey(0), Fetcher(b"wrong"))
                    raise AssertionError("c2 got the block although c1 never fetched it")

            nursery.start_soon(wait_for_lock)
            while c2.stats()["misses"] == 0:  # noqa: ASYNC110 - c2 looked, missed, and is polling the lock
                await trio.sleep(0.01)
            waiter.cancel()  # cancel a waiter
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()  # cancel the fetcher
        assert locks_held(tmp_path / "cache") == 0
        fetch = Fetcher(blob(0))
        assert await c3.get_or_fetch(bkey(0), fetch) == blob(0)
        assert fetch.calls == 1
        assert c1.stats()["fetches"] == 1 and c2.stats()["fetches"] == 0
    finally:
        for c in (c1, c2, c3):
            c.close()


async def test_stuck_fetcher_does_not_stall_other_readers(tmp_path: Path) -> None:
    c1 = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    c2 = NodeCache(str(tmp_path / "cache"), 64 * MiB, lock_wait=0.2)
    fetching = trio.Event()

    async def hang() -> bytes:
        fetching.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c1.get_or_fetch, bkey(0), hang)
            await fetching.wait()
            fetch = Fetcher(blob(0))
            assert await c2.get_or_fetch(bkey(0), fetch) == blob(0)
            assert fetch.calls == 1
            assert c2.stats()["lock_timeouts"] == 1
            nursery.cancel_scope.cancel()
    finally:
        c1.close()
        c2.close()
    assert locks_held(tmp_path / "cache") == 0


class GatedWriter:
    """Holds a cache's background writer at the door until opened (a slow disk, on demand)."""

    def __init__(self, cache: NodeCache) -> None:
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        assert cache._writer is not None
        store_batch = cache._writer.store_batch

        def gated(items: list[tuple[BlockKey, bytes]]) -> None:
            self.entered.release()  # once per batch: the writer holds what it took
            self.gate.wait()
            store_batch(items)

        cache._writer.store_batch = gated  # type: ignore[method-assign]


async def test_full_write_queue_skips_caching_and_releases_lock(tmp_path: Path) -> None:
    c = NodeCache(str(tmp_path / "cache"), 64 * MiB, write_queue_bytes=len(blob(0)))
    other = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    writer = GatedWriter(c)
    try:
        assert await c.get_or_fetch(bkey(0), Fetcher(blob(0))) == blob(0)
        await trio.to_thread.run_sync(writer.entered.acquire)  # the writer holds block 0
        assert await c.get_or_fetch(bkey(1), Fetcher(blob(1))) == blob(1)  # queued
        # no room: returned at once, and a background task waits for room holding block 2's lock
        assert await c.get_or_fetch(bkey(2), Fetcher(blob(2))) == blob(2)
        assert await c.get_or_fetch(bkey(3), Fetcher(blob(3))) == blob(3)  # no room there either: not cached
        assert c.stats()["store_skipped"] == 1
        assert locks_held(tmp_path / "cache") == 3  # blocks 0 (being written), 1 (queued), 2 (waiting) locked
        # block 3's lock was released at once: another reader fetches it instead of waiting
        fetch = Fetcher(blob(3))
        assert await other.get_or_fetch(bkey(3), fetch) == blob(3)
        assert fetch.calls == 1
        assert other.stats()["lock_timeouts"] == 0
        writer.gate.set()
        # blocks 1 and 2 reach the cache: a reader waiting on their locks finds them there
        for i in (1, 2):
            assert await other.get_or_fetch(bkey(i), Fetcher(b"wrong")) == blob(i)
        assert locks_held(tmp_path / "cache") == 0  # every lock was released once its block was written
    finally:
        writer.gate.set()
        c.close()
        other.close()


async def test_wait_for_space_caches_every_block(tmp_path: Path) -> None:
    c = NodeCache(str(tmp_path / "cache"), 64 * MiB, write_queue_bytes=len(blob(0)))
    writer = GatedWriter(c)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(partial(c.get_or_fetch, bkey(i), Fetcher(blob(i)), wait_for_space=True))
            await trio.to_thread.run_sync(writer.entered.acquire)
            writer.gate.set()
        await trio.to_thread.run_sync(c.close)
        assert c.stats()["store_skipped"] == 0
        reopened = NodeCache(str(tmp_path / "cache"), 64 * MiB)
        assert [reopened.get(bkey(i)) for i in range(4)] == [blob(i) for i in range(4)]
        reopened.close()
    finally:
        writer.gate.set()
        c.close()


async def test_small_blocks_handed_over_one_by_one_are_committed_together(tmp_path: Path) -> None:
    # A walk of small files gives the writer one file at a time; it gathers them into shared
    # commits (fusefs.nodecache.writer.GATHER_FOR) instead of waking for each one.
    c = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    batches: list[int] = []
    assert c._writer is not None
    store_batch = c._writer.store_batch

    def counting(items: list[tuple[BlockKey, bytes]]) -> None:
        batches.append(len(items))
        store_batch(items)

    c._writer.store_batch = counting  # type: ignore[method-assign]
    files = [(BlockKey("s3|http://127.0.0.1:1|bucket", f"small/f{i}", "etag-1", 0), blob(i, 3000)) for i in range(20)]
    try:
        for k, data in files:
            assert await c.get_or_fetch(k, Fetcher(data)) == data
            await trio.sleep(0.001)  # the next file's GET: the writer is idle again by then
    finally:
        await trio.to_thread.run_sync(c.close)
    assert sum(batches) == 20 and len(batches) <= 10, batches  # (one commit per file without gathering)
    reopened = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    try:
        assert [reopened.get(k) for k, _ in files] == [d for _, d in files]
    finally:
        reopened.close()


def _process_reader(
    cache_dir: str, config_json: str, obj: str, length: int, record: str, barrier: Any, results: Any
) -> None:
    """One 'FUSE server' process: HEAD the object with its own credentials, then read block 0."""
    config = MountConfig.from_json(config_json)

    async def main() -> tuple[bytes, dict[str, int]]:
        store = AsyncStore(open_store(config))
        info = await store.head(obj)
        cache = NodeCache(cache_dir, 256 * MiB)

        async def fetch() -> bytes:
            async with await trio.open_file(record, "a") as f:
                await f.write(f"{os.getpid()}\n")
            await trio.sleep(0.2)  # keep the window open: the others are waiting now
            return await store.get_range(obj, 0, length, info.version)

        await trio.to_thread.run_sync(barrier.wait)
        try:
            data = await cache.get_or_fetch(BlockKey(store.identity, obj, info.version, 0), fetch)
            return data, cache.stats()
        finally:
            cache.close()

    data, stats = trio.run(main)
    results.put((hashlib.sha256(data).hexdigest(), stats))


def test_single_flight_across_processes(tmp_path: Path, s3_config: MountConfig, s3_server: Any) -> None:
    data = os.urandom(3 * MiB)
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="weights/model.bin", Body=data)
    record = tmp_path / "fetches"
    record.touch()
    n = 6
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_process_reader, args=(
            str(tmp_path / "cache"), s3_config.to_json(), "weights/model.bin", len(data), str(record),
            barrier, results,
        ))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    try:
        answers = [results.get(timeout=120) for _ in range(n)]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert len(record.read_text().split()) == 1  # exactly one GET for the node
    assert [digest for digest, _ in answers] == [hashlib.sha256(data).hexdigest()] * n
    assert sum(stats["fetches"] for _, stats in answers) == 1
    print("waited for the fetcher:", sum(stats["waits"] for _, stats in answers), "of", n - 1)


# -- properties ---------------------------------------------------------------------------------------

keys = st.builds(BlockKey, st.text(max_size=40), st.text(max_size=80), st.text(max_size=40),
                 st.integers(min_value=0, max_value=2**40))


@given(a=keys, b=keys)
def test_encoding_is_injective(a: BlockKey, b: BlockKey) -> None:
    assert (a.encode() == b.encode()) == (a == b)
    a.encode().encode("ascii")  # any text, surrogates included, makes a valid SQLite key


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, st.binary(max_size=64 * KiB), max_size=8))
def test_arbitrary_blocks_round_trip(entries: dict[BlockKey, bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        c = NodeCache(os.path.join(d, "cache"), 64 * MiB)
        try:
            for k, v in entries.items():
                assert c.put(k, v)
            for k, v in entries.items():
                assert c.get(k) == v
        finally:
            c.close()


async def test_writer_returns_blocks_nobody_else_holds_to_the_buffer_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold read hands each block to the writer and usually drops it first: the writer then
    holds it last and must give it back to the pool, or every block is a new buffer."""
    size = 256 * KiB
    monkeypatch.setattr(buffers, "_pool", None)  # restored after the test
    pool = buffers.configure(size, keep=4)
    c = NodeCache(str(tmp_path / "cache"), 64 * MiB)
    writer = GatedWriter(c)
    try:
        dropped = bytearray(blob(0, size))
        kept = bytearray(blob(1, size))
        ids = (id(dropped), id(kept))
        await c.get_or_fetch(bkey(0), Fetcher(dropped))  # type: ignore[arg-type]
        await trio.to_thread.run_sync(writer.entered.acquire)  # the writer holds block 0
        await c.get_or_fetch(bkey(1), Fetcher(kept))  # type: ignore[arg-type]
        del dropped  # the reader has gone past block 0; it still uses block 1
        writer.gate.set()
        await trio.to_thread.run_sync(c.close)  # both blocks written
        assert pool.reused == 0
        first, second = pool.take(size), pool.take(size)
        assert pool.reused == 1 and id(first) == ids[0] and id(second) not in ids
        assert kept == blob(1, size)  # the block still in use was not handed out
        reopened = NodeCache(str(tmp_path / "cache"), 64 * MiB)
        assert [reopened.get(bkey(0)), reopened.get(bkey(1))] == [blob(0, size), blob(1, size)]
        reopened.close()
    finally:
        writer.gate.set()
        c.close()
