"""The node-wide cache on local disk, shared by every FUSE server on a node.

Blocks are indexed in a ``diskcache.Cache`` (SQLite) by (tenant, store identity, object key,
version, block size, block index). An object no larger than one block is one entry whose value
file is the whole object. A larger object is one data file of its own (``fusefs.nodecache.objectfiles``): the
blocks are written into it at their offsets as they are fetched, each with a size-less marker entry
holding its length and CRC-32C; once every block is there the file is checked block by block and
published complete (read-only, renamed, never written again), which is what FUSE passthrough opens
(``fusefs.passthrough.backing``). Every block read through the server is checked against its CRC: a block that
fails is dropped (a complete file that fails is evicted whole) and reported as a miss, never returned.

``get_or_fetch`` gives one fetch per block per node: on a miss it takes a cross-process lock for
the block (striped ``flock`` files under ``<dir>/locks``), looks again, fetches, returns the bytes
at once and hands them to a background writer thread; the lock is released once the block is in
the cache, so processes that waited for it find it there instead of fetching it again.

Every failure of the cache itself (full disk, corrupt database, read-only directory, lock files
that cannot be opened) degrades to direct reads: the caller always gets the fetched bytes, and
the problem is logged once per kind, not once per block.

Security: the tenant in every key is a hash of the endpoint and the credentials' principal (S3
access key id, GCS service account e-mail; ``fusefs.nodecache.objectfiles.tenant_of``), so a mount is served only
what the same credentials fetched. Mounts with ambient credentials (no secret in their config:
instance roles, workload identity) share the tenant "", and their servers prove access with one
1-byte GET per object version before serving cached bytes (``fusefs.fs.read.BlockReader.authorise``).
No key, tenant or secret appears in a file name (hashes only). The directory is created 0700,
entries and lock files 0600, complete files 0400: other local users get nothing, even under a
cache directory an operator made with a looser mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import crc32c
import diskcache
import trio

from fusefs import buffers, directio, metrics
from fusefs.nodecache import objectfiles as objects
from fusefs.nodecache.objectfiles import DataFile, ObjectId

log = logging.getLogger(__name__)

#: lock stripes: distinct blocks share a lock file only by hash collision (then they just serialise)
LOCK_STRIPES = 1024
#: bytes of blocks waiting for the background writer, and as many again waiting for room in tasks
#: (each holding its lock); beyond that a fetched block is not cached. It is memory that the reader
#: may already have dropped, so it is part of a server's RSS bound: two 8 MiB blocks (with O_DIRECT
#: writes the writer keeps up with a cold read here, and 2 sufficed for one fetch per node in the
#: benchmark). Counted in bytes, not blocks, so that a walk of small files queues hundreds of them and
#: the writer commits them in a few transactions: bounded at 2 items, a 64 KiB file cost a commit of
#: its own every other file (the walk ran at 160 against 420 files/s without the cache).
#: One block is always admitted, whatever its size.
WRITE_QUEUE_BYTES = 16 * 1024 * 1024
#: SQLite busy timeout: a cache that is this slow is treated as failing, and the read goes direct
SQLITE_TIMEOUT = 5.0
#: polling of a lock held by another fetcher (seconds): short first, capped so waiters notice quickly
LOCK_POLL_FIRST = 0.0005
LOCK_POLL_MAX = 0.01
#: longest wait for another fetcher of the same block (seconds); then fetch ourselves. A fetcher that
#: hangs (a stalled store, a stopped process) must not stall every reader of that block on the node.
LOCK_WAIT = 30.0
#: bump when the entry format changes: old entries then simply miss (v2: CRC-32C instead of CRC-32;
#: v3: tenants, block sizes and whole-object data files; v4: each CRC seeded with its block's key)
FORMAT = "v4"

# Eviction policy: least-recently-used, knowingly. LRU costs one SQLite write transaction per get
# (the access time). Measured here in CPU time per get (the machine was loaded, wall time was
# noise): 4 KiB values 139 us LRU vs 35 us least-recently-stored (7,200 vs 28,700 gets/s per
# core); 8 MiB blocks 7.2 ms vs 6.7 ms (about 8%: reading and checksumming 8 MiB dominates).
# With blocks this large the price is small, and LRU is what the workload needs: model weights
# are read again and again by many pods, and a hot block must not be evicted merely because it
# was stored early (least-recently-stored is FIFO).
EVICTION_POLICY = "least-recently-used"
# diskcache culls inside each set() up to ``cull_limit`` entries while the volume is over the
# limit. Its default (10) would drop 80 MiB to make room for one 8 MiB block; 1 could let the
# volume creep up when small tail blocks are evicted for full ones; 2 keeps it near the limit.
CULL_LIMIT = 2
# The writer commits what is queued at once in one transaction, up to these caps (a transaction
# holds SQLite's write lock, which other servers' LRU reads wait for).
#: when the writer's queue and the blocks waiting for it are all full, how long a read waits for room
#: before it gives up caching its block (seconds)
HAND_OVER_WAIT = 0.5
#: blocks of whole-object files that were not cached because the writer was behind, remembered to be
#: fetched again in the background once the writer is idle (``NodeCache._refill``): without that, one
#: skipped block keeps an object's file from ever being complete, and every later pod on the node
#: reads it through the server and the store instead of through FUSE passthrough. Keys only (the
#: bytes are gone), so the bound is on work, not memory: 4096 blocks is 32 GiB at 8 MiB blocks.
REFILL_BLOCKS = 4096
#: how often the refiller looks whether the writer has caught up (seconds)
REFILL_POLL = 0.05
#: how long a node trusts a whole-file check of a complete file that has not changed since (seconds).
#: Checking a file costs a full read of it by every new server before its first passthrough open
#: (0.25 s for 224 MiB from disk here, about as long as loading the model itself); a node-wide record
#: lets each file be read once per node per interval instead. What a write does to a file is caught at
#: once (its change time moves); damage that leaves the change time alone (bit rot) within a day.
VERIFIED_FOR = 24 * 3600.0
WRITE_BATCH_ITEMS = 64
WRITE_BATCH_BYTES = 16 * 1024 * 1024
#: a batch of small blocks waits up to this long for more (seconds): a walk of small files hands the
#: writer one file every few milliseconds, and without the wait each one woke the writer for a commit
#: of its own, every wake-up a fight for the GIL with the read path (perf of the walk: a third of the
#: server's time was the kernel switching threads). Only while the batch is under ``GATHER_BYTES``:
#: a block-sized batch is written at once.
GATHER_FOR = 0.02
GATHER_BYTES = 1024 * 1024
#: partly filled objects whose first missing block the writer remembers (``_publish_when_whole``)
MISSING_KEPT = 1024


@dataclass(frozen=True)
class BlockKey:
    store: str  # AsyncStore.identity, e.g. "s3|http://127.0.0.1:9000|bucket"
    key: str  # object key
    version: str  # ETag / generation pinned at open
    index: int  # block number
    #: the reader's block size: which bytes block ``index`` holds. 0 (or an object no larger than
    #: one block) means the block is the whole object: then it does not depend on the block size.
    block_size: int = 0
    size: int = 0  # the object's size
    #: whose credentials fetched it (``tenant_of``); "" for ambient credentials, whose readers
    #: prove access once per object version instead (``fusefs.fs.read.BlockReader.authorise``)
    tenant: str = ""

    @property
    def whole(self) -> bool:
        """The block is the whole object: cached as one entry of its own, not in a data file."""
        return self.block_size <= 0 or self.size <= self.block_size

    def object_id(self) -> ObjectId:
        return ObjectId(self.tenant, self.store, self.key, self.version, self.block_size, self.size)

    @classmethod
    def of(cls, oid: ObjectId, index: int) -> BlockKey:
        """Block ``index`` of the object ``oid`` (the inverse of ``object_id``)."""
        return cls(oid.store, oid.key, oid.version, index, oid.block_size, oid.size, oid.tenant)

    def encode(self) -> str:
        """The diskcache key: unambiguous for any strings (JSON), pure ASCII (lone surrogates escaped)."""
        geometry = [0 if self.whole else self.block_size, self.index]
        return json.dumps([FORMAT, self.tenant, self.store, self.key, self.version, *geometry],
                          separators=(",", ":"))


def _checksum(data: bytes | bytearray | memoryview, key: BlockKey) -> int:
    # CRC-32C with the CPU's crc32 instruction (the crc32c package, which takes any buffer and
    # releases the GIL for large ones): about 24 GB/s here against zlib's CRC-32 at 3.4 GB/s,
    # which took 12% of a warm read's CPU time. Every block is checked on every read from the cache.
    # Seeded with the block's key (the CRC of key + data): an index row that names another key's
    # intact file, with that file's tag (a damaged or mixed-up index), fails the check instead of
    # serving another object's bytes (tests/nodecache/test_faults.py swaps two rows).
    return int(crc32c.crc32c(data, crc32c.crc32c(key.encode().encode())))


def _tag(data: bytes | bytearray, key: BlockKey) -> int:
    # length in the high bits, CRC-32C in the low 32: one integer column, both checked on read
    return (len(data) << 32) | _checksum(data, key)


class _BlockDisk(diskcache.Disk):
    """diskcache's Disk, writing a block into a new 0600 file with O_DIRECT where it can.

    diskcache's own writer feeds bytes through a BytesIO iterator (which splits binary data at
    every newline byte) into a buffered file: tens of thousands of small writes per 8 MiB block.
    It also leaves the partial file behind when a write fails (ENOSPC), leaking space for good.
    """

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if isinstance(value, DataFile):  # a whole-object file of ours: counted, unlinked on eviction
            return value.size, diskcache.core.MODE_BINARY, value.relpath, None
        if type(value) not in (bytes, bytearray):
            return super().store(value, read, key=key)
        filename, full_path = self.filename(key, value)
        try:
            _write_new_file(full_path, value)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(full_path)
            raise
        return len(value), diskcache.core.MODE_BINARY, filename, None

    def remove(self, file_path: str) -> None:
        metrics.CACHE_REMOVED.inc()  # LRU evictions mostly (see fusefs.metrics)
        super().remove(file_path)


def _write_new_file(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    for attempt in range(10):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            directio.write_new_file(path, data)  # O_DIRECT: see fusefs.directio for why
            return
        except FileNotFoundError:  # another process removed the emptied sub-directory meanwhile
            if attempt == 9 or os.path.isdir(directory):
                raise


def _read_into(fd: int, buf: bytearray, offset: int = 0) -> bytearray:
    """Fill ``buf`` from ``offset`` of ``fd``; shorter if the file is (then the check fails)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    view.release()
    return buf if got == len(buf) else buf[:got]


def _recycle(batch: list[tuple[BlockKey, bytes, _BlockLock | None]]) -> None:
    """Offer the written blocks to the buffer pool, emptying ``batch``. A cold read hands every
    block to the writer, which often holds it last (the reader has gone past it): without this,
    each block of a cold read was a fresh buffer, paid for in page faults (fusefs.buffers)."""
    pool = buffers.pool()
    blocks = [item[1] for item in batch]
    batch.clear()
    while blocks:
        block = blocks.pop()
        if pool is not None:
            pool.give(block)  # kept only if no one else refers to it any more
        del block


class _BlockLock:
    """One acquisition of a striped cross-process lock. flock locks belong to the open file
    description, so each acquisition opens its own fd: two tasks of one process exclude each other
    too. Closing the fd releases the lock (also when the process dies)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._guard = threading.Lock()

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        with self._guard:  # released by the event loop or by the writer thread, exactly once
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class _Flight:
    """An in-process fetch in progress: other tasks of this process wait for its bytes."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None


_STOP = object()


class NodeCache:
    """The block cache. Blocking methods are thread-safe; ``get_or_fetch`` is for trio code (one
    trio run per process at a time: in-process single flight uses trio events)."""

    def __init__(
        self, directory: str, size_limit: int, write_queue_bytes: int = WRITE_QUEUE_BYTES,
        lock_wait: float = LOCK_WAIT,
    ) -> None:
        self.directory = directory
        self.size_limit = size_limit
        self.lock_wait = lock_wait
        self._lock_dir = os.path.join(directory, "locks")
        self._counts: dict[str, int] = dict.fromkeys(
            ("hits", "hit_bytes", "misses", "corrupt", "errors", "fetches", "waits", "shared",
             "stores", "store_bytes", "store_skipped", "lock_timeouts", "published", "refills",
             "refill_errors", "file_checks"), 0)
        self._counts_lock = threading.Lock()
        self._reported: set[str] = set()
        self._flights: dict[BlockKey, _Flight] = {}
        #: complete files this process checked whole (``_complete_file``): handed out unchecked after
        self._verified: set[str] = set()
        self._queue_bytes = write_queue_bytes
        self._queued = 0  # bytes in the writer's queue (under _submit_lock)
        self._overflow = 0  # bytes waiting in tasks for room in the writer's queue, holding their locks
        self._queue: queue.Queue[Any] = queue.Queue()  # bounded by _queued (see _try_submit)
        #: skipped blocks of data files and how to fetch them, oldest first (``_refill``; trio side)
        self._refills: OrderedDict[BlockKey, Callable[[], Awaitable[bytes]]] = OrderedDict()
        self._refilling = False
        #: a block each partly filled object was found missing last (writer thread only), looked at
        #: first: an object filled in any order costs one lookup per batch, not one per block
        self._missing: OrderedDict[ObjectId, int] = OrderedDict()
        self._closed = False
        self._submit_lock = threading.Lock()  # orders _try_submit against close: nothing queued after _STOP
        self._cache = self._open()
        self._writer: threading.Thread | None = None
        if self._cache is not None:
            self._writer = threading.Thread(target=self._write_loop, name="objfs-cache-writer", daemon=True)
            self._writer.start()

    # -- opening, accounting, reporting ---------------------------------------------------------

    def _open(self) -> diskcache.Cache | None:
        try:
            # 0700 applies only when created here; an existing directory keeps the operator's mode
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            cache = diskcache.Cache(
                self.directory, timeout=SQLITE_TIMEOUT, disk=_BlockDisk,
                size_limit=self.size_limit,  # stored in the cache's settings: the last opener's limit wins
                eviction_policy=EVICTION_POLICY, cull_limit=CULL_LIMIT,
                disk_min_file_size=0,  # every block is a file: read with one read(), never from SQLite
                statistics=False,  # diskcache's own counters would add a write per get; we count here
            )
            for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(self.directory, name), 0o600)
            with contextlib.suppress(OSError):
                os.makedirs(self._lock_dir, mode=0o700, exist_ok=True)
            return cache
        except Exception as exc:
            self._problem("open", exc)
            return None

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _problem(self, kind: str, exc: BaseException) -> None:
        """Count a failure of the cache itself and report it (once per kind)."""
        self._count("errors")
        self._report(kind, f"{kind} failed ({type(exc).__name__}: {exc}); reads go to the store directly when needed")

    def _report(self, kind: str, message: str) -> None:
        """Log the first event of each kind as a warning, later ones at debug level: a sick cache
        disk must not write a line per block (the counters in ``stats`` keep the totals)."""
        with self._counts_lock:
            first = kind not in self._reported
            self._reported.add(kind)
        log.log(logging.WARNING if first else logging.DEBUG, "node cache %s: %s", self.directory, message)

    @property
    def usable(self) -> bool:
        return self._cache is not None and not self._closed

    def stats(self) -> dict[str, int]:
        """Counters of this object (hits, misses, fetches, waits for another fetcher, shared
        in-process, corrupt, errors, stores, store_bytes, store_skipped, lock_timeouts, published,
        refills, refill_errors, file_checks) and of the
        shared directory (volume: bytes on disk including the index; entries), write_queue."""
        with self._counts_lock:
            result = dict(self._counts)
        result["volume"] = result["entries"] = 0
        if self.usable:
            assert self._cache is not None
            try:
                result["volume"] = int(self._cache.volume())
                result["entries"] = len(self._cache)
            except Exception as exc:
                self._problem("stats", exc)
        result["write_queue"] = self._queue.qsize()
        return result

    # -- blocking interface ----------------------------------------------------------------------

    def get(self, key: BlockKey) -> bytes | None:
        """The verified block, or None: on a miss, a corrupt entry (then deleted) or any cache error."""
        data = self._lookup(key)
        if data is None:
            self._count("misses")
        return data

    def contains(self, key: BlockKey) -> bool:
        """Whether an entry exists (not verified, the access time not updated)."""
        if not self.usable:
            return False
        assert self._cache is not None
        try:
            return key.encode() in self._cache
        except Exception as exc:
            self._problem("read", exc)
            return False

    def put(self, key: BlockKey, data: bytes) -> bool:
        """Store a block now (in this thread). False if it was not stored; never raises."""
        if not self.usable:
            return False
        return self._store(key, data)

    def _store(self, key: BlockKey, data: bytes) -> bool:
        try:
            self._set(key, data)
        except Exception as exc:
            self._problem("write", exc)
            return False
        self._count("stores")
        self._count("store_bytes", len(data))
        return True

    def _set(self, key: BlockKey, data: bytes) -> None:
        assert self._cache is not None
        if not key.whole:
            self._set_in_file(key, data)
            return
        # A bytearray block goes to the file as it is: a bytes() copy would hold the GIL for the
        # whole block while the event loop wants it.
        value = data if type(data) in (bytes, bytearray) else bytes(data)
        self._cache.set(key.encode(), value, tag=_tag(data, key))

    # -- whole-object data files (fusefs.nodecache.objectfiles) ------------------------------------------------

    def _data_file(self, oid: ObjectId) -> DataFile | None:
        """The object's indexed data file (its access time updated), or None."""
        assert self._cache is not None
        handle = self._cache.get(oid.encode(FORMAT), read=True)
        if handle is None:
            return None
        with handle:
            return self._as_data_file(handle.name, os.fstat(handle.fileno()).st_size)

    def _as_data_file(self, path: str, size: int) -> DataFile | None:
        rel = os.path.relpath(path, self.directory)
        if not rel.startswith(objects.SUBDIR + os.sep) or not rel.endswith((objects.PARTIAL, objects.COMPLETE)):
            return None
        return DataFile(rel, size)

    def _set_in_file(self, key: BlockKey, data: bytes) -> None:
        """Write a block into its object's data file (created on the first block), then its
        marker. Never into a complete file: those are never modified."""
        assert self._cache is not None
        oid = key.object_id()
        df = self._data_file(oid)
        if df is None:
            df = objects.new_partial(self.directory, oid, FORMAT)
            if not self._cache.add(oid.encode(FORMAT), df):  # another server created one: use it
                df = self._data_file(oid)  # (add() removed ours)
        if df is None or df.complete:
            return
        try:
            fd = os.open(os.path.join(self.directory, df.relpath), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # evicted, or published, meanwhile
            return
        try:
            direct = directio.open_direct(fd) if len(data) >= directio.MIN_DIRECT else None
            try:
                directio.pwrite_all(fd, data, key.index * key.block_size, direct)
            finally:
                if direct is not None:
                    os.close(direct)
        finally:
            os.close(fd)
        self._cache.set(key.encode(), df.token, tag=_tag(data, key))

    def _lookup_in_file(self, key: BlockKey) -> bytes | None:
        """A block from its object's data file, checked against its marker; None on a miss.
        Raises for cache errors; a corrupt block removes its marker (and a complete file)."""
        assert self._cache is not None
        dkey = key.encode()
        if dkey not in self._cache:
            return None
        token, tag = self._cache.get(dkey, tag=True)
        oid = key.object_id()
        handle = self._cache.get(oid.encode(FORMAT), read=True) if isinstance(token, int) else None
        if handle is None:
            # diskcache answers None both when the object's row is gone and when the row's file
            # could not be opened: a partial file being renamed complete (the row is re-pointed just
            # after) looks the same for a moment. Only a marker of no row at all is dropped; the
            # other is a miss, or the block of a file about to be complete would be fetched again.
            if not isinstance(token, int) or oid.encode(FORMAT) not in self._cache:
                self._cache.delete(dkey)  # its file was evicted: a marker of nothing
            return None
        with handle:
            df = self._as_data_file(handle.name, 0)
            if df is None or df.token != token:
                self._cache.delete(dkey)  # a marker of an earlier file of this object
                return None
            data = self._read_verified_at(handle.fileno(), key, tag)
        if data is None:
            self._corrupt(key, dkey)
            if df.complete:  # a complete file that fails a check must not be passed through again
                self._cache.delete(oid.encode(FORMAT))
        return data

    @staticmethod
    def _read_verified_at(fd: int, key: BlockKey, tag: Any) -> bytes | None:
        """Block ``key`` at its offset in an object's data file, if it matches the tag."""
        if not isinstance(tag, int) or tag < 0:
            return None
        length, crc = tag >> 32, tag & 0xFFFFFFFF
        data = _read_into(fd, buffers.take(length), key.index * key.block_size)
        if len(data) != length or _checksum(data, key) != crc:
            return None
        return cast(bytes, data)  # a pooled buffer, handed out as the block (fusefs.buffers)

    def complete_file(self, oid: ObjectId) -> str | None:
        """The path of the object's complete (verified, read-only) file, publishing it first if
        every block is there; None otherwise. Blocking. Never raises."""
        if not self.usable:
            return None
        return self._complete_file(oid)

    def _complete_file(self, oid: ObjectId) -> str | None:
        if self._cache is None or oid.size <= oid.block_size:
            return None
        try:
            df = self._data_file(oid)
            if df is not None and not df.complete:
                df = self._publish(oid, df)
            elif df is not None and df.relpath not in self._verified:
                # The kernel reads a complete file unchecked (FUSE passthrough), so before this
                # server hands one out for the first time every block is checked against its
                # marker: a file damaged on disk since it was published, or an index row naming
                # another object's file, is evicted (its blocks are fetched again), never served.
                # Unless another server of the node checked this very file (same inode, size and
                # change time: any write since moves the change time) within ``VERIFIED_FOR``.
                try:
                    seal = _seal(os.path.join(self.directory, df.relpath), oid)
                    if self._sealed(df, seal):
                        self._verified.add(df.relpath)  # (already recorded node-wide)
                        return os.path.join(self.directory, df.relpath)
                    verdict = self._verify_file(oid, df)
                except FileNotFoundError:
                    return None  # evicted by another server meanwhile: read through the server
                if verdict is False:
                    self._report("corrupt-file", f"complete file of {oid.key!r} (version {oid.version}) failed its "
                                            "check; evicted")
                    self._cache.delete(oid.encode(FORMAT))
                    return None
                if verdict is None:
                    # A marker missing (evicted, or not written yet) or naming another file: not
                    # proven damaged, so it stays for the server path, which checks each block it
                    # reads; only passthrough, which checks nothing, is refused for now.
                    return None
                self._record_check(df.relpath, seal)
        except Exception as exc:
            self._problem("publish", exc)
            return None
        return os.path.join(self.directory, df.relpath) if df is not None and df.complete else None

    def _sealed(self, df: DataFile, seal: int) -> bool:
        """Whether a server of this node checked ``df`` whole, as it is now, within ``VERIFIED_FOR``."""
        assert self._cache is not None
        value, checked = self._cache.get(_seal_key(df.relpath), default=(None, None), tag=True)
        return value == seal and isinstance(checked, int) and time.time() - checked < VERIFIED_FOR

    def _verify_file(self, oid: ObjectId, df: DataFile) -> bool | None:
        """Check every block of ``df`` against its marker: True if all match, None if a marker is
        missing or names another file (not all there: not corrupt), False if a block is wrong (its
        marker is then removed)."""
        assert self._cache is not None
        self._count("file_checks")
        tags = []
        for index in range(oid.blocks()):
            bkey = BlockKey.of(oid, index)
            token, tag = self._cache.get(bkey.encode(), default=(None, None), tag=True)
            if token != df.token:
                return None
            tags.append((bkey, tag))
        fd = os.open(os.path.join(self.directory, df.relpath), os.O_RDONLY | os.O_CLOEXEC)
        try:
            for bkey, tag in tags:
                block = self._read_verified_at(fd, bkey, tag)
                if block is None:
                    self._corrupt(bkey, bkey.encode())
                    return False
                pool = buffers.pool()
                if pool is not None:
                    pool.give(block)
                del block
        finally:
            os.close(fd)
        return True

    def _publish(self, oid: ObjectId, df: DataFile) -> DataFile | None:
        """Check every block of a partial file against its marker and publish it complete; None
        if a block is missing or wrong (its marker is then removed: it is fetched again)."""
        assert self._cache is not None
        try:
            if not self._verify_file(oid, df):
                return None
            done = objects.publish(self.directory, df)
        except FileNotFoundError:
            # Published by another server or thread, or evicted. Only the one whose rename worked
            # re-points the row: diskcache unlinks a row's old file when the row is set, and
            # setting it a second time to the same complete file would unlink that very file.
            return self._data_file(oid)
        self._cache.set(oid.encode(FORMAT), done)  # the row now names the complete file
        self._count("published")
        with contextlib.suppress(FileNotFoundError):  # (evicted at once: nothing to record)
            self._record_check(done.relpath, _seal(os.path.join(self.directory, done.relpath), oid))
        return done

    def _record_check(self, relpath: str, seal: int) -> None:
        """Remember that the complete file ``relpath``, as identified by ``seal``, was checked
        whole: in this server, and node-wide for ``VERIFIED_FOR`` (``_sealed``)."""
        assert self._cache is not None
        self._verified.add(relpath)
        self._cache.set(_seal_key(relpath), seal, tag=int(time.time()))

    def _publish_when_whole(self, oid: ObjectId) -> None:
        """Publish the object's partial file if every block of it is now marked. Called by the
        writer for each object a batch wrote into: blocks arrive in any order (concurrent
        prefetches, refills, other servers), so the batch holding the last block is not always the
        one that completes the file. The block found missing last time is looked at first, then the
        others last block first (the one a sequential fill is still missing), so an incomplete file
        usually costs one lookup. Never raises."""
        if self._cache is None or oid.size <= oid.block_size:
            return
        try:
            known = self._missing.pop(oid, None)
            order = reversed(range(oid.blocks()))  # (lazily: a big object's list per batch is waste)
            for index in order if known is None else itertools.chain((known,), order):
                if BlockKey.of(oid, index).encode() not in self._cache:
                    self._missing[oid] = index
                    while len(self._missing) > MISSING_KEPT:
                        self._missing.popitem(last=False)
                    return
            df = self._data_file(oid)
            if df is not None and not df.complete:
                self._publish(oid, df)
        except Exception as exc:
            self._problem("publish", exc)

    def _corrupt(self, key: BlockKey, dkey: str) -> None:
        assert self._cache is not None
        self._count("corrupt")
        self._report("corrupt", f"corrupt block {key.index} of {key.key!r} (version {key.version}) deleted")
        try:
            self._cache.delete(dkey)
        except Exception as exc:
            self._problem("delete", exc)

    def close(self) -> None:
        """Write the queued blocks (releasing their locks), stop the writer, close the database.
        Blocking: from trio, call it through ``trio.to_thread.run_sync``."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True  # from here reads go direct and nothing more is queued
        if self._writer is not None:
            self._queue.put(_STOP)  # after every queued block: they are written, their locks released
            self._writer.join()
        if self._cache is not None:
            with contextlib.suppress(Exception):
                self._cache.close()

    def _lookup(self, key: BlockKey) -> bytes | None:
        """Read and verify one block; counts hits, corrupt entries and errors (not misses)."""
        if not self.usable:
            return None
        assert self._cache is not None
        dkey = key.encode()
        if not key.whole:
            try:
                data = self._lookup_in_file(key)
            except Exception as exc:
                self._problem("read", exc)
                return None
            if data is not None:
                self._count("hits")
                self._count("hit_bytes", len(data))
            return data
        try:
            # A plain SELECT first: with the LRU policy diskcache's get() opens a write transaction
            # (to record the access time) even on a miss, and a cold read would queue every lookup
            # behind the writer's commits for blocks that are not there anyway.
            if dkey not in self._cache:
                return None
            handle, tag = self._cache.get(dkey, read=True, tag=True)
        except Exception as exc:
            self._problem("read", exc)
            return None
        if handle is None:
            return None
        try:
            with handle:
                data = self._read_verified(handle, key, tag)
        except Exception as exc:
            self._problem("read", exc)
            return None
        if data is None:
            self._corrupt(key, dkey)
            return None
        self._count("hits")
        self._count("hit_bytes", len(data))
        return data

    @staticmethod
    def _read_verified(handle: Any, key: BlockKey, tag: Any) -> bytes | None:
        """The block's bytes if they match the tag, else None. One read() of the file.

        (Mapping the file instead, to reply from its page cache without a copy, measured slower
        here: 350 against 430-490 MB/s for a warm read.)"""
        if not isinstance(tag, int) or tag < 0:
            return None
        length, crc = tag >> 32, tag & 0xFFFFFFFF
        try:
            fd = handle.fileno()
        except (AttributeError, OSError):  # an in-database value (not written by this module)
            data = handle.read()
        else:
            if os.fstat(fd).st_size != length:
                return None
            data = _read_into(fd, buffers.take(length))
        if len(data) != length or _checksum(data, key) != crc:
            return None
        return data

    # -- background writer -----------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch, stop = self._next_batch()
            filled = list(dict.fromkeys(it[0].object_id() for it in batch if not it[0].whole))
            try:
                self._store_batch([(key, data) for key, data, _ in batch])  # never raises
            finally:
                for lock in [it[2] for it in batch]:  # no loop variable left holding a block
                    if lock is not None:
                        try:
                            lock.release()
                        except OSError as exc:
                            self._problem("unlock", exc)
                _recycle(batch)
            for oid in filled:
                self._publish_when_whole(oid)
            if stop:
                return

    def _next_batch(self) -> tuple[list[tuple[BlockKey, bytes, _BlockLock | None]], bool]:
        """The queued blocks that are there now (at least one, waiting for it), up to a size cap;
        and whether the writer was told to stop after them."""
        batch: list[tuple[BlockKey, bytes, _BlockLock | None]] = []
        size = 0
        item = self._queue.get()
        gather_until = time.monotonic() + GATHER_FOR
        while True:
            if item is _STOP:
                return batch, True
            with self._submit_lock:
                self._queued -= len(item[1])
            batch.append(item)
            size += len(item[1])
            if len(batch) >= WRITE_BATCH_ITEMS or size >= WRITE_BATCH_BYTES:
                return batch, False
            try:
                if size >= GATHER_BYTES:
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=max(0.0, gather_until - time.monotonic()))
            except queue.Empty:
                return batch, False

    def _store_batch(self, items: list[tuple[BlockKey, bytes]]) -> None:
        """Store several blocks in one SQLite transaction: one commit instead of one per block is
        what makes caching a walk of many small files cheap. A failed batch is retried block by
        block, so one bad block does not cost the others."""
        if len(items) > 1 and self.usable:
            assert self._cache is not None
            try:
                with self._cache.transact():
                    for key, data in items:
                        self._set(key, data)
            except Exception as exc:
                self._problem("write", exc)
            else:
                self._count("stores", len(items))
                self._count("store_bytes", sum(len(d) for _, d in items))
                return
        for key, data in items:
            self._store(key, data)

    def _try_submit(self, key: BlockKey, data: bytes, lock: _BlockLock | None) -> str:
        """Queue a fetched block for the writer, which releases ``lock`` after writing it.
        "queued", or "full" / "closed" (then the caller still holds the lock)."""
        with self._submit_lock:
            if not self.usable:
                return "closed"
            if self._queued and self._queued + len(data) > self._queue_bytes:
                return "full"
            self._queued += len(data)
            self._queue.put_nowait((key, data, lock))
        return "queued"

    async def _hand_over(self, key: BlockKey, data: bytes, lock: _BlockLock | None, wait: bool) -> bool:
        """Give the block to the writer (True: it, or a task of ours, now owns ``lock``).

        When the writer's queue is full the read path does not wait for the disk. A block whose
        lock we hold (other servers on the node may be waiting on it) goes to a background task
        that waits for room, up to as many bytes of such blocks as the queue holds (a memory bound);
        beyond that the read waits up to ``HAND_OVER_WAIT`` for room, and then (or with no lock
        to keep) the block is not cached. With ``wait`` (prefetching, which
        should fill the cache rather than outrun it) this waits for room itself."""
        result = await self._submit(key, data, lock, None if wait else 0.0)
        if result == "full" and lock is not None and not self._overflow_room(data):
            # Every slot is taken: hold this read back a little for the disk (backpressure),
            # but never for long: a stuck cache disk must not stall reads.
            result = await self._submit(key, data, lock, HAND_OVER_WAIT)
        if result == "full" and lock is not None and self._overflow_room(data):
            # Releasing the lock without the block would send every waiter to the store for it.
            self._overflow += len(data)
            trio.lowlevel.spawn_system_task(self._hand_over_later, key, data, lock)
            return True
        if result == "full":
            self._count("store_skipped")
        return result == "queued"

    def _overflow_room(self, data: bytes) -> bool:
        return not self._overflow or self._overflow + len(data) <= self._queue_bytes

    async def _submit(self, key: BlockKey, data: bytes, lock: _BlockLock | None, patience: float | None) -> str:
        """``_try_submit``, polling for room for up to ``patience`` seconds (None: no limit)."""
        delay = LOCK_POLL_FIRST
        deadline = None if patience is None else trio.current_time() + patience
        while (result := self._try_submit(key, data, lock)) == "full":
            if deadline is not None and trio.current_time() >= deadline:
                break
            await trio.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)
        return result

    async def _hand_over_later(self, key: BlockKey, data: bytes, lock: _BlockLock) -> None:
        handed = False
        try:  # only trio's Cancelled can come out of this (at the end of the run): system tasks may raise it
            handed = await self._hand_over(key, data, lock, wait=True)
        finally:
            self._overflow -= len(data)
            if not handed:
                lock.release()  # idempotent

    # -- trio interface ---------------------------------------------------------------------------

    async def get_or_fetch(
        self, key: BlockKey, fetch: Callable[[], Awaitable[bytes]], *, wait_for_space: bool = False
    ) -> bytes:
        """The block from the cache, or from ``fetch()`` (once per node for concurrent misses).

        Exceptions of ``fetch`` propagate; failures of the cache never do. A fetched block is
        returned at once and written beside the read path; if the writer's queue is full it is
        not cached, unless ``wait_for_space`` (for prefetching) makes this wait for room."""
        if not self.usable:
            return await self._fetch(fetch)
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.data is not None:
                self._count("shared")
                return flight.data
            # that fetch failed or was cancelled: try ourselves (one of the waiters leads)
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.data = await self._lead(key, fetch, wait_for_space)
            return flight.data
        finally:
            del self._flights[key]
            flight.done.set()

    async def _fetch(self, fetch: Callable[[], Awaitable[bytes]]) -> bytes:
        self._count("fetches")
        return await fetch()

    def _first_look(self, key: BlockKey) -> tuple[bytes | None, _BlockLock | None, bool]:
        """In a worker thread: look up; on a miss open the block's lock and try it once, and if
        that took it, look once more under it (another server may have written the block between
        the two), all in this one trip to a thread: a walk of small files pays per block for every
        trip. Returns (data, lock, lock held)."""
        data = self._lookup(key)
        if data is not None:
            return data, None, False
        self._count("misses")
        stripe = zlib.crc32(key.encode().encode()) % LOCK_STRIPES
        try:
            lock = _BlockLock(os.path.join(self._lock_dir, f"{stripe:04d}.lock"))
        except OSError as exc:
            self._problem("lock", exc)
            return None, None, False
        try:
            if not lock.try_acquire():
                return None, lock, False
            data = self._look_again(key)
        except BaseException:
            lock.release()
            raise
        if data is not None:
            lock.release()
            return data, None, False
        return None, lock, True

    def _look_again(self, key: BlockKey) -> bytes | None:
        """A lookup under the block's lock: a hit means another fetcher wrote it meanwhile."""
        data = self._lookup(key)
        if data is not None:
            self._count("waits")
        return data

    async def _lead(self, key: BlockKey, fetch: Callable[[], Awaitable[bytes]], wait: bool) -> bytes:
        data, lock, held = await trio.to_thread.run_sync(self._first_look, key)
        if data is not None:
            return data
        if lock is None:  # no lock files: still correct, just no cross-process single flight
            return await self._fetch_and_submit(key, fetch, wait)
        handed = False
        try:
            if not held:
                with trio.move_on_after(self.lock_wait):
                    await self._acquire(lock)
                    held = True
                if not held:
                    # the other fetcher is stuck: read directly (a duplicate fetch, never a stall)
                    lock.release()
                    self._count("lock_timeouts")
                    self._report("lock-timeout", f"waited {self.lock_wait}s for another fetch of a block; fetching it")
                    return await self._fetch_and_submit(key, fetch, wait)
                # look again under the lock: the other fetcher has most likely written the block
                data = await trio.to_thread.run_sync(self._look_again, key)
                if data is not None:
                    return data
            self._count("fetches")
            data = await fetch()
            handed = await self._hand_over(key, data, lock, wait)
            if not handed:
                self._refill_later(key, fetch)
            return data
        finally:
            if not handed:
                lock.release()  # idempotent

    async def _fetch_and_submit(self, key: BlockKey, fetch: Callable[[], Awaitable[bytes]], wait: bool) -> bytes:
        data = await self._fetch(fetch)
        if not await self._hand_over(key, data, None, wait):
            self._refill_later(key, fetch)
        return data

    # -- completing whole-object files in the background -------------------------------------------

    def _refill_later(self, key: BlockKey, fetch: Callable[[], Awaitable[bytes]]) -> None:
        """Remember a block of a data file that was fetched but not cached, to fetch it again once
        the writer is idle. The cold read that skipped it did not wait for the disk; this makes
        the object's file complete afterwards, for passthrough, at the price of one more GET per
        skipped block (counted in ``refills``)."""
        if key.whole or not self.usable or key in self._refills or len(self._refills) >= REFILL_BLOCKS:
            return
        self._refills[key] = fetch
        if not self._refilling:
            self._refilling = True
            trio.lowlevel.spawn_system_task(self._refill)

    async def _writer_idle(self) -> None:
        """Until nothing waits for the writer (its queue is filled from other threads too: polled)."""
        while True:
            if not (self._queued or self._overflow):
                return
            await trio.sleep(REFILL_POLL)

    async def _refill(self) -> None:
        """Fetch the remembered blocks one at a time, each only when the writer's queue and its
        overflow are empty: the refill never competes with a reader for the disk or for memory,
        and never holds more than one block. Ends when nothing is left (or at the end of the run:
        what is left then is simply not cached)."""
        try:
            while self._refills and self.usable:
                await self._writer_idle()
                key, fetch = self._refills.popitem(last=False)
                if await trio.to_thread.run_sync(self.contains, key):
                    continue  # another server of the node cached it meanwhile
                try:
                    await self.get_or_fetch(key, fetch, wait_for_space=True)
                except Exception as exc:  # replaced, deleted or the store is down: leave this object
                    self._count("refill_errors")
                    self._report("refill", f"could not complete the file of {key.key!r} (version "
                                           f"{key.version}): {type(exc).__name__}: {exc}")
                    oid = key.object_id()
                    for other in [k for k in self._refills if k.object_id() == oid]:
                        del self._refills[other]
                else:
                    self._count("refills")
        finally:
            self._refilling = False

    @staticmethod
    async def _acquire(lock: _BlockLock) -> None:
        """Poll the lock without blocking the event loop; cancellable between polls."""
        delay = LOCK_POLL_FIRST
        while not lock.try_acquire():
            await trio.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)


def _seal_key(relpath: str) -> str:
    """The index row recording a whole-file check of a complete file (``NodeCache._sealed``)."""
    return json.dumps([FORMAT, "checked", relpath], separators=(",", ":"))


def _seal(path: str, oid: ObjectId) -> int:
    """What identifies a file as it is now and the object it was checked for: its inode, size and
    change time and the object's key, as one SQLite integer (an int is kept in the index row
    itself, where any other value would be a file of its own). With the object in it, an index row
    that comes to name another object's file (as a damaged index may) does not inherit its check."""
    st = os.stat(path)
    ident = f"{st.st_ino}:{st.st_size}:{st.st_ctime_ns}:{oid.encode(FORMAT)}"
    digest = hashlib.blake2b(ident.encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")
