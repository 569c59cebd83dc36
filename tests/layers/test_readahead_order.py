"""A sequential reader whose requests arrive out of order, as the kernel's readahead sends them
(several FUSE requests in flight, answered in any order): each block is fetched once."""

from __future__ import annotations

import os

import trio

from fusefs.config import MiB
from tests.layers.conftest import Fs

CHUNK = 128 * 1024


async def landed(fs: Fs) -> None:
    """Every fetch the reader has started has answered (so the test does not race them)."""
    while fs.ops.reader._flights:
        await next(iter(fs.ops.reader._flights.values())).done.wait()
    await trio.lowlevel.checkpoint()


def kernel_order(size: int, group: int) -> list[int]:
    """Offsets of ``size`` bytes in ``CHUNK``s, each ``group`` of them answered last first."""
    offsets = list(range(0, size, CHUNK))
    return [off for at in range(0, len(offsets), group) for off in reversed(offsets[at:at + group])]


async def test_blocks_fetched_ahead_are_not_dropped_before_they_are_read(fs: Fs) -> None:
    size = 24 * MiB
    data = os.urandom(size)
    fs.memory.put("big", data)
    info = await fs.ops.open(await fs.inode("big"), os.O_RDONLY, fs.ctx)
    before = fs.ops.reader.gets
    try:
        for off in kernel_order(size, 12):
            assert bytes(await fs.ops.read(info.fh, off, CHUNK)) == data[off:off + CHUNK]
            await landed(fs)
    finally:
        await fs.ops.release(info.fh)
    # the old reader made 45 fetches for these 24 blocks: blocks fetched ahead were dropped unread from a
    # memory full of blocks the stream had passed but kept for late requests
    assert fs.ops.reader.gets - before == 24
