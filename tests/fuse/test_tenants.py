"""The node cache through real mounts: tenants, block sizes and replaced objects (fusefs.nodecache.cache,
fusefs.fs.read). Two credentials on one `rclone serve s3`, a proxy that refuses one of them its GETs."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusefs.config import Credentials, MiB, MountConfig, Tuning
from testing.fsmount import Mounted
from testing.proxy import CountingProxy, _Reader
from testing.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse

OTHER = ("objfsother01", "0123456789abcdef0123456789abcdef")
TUNING = Tuning(block_size=1 * MiB, max_prefetch_blocks=2, memory_blocks=4, readahead_kb=1024)
SIZE = 5 * MiB + 4321


class DenyingProxy(CountingProxy):
    """Answers 403 to object GETs signed with one access key; everything else passes."""

    denied = OTHER[0]

    def _exchange(self, head: list[bytes], creader: _Reader, client: socket.socket,
                  upstream: socket.socket, ureader: _Reader) -> bool:
        method, target, _ = head[0].decode("latin-1").split(" ", 2)
        auth = b"".join(head).decode("latin-1").lower()
        object_level = len([p for p in target.split("?")[0].split("/") if p]) >= 2
        if method == "GET" and object_level and f"credential={self.denied.lower()}/" in auth:
            body = b"<Error><Code>AccessDenied</Code></Error>"
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            self._record("GET", 403, 0)
            return True
        return super()._exchange(head, creader, client, upstream, ureader)


@pytest.fixture(scope="module")
def two_key_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3]:
    with RcloneS3(tmp_path_factory.mktemp("s3two") / "data", extra_keys=(OTHER,)) as server:
        yield server


@pytest.fixture
def setup(two_key_server: RcloneS3, tmp_path: Path) -> Iterator[tuple[MountConfig, DenyingProxy, bytes]]:
    bucket = two_key_server.create_bucket()
    data = random_bytes(SIZE, 3)
    two_key_server.client().put_object(Bucket=bucket, Key="w.bin", Body=data)
    with DenyingProxy(two_key_server.port) as proxy:
        config = MountConfig(backend="s3", bucket=bucket, endpoint_url=proxy.endpoint,
                             credentials=two_key_server.credentials, cache_dir=str(tmp_path / "cache"),
                             tuning=TUNING)
        yield config, proxy, data


def ambient_env(key: tuple[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return dict(env, AWS_ACCESS_KEY_ID=key[0], AWS_SECRET_ACCESS_KEY=key[1])


def read_first(m: Mounted, proxy: CountingProxy, data: bytes) -> None:
    assert (m.path / "w.bin").read_bytes() == data
    m.unmount()  # drains the writer: the object is in the node cache, complete
    proxy.settle()  # a GET the first server sent as it exited lands before the count starts, not in it
    proxy.reset()


def test_a_tenant_is_not_served_what_another_cached(
    setup: tuple[MountConfig, DenyingProxy, bytes], mount_fs: Callable[..., Mounted]
) -> None:
    config, proxy, data = setup
    read_first(mount_fs(config, "first"), proxy, data)
    # the same credentials on a fresh mount: all from the node cache
    same = mount_fs(config, "same")
    assert (same.path / "w.bin").read_bytes() == data
    assert proxy.tally().body_bytes["GET"] == 0
    # other credentials that may list but not read: an error, never the cached bytes
    other = mount_fs(dataclasses.replace(config, credentials=Credentials(*OTHER)), "other")
    assert "w.bin" in os.listdir(other.path)
    with pytest.raises(OSError):
        (other.path / "w.bin").read_bytes()
    assert proxy.tally().requests["GET"] >= 1


def test_ambient_credentials_prove_access_once_per_object_version(
    setup: tuple[MountConfig, DenyingProxy, bytes], two_key_server: RcloneS3, mount_fs: Callable[..., Mounted]
) -> None:
    config, proxy, data = setup
    ambient = dataclasses.replace(config, credentials=Credentials())
    main_key = (two_key_server.access_key, two_key_server.secret_key)
    read_first(mount_fs(ambient, "first", env=ambient_env(main_key)), proxy, data)
    # allowed: served from the node cache after one 1-byte GET that proves access
    again = mount_fs(ambient, "again", env=ambient_env(main_key))
    assert (again.path / "w.bin").read_bytes() == data
    assert (again.path / "w.bin").read_bytes() == data
    t = proxy.tally()
    assert t.requests["GET"] == 1 and t.body_bytes["GET"] == 1
    # refused GETs: the proof fails, nothing cached is served
    proxy.reset()
    denied = mount_fs(ambient, "denied", env=ambient_env(OTHER))
    assert "w.bin" in os.listdir(denied.path)
    with pytest.raises(OSError):
        (denied.path / "w.bin").read_bytes()


def test_mounts_with_other_block_sizes_share_a_cache_and_read_right_bytes(
    setup: tuple[MountConfig, DenyingProxy, bytes], mount_fs: Callable[..., Mounted]
) -> None:
    config, proxy, data = setup
    read_first(mount_fs(config, "first"), proxy, data)
    for i, bs in enumerate((2 * MiB, 512 * 1024)):
        other = dataclasses.replace(config, tuning=dataclasses.replace(TUNING, block_size=bs))
        m = mount_fs(other, f"bs{i}")
        with open(m.path / "w.bin", "rb") as f:
            assert f.read() == data
            for off in (0, 1 * MiB + 17, SIZE - 100):
                f.seek(off)
                assert f.read(3000) == data[off:off + 3000]


def test_object_replaced_in_the_store_is_read_new_after_the_ttl(
    setup: tuple[MountConfig, DenyingProxy, bytes], two_key_server: RcloneS3, mount_fs: Callable[..., Mounted]
) -> None:
    config, _, data = setup
    config = dataclasses.replace(config, metadata_ttl=0)
    m = mount_fs(config, "first")
    assert (m.path / "w.bin").read_bytes() == data
    with open(m.path / "w.bin", "rb") as pinned:
        new = random_bytes(SIZE, 4)
        two_key_server.client().put_object(Bucket=config.bucket, Key="w.bin", Body=new)
        assert (m.path / "w.bin").read_bytes() == new  # a new open pins the new version
        try:
            got = pinned.read()
        except OSError:
            got = None
        # Never a mix. (The new open dropped the inode's page cache and filled it with the new
        # version, which the kernel then serves to the older handle too: one page cache per inode.)
        assert got in (None, data, new)
    m2 = mount_fs(config, "second")
    assert (m2.path / "w.bin").read_bytes() == new
