"""The node cache's background writer: fetched blocks are written beside the read path, never in it.

A fetched block is queued here and returned to its reader; a thread writes what is queued in
one SQLite transaction per batch and then releases the blocks' cross-process locks (``locks``), so
servers that waited for a block find it in the cache. The queue is bounded in bytes (it is memory the
reader may already have dropped). When it is full, a block of a data file (an object larger than a
block) waits for room as long as the writer makes progress: the fill keeps pace with the reader, so
the object is complete when its reader is done rather than refilled later; a writer that makes no
progress for ``STALL`` (a stuck disk) stops holding reads back. A whole small object does not wait
for the disk, except briefly for a block whose lock others may be waiting on (``hand_over``).

The read that completes an object asks for it to be published after the blocks queued before it
(``publish_after``) and waits for that: its reader's last bytes come back with the file complete.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import diskcache
import trio

from fusefs import buffers
from fusefs.nodecache.counters import Counters
from fusefs.nodecache.keys import BlockKey, ObjectId
from fusefs.nodecache.locks import LOCK_POLL_FIRST, LOCK_POLL_MAX, BlockLock

#: bytes of blocks waiting for the background writer, and as many again waiting for room in tasks
#: (each holding its lock); beyond that a fetched block is not cached. It is memory that the reader
#: may already have dropped, so it is part of a server's RSS bound: two 8 MiB blocks (with O_DIRECT
#: writes the writer keeps up with a cold read here, and 2 sufficed for one fetch per node in the
#: benchmark). Counted in bytes, not blocks, so that a walk of small files queues hundreds of them and
#: the writer commits them in a few transactions: bounded at 2 items, a 64 KiB file cost a commit of
#: its own every other file (the walk ran at 160 against 420 files/s without the cache).
#: One block is always admitted, whatever its size.
WRITE_QUEUE_BYTES = 16 * 1024 * 1024
#: when the writer's queue and the blocks waiting for it are all full, how long a read of a small
#: object waits for room before it gives up caching its block (seconds)
HAND_OVER_WAIT = 0.5
#: how long a read waits for a writer that writes nothing (a block of a data file waiting for room,
#: or a publish) before it gives up waiting (seconds): a stuck cache disk must not stall reads. One
#: batch is at most 16 MiB written (a publish reads back at most the blocks other servers wrote): a
#: small fraction of this on any working disk.
STALL = 2.0
#: how often a read waiting for room looks again, should no wake-up come (seconds)
ROOM_POLL = 0.05
# The writer commits what is queued at once in one transaction, up to these caps (a transaction
# holds SQLite's write lock, which other servers' LRU reads wait for).
WRITE_BATCH_ITEMS = 64
WRITE_BATCH_BYTES = 16 * 1024 * 1024
#: a batch of small blocks waits up to this long for more (seconds): a walk of small files hands the
#: writer one file every few milliseconds, and without the wait each one woke the writer for a commit
#: of its own, every wake-up a fight for the GIL with the read path (perf of the walk: a third of the
#: server's time was the kernel switching threads). Only while the batch is under ``GATHER_BYTES``:
#: a block-sized batch is written at once.
GATHER_FOR = 0.02
GATHER_BYTES = 1024 * 1024

_STOP = object()
Item = tuple[BlockKey, bytes, BlockLock | None]


class _Barrier:
    """A request in the queue: publish ``oid`` once what was queued before it is written, then
    call ``done`` (in the writer thread)."""

    def __init__(self, oid: ObjectId, done: Callable[[], None]) -> None:
        self.oid = oid
        self.done = done


class Writer:
    """Writes blocks into the index through ``store_one`` (which raises for cache errors), counting
    into ``counters``; ``after_batch`` is told each data-file object a batch wrote into."""

    def __init__(self, index: diskcache.Cache, counters: Counters, store_one: Callable[[BlockKey, bytes], None],
                 after_batch: Callable[[ObjectId], None], queue_bytes: int = WRITE_QUEUE_BYTES) -> None:
        self.index = index
        self.counters = counters
        self._store_one = store_one
        self._after_batch = after_batch
        self._queue_bytes = queue_bytes
        self._queued = 0  # bytes in the queue (under _submit_lock)
        self._overflow = 0  # bytes waiting in tasks for room in the queue, holding their locks
        self._queue: queue.Queue[Any] = queue.Queue()  # bounded by _queued (see try_submit)
        self.closed = False
        #: batches (and barriers) done so far: how a waiting read tells a slow disk from a stuck one
        self.progress = 0
        self._stalled_at = -1  # ``progress`` when a read last gave up waiting for it
        self._room: trio.Event | None = None  # set when the writer takes what is queued (trio side)
        self._token: trio.lowlevel.TrioToken | None = None
        self._submit_lock = threading.Lock()  # orders try_submit against close: nothing queued after _STOP
        self._thread = threading.Thread(target=self._loop, name="objfs-cache-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether blocks wait for the writer (its queue is filled from other threads too)."""
        return bool(self._queued or self._overflow)

    def queued_items(self) -> int:
        return self._queue.qsize()

    # -- writing ------------------------------------------------------------------------------

    def store(self, key: BlockKey, data: bytes) -> bool:
        """Store a block now, in this thread. False if it was not stored; never raises."""
        try:
            self._store_one(key, data)
        except Exception as exc:
            self.counters.problem("write", exc)
            return False
        self.counters.count("stores")
        self.counters.count("store_bytes", len(data))
        return True

    def store_batch(self, items: list[tuple[BlockKey, bytes]]) -> None:
        """Store several blocks in one SQLite transaction: one commit instead of one per block is
        what makes caching a walk of many small files cheap. A failed batch is retried block by
        block, so one bad block does not cost the others."""
        if len(items) > 1 and not self.closed:
            try:
                with self.index.transact():
                    for key, data in items:
                        self._store_one(key, data)
            except Exception as exc:
                self.counters.problem("write", exc)
            else:
                self.counters.count("stores", len(items))
                self.counters.count("store_bytes", sum(len(d) for _, d in items))
                return
        for key, data in items:
            self.store(key, data)

    def _loop(self) -> None:
        while True:
            batch, barrier, stop = self._next_batch()
            self._made_room()
            filled = list(dict.fromkeys(it[0].object_id() for it in batch if not it[0].whole))
            try:
                self.store_batch([(key, data) for key, data, _ in batch])  # never raises
            finally:
                for lock in [it[2] for it in batch]:  # no loop variable left holding a block
                    if lock is not None:
                        try:
                            lock.release()
                        except OSError as exc:
                            self.counters.problem("unlock", exc)
                _recycle(batch)
            for oid in filled:
                self._after_batch(oid)
            if barrier is not None:
                if barrier.oid not in filled:
                    self._after_batch(barrier.oid)
                barrier.done()
            self.progress += 1
            if stop:
                return

    def _next_batch(self) -> tuple[list[Item], _Barrier | None, bool]:
        """The queued blocks that are there now (at least one, or a barrier: waiting for it), up
        to a size cap or a barrier; the barrier; and whether the writer was told to stop after them."""
        batch: list[Item] = []
        size = 0
        item = self._queue.get()
        gather_until = time.monotonic() + GATHER_FOR
        while True:
            if item is _STOP:
                return batch, None, True
            if isinstance(item, _Barrier):
                return batch, item, False
            with self._submit_lock:
                self._queued -= len(item[1])
            batch.append(item)
            size += len(item[1])
            if len(batch) >= WRITE_BATCH_ITEMS or size >= WRITE_BATCH_BYTES:
                return batch, None, False
            try:
                if size >= GATHER_BYTES:
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=max(0.0, gather_until - time.monotonic()))
            except queue.Empty:
                return batch, None, False

    def publish_after(self, oid: ObjectId, done: Callable[[], None]) -> bool:
        """Ask the writer to publish ``oid``'s file once the blocks queued so far are written (if
        every block is then there), and to call ``done`` after that, from its thread. False if
        the writer is closed (then ``done`` is never called)."""
        with self._submit_lock:
            if self.closed:
                return False
            self._queue.put_nowait(_Barrier(oid, done))
        return True

    async def wait_while_writing(self, done: trio.Event) -> bool:
        """Wait for ``done`` as long as the writer makes progress; False if it wrote nothing for
        ``STALL`` seconds (or stopped)."""
        while True:
            seen = self.progress
            with trio.move_on_after(STALL):
                await done.wait()
                return True
            if self.progress == seen or self.closed:
                return False

    def close(self) -> None:
        """Write the queued blocks (releasing their locks) and stop. Blocking."""
        with self._submit_lock:
            if self.closed:
                return
            self.closed = True  # from here nothing more is queued
        self._queue.put(_STOP)  # after every queued block: they are written, their locks released
        self._thread.join()

    # -- handing blocks over (trio side) ----------------------------------------------------------

    def try_submit(self, key: BlockKey, data: bytes, lock: BlockLock | None, room: int = 0) -> str:
        """Queue a fetched block; the writer releases ``lock`` after writing it.
        "queued", or "full" / "closed" (then the caller still holds the lock). ``room``: the
        queue's bound in bytes, if not the writer's own."""
        with self._submit_lock:
            if self.closed:
                return "closed"
            if self._queued and self._queued + len(data) > (room or self._queue_bytes):
                return "full"
            self._queued += len(data)
            self._queue.put_nowait((key, data, lock))
        return "queued"

    async def hand_over(self, key: BlockKey, data: bytes, lock: BlockLock | None, wait: bool) -> bool:
        """Give the block to the writer (True: it, or a task of ours, now owns ``lock``).

        A block of a data file waits for room while the writer makes progress (``_hand_over_paced``:
        True means it is queued). For a whole small object, when the writer's queue is full the
        read path does not wait for the disk. A block whose
        lock we hold (other servers on the node may be waiting on it) goes to a background task
        that waits for room, up to as many bytes of such blocks as the queue holds (a memory bound);
        beyond that the read waits up to ``HAND_OVER_WAIT`` for room, and then (or with no lock
        to keep) the block is not cached. With ``wait`` (prefetching, which
        should fill the cache rather than outrun it) this waits for room itself."""
        if not key.whole and not wait:
            return await self._hand_over_paced(key, data, lock)
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
            self.counters.count("store_skipped")
        return result == "queued"

    async def _hand_over_paced(self, key: BlockKey, data: bytes, lock: BlockLock | None) -> bool:
        """A block of a data file: queued, waiting for room while the writer makes progress, so
        that the object's file is filled as fast as it is read and complete when its reader is
        done (memory: the queue's bound, plus the blocks of the reads waiting, which their readers
        hold anyway). Not cached if the writer wrote nothing for ``STALL`` seconds, nor, until it
        writes again, any other block that finds the queue full: a stuck disk holds reads back once."""
        seen, since = self.progress, trio.current_time()
        # twice the queue's bound: these blocks do not go to overflow tasks, which hold as much
        while (result := self.try_submit(key, data, lock, 2 * self._queue_bytes)) == "full":
            if self.progress != seen:
                seen, since = self.progress, trio.current_time()
            elif seen == self._stalled_at or trio.current_time() - since >= STALL:
                self._stalled_at = seen
                self.counters.count("store_skipped")
                return False
            await self._room_made()
        return result == "queued"

    async def _room_made(self) -> None:
        """Until the writer takes what is queued (it wakes us: a poll of 10 ms cost each waiting
        read up to that much) or ``ROOM_POLL`` passes."""
        if self._room is None:
            self._room = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
        with trio.move_on_after(ROOM_POLL):
            await self._room.wait()

    def _made_room(self) -> None:
        """(writer thread) Wake the reads waiting for room in the queue."""
        room, token = self._room, self._token
        if room is not None and token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._wake, room)

    def _wake(self, room: trio.Event) -> None:
        if self._room is room:
            self._room = None
        room.set()

    def _overflow_room(self, data: bytes) -> bool:
        return not self._overflow or self._overflow + len(data) <= self._queue_bytes

    async def _submit(self, key: BlockKey, data: bytes, lock: BlockLock | None, patience: float | None) -> str:
        """``try_submit``, polling for room for up to ``patience`` seconds (None: no limit)."""
        delay = LOCK_POLL_FIRST
        deadline = None if patience is None else trio.current_time() + patience
        while (result := self.try_submit(key, data, lock)) == "full":
            if deadline is not None and trio.current_time() >= deadline:
                break
            await trio.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)
        return result

    async def _hand_over_later(self, key: BlockKey, data: bytes, lock: BlockLock) -> None:
        handed = False
        try:  # only trio's Cancelled can come out of this (at the end of the run): system tasks may raise it
            handed = await self.hand_over(key, data, lock, wait=True)
        finally:
            self._overflow -= len(data)
            if not handed:
                lock.release()  # idempotent


def _recycle(batch: list[Item]) -> None:
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
