"""Objects the store lists without a version (no ETag): reads are pinned by a HEAD at open, or
fail with EIO when the store gives no version at all; never empty or wrong bytes. Real FUSE
mounts over ``rclone serve s3`` behind a proxy that strips the ETags."""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Iterator

import pytest

from fusefs.config import MountConfig
from testing.fsmount import Mounted
from testing.rewrite_proxy import RewritingProxy, strip_etags
from testing.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse


@pytest.fixture
def no_list_etags(s3_server: RcloneS3) -> Iterator[RewritingProxy]:
    with RewritingProxy(s3_server.port, strip_etags()) as proxy:
        yield proxy


def test_listed_without_etag_reads_the_right_bytes(
    s3_server: RcloneS3, s3_config: MountConfig, no_list_etags: RewritingProxy, mount_fs: Callable[..., Mounted]
) -> None:
    data = random_bytes(3 * 1024 * 1024 + 7, seed=31)
    client = s3_server.client()
    client.put_object(Bucket=s3_config.bucket, Key="d/model.bin", Body=data)
    client.put_object(Bucket=s3_config.bucket, Key="d/log.txt", Body=b"line 1\n")
    m = mount_fs(dataclasses.replace(s3_config, endpoint_url=no_list_etags.endpoint))
    assert sorted(os.listdir(m.path / "d")) == ["log.txt", "model.bin"]  # entries without versions
    assert os.stat(m.path / "d" / "model.bin").st_size == len(data)
    assert (m.path / "d" / "model.bin").read_bytes() == data
    with open(m.path / "d" / "log.txt", "ab") as f:  # must not be taken for a new, empty file
        f.write(b"line 2\n")
    assert s3_server.read_object(s3_config.bucket, "d/log.txt") == b"line 1\nline 2\n"


def test_a_store_without_versions_fails_open_with_eio(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="f.bin", Body=b"payload")
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="empty", Body=b"")
    every = frozenset({"LIST", "HEAD", "GET"})
    with RewritingProxy(s3_server.port, strip_etags(every)) as proxy:
        m = mount_fs(dataclasses.replace(s3_config, endpoint_url=proxy.endpoint))
        assert os.stat(m.path / "f.bin").st_size == 7
        for flags in (os.O_RDONLY, os.O_RDWR):
            with pytest.raises(OSError) as exc:
                os.open(m.path / "f.bin", flags)
            assert exc.value.errno == errno.EIO
        assert (m.path / "empty").read_bytes() == b""  # nothing to pin: empty is right
        assert "no version" in m.log_text()
    assert s3_server.read_object(s3_config.bucket, "f.bin") == b"payload"


def test_a_reader_opened_while_the_file_was_being_written_reads_it_after_close(
    s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    with open(m.path / "new.bin", "wb") as w:
        w.write(b"fresh bytes")
        with open(m.path / "new.bin", "rb") as r:
            w.close()  # stored now; the reader's handle was opened before there was a version
            assert r.read() == b"fresh bytes"
