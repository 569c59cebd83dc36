"""One fetch per block per node: an in-process flight per block (trio events) and a cross-process
lock per block (striped ``flock`` files under ``<cache>/locks``, kept open: ``LockStripes``).

On a miss a reader takes the block's lock, looks again, fetches, and hands the block to the writer,
which releases the lock once the block is in the cache: processes that waited for it find it there
instead of fetching it again. A fetcher that hangs must not stall every reader of that block on the
node: waiters give up after ``LOCK_WAIT`` and fetch themselves.
"""

from __future__ import annotations

import fcntl
import os
import resource
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


def kept_fds() -> int:
    """Lock-file descriptors a process keeps open: every stripe's, unless that would be more than
    an eighth of its descriptor limit (containers may run with a soft limit of 1024)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return LOCK_STRIPES
    return max(1, min(LOCK_STRIPES, soft // 8))


class LockStripes:
    """The lock files of one cache directory, each opened once and kept open: opening (creating)
    a lock file per block was, with the per-block ``makedirs``, about a tenth of the server's CPU
    in a walk of small files (issue 26); ``flock`` on a kept descriptor excludes other processes
    just the same, and is released all the same when the process dies.

    flock locks belong to the open file description, so a process does not exclude itself through
    them: ``held`` does that (two blocks of one stripe, in two tasks or in a task and the writer
    thread, take turns as they did with a descriptor each). Each ``NodeCache`` has its own
    descriptors, as a process would. A forked child opens its own (an inherited description is the
    parent's lock). Thread-safe."""

    def __init__(self, lock_dir: str) -> None:
        self._dir = lock_dir
        self._guard = threading.Lock()
        self._fds: dict[int, int] = {}
        self._held: set[int] = set()
        self._pid = os.getpid()
        self._closed = False
        self._keep = kept_fds()  # asked once, not at every open beyond the limit

    def for_block(self, key: BlockKey) -> BlockLock:
        """The block's lock, not taken. Raises OSError if its file cannot be opened."""
        stripe = zlib.crc32(key.encode().encode()) % LOCK_STRIPES
        with self._guard:
            if self._pid != os.getpid():  # a forked child: the descriptions are the parent's
                for fd in self._fds.values():
                    os.close(fd)  # only our reference: the parent's locks stay its own
                self._fds.clear()
                self._held.clear()
                self._pid = os.getpid()
            if not self._closed:
                self._open(stripe)
        return BlockLock(self, stripe)

    def _open(self, stripe: int) -> int:
        """(under the guard) The stripe's descriptor, opened if it is not. At most ``kept_fds()``
        are kept (``_keep``; beyond them, one not held is closed: that releases nothing), so that a process
        under a low descriptor limit does not spend it on lock files."""
        fd = self._fds.get(stripe)
        if fd is not None:
            return fd
        if len(self._fds) >= self._keep:
            spare = next((s for s in self._fds if s not in self._held), None)
            if spare is not None:
                os.close(self._fds.pop(spare))
        path = os.path.join(self._dir, f"{stripe:04d}.lock")
        fd = self._fds[stripe] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return fd

    def take(self, stripe: int) -> bool:
        with self._guard:
            if self._closed:  # the cache is closed: nothing more is written, no one to wait for us
                return True
            if stripe in self._held:
                return False
            try:
                fd = self._open(stripe)  # closed meanwhile to keep within the limit
            except OSError:
                return False  # as if another held it: the waiter gives up after LOCK_WAIT
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            self._held.add(stripe)
            return True

    def give_back(self, stripe: int) -> None:
        with self._guard:
            if stripe not in self._held:
                return
            self._held.discard(stripe)
            if not self._closed:
                fcntl.flock(self._fds[stripe], fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock files (releasing what is still held); from here a take always succeeds."""
        with self._guard:
            self._closed = True
            self._held.clear()
            fds, self._fds = list(self._fds.values()), {}
            for fd in fds:
                os.close(fd)


class BlockLock:
    """One acquisition of a block's stripe of ``LockStripes``."""

    def __init__(self, stripes: LockStripes, stripe: int) -> None:
        self._stripes = stripes
        self._stripe = stripe
        self._held = False
        self._guard = threading.Lock()

    def try_acquire(self) -> bool:
        with self._guard:
            if not self._held:
                self._held = self._stripes.take(self._stripe)
            return self._held

    async def acquire(self) -> None:
        """Poll without blocking the event loop; cancellable between polls."""
        delay = LOCK_POLL_FIRST
        while not self.try_acquire():
            await trio.sleep(delay)
            delay = min(delay * 2, LOCK_POLL_MAX)

    def release(self) -> None:
        """Idempotent: released by the event loop or by the writer thread, exactly once."""
        with self._guard:
            if self._held:
                self._held = False
                self._stripes.give_back(self._stripe)


class Flight:
    """An in-process fetch in progress: other tasks of this process wait for its bytes."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
