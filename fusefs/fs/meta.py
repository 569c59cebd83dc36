"""Inodes and directory metadata, served from LIST wherever possible.

The inode table maps paths (relative to the mount's prefix, '' is the root) to inode numbers and
back, with the kernel's lookup counts so ``forget`` can drop entries. Attributes come from
``ObjectInfo``; directories are implicit (common prefixes) or explicit (``dir/`` marker objects).

Two caches, both living for the metadata TTL:
- listings: one LIST (with delimiter, all pages) per directory. While it is fresh, lookup, getattr
  and open of its entries, and lookups of names it does not contain, cost no request;
- entries: positive and negative answers per path, filled by listings and by single lookups.
With ``fileMetadata``, a listing also asks each subdirectory's first LIST page (its ``dir/``
marker, which holds the directory's own attributes, comes back first): held until the TTL from
then, it is that subdirectory's listing when a walk gets there (``_prelist``), so a walk costs a
LIST per directory as without the option, plus a HEAD per marker on S3.
A lookup in a directory not listed asks HEAD key + LIST prefix=key/ max 1, concurrently; from
its second miss in that directory on (from the first, when the directory's parent was listed
that way: a data set read by path), it lists the directory's first page instead: a directory
that fits in one page (1,000 keys) gets its listing from it, so readers opening files by path
pay one LIST per directory instead of HEAD + LIST per file. Bigger directories stay with a request
per name + LIST; on S3 that request is a GET of the name's first ``PEEK_BYTES``, which a small
file's read then takes (``_peek_lookups``).
"""

from __future__ import annotations

import functools
import logging
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from fusefs import errors, metrics
from fusefs.config import MountConfig
from fusefs.filemeta import FileMeta
from fusefs.service.api import DataClient
from fusefs.store.base import ListPage, ObjectInfo

log = logging.getLogger(__name__)

ROOT = 1
NAME_MAX = 255
_PRUNE_AT = 200_000  # entries kept before expired ones are swept out
#: a directory's lookups that missed the caches before it is listed (its first page) instead: one
#: name looked up costs HEAD + LIST of that name, files opened by path one after another cost
#: one LIST for the directory
LIST_AFTER_MISSES = 2


_NO_META = FileMeta()
#: parallel HEADs for the metadata of one listed directory's files (S3 lists none)
META_HEADS = 16
#: keys of subdirectories' first LIST pages held for their own listings (``Meta._prelist``): a
#: listed directory of many big subdirectories that nobody walks into holds no more than this
#: (about 20 MB); pages beyond it are not kept, and their directories are listed again when
#: walked into (one more LIST each)
PRELISTED_KEYS = 50_000
#: a file no larger than this is described by a GET of its bytes instead of a HEAD where the
#: store must be asked anyway (a listed file's metadata on S3, a lookup of an unknown name): the
#: same one request, and its read then costs none. The bytes are the price when no read follows
#: (``ls -l`` of a ``fileMetadata`` volume): at most this much per file, a few milliseconds of
#: transfer against the round trip a read of it would cost. Larger files keep HEAD.
PEEK_BYTES = 256 * 1024
#: a lookup in a directory too big to be listed for lookups asks GET (first ``PEEK_BYTES``) + LIST
#: instead of HEAD + LIST (``Meta._peek_lookups``)
PEEK_LOOKUPS = True


def _hidden_reason(prefix: str, key: str) -> str:
    if not key.startswith(prefix):
        return "outside"
    name = key[len(prefix):]
    name = name[:-1] if name.endswith("/") else name
    try:
        too_long = len(name.encode("utf-8", "surrogateescape")) > NAME_MAX
    except UnicodeError:
        too_long = False
    return "too_long" if too_long and "/" not in name and name not in (".", "..") and "\0" not in name else "invalid"


@functools.lru_cache(maxsize=4096)
def _parsed(pairs: tuple[tuple[str, str], ...]) -> FileMeta:
    return FileMeta.from_store(pairs)


class UnversionedError(errors.StoreError):
    """The store names no version for an object (EIO): its bytes cannot be pinned."""


def valid_name(name: str) -> bool:
    """Whether a key segment can be shown as a directory entry."""
    if name in ("", ".", "..") or "\0" in name or "/" in name:
        return False
    try:
        return len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    except UnicodeError:
        return False


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def name_of(path: str) -> str:
    return path.rpartition("/")[2]


async def side_by_side(calls: list[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run ``calls`` concurrently, at most ``limit`` at a time. A failure comes out as the first
    store error among them: requests failing side by side in a nursery fail as a group, which the
    FUSE layer took for an unexpected error (EIO: a revoked key gave EIO, not EACCES)."""
    limiter = trio.CapacityLimiter(limit)

    async def bounded(call: Callable[[], Awaitable[None]]) -> None:
        async with limiter:
            await call()

    try:
        async with trio.open_nursery() as nursery:
            for call in calls:
                nursery.start_soon(bounded, call)
    except ExceptionGroup as group:
        raise errors.first_store_error(group) from None


@dataclass(frozen=True)
class Entry:
    name: str
    is_dir: bool
    info: ObjectInfo | None = None  # files only


@dataclass
class Listing:
    """One directory's entries in listing order (sorted like the store sorts keys, names added
    later at the end). Adding and removing a name cost O(1) amortised, so ``rm -rf`` of a big
    listed directory stays linear: a removed name stays in ``names`` as a tombstone (``index``
    no longer points at it) until tombstones are half the list, then the list is compacted."""

    names: list[str]  # may hold tombstones: use ``live`` or ``snapshot`` to walk it
    entries: dict[str, Entry]
    expires: float
    index: dict[str, int] = field(default_factory=dict)  # name -> its live position in ``names``
    _dead: int = 0

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}

    def live(self, i: int) -> bool:
        return self.index.get(self.names[i]) == i

    def put(self, name: str, entry: Entry) -> None:
        if name not in self.entries:
            self.index[name] = len(self.names)
            self.names.append(name)
        self.entries[name] = entry

    def remove(self, name: str) -> None:
        if self.entries.pop(name, None) is None:
            return
        del self.index[name]
        self._dead += 1
        if self._dead * 2 > len(self.names):
            self.names = [n for i, n in enumerate(self.names) if self.index.get(n) == i]
            self.index = {n: i for i, n in enumerate(self.names)}
            self._dead = 0

    def snapshot(self) -> Listing:
        """A copy without tombstones, for a directory handle: its offsets never move."""
        return Listing([n for i, n in enumerate(self.names) if self.index.get(n) == i], dict(self.entries),
                       self.expires)


@dataclass
class Node:
    inode: int
    path: str
    is_dir: bool
    info: ObjectInfo | None
    expires: float = 0.0  # when ``info`` must be checked against the store again
    lookups: int = 0
    open_version: str | None = None  # version at the last open: decides keep_cache


class Meta:
    def __init__(self, store: DataClient, config: MountConfig) -> None:
        self.store = store
        self.config = config
        self.prefix = config.prefix
        self.ttl = config.metadata_ttl
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, "", True, None, expires=float("inf"), lookups=1)}
        self.by_path: dict[str, int] = {"": ROOT}
        self._next_inode = ROOT + 1
        self._entries: dict[str, tuple[Entry | None, float]] = {}
        self._prune_at = _PRUNE_AT
        self._listings: dict[str, Listing] = {}
        self._listing_flights: dict[str, trio.Event] = {}
        #: directories whose first LIST page did not hold them whole: lookups there ask HEAD + LIST
        self._big_dirs: set[str] = set()
        self._misses: dict[str, int] = {}  # directory -> lookups that were not in the caches
        self._listed_for_lookups: set[str] = set()  # directories listed (first page) because of them
        self.page_keys = 1000  # keys per LIST page (the stores' maximum)
        self._conflicts_noted: set[str] = set()
        self._skips_noted: set[str] = set()
        self._unversioned_noted: set[str] = set()
        #: inode -> the version its FUSE passthrough opens read (set by ``ops``): the kernel gives
        #: such an inode no other kind of open, so a new version of its path gets a new inode
        self.backed: dict[int, str] = {}
        #: directories' times: their marker's, else their newest entry's, once listed; before
        #: that the mount's start (a bucket has no time for an implicit directory)
        self.started = time.time()
        self._dir_times: dict[str, float] = {}
        #: where a GET that described a file hands its first block (``BlockReader.offer``), and how
        #: many bytes the reader keeps in memory (``first_blocks``); None: files are HEADed
        self._offer: Callable[[ObjectInfo, bytes], bool] | None = None
        self._offer_budget = 0
        #: big directories where a lookup's GET found a file larger than ``PEEK_BYTES``: HEAD there
        self._large_files: set[str] = set()
        #: directories' own attributes from their marker's metadata (``config.file_metadata``):
        #: asked when their parent is listed or they are looked up; absent: not known (defaults)
        self._dir_meta: dict[str, FileMeta] = {}
        #: directory -> files this mount created and has not stored yet (a new file reaches the
        #: store at its first flush): merged into listings fetched meanwhile, so `ls` while a
        #: file is being written shows it, as the create's own entry does
        self._unstored: dict[str, dict[str, Entry]] = {}
        #: subdirectories' first LIST pages, asked when their parent was listed (``_prelist``) and
        #: held until their own listing takes them or the TTL from when they were asked ends
        self._prelisted: dict[str, tuple[ListPage, float]] = {}
        self._prelisted_keys = 0
        self._prelist_flights: dict[str, trio.Event] = {}
        #: directories changed by this mount while their page was being asked: it is not kept
        self._prelist_stale: set[str] = set()

    def first_blocks(self, offer: Callable[[ObjectInfo, bytes], bool], budget: int) -> None:
        """Describe small files with a GET of their bytes (``PEEK_BYTES``), handing those to
        ``offer`` (the reader, which keeps ``budget`` bytes in memory)."""
        self._offer, self._offer_budget = offer, budget

    # -- keys ---------------------------------------------------------------------------------
    def key_of(self, path: str) -> str:
        return self.prefix + path

    def dir_prefix(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    def _expiry(self) -> float:
        return time.monotonic() + self.ttl

    # -- inode table --------------------------------------------------------------------------
    def node(self, inode: int) -> Node:
        n = self.nodes.get(inode)
        if n is None:
            raise errors.NotFoundError(f"inode {inode} is not known")
        return n

    def node_for(self, path: str, entry: Entry) -> Node:
        """The node of ``path`` (created if needed), updated with ``entry``; lookups unchanged."""
        ino = self.by_path.get(path)
        if ino is not None and entry.info is not None and self._replaces_backed(ino, entry.info):
            self.detach(ino)  # its passthrough opens keep the old version; the path names the new one
            ino = None
        if ino is not None:
            n = self.nodes[ino]
            if n.is_dir == entry.is_dir:
                self._set_info(n, entry.info)
                return n
            # Changed kind (file replaced by a directory or back): a new inode.
            del self.by_path[path]
        ino = self._next_inode
        self._next_inode += 1
        n = Node(ino, path, entry.is_dir, entry.info, expires=self._expiry())
        self.nodes[ino] = n
        self.by_path[path] = ino
        return n

    def forget(self, inode: int, count: int) -> None:
        n = self.nodes.get(inode)
        if n is None or inode == ROOT:
            return
        n.lookups -= count
        if n.lookups <= 0:
            del self.nodes[inode]
            if self.by_path.get(n.path) == inode:
                del self.by_path[n.path]

    def _replaces_backed(self, inode: int, info: ObjectInfo) -> bool:
        held = self.backed.get(inode)
        return held is not None and bool(info.version) and info.version != held

    def _set_info(self, n: Node, info: ObjectInfo | None, expires: float | None = None) -> None:
        """What the store says of ``n`` now; a new version of an inode that passthrough opens
        hold detaches it instead (they read the old version's file, and so does its fstat)."""
        if info is not None and self._replaces_backed(n.inode, info):
            self.detach(n.inode)
            return
        if info is not None:
            n.info = info
        n.expires = self._expiry() if expires is None else expires

    def detach(self, inode: int) -> None:
        """Unlink ``inode`` from its path, as if the object had been replaced: the next lookup of
        the path makes a new inode, while open files of this one keep their version (attributes
        included: it is never refreshed again)."""
        n = self.nodes.get(inode)
        if n is None or n.path.startswith("\0"):
            return
        if self.by_path.get(n.path) == inode:
            del self.by_path[n.path]
        n.path = f"\0replaced:{n.path}"
        n.expires = float("inf")

    def move(self, old: str, new: str) -> None:
        """Re-point the inode of ``old`` at ``new`` (after a rename)."""
        ino = self.by_path.pop(old, None)
        stale = self.by_path.pop(new, None)
        if stale is not None and stale in self.nodes:
            self.nodes[stale].path = f"\0deleted:{new}"  # keeps open handles working, unreachable by path
        if ino is not None:
            self.nodes[ino].path = new
            self.by_path[new] = ino

    # -- attributes ---------------------------------------------------------------------------
    def file_meta(self, info: ObjectInfo | None) -> FileMeta:
        """The file's own attributes where the volume keeps them (``config.file_metadata``)."""
        if not self.config.file_metadata or info is None or not info.meta:
            return _NO_META
        return _parsed(info.meta)

    def is_symlink(self, node: Node) -> bool:
        return not node.is_dir and self.file_meta(node.info).is_symlink

    def attributes(self, node: Node, size: int | None = None, pending: FileMeta | None = None
                   ) -> pyfuse3.EntryAttributes:
        """``pending``: the attributes an open writer will store with the file (they win)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = self.ttl
        a.attr_timeout = self.ttl
        a.st_uid = self.config.uid
        a.st_gid = self.config.gid
        a.st_blksize = 1 << 20  # invites large reads and writes
        if node.is_dir:
            own = self.dir_meta(node.path)
            a.st_mode = stat.S_IFDIR | (stat.S_IMODE(own.mode) if own.mode is not None else self.config.dir_mode)
            if own.uid is not None:
                a.st_uid = own.uid
            if own.gid is not None:
                a.st_gid = own.gid
            a.st_nlink = 2
            a.st_size = 0
            mtime_ns = own.mtime_ns if own.mtime_ns is not None else int(
                self._dir_times.get(node.path, self.started) * 1e9)
        else:
            own = pending if pending is not None else self.file_meta(node.info)
            a.st_mode = stat.S_IFREG | self.config.file_mode
            if own.mode is not None:
                a.st_mode = (stat.S_IFLNK | 0o777) if own.is_symlink else stat.S_IFREG | stat.S_IMODE(own.mode)
            if own.uid is not None:
                a.st_uid = own.uid
            if own.gid is not None:
                a.st_gid = own.gid
            a.st_nlink = 1
            a.st_size = size if size is not None else (node.info.size if node.info else 0)
            mtime_ns = own.mtime_ns if own.mtime_ns is not None else int(
                (node.info.mtime if node.info else time.time()) * 1e9)
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns
        return a

    # -- caches -------------------------------------------------------------------------------
    def cached(self, path: str) -> tuple[bool, Entry | None]:
        """(known, entry) from the caches without a request; entry None means 'does not exist'."""
        now = time.monotonic()
        hit = self._entries.get(path)
        if hit is not None and hit[1] > now:
            return True, hit[0]
        listing = self._listings.get(parent_of(path)) if path else None
        if listing is not None and listing.expires > now:
            return True, listing.entries.get(name_of(path))
        return False, None

    def remember(self, path: str, entry: Entry | None) -> None:
        """Record what we know now (after a lookup or our own change) in both caches."""
        exp = self._expiry()
        self._entries[path] = (entry, exp)
        if len(self._entries) > self._prune_at:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
            # Sweep again only after as many new entries as are left: linear, even when none expire.
            self._prune_at = max(_PRUNE_AT, 2 * len(self._entries))
        unstored = self._unstored.get(parent_of(path))
        if unstored is not None and name_of(path) in unstored and (
                entry is None or entry.is_dir or (entry.info is not None and entry.info.version)):
            self._drop_unstored(path)  # stored now, or gone
        if path:
            self._page_changed(parent_of(path))
        listing = self._listings.get(parent_of(path))
        if listing is not None and path:
            if entry is None:
                listing.remove(name_of(path))
            else:
                listing.put(name_of(path), entry)
        ino = self.by_path.get(path)
        if ino is not None and entry is not None and entry.info is not None:
            self._set_info(self.nodes[ino], entry.info, exp)

    def created(self, path: str, entry: Entry) -> None:
        """A file this mount created, not in the store until its first flush."""
        self.remember(path, entry)
        self._unstored.setdefault(parent_of(path), {})[name_of(path)] = entry

    def _drop_unstored(self, path: str) -> None:
        unstored = self._unstored.get(parent_of(path))
        if unstored is not None:
            unstored.pop(name_of(path), None)
            if not unstored:
                del self._unstored[parent_of(path)]

    def released_unstored(self, path: str) -> None:
        """The last handle of a file created here is closed: what its flush did not store does not
        exist (a failed upload leaves no phantom entry in later listings)."""
        unstored = self._unstored.get(parent_of(path))
        if unstored is not None and name_of(path) in unstored:
            self._drop_unstored(path)
            self.forget_entry(path)

    def forget_entry(self, path: str) -> None:
        """Drop what the caches say of ``path``: the next lookup asks the store."""
        self._entries.pop(path, None)
        listing = self._listings.get(parent_of(path))
        if listing is not None and path:
            listing.remove(name_of(path))

    def dir_made(self, path: str, when: float) -> None:
        """A directory this mount made (its marker's time)."""
        self._dir_times[path] = when

    def dir_meta(self, path: str) -> FileMeta:
        """A directory's own attributes, from its marker (volumes that keep them; none: defaults)."""
        return self._dir_meta.get(path, _NO_META) if self.config.file_metadata else _NO_META

    def set_dir_meta(self, path: str, own: FileMeta | None) -> None:
        """What a directory's marker now holds (None: the directory is gone)."""
        self._page_changed(path)  # its marker there is the old one
        if own is None:
            self._dir_meta.pop(path, None)
        else:
            self._dir_meta[path] = own

    def invalidate_listing(self, path: str) -> None:
        self._listings.pop(path, None)
        self._page_changed(path)

    def listing_if_fresh(self, path: str) -> Listing | None:
        listing = self._listings.get(path)
        if listing is not None and listing.expires > time.monotonic():
            return listing
        return None

    # -- store requests -----------------------------------------------------------------------
    async def listing(self, path: str) -> Listing:
        """The listing of directory ``path``: from cache while fresh, else one LIST (all pages).
        Concurrent callers share one LIST."""
        while True:
            fresh = self.listing_if_fresh(path)
            if fresh is not None:
                return fresh
            flight = self._listing_flights.get(path)
            if flight is None:
                break
            await flight.wait()
            if path in self._listings:
                continue
            break  # the other caller failed: try ourselves
        flight = trio.Event()
        self._listing_flights[path] = flight
        try:
            listing = await self._list(path)
            assert listing is not None  # every page was read
            self._listings[path] = listing
            return listing
        finally:
            del self._listing_flights[path]
            flight.set()

    async def _list(self, path: str, max_pages: int = 0) -> Listing | None:
        """One directory's listing (all pages; None when ``max_pages`` were read and more are
        left: the entries read are remembered one by one, not as the directory's listing)."""
        prefix = self.dir_prefix(path)
        files: dict[str, Entry] = {}
        dirs: dict[str, Entry] = {}
        skipped: list[str] = []
        token: str | None = None
        marker: float | None = None
        pages = 0
        asked_until: float | None = None  # the TTL of a first page asked before (``_prelist``)
        while True:
            pages += 1
            if pages == 1:
                page, asked_until = await self._first_page(path)
            else:
                page = await self.store.list(prefix, "/", token, self.page_keys)
            for info in page.objects:
                name = info.key[len(prefix):]
                if name == "" and info.key == prefix:
                    marker = info.mtime  # the directory's own marker
                    if info.meta is not None and path:  # GCS listings carry its metadata
                        self._dir_meta[path] = self.file_meta(info)
                    continue
                # a key outside the prefix asked for (a store or proxy that misbehaves) is not ours
                if info.key.startswith(prefix) and valid_name(name):
                    files[name] = Entry(name, False, info)
                else:
                    skipped.append(info.key)
            for p in page.prefixes:
                name = p[len(prefix):-1]
                if p.startswith(prefix) and p.endswith("/") and valid_name(name):
                    dirs[name] = Entry(name, True)
                else:
                    skipped.append(p)
            token = page.next_token
            if not token or pages == max_pages:
                break
        if skipped:
            self._note_skipped(path, skipped)
        for name in files.keys() & dirs.keys():
            self._note_conflict(join(path, name))
        if self.config.file_metadata:
            # files' and subdirectories' requests in one fan-out, not one after the other
            await side_by_side(self._file_meta_calls(files) + self._dir_meta_calls(path, dirs), META_HEADS)
        entries = {**files, **dirs}  # a name that is both shows the directory
        for name, entry in self._unstored.get(path, {}).items():
            entries.setdefault(name, entry)  # created here, stored at its first flush
        when = marker if marker is not None else max(
            (e.info.mtime for e in files.values() if e.info is not None), default=None)
        if when is not None:
            self._dir_times[path] = when
        exp = self._expiry() if asked_until is None else min(asked_until, self._expiry())
        for name, entry in entries.items():
            self._entries[join(path, name)] = (entry, exp)
            ino = self.by_path.get(join(path, name))
            if ino is not None and entry.info is not None and not self.nodes[ino].is_dir:
                self._set_info(self.nodes[ino], entry.info, exp)
        if token:
            return None
        return Listing(sorted(entries), entries, exp)

    async def _list_if_small(self, path: str) -> None:
        """A lookup's miss in directory ``path``: one LIST page. When it holds the whole directory
        (most directories of a data set) it becomes the directory's listing, and this lookup and
        every later one there (other readers' too) cost nothing more; a bigger directory is noted
        and its lookups ask HEAD + LIST for one name from then on. Shares a listing in flight."""
        while self.listing_if_fresh(path) is None and path not in self._big_dirs:
            flight = self._listing_flights.get(path)
            if flight is not None:
                await flight.wait()
                continue
            flight = self._listing_flights[path] = trio.Event()
            try:
                listing = await self._list(path, max_pages=1)
                if listing is None:
                    if len(self._big_dirs) >= _PRUNE_AT:
                        self._big_dirs.clear()
                    self._big_dirs.add(path)
                else:
                    self._listings[path] = listing
                self._listed_for_lookups.add(path)
                if len(self._misses) >= _PRUNE_AT:
                    self._misses.clear()
                    self._listed_for_lookups.clear()
            finally:
                del self._listing_flights[path]
                flight.set()
            return

    def _file_meta_calls(self, files: dict[str, Entry]) -> list[Callable[[], Awaitable[None]]]:
        """The requests for each file's own metadata, for a store whose listing leaves it out (S3):
        one per file, each updating ``files`` (GCS listings carry it: none). Only volumes that
        keep per-file metadata pay this (``fileMetadata``). A small file's request is a GET of
        its bytes, which its read then takes instead of a GET of its own (``_small_by_get``)."""
        missing = [e for e in files.values() if e.info is not None and e.info.meta is None]
        by_get = self._small_by_get(missing)

        async def head(entry: Entry) -> None:
            assert entry.info is not None
            try:
                if entry.name in by_get:
                    info = await self._peek(entry.info.key)
                else:
                    info = await self.store.head(entry.info.key)
            except errors.NotFoundError:
                del files[entry.name]  # deleted since the listing
                return
            files[entry.name] = Entry(entry.name, False, info)

        return [functools.partial(head, entry) for entry in missing]

    def _peek_length(self) -> int:
        """The bytes a GET describing a file asks for; 0: describe files with HEAD."""
        return min(PEEK_BYTES, self.store.block_size) if self._offer is not None else 0

    def _small_by_get(self, entries: list[Entry]) -> set[str]:
        """The names among a listing's files whose description is a GET of their bytes: those no
        larger than ``PEEK_BYTES`` (and not empty: an empty object has no bytes to read). Without
        a node cache to keep them, only as many as half the reader's memory holds: blocks the
        memory LRU dropped before the walk reached them would cost a second GET each."""
        length = self._peek_length()
        if not length:
            return set()
        room = float("inf") if self.store.node_cache else self._offer_budget / 2
        chosen: set[str] = set()
        for entry in entries:
            size = entry.info.size if entry.info is not None else 0
            if 0 < size <= length and size <= room:
                chosen.add(entry.name)
                room -= size
        return chosen

    def _peek_lookups(self, parent: str) -> bool:
        """Whether a lookup in directory ``parent`` asks a GET of the name's first bytes instead
        of a HEAD (``PEEK_LOOKUPS``): on S3 (a GCS GET's answer carries no custom metadata: two
        requests there), in a directory too big to be listed for its lookups, where every name
        read by path costs a request of its own and a small file's read can take its bytes;
        not once a GET there found a file larger than ``PEEK_BYTES`` (a directory of large
        files: HEAD, nothing fetched that the reads do not use). Elsewhere a lookup keeps HEAD:
        a directory is listed at its first or second miss, after which its lookups cost nothing,
        and a large file looked up (a model's weights, served from the node cache) costs no bytes."""
        return (PEEK_LOOKUPS and self.config.backend == "s3" and parent in self._big_dirs
                and parent not in self._large_files and self._peek_length() > 0)

    def _note_large_files(self, parent: str) -> None:
        if len(self._large_files) >= _PRUNE_AT:
            self._large_files.clear()
        self._large_files.add(parent)

    async def _peek(self, key: str) -> ObjectInfo:
        """A GET of ``key``'s first bytes that describes it as HEAD would; a whole first block goes
        to the reader under the version the GET answered."""
        info, data = await self.store.peek(key, self._peek_length())
        if data and self._offer is not None:
            self._offer(info, data)
        return info

    def _dir_meta_calls(self, path: str, dirs: dict[str, Entry]) -> list[Callable[[], Awaitable[None]]]:
        """The requests for each subdirectory's own attributes (a listing shows a subdirectory as
        a common prefix only, on S3 and GCS alike): a LIST of its first page each (``_prelist``),
        which tells whether it has a ``dir/`` marker and which its own listing then takes. Only
        volumes that keep per-file metadata ask them."""
        return [functools.partial(self._prelist, join(path, name)) for name in dirs]

    async def _prelist(self, path: str) -> None:
        """Directory ``path``'s own attributes, asked when its parent is listed: a LIST of its first
        page rather than a HEAD of its marker. The marker, when there is one, comes back first
        (nothing under the prefix sorts before it): a GCS listing carries its metadata, on S3 one
        HEAD asks for it; a directory without one (most data other tools wrote) needs nothing
        more. The page is held for the directory's own listing (``_first_page``), which a walk
        asks next: a walk costs a LIST per directory, as without per-file metadata, and a HEAD
        per marker on S3. A directory listed already (or being listed) is asked with a HEAD."""
        if (self.listing_if_fresh(path) is not None or path in self._listing_flights
                or path in self._prelist_flights):
            await self._head_marker(path)
            return
        prefix = self.dir_prefix(path)
        flight = self._prelist_flights[path] = trio.Event()
        self._prelist_stale.discard(path)
        until = self._expiry()  # from when it is asked, as a listing's
        try:
            page = await self.store.list(prefix, "/", None, self.page_keys)
            if path not in self._prelist_stale:
                self._keep_prelisted(path, page, until)
        finally:
            self._prelist_stale.discard(path)
            del self._prelist_flights[path]
            flight.set()
        first = page.objects[0] if page.objects else None
        if first is not None and first.key == prefix:
            await self._head_marker(path, first)
        else:
            self._dir_meta[path] = _NO_META  # only implied by its keys

    async def _first_page(self, path: str) -> tuple[ListPage, float | None]:
        """The first LIST page of directory ``path``: the one asked when its parent was listed,
        while fresh (with the end of its TTL), else asked now."""
        flight = self._prelist_flights.get(path)
        if flight is not None:
            await flight.wait()  # asked already: not twice
        held = self._drop_prelisted(path)
        if held is not None and held[1] > time.monotonic():
            return held
        return await self.store.list(self.dir_prefix(path), "/", None, self.page_keys), None

    def _keep_prelisted(self, path: str, page: ListPage, until: float) -> None:
        self._drop_prelisted(path)
        keys = len(page.objects) + len(page.prefixes)
        if self._prelisted_keys + keys > PRELISTED_KEYS:
            now = time.monotonic()
            for old in [p for p, (_, ends) in self._prelisted.items() if ends <= now]:
                self._drop_prelisted(old)
            if self._prelisted_keys + keys > PRELISTED_KEYS:
                return  # those held are the ones a walk reaches first: this one is listed again
        self._prelisted[path] = (page, until)
        self._prelisted_keys += keys

    def _drop_prelisted(self, path: str) -> tuple[ListPage, float] | None:
        held = self._prelisted.pop(path, None)
        if held is not None:
            self._prelisted_keys -= len(held[0].objects) + len(held[0].prefixes)
        return held

    def _page_changed(self, path: str) -> None:
        """Directory ``path`` changed here: a first page of it asked before would hide that."""
        self._drop_prelisted(path)
        if path in self._prelist_flights:
            self._prelist_stale.add(path)

    async def _head_marker(self, path: str, marker: ObjectInfo | None = None) -> None:
        """Remember directory ``path``'s own attributes: from ``marker`` (its ``dir/`` object as
        listed) when that carries metadata, else from a HEAD of the marker."""
        if marker is None or marker.meta is None:
            try:
                marker = await self.store.head(self.dir_prefix(path))
            except errors.NotFoundError:
                self._dir_meta[path] = _NO_META  # only implied by its keys
                return
        self._dir_meta[path] = self.file_meta(marker)

    def _note_skipped(self, path: str, keys: list[str]) -> None:
        """One warning per directory (not per key, not per listing) for keys that cannot be shown
        as names inside the mount: empty segments ('a//b', a leading '/'), '.', '..', names over
        255 bytes, NUL, keys outside the prefix listed. They stay in the store, out of the tree."""
        log.debug("skipping keys under %r: %r", self.dir_prefix(path), keys[:100])
        if path in self._skips_noted:
            return
        self._skips_noted.add(path)
        prefix = self.dir_prefix(path)
        for key in keys:
            metrics.HIDDEN_KEYS.labels(_hidden_reason(prefix, key)).inc()
        log.warning("%d key(s) under %r cannot be shown as file names (an empty segment, '.', '..', NUL or "
                    "a name over %d bytes) and are skipped, e.g. %r", len(keys), self.dir_prefix(path),
                    NAME_MAX, keys[0][:300])

    def _note_conflict(self, path: str) -> None:
        if path not in self._conflicts_noted:
            self._conflicts_noted.add(path)
            log.warning("%r is both an object and a directory prefix: showing the directory", path)

    async def resolve(self, path: str) -> Entry | None:
        """What ``path`` is: from the caches, else from one LIST page of its directory (a whole small
        directory), else with HEAD (or a GET of the first bytes: ``_peek_lookups``) + LIST (max 1)
        in parallel."""
        if path == "":
            return Entry("", True)
        known, entry = self.cached(path)
        if known:
            return entry
        parent = parent_of(path)
        misses = self._misses[parent] = self._misses.get(parent, 0) + 1
        # A directory whose parent was listed for its lookups is one more of a data set read by
        # path: listed at its first miss. (With no caching a listing would answer nothing after it.)
        if self.ttl > 0 and (misses >= LIST_AFTER_MISSES or parent in self._listing_flights
                             or (parent != "" and parent_of(parent) in self._listed_for_lookups)):
            await self._list_if_small(parent)
            known, entry = self.cached(path)
            if known:
                return entry
        key = self.key_of(path)
        head: list[ObjectInfo | None] = [None]
        is_dir = [False]
        marker: list[ObjectInfo | None] = [None]

        async def do_head() -> None:
            try:
                if self._peek_lookups(parent):
                    head[0] = info = await self._peek(key)
                    if info.size > self._peek_length():
                        self._note_large_files(parent)
                else:
                    head[0] = await self.store.head(key)
            except errors.NotFoundError:
                pass

        async def do_list() -> None:
            page = await self.store.list(key + "/", "/", None, 1)
            is_dir[0] = bool(page.objects or page.prefixes)
            if page.objects and page.objects[0].key == key + "/":
                marker[0] = page.objects[0]  # listed first: nothing sorts before it

        await side_by_side([do_head, do_list], 2)
        name = name_of(path)
        if is_dir[0]:
            if head[0] is not None:
                self._note_conflict(path)
            entry = Entry(name, True)
            if self.config.file_metadata:  # its own attributes: a HEAD of its marker on S3, none on GCS
                if marker[0] is None:
                    self._dir_meta[path] = _NO_META
                else:
                    await self._head_marker(path, marker[0])
        elif head[0] is not None:
            entry = Entry(name, False, head[0])
        else:
            entry = None
        self.remember(path, entry)
        return entry

    async def refresh_file(self, node: Node) -> None:
        """Make ``node.info`` no older than the TTL (HEAD when it is)."""
        if node.is_dir or node.expires > time.monotonic():
            return
        known, entry = self.cached(node.path)
        if known and entry is not None and not entry.is_dir:
            self._set_info(node, entry.info)
            return
        await self.head_file(node)

    async def head_file(self, node: Node) -> ObjectInfo:
        """HEAD the file now; remember and return what the store says."""
        try:
            info = await self.store.head(self.key_of(node.path))
        except errors.NotFoundError:
            self.remember(node.path, None)
            raise
        self.remember(node.path, Entry(name_of(node.path), False, info))
        self._set_info(node, info)
        return info

    async def pin(self, node: Node) -> ObjectInfo | None:
        """The version reads of ``node`` are pinned to (None: an empty object, nothing to read).
        A listing may carry no version (an S3 LIST without ETags): then one HEAD asks for it. A
        store that gives none at all cannot be read safely (blocks of two versions could mix),
        so that is an error, never bytes of an unknown version."""
        info = node.info
        if info is None or not info.version:
            info = await self.head_file(node)
        if info.version:
            return info
        if info.size == 0:
            return None
        err = UnversionedError(
            f"{info.key}: the store gives no version (ETag or generation) for this object, so it "
            "cannot be read consistently; check the store or the proxy in front of it", key=info.key)
        if info.key not in self._unversioned_noted:  # once per key: an operator's problem
            self._unversioned_noted.add(info.key)
            log.warning("%s", err)
        raise err

    async def lookup(self, parent: int, name: str) -> Node | None:
        """Resolve ``name`` in directory ``parent``; None if it does not exist. Does not count."""
        pnode = self.node(parent)
        if not pnode.is_dir:
            raise errors.StoreError("not a directory")  # mapped to ENOTDIR by the caller
        if name == ".":
            return pnode
        if name == "..":
            up = parent_of(pnode.path)
            ino = self.by_path.get(up)
            return self.nodes[ino] if ino is not None else self.node_for(up, Entry(name_of(up), True))
        if not valid_name(name):
            return None
        path = join(pnode.path, name)
        entry = await self.resolve(path)
        if entry is None:
            return None
        return self.node_for(path, entry)
