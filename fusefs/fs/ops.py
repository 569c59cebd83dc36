"""The FUSE operations (pyfuse3, trio): metadata from ``meta``, reads from ``read``, writes
through ``write.WriteHandle``.

Every handler maps store errors to errno (``errors.errno_of``) and never blocks the event loop:
store calls go through ``AsyncStore`` (worker threads), disk calls through the cache and write
handles (worker threads too).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from fusefs import errors, metrics
from fusefs.config import MountConfig
from fusefs.filemeta import FileMeta, pairs_of
from fusefs.fs import dirahead
from fusefs.fs.meta import Entry, Listing, Meta, Node, join, name_of, valid_name
from fusefs.fs.read import BlockReader, Sequential
from fusefs.fs.write import WriteHandle
from fusefs.passthrough.backing import Passthrough, file_info
from fusefs.service.api import DataClient
from fusefs.store.base import ObjectInfo

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

SYMLINK_MAX = 4095  # PATH_MAX less its NUL
CACHED, DIRECT, PASSTHROUGH = "cached", "direct", "passthrough"  # FileHandle.mode


def fuse_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn store and OS errors into FUSEError with the right errno; log unexpected ones.
    Also times every operation (``fusefs.metrics``: its histogram bound once, here)."""
    measured = metrics.FuseOp(fn.__name__)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            measured.error(exc.errno)
            raise
        except errors.StoreError as exc:
            log.info("%s: %s", fn.__name__, exc)
            measured.error(errors.errno_of(exc))
            raise pyfuse3.FUSEError(errors.errno_of(exc)) from None
        except OSError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            measured.error(errors.errno_of(exc))
            raise pyfuse3.FUSEError(errors.errno_of(exc)) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            measured.error(errno.EIO)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            measured.observe(started)

    return wrapper


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@dataclass
class FileHandle:
    node: Node
    info: ObjectInfo | None  # the version reads are pinned to
    seq: Sequential
    writer: WriteHandle | None = None
    mode: str = CACHED  # how the kernel does this handle's I/O: CACHED, DIRECT or PASSTHROUGH


@dataclass
class _InodeIO:
    """The kernel's I/O mode of an inode, as far as this server's opens set it: its opens are
    all passthrough (of one backing file) or none. The kernel refuses every other open (direct
    I/O too) of an inode that has a backing file, so such an open is sent to a new inode of the
    path (``Meta.detach``, ESTALE); while the backing file is being registered, other read-only
    opens wait for it (``registering``): a direct open answered meanwhile would make the kernel
    fail the passthrough open's reply (EIO; seen with 32 readers in tests/fuse/test_soak.py)."""

    cached: int = 0  # open handles in the page-cache mode
    passthrough: int = 0  # passthrough handles, and opens about to become one
    version: str = ""  # the object version the backing file holds
    backing_id: int = 0
    registering: trio.Event | None = None  # set while a backing file is being registered


@dataclass
class SharedWrite:
    """The write state of one inode, shared by every fd that writes it (POSIX: one file, many
    fds). Each fd's flush stores what the file holds then; the last release frees it."""

    writer: WriteHandle
    fhs: set[int] = field(default_factory=set)
    #: what the file's own attributes will be once stored (``MountConfig.file_metadata``):
    #: a write makes its mtime now, a utimens sets it, a chmod/chown its mode/owner
    own: FileMeta | None = None


@dataclass
class DirHandle:
    node: Node
    listing: Listing  # a snapshot: offsets stay valid while the directory changes


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self,
        config: MountConfig,
        store: DataClient,
        nursery: trio.Nursery,
        staging_dir: str = "/tmp",
    ) -> None:
        super().__init__()
        self.config = config
        self.tuning = config.tuning
        self.store = store
        self.nursery = nursery
        self.staging_dir = staging_dir
        self.meta = Meta(store, config)
        self.reader = BlockReader(store, config.tuning)
        self.reader.start(nursery)
        self.meta.first_blocks(self.reader.offer, self.reader.budget)
        self.ahead = dirahead.for_reader(self.reader, self.meta.listing_if_fresh, config.tuning, self.meta.listing)
        self.ahead.start(nursery)
        self._handles: dict[int, FileHandle | DirHandle] = {}
        self._next_fh = 1
        self._writers: dict[int, SharedWrite] = {}  # inode -> its write state, while open for writing
        self._flushing = 0  # uploads at flush/fsync/release in progress
        self._io: dict[int, _InodeIO] = {}
        #: set by ``fusefs.proc.serve.serve`` once INIT negotiated passthrough and a registrar exists
        self.passthrough: Passthrough | None = None
        self._said_owner_mode = False
        self._said_symlink = False

    # -- helpers ------------------------------------------------------------------------------
    def _new_fh(self, handle: FileHandle | DirHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _file(self, fh: int) -> FileHandle:
        h = self._handles.get(fh)
        if not isinstance(h, FileHandle):
            raise _fail(errno.EBADF)
        return h

    def _writer_of(self, inode: int | None) -> WriteHandle | None:
        shared = self._writers.get(inode) if inode is not None else None
        return shared.writer if shared is not None else None

    async def _join_writer(self, node: Node, fh: int, existing: ObjectInfo | None, truncate: bool,
                           own: FileMeta | None = None) -> WriteHandle:
        """The write state of ``node`` for a new fd ``fh``: the one other fds share, else a new one.
        ``own``: a new file's attributes (else the file's current ones)."""
        shared = self._writers.get(node.inode)
        if shared is None:
            writer = self._new_writer(node, existing, truncate)
            if self.config.file_metadata and own is None:
                own = self._current_meta(node)
            self._writers[node.inode] = SharedWrite(writer, {fh}, own)
            return writer
        shared.fhs.add(fh)  # before any await: a concurrent last release must not free it
        if truncate:
            try:
                await shared.writer.truncate(0)
            except BaseException:
                await self._leave_writer(node.inode, fh)
                raise
        return shared.writer

    async def _leave_writer(self, inode: int, fh: int) -> None:
        shared = self._writers.get(inode)
        if shared is None:
            return
        shared.fhs.discard(fh)
        if not shared.fhs:
            del self._writers[inode]
            await shared.writer.release()
            if inode in self.meta.nodes:
                self.meta.released_unstored(self.meta.nodes[inode].path)

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        shared = self._writers.get(node.inode)
        if shared is None:
            return self.meta.attributes(node)
        return self.meta.attributes(node, size=shared.writer.size, pending=shared.own)

    def _current_meta(self, node: Node) -> FileMeta:
        """The file's attributes as shown now, all of them: what is stored when one changes."""
        a = self.meta.attributes(node)
        return FileMeta(a.st_mtime_ns, a.st_mode, a.st_uid, a.st_gid)

    def _writable(self) -> None:
        if self.config.read_only:
            raise _fail(errno.EROFS)

    def _child_path(self, parent: int, name: bytes) -> str:
        pnode = self.meta.node(parent)
        if not pnode.is_dir:
            raise _fail(errno.ENOTDIR)
        text = os.fsdecode(name)
        if len(name) > 255:
            raise _fail(errno.ENAMETOOLONG)
        if not valid_name(text):
            raise _fail(errno.EINVAL)
        return join(pnode.path, text)

    def _sequential(self) -> Sequential:
        # Kernel readahead runs up to its window ahead of the reader, plus a block of our own.
        slack = self.tuning.readahead_kb * 1024 + 2 * self.tuning.block_size
        return Sequential(self.tuning.block_size, self.tuning.max_prefetch_blocks, slack)

    def _new_writer(self, node: Node, existing: ObjectInfo | None, truncate: bool) -> WriteHandle:
        return WriteHandle(self.store, self.meta.key_of(node.path), self.tuning, self.staging_dir,
                           self.nursery, existing, truncate)

    def _written(self, node: Node, info: ObjectInfo) -> None:
        """Record a version we just made visible."""
        self.meta.remember(node.path, Entry(name_of(node.path), False, info))
        node.info = info
        node.open_version = None  # the page cache may hold bytes of the previous version

    # -- metadata -----------------------------------------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not self.meta.node(parent_inode).is_dir:
            raise _fail(errno.ENOTDIR)
        node = await self.meta.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0  # a negative entry the kernel caches for entry_timeout
            neg.entry_timeout = self.meta.ttl
            return neg
        node.lookups += 1
        return self._attrs(node)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:  # type: ignore[override]
        for inode, count in inode_list:
            self.meta.forget(inode, count)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        node = self.meta.node(inode)
        if not node.is_dir and self._writer_of(inode) is None and node.info is not None and node.info.version:
            await self.meta.refresh_file(node)
        return self._attrs(node)

    @fuse_errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.meta.node(inode)
        # the mount's root has no marker of its own to keep them in (the bucket's root has no key)
        own = self.config.file_metadata and node.path != ""
        if (fields.update_mode or fields.update_uid or fields.update_gid) and not own:
            self._check_owner_mode(node, attr, fields)
        if fields.update_size:
            self._writable()
            if node.is_dir:
                raise _fail(errno.EISDIR)
            await self._truncate(node, fh, attr.st_size)
        if own and (fields.update_mode or fields.update_uid or fields.update_gid or fields.update_mtime):
            await (self._set_dir_own if node.is_dir else self._set_own)(node, attr, fields)
        # Without per-file metadata (or on the root), atime/mtime are accepted and ignored:
        # objects have only their store's time, and touch works.
        return self._attrs(node)

    async def _set_dir_own(self, node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
        """chmod, chown, utimens of a directory whose volume keeps per-file metadata: kept in its
        ``dir/`` marker's metadata. A marker is an empty object, so it is written again with the
        new metadata (a directory only implied by its keys gets one); a marker holding bytes
        (another client's) gets a metadata replace pinned to its version instead."""
        now = self._current_meta(node)
        new = now.merged(
            mode=stat.S_IFDIR | stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None, gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        if new == now:
            return
        self._writable()
        key = self.meta.dir_prefix(node.path)
        try:
            marker: ObjectInfo | None = await self.store.head(key)
        except errors.NotFoundError:
            marker = None
        if marker is not None and marker.size and marker.version:
            await self.store.set_meta(marker, new.to_store())
        else:
            await self.store.put(key, b"", new.to_store())
        self.meta.set_dir_meta(node.path, new)

    async def _set_own(self, node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
        """chmod, chown, utimens of a file whose volume keeps per-file metadata: an open writer
        stores it with the bytes; else the object's metadata is replaced (no new bytes sent)."""
        shared = self._writers.get(node.inode)
        now = shared.own if shared is not None and shared.own is not None else self._current_meta(node)
        kind = stat.S_IFMT(now.mode) if now.mode is not None else stat.S_IFREG
        new = now.merged(
            mode=kind | stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None, gid=attr.st_gid if fields.update_gid else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        if new == now:
            return
        self._writable()
        if shared is not None and (shared.writer.dirty or node.info is None or not node.info.version):
            shared.own = new  # stored at the next flush, with the bytes
            return
        await self.meta.refresh_file(node)
        info = node.info
        if info is None or not info.version:
            raise _fail(errno.ENOENT)
        stored = await self.store.set_meta(info, new.to_store())
        self._remember_meta(node, stored)
        if shared is not None:
            shared.own = new

    def _remember_meta(self, node: Node, info: ObjectInfo) -> None:
        """A new description of the same bytes (their version may still change: an S3 copy
        onto itself above the single-copy limit gets a new ETag)."""
        same = node.info is not None and node.info.version == info.version
        self.meta.remember(node.path, Entry(name_of(node.path), False, info))
        node.info = info
        if not same:
            node.open_version = None

    def _check_owner_mode(self, node: Node, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> None:
        """chmod/chown that change nothing succeed (``cp -p``, ``rsync -a`` and ``mv`` set what is
        already there); a change the volume cannot keep is EPERM, said once in the log."""
        now = self._attrs(node)
        changes = []
        if fields.update_mode and stat.S_IMODE(attr.st_mode) != stat.S_IMODE(now.st_mode):
            changes.append(f"mode {stat.S_IMODE(now.st_mode):o} -> {stat.S_IMODE(attr.st_mode):o}")
        if fields.update_uid and attr.st_uid != now.st_uid:
            changes.append(f"uid {now.st_uid} -> {attr.st_uid}")
        if fields.update_gid and attr.st_gid != now.st_gid:
            changes.append(f"gid {now.st_gid} -> {attr.st_gid}")
        if not changes:
            return
        if not self._said_owner_mode:
            self._said_owner_mode = True
            log.warning("%s: %s refused (EPERM): owner and mode are the volume's (uid/gid/fileMode/dirMode); "
                        "objects keep none of their own", node.path or "/", ", ".join(changes))
        raise _fail(errno.EPERM)

    async def _truncate(self, node: Node, fh: int | None, size: int) -> None:
        h = self._handles.get(fh) if fh is not None else None
        writer = h.writer if isinstance(h, FileHandle) and h.writer is not None else self._writer_of(node.inode)
        if writer is not None:
            await writer.truncate(size)
            node.open_version = None
            return
        await self.meta.refresh_file(node)
        existing = node.info if node.info is not None and node.info.version else None
        temp = self._new_writer(node, existing, truncate=size == 0)
        if self.config.file_metadata:  # the new version keeps the file's own attributes, mtime now
            temp.meta = replace(self._current_meta(node), mtime_ns=time.time_ns()).to_store()
        try:
            await temp.truncate(size)
            self._written(node, await temp.flush())
        finally:
            await temp.release()

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = 1 << 20
        s.f_frsize = 4096
        # Buckets have no capacity: report a large, constant one so tools that check free space
        # (cp, installers) go ahead.
        s.f_blocks = s.f_bfree = s.f_bavail = (1 << 50) // s.f_frsize
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    # -- directories --------------------------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.meta.node(inode)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        listing = await self.meta.listing(node.path)
        return self._new_fh(DirHandle(node, listing.snapshot()))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self._handles.get(fh)
        if not isinstance(h, DirHandle):
            raise _fail(errno.EBADF)
        names = h.listing.names
        for i in range(start_id, len(names)):
            entry = h.listing.entries[names[i]]
            node = self.meta.node_for(join(h.node.path, names[i]), entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attrs(node), i + 1):
                break
            node.lookups += 1  # readdirplus entries count as lookups

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._writable()
        path = self._child_path(parent_inode, name)
        if await self.meta.resolve(path) is not None:
            raise _fail(errno.EEXIST)
        # the `dir/` marker keeps it when empty, and its own attributes where the volume keeps them
        own = self._new_meta(stat.S_IFDIR | stat.S_IMODE(mode), ctx) if self.config.file_metadata else None
        marker = await self.store.put(self.meta.dir_prefix(path), b"", own.to_store() if own is not None else None)
        self.meta.dir_made(path, marker.mtime)
        if own is not None:
            self.meta.set_dir_meta(path, own)
        entry = Entry(name_of(path), True)
        self.meta.remember(path, entry)
        node = self.meta.node_for(path, entry)
        node.lookups += 1
        return self._attrs(node)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        path = self._child_path(parent_inode, name)
        entry = await self.meta.resolve(path)
        if entry is None:
            raise _fail(errno.ENOENT)
        if not entry.is_dir:
            raise _fail(errno.ENOTDIR)
        marker = self.meta.dir_prefix(path)
        page = await self.store.list(marker, "/", None, 2)
        if page.prefixes or any(o.key != marker for o in page.objects):
            raise _fail(errno.ENOTEMPTY)
        await self.store.delete(marker)
        self.meta.set_dir_meta(path, None)
        self.meta.remember(path, None)
        self.meta.invalidate_listing(path)
        self.meta.move(path, f"\0deleted:{path}")

    # -- files: namespace ---------------------------------------------------------------------
    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._writable()
        path = self._child_path(parent_inode, name)
        entry = await self.meta.resolve(path)
        if entry is None:
            raise _fail(errno.ENOENT)
        if entry.is_dir:
            raise _fail(errno.EISDIR)
        open_writer = self._writer_of(self.meta.by_path.get(path))
        if open_writer is not None:
            await open_writer.detach()  # its fds keep the bytes; its close stores nothing
        try:
            await self.store.delete(self.meta.key_of(path))
        except errors.NotFoundError:
            if open_writer is None:
                raise  # else: a new file not stored yet
        self.meta.remember(path, None)
        self.meta.move(path, f"\0deleted:{path}")

    @fuse_errors
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise _fail(errno.EINVAL)  # no atomic exchange of two objects exists
        src = self._child_path(parent_inode_old, name_old)
        dst = self._child_path(parent_inode_new, name_new)
        entry = await self.meta.resolve(src)
        if entry is None:
            raise _fail(errno.ENOENT)
        if entry.is_dir:
            # A bucket has no directories to rename: it would mean copying every key below, which
            # is neither atomic nor bounded in time for one request. EXDEV makes `mv` fall back
            # to copying the tree file by file (and deleting the source), as across filesystems.
            raise _fail(errno.EXDEV)
        target = await self.meta.resolve(dst)
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            if target.is_dir:
                raise _fail(errno.EISDIR)
        if src == dst:
            return
        moving = self.meta.by_path.get(src)
        writer = self._writer_of(moving)
        replaced = self.meta.by_path.get(dst)
        if replaced != moving and (victim := self._writer_of(replaced)) is not None:
            await victim.detach()  # the file renamed over loses its name, as on unlink
        info = await self._move_object(src, dst, writer, moving)
        self.meta.remember(src, None)
        self.meta.move(src, dst)
        self.meta.remember(dst, Entry(name_of(dst), False, info))
        if moving is not None and moving in self.meta.nodes:
            self.meta.nodes[moving].open_version = None

    async def _move_object(self, src: str, dst: str, writer: WriteHandle | None, inode: int | None = None
                           ) -> ObjectInfo:
        """Store ``src`` under ``dst``, and point an open file's write state at ``dst``: later
        writes and closes store under the new name (log rotation: open, write, rename, write)."""
        src_key, dst_key = self.meta.key_of(src), self.meta.key_of(dst)
        if writer is not None and writer.dirty:
            # Its bytes go straight to the new name: no copy of the old one.
            await writer.rekey(dst_key)
            try:
                info = await (self._upload(inode, writer) if inode is not None else writer.flush())
            except BaseException:
                await writer.rekey(src_key)
                raise
            try:
                await self.store.delete(src_key)
            except errors.NotFoundError:
                pass  # a new file, never stored under its old name
            return info
        info = await self.store.copy(src_key, dst_key)
        await self.store.delete(src_key)
        if writer is not None:
            await writer.rekey(dst_key, info)
        return info

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """A regular file is an empty object (``mknod`` of S_IFREG, what some tools use instead
        of ``creat``); device nodes, FIFOs and sockets have no object form: EPERM, as on a
        filesystem that does not support them (ENOSYS reads as a broken system call)."""
        self._writable()
        if not stat.S_ISREG(mode):
            raise _fail(errno.EPERM)
        own = self._new_meta(mode, ctx) if self.config.file_metadata else None
        return await self._put_new(self._child_path(parent_inode, name), b"", own)

    async def _put_new(self, path: str, data: bytes, own: FileMeta | None) -> pyfuse3.EntryAttributes:
        """A new object at ``path`` (EEXIST if the name is taken), stored at once."""
        if await self.meta.resolve(path) is not None:
            raise _fail(errno.EEXIST)
        info = await self.store.put(self.meta.key_of(path), data, own.to_store() if own is not None else None)
        entry = Entry(name_of(path), False, info)
        self.meta.remember(path, entry)
        node = self.meta.node_for(path, entry)
        node.lookups += 1
        return self._attrs(node)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        # An object has one key: a second name would be a copy that drifts apart from the first.
        raise _fail(errno.EPERM)

    def _new_meta(self, mode: int, ctx: pyfuse3.RequestContext) -> FileMeta:
        """A new file's attributes: its creator's, the mode as asked less the umask."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        perms = stat.S_IMODE(mode) if kind == stat.S_IFLNK else stat.S_IMODE(mode) & ~ctx.umask
        return FileMeta(time.time_ns(), kind | perms, ctx.uid, ctx.gid)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """A symlink is a small object holding its target as text, marked by S_IFLNK in its
        ``mode`` metadata (as s3fs does): only where the volume keeps per-file metadata."""
        self._writable()
        if not self.config.file_metadata:
            if not self._said_symlink:
                self._said_symlink = True
                log.warning("symlink refused (EPERM): this volume keeps no per-file metadata, where a symlink's "
                            "mark is stored (volume option fileMetadata / --file-metadata)")
            raise _fail(errno.EPERM)
        path = self._child_path(parent_inode, name)
        if len(target) > SYMLINK_MAX:
            raise _fail(errno.ENAMETOOLONG)
        return await self._put_new(path, target, self._new_meta(stat.S_IFLNK | 0o777, ctx))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.meta.node(inode)
        await self.meta.refresh_file(node)
        if not self.meta.is_symlink(node) or node.info is None:
            raise _fail(errno.EINVAL)
        if node.info.size > SYMLINK_MAX:
            raise _fail(errno.EIO)  # not a target any system accepts: someone else's object
        if not node.info.size:
            return b""
        return bytes(await self.store.get_range(node.info.key, 0, node.info.size, node.info.version or None))

    # -- files: data --------------------------------------------------------------------------
    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.meta.node(inode)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writing:
            self._writable()
        attached = not node.path.startswith("\0")
        if self._writer_of(inode) is None:
            await self.meta.refresh_file(node)  # may detach an inode that passthrough opens hold
            pinned = await self.meta.pin(node)
        else:  # reads go to the write state while it lives; after that, pinned at the first read
            pinned = node.info if node.info is not None and node.info.version else None
        self._leave_backed(inode, writing or (attached and node.path.startswith("\0")), pinned)
        handle = FileHandle(node, pinned, self._sequential())
        keep = False
        backing_id = 0
        fh = self._new_fh(handle)
        try:
            if writing:
                handle.writer = await self._join_writer(node, fh, pinned, truncate=bool(flags & os.O_TRUNC))
                node.open_version = None
            elif pinned is not None and self._writer_of(inode) is None:
                backing_id = await self._passthrough_open(inode, pinned)
                # Keep the kernel's page cache when the object is the version it cached last time.
                keep = node.open_version == pinned.version
                node.open_version = pinned.version
                if pinned.size <= self.reader.block_size:
                    self.ahead.opened(node.path)  # its directory's next files, fetched ahead
        except BaseException:
            del self._handles[fh]
            raise
        handle.mode = PASSTHROUGH if backing_id else self._ordinary_mode(inode)
        return file_info(fh, backing_id, keep, handle.mode == DIRECT, noflush=not writing)

    def _leave_backed(self, inode: int, elsewhere: bool, pinned: ObjectInfo | None) -> None:
        """An open that cannot join the inode's passthrough opens (``elsewhere``: a write, or
        the path found to name another version just now; or a pinned version not theirs):
        the kernel would fail it (EINVAL, or EBUSY for a second backing file). Unlinking the
        inode from its path and answering ESTALE makes the kernel look the path up again
        (LOOKUP_REVAL) and open a new inode, while the passthrough opens keep the old one."""
        io = self._io.get(inode)
        if io is None or not io.backing_id:
            return
        if elsewhere or pinned is None or pinned.version != io.version:
            self.meta.detach(inode)
            raise _fail(errno.ESTALE)

    def _ordinary_mode(self, inode: int) -> str:
        """The mode of an open the server answers, counted: the kernel refuses a page-cache open
        beside passthrough ones, so next to one being registered it goes direct instead."""
        io = self._io.setdefault(inode, _InodeIO())
        if io.passthrough:
            return DIRECT
        io.cached += 1
        return CACHED

    async def _passthrough_open(self, inode: int, pinned: ObjectInfo) -> int:
        """A backing id for a read-only open of ``pinned`` when its complete file is in the node
        cache and the inode's other opens allow it; else 0 (the server answers its reads)."""
        if (self.passthrough is None or not self.store.node_cache or pinned.size <= self.reader.block_size
                or not self.passthrough.available()):
            return 0
        io = self._io.setdefault(inode, _InodeIO())
        while io.registering is not None:  # join its outcome instead of racing it
            await io.registering.wait()
        if io.cached:
            return 0
        if io.passthrough:
            if io.version != pinned.version or not io.backing_id:
                return 0  # another version's file (or one being registered) backs the inode
            io.passthrough += 1
            return io.backing_id
        io.passthrough, io.version = 1, pinned.version  # reserved: read-only opens meanwhile wait
        io.registering = trio.Event()
        backing_id = 0
        try:
            # the data service registers its complete copy, if any, read-only on our connection
            backing_id = await self.store.backing_open(pinned)
        finally:
            if not backing_id:
                io.passthrough, io.version = 0, ""
            io.backing_id = backing_id
            done, io.registering = io.registering, None
            done.set()
        if backing_id:
            self.meta.backed[inode] = pinned.version
            metrics.PASSTHROUGH_OPENS.inc()
        return backing_id

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._writable()
        path = self._child_path(parent_inode, name)
        existing = await self.meta.resolve(path)
        if existing is not None and existing.is_dir:
            raise _fail(errno.EISDIR)
        # Visible in this mount at once; in the store at the first flush (close).
        own = self._new_meta(stat.S_IFREG | mode, ctx) if self.config.file_metadata else None
        # whole seconds, as stores keep them (S3): the time does not jump back once stored
        entry = Entry(name_of(path), False, ObjectInfo(self.meta.key_of(path), 0, "", float(int(time.time()))))
        self.meta.created(path, entry)
        node = self.meta.node_for(path, entry)
        node.open_version = None
        handle = FileHandle(node, None, Sequential(self.tuning.block_size, 0))
        fh = self._new_fh(handle)
        try:
            handle.writer = await self._join_writer(node, fh, None, truncate=True, own=own)
        except BaseException:
            del self._handles[fh]
            raise
        handle.mode = self._ordinary_mode(node.inode)
        node.lookups += 1
        return file_info(fh, 0, False, handle.mode == DIRECT), self._attrs(node)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._file(fh)
        writer = h.writer or self._writer_of(h.node.inode)
        if writer is not None:  # read what this mount has written, even through another handle
            return await writer.read(off, size)
        if h.info is None:
            # Opened while another fd was writing the file, which has been closed since: pin now.
            h.info = await self.meta.pin(h.node)
            if h.info is None:
                return b""
        urgent = h.seq.next_offset < 0  # the handle's first read: see BlockReader.read
        window = h.seq.observe(off, size)
        if urgent:  # answered first, with nothing else on the wire; the prefetch follows
            data = await self.reader.read(h.info, off, size, urgent=True)
        if window:
            last = (min(h.info.size, off + size) - 1) // self.reader.block_size
            self.reader.prefetch(h.info, last + 1, window)
            for index in h.seq.passed(off):
                self.reader.discard(h.info, index)
            self.reader.demote(h.info, h.seq.behind(off))
        if not urgent:
            data = await self.reader.read(h.info, off, size)
        # A memoryview of the block for most reads: pyfuse3 takes any buffer (its stub says bytes).
        return cast(bytes, data)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._file(fh)
        if h.writer is None:
            raise _fail(errno.EBADF)
        shared = self._writers.get(h.node.inode)
        if shared is not None and shared.own is not None:
            shared.own = replace(shared.own, mtime_ns=time.time_ns())
        return await h.writer.write(off, buf)

    async def _flush(self, h: FileHandle) -> None:
        if h.writer is not None and h.writer.dirty:
            self._flushing += 1
            try:
                self._written(h.node, await self._upload(h.node.inode, h.writer))
            finally:
                self._flushing -= 1

    async def _upload(self, inode: int, writer: WriteHandle) -> ObjectInfo:
        """Store what ``writer`` holds, with the file's own attributes where the volume keeps them."""
        shared = self._writers.get(inode)
        own = shared.own if shared is not None else None
        if own is not None:
            writer.meta = own.to_store()
        info = await writer.flush()
        if own is not None and info.meta != pairs_of(own.to_store()):
            # a multipart upload started before its attributes were final (cp -p sets them after
            # the last write): one metadata replace
            info = await self.store.set_meta(info, own.to_store())
        return info

    @property
    def writes_pending(self) -> bool:
        """Whether a file is open for writing or an upload is in progress (what a clean stop waits for)."""
        return bool(self._writers) or self._flushing > 0

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self._flush(self._file(fh))

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._flush(self._file(fh))

    async def _release_io(self, h: FileHandle) -> None:
        io = self._io.get(h.node.inode)
        if io is None:
            return
        if h.mode == CACHED:
            io.cached -= 1
        elif h.mode == PASSTHROUGH:
            io.passthrough -= 1
            if not io.passthrough:  # the kernel let go of the backing file with the last one
                backing_id, io.backing_id, io.version = io.backing_id, 0, ""
                self.meta.backed.pop(h.node.inode, None)
                if backing_id:
                    await self.store.backing_close(backing_id)
        if not io.cached and not io.passthrough:
            del self._io[h.node.inode]

    @fuse_errors
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if isinstance(h, FileHandle):
            await self._release_io(h)
            if h.info is not None and h.info.size <= self.reader.block_size:
                self.reader.done_with(h.info)  # read: its block goes before those fetched ahead
        if not isinstance(h, FileHandle) or h.writer is None:
            return
        try:
            await self._flush(h)  # normally done by flush(); a last chance for fds closed without it
        except errors.StoreError as exc:
            log.error("data of %s not stored: %s", h.node.path, exc)
        finally:
            await self._leave_writer(h.node.inode, fh)
