"""The write path: one ``WriteHandle`` per file opened for writing.

A handle is in one of three modes:

- ``stream``: a new file or a truncating overwrite written sequentially from offset 0. Bytes
  collect in a memory buffer; every full part is written through to the staging file and
  uploaded as a multipart part in the background, at most ``max_upload_parts_in_flight`` at a
  time (writers wait for a free slot, which bounds memory to about that many parts plus the
  buffer). ``flush`` uploads the tail as the last part and completes the upload; a file that
  never filled one part is a single PUT.
- ``staged``: the file lives in a private, unlinked staging file and is uploaded whole at
  ``flush``. A non-sequential write or a truncate switches a streaming handle here; since every
  streamed byte is either on disk already or in the buffer (spilled on the switch), the switch
  loses nothing and costs one small disk write.
- ``lazy``: an existing object opened without O_TRUNC and not modified yet. Reads go to the
  store, pinned to the version seen at open; the first write or truncate downloads the needed
  prefix into the staging file (ranged GETs pinned to that version) and switches to staged.
- ``patch``: a write into an existing object on a store that copies parts server-side
  (``StoreLimits.part_copy``). Only the written ranges live in the (sparse) staging file; reads of
  the rest go to the old version. ``flush`` makes one multipart upload whose untouched runs are
  copied by the store (S3 UploadPartCopy; on GCS only the whole old object: an append) and whose
  other parts are uploaded, each filled from the old version first (``fusefs.fs.parts.patch``): a
  1 MiB change in a 25 MiB file sends ~5 MiB, not 25. A truncate, an unlink or a store that refuses
  the copy fills in the rest and goes staged.

The handle belongs to the inode, not to a name (``ops`` shares one between every fd that writes
the file): ``rekey`` points it at a new key after a rename (an upload under way to the old key is
given up: its bytes are in the staging file), ``detach`` after an unlink or a rename over it keeps
the bytes readable and writable through the open fds but never uploads them again.

Invariant: nothing acknowledged exists only in a request. A failed upload leaves the handle
staged and dirty, so ``flush`` raises and a later ``flush`` uploads the staging file again.
Multipart uploads that are given up are aborted in the background, and again at ``release``.
All disk I/O runs in worker threads. The handle's operations are serialised by a lock (simple
and safe for dup'd fds; a read on the same handle waits while a flush uploads). The bound on
parts in flight is per handle.

The price of the write-through copy: a streamed file needs as much local staging space as its
size, and a streamed write goes no faster than the staging disk. The copy is written with
O_DIRECT where the filesystem allows (``fusefs.directio``): through the page cache it cost a
core's worth of kernel CPU per ~340 MB/s here, which a 2-core node needs for the upload itself.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import trio

from fusefs import directio, errors
from fusefs.config import MiB, Tuning
from fusefs.fs import parts
from fusefs.service.api import DataClient
from fusefs.store.base import MultipartUpload, ObjectInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

LAZY, STREAM, STAGED, PATCH = "lazy", "stream", "staged", "patch"


class StagingError(errors.StoreError):
    """The local staging file failed (disk full, I/O error); ``errno`` is the disk's."""


class HandleReleasedError(errors.StoreError):
    default_errno = errno.EBADF


def _as_store_error(exc: Exception, key: str) -> errors.StoreError:
    if isinstance(exc, errors.StoreError):
        return exc
    return errors.StoreError(f"upload of {key} failed: {exc!r}", key=key)


@dataclass(frozen=True)
class PartCopy:
    """A part the store copies from bytes [start, start + length) of ``src``."""

    src: ObjectInfo
    start: int
    length: int


class _Multipart:
    """One multipart upload with parts sent in the background under a bound on parts in flight."""

    def __init__(self, store: DataClient, key: str, nursery: trio.Nursery, plan: parts.PartPlan,
                 max_in_flight: int) -> None:
        self.store = store
        self.key = key
        self.plan = plan
        self.parts = 0  # parts handed to send() so far
        self.error: errors.StoreError | None = None  # first failed part, if any
        self._nursery = nursery
        self._slots = trio.Semaphore(max_in_flight)
        self._upload: MultipartUpload | None = None
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self.meta: Mapping[str, str] | None = None  # the object's user metadata, sent at start

    def next_size(self) -> int:
        return self.plan.size(self.parts + 1)

    @property
    def full(self) -> bool:
        return self.plan.full(self.parts)

    async def start(self) -> None:
        self._upload = await self.store.create_multipart(self.key, self.meta)

    async def reserve(self) -> None:
        """Wait for a free slot. Callers reserve before producing the part's bytes, so memory
        holds at most the parts in flight plus the one being filled."""
        await self._slots.acquire()

    def unreserve(self) -> None:
        self._slots.release()

    def launch(self, data: bytes | PartCopy) -> None:
        """Upload the next part in the background, in a slot taken by ``reserve``."""
        assert self._upload is not None and not self.full
        if self._in_flight == 0:
            self._idle = trio.Event()
        self._in_flight += 1
        self.parts += 1
        try:
            self._nursery.start_soon(self._send_part, self._upload, self.parts, data)
        except BaseException:
            self._in_flight -= 1
            self.parts -= 1
            if self._in_flight == 0:
                self._idle.set()
            self._slots.release()
            raise

    async def send(self, data: bytes) -> None:
        await self.reserve()
        self.launch(data)

    async def _send_part(self, upload: MultipartUpload, number: int, data: bytes | PartCopy) -> None:
        # Runs in the filesystem's nursery: it must never raise, or it would take the server down.
        try:
            if isinstance(data, PartCopy):
                await self.store.upload_part_copy(upload, number, data.src, data.start, data.length)
            else:
                await self.store.upload_part(upload, number, data)
        except Exception as exc:
            if self.error is None:
                self.error = _as_store_error(exc, self.key)
            log.warning("part %d of %s failed: %s", number, self.key, exc)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self._slots.release()

    async def drain(self) -> None:
        while self._in_flight:
            await self._idle.wait()

    async def complete(self) -> ObjectInfo:
        assert self._upload is not None
        await self.drain()
        if self.error is not None:
            raise self.error
        return await self.store.complete(self._upload)

    async def abort(self) -> None:
        await self.drain()  # a part finishing after the abort could otherwise linger on the store
        if self._upload is not None:
            await self.store.abort(self._upload)


class WriteHandle:
    """Writes to one object through FUSE file handles; see the module docstring."""

    def __init__(
        self,
        store: DataClient,
        key: str,
        tuning: Tuning,
        staging_dir: str,
        nursery: trio.Nursery,
        existing: ObjectInfo | None,
        truncate: bool,
    ) -> None:
        self.key = key
        self._store = store
        self._tuning = tuning
        self._staging_dir = staging_dir
        self._nursery = nursery
        self._existing = existing
        self._plan = parts.streaming(store.limits, tuning.part_size)  # within the backend's limits
        self._max_in_flight = max(1, tuning.max_upload_parts_in_flight)
        self._lock = trio.Lock()
        self._fd: int | None = None
        self._direct_fd: int | None = None  # the staging file again, with O_DIRECT (None where unsupported)
        # Stream mode: the part being filled, bytes [disk_len, disk_len + fill) of the file. It is
        # reused from part to part (one allocation), never resized while a view of it is out.
        self._buf = bytearray()
        self._fill = 0
        self._disk_len = 0  # stream mode: bytes [0, disk_len) are in the staging file
        self._stream: _Multipart | None = None
        self._orphans: set[_Multipart] = set()  # given-up uploads not known to be aborted yet
        self._info = existing
        self._released = False
        self._detached = False  # unlinked: nothing is uploaded any more
        self._no_part_copy = False  # the store refused a part copy: never try again for this file
        self._base: ObjectInfo | None = None  # patch mode: the version untouched bytes come from
        self._local: list[tuple[int, int]] = []  # patch mode: byte ranges the staging file holds
        #: user metadata stored with the object (``fusefs.filemeta``), as the caller sets it: sent
        #: with the upload (a multipart upload takes what it is when the upload starts)
        self.meta: Mapping[str, str] | None = None
        if existing is not None and not truncate:
            self._mode, self._size, self._dirty = LAZY, existing.size, False
        else:
            self._mode, self._size, self._dirty = STREAM, 0, True

    @property
    def size(self) -> int:
        return self._size

    @property
    def dirty(self) -> bool:
        """Whether ``flush`` has bytes to upload (never, once detached)."""
        return self._dirty and not self._detached

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def mode(self) -> str:
        """``lazy``, ``stream`` or ``staged`` (for tests and stats)."""
        return self._mode

    # -- public operations ---------------------------------------------------------------------
    async def write(self, offset: int, data: bytes) -> int:
        async with self._lock:
            self._check_open()
            if offset < 0:
                raise errors.InvalidRequestError(f"negative write offset {offset}", key=self.key)
            if not data:
                return 0
            if self._mode == LAZY:
                await self._start_patch()
            if self._mode == LAZY:
                await self._materialize(self._size)
            if self._mode == STREAM and offset != self._size:
                await self._to_staged()
            if self._mode == STREAM:
                await self._append(bytes(data))
            else:
                await self._pwrite(offset, data)
                if self._mode == PATCH:
                    self._local = parts.add_range(self._local, offset, offset + len(data))
                self._size = max(self._size, offset + len(data))
            self._dirty = True
            return len(data)

    async def read(self, offset: int, size: int) -> bytes:
        async with self._lock:
            self._check_open()
            end = min(self._size, offset + size)
            if offset < 0 or offset >= end:
                return b""
            if self._mode == LAZY:
                assert self._existing is not None
                return await self._store.get_range(self.key, offset, end - offset, self._existing.version)
            if self._mode == STAGED:
                return await self._pread(offset, end - offset)
            if self._mode == PATCH:
                return await self._read_patched(offset, end)
            head = await self._pread(offset, min(end, self._disk_len) - offset) if offset < self._disk_len else b""
            lo = max(offset, self._disk_len) - self._disk_len
            return head + bytes(self._buf[lo : min(end - self._disk_len, self._fill)])

    async def truncate(self, size: int) -> None:
        async with self._lock:
            self._check_open()
            if size < 0:
                raise errors.InvalidRequestError(f"negative size {size}", key=self.key)
            if size == self._size:
                return
            if size == 0:
                # O_TRUNC arriving as a setattr: start a fresh stream instead of staging.
                await self._reset_empty()
            else:
                if self._mode == LAZY:
                    await self._materialize(min(size, self._size))
                if self._mode == PATCH:
                    await self._fill_in(min(size, self._size))
                await self._to_staged()
                await self._disk(os.ftruncate, self._require_fd(), size)
                self._size = size
            self._dirty = True

    async def rekey(self, key: str, info: ObjectInfo | None = None) -> None:
        """The file is now called ``key`` (a rename); ``info``: the object as copied there."""
        async with self._lock:
            self._check_open()
            if self._stream is not None:
                await self._to_staged()  # parts already sent went to the old key
            self.key = key
            if info is not None:
                if self._mode == LAZY:
                    self._existing = info
                if self._mode == PATCH and not self._dirty:
                    self._base = info  # (a dirty patch still copies from the old key: deleted after)
                self._info = info

    async def detach(self) -> None:
        """The file lost its name (unlink, or a rename over it) while open: keep its bytes for the
        open fds (an unmodified object is downloaded first, before it is deleted) and never
        upload anything again."""
        async with self._lock:
            self._check_open()
            if self._mode == LAZY:
                await self._materialize(self._size)
            if self._mode == PATCH:
                await self._fill_in(self._size)
            await self._to_staged()
            self._detached = True

    async def flush(self) -> ObjectInfo:
        async with self._lock:
            self._check_open()
            if self._detached:
                return ObjectInfo(self.key, self._size, "", time.time())
            if not self._dirty:
                assert self._info is not None  # a clean handle is an unmodified existing object
                return self._info
            if self._mode == PATCH:
                info = await self._flush_patch()
            else:
                info = await (self._flush_stream() if self._mode == STREAM else self._flush_staged())
            self._info, self._dirty = info, False
            return info

    async def release(self) -> None:
        async with self._lock:
            if self._released:
                return
            self._released = True
            if self._stream is not None:
                self._orphans.add(self._stream)
                self._stream = None
            for up in list(self._orphans):
                await self._abort_quietly(up)
            self._buf = bytearray()
            if self._direct_fd is not None:
                fd, self._direct_fd = self._direct_fd, None
                os.close(fd)  # not the last reference to the file: cheap
            if self._fd is not None:
                fd, self._fd = self._fd, None
                # Closing the last fd of a big unlinked file frees its blocks: not on the loop.
                await trio.to_thread.run_sync(os.close, fd)

    # -- stream mode ---------------------------------------------------------------------------
    def _next_part_size(self) -> int:
        return self._stream.next_size() if self._stream is not None else self._plan.size(1)

    async def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while self._mode == STREAM:
            cap = self._next_part_size()
            if self._fill == cap:
                await self._cut()
                continue
            if not view:
                return
            k = min(cap - self._fill, len(view))
            # Grows the buffer while the first part (or a bigger part size) fills, then overwrites.
            self._buf[self._fill : self._fill + k] = view[:k]
            self._fill += k
            self._size += k
            view = view[k:]
        if view:  # the handle switched to staging in the middle of this write
            await self._pwrite(self._size, view)
            self._size += len(view)

    async def _cut(self) -> None:
        """Send the full buffer as the next part: written through to the staging file first.
        Falls back to staging if the multipart upload cannot start or has failed."""
        if self._stream is None:
            up = _Multipart(self._store, self.key, self._nursery, self._plan, self._max_in_flight)
            up.meta = self.meta
            try:
                await up.start()
            except errors.StoreError as exc:
                log.warning("cannot start a multipart upload of %s, staging it instead: %s", self.key, exc)
                await self._to_staged()
                return
            self._stream = up
        up = self._stream
        if up.error is not None or up.full:
            await self._to_staged()
            return
        await up.reserve()
        try:
            part = bytes(self._buf)  # fill == len(buf) here: part sizes never shrink
            await self._pwrite(self._disk_len, part)
        except BaseException:
            up.unreserve()
            raise
        self._disk_len += len(part)
        self._fill = 0
        up.launch(part)

    async def _flush_stream(self) -> ObjectInfo:
        tail = bytes(self._buf[: self._fill])
        # Complete the staging file first: whatever happens below, a retry finds every byte there.
        # (If the disk fails here, nothing has changed yet.)
        await self._spill()
        up, self._stream = self._stream, None
        self._mode = STAGED
        if up is None:
            return await self._store.put(self.key, tail, self.meta)
        if up.error is not None or up.full:
            log.warning("streamed upload of %s failed (%s); uploading the staged file", self.key, up.error)
            self._abandon(up)
            return await self._flush_staged()
        try:
            if tail:
                await up.send(tail)
            return await up.complete()
        except errors.StoreError as exc:
            self._abandon(up)
            if up.error is None:  # the completion itself failed: nothing more to try here
                raise
            # A part in flight failed while the upload was finishing (a data service restarting fails
            # every part it holds): the staging file has every byte, as when the failure came earlier.
            log.warning("streamed upload of %s failed at its end (%s); uploading the staged file", self.key, exc)
            return await self._flush_staged()
        except BaseException:
            self._abandon(up)
            raise

    async def _spill(self) -> None:
        """Write the buffered tail to the staging file, which then holds the whole file."""
        await self._ensure_fd()
        if self._fill:
            await self._pwrite(self._disk_len, memoryview(self._buf)[: self._fill])
            self._disk_len += self._fill
        self._buf, self._fill = bytearray(), 0  # a new object: views of the old one may be alive

    async def _to_staged(self) -> None:
        if self._mode == STREAM:
            await self._spill()
            if self._stream is not None:
                self._abandon(self._stream)
                self._stream = None
            self._mode = STAGED

    async def _reset_empty(self) -> None:
        if self._stream is not None:
            self._abandon(self._stream)
            self._stream = None
        if self._fd is not None:
            await self._disk(os.ftruncate, self._fd, 0)
        self._buf, self._fill = bytearray(), 0
        self._disk_len = self._size = 0
        self._mode = STAGED if self._detached else STREAM  # a detached file never streams to the store

    # -- staged mode ---------------------------------------------------------------------------
    async def _flush_staged(self) -> ObjectInfo:
        size = self._size
        if size <= self._plan.base:
            return await self._store.put(self.key, await self._pread(0, size), self.meta)
        plan = parts.sized(self._store.limits, self._plan.base, size, self.key)
        up = _Multipart(self._store, self.key, self._nursery, plan, self._max_in_flight)
        up.meta = self.meta
        await up.start()
        try:
            offset = 0
            while offset < size:
                if up.error is not None:
                    raise up.error
                n = min(up.next_size(), size - offset)
                await up.reserve()  # before reading: bounds the parts held in memory
                try:
                    data = await self._pread(offset, n)
                except BaseException:
                    up.unreserve()
                    raise
                up.launch(data)
                offset += n
            return await up.complete()
        except BaseException:
            self._abandon(up)
            raise

    # -- patch mode ----------------------------------------------------------------------------
    async def _start_patch(self) -> None:
        """LAZY -> PATCH where the store copies parts and the object is big enough to gain."""
        existing = self._existing
        limits = self._store.limits
        least = {"ranges": 2 * limits.min_part_size, "whole": MiB}.get(limits.part_copy)
        if (least is None or existing is None or not existing.version or existing.size < least
                or self._no_part_copy):
            return
        await self._ensure_fd()
        fd = self._require_fd()
        await self._disk(os.ftruncate, fd, 0)
        await self._disk(os.ftruncate, fd, existing.size)  # sparse: nothing is read yet
        self._base, self._local, self._mode = existing, [], PATCH

    def _missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """Ranges of [start, end) the staging file does not hold (they are the base version's)."""
        assert self._base is not None
        return parts.gaps(self._local, start, min(end, self._base.size))

    async def _read_patched(self, offset: int, end: int) -> bytes:
        assert self._base is not None
        out, pos = [], offset
        for a, b in self._missing(offset, end):
            out.append(await self._pread(pos, a - pos))
            out.append(await self._store.get_range(self._base.key, a, b - a, self._base.version))
            pos = b
        out.append(await self._pread(pos, end - pos))
        return b"".join(out)

    async def _fill_in(self, length: int) -> None:
        """PATCH -> STAGED: the base version's bytes the staging file lacks in [0, length)."""
        assert self._base is not None
        await self._fetch(self._missing(0, length), self._base)
        self._disk_len = self._size
        self._mode, self._base, self._local = STAGED, None, []

    async def _flush_patch(self) -> ObjectInfo:
        base = self._base
        assert base is not None
        pieces = parts.patch(self._store.limits, self._plan.base, self._size, base.size, self._local)
        if pieces is None:
            await self._fill_in(self._size)
            return await self._flush_staged()
        plan = parts.sized(self._store.limits, self._plan.base, self._size, self.key)
        up = _Multipart(self._store, self.key, self._nursery, plan, self._max_in_flight)
        up.meta = self.meta
        try:
            await up.start()
            for piece in pieces:
                if up.error is not None:
                    raise up.error
                await up.reserve()
                try:
                    if piece.copy:
                        part: bytes | PartCopy = PartCopy(base, piece.start, piece.length)
                    else:
                        gaps = self._missing(piece.start, piece.start + piece.length)
                        await self._fetch(gaps, base)
                        for a, b in gaps:
                            self._local = parts.add_range(self._local, a, b)
                        part = await self._pread(piece.start, piece.length)
                except BaseException:
                    up.unreserve()
                    raise
                up.launch(part)
            info = await up.complete()
        except errors.UnsupportedError as exc:
            self._abandon(up)
            self._no_part_copy = True
            log.info("%s: %s; uploading the whole file", self.key, exc)
            await self._fill_in(self._size)
            return await self._flush_staged()
        except BaseException:
            self._abandon(up)
            raise
        # the new version holds every byte: later writes patch it, reads go to it
        self._base, self._local = info, []
        return info

    async def _fetch(self, ranges: list[tuple[int, int]], base: ObjectInfo) -> None:
        """Download ``ranges`` of ``base`` into the same offsets of the staging file, in chunks,
        several at a time (ranged GETs pinned to its version)."""
        await self._ensure_fd()
        chunk = max(self._tuning.block_size, 1 * MiB)
        slots = trio.Semaphore(self._max_in_flight)  # bounds the chunks held in memory
        failures: list[Exception] = []

        async def fetch(offset: int, n: int) -> None:
            try:
                data = await self._store.get_range(base.key, offset, n, base.version)
                if len(data) != n:
                    raise errors.ObjectChangedError(f"{self.key} is shorter than when it was opened", key=self.key)
                await self._pwrite(offset, data)
            except Exception as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for start, end in ranges:
                for offset in range(start, end, chunk):
                    await slots.acquire()
                    if failures:
                        slots.release()
                        break
                    nursery.start_soon(fetch, offset, min(chunk, end - offset))
        if failures:
            raise _as_store_error(failures[0], self.key)

    async def _materialize(self, length: int) -> None:
        """Download bytes [0, length) of the existing object into the staging file; go staged."""
        assert self._existing is not None
        await self._ensure_fd()
        await self._disk(os.ftruncate, self._require_fd(), 0)  # a previous failed attempt may have left bytes
        await self._fetch([(0, length)], self._existing)
        self._disk_len = length
        self._mode = STAGED

    # -- uploads given up ------------------------------------------------------------------------
    def _abandon(self, up: _Multipart) -> None:
        """Abort ``up`` in the background; release() tries again if that fails."""
        self._orphans.add(up)
        try:
            self._nursery.start_soon(self._abort_quietly, up)
        except RuntimeError:  # the filesystem's nursery is closing: release() will do it
            pass

    async def _abort_quietly(self, up: _Multipart) -> None:
        try:
            await up.abort()
        except Exception as exc:
            log.warning("could not abort a multipart upload of %s: %s", self.key, exc)
            return
        self._orphans.discard(up)

    # -- staging file ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._released:
            raise HandleReleasedError(f"{self.key}: file handle already released", key=self.key)

    def _require_fd(self) -> int:
        assert self._fd is not None
        return self._fd

    async def _ensure_fd(self) -> None:
        if self._fd is None:
            self._fd = await self._disk(_make_staging_file, self._staging_dir)
            # Streamed parts go to the staging file with O_DIRECT: see fusefs.directio for why.
            self._direct_fd = await self._disk(directio.open_direct, self._fd)

    async def _disk(self, fn: Callable[..., T], *args: object) -> T:
        """Run a disk call in a worker thread; disk errors become StagingError with their errno."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            if isinstance(exc, errors.StoreError):
                raise
            err = StagingError(f"staging file of {self.key}: {exc.strerror or exc}", key=self.key)
            err.errno = exc.errno or errno.EIO
            raise err from exc

    async def _pwrite(self, offset: int, data: bytes | memoryview) -> None:
        await self._ensure_fd()
        await self._disk(directio.pwrite_all, self._require_fd(), data, offset, self._direct_fd)

    async def _pread(self, offset: int, n: int) -> bytes:
        if n <= 0:
            return b""
        return await self._disk(_pread_all, self._require_fd(), n, offset)


def _make_staging_file(directory: str) -> int:
    """An anonymous file only this process can reach: created 0600, unlinked at once."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=".objfs-write-", dir=directory)
    os.unlink(path)
    return fd


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """Read exactly n bytes (one allocation in the usual case); past the end reads as zeros."""
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    pieces, got = [data], len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            pieces.append(bytes(n - got))
            break
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)
