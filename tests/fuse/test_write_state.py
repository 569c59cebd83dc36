"""Write state belongs to the inode, not to the name it was opened by: through a real FUSE mount
on a real ``rclone serve s3``, writes after a rename land under the new name (log rotation), an
unlinked open file never comes back, and two writers of one file both land (as on a local disk:
they share one file, each close stores what the file holds then)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from fusefs.config import MiB, MountConfig
from testing.fsmount import Mounted
from testing.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse


def keys(server: RcloneS3, bucket: str) -> list[str]:
    r = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in r.get("Contents", []))


def test_log_rotation_writes_after_rename_land_under_the_new_name(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    fd = os.open(m.path / "app.log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"one\n")
        os.rename(m.path / "app.log", m.path / "app.log.1")
        os.write(fd, b"two\n")
    finally:
        os.close(fd)
    assert keys(s3_server, s3_config.bucket) == ["app.log.1"]
    assert s3_server.read_object(s3_config.bucket, "app.log.1") == b"one\ntwo\n"
    assert (m.path / "app.log.1").read_bytes() == b"one\ntwo\n"
    assert not (m.path / "app.log").exists()


def test_rename_of_an_unmodified_open_file_then_write(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="old.txt", Body=b"abc")
    m = mount_fs(s3_config)
    with open(m.path / "old.txt", "r+b") as f:
        os.rename(m.path / "old.txt", m.path / "new.txt")
        f.seek(3)
        f.write(b"def")
    assert keys(s3_server, s3_config.bucket) == ["new.txt"]
    assert s3_server.read_object(s3_config.bucket, "new.txt") == b"abcdef"


def test_rename_while_a_multipart_upload_streams(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    data = random_bytes(30 * MiB + 5, seed=21)
    with open(m.path / "big.part", "wb") as f:
        f.write(data[: 20 * MiB])  # parts of the upload to big.part are under way
        f.flush()
        os.rename(m.path / "big.part", m.path / "big.bin")
        f.write(data[20 * MiB :])
    assert keys(s3_server, s3_config.bucket) == ["big.bin"]
    assert s3_server.read_object(s3_config.bucket, "big.bin") == data


def test_unlinked_open_file_stays_readable_and_never_comes_back(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    fd = os.open(m.path / "scratch", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"before ")
        os.fsync(fd)  # stored under its name now
        assert keys(s3_server, s3_config.bucket) == ["scratch"]
        os.unlink(m.path / "scratch")
        assert keys(s3_server, s3_config.bucket) == []
        assert not (m.path / "scratch").exists()
        os.write(fd, b"after")
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"before after"
        assert os.fstat(fd).st_size == len(b"before after")
    finally:
        os.close(fd)
    assert keys(s3_server, s3_config.bucket) == []
    assert os.listdir(m.path) == []


def test_unlink_of_an_unmodified_open_object_keeps_its_bytes_for_the_writer(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="kept.bin", Body=b"0123456789")
    m = mount_fs(s3_config)
    fd = os.open(m.path / "kept.bin", os.O_RDWR)
    try:
        os.unlink(m.path / "kept.bin")
        os.pwrite(fd, b"AB", 10)
        assert os.pread(fd, 100, 0) == b"0123456789AB"
    finally:
        os.close(fd)
    assert keys(s3_server, s3_config.bucket) == []


def test_a_new_file_under_an_unlinked_open_name_is_its_own(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    old = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(old, b"old data")
        os.unlink(m.path / "f")
        (m.path / "f").write_bytes(b"new")
        os.write(old, b" more")
    finally:
        os.close(old)
    assert s3_server.read_object(s3_config.bucket, "f") == b"new"


def test_two_writers_of_one_file_both_land(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    a = os.open(m.path / "shared.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    b = os.open(m.path / "shared.bin", os.O_WRONLY)
    try:
        os.pwrite(a, b"AAAA", 0)
        os.pwrite(b, b"BBBB", 4)
        os.close(a)
        a = -1
        assert s3_server.read_object(s3_config.bucket, "shared.bin") == b"AAAABBBB"
        os.pwrite(b, b"CC", 8)
    finally:
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)
    assert s3_server.read_object(s3_config.bucket, "shared.bin") == b"AAAABBBBCC"
    assert (m.path / "shared.bin").read_bytes() == b"AAAABBBBCC"


def test_a_truncating_open_truncates_what_the_other_writer_sees(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    a = os.open(m.path / "t.bin", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(a, b"long old content")
        b = os.open(m.path / "t.bin", os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.fstat(a).st_size == 0
            os.write(b, b"new")
        finally:
            os.close(b)
        assert os.pread(a, 100, 0) == b"new"
    finally:
        os.close(a)
    assert s3_server.read_object(s3_config.bucket, "t.bin") == b"new"


def test_rename_over_a_file_open_for_writing_discards_its_pending_bytes(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    (m.path / "src").write_bytes(b"source")
    fd = os.open(m.path / "dst", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"pending")
        os.rename(m.path / "src", m.path / "dst")
        os.write(fd, b" more")
    finally:
        os.close(fd)
    assert keys(s3_server, s3_config.bucket) == ["dst"]
    assert s3_server.read_object(s3_config.bucket, "dst") == b"source"
