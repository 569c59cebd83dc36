"""A GET that describes a file (``DataClient.peek``) hands its bytes to the reader as block 0 of
the version that GET returned, never of the version a listing named before it: an object replaced
between the LIST and the GET is shown, and read, as the new version only."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from fusefs.fs import meta as meta_module
from fusefs.store.base import ObjectInfo
from fusefs.store.memory import MemoryStore
from tests.layers.conftest import Fs


@dataclass
class Replacing:
    """Replaces ``key`` with ``data`` just before the store answers the next GET of its first bytes:
    a writer elsewhere that won the race against this mount's LIST."""

    memory: MemoryStore
    key: str
    data: bytes
    done: bool = False

    def wrap(self, get_first: Callable[[str, int], tuple[ObjectInfo, bytes]]
             ) -> Callable[[str, int], tuple[ObjectInfo, bytes]]:
        def replaced_first(key: str, length: int) -> tuple[ObjectInfo, bytes]:
            if key == self.key and not self.done:
                self.done = True
                self.memory.put(key, self.data)
            return get_first(key, length)
        return replaced_first


def blocks_of(fs: Fs, key: str) -> dict[str, bytes]:
    """version -> bytes of block 0 of ``key`` in the reader's memory."""
    return {version: bytes(data) for (k, version, index), data in fs.ops.reader._lru.items()
            if k == key and index == 0}


async def test_a_listed_file_is_described_and_read_with_one_get(meta_fs: Fs) -> None:
    fs = meta_fs
    fs.memory.put("d/a", b"alpha" * 100, {"mtime": "1000000000.5", "mode": "33152"})  # 0o100600
    await fs.inode("d")
    before = Counter(fs.store.calls)
    assert await fs.readdir("d") == ["a"]
    attrs = await fs.lookup("d/a")
    assert attrs.st_mtime_ns == 1_000_000_000_500_000_000 and attrs.st_mode == 0o100600
    assert await fs.read_file("d/a") == b"alpha" * 100
    assert fs.store.calls - before == Counter({"list": 1, "get_first": 1})


async def test_the_block_is_the_version_the_get_returned(meta_fs: Fs, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = meta_fs
    old, new = b"o" * 300, b"N" * 120
    listed = fs.memory.put("d/f", old)
    race = Replacing(fs.memory, "d/f", new)
    monkeypatch.setattr(fs.memory, "get_first", race.wrap(fs.memory.get_first))
    assert await fs.readdir("d") == ["f"]  # the LIST saw ``old``; the GET that described it, ``new``
    assert race.done
    current = fs.memory.head("d/f")
    assert current.version != listed.version
    assert blocks_of(fs, "d/f") == {current.version: new}  # nothing kept under the listed version
    assert (await fs.lookup("d/f")).st_size == len(new)
    assert await fs.read_file("d/f") == new
    assert fs.store.calls["get_range"] == 0  # the read took the GET's block


async def test_a_file_grown_past_the_get_is_read_by_blocks(meta_fs: Fs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listed small, larger than the GET asked for by the time it answered: its first bytes are
    not a whole block, so the reader gets nothing and reads the file (that version) itself."""
    fs = meta_fs
    fs.memory.put("d/g", b"small")
    big = bytes(range(256)) * ((meta_module.PEEK_BYTES + 4096) // 256)
    race = Replacing(fs.memory, "d/g", big)
    monkeypatch.setattr(fs.memory, "get_first", race.wrap(fs.memory.get_first))
    assert await fs.readdir("d") == ["g"]
    assert blocks_of(fs, "d/g") == {}
    assert (await fs.lookup("d/g")).st_size == len(big)
    assert await fs.read_file("d/g") == big
    assert fs.store.calls["get_range"] >= 1


async def test_a_lookup_by_path_in_a_big_directory_is_a_get_that_serves_the_read(meta_fs: Fs) -> None:
    """A directory bigger than a LIST page is not listed for its lookups: each name read by path
    there asks the store, with a GET of its first bytes (and a LIST of ``name/`` beside it)
    instead of a HEAD, and the read of a small file that follows costs no request. Once such a
    GET found a large file there, lookups in that directory go back to HEAD."""
    fs = meta_fs
    fs.ops.meta.page_keys = 2  # "big" holds more than one page
    for name in ("a", "b", "c"):
        fs.memory.put(f"big/{name}", name.encode() * 10)
    data = b"by path" * 1000
    fs.memory.put("big/x", data)
    fs.memory.put("big/y", bytes(meta_module.PEEK_BYTES + 1))
    fs.memory.put("big/z", b"zz")
    assert (await fs.lookup("big/a")).st_size == 10  # the first miss: HEAD + LIST
    assert (await fs.lookup("big/b")).st_size == 10  # the second: a LIST page, not all of "big"
    before = Counter(fs.store.calls)
    assert (await fs.lookup("big/x")).st_size == len(data)
    assert await fs.read_file("big/x") == data
    assert fs.store.calls - before == Counter({"get_first": 1, "list": 1})
    assert blocks_of(fs, "big/x") == {fs.memory.head("big/x").version: data}
    before = Counter(fs.store.calls)
    assert (await fs.lookup("big/y")).st_size == meta_module.PEEK_BYTES + 1  # a large file: its bytes wait
    assert blocks_of(fs, "big/y") == {}
    assert (await fs.lookup("big/z")).st_size == 2  # ... and HEAD from now on in "big"
    assert fs.store.calls - before == Counter({"get_first": 1, "head": 1, "list": 2})


async def test_a_first_lookup_elsewhere_keeps_head(meta_fs: Fs) -> None:
    """Outside big directories a lookup's HEAD stays: the directory gets listed after a miss or
    two, and a large file looked up (a model's weights) costs no bytes it does not use."""
    fs = meta_fs
    fs.memory.put("m/w.bin", bytes(3 * meta_module.PEEK_BYTES))
    await fs.inode("m")
    before = Counter(fs.store.calls)
    assert (await fs.lookup("m/w.bin")).st_size == 3 * meta_module.PEEK_BYTES
    assert fs.store.calls - before == Counter({"head": 1, "list": 1})
