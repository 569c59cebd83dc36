"""One fetch per block per node: an in-process flight per block (trio events) and a cross-process
lock per block (striped ``flock`` files under ``<cache>/locks``).

On a miss a reader takes the block's lock, looks again, fetches, and hands the block to the writer,
which releases the lock once the block is in the cache: processes that waited for it find it there
instead of fetching it again. A fetcher that hangs must not stall every reader of that block on the
node: waiters give up after ``LOCK_WAIT`` and fetch themselves.
"""

from __future__ import annotations

import fcntl
import os
import threading
import zlib

import trio

from fusefs.nodecache.keys import BlockKey

#: lock stripes: distinct blocks share a lock file only by hash collision (then they just serialise)
LOCK_STRIPES = 1024
#: polling of a lock held by another fetcher (seconds): short first, capped so waiters notice quickly
LOCK_POLL_FIRST = 0.0005
LOCK_POLL_MAX = 0.01
#: longest wait for another fetcher of the same block (seconds); then fetch ourselves
LOCK_WAIT = 30.0


class BlockLock:
    """One acquisition of a striped cross-process lock. flock locks belong to the open file
    description, so each acquisition opens its own fd: two tasks of one process exclude each other
    too. Closing the fd releases the lock (also when the process dies)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._guard = threading.Lock()

    @classmethod
    def for_block(cls, lock_dir: str, key: BlockKey) -> BlockLock:
        stripe = zlib.crc32(key.encode().encode()) % LOCK_STRIPES
        return cls(os.path.join(lock_dir, f"{stripe:04d}.lock"))

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    async def acquire(self) -> None:
        """Poll without blocking the event loop; cancellable between polls."""
        delay = LOCK_POLL_FIRST
        while not self.try_acquire():
            await trio.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)

    def release(self) -> None:
        with self._guard:  # released by the event loop or by the writer thread, exactly once
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class Flight:
    """An in-process fetch in progress: other tasks of this process wait for its bytes."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
