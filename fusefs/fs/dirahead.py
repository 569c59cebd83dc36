"""Small files fetched ahead of their readers, driven by directory listings.

A data set of small files is read one file per open: by a walk (in listing order) or by data
loader workers opening paths from a shuffled index. Each open's read would wait one round trip
for its GET. Once a directory's listing is known and readers have opened ``TRIGGER`` distinct
files of it (in any order), its other small files (objects of at most one block: one GET each)
are fetched ahead of them, ``in_flight`` GETs at a time, into the ``BlockReader``'s memory (where
reads find them), in listing order from the last file opened: what a walk reads next, and for
shuffled readers the directory's files not read yet.

The waste is bounded: files fetched ahead and not opened yet, over all directories, never exceed
the window, in files and in bytes. The window in files starts at ``first_files`` and grows with
what readers have opened (as a kernel's readahead grows with a sequential reader), up to
``max_files``; so a reader who opens 3 files of a 100,000-file directory pulls at most
``3 + first_files`` objects, and a data loader reading a whole data set gets the full window. The
bytes bound keeps the fetched-ahead blocks to a part of the reader's memory LRU, so they neither
push out what a reader is using nor each other before they are read.

A directory's state is dropped (its fetched-ahead files leave the window) when its listing is no
longer the one it was built from (expired, re-listed, invalidated) or its readers have opened
nothing for ``IDLE`` seconds: fetching ahead stops with the readers. A failed fetch ahead is
silent: the reader's own read retries it and reports. Each fetch is of the version the listing
names; an object changed since fails its pinned GET (ObjectChangedError), exactly as a read would.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from fusefs import errors
from fusefs.config import MiB, Tuning
from fusefs.fs.meta import Listing, join, name_of, parent_of
from fusefs.fs.read import BlockReader
from fusefs.store.base import ObjectInfo

#: distinct files opened in a directory before its other files are fetched ahead
TRIGGER = 2
#: seconds without an open in a directory before its state (and its share of the window) is dropped
IDLE = 5.0
#: directories followed at once (the oldest is dropped beyond this)
MAX_DIRS = 256
#: the window's most files: with shuffled readers, the chance that a file is there when opened is
#: about the window over the files left unread (e.g. 512 of 2,000: a quarter at the start)
MAX_FILES = 512
#: the window's most bytes, and its share of the reader's memory LRU (the rest holds sequential
#: readers' windows and files read): files fetched ahead must still be there when opened
MAX_BYTES = 32 * MiB
LRU_SHARE = 0.4
#: directories a walk's next one is looked for through (those holding only directories are passed)
WALK_LISTS = 4
#: GETs in flight ahead of readers: at a 20 ms round trip, 32 keep ~1,600 files/s coming
IN_FLIGHT = 32


@dataclass
class _Dir:
    listing: Listing  # the listing this state follows: another one (or none) ends it
    opened: set[str] = field(default_factory=set)  # names readers opened
    issued: set[str] = field(default_factory=set)  # names fetched ahead (or found in memory)
    ahead: dict[str, int] = field(default_factory=dict)  # fetched ahead, not opened yet: name -> bytes
    pos: int = 0  # the next listing position to consider
    scanned: int = 0  # positions considered: the whole listing once, from where fetching started
    last_open: float = 0.0
    active: bool = False  # TRIGGER files opened: fetching ahead
    last_index: int = -1  # listing position of the last file opened
    in_order: bool = True  # every file opened after the one before it in listing order: a walk
    walked_on: bool = False  # the walk's next directory was looked for from here


class DirAhead:
    """One per server. ``opened`` is its input (a small file opened for reading); it fetches
    through ``reader`` in tasks of ``nursery``, asking ``listing_of`` for a directory's listing
    (the fresh one, or None: nothing is fetched from a listing not known or expired)."""

    def __init__(self, reader: BlockReader, listing_of: Callable[[str], Listing | None], *,
                 first_files: int, max_files: int, max_bytes: int, in_flight: int,
                 list_dir: Callable[[str], Awaitable[Listing]] | None = None) -> None:
        self.reader = reader
        self.listing_of = listing_of
        #: lists a directory (one LIST, shared with other callers): the walk's next one, ahead of it
        self.list_dir = list_dir
        self._walking = False  # a walk's next directory is being listed
        self.small = reader.block_size
        self.first_files = max(0, min(first_files, max_files))
        self.max_files = max(0, max_files)
        self.max_bytes = max(0, max_bytes)
        self.in_flight_max = max(1, in_flight)
        self._nursery: trio.Nursery | None = None
        self._dirs: dict[str, _Dir] = {}  # by last open, oldest first
        self._work: dict[str, _Dir] = {}  # those fetching ahead with files left to consider, likewise
        self._ahead_files = 0
        self._ahead_bytes = 0
        self._in_flight = 0
        self._tasks = 0  # fetches and listings ahead in flight
        self._idle = trio.Event()  # set while none is
        self._idle.set()
        self._active = 0  # directories fetched ahead in
        self._consumed = 0  # files opened in followed directories: how far the window has grown
        # figures for stats and tests
        self.fetched = 0  # fetches ahead started
        self.used = 0  # files opened that had been fetched ahead

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    @property
    def window(self) -> int:
        """Files that may be fetched ahead and not opened, now."""
        return min(self.max_files, max(self.first_files, self._consumed))

    @property
    def in_flight(self) -> int:
        """Fetches ahead not answered yet."""
        return self._in_flight

    async def settled(self) -> None:
        """Until no fetch or listing ahead is in flight (those started meanwhile too)."""
        while not self._idle.is_set():
            await self._idle.wait()

    def _busy(self, change: int) -> None:
        if not self._tasks and change > 0:
            self._idle = trio.Event()
        self._tasks += change
        if not self._tasks:
            self._idle.set()

    @property
    def ahead(self) -> tuple[int, int]:
        """(files, bytes) fetched ahead and not opened yet."""
        return self._ahead_files, self._ahead_bytes

    # -- input --------------------------------------------------------------------------------
    def opened(self, path: str) -> None:
        """A reader opened the small file ``path`` for reading."""
        if self.max_files == 0 or self._nursery is None:
            return
        directory, name = parent_of(path), name_of(path)
        listing = self.listing_of(directory)
        if listing is None or name not in listing.entries:
            self._drop(directory)
            return
        now = time.monotonic()
        state = self._dirs.pop(directory, None)
        if state is not None and state.listing is not listing:
            self._work.pop(directory, None)
            self._release(state)
            state = None
        if state is None:
            state = _Dir(listing)
            while len(self._dirs) >= MAX_DIRS:
                self._drop(next(iter(self._dirs)))
        self._dirs[directory] = state  # the most recently opened last
        state.last_open = now
        index = listing.index.get(name, -1)
        if index < state.last_index:
            state.in_order = False
        state.last_index = index
        if name not in state.opened:
            state.opened.add(name)
            size = state.ahead.pop(name, None)
            if size is not None:
                self._ahead_files -= 1
                self._ahead_bytes -= size
                self.used += 1
            if state.active or len(state.opened) >= self._trigger(state):
                self._consumed += 1
        if not state.active and len(state.opened) >= self._trigger(state):
            state.active = True
            self._active += 1
            state.pos = listing.index.get(name, 0) + 1
        if state.active and state.scanned < len(listing.names):
            self._work.pop(directory, None)
            self._work[directory] = state  # the most recently opened last
        self._fill(now)

    def _trigger(self, state: _Dir) -> int:
        """Files to open in a directory before fetching ahead there: ``TRIGGER``, or the first one
        while readers are reading another directory's files this way (a walk going on to the next
        directory, shuffled readers reaching one more directory of their data set)."""
        return 1 if self._active - state.active > 0 else TRIGGER

    # -- fetching -----------------------------------------------------------------------------
    def _drop(self, directory: str) -> None:
        self._work.pop(directory, None)
        state = self._dirs.pop(directory, None)
        if state is not None:
            self._release(state)

    def _release(self, state: _Dir) -> None:
        self._ahead_files -= len(state.ahead)
        self._ahead_bytes -= sum(state.ahead.values())
        state.ahead.clear()
        self._active -= state.active
        state.active = False
        if not self._dirs:
            self._consumed = 0  # nobody reading: the window starts small again

    def _fill(self, now: float) -> None:
        """Start fetches ahead while the window and the GETs in flight allow."""
        if self._nursery is None:
            return
        while self._dirs:  # oldest first: drop those whose readers went away
            oldest, state = next(iter(self._dirs.items()))
            if now - state.last_open <= IDLE:
                break
            self._drop(oldest)
        # the most recently opened directory first: a walk's, or the one readers are in now
        window = self.window
        for directory in reversed(list(self._work)):
            if self._in_flight >= self.in_flight_max or self._ahead_files >= window:
                return
            state = self._work[directory]
            if self.listing_of(directory) is not state.listing:
                self._drop(directory)
                continue
            while self._in_flight < self.in_flight_max and self._ahead_files < window:
                found = self._next(state)
                if found is None:
                    del self._work[directory]  # every file considered
                    break
                name, info = found
                if self._ahead_bytes + info.size > self.max_bytes:
                    state.pos -= 1  # the bytes window is full: this file waits for readers
                    state.scanned -= 1
                    return
                state.issued.add(name)
                if self.reader.has(info.key, info.version, 0):
                    continue  # in memory or on its way already: no GET of ours
                state.ahead[name] = info.size
                self._ahead_files += 1
                self._ahead_bytes += info.size
                self._in_flight += 1
                self._busy(1)
                self.fetched += 1
                self._nursery.start_soon(self._fetch, state, name, info)
        self._walk_on()

    # -- a walk's next directory -------------------------------------------------------------
    def _walk_on(self) -> None:
        """A walk (files opened in listing order) whose directory has all its files fetched or
        on their way, with room left in the window: list the directory it goes to next, so
        that directory's listing and first files are there when it arrives."""
        if self._walking or self.list_dir is None or self._nursery is None or not self._dirs:
            return
        directory, state = next(reversed(self._dirs.items()))
        if (not state.active or not state.in_order or state.walked_on or directory in self._work
                or self._ahead_files >= self.window):
            return
        state.walked_on = True
        self._walking = True
        self._busy(1)
        self._nursery.start_soon(self._list_next, directory)

    async def _list_next(self, directory: str) -> None:
        assert self.list_dir is not None
        try:
            for _ in range(WALK_LISTS):
                following = self._following(directory)
                if following is None:
                    return
                listing = await self.list_dir(following)
                directory = following
                if any(e.info is not None and not e.is_dir for e in listing.entries.values()):
                    state = _Dir(listing, active=True, last_open=time.monotonic())
                    self._drop(directory)
                    while len(self._dirs) >= MAX_DIRS:
                        self._drop(next(iter(self._dirs)))
                    self._dirs[directory] = state
                    self._work[directory] = state
                    self._active += 1
                    return
        except errors.StoreError:
            return  # the walk lists it itself when it gets there, and reports
        finally:
            self._walking = False
            self._busy(-1)
            self._fill(time.monotonic())

    def _following(self, directory: str) -> str | None:
        """The directory a walk (top-down, in listing order, as ``os.walk`` and ``find`` go)
        enters after ``directory``'s files, as far as fresh listings tell; None at the end or
        where a listing is not known."""
        listing = self.listing_of(directory)
        if listing is None:
            return None
        sub = _first_dir(listing, 0)
        if sub is not None:
            return join(directory, sub)
        while directory:
            parent = parent_of(directory)
            above = self.listing_of(parent)
            index = above.index.get(name_of(directory)) if above is not None else None
            if above is None or index is None:
                return None
            sibling = _first_dir(above, index + 1)
            if sibling is not None:
                return join(parent, sibling)
            directory = parent
        return None

    def _next(self, state: _Dir) -> tuple[str, ObjectInfo] | None:
        """The next file of the directory to fetch ahead: in listing order from where fetching
        started, once round; None when every position was considered."""
        listing = state.listing
        n = len(listing.names)
        while state.scanned < n:
            i = state.pos % n
            state.pos = i + 1
            state.scanned += 1
            if not listing.live(i):
                continue
            name = listing.names[i]
            if name in state.opened or name in state.issued:
                continue
            entry = listing.entries.get(name)
            info = entry.info if entry is not None else None
            if info is not None and info.version and 0 < info.size <= self.small:
                return name, info
        return None

    async def _fetch(self, state: _Dir, name: str, info: ObjectInfo) -> None:
        try:
            ok = await self.reader.fetch_ahead(info, 0)
        finally:
            self._in_flight -= 1
            self._busy(-1)
        if not ok and state.ahead.pop(name, None) is not None:
            self._ahead_files -= 1  # nothing held: it does not count as fetched ahead
            self._ahead_bytes -= info.size
        self._fill(time.monotonic())



def _first_dir(listing: Listing, start: int) -> str | None:
    """The first directory of ``listing`` from position ``start`` on."""
    for i in range(start, len(listing.names)):
        if listing.live(i):
            entry = listing.entries.get(listing.names[i])
            if entry is not None and entry.is_dir:
                return entry.name
    return None


def for_reader(reader: BlockReader, listing_of: Callable[[str], Listing | None], tuning: Tuning,
               list_dir: Callable[[str], Awaitable[Listing]] | None = None) -> DirAhead:
    """The server's ``DirAhead``: its first window ``tuning.small_file_prefetch`` files (0: none
    fetched ahead), its bytes a share of the reader's memory."""
    return DirAhead(reader, listing_of, first_files=tuning.small_file_prefetch,
                    max_files=MAX_FILES if tuning.small_file_prefetch > 0 else 0,
                    max_bytes=min(MAX_BYTES, int(reader.budget * LRU_SHARE)),
                    in_flight=min(IN_FLIGHT, tuning.max_concurrent_requests), list_dir=list_dir)
