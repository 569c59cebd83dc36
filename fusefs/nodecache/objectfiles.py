"""Whole-object files of the node cache: one file per object version, filled block by block.

An object larger than one block is cached as a single data file under ``<cache>/objects/``, its
blocks written at their offsets as they are fetched (``<id>-<token>.part``, sparse, 0600). The
node cache's index (diskcache) holds one entry for the file, which carries its size for the LRU
and unlinks it on eviction, and one size-less marker per block (the file's token and the block's
length and CRC-32C). Once every block is there and each has been checked against its marker (read
back from the disk, or known as this process wrote it: below), the file is made read-only (0400)
and renamed to ``<id>-<token>.obj``: a complete file is never written again, and is what FUSE
passthrough serves (``fusefs.passthrough.backing``).

The process that writes a block remembers its tag, computed over the bytes as the kernel took them
(``directio.pwrite_all``), and the file's seal (inode, size, change time) as that write left it
(``_Written``). At publish, such blocks are not read again as long as the seal still holds (no
write into the file since: any write moves its change time); every other block (written by another
process or before a restart, or followed by any other write) is read back from the disk then. So
the last block of a cold read publishes the file in milliseconds instead of a second read of the
whole file (seven seconds for 1 GiB on a loaded node): the object is complete when its first
reader is done.

Why a block this process wrote is not read back: a write that returned in full put exactly the
bytes the tag covers into the file, and a read right after it is most likely answered from the
disk's own write cache, so it proves little more, at the price of reading every cached byte twice:
a thread that read each block back with O_DIRECT as it was written cost the cold read about a
quarter of its speed (357 against 258 MB/s, issue 26) and a third of the server's CPU samples. A
later change to the file is caught by its seal (here), by the block check of every read through a
server, and by the whole-file check every new server makes of a complete file (``complete_file``).

The token (random, per data file) ties markers to the file they were written into: markers left
over from an evicted or discarded file point at a token no file has, and read as misses.

Blocks arrive in any order (concurrent prefetches, refills, other servers), so the writer asks after
each batch whether the objects it wrote into are now whole (``publish_when_whole``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import diskcache

from fusefs import directio
from fusefs.nodecache import checks
from fusefs.nodecache.counters import Counters
from fusefs.nodecache.entries import drop_corrupt
from fusefs.nodecache.keys import FORMAT, BlockKey, ObjectId

PARTIAL = ".part"
COMPLETE = ".obj"
SUBDIR = "objects"


@dataclass(frozen=True)
class DataFile:
    """An index value that is a file of ours (relative to the cache directory): diskcache counts
    its size and unlinks it on eviction (``index.BlockDisk``)."""

    relpath: str
    size: int

    @property
    def token(self) -> int:
        stem = os.path.basename(self.relpath).rsplit(".", 1)[0]
        return int(stem.rsplit("-", 1)[1], 16)

    @property
    def complete(self) -> bool:
        return self.relpath.endswith(COMPLETE)

    def published(self) -> DataFile:
        return DataFile(self.relpath[: -len(PARTIAL)] + COMPLETE, self.size)


def new_partial(directory: str, oid: ObjectId, fmt: str = FORMAT) -> DataFile:
    """Create an empty (sparse) data file of the object's size; the caller indexes it."""
    name = oid.name(fmt)
    token = secrets.randbits(63) or 1
    rel = os.path.join(SUBDIR, name[:2], f"{name}-{token:016x}{PARTIAL}")
    path = os.path.join(directory, rel)
    for attempt in range(10):
        try:  # the sub-directory is made when missing (``index.write_new_file`` says why)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileNotFoundError:
            if attempt == 9:
                raise
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.ftruncate(fd, oid.size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return DataFile(rel, oid.size)


def publish(directory: str, data: DataFile) -> DataFile:
    """Make a verified partial file read-only and rename it complete. Raises FileNotFoundError if
    it is gone: evicted, or published by another server meanwhile, which then also re-points the
    index row (doing it twice would unlink the file: see ``ObjectFiles.publish``)."""
    src = os.path.join(directory, data.relpath)
    done = data.published()
    os.chmod(src, 0o400)  # its owner only, like every file of the cache: tenants' bytes
    os.rename(src, os.path.join(directory, done.relpath))
    return done


#: partly filled objects whose first missing block the writer remembers (``publish_when_whole``)
MISSING_KEPT = 1024
#: partial files whose blocks this process wrote it remembers (``_Written``)
WRITTEN_KEPT = 256


@dataclass
class _Written:
    """Blocks of one partial file this process wrote (index -> tag), and the file's seal as the
    last of those writes left it. While the seal holds, nothing was written into the file since,
    so those blocks hold what their tags cover and need not be read again."""

    seal: int
    tags: dict[int, int] = field(default_factory=dict)


class ObjectFiles:
    """Objects larger than one block, in their data files, indexed in ``index``."""

    def __init__(self, directory: str, index: diskcache.Cache, counters: Counters) -> None:
        self.directory = directory
        self.index = index
        self.counters = counters
        #: complete files this process checked whole (``complete_file``): handed out unchecked after
        self._verified: set[str] = set()
        #: a block each partly filled object was found missing last (writer thread only), looked at
        #: first: an object filled in any order costs one lookup per batch, not one per block
        self._missing: OrderedDict[ObjectId, int] = OrderedDict()
        #: partial files (relpath) and the blocks this process wrote into them (``_Written``)
        self._written: OrderedDict[str, _Written] = OrderedDict()
        self._written_lock = threading.Lock()  # the writer stores, workers publish

    def data_file(self, oid: ObjectId) -> DataFile | None:
        """The object's indexed data file (its access time updated), or None."""
        handle = self.index.get(oid.encode(FORMAT), read=True)
        if handle is None:
            return None
        with handle:
            return self._as_data_file(handle.name, os.fstat(handle.fileno()).st_size)

    def _as_data_file(self, path: str, size: int) -> DataFile | None:
        rel = os.path.relpath(path, self.directory)
        if not rel.startswith(SUBDIR + os.sep) or not rel.endswith((PARTIAL, COMPLETE)):
            return None
        return DataFile(rel, size)

    def store(self, key: BlockKey, data: bytes) -> None:
        """Write a block into its object's data file (created on the first block), then its
        marker. Never into a complete file: those are never modified. Raises for cache errors."""
        oid = key.object_id()
        df = self.data_file(oid)
        if df is None:
            df = new_partial(self.directory, oid, FORMAT)
            if not self.index.add(oid.encode(FORMAT), df):  # another server created one: use it
                df = self.data_file(oid)  # (add() removed ours)
        if df is None or df.complete:
            return
        try:
            fd = os.open(os.path.join(self.directory, df.relpath), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # evicted, or published, meanwhile
            return
        try:
            direct = directio.open_direct(fd) if len(data) >= directio.MIN_DIRECT else None
            try:
                before = checks.seal_of(os.fstat(fd), oid)
                # The tag is taken over the bytes as the kernel took them, right after each piece
                # is written, so the marker says what the write put into the file.
                tagger = checks.Tagger(key)
                directio.pwrite_all(fd, data, key.index * key.block_size, direct, tagger.add)
                block_tag = tagger.tag()
                self._wrote(df.relpath, before, checks.seal_of(os.fstat(fd), oid), key.index, block_tag)
            finally:
                if direct is not None:
                    os.close(direct)
        finally:
            os.close(fd)
        self.index.set(key.encode(), df.token, tag=block_tag)

    def _wrote(self, relpath: str, before: int, after: int, index: int, block_tag: int) -> None:
        """Remember a block written into ``relpath``, which had the seal ``before`` just before the
        write and ``after`` just after it. A ``before`` other than the seal our last write left
        means something else wrote into the file meanwhile: what we wrote earlier is then read
        again at publish."""
        with self._written_lock:
            written = self._written.get(relpath)
            if written is None or written.seal != before:
                written = self._written[relpath] = _Written(after)
            written.seal = after
            written.tags[index] = block_tag
            self._written.move_to_end(relpath)
            while len(self._written) > WRITTEN_KEPT:
                self._written.popitem(last=False)

    def _written_since(self, relpath: str, seal: int) -> dict[int, int]:
        """The blocks of ``relpath`` this process wrote, if the file's seal is still ``seal`` as
        the last of those writes left it (nothing written since); else none."""
        with self._written_lock:
            written = self._written.get(relpath)
            return dict(written.tags) if written is not None and written.seal == seal else {}

    def lookup(self, key: BlockKey) -> bytes | None:
        """A block from its object's data file, checked against its marker; None on a miss.
        Raises for cache errors; a corrupt block removes its marker (and a complete file)."""
        dkey = key.encode()
        if dkey not in self.index:
            return None
        token, tag = self.index.get(dkey, tag=True)
        oid = key.object_id()
        handle = self.index.get(oid.encode(FORMAT), read=True) if isinstance(token, int) else None
        if handle is None:
            # diskcache answers None both when the object's row is gone and when the row's file
            # could not be opened: a partial file being renamed complete (the row is re-pointed just
            # after) looks the same for a moment. Only a marker of no row at all is dropped; the
            # other is a miss, or the block of a file about to be complete would be fetched again.
            if not isinstance(token, int) or oid.encode(FORMAT) not in self.index:
                self.index.delete(dkey)  # its file was evicted: a marker of nothing
            return None
        with handle:
            df = self._as_data_file(handle.name, 0)
            if df is None or df.token != token:
                self.index.delete(dkey)  # a marker of an earlier file of this object
                return None
            data = checks.read_block_at(handle.fileno(), key, tag)
        if data is None:
            drop_corrupt(self.index, self.counters, key)
            if df.complete:  # a complete file that fails a check must not be passed through again
                self.index.delete(oid.encode(FORMAT))
        return data

    def complete_file(self, oid: ObjectId) -> str | None:
        """The path of the object's complete (verified, read-only) file, publishing it first if
        every block is there; None otherwise. Blocking. Never raises."""
        if oid.size <= oid.block_size:
            return None
        try:
            df = self.data_file(oid)
            if df is not None and not df.complete:
                df = self.publish(oid, df)
            elif df is not None and df.relpath not in self._verified:
                # The kernel reads a complete file unchecked (FUSE passthrough), so before this
                # server hands one out for the first time every block is checked against its
                # marker: a file damaged on disk since it was published, or an index row naming
                # another object's file, is evicted (its blocks are fetched again), never served.
                # Unless another server of the node checked this very file (same inode, size and
                # change time: any write since moves the change time) within ``VERIFIED_FOR``.
                try:
                    seal = checks.seal(os.path.join(self.directory, df.relpath), oid)
                    if self.sealed(df, seal):
                        self._verified.add(df.relpath)  # (already recorded node-wide)
                        return os.path.join(self.directory, df.relpath)
                    verdict = self.verify(oid, df)
                except FileNotFoundError:
                    return None  # evicted by another server meanwhile: read through the server
                if verdict is False:
                    self.counters.report("corrupt-file", f"complete file of {oid.key!r} (version {oid.version}) "
                                                         "failed its check; evicted")
                    self.index.delete(oid.encode(FORMAT))
                    return None
                if verdict is None:
                    # A marker missing (evicted, or not written yet) or naming another file: not
                    # proven damaged, so it stays for the server path, which checks each block it
                    # reads; only passthrough, which checks nothing, is refused for now.
                    return None
                self.record_check(df.relpath, seal)
        except Exception as exc:
            self.counters.problem("publish", exc)
            return None
        return os.path.join(self.directory, df.relpath) if df is not None and df.complete else None

    def sealed(self, df: DataFile, seal: int) -> bool:
        """Whether a server of this node checked ``df`` whole, as it is now, within ``VERIFIED_FOR``."""
        value, checked = self.index.get(checks.seal_key(df.relpath), default=(None, None), tag=True)
        return value == seal and isinstance(checked, int) and time.time() - checked < checks.VERIFIED_FOR

    def verify(self, oid: ObjectId, df: DataFile) -> bool | None:
        """Check every block of ``df`` against its marker: True if all match, None if a marker is
        missing or names another file (not all there: not corrupt), False if a block is wrong (its
        marker is then removed). Blocks this process wrote, with nothing written into the file
        since, are not read again (``_Written``); the others are read from the disk (O_DIRECT
        where the filesystem has it), a piece at a time."""
        self.counters.count("file_checks")
        tags = []
        for index in range(oid.blocks()):
            bkey = BlockKey.of(oid, index)
            token, tag = self.index.get(bkey.encode(), default=(None, None), tag=True)
            if token != df.token or not isinstance(tag, int):
                return None
            tags.append((bkey, tag))
        fd = os.open(os.path.join(self.directory, df.relpath), os.O_RDONLY | os.O_CLOEXEC)
        try:
            checked = self._written_since(df.relpath, checks.seal_of(os.fstat(fd), oid))
            unread = [(bkey, tag) for bkey, tag in tags if checked.get(bkey.index) != tag]
            direct = directio.open_direct(fd, os.O_RDONLY) if unread else None
            try:
                for bkey, tag in unread:
                    if checks.tag_on_disk(fd, bkey, tag >> 32, direct) != tag:
                        drop_corrupt(self.index, self.counters, bkey)
                        return False
            finally:
                if direct is not None:
                    os.close(direct)
        finally:
            os.close(fd)
        return True

    def publish(self, oid: ObjectId, df: DataFile) -> DataFile | None:
        """Check every block of a partial file against its marker and publish it complete; None
        if a block is missing or wrong (its marker is then removed: it is fetched again)."""
        try:
            if not self.verify(oid, df):
                return None
            done = publish(self.directory, df)
        except FileNotFoundError:
            # Published by another server or thread, or evicted. Only the one whose rename worked
            # re-points the row: diskcache unlinks a row's old file when the row is set, and
            # setting it a second time to the same complete file would unlink that very file.
            return self.data_file(oid)
        with self._written_lock:
            self._written.pop(df.relpath, None)
        self.index.set(oid.encode(FORMAT), done)  # the row now names the complete file
        self.counters.count("published")
        with contextlib.suppress(FileNotFoundError):  # (evicted at once: nothing to record)
            self.record_check(done.relpath, checks.seal(os.path.join(self.directory, done.relpath), oid))
        return done

    def record_check(self, relpath: str, seal: int) -> None:
        """Remember that the complete file ``relpath``, as identified by ``seal``, was checked
        whole: in this server, and node-wide for ``VERIFIED_FOR`` (``sealed``)."""
        self._verified.add(relpath)
        self.index.set(checks.seal_key(relpath), seal, tag=int(time.time()))

    def publish_when_whole(self, oid: ObjectId) -> None:
        """Publish the object's partial file if every block of it is now marked. Called by the
        writer for each object a batch wrote into: the batch holding the last block is not always
        the one that completes the file. The block found missing last time is looked at first, then
        the others last block first (the one a sequential fill is still missing), so an incomplete
        file usually costs one lookup. Never raises."""
        if oid.size <= oid.block_size:
            return
        try:
            known = self._missing.pop(oid, None)
            order = reversed(range(oid.blocks()))  # (lazily: a big object's list per batch is waste)
            for index in order if known is None else itertools.chain((known,), order):
                if BlockKey.of(oid, index).encode() not in self.index:
                    self._missing[oid] = index
                    while len(self._missing) > MISSING_KEPT:
                        self._missing.popitem(last=False)
                    return
            df = self.data_file(oid)
            if df is not None and not df.complete:
                self.publish(oid, df)
        except Exception as exc:
            self.counters.problem("publish", exc)
