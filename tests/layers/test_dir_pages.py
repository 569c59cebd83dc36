"""A volume that keeps per-file metadata learns a subdirectory's own attributes from a LIST of it
when its parent is listed (``Meta._prelist``), and that page becomes the subdirectory's listing
when a walk gets there: one LIST per directory, a HEAD per marker only. A page held is never
shown once this mount changed the directory, nor beyond its bound."""

from __future__ import annotations

import stat
from collections import Counter

import pytest

from fusefs.fs import meta as meta_module
from tests.layers.conftest import Fs


async def test_a_walk_lists_each_directory_once_and_heads_markers_only(meta_fs: Fs) -> None:
    fs = meta_fs
    fs.memory.put("plain/f", b"f")
    fs.memory.put("plain/sub/g", b"g")
    fs.memory.put("marked/", b"", {"mode": str(stat.S_IFDIR | 0o710), "mtime": "1000000000"})
    fs.memory.put("marked/x", b"x")
    before = Counter(fs.store.calls)
    assert await fs.readdir("") == ["marked", "plain"]
    assert fs.store.calls - before == Counter({"list": 3, "head": 1})  # the root, its two directories
    attrs = await fs.lookup("marked")
    assert (stat.S_IMODE(attrs.st_mode), attrs.st_mtime_ns) == (0o710, 1_000_000_000 * 10**9)
    assert stat.S_IMODE((await fs.lookup("plain")).st_mode) == fs.config.dir_mode
    assert await fs.readdir("plain") == ["f", "sub"]
    assert await fs.readdir("marked") == ["x"]
    assert await fs.read_file("plain/f") == b"f"
    # the two directories' listings were the pages asked with the root's; their files' GETs and
    # plain/sub's LIST came with them
    assert fs.store.calls - before == Counter({"list": 4, "head": 1, "get_first": 2})


async def test_a_file_made_after_the_page_was_asked_is_listed(meta_fs: Fs) -> None:
    fs = meta_fs
    fs.memory.put("d/old", b"o")
    assert await fs.readdir("") == ["d"]  # d's first page is held now
    await fs.write_file("d/new", b"n")
    assert await fs.readdir("d") == ["new", "old"]
    await fs.ops.unlink(await fs.inode("d"), b"old", fs.ctx)
    assert await fs.readdir("d") == ["new"]


async def test_pages_beyond_the_bound_are_asked_again(meta_fs: Fs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meta_module, "PRELISTED_KEYS", 3)
    fs = meta_fs
    for d in ("a", "b", "c"):
        for f in ("x", "y"):
            fs.memory.put(f"{d}/{f}", f.encode())
    before = Counter(fs.store.calls)
    assert await fs.readdir("") == ["a", "b", "c"]
    for d in ("a", "b", "c"):
        assert await fs.readdir(d) == ["x", "y"]
    # one of the three pages (2 keys each) is held within 3 keys: the other two are listed again
    assert (fs.store.calls - before)["list"] == 1 + 3 + 2
