"""The directory listing cache (fusefs.fs.meta): an unlink in a big listed directory is O(1), so
``rm -rf`` of N files is O(N), not O(N^2). Work is counted, not timed: every name compare and
hash the structure does on a stored name is counted through a ``str`` subclass."""

from __future__ import annotations

import time

from fusefs.config import MountConfig
from fusefs.fs.meta import Entry, Listing, Meta
from fusefs.store.base import ObjectInfo

N = 4000


class CountingName(str):
    """A name that counts the compares and hashes done on it (list.remove, dict rebuilds...)."""

    ops = 0

    def __eq__(self, other: object) -> bool:
        CountingName.ops += 1
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        CountingName.ops += 1
        return str.__hash__(self)


def big_listing(n: int) -> Listing:
    names: list[str] = [CountingName(f"f{i:06d}") for i in range(n)]
    entries: dict[str, Entry] = {name: Entry(name, False, ObjectInfo(f"d/{name}", 1, "v", 0.0)) for name in names}
    return Listing(names, entries, time.monotonic() + 3600)


def meta_with(listing: Listing) -> Meta:
    meta = Meta(store=None, config=MountConfig(backend="s3", bucket="b"))  # type: ignore[arg-type]  # no request is made
    meta._listings["d"] = listing  # as a LIST of "d/" would have left it
    return meta


def live_names(listing: Listing) -> list[str]:
    return listing.snapshot().names


def test_unlinking_every_file_of_a_listed_directory_is_linear() -> None:
    listing = big_listing(N)
    meta = meta_with(listing)
    CountingName.ops = 0
    for i in range(N):  # rm -rf in listing order
        meta.remember(f"d/f{i:06d}", None)
    assert CountingName.ops < 10 * N, f"{CountingName.ops} name operations for {N} unlinks"
    assert live_names(listing) == [] and listing.entries == {}
    assert meta.cached("d/f000001") == (True, None)


def test_unlinking_from_the_end_is_linear_too() -> None:
    listing = big_listing(N)
    meta = meta_with(listing)
    CountingName.ops = 0
    for i in reversed(range(N)):
        meta.remember(f"d/f{i:06d}", None)
    assert CountingName.ops < 10 * N, f"{CountingName.ops} name operations for {N} unlinks"
    assert live_names(listing) == []


def test_removed_and_re_added_names_are_listed_once_in_order() -> None:
    listing = big_listing(10)
    meta = meta_with(listing)
    for i in (2, 5, 7):
        meta.remember(f"d/f{i:06d}", None)
    meta.remember("d/f000005", Entry("f000005", False, ObjectInfo("d/f000005", 2, "w", 0.0)))
    meta.remember("d/new", Entry("new", False, ObjectInfo("d/new", 3, "x", 0.0)))
    expected = [f"f{i:06d}" for i in (0, 1, 3, 4, 6, 8, 9)] + ["f000005", "new"]
    assert live_names(listing) == expected
    snap = listing.snapshot()
    assert [snap.index[n] for n in expected] == list(range(len(expected)))
    assert [listing.names[i] for i in range(len(listing.names)) if listing.live(i)] == expected
    assert listing.entries["f000005"].info is not None and listing.entries["f000005"].info.size == 2
    assert meta.cached("d/f000002") == (True, None)
    known, entry = meta.cached("d/f000005")
    assert known and entry is not None and entry.info is not None and entry.info.version == "w"
    for name in expected:  # then everything: the compaction keeps the index right
        meta.remember(f"d/{name}", None)
    assert live_names(listing) == [] and listing.index == {}
