"""Small files fetched ahead of readers from directory listings (``fusefs.fs.dirahead``), in
process on the in-memory store: what is fetched, how often, how much beyond what readers opened,
and which version. The store's own count of GETs per key (``FaultyStore.keys``) is the witness."""

from __future__ import annotations

import errno
import os
import random

import pyfuse3
import pytest
import trio

from fusefs.fs.dirahead import TRIGGER
from tests.layers.conftest import Fs


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def put_dir(fs: Fs, directory: str, count: int, size: int = 2000) -> dict[str, bytes]:
    files = {f"{directory}/f{i:05d}.bin": rand(size + i % 97, i) for i in range(count)}
    for path, data in files.items():
        fs.memory.put(fs.key(path), data)
    return files


def gets(fs: Fs) -> dict[str, int]:
    return {key: n for (op, key), n in fs.store.keys.items() if op == "get_range"}


async def settled(fs: Fs) -> None:
    """Until no fetch ahead is in flight (what the counts below are taken after)."""
    await fs.ops.ahead.settled()


@pytest.mark.parametrize("order", ["listing", "shuffled"])
async def test_each_file_of_a_directory_read_one_by_one_is_fetched_once(fs: Fs, order: str) -> None:
    files = put_dir(fs, "data", 300)
    await fs.readdir("data")  # the listing (a walk lists first; readers by path get it from lookups)
    paths = sorted(files)
    if order == "shuffled":
        random.Random(7).shuffle(paths)
    for path in paths:
        assert await fs.read_file(path) == files[path]
    await settled(fs)
    fetched = gets(fs)
    assert fetched == {fs.key(p): 1 for p in files}  # every file once, none twice
    assert fs.ops.ahead.used >= len(files) - fs.ops.ahead.max_files - TRIGGER  # most were there when opened


async def test_readers_by_path_with_no_listing_first_get_files_fetched_ahead(fs: Fs) -> None:
    files = put_dir(fs, "set/a", 120)
    paths = sorted(files)
    random.Random(3).shuffle(paths)
    for path in paths:  # lookups list the directory after their first misses (``Meta.resolve``)
        assert await fs.read_file(path) == files[path]
    await settled(fs)
    assert gets(fs) == {fs.key(p): 1 for p in files}
    assert fs.ops.ahead.used > 0


async def test_a_few_files_read_of_a_big_directory_pull_at_most_the_first_window(fs: Fs) -> None:
    files = put_dir(fs, "big", 1000, size=100)
    await fs.readdir("big")
    for path in sorted(files)[500:503]:
        assert await fs.read_file(path) == files[path]
    await settled(fs)
    first = fs.ops.ahead.first_files
    assert first > 0
    assert sum(gets(fs).values()) == 3 + first  # the three read and the first window, no more
    assert fs.ops.ahead.ahead[0] == first


async def test_one_file_read_fetches_nothing_ahead(fs: Fs) -> None:
    files = put_dir(fs, "one", 50)
    await fs.readdir("one")
    path = sorted(files)[10]
    assert await fs.read_file(path) == files[path]
    await settled(fs)
    assert gets(fs) == {fs.key(path): 1}


async def test_the_window_bounds_files_and_bytes_fetched_ahead_as_readers_go_on(fs: Fs) -> None:
    ahead = fs.ops.ahead
    size = 64 * 1024
    files = put_dir(fs, "wide", 400, size=size)
    await fs.readdir("wide")
    order = sorted(files)
    random.Random(5).shuffle(order)
    for opened, path in enumerate(order[:200], 1):
        assert await fs.read_file(path) == files[path]
        fetched = sum(gets(fs).values())
        assert fetched <= opened + ahead.max_files
        assert ahead.ahead[0] <= ahead.window and ahead.ahead[1] <= ahead.max_bytes
    await settled(fs)
    assert sum(gets(fs).values()) <= 200 + ahead.max_files
    assert ahead.ahead[1] <= ahead.max_bytes < 400 * size
    # the reader's memory holds a few dozen of them: files read go first, so none fetched ahead
    # was pushed out before its reader came, and none was fetched twice
    assert fs.ops.reader.budget < 200 * size
    assert max(gets(fs).values()) == 1
    assert ahead.used > 0


async def test_bigger_than_a_block_is_not_fetched_ahead(fs: Fs) -> None:
    block = fs.config.tuning.block_size
    small = put_dir(fs, "mixed", 3)
    big = {"mixed/z-big.bin": rand(block + 1, 99)}
    fs.memory.put(fs.key("mixed/z-big.bin"), big["mixed/z-big.bin"])
    await fs.readdir("mixed")
    for path in sorted(small)[:TRIGGER]:
        assert await fs.read_file(path) == small[path]
    await settled(fs)
    fetched = gets(fs)
    assert fetched.get(fs.key(sorted(small)[TRIGGER]), 0) == 1  # the small one left: fetched ahead
    assert fs.key("mixed/z-big.bin") not in fetched


async def test_a_failed_fetch_ahead_is_silent_and_the_read_retries_it(fs: Fs) -> None:
    files = put_dir(fs, "flaky", 10)
    await fs.readdir("flaky")
    paths = sorted(files)
    for path in paths[:TRIGGER - 1]:
        assert await fs.read_file(path) == files[path]
    # every GET from the next on fails until cleared: the fetches ahead give up
    fs.store.fail("get_range", times=0)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.read_file(paths[TRIGGER - 1])
    assert exc.value.errno == errno.EIO
    await settled(fs)
    fs.store.clear()
    for path in paths[TRIGGER:]:  # their fetches ahead failed: each read fetches its own
        assert await fs.read_file(path) == files[path]


async def test_a_file_changed_in_the_store_before_its_fetch_ahead_reads_as_estale_never_new_bytes(fs: Fs) -> None:
    files = put_dir(fs, "moving", 8)
    await fs.readdir("moving")  # the listing names the first versions
    paths = sorted(files)
    changed = paths[-1]
    fs.memory.put(fs.key(changed), rand(len(files[changed]), 1234))  # same size, another version
    for path in paths[:TRIGGER]:
        assert await fs.read_file(path) == files[path]
    await settled(fs)  # its fetch ahead, pinned to the listed version, failed
    inode = await fs.inode(changed)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        fh = (await fs.ops.open(inode, os.O_RDONLY, fs.ctx)).fh
        try:
            await fs.read_all(fh)
        finally:
            await fs.ops.release(fh)
    assert exc.value.errno == errno.ESTALE


@pytest.mark.parametrize("fs", [0.5], indirect=True)  # a listing expires half a second after it was made
async def test_a_file_changed_after_its_fetch_ahead_reads_as_the_version_the_mount_shows(fs: Fs) -> None:
    files = put_dir(fs, "later", 8)
    await fs.readdir("later")
    paths = sorted(files)
    for path in paths[:TRIGGER]:
        assert await fs.read_file(path) == files[path]
    await settled(fs)
    changed = paths[-1]
    assert gets(fs)[fs.key(changed)] == 1  # its old version is in memory, fetched ahead
    new = rand(len(files[changed]), 4321)
    fs.memory.put(fs.key(changed), new)
    await trio.sleep(0.6)  # the listing (and the entries) expired: the mount asks the store again
    assert await fs.read_file(changed) == new
    assert gets(fs)[fs.key(changed)] == 2


async def test_a_file_this_mount_overwrote_after_its_fetch_ahead_reads_as_what_it_wrote(fs: Fs) -> None:
    files = put_dir(fs, "mine", 8)
    await fs.readdir("mine")
    paths = sorted(files)
    for path in paths[:TRIGGER]:
        assert await fs.read_file(path) == files[path]
    await settled(fs)
    changed = paths[-1]
    new = rand(300, 77)
    await fs.write_file(changed, new)
    assert await fs.read_file(changed) == new


async def test_a_second_directory_read_after_the_first_fetches_ahead_from_its_first_file(fs: Fs) -> None:
    first = put_dir(fs, "two/a", 3)
    second = put_dir(fs, "two/b", 10)
    await fs.readdir("two/a")
    await fs.readdir("two/b")
    for path in sorted(first, reverse=True)[:TRIGGER]:  # shuffled readers, say: a directory being read
        assert await fs.read_file(path) == first[path]
    one = sorted(second)[5]
    assert await fs.read_file(one) == second[one]
    await settled(fs)
    assert all(gets(fs).get(fs.key(p)) == 1 for p in second)  # the others fetched ahead after one


async def test_a_walk_finds_the_next_directory_listed_and_its_files_fetched_when_it_gets_there(fs: Fs) -> None:
    tree = {**put_dir(fs, "walk/a", 6), **put_dir(fs, "walk/b/x", 6), **put_dir(fs, "walk/c", 6)}
    await fs.readdir("walk")
    await fs.readdir("walk/a")
    for path in sorted(p for p in tree if p.startswith("walk/a/")):
        assert await fs.read_file(path) == tree[path]
    await settled(fs)
    # walk/b holds only a directory: the walk goes on into walk/b/x, listed ahead of it
    assert fs.ops.meta.listing_if_fresh("walk/b") is not None
    assert fs.ops.meta.listing_if_fresh("walk/b/x") is not None
    assert all(gets(fs).get(fs.key(p)) == 1 for p in tree if p.startswith("walk/b/x/"))
    lists = fs.store.calls["list"]
    for directory in ("walk/b", "walk/b/x", "walk/c"):  # os.walk's order
        names = await fs.readdir(directory)
        for name in names:
            path = f"{directory}/{name}"
            if path in tree:
                assert await fs.read_file(path) == tree[path]
    await settled(fs)
    assert gets(fs) == {fs.key(p): 1 for p in tree}
    assert fs.store.calls["list"] - lists <= 1  # walk/c's, at most: the others were listed ahead


async def test_files_opened_out_of_listing_order_do_not_list_other_directories(fs: Fs) -> None:
    tree = {**put_dir(fs, "rand/a", 6), **put_dir(fs, "rand/b", 6)}
    await fs.readdir("rand")
    await fs.readdir("rand/a")
    for path in sorted((p for p in tree if p.startswith("rand/a/")), reverse=True):
        assert await fs.read_file(path) == tree[path]
    await settled(fs)
    assert fs.ops.meta.listing_if_fresh("rand/b") is None
