"""Short soak: 32 concurrent readers on one real mount for 20 s (OBJFS_SOAK_SECONDS) keep the FUSE
server's memory bounded and read only the stored bytes. The long run is the bench scenario
``soak`` (``python -m bench --only soak``), which reports RSS over minutes.

The bound is loose on purpose (no timing, and a noisy machine): after the first seconds the
server's RSS may not grow by more than LEAK_MIB. The server holds at most ``memory_blocks`` blocks
(4 MiB here), the cache writer's queue (2 x 16 MiB) and the interpreter; over 20 s the readers move
a few GiB through it, so a leak of blocks, handles or buffers would exceed the cap many times over.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest

from bench import soak
from fusefs.config import KiB, MiB, MountConfig, Tuning
from testing import figures
from testing.fsmount import Mounted
from testing.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse

SECONDS = float(os.environ.get("OBJFS_SOAK_SECONDS", "20"))
READERS = 32
#: growth of the server's RSS allowed from the first seconds to the end
LEAK_MIB = 160
#: and its peak at any time: memory_blocks x block size, the writer's queue and Python, with room
PEAK_MIB = 400


def test_32_readers_keep_memory_bounded(s3_server: RcloneS3, s3_config: MountConfig,
                                        mount_fs: Callable[..., Mounted]) -> None:
    files = {f"big/{i}.bin": random_bytes(3 * MiB + 1000 * i, 100 + i) for i in range(6)}
    files |= {f"small/{i}.txt": random_bytes(4 * KiB + 37 * i, 200 + i) for i in range(40)}
    client = s3_server.client()
    for key, data in files.items():
        client.put_object(Bucket=s3_config.bucket, Key=key, Body=data)
    config = dataclasses.replace(s3_config, read_only=True, cache_size=64 * MiB,  # evictions too
                                 tuning=Tuning(block_size=1 * MiB, memory_blocks=4))
    m = mount_fs(config)

    def truth(name: str, offset: int, n: int) -> bytes:
        return files[name][offset:offset + n]

    result = soak.run(m.path, sorted(files), {k: len(v) for k, v in files.items()}, truth, [m.proc.pid],
                      SECONDS, READERS)
    start, end, peak = result.rss_mib(2.0), result.rss_mib(-1), result.peak_mib
    figures.note(f"SOAK readers={READERS} seconds={SECONDS:.0f} reads={result.reads} bytes={result.bytes} "
                 f"rss_start_mib={start:.0f} rss_end_mib={end:.0f} rss_peak_mib={peak:.0f}")
    assert not result.wrong, result.wrong[:5]
    assert not result.errors, result.errors[:5]
    assert result.reads > READERS  # every reader got through at least once
    assert m.proc.poll() is None, m.log_text()
    assert end - start <= LEAK_MIB, result.series(2.0)
    assert peak <= PEAK_MIB, result.series(2.0)
