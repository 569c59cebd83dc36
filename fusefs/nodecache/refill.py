"""Completing whole-object files in the background: blocks of data files that were fetched but not
cached (the writer wrote nothing for ``writer.STALL``: a stuck disk) are fetched again once the
writer is idle.

Without it, one skipped block keeps an object's file from ever being complete, and every later pod on
the node reads it through the server and the store instead of through FUSE passthrough. Keys only (the
bytes are gone), so the bound is on work, not memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from fusefs.nodecache.counters import Counters
from fusefs.nodecache.keys import BlockKey
from fusefs.nodecache.writer import Writer

#: blocks remembered at most: 4096 blocks is 32 GiB at 8 MiB blocks
REFILL_BLOCKS = 4096
#: how often the refiller looks whether the writer has caught up (seconds)
REFILL_POLL = 0.05

Fetch = Callable[[], Awaitable[bytes]]


class Refiller:
    """``get_or_fetch`` and ``contains`` are the cache's; the refill runs as a trio system task."""

    def __init__(self, writer: Writer, counters: Counters, get_or_fetch: Callable[..., Awaitable[bytes]],
                 contains: Callable[[BlockKey], bool]) -> None:
        self.writer = writer
        self.counters = counters
        self._get_or_fetch = get_or_fetch
        self._contains = contains
        #: skipped blocks of data files and how to fetch them, oldest first (trio side)
        self._pending: OrderedDict[BlockKey, Fetch] = OrderedDict()
        self._running = False

    def later(self, key: BlockKey, fetch: Fetch) -> None:
        """Remember a block of a data file that was fetched but not cached. The cold read that
        skipped it did not wait for the disk; this makes the object's file complete afterwards, for
        passthrough, at the price of one more GET per skipped block (counted in ``refills``)."""
        if key.whole or self.writer.closed or key in self._pending or len(self._pending) >= REFILL_BLOCKS:
            return
        self._pending[key] = fetch
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run)

    async def _writer_idle(self) -> None:
        # (the queue is filled from other threads too, where no trio event can be set: polled)
        while self.writer.busy:  # noqa: ASYNC110
            await trio.sleep(REFILL_POLL)

    async def _run(self) -> None:
        """Fetch the remembered blocks one at a time, each only when the writer's queue and its
        overflow are empty: the refill never competes with a reader for the disk or for memory,
        and never holds more than one block. Ends when nothing is left (or at the end of the run:
        what is left then is simply not cached)."""
        try:
            while self._pending and not self.writer.closed:
                await self._writer_idle()
                key, fetch = self._pending.popitem(last=False)
                if await trio.to_thread.run_sync(self._contains, key):
                    continue  # another server of the node cached it meanwhile
                try:
                    await self._get_or_fetch(key, fetch, wait_for_space=True)
                except Exception as exc:  # replaced, deleted or the store is down: leave this object
                    self.counters.count("refill_errors")
                    self.counters.report("refill", f"could not complete the file of {key.key!r} (version "
                                                   f"{key.version}): {type(exc).__name__}: {exc}")
                    oid = key.object_id()
                    for other in [k for k in self._pending if k.object_id() == oid]:
                        del self._pending[other]
                else:
                    self.counters.count("refills")
        finally:
            self._running = False
