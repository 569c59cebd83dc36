"""Small files fetched ahead of their readers (``fusefs.fs.dirahead``) through real FUSE mounts on
``rclone serve s3``, with the counting proxy between them: each GET counted by object, so a file
fetched twice, or a directory pulled further than the window, shows."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import os
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from fusefs.config import MountConfig, Tuning
from testing.fsmount import Mounted
from testing.pods import wait_for
from testing.proxy import CountingProxy
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def put_files(server: RcloneS3, bucket: str, directory: str, count: int, size: int) -> dict[str, bytes]:
    files = {f"{directory}/f{i:05d}.bin": rand(size + i % 31, i) for i in range(count)}
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), files.items()))
    return files


def gets(proxy: CountingProxy, bucket: str) -> dict[str, int]:
    """GETs of each key of ``bucket`` since the proxy's last reset."""
    prefix = f"/{bucket}/"
    return {path.removeprefix(prefix): n for path, n in proxy.tally().gets.items() if path.startswith(prefix)}


def via(config: MountConfig, proxy: CountingProxy, **changes: Any) -> MountConfig:
    return dataclasses.replace(config, endpoint_url=proxy.endpoint, **changes)


@pytest.mark.parametrize("cache", [True, False], ids=["node-cache", "no-cache"])
@pytest.mark.parametrize("order", ["walk", "shuffled-by-path"])
def test_a_directory_read_file_by_file_fetches_each_file_once(
    s3_server: RcloneS3, s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted],
    order: str, cache: bool,
) -> None:
    files = put_files(s3_server, s3_config.bucket, "set/d", 300, 4096)
    config = via(s3_config, counting_proxy, cache_dir=s3_config.cache_dir if cache else None)
    counting_proxy.reset()
    m = mount_fs(config)
    paths = sorted(files)
    if order == "walk":
        assert sorted(os.listdir(m.path / "set/d")) == [p.rpartition("/")[2] for p in paths]
    else:
        random.Random(11).shuffle(paths)  # a data loader's index: opened by path, never listed
    for path in paths:
        assert (m.path / path).read_bytes() == files[path]
    fetched = gets(counting_proxy, s3_config.bucket)
    assert fetched == dict.fromkeys(files, 1)  # every file once: none twice, nothing else
    assert counting_proxy.snapshot()["GET"] == len(files)


def test_eight_readers_by_path_fetch_each_file_once(
    s3_server: RcloneS3, s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted],
) -> None:
    files = {}
    for d in range(4):
        files.update(put_files(s3_server, s3_config.bucket, f"data/d{d}", 60, 2048))
    config = via(s3_config, counting_proxy)
    counting_proxy.reset()
    m = mount_fs(config)
    order = sorted(files)
    random.Random(5).shuffle(order)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(lambda p: (p, (m.path / p).read_bytes()), order))
    assert got == files
    assert gets(counting_proxy, s3_config.bucket) == dict.fromkeys(files, 1)


def test_three_files_read_of_a_directory_of_1000_fetch_at_most_the_first_window_more(
    s3_server: RcloneS3, s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted],
) -> None:
    files = put_files(s3_server, s3_config.bucket, "big", 1000, 100)
    window = Tuning().small_file_prefetch
    assert window > 0
    config = via(s3_config, counting_proxy)
    m = mount_fs(config)
    assert len(os.listdir(m.path / "big")) == 1000
    counting_proxy.reset()
    for path in sorted(files)[400:403]:
        assert (m.path / path).read_bytes() == files[path]
    # the fetches ahead go on in the background: wait for the window to be filled...
    wait_for(lambda: counting_proxy.snapshot()["GET"] >= 3 + window, what="the first window fetched ahead")
    m.unmount()  # ...and stop the server: nothing more can be fetched
    counting_proxy.settle()  # and what it sent before it exited is counted: a fetch beyond the window shows
    fetched = gets(counting_proxy, s3_config.bucket)
    assert sum(fetched.values()) == 3 + window
    assert max(fetched.values()) == 1


def test_a_file_overwritten_after_it_was_fetched_ahead_reads_as_the_new_version_once_the_mount_sees_it(
    s3_server: RcloneS3, s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted],
) -> None:
    files = put_files(s3_server, s3_config.bucket, "v", 8, 5000)
    paths = sorted(files)
    changed = paths[-1]
    config = via(s3_config, counting_proxy, metadata_ttl=1.0)
    m = mount_fs(config)
    os.listdir(m.path / "v")
    counting_proxy.reset()
    for path in paths[:2]:
        assert (m.path / path).read_bytes() == files[path]
    wait_for(lambda: gets(counting_proxy, s3_config.bucket).get(changed) == 1, what="the file fetched ahead")
    new = rand(len(files[changed]), 999)  # same size: only the version tells them apart
    s3_server.client().put_object(Bucket=s3_config.bucket, Key=changed, Body=new)
    time.sleep(1.5)  # past the metadata TTL: the mount asks the store what the file is now
    assert (m.path / changed).read_bytes() == new


def test_a_file_overwritten_before_its_fetch_ahead_reads_as_estale_or_the_new_bytes_never_the_old(
    s3_server: RcloneS3, s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted],
) -> None:
    files = put_files(s3_server, s3_config.bucket, "w", 8, 5000)
    paths = sorted(files)
    changed = paths[-1]
    m = mount_fs(via(s3_config, counting_proxy))
    os.listdir(m.path / "w")  # the listing names the first versions
    new = rand(len(files[changed]), 998)
    s3_server.client().put_object(Bucket=s3_config.bucket, Key=changed, Body=new)
    for path in paths[:2]:  # start fetching ahead: the changed file's pinned GET fails, silently
        assert (m.path / path).read_bytes() == files[path]
    try:
        got = (m.path / changed).read_bytes()
    except OSError as exc:
        assert exc.errno in (errno.ESTALE, errno.EIO)
    else:
        assert got == new, "bytes of the version the store no longer has"
    for path in paths[2:-1]:
        assert (m.path / path).read_bytes() == files[path]


def test_reading_on_after_the_listing_expired_stays_right(
    s3_server: RcloneS3, s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted],
) -> None:
    files = put_files(s3_server, s3_config.bucket, "e", 40, 3000)
    m = mount_fs(via(s3_config, counting_proxy, metadata_ttl=0.5))
    paths = sorted(files)
    for i, path in enumerate(paths):
        if i == 20:
            time.sleep(0.6)  # the listing (and what was fetched ahead from it) expires midway
        assert (m.path / path).read_bytes() == files[path]
