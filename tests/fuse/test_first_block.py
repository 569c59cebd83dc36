"""One request per small file where it will be read anyway, through real mounts on moto's S3
server, counted at the proxy: a ``fileMetadata`` volume describes each listed small file with a GET
of its bytes instead of a HEAD (S3 listings carry no user metadata), and the read takes those bytes;
a lookup by path in a directory too big to be listed for lookups asks a GET of the first bytes
beside its LIST."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fusefs.config import MountConfig, Tuning
from fusefs.fs.meta import PEEK_BYTES
from testing.fsmount import Mounted
from testing.proxy import CountingProxy
from testing.servers import MotoS3

pytestmark = pytest.mark.fuse

FILES = 60
#: described by HEAD (its bytes are not fetched for a stat), and larger than the small files (one
#: block at most) that readers' directory listings fetch ahead of them (``fusefs.fs.dirahead``)
BIG = max(PEEK_BYTES, Tuning().block_size) + 1


def body(i: int) -> bytes:
    return bytes([i % 251]) * (100 + 37 * i)


@pytest.mark.parametrize("cache", [True, False], ids=["node-cache", "no-cache"])
def test_a_walk_that_reads_every_file_costs_one_list_and_one_get_per_file(
    moto_server: MotoS3, tmp_path: Path, mount_fs: Callable[..., Mounted], cache: bool
) -> None:
    bucket = moto_server.create_bucket()
    client = moto_server.client()
    for i in range(FILES):
        client.put_object(Bucket=bucket, Key=f"w/f{i:03d}", Body=body(i),
                          Metadata={"mtime": f"{1_000_000_000 + i}.25", "mode": str(stat.S_IFREG | 0o600)})
    client.put_object(Bucket=bucket, Key="w/zbig", Body=b"z" * BIG, Metadata={"mode": str(stat.S_IFREG | 0o640)})
    with CountingProxy(moto_server.port) as proxy:
        config = MountConfig(backend="s3", bucket=bucket, endpoint_url=proxy.endpoint,
                             credentials=moto_server.credentials, file_metadata=True,
                             cache_dir=str(tmp_path / "cache") if cache else None)
        m = mount_fs(config)
        os.stat(m.path / "w")
        proxy.reset()
        names = sorted(os.listdir(m.path / "w"))
        assert names == [f"f{i:03d}" for i in range(FILES)] + ["zbig"]
        for i, name in enumerate(names[:FILES]):
            st = os.stat(m.path / "w" / name)
            assert st.st_mtime_ns == (1_000_000_000 + i) * 10**9 + 250_000_000
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == len(body(i))
            assert (m.path / "w" / name).read_bytes() == body(i)
        walk = proxy.tally()
        assert stat.S_IMODE(os.stat(m.path / "w" / "zbig").st_mode) == 0o640
        m.unmount()
    print(f"\nwalk with fileMetadata ({'node cache' if cache else 'no cache'}): {dict(walk.requests)}, "
          f"received {dict(walk.body_bytes)}")
    # one LIST; a GET per small file (its description and its bytes), a HEAD for the big one
    assert walk.requests == {"LIST": 1, "GET": FILES, "HEAD": 1}
    assert walk.body_bytes["GET"] == sum(len(body(i)) for i in range(FILES))


def test_a_read_by_path_in_a_directory_bigger_than_a_list_page_costs_a_get_and_a_list(
    moto_server: MotoS3, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    """Files read by path in a directory too big to be listed for its lookups (over 1,000 keys):
    each lookup asks GET (first bytes) + LIST (name/, max 1) at once, and the read that follows
    is served by that GET: two requests a file, where HEAD + LIST + GET were three. A large file's
    lookup fetches at most ``PEEK_BYTES`` of it, and the directory's lookups then ask HEAD."""
    bucket = moto_server.create_bucket()
    client = moto_server.client()
    files = {f"f{i:04d}": body(i % 200) for i in range(1008)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=f"d/{kv[0]}", Body=kv[1]), files.items()))
    large = os.urandom(3 * PEEK_BYTES)
    client.put_object(Bucket=bucket, Key="d/large", Body=large)
    with CountingProxy(moto_server.port) as proxy:
        m = mount_fs(MountConfig(backend="s3", bucket=bucket, endpoint_url=proxy.endpoint,
                                 credentials=moto_server.credentials, cache_dir=str(tmp_path / "cache")))
        os.stat(m.path / "d")
        for name in ("f1000", "f1001"):  # the first miss, then the second: a LIST page, not all of d/
            assert (m.path / "d" / name).read_bytes() == files[name]
        for name in ("f1002", "f1003", "f1004"):
            proxy.reset()
            assert (m.path / "d" / name).read_bytes() == files[name]
            tally = proxy.tally()
            assert tally.requests == {"GET": 1, "LIST": 1}, (name, dict(tally.requests))
            assert tally.body_bytes["GET"] == len(files[name])
        proxy.reset()
        assert os.stat(m.path / "d" / "large").st_size == len(large)
        lookup = proxy.tally()
        assert lookup.requests == {"GET": 1, "LIST": 1}, dict(lookup.requests)
        assert lookup.body_bytes["GET"] == PEEK_BYTES
        proxy.reset()
        assert os.stat(m.path / "d" / "f1005").st_size == len(files["f1005"])
        assert proxy.tally().requests == {"HEAD": 1, "LIST": 1}
        assert (m.path / "d" / "large").read_bytes() == large
        m.unmount()
