"""The node cache's index: a ``diskcache.Cache`` (SQLite) whose values are files, with the LRU and the
size limit shared by every process of the node.

Opened with our ``BlockDisk``: a block is written into a new 0600 file with O_DIRECT where it can, and
a data file of ours (``objectfiles.DataFile``) is indexed in place (counted, unlinked on eviction).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import diskcache

from fusefs import directio, metrics
from fusefs.nodecache.objectfiles import DataFile

#: SQLite busy timeout: a cache that is this slow is treated as failing, and the read goes direct
SQLITE_TIMEOUT = 5.0
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


class BlockDisk(diskcache.Disk):
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
            write_new_file(full_path, value)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(full_path)
            raise
        return len(value), diskcache.core.MODE_BINARY, filename, None

    def filename(self, key: Any = diskcache.core.UNKNOWN, value: Any = diskcache.core.UNKNOWN) -> tuple[str, str]:
        """A new random file name in one of 256 sub-directories (diskcache's own: one of
        65,536, two levels deep). With that many, nearly every block of a cache of fewer than a
        few hundred thousand blocks made a directory of its own (and emptied it on eviction):
        creating those inodes was the largest part of the mkdir and openat time in a walk of
        small files (issue 26 profile). ext4 indexes large directories, so a few thousand files
        each (a million small objects) cost nothing on a lookup. Entries written with the old
        layout keep their names: the index stores each one's."""
        name = os.urandom(16).hex()
        filename = os.path.join(name[:2], name[2:] + ".val")
        return filename, os.path.join(self._directory, filename)

    def remove(self, file_path: str) -> None:
        metrics.CACHE_REMOVED.inc()  # LRU evictions mostly (see fusefs.metrics)
        super().remove(file_path)


def write_new_file(path: str, data: bytes) -> None:
    """Write a new block file, making its sub-directory only when the create says it is missing:
    a ``makedirs`` before every block (two stats and a mkdir that fails) was, with the lock files,
    a tenth of the server's CPU in a walk of small files (issue 26). The error is also how a
    directory that vanished is noticed: eviction removes emptied sub-directories (diskcache's
    ``Disk.remove``), also those of other servers, also between our mkdir and our create."""
    directory = os.path.dirname(path)
    for attempt in range(10):
        try:
            directio.write_new_file(path, data)  # O_DIRECT: see fusefs.directio for why
            return
        except FileNotFoundError:
            if attempt == 9:
                raise
        os.makedirs(directory, mode=0o700, exist_ok=True)


def open_index(directory: str, size_limit: int) -> diskcache.Cache:
    """Open (or create, 0700) the index of the cache in ``directory``. Raises what opening raises."""
    # 0700 applies only when created here; an existing directory keeps the operator's mode
    os.makedirs(directory, mode=0o700, exist_ok=True)
    index = diskcache.Cache(
        directory, timeout=SQLITE_TIMEOUT, disk=BlockDisk,
        size_limit=size_limit,  # stored in the cache's settings: the last opener's limit wins
        eviction_policy=EVICTION_POLICY, cull_limit=CULL_LIMIT,
        disk_min_file_size=0,  # every block is a file: read with one read(), never from SQLite
        statistics=False,  # diskcache's own counters would add a write per get; we count here
    )
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(directory, name), 0o600)
    return index
