"""The block reader and the metadata layer without FUSE, against a real ``rclone serve s3`` behind
the counting proxy: single flight, the memory bound, version pinning, listing-driven lookups."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from fusefs import errors
from fusefs.config import MiB, MountConfig, Tuning
from fusefs.fs.meta import Meta
from fusefs.fs.read import BlockReader, Sequential
from fusefs.service.local import LocalData
from fusefs.store import AsyncStore, open_store
from fusefs.store.base import ObjectInfo
from testing.proxy import CountingProxy
from testing.servers import RcloneS3


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def config(s3_config: MountConfig, counting_proxy: CountingProxy) -> MountConfig:
    return dataclasses.replace(s3_config, endpoint_url=counting_proxy.endpoint, cache_dir=None,
                               tuning=Tuning(block_size=1 * MiB, memory_blocks=3))


@asynccontextmanager
async def reading(s3_server: RcloneS3, config: MountConfig, proxy: CountingProxy, key: str, data: bytes
                  ) -> AsyncIterator[tuple[ObjectInfo, BlockReader]]:
    """``data`` stored at ``key``, its info, and a started BlockReader (stopped on exit); the
    proxy's counts start from there."""
    s3_server.client().put_object(Bucket=config.bucket, Key=key, Body=data)
    store = AsyncStore(open_store(config))
    info = await store.head(key)
    async with trio.open_nursery() as nursery:
        reader = BlockReader(LocalData.for_config(config, store), config.tuning)
        reader.start(nursery)
        proxy.reset()
        yield info, reader
        nursery.cancel_scope.cancel()


async def test_single_flight_memory_bound_and_version_pin(
    s3_server: RcloneS3, config: MountConfig, counting_proxy: CountingProxy
) -> None:
    data = rand(6 * MiB + 5, 1)
    async with reading(s3_server, config, counting_proxy, "obj", data) as (info, reader):
        results: list[bytes] = []

        async def read_block() -> None:
            results.append(await reader.block(info, 2))

        async with trio.open_nursery() as readers:
            for _ in range(20):
                readers.start_soon(read_block)
        assert counting_proxy.snapshot()["GET"] == 1  # twenty readers, one request
        assert all(r == data[2 * MiB:3 * MiB] for r in results)

        assert await reader.read(info, 0, len(data) + 100) == data
        assert reader._lru_bytes <= 3 * MiB  # the memory bound holds whatever was read
        assert await reader.read(info, 6 * MiB, 10) == data[6 * MiB:]

        s3_server.client().put_object(Bucket=config.bucket, Key="obj", Body=rand(len(data), 2))
        with pytest.raises(errors.ObjectChangedError):
            await reader.read(info, 0, MiB)  # block 0 was evicted: refetched, pinned, refused


async def test_urgent_read_answers_from_a_ranged_get_and_still_fetches_the_block(
    s3_server: RcloneS3, config: MountConfig, counting_proxy: CountingProxy
) -> None:
    data = rand(4 * MiB + 3, 3)
    async with reading(s3_server, config, counting_proxy, "big", data) as (info, reader):
        assert bytes(await reader.read(info, MiB + 10, 4096, urgent=True)) == data[MiB + 10:MiB + 10 + 4096]
        with trio.fail_after(10):
            assert await reader.block(info, 1) == data[MiB:2 * MiB]  # the block's fetch went on
        tally = counting_proxy.tally()
        # the 4 KiB range, then (once it answered: never in flight together) the block; nothing more
        assert tally.requests["GET"] == 2
        assert tally.body_bytes["GET"] == MiB + 4096
        # a block already in memory is not fetched again, urgent or not
        counting_proxy.reset()
        assert bytes(await reader.read(info, MiB, 100, urgent=True)) == data[MiB:MiB + 100]
        assert counting_proxy.snapshot().get("GET", 0) == 0
        # the object changed: the ranged GET is refused (pinned) and so is the block: an error, never new bytes
        s3_server.client().put_object(Bucket=config.bucket, Key="big", Body=rand(len(data), 4))
        with pytest.raises(errors.ObjectChangedError):
            await reader.read(info, 3 * MiB, 100, urgent=True)


def test_sequential_window_grows_and_resets() -> None:
    seq = Sequential(MiB, 8, slack=2 * MiB)
    windows = [seq.observe(i * 128 * 1024, 128 * 1024) for i in range(6)]
    assert windows == [1, 2, 4, 8, 8, 8]
    assert seq.observe(500 * MiB, 4096) == 0  # a jump: random access, no prefetch
    assert list(seq.passed(10 * MiB)) == []
    s = Sequential(MiB, 4, slack=MiB)
    for off in range(0, 6 * MiB, MiB):
        s.observe(off, MiB)
    assert list(s.passed(6 * MiB)) == [0, 1, 2, 3, 4]


async def test_lookups_answer_from_the_listing(
    s3_server: RcloneS3, config: MountConfig, counting_proxy: CountingProxy
) -> None:
    client = s3_server.client()
    for key in ("d/a.txt", "d/b.txt", "d/sub/c.txt", "other/x"):
        client.put_object(Bucket=config.bucket, Key=key, Body=b"1")
    meta = Meta(LocalData.for_config(config, AsyncStore(open_store(config))), config)
    counting_proxy.reset()
    listing = await meta.listing("d")
    assert listing.names == ["a.txt", "b.txt", "sub"]
    assert counting_proxy.snapshot()["LIST"] == 1
    assert (await meta.resolve("d/a.txt")) is not None
    assert (await meta.resolve("d/sub")) is not None
    assert (await meta.resolve("d/missing")) is None
    assert sum(counting_proxy.snapshot().values()) == 1  # all three answered by the listing
    counting_proxy.reset()
    entry = await meta.resolve("other/x")  # not listed: HEAD + LIST(max 1), in parallel
    assert entry is not None and not entry.is_dir
    assert counting_proxy.snapshot() == {"HEAD": 1, "LIST": 1}
    counting_proxy.reset()
    assert await meta.resolve("other/x") == entry  # now cached
    # the second miss in "other": one LIST page, which holds all of it and becomes its listing
    assert (await meta.resolve("other/missing")) is None
    assert meta.listing_if_fresh("other") is not None
    assert counting_proxy.snapshot() == {"LIST": 1}
    counting_proxy.reset()
    assert (await meta.resolve("other/more")) is None  # negative answers from that listing: free
    assert (await meta.resolve("other")) is not None  # the root's first miss
    counts = counting_proxy.snapshot()
    # The store already saw the bucket answer, so the 404 of HEAD other/ needs no HEAD bucket.
    assert counts == {"HEAD": 1, "LIST": 1}


async def test_lookups_of_a_data_set_read_by_path(
    s3_server: RcloneS3, config: MountConfig, counting_proxy: CountingProxy
) -> None:
    """Files opened by path, directory after directory: once a directory was listed for its
    lookups, each of its subdirectories is listed at its first miss, one LIST per directory."""
    client = s3_server.client()
    for key in ("ds/a/1", "ds/a/2", "ds/b/1", "ds/c/1", "ds/c/2"):
        client.put_object(Bucket=config.bucket, Key=key, Body=b"1")
    meta = Meta(LocalData.for_config(config, AsyncStore(open_store(config))), config)
    assert (await meta.resolve("ds/a")) is not None  # first miss in ds: HEAD + LIST
    assert (await meta.resolve("ds/b")) is not None  # second: ds listed
    assert meta.listing_if_fresh("ds") is not None
    counting_proxy.reset()
    assert (await meta.resolve("ds/c")) is not None  # from that listing
    assert (await meta.resolve("ds/c/1")) is not None  # a first miss in ds/c: its listing at once
    assert (await meta.resolve("ds/c/2")) is not None
    assert (await meta.resolve("ds/c/3")) is None
    assert counting_proxy.snapshot() == {"LIST": 1}


async def test_lookups_in_a_directory_bigger_than_a_page(
    s3_server: RcloneS3, config: MountConfig, counting_proxy: CountingProxy
) -> None:
    """A directory that does not fit in one LIST page is not listed for a lookup (that could be
    thousands of pages): its lookups ask HEAD + LIST(max 1) for the one name, after the first page."""
    client = s3_server.client()
    for key in ("big/a", "big/b", "big/c", "big/d"):
        client.put_object(Bucket=config.bucket, Key=key, Body=b"1")
    meta = Meta(LocalData.for_config(config, AsyncStore(open_store(config))), config)
    meta.page_keys = 2
    assert (await meta.resolve("big/zz")) is None  # a first miss: HEAD + LIST
    counting_proxy.reset()
    assert (await meta.resolve("big/a")) is not None  # the second: on the first page, answered by it
    assert counting_proxy.snapshot() == {"LIST": 1}
    assert meta.listing_if_fresh("big") is None
    counting_proxy.reset()
    entry = await meta.resolve("big/d")  # past the first page: HEAD + LIST(max 1), in parallel
    assert entry is not None and not entry.is_dir
    assert counting_proxy.snapshot() == {"HEAD": 1, "LIST": 1}
    counting_proxy.reset()
    assert (await meta.resolve("big/yy")) is None
    # The store already saw the bucket answer, so the 404 of HEAD big/yy needs no HEAD bucket.
    assert counting_proxy.snapshot() == {"HEAD": 1, "LIST": 1}
