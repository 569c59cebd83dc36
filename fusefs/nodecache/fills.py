"""Which blocks of the objects being read this process knows to be in the node cache, or queued for
it, so that the read that makes an object whole can have its data file published before it returns.

Without this the file was published by the writer whenever it got to it; the first reader was done
seconds earlier, and a second read started at once (a pod restarted, a model reloaded) went through
the server instead of FUSE passthrough. Marks come from the read path itself: blocks found in the
cache and blocks handed to the writer. An object is waited for only if this process handed at
least one of its blocks to the writer; one that was entirely in the cache is published already
(or by the server that filled it). Memory: one byte per block of at most ``FILLS_KEPT`` objects.
"""

from __future__ import annotations

from collections import OrderedDict

from fusefs.nodecache.keys import BlockKey, ObjectId

#: objects being filled that are tracked at once (the least recently read are forgotten: they are
#: then published by the writer when whole, only not waited for)
FILLS_KEPT = 64


class _Fill:
    __slots__ = ("count", "handed", "have")

    def __init__(self, blocks: int) -> None:
        self.have = bytearray(blocks)
        self.count = 0
        self.handed = False


class Fills:
    """Trio side only (not thread-safe)."""

    def __init__(self, kept: int = FILLS_KEPT) -> None:
        self._kept = kept
        self._fills: OrderedDict[ObjectId, _Fill] = OrderedDict()

    def mark(self, key: BlockKey, handed: bool) -> bool:
        """Record that block ``key`` is in the cache, or queued for it (``handed``). True when this
        makes its object whole and this process handed a block of it to the writer: then the
        caller has the file published before it returns the block. Blocks of small objects (one
        entry each, nothing to publish) are not tracked."""
        if key.whole:
            return False
        oid = key.object_id()
        fill = self._fills.get(oid)
        if fill is None:
            fill = self._fills[oid] = _Fill(oid.blocks())
            while len(self._fills) > self._kept:
                self._fills.popitem(last=False)
        else:
            self._fills.move_to_end(oid)
        fill.handed = fill.handed or handed
        if not 0 <= key.index < len(fill.have) or fill.have[key.index]:
            return False
        fill.have[key.index] = 1
        fill.count += 1
        if fill.count < len(fill.have):
            return False
        del self._fills[oid]
        return fill.handed
