"""``LocalData``: the data service for one grant, in this process.

It holds what a pod must never hold: the store client (with the grant's credentials) and the
node cache. It serves a standalone ``objfs mount`` directly (one trust domain), and it is what
the node's data service runs behind every grant connection (``fusefs.wire.grant``): there every
argument comes from an untrusted sidecar, so each key is checked against the grant's ``Scope``
before anything is sent, and a block enters the node cache only as this side fetched it.

Sharing the node cache between grants: blocks are keyed by the grant's tenant (a hash of the
endpoint and the access key id, ``fusefs.nodecache.keys.tenant_of``); grants with ambient credentials
share the "" tenant and prove, once per object version, that their credentials may read it (one
pinned GET of the first byte) before cached bytes are served to them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any

import trio

from fusefs import errors, filemeta, metrics
from fusefs.config import MountConfig
from fusefs.nodecache.keys import tenant_of
from fusefs.passthrough.backing import Registrar
from fusefs.retry import RetryPolicy
from fusefs.service.scope import Scope
from fusefs.service.staging import StagedParts, stage_dir
from fusefs.store.base import AsyncStore, ListPage, MultipartUpload, ObjectInfo

if TYPE_CHECKING:
    from fusefs.nodecache.cache import BlockKey, NodeCache

log = logging.getLogger(__name__)

CHECK_DEADLINE = 10.0  # seconds the access check is retried for: a wrong endpoint fails fast
#: the longest range one request may ask for: what the service holds in memory for one answer
MAX_RANGE = 64 * 1024 * 1024


def open_cache(directory: str | None, size: int) -> NodeCache | None:
    """The node cache at ``directory``, or None: none configured, or one that cannot open (reads
    then go to the store directly, and the volume's condition says so)."""
    if not directory or size <= 0:
        return None
    try:
        from fusefs.nodecache.cache import NodeCache

        return NodeCache(directory, size)
    except Exception as exc:  # a cache that cannot open degrades to direct reads
        log.warning("node cache at %s unusable, reading directly: %s", directory, exc)
        return None


def _checked(meta: Mapping[str, str] | None, key: str) -> dict[str, str] | None:
    """Metadata a client wants stored, bounded (names, 2 KiB): InvalidRequestError otherwise."""
    if meta is None:
        return None
    try:
        return filemeta.check(dict(meta) if isinstance(meta, Mapping) else meta)
    except ValueError as exc:
        raise errors.InvalidRequestError(f"{key!r}: {exc}", key=key) from None


class LocalData:
    """A ``fusefs.service.api.DataClient`` served in this process."""

    def __init__(self, store: AsyncStore, scope: Scope, block_size: int, *, cache: NodeCache | None = None,
                 tenant: str = "", registrar: Registrar | None = None,
                 fuse_fd: Callable[[], int | None] | None = None, backing_root: tuple[str, str] | None = None,
                 cache_wanted: bool = False) -> None:
        self.store = store
        self.scope = scope
        self.identity = store.identity
        self.limits = store.limits
        self.block_size = block_size
        self.cache = cache
        self.node_cache = cache is not None and cache.usable
        self.cache_disabled = cache_wanted and not self.node_cache
        self.tenant = tenant
        self.registrar = registrar
        #: the FUSE connection's fd backing ids are registered on (None: passthrough off)
        self.fuse_fd = fuse_fd
        self.passthrough = cache is not None and registrar is not None and fuse_fd is not None
        #: (cache dir, a read-only mount of it): complete files are opened for registration through
        #: the read-only mount, so the kernel refuses to reopen them for writing (EROFS) whatever
        #: flags a server answers an open with (``fusefs.passthrough.backing``)
        self.backing_root = backing_root
        self._authorised: set[tuple[str, str]] = set()  # (key, version) this grant fetched or proved
        self._proving: dict[tuple[str, str], trio.Event] = {}
        self._uploads: set[int] = set()  # ids of uploads this grant started
        self._staged: dict[int, StagedParts] = {}  # upload id -> its parts, for the node cache
        self._writing: dict[tuple[str, str], trio.Event] = {}  # (key, version) -> set once in the node cache
        self._refusal_said = False

    @classmethod
    def for_config(cls, config: MountConfig, store: AsyncStore, *, cache: NodeCache | None = None,
                   registrar: Registrar | None = None, fuse_fd: Callable[[], int | None] | None = None,
                   backing_root: tuple[str, str] | None = None) -> LocalData:
        """The service for the volume ``config`` describes (its bucket, prefix, mode and tenant); a
        snapshot's read-only volume is served from its manifest (``fusefs.service.snapshot``)."""
        scope = Scope(config.bucket, config.prefix, config.read_only)
        kw: dict[str, Any] = dict(cache=cache, tenant=tenant_of(config), registrar=registrar, fuse_fd=fuse_fd,
                                  backing_root=backing_root,
                                  cache_wanted=bool(config.cache_dir) and config.cache_size > 0)
        if config.snapshot:
            from fusefs.service.snapshot import SnapshotData

            return SnapshotData(store, scope, config.tuning.block_size, manifest_key=config.snapshot, **kw)
        return cls(store, scope, config.tuning.block_size, **kw)

    @property
    def requests(self) -> int:
        return self.store.requests

    # -- store calls, scoped -------------------------------------------------------------------
    async def check_access(self) -> None:
        await self.store.check_access(RetryPolicy(deadline=min(CHECK_DEADLINE, self.store.policy.deadline)))

    async def head(self, key: str) -> ObjectInfo:
        return await self.store.head(self.scope.key(key))

    async def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        return await self.store.list(self.scope.key(prefix), delimiter, token, max(1, min(1000, max_keys)))

    async def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes:
        return await self.get_range_of(ObjectInfo(self.scope.key(key), -1, version or "", 0.0), start, length)

    async def get_range_of(self, info: ObjectInfo, start: int, length: int) -> bytes:
        """A range of ``info.key`` at ``info.version`` (any version if ""), which the caller checked."""
        if start < 0 or length < 0 or length > MAX_RANGE:
            raise errors.InvalidRequestError(f"range {start}+{length} of {info.key!r}: at most {MAX_RANGE} bytes "
                                             "at a time", key=info.key)
        return await self.store.get_range(info.key, start, length, info.version or None)

    async def peek(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        key = self.scope.key(key)
        if not 0 < length <= self.block_size:
            raise errors.InvalidRequestError(f"the first {length} bytes of {key!r}: at most a block "
                                             f"({self.block_size})", key=key)
        info, data = await self.store.get_first(key, length)
        if info.key != key or len(data) > length:
            raise errors.StoreError(f"{key!r}: the store answered a GET with another object", key=key)
        if info.version and data and len(data) == self._length(info, 0):
            self._authorised.add((info.key, info.version))  # our own GET of that version answered
            await self._keep_first_block(info, data)
        return info, data

    async def _keep_first_block(self, info: ObjectInfo, data: bytes) -> None:
        """Block 0 of ``info`` as this side's own GET of that version returned it, into the node
        cache through its ordinary path (one writer per block, the write queue beside the read):
        the next read of it, from any pod of the node, costs no GET. Best effort."""
        if self.cache is None:
            return

        async def fetched() -> bytes:
            return data

        await self.cache.get_or_fetch(self.cache_key(info, 0), fetched)

    async def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo:
        info = await self.store.put(self.scope.write(key), data, _checked(meta, key))
        await self._write_through(info, data)
        return info

    async def _write_through(self, info: ObjectInfo, data: bytes | memoryview) -> None:
        """The bytes of an object this service just stored go into the node cache under the
        version the store answered, so the next read of it costs no GET: they are this side's
        own, as sent and acknowledged. Best effort: a cache that refuses them changes nothing."""
        if self.cache is None or not info.version or info.size != len(data) or not data:
            return
        view = memoryview(data)
        for index in range(-(-len(data) // self.block_size)):
            block = bytes(view[index * self.block_size:(index + 1) * self.block_size])
            if not await trio.to_thread.run_sync(self.cache.put, self.cache_key(info, index), block):
                return
        self._authorised.add((info.key, info.version))  # its own bytes: no proof GET before reading them

    async def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> MultipartUpload:
        upload = await self.store.create_multipart(self.scope.write(key), _checked(meta, key))
        self._uploads.add(id(upload))
        if self.cache is not None and self.cache.usable:
            try:
                directory = await trio.to_thread.run_sync(stage_dir, self.cache.directory)
            except OSError as exc:
                log.debug("multipart uploads not written through to the node cache: %s", exc)
            else:
                # at most a quarter of the cache: a huge upload is not worth what it would evict
                self._staged[id(upload)] = StagedParts(directory, self.cache.size_limit // 4)
        return upload

    def _own(self, upload: MultipartUpload) -> MultipartUpload:
        if id(upload) not in self._uploads:
            raise errors.InvalidRequestError("not an upload of this volume", key=upload.key)
        return upload

    async def upload_part(self, upload: MultipartUpload, number: int, data: bytes | memoryview) -> None:
        if not 1 <= number <= self.limits.max_parts:
            raise errors.InvalidRequestError(f"part number {number} is out of range", key=upload.key)
        staged = self._staged.get(id(upload))
        if staged is None:
            await self.store.upload_part(self._own(upload), number, data)
            return
        # The part goes to local disk while it goes to the store, kept once the store acknowledged it.
        written: list[IO[bytes] | None] = [None]

        async def stage() -> None:
            written[0] = await trio.to_thread.run_sync(staged.write, data)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stage)
                await self.store.upload_part(self._own(upload), number, data)
        except BaseException as exc:
            if written[0] is not None:
                written[0].close()
            if isinstance(exc, ExceptionGroup):
                raise errors.first_store_error(exc) from None
            raise
        if written[0] is not None:
            staged.keep(number, written[0], len(data))

    async def upload_part_copy(self, upload: MultipartUpload, number: int, src: ObjectInfo, start: int,
                               length: int) -> None:
        if not 1 <= number <= self.limits.max_parts:
            raise errors.InvalidRequestError(f"part number {number} is out of range", key=upload.key)
        self.scope.key(src.key)  # a copy reads its source: only from this volume
        if start < 0 or length <= 0 or start + length > src.size or length > self.limits.max_part_size:
            raise errors.InvalidRequestError(f"bytes {start}+{length} of a {src.size}-byte object", key=src.key)
        staged = self._staged.get(id(upload))
        if staged is not None:  # bytes this side never sees: the object is not cached
            staged.give_up()
        await self.store.upload_part_copy(self._own(upload), number, src, start, length)

    async def complete(self, upload: MultipartUpload) -> ObjectInfo:
        info = await self.store.complete(self._own(upload))
        self._uploads.discard(id(upload))
        staged = self._staged.pop(id(upload), None)
        if staged is not None:
            self._start_write_through(info, getattr(upload, "completed_etag", None), staged)
        return info

    def _start_write_through(self, info: ObjectInfo, answered: str | None, staged: StagedParts) -> None:
        """A completed multipart upload's bytes into the node cache (``fusefs.service.staging``),
        after the completion is answered: the close that waits for it does not wait for the
        cache too. Reads of that version through this service wait for it instead
        (``_written_through``): their blocks are on their way from local disk. ``answered``: the
        completion's own ETag, where the version came from a HEAD after it (S3). Best effort."""
        ident = (info.key, info.version)
        cache = self.cache
        if cache is None or not info.version or ident in self._writing:
            staged.close()
            return
        done = self._writing[ident] = trio.Event()

        def put(index: int, block: bytes) -> bool:
            return cache.put(self.cache_key(info, index), block)

        async def write() -> None:
            try:
                if await trio.to_thread.run_sync(staged.write_blocks, info.version, answered, info.size,
                                                 self.block_size, put):
                    self._authorised.add(ident)  # its own bytes: no proof GET before reading them
            except Exception as exc:  # never fails the process: the next read fetches the object
                log.warning("%s not written through to the node cache: %s", info.key, exc)
            finally:
                staged.close()
                del self._writing[ident]
                done.set()

        # A task of the run, not of a request (LocalData owns no nursery); it ends with the run.
        trio.lowlevel.spawn_system_task(write)

    async def _written_through(self, info: ObjectInfo) -> None:
        """Wait while this service puts ``info``'s version into the node cache."""
        pending = self._writing.get((info.key, info.version))
        if pending is not None:
            await pending.wait()

    async def abort(self, upload: MultipartUpload) -> None:
        try:
            await self.store.abort(self._own(upload))
        finally:
            self._uploads.discard(id(upload))
            staged = self._staged.pop(id(upload), None)
            if staged is not None:
                staged.close()

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        return await self.store.copy(self.scope.key(src), self.scope.write(dst))

    async def set_meta(self, info: ObjectInfo, meta: Mapping[str, str]) -> ObjectInfo:
        key = self.scope.write(info.key)
        return await self.store.set_meta(key, _checked(meta, key) or {}, info.size, info.version)

    async def delete(self, key: str) -> None:
        await self.store.delete(self.scope.write(key))

    # -- blocks ----------------------------------------------------------------------------------
    def _length(self, info: ObjectInfo, index: int) -> int:
        return max(0, min(self.block_size, info.size - index * self.block_size))

    def _check_object(self, info: ObjectInfo) -> None:
        """Refuse an object this grant does not cover (before any request or cache lookup)."""
        self.scope.key(info.key)

    def _check_block(self, info: ObjectInfo, index: int) -> None:
        self._check_object(info)
        if index < 0 or info.size < 0 or index * self.block_size >= max(info.size, 1):
            raise errors.InvalidRequestError(f"block {index} of a {info.size}-byte object", key=info.key)

    async def _from_store(self, info: ObjectInfo, index: int) -> bytes:
        length = self._length(info, index)
        data = await self.store.get_range(info.key, index * self.block_size, length, info.version)
        if len(data) != length:
            raise errors.ObjectChangedError(f"{info.key}: got {len(data)} bytes for a {length}-byte block",
                                            key=info.key)
        return data

    def cache_key(self, info: ObjectInfo, index: int) -> BlockKey:
        from fusefs.nodecache.cache import BlockKey  # the node cache module is optional until it is configured

        return BlockKey(store=self.identity, key=info.key, version=info.version, index=index,
                        block_size=self.block_size, size=info.size, tenant=self.tenant)

    async def read_block(self, info: ObjectInfo, index: int, warming: bool = False) -> bytes:
        data, _ = await self.read_block_from(info, index, warming)
        return data

    async def read_block_from(self, info: ObjectInfo, index: int, warming: bool = False) -> tuple[bytes, bool]:
        """The block, and whether it took a GET of the store (False: the node cache had it)."""
        self._check_block(info, index)
        if self.cache is None:
            return await self._from_store(info, index), True
        await self._written_through(info)
        fetched = False

        async def fetch() -> bytes:
            nonlocal fetched
            data = await self._from_store(info, index)
            fetched = True
            self._authorised.add((info.key, info.version))  # our own GET of it answered
            return data

        data = await self.cache.get_or_fetch(self.cache_key(info, index), fetch, wait_for_space=warming)
        if len(data) != self._length(info, index):  # never hand out a block of the wrong size
            return await self._from_store(info, index), True
        await self.authorise(info)
        return data, fetched

    async def authorise(self, info: ObjectInfo) -> None:
        """Before serving cached bytes of ``info`` under ambient credentials: one GET of its
        first byte, pinned to the version, proves that this grant's credentials may read it
        (a listing shows an object to anyone allowed to list, not to read it). Once per object
        version per grant; with explicit credentials the tenant in the cache key does this."""
        ident = (info.key, info.version)
        while not self.tenant and ident not in self._authorised:
            proving = self._proving.get(ident)
            if proving is not None:
                await proving.wait()  # someone else's proof, or failure (then try ourselves)
                continue
            self._proving[ident] = proving = trio.Event()
            try:
                if info.size:
                    await self.store.get_range(info.key, 0, 1, info.version)
                self._authorised.add(ident)
            finally:
                del self._proving[ident]
                proving.set()

    async def on_node(self, info: ObjectInfo, index: int) -> bool:
        if self.cache is None:
            return False
        self._check_block(info, index)
        return await trio.to_thread.run_sync(self.cache.contains, self.cache_key(info, index))

    # -- passthrough -----------------------------------------------------------------------------
    async def backing_open(self, info: ObjectInfo) -> int:
        fuse_fd = self.fuse_fd() if self.fuse_fd is not None else None
        if self.cache is None or self.registrar is None or fuse_fd is None or info.size <= self.block_size:
            return 0
        self._check_object(info)
        await self._written_through(info)
        path = await trio.to_thread.run_sync(self.cache.complete_file, self.cache_key(info, 0).object_id())
        if path is None:
            return 0
        await self.authorise(info)  # ambient credentials: this grant may read it
        try:
            return await trio.to_thread.run_sync(self._register, fuse_fd, path, info.size)
        except OSError as exc:
            metrics.PASSTHROUGH_REFUSED.inc()
            level = logging.DEBUG if self._refusal_said else logging.WARNING  # said once, not per open
            self._refusal_said = True
            log.log(level, "passthrough open of %s refused (%s); reading through the server", path, exc)
            return 0

    def _register(self, fuse_fd: int, path: str, size: int) -> int:
        assert self.registrar is not None
        if self.backing_root is not None:
            cache_dir, readonly = self.backing_root
            path = os.path.join(readonly, os.path.relpath(path, cache_dir))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            # a complete file is a regular, read-only file of the object's size (fusefs.nodecache.objectfiles)
            if not (stat.S_ISREG(st.st_mode) and st.st_size == size and not st.st_mode & 0o222):
                raise OSError(errno.EINVAL, f"{path} is not a complete cache file")
            return self.registrar.open(fuse_fd, fd)
        finally:
            os.close(fd)  # the kernel holds its own reference from here on

    async def backing_close(self, backing_id: int) -> None:
        fuse_fd = self.fuse_fd() if self.fuse_fd is not None else None
        if self.registrar is None or fuse_fd is None or backing_id <= 0:
            return
        try:
            await trio.to_thread.run_sync(self.registrar.close, fuse_fd, backing_id)
        except OSError as exc:
            log.debug("closing backing id %d: %s", backing_id, exc)

    async def aclose(self) -> None:
        staged, self._staged = list(self._staged.values()), {}
        for parts in staged:  # uploads never completed nor aborted (a client gone)
            parts.close()
