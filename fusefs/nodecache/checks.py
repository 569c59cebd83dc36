"""How the node cache proves what it hands out: a CRC-32C per block, seeded with the block's key, and
a record of whole-file checks of complete files.

Every block read through a server is checked here; one that fails is reported as missing, never
returned. A complete file is read by the kernel itself (FUSE passthrough, unchecked), so it is checked
whole before a server hands it out, and the check is recorded node-wide (``seal``) so that every new
server need not read the file again.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, BinaryIO, cast

import crc32c

from fusefs import buffers, directio
from fusefs.nodecache.keys import FORMAT, BlockKey, ObjectId

#: how long a node trusts a whole-file check of a complete file that has not changed since (seconds).
#: Checking a file costs a full read of it by every new server before its first passthrough open
#: (0.25 s for 224 MiB from disk here, about as long as loading the model itself); a node-wide record
#: lets each file be read once per node per interval instead. What a write does to a file is caught at
#: once (its change time moves); damage that leaves the change time alone (bit rot) within a day.
VERIFIED_FOR = 24 * 3600.0


def checksum(data: bytes | bytearray | memoryview, key: BlockKey) -> int:
    # CRC-32C with the CPU's crc32 instruction (the crc32c package, which takes any buffer and
    # releases the GIL for large ones): about 24 GB/s here against zlib's CRC-32 at 3.4 GB/s,
    # which took 12% of a warm read's CPU time. Every block is checked on every read from the cache.
    # Seeded with the block's key (the CRC of key + data): an index row that names another key's
    # intact file, with that file's tag (a damaged or mixed-up index), fails the check instead of
    # serving another object's bytes (tests/nodecache/test_faults.py swaps two rows).
    return int(crc32c.crc32c(data, _seed(key)))


def _seed(key: BlockKey) -> int:
    return int(crc32c.crc32c(key.encode().encode()))


def tag(data: bytes | bytearray, key: BlockKey) -> int:
    """The block's index tag: length in the high bits, CRC-32C in the low 32 (one integer column)."""
    return (len(data) << 32) | checksum(data, key)


class Tagger:
    """The tag of block ``key`` computed a piece at a time (``add`` the pieces in order)."""

    def __init__(self, key: BlockKey) -> None:
        self._crc = _seed(key)
        self._length = 0

    def add(self, piece: bytes | bytearray | memoryview) -> None:
        self._crc = int(crc32c.crc32c(piece, self._crc))
        self._length += len(piece)

    def tag(self) -> int:
        return (self._length << 32) | self._crc


def tag_on_disk(fd: int, key: BlockKey, length: int, direct_fd: int | None = None) -> int:
    """The tag of the ``length`` bytes of block ``key`` as the file holds them, read in pieces
    (``directio.pread_pieces``: from the disk itself through ``direct_fd``), never held whole."""
    tagger = Tagger(key)
    for piece in directio.pread_pieces(fd, key.index * key.block_size, length, direct_fd):
        tagger.add(piece)
    return tagger.tag()


def read_into(fd: int, buf: bytearray, offset: int = 0) -> bytearray:
    """Fill ``buf`` from ``offset`` of ``fd``; shorter if the file is (then the check fails)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    view.release()
    return buf if got == len(buf) else buf[:got]


def read_block_at(fd: int, key: BlockKey, block_tag: Any) -> bytes | None:
    """Block ``key`` at its offset in an object's data file, if it matches ``block_tag``."""
    if not isinstance(block_tag, int) or block_tag < 0:
        return None
    length, crc = block_tag >> 32, block_tag & 0xFFFFFFFF
    data = read_into(fd, buffers.take(length), key.index * key.block_size)
    if len(data) != length or checksum(data, key) != crc:
        return None
    return cast(bytes, data)  # a pooled buffer, handed out as the block (fusefs.buffers)


def read_entry(handle: BinaryIO, key: BlockKey, block_tag: Any) -> bytes | None:
    """The bytes of an entry's file if they match ``block_tag``, else None. One read() of the file.

    (Mapping the file instead, to reply from its page cache without a copy, measured slower
    here: 350 against 430-490 MB/s for a warm read.)"""
    if not isinstance(block_tag, int) or block_tag < 0:
        return None
    length, crc = block_tag >> 32, block_tag & 0xFFFFFFFF
    try:
        fd = handle.fileno()
    except (AttributeError, OSError):  # an in-database value (not written by this package)
        data: bytes | bytearray = handle.read()
    else:
        if os.fstat(fd).st_size != length:
            return None
        data = read_into(fd, buffers.take(length))
    if len(data) != length or checksum(data, key) != crc:
        return None
    return cast(bytes, data)


def seal_key(relpath: str) -> str:
    """The index row recording a whole-file check of a complete file (``ObjectFiles.sealed``)."""
    return json.dumps([FORMAT, "checked", relpath], separators=(",", ":"))


def seal(path: str, oid: ObjectId) -> int:
    """What identifies a file as it is now and the object it was checked for: its inode, size and
    change time and the object's key, as one SQLite integer (an int is kept in the index row
    itself, where any other value would be a file of its own). With the object in it, an index row
    that comes to name another object's file (as a damaged index may) does not inherit its check."""
    return seal_of(os.stat(path), oid)


def seal_of(st: os.stat_result, oid: ObjectId) -> int:
    """``seal`` of a file whose status is ``st``. Taking the status marks the change time as seen:
    from Linux 6.13 on (multigrain timestamps) any later write gives the file a new change time,
    even within the same clock tick; before that, a write in the same tick as this call keeps it."""
    ident = f"{st.st_ino}:{st.st_size}:{st.st_ctime_ns}:{oid.encode(FORMAT)}"
    digest = hashlib.blake2b(ident.encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")
