"""The filesystem's read side through real FUSE mounts on a real ``rclone serve s3``, with a counting
proxy in between to prove what each operation costs in store requests."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import mmap
import os
import random
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fusefs.config import MiB, MountConfig, Tuning
from fusefs.fs.meta import valid_name
from testing.fsmount import Mounted
from testing.pods import wait_for
from testing.proxy import CountingProxy
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse

SMALL_FILES = 2000
BIG_DIR_FILES = 1200  # > 1000: the listing needs two pages


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def put_many(server: RcloneS3, bucket: str, objects: dict[str, bytes]) -> None:
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


def wait_complete(config: MountConfig, count: int = 1) -> None:
    """Until the node cache holds ``count`` complete object files: the writer publishes a file
    beside the read path, after the read that filled it has returned."""
    root = Path(config.cache_dir or "")
    wait_for(lambda: len(list(root.rglob("*.obj"))) >= count, what=f"{count} complete file(s) in the node cache")


def via(config: MountConfig, proxy: CountingProxy, **changes: Any) -> MountConfig:
    return dataclasses.replace(config, endpoint_url=proxy.endpoint, **changes)


# -- a tree of many small files, made once for the module ----------------------------------------
def small_tree() -> dict[str, bytes]:
    tree = {}
    for i in range(BIG_DIR_FILES):
        tree[f"many/f{i:05d}.bin"] = rand(100 + i % 4000, i)
    for i in range(SMALL_FILES - BIG_DIR_FILES):
        tree[f"nested/d{i % 8}/sub/g{i:05d}.txt"] = rand(50 + i % 3000, 10_000 + i)
    return tree


@pytest.fixture(scope="module")
def tree_bucket(s3_server: RcloneS3) -> tuple[str, dict[str, bytes]]:
    bucket = s3_server.create_bucket()
    tree = small_tree()
    tree["top.txt"] = b"top level\n"
    put_many(s3_server, bucket, tree)
    return bucket, tree


@pytest.fixture
def tree_config(s3_config: MountConfig, tree_bucket: tuple[str, dict[str, bytes]],
                counting_proxy: CountingProxy) -> MountConfig:
    return via(s3_config, counting_proxy, bucket=tree_bucket[0])


def walk_and_read(root: Path) -> dict[str, bytes]:
    """What a training data loader does: walk the tree, open and read every file in order."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            with open(p, "rb") as f:
                seen[str(p.relative_to(root))] = f.read()
    return seen


def test_scan_of_many_small_files_costs_about_one_request_per_file(
    tree_config: MountConfig, tree_bucket: tuple[str, dict[str, bytes]], counting_proxy: CountingProxy,
    mount_fs: Callable[..., Mounted],
) -> None:
    _, tree = tree_bucket
    counting_proxy.reset()
    m = mount_fs(tree_config)
    seen = walk_and_read(m.path)
    assert seen == tree
    counts = counting_proxy.snapshot()
    per_file = sum(counts.values()) / len(tree)
    print(f"\nfirst scan: {dict(counts)} -> {per_file:.3f} requests per file")
    assert per_file <= 1.05
    assert counts["HEAD"] == 0

    counting_proxy.reset()
    assert walk_and_read(m.path) == tree
    again = counting_proxy.snapshot()
    print(f"second scan within the TTL: {dict(again)}")
    assert again["GET"] == 0
    assert sum(again.values()) == 0


def test_listing_of_more_than_1000_keys_and_nested_implicit_dirs(
    tree_config: MountConfig, tree_bucket: tuple[str, dict[str, bytes]], counting_proxy: CountingProxy,
    mount_fs: Callable[..., Mounted],
) -> None:
    _, tree = tree_bucket
    m = mount_fs(tree_config)
    names = os.listdir(m.path / "many")
    assert sorted(names) == sorted(k.split("/")[1] for k in tree if k.startswith("many/"))
    assert sorted(os.listdir(m.path)) == ["many", "nested", "top.txt"]
    assert sorted(os.listdir(m.path / "nested")) == [f"d{i}" for i in range(8)]
    assert stat.S_ISDIR(os.stat(m.path / "nested" / "d3" / "sub").st_mode)
    st = os.stat(m.path / "many" / "f00007.bin")
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(tree["many/f00007.bin"])
    # stat and open of listed entries cost nothing more
    counting_proxy.reset()
    for name in names[:50]:
        os.stat(m.path / "many" / name)
    assert sum(counting_proxy.snapshot().values()) == 0
    # a lookup in a directory that was not listed: HEAD + LIST at most
    counting_proxy.reset()
    assert os.stat(m.path / "nested" / "d5" / "sub" / "g00005.txt").st_size == len(tree["nested/d5/sub/g00005.txt"])
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "nested" / "nope")
    assert os.path.exists(m.path / "nested" / "nope") is False  # the negative answer is cached
    assert counting_proxy.snapshot()["GET"] == 0


def test_prefix_mount_shows_only_the_prefix(
    tree_config: MountConfig, mount_fs: Callable[..., Mounted], tree_bucket: tuple[str, dict[str, bytes]]
) -> None:
    m = mount_fs(dataclasses.replace(tree_config, prefix="nested/d2"))
    assert os.listdir(m.path) == ["sub"]
    expected = {k[len("nested/d2/"):]: v for k, v in tree_bucket[1].items() if k.startswith("nested/d2/")}
    assert walk_and_read(m.path) == expected


def test_empty_directory_on_the_store_is_an_empty_directory(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    # rclone shows an empty folder as a common prefix, like a `dir/` marker on S3
    (s3_server.root / s3_config.bucket / "empty").mkdir()
    m = mount_fs(s3_config)
    assert os.listdir(m.path) == ["empty"]
    assert os.listdir(m.path / "empty") == []


def test_key_names_that_cannot_be_file_names_are_skipped() -> None:
    assert valid_name("ok.txt")
    for bad in ("", ".", "..", "a\0b", "x" * 256, "a/b"):
        assert not valid_name(bad)
    assert valid_name("é" * 127) and not valid_name("é" * 128)  # 255 bytes, not characters


# -- large objects -------------------------------------------------------------------------------
@pytest.fixture
def big_object(s3_server: RcloneS3, s3_config: MountConfig) -> Iterator[tuple[str, bytes]]:
    data = rand(21 * MiB + 12345, 7)
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="models/big.bin", Body=data)
    yield "models/big.bin", data


def small_blocks(config: MountConfig, **tuning: Any) -> MountConfig:
    return dataclasses.replace(config, tuning=Tuning(block_size=2 * MiB, **tuning))


def test_full_ranged_mmap_and_concurrent_reads_are_byte_exact(
    s3_config: MountConfig, big_object: tuple[str, bytes], mount_fs: Callable[..., Mounted]
) -> None:
    key, data = big_object
    m = mount_fs(small_blocks(s3_config, memory_blocks=4, max_prefetch_blocks=4))
    path = m.path / key
    assert os.stat(path).st_size == len(data)
    with open(path, "rb", buffering=0) as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    r = random.Random(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(200):
            off = r.randrange(0, len(data) + 10)
            n = r.choice([1, 4096, 65536, 2 * MiB + 17, 5 * MiB])
            assert os.pread(fd, n, off) == data[off:off + n]
    finally:
        os.close(fd)
    with open(path, "rb") as mf, mmap.mmap(mf.fileno(), 0, prot=mmap.PROT_READ) as mm:
        for _ in range(100):
            off = r.randrange(0, len(data))
            assert mm[off:off + 10000] == data[off:off + 10000]
        assert hashlib.sha256(mm[:]).digest() == hashlib.sha256(data).digest()

    def reader(seed: int) -> bool:
        rr = random.Random(seed)
        with open(path, "rb", buffering=0) as f:
            for _ in range(40):
                off = rr.randrange(0, len(data))
                n = rr.randrange(1, 3 * MiB)
                if os.pread(f.fileno(), n, off) != data[off:off + n]:
                    return False
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(reader, range(8)))


def test_second_read_costs_no_get_and_a_second_mount_reads_from_the_node_cache(
    s3_config: MountConfig, big_object: tuple[str, bytes], counting_proxy: CountingProxy,
    mount_fs: Callable[..., Mounted],
) -> None:
    key, data = big_object
    config = via(s3_config, counting_proxy)
    m = mount_fs(config, "first")
    assert (m.path / key).read_bytes() == data
    gets = counting_proxy.snapshot()["GET"]
    assert gets >= 1
    counting_proxy.reset()
    assert (m.path / key).read_bytes() == data
    assert counting_proxy.snapshot()["GET"] == 0
    wait_complete(config)
    m.unmount()  # the server drains the node cache's write queue before it exits

    counting_proxy.settle()  # a request the first server had in flight as it exited is not the second's
    counting_proxy.reset()
    m2 = mount_fs(config, "second")  # same cache_dir, fresh server and page cache
    assert (m2.path / key).read_bytes() == data
    assert counting_proxy.snapshot()["GET"] == 0


def test_object_replaced_while_open_gives_an_error_never_mixed_bytes(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    key = "changing.bin"
    old = rand(24 * MiB, 1)
    new = rand(24 * MiB, 2)
    s3_server.client().put_object(Bucket=s3_config.bucket, Key=key, Body=old)
    config = dataclasses.replace(
        s3_config, cache_dir=None,
        tuning=Tuning(block_size=1 * MiB, max_prefetch_blocks=1, memory_blocks=2, readahead_kb=128),
    )
    m = mount_fs(config)
    fd = os.open(m.path / key, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == old[:4096]
        s3_server.client().put_object(Bucket=s3_config.bucket, Key=key, Body=new)
        failed = None
        for off in range(16 * MiB, 24 * MiB, MiB):
            try:
                got = os.pread(fd, MiB, off)
            except OSError as exc:
                failed = exc
                break
            assert got == old[off:off + MiB], "bytes of another version"
        assert failed is not None and failed.errno in (errno.ESTALE, errno.EIO)
    finally:
        os.close(fd)
    # a fresh open after the TTL would see the new version; within the TTL the old listing stands


def test_prefetch_globs_warm_the_node_cache_after_mount(
    s3_server: RcloneS3, s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted]
) -> None:
    data = rand(5 * MiB + 3, 11)
    client = s3_server.client()
    client.put_object(Bucket=s3_config.bucket, Key="models/w.safetensors", Body=data)
    client.put_object(Bucket=s3_config.bucket, Key="models/readme.md", Body=b"not warmed")
    config = small_blocks(via(s3_config, counting_proxy, prefetch=("models/*.safetensors",)))
    counting_proxy.reset()
    m = mount_fs(config)
    deadline = time.monotonic() + 30
    while counting_proxy.snapshot()["GET"] < 3 and time.monotonic() < deadline:  # 3 blocks of 2 MiB
        time.sleep(0.05)
    assert counting_proxy.snapshot()["GET"] == 3
    wait_complete(config)
    counting_proxy.reset()
    assert (m.path / "models" / "w.safetensors").read_bytes() == data
    assert counting_proxy.snapshot()["GET"] == 0
