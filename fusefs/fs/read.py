"""Reading objects: aligned blocks, single flight, a bounded memory LRU, prefetch.

Object bytes are fetched in blocks of ``tuning.block_size`` (an object no larger than a block is
one GET of the whole object), each GET pinned to the version seen at open: a changed object fails
with ``ObjectChangedError`` (ESTALE) rather than returning bytes of two versions. A block is fetched
once per server however many readers want it (single flight), through the data service
(``fusefs.service``: the node cache, where there is one, makes it once per node), and kept in a
memory LRU bounded in bytes (``memory_blocks * block_size``): that bound, not the file size, sets the server's RSS.

Fetches run as tasks of the server's nursery, not of the FUSE request that asked first, so a
request that goes away does not fail the other readers waiting on the same block.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from fusefs import buffers, errors
from fusefs.config import Tuning
from fusefs.service.api import DataClient
from fusefs.store.base import ObjectInfo

log = logging.getLogger(__name__)

BlockId = tuple[str, str, int]  # (key, version, index)


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    ahead: bool = False  # started ahead of any reader (``fetch_ahead``): a reader retries its failure


class BlockReader:
    """One per server: fetches, shares and remembers blocks of objects."""

    def __init__(self, data: DataClient, tuning: Tuning) -> None:
        #: blocks come from the data service (``fusefs.service``): through the node cache, where it
        #: has one, and with the grant's credentials, neither of which this side holds
        self.data = data
        self.block_size = data.block_size
        self.budget = max(1, tuning.memory_blocks) * data.block_size
        self._lru: OrderedDict[BlockId, bytes] = OrderedDict()
        self._lru_bytes = 0
        self._flights: dict[BlockId, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        self._pool = buffers.pool()  # dropped blocks go back to it (fusefs.buffers)
        self.gets = 0  # blocks fetched from the store or node cache (for stats)

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- geometry -----------------------------------------------------------------------------
    def block_count(self, size: int) -> int:
        return (size + self.block_size - 1) // self.block_size

    def _length(self, size: int, index: int) -> int:
        return max(0, min(self.block_size, size - index * self.block_size))

    # -- memory LRU ---------------------------------------------------------------------------
    def _remember(self, bid: BlockId, data: bytes) -> None:
        old = self._lru.pop(bid, None)
        if old is not None:
            self._lru_bytes -= len(old)
        self._lru[bid] = data
        self._lru_bytes += len(data)
        while self._lru_bytes > self.budget and len(self._lru) > 1:
            _, dropped = self._lru.popitem(last=False)
            self._lru_bytes -= len(dropped)
            if self._pool is not None:
                self._pool.give(dropped)

    def discard(self, info: ObjectInfo, index: int) -> None:
        """Forget a block a sequential reader has gone past: the kernel's page cache holds those
        bytes now, and dropping them keeps a long stream's memory to its prefetch window."""
        data = self._lru.pop((info.key, info.version, index), None)
        if data is not None:
            self._lru_bytes -= len(data)
            if self._pool is not None:
                self._pool.give(data)

    def demote(self, info: ObjectInfo, indexes: range) -> None:
        """Blocks a sequential reader is past but that a late readahead request may still ask for:
        first to go when memory is short, lowest first. Else a block fetched ahead and not read
        yet is the oldest in the LRU (it arrived before the reader last touched the blocks behind
        it) and goes first, to be fetched again when the reader gets there (issue 26: a cold 1 GiB
        read fetched 10-22 of its 128 blocks twice)."""
        for index in reversed(indexes):
            bid = (info.key, info.version, index)
            if bid in self._lru:
                self._lru.move_to_end(bid, last=False)

    def offer(self, info: ObjectInfo, data: bytes) -> bool:
        """Block 0 of ``info`` as a GET that described the object returned it (``DataClient.peek``,
        for a lookup or a listing), kept under exactly the version that GET answered: the read
        that follows costs no request, and a read of any other version never sees these bytes.
        Only a whole block (the whole object, or ``block_size`` bytes) is taken."""
        bid = (info.key, info.version, 0)
        if (not info.version or not data or len(data) != self._length(info.size, 0) or bid in self._lru
                or bid in self._flights):
            return False
        self._remember(bid, data)
        return True

    def has(self, key: str, version: str, index: int) -> bool:
        bid = (key, version, index)
        return bid in self._lru or bid in self._flights

    # -- fetching -----------------------------------------------------------------------------
    async def _fetch(self, info: ObjectInfo, index: int, warming: bool = False) -> bytes:
        return await self.data.read_block(info, index, warming)

    async def warm(self, info: ObjectInfo, index: int) -> None:
        """Put a block into the node cache without keeping it in memory (the `prefetch` globs).
        Waits for room in the cache's write queue: warming should fill the cache, not outrun it."""
        if self.data.node_cache and (info.key, info.version, index) not in self._lru:
            await self._fetch(info, index, warming=True)

    async def _run_flight(self, bid: BlockId, flight: _Flight, info: ObjectInfo, index: int) -> None:
        try:
            data = await self._fetch(info, index)
            flight.data = data
            self._remember(bid, data)
        except Exception as exc:
            flight.error = exc
        except BaseException:
            flight.error = errors.TransientError(f"fetch of {info.key} block {index} was cancelled")
            raise
        finally:
            self._flights.pop(bid, None)
            flight.done.set()
            self.gets += 1

    def _start(self, info: ObjectInfo, index: int, ahead: bool = False) -> _Flight | None:
        """Start fetching a block unless it is in memory or on its way; the flight or None."""
        bid = (info.key, info.version, index)
        if bid in self._lru:
            return None
        flight = self._flights.get(bid)
        if flight is None:
            if self._nursery is None:
                raise RuntimeError("BlockReader.start(nursery) was not called")
            flight = _Flight(ahead=ahead)
            self._flights[bid] = flight
            self._nursery.start_soon(self._run_flight, bid, flight, info, index)
        return flight

    async def block(self, info: ObjectInfo, index: int) -> bytes:
        bid = (info.key, info.version, index)
        while True:
            data = self._lru.get(bid)
            if data is not None:
                self._lru.move_to_end(bid)
                return data
            flight = self._start(info, index)
            if flight is None:
                continue
            await flight.done.wait()
            if flight.error is not None:
                if flight.ahead:
                    continue  # a fetch ahead failed: this reader's own fetch retries it
                raise flight.error
            assert flight.data is not None
            return flight.data

    async def fetch_ahead(self, info: ObjectInfo, index: int) -> bool:
        """Fetch a block a reader is expected to ask for soon (``fusefs.fs.dirahead``) into memory,
        or join its fetch; whether it is there now. A failure is the reader's to retry and report.
        The caller is a task of the server's nursery already (not a FUSE request's): a new fetch
        runs in it rather than in one more task (a walk of small files fetches one per file)."""
        bid = (info.key, info.version, index)
        if bid in self._lru:
            return True
        flight = self._flights.get(bid)
        if flight is None:
            flight = self._flights[bid] = _Flight(ahead=True)
            await self._run_flight(bid, flight, info, index)
        else:
            await flight.done.wait()
        return flight.error is None

    def done_with(self, info: ObjectInfo) -> None:
        """A small object's block has been read whole (the kernel's page cache holds it now):
        first to go when memory is short, before blocks fetched ahead that no reader has had yet."""
        bid = (info.key, info.version, 0)
        if bid in self._lru:
            self._lru.move_to_end(bid, last=False)

    async def _on_node(self, info: ObjectInfo, index: int) -> bool:
        """Whether the node cache holds the block (then it answers fast, and without a request)."""
        return self.data.node_cache and await self.data.on_node(info, index)

    async def _urgent(self, info: ObjectInfo, offset: int, end: int, index: int) -> bytes | memoryview:
        """A GET of just ``[offset, end)`` first, alone; the block's fetch starts once it answers.
        Started together, the block's GET (and the prefetch behind it) slows the small one on a
        busy store: measured here, first reads took 17-32 ms that way against ~9 ms alone."""
        try:
            data: bytes | memoryview | None = await self.data.get_range(info.key, offset, end - offset,
                                                                         info.version)
        except errors.StoreError:
            data = None  # the block's fetch answers, or raises the error (retried by its own policy)
        self._start(info, index)  # for the reads that follow
        if data is not None and len(data) == end - offset:
            return data
        block = await self.block(info, index)
        base = index * self.block_size
        return memoryview(block)[offset - base:end - base]

    def prefetch(self, info: ObjectInfo, first: int, count: int) -> None:
        """Start fetching blocks [first, first+count) of ``info`` in the background."""
        last = min(self.block_count(info.size), first + count)
        for index in range(max(0, first), last):
            self._start(info, index)

    async def read(self, info: ObjectInfo, offset: int, size: int, urgent: bool = False) -> bytes | memoryview:
        """Bytes [offset, offset+size) of the pinned version ``info`` (short at the end). Within
        one block, a view of it: pyfuse3 replies from any buffer, and a copy of every request
        costs CPU that a 2-core node needs for moving the bytes in the first place.

        ``urgent`` (the first read of a handle): when the block is not in memory, on its way or
        in the node cache, the bytes asked for are fetched by a GET of just their range, and
        the block's fetch starts after it. Time to first byte is then one small GET, not a whole
        block (8 MiB took ~40 ms here against ~5 ms), which is what a file's header read
        (safetensors, Parquet footers, image probes) waits for."""
        end = min(info.size, offset + size)
        if offset >= end:
            return b""
        first = offset // self.block_size
        last = (end - 1) // self.block_size
        if (first == last and urgent and info.size > self.block_size
                and not self.has(info.key, info.version, first) and not await self._on_node(info, first)):
            return await self._urgent(info, offset, end, first)
        if first == last:
            data = await self.block(info, first)
            base = first * self.block_size
            return memoryview(data)[offset - base:end - base]
        self.prefetch(info, first, last - first + 1)  # all blocks of the request in parallel
        parts = []
        for index in range(first, last + 1):
            data = await self.block(info, index)
            base = index * self.block_size
            parts.append(memoryview(data)[max(0, offset - base):min(len(data), end - base)])
        return b"".join(parts)


class Sequential:
    """Per-handle read pattern: a prefetch window that doubles while reads stay sequential."""

    def __init__(self, block_size: int, max_blocks: int, slack: int = 0) -> None:
        self.block_size = block_size
        self.max_blocks = max(0, max_blocks)
        # The kernel issues readahead requests concurrently and ahead of the reader, so they
        # arrive out of order within its readahead window: within ``slack`` counts as in order.
        self.slack = max(block_size, slack)
        self.next_offset = -1
        self.window = 0
        self.dropped = 0  # blocks below this were discarded after the stream passed them

    def observe(self, offset: int, size: int) -> int:
        """Record a read; return how many blocks after it to prefetch."""
        # The first read counts as sequential when it starts at 0: the usual beginning of a stream.
        first = self.next_offset < 0
        sequential = offset == 0 if first else abs(offset - self.next_offset) <= self.slack
        if sequential:
            self.window = min(self.max_blocks, max(1, self.window * 2))
            self.next_offset = max(self.next_offset, offset + size)
        else:
            self.window = 0
            self.next_offset = offset + size
            self.dropped = 0
        return self.window

    def passed(self, offset: int) -> range:
        """Blocks a sequential stream at ``offset`` has left behind for good: those wholly below
        ``offset - slack`` (a late readahead request may still want anything nearer)."""
        if self.window == 0:
            return range(0)
        upto = max(0, offset - self.slack) // self.block_size
        gone = range(self.dropped, max(self.dropped, upto))
        self.dropped = max(self.dropped, upto)
        return gone

    def behind(self, offset: int) -> range:
        """Blocks wholly below ``offset`` that a sequential stream has not discarded yet: passed,
        but within reach of a late readahead request (``BlockReader.demote``)."""
        if self.window == 0:
            return range(0)
        start = max(self.dropped, (offset - self.slack) // self.block_size)  # no more than the slack
        return range(start, max(start, offset // self.block_size))
