"""A small pool of block-sized buffers, reused instead of allocated for every block.

Why: each block is a multi-MiB buffer, and glibc gives every buffer that size its own mapping
(``limit_malloc_retention`` keeps it that way, so that RSS follows what is alive).
A fresh mapping costs a page fault and a zeroed page per 4 KiB, and an unmap with TLB
shootdowns when freed: about a fifth of a cold read's CPU here. A buffer handed back when its
block leaves the reader's memory serves the next block instead.

Safety: a buffer is taken back only when nothing else refers to it. The reader offers a block
it is dropping; ``give`` keeps it only if its reference count shows no other holder (a write
queue, a flight someone waits on, a memoryview handed to a FUSE reply or to a worker thread
all hold references). A pooled buffer is always filled completely before use (``take`` is for
exactly-sized reads), so no byte of an old block can show through.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading

#: references to a buffer nobody else holds, seen from ``give``: the caller's variable, the
#: parameter, and getrefcount's own argument
_UNSHARED_REFS = 3


class BufferPool:
    def __init__(self, size: int, keep: int) -> None:
        self.size = size  # only buffers of exactly this length are pooled
        self.keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()  # take() runs in worker threads, give() on the event loop
        self.reused = 0

    def take(self, n: int) -> bytearray:
        """A buffer of length ``n`` whose every byte the caller will overwrite."""
        if n == self.size:
            with self._lock:
                if self._free:
                    self.reused += 1
                    return self._free.pop()
            return page_aligned(n)
        return bytearray(n)

    def give(self, buf: object) -> None:
        """Offer a buffer the caller is dropping; kept only if no one else refers to it. Call it
        as ``pool.give(name)`` with the caller's one variable holding the buffer: the count of
        references it expects (``_UNSHARED_REFS``) assumes exactly that."""
        if type(buf) is not bytearray or len(buf) != self.size:
            return
        if sys.getrefcount(buf) > _UNSHARED_REFS:
            return  # still in use elsewhere: let it go when they are done
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


def page_aligned(n: int) -> bytearray:
    """A zeroed bytearray of length ``n`` whose bytes start at a page boundary (where CPython
    allows: else an ordinary one). The node cache writes a fetched block into its file with
    O_DIRECT, which takes only aligned memory: from such a buffer the kernel takes the bytes
    where they are, where a buffer from malloc (16 bytes past a page boundary) was copied into an
    aligned bounce buffer first, a tenth of a cold read's CPU time (``fusefs.directio``).

    How: CPython deletes a bytearray's first bytes by moving where it starts, not the bytes, and
    shrinks one by less than half in place. Should either stop being true, the buffer is simply
    not aligned, and is copied as before: its contents are the same either way."""
    buf = bytearray(n + mmap.PAGESIZE)
    del buf[: -_address(buf) % mmap.PAGESIZE]
    del buf[n:]
    return buf


def _address(buf: bytearray) -> int:
    anchor = ctypes.c_char.from_buffer(buf)  # (holds an export of buf until it is dropped)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


_pool: BufferPool | None = None


def configure(size: int, keep: int) -> BufferPool:
    """Set up the process's pool (one server per process) for blocks of ``size`` bytes."""
    global _pool
    _pool = BufferPool(size, keep)
    return _pool


def pool() -> BufferPool | None:
    """The process's pool, if one was configured. Offer buffers with ``pool().give(buf)`` called
    directly: the reference count it checks assumes exactly that call."""
    return _pool


def take(n: int) -> bytearray:
    """A buffer of length ``n`` from the pool (or a new one) whose every byte the caller overwrites."""
    return _pool.take(n) if _pool is not None else bytearray(n)


def limit_malloc_retention() -> None:
    """Blocks are multi-MiB buffers allocated and freed by many threads. glibc's default raises
    its mmap threshold after the first such free, after which blocks come from per-thread heaps
    that rarely shrink: RSS grows far past what is alive. A fixed threshold keeps every block in
    its own mapping, returned to the OS on free; two arenas keep small-object heaps compact.
    Called first thing by every process that moves blocks: each FUSE server and the node's data
    service (whose GET threads allocate the blocks of every volume on the node)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass
