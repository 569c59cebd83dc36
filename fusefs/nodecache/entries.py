"""Objects no larger than one block: one index entry each, whose file is the whole object.

(Larger objects are one data file each, with a marker entry per block: ``objectfiles.ObjectFiles``.
Both kinds answer ``store`` and ``lookup`` alike; ``NodeCache`` picks one by ``BlockKey.whole``.)
"""

from __future__ import annotations

import diskcache

from fusefs.nodecache import checks
from fusefs.nodecache.counters import Counters
from fusefs.nodecache.keys import BlockKey


class SmallObjects:
    def __init__(self, index: diskcache.Cache, counters: Counters) -> None:
        self.index = index
        self.counters = counters

    def store(self, key: BlockKey, data: bytes) -> None:
        """Index the object's bytes. Raises for cache errors."""
        # A bytearray block goes to the file as it is: a bytes() copy would hold the GIL for the
        # whole block while the event loop wants it.
        value = data if type(data) in (bytes, bytearray) else bytes(data)
        self.index.set(key.encode(), value, tag=checks.tag(data, key))

    def lookup(self, key: BlockKey) -> bytes | None:
        """The verified bytes, or None on a miss or a corrupt entry (then deleted). Raises for cache
        errors."""
        dkey = key.encode()
        # A plain SELECT first: with the LRU policy diskcache's get() opens a write transaction
        # (to record the access time) even on a miss, and a cold read would queue every lookup
        # behind the writer's commits for blocks that are not there anyway.
        if dkey not in self.index:
            return None
        handle, tag = self.index.get(dkey, read=True, tag=True)
        if handle is None:
            return None
        with handle:
            data = checks.read_entry(handle, key, tag)
        if data is None:
            drop_corrupt(self.index, self.counters, key)
        return data


def drop_corrupt(index: diskcache.Cache, counters: Counters, key: BlockKey) -> None:
    """Count and report a block that failed its check, and delete its entry: it is fetched again."""
    counters.count("corrupt")
    counters.report("corrupt", f"corrupt block {key.index} of {key.key!r} (version {key.version}) deleted")
    try:
        index.delete(key.encode())
    except Exception as exc:
        counters.problem("delete", exc)
