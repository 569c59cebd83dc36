"""``NodeCache``: the node-wide cache on local disk, shared by every volume the node's data service
serves, in named parts:

- ``keys``         what a block and an object version are called (with their tenant)
- ``index``        the diskcache index (SQLite) and how its files are written
- ``entries``      an object no larger than one block: one entry
- ``objectfiles``  a larger object: one data file, a marker per block, published complete for passthrough
- ``checks``       a CRC-32C per block, whole-file checks of complete files
- ``locks``        one fetch per block per node (in-process flights, cross-process lock stripes)
- ``writer``       the background writer and its back-pressure
- ``fills``        which blocks of objects being read are in: the read completing one publishes it
- ``refill``       completing data files whose blocks were skipped
- ``counters``     counters and once-per-kind problem reports

``get_or_fetch`` gives one fetch per block per node: on a miss it takes the block's cross-process lock,
looks again, fetches, hands the bytes to the writer, which releases the lock once the block is in the
cache, and returns them (a block of a data file once it is queued: the fill keeps pace with the
reader). The read whose block makes an object whole returns once the object's file is published, so
the object is complete, ready for FUSE passthrough, when its reader is done.

Every failure of the cache itself (full disk, corrupt database, read-only directory, lock files that
cannot be opened) degrades to direct reads: the caller always gets the fetched bytes, and the
problem is logged once per kind, not once per block.

Security: every key carries its tenant (``keys.tenant_of``), so a mount is served only what the same
credentials fetched. No key, tenant or secret appears in a file name (hashes only). The directory is
created 0700, entries and lock files 0600, complete files 0400: other local users get nothing, even
under a cache directory an operator made with a looser mode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

import diskcache
import trio

from fusefs.nodecache.counters import Counters
from fusefs.nodecache.entries import SmallObjects
from fusefs.nodecache.fills import Fills
from fusefs.nodecache.index import open_index
from fusefs.nodecache.keys import BlockKey, ObjectId
from fusefs.nodecache.locks import LOCK_WAIT, BlockLock, Flight, LockStripes
from fusefs.nodecache.objectfiles import ObjectFiles
from fusefs.nodecache.refill import Refiller
from fusefs.nodecache.writer import WRITE_QUEUE_BYTES, Writer

Fetch = Callable[[], Awaitable[bytes]]


class NodeCache:
    """The block cache. Blocking methods are thread-safe; ``get_or_fetch`` is for trio code (one
    trio run per process at a time: in-process single flight uses trio events)."""

    def __init__(self, directory: str, size_limit: int, write_queue_bytes: int = WRITE_QUEUE_BYTES,
                 lock_wait: float = LOCK_WAIT) -> None:
        self.directory = directory
        self.size_limit = size_limit
        self.lock_wait = lock_wait
        self._lock_dir = os.path.join(directory, "locks")
        self._locks = LockStripes(self._lock_dir)
        self.counters = Counters(directory)
        self._flights: dict[BlockKey, Flight] = {}
        self._fills = Fills()
        self._index: diskcache.Cache | None = None
        self._small: SmallObjects | None = None
        self._files: ObjectFiles | None = None
        self._writer: Writer | None = None
        self._refiller: Refiller | None = None
        try:
            self._index = open_index(directory, size_limit)
            with contextlib.suppress(OSError):
                os.makedirs(self._lock_dir, mode=0o700, exist_ok=True)
        except Exception as exc:
            self.counters.problem("open", exc)
            return
        self._small = SmallObjects(self._index, self.counters)
        self._files = ObjectFiles(directory, self._index, self.counters)
        self._writer = Writer(self._index, self.counters, self._store_one, self._files.publish_when_whole,
                              write_queue_bytes)
        self._refiller = Refiller(self._writer, self.counters, self.get_or_fetch, self.contains)

    @property
    def usable(self) -> bool:
        return self._writer is not None and not self._writer.closed

    def stats(self) -> dict[str, int]:
        """Counters of this object (``counters.NAMES``) and of the shared directory (volume: bytes on
        disk including the index; entries), write_queue."""
        result = self.counters.snapshot()
        result["volume"] = result["entries"] = 0
        if self.usable and self._index is not None:
            try:
                result["volume"] = int(self._index.volume())
                result["entries"] = len(self._index)
            except Exception as exc:
                self.counters.problem("stats", exc)
        result["write_queue"] = self._writer.queued_items() if self._writer is not None else 0
        return result

    # -- blocking interface ----------------------------------------------------------------------

    def get(self, key: BlockKey) -> bytes | None:
        """The verified block, or None: on a miss, a corrupt entry (then deleted) or any cache error."""
        data = self._lookup(key)
        if data is None:
            self.counters.count("misses")
        return data

    def contains(self, key: BlockKey) -> bool:
        """Whether an entry exists (not verified, the access time not updated)."""
        if not self.usable or self._index is None:
            return False
        try:
            return key.encode() in self._index
        except Exception as exc:
            self.counters.problem("read", exc)
            return False

    def put(self, key: BlockKey, data: bytes) -> bool:
        """Store a block now (in this thread). False if it was not stored; never raises."""
        if not self.usable or self._writer is None:
            return False
        return self._writer.store(key, data)

    def complete_file(self, oid: ObjectId) -> str | None:
        """The path of the object's complete (verified, read-only) file, publishing it first if
        every block is there; None otherwise. Blocking. Never raises."""
        if not self.usable or self._files is None:
            return None
        return self._files.complete_file(oid)

    def close(self) -> None:
        """Write the queued blocks (releasing their locks), stop the writer, close the database.
        Blocking: from trio, call it through ``trio.to_thread.run_sync``."""
        if self._writer is not None:
            self._writer.close()  # from here reads go direct and nothing more is queued
        if self._index is not None:
            with contextlib.suppress(Exception):
                self._index.close()
        self._locks.close()

    def _store_one(self, key: BlockKey, data: bytes) -> None:
        assert self._small is not None and self._files is not None
        (self._small if key.whole else self._files).store(key, data)

    def _lookup(self, key: BlockKey) -> bytes | None:
        """Read and verify one block; counts hits, corrupt entries and errors (not misses)."""
        if not self.usable or self._small is None or self._files is None:
            return None
        try:
            data = (self._small if key.whole else self._files).lookup(key)
        except Exception as exc:
            self.counters.problem("read", exc)
            return None
        if data is not None:
            self.counters.count("hits")
            self.counters.count("hit_bytes", len(data))
        return data

    # -- trio interface ---------------------------------------------------------------------------

    async def get_or_fetch(self, key: BlockKey, fetch: Fetch, *, wait_for_space: bool = False) -> bytes:
        """The block from the cache, or from ``fetch()`` (once per node for concurrent misses).

        Exceptions of ``fetch`` propagate; failures of the cache never do. A fetched block is
        returned at once and written beside the read path; if the writer's queue is full it is
        not cached, unless ``wait_for_space`` (for prefetching) makes this wait for room."""
        if not self.usable:
            return await self._fetch(fetch)
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.data is not None:
                self.counters.count("shared")
                return flight.data
            # that fetch failed or was cancelled: try ourselves (one of the waiters leads)
        flight = Flight()
        self._flights[key] = flight
        try:
            flight.data = await self._lead(key, fetch, wait_for_space)
            return flight.data
        finally:
            del self._flights[key]
            flight.done.set()

    async def _fetch(self, fetch: Fetch) -> bytes:
        self.counters.count("fetches")
        return await fetch()

    def _first_look(self, key: BlockKey) -> tuple[bytes | None, BlockLock | None, bool]:
        """In a worker thread: look up; on a miss open the block's lock and try it once, and if
        that took it, look once more under it (another server may have written the block between
        the two), all in this one trip to a thread: a walk of small files pays per block for every
        trip. Returns (data, lock, lock held)."""
        data = self._lookup(key)
        if data is not None:
            return data, None, False
        self.counters.count("misses")
        try:
            lock = self._locks.for_block(key)
        except OSError as exc:
            self.counters.problem("lock", exc)
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
            self.counters.count("waits")
        return data

    async def _lead(self, key: BlockKey, fetch: Fetch, wait: bool) -> bytes:
        data, handed = await self._lead_fill(key, fetch, wait)
        if self._fills.mark(key, handed):
            await self._published(key.object_id())
        return data

    async def _published(self, oid: ObjectId) -> None:
        """Have the writer publish ``oid``'s file after the blocks queued so far, and wait for
        that while it makes progress (a stuck disk does not hold the read back)."""
        if self._writer is None:
            return
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def set_done() -> None:  # in the writer thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        if self._writer.publish_after(oid, set_done):
            await self._writer.wait_while_writing(done)

    async def _lead_fill(self, key: BlockKey, fetch: Fetch, wait: bool) -> tuple[bytes, bool]:
        """The block, and whether it was handed to the writer (False: found in the cache, or
        fetched and not cached)."""
        data, lock, held = await trio.to_thread.run_sync(self._first_look, key)
        if data is not None:
            return data, False
        if lock is None:  # no lock files: still correct, just no cross-process single flight
            return await self._fetch_and_submit(key, fetch, wait)
        handed = False
        try:
            if not held:
                with trio.move_on_after(self.lock_wait):
                    await lock.acquire()
                    held = True
                if not held:
                    # the other fetcher is stuck: read directly (a duplicate fetch, never a stall)
                    lock.release()
                    self.counters.count("lock_timeouts")
                    self.counters.report("lock-timeout",
                                         f"waited {self.lock_wait}s for another fetch of a block; fetching it")
                    return await self._fetch_and_submit(key, fetch, wait)
                # look again under the lock: the other fetcher has most likely written the block
                data = await trio.to_thread.run_sync(self._look_again, key)
                if data is not None:
                    return data, False
            self.counters.count("fetches")
            data = await fetch()
            handed = await self._hand_over(key, data, lock, wait)
            if not handed:
                self._refill_later(key, fetch)
            return data, handed
        finally:
            if not handed:
                lock.release()  # idempotent

    async def _fetch_and_submit(self, key: BlockKey, fetch: Fetch, wait: bool) -> tuple[bytes, bool]:
        data = await self._fetch(fetch)
        handed = await self._hand_over(key, data, None, wait)
        if not handed:
            self._refill_later(key, fetch)
        return data, handed

    async def _hand_over(self, key: BlockKey, data: bytes, lock: BlockLock | None, wait: bool) -> bool:
        if self._writer is None:
            return False
        return await self._writer.hand_over(key, data, lock, wait)

    def _refill_later(self, key: BlockKey, fetch: Fetch) -> None:
        if self._refiller is not None:
            self._refiller.later(key, fetch)
