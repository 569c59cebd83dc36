"""Writes and namespace changes through real FUSE mounts on real S3 servers (``rclone serve s3``;
moto, which keeps directory markers as S3 does, where a test makes directories: ``S3Target``)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from fusefs.config import MiB, MountConfig
from testing.fsmount import Mounted
from testing.proxy import CountingProxy
from testing.servers import MotoS3, RcloneS3, random_bytes
from tests.fuse.conftest import S3Target

pytestmark = pytest.mark.fuse




def keys(server: RcloneS3, bucket: str) -> list[str]:
    r = server.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in r.get("Contents", []))


def test_large_sequential_write_is_stored_byte_exact(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    chunk = random_bytes(MiB, 3)
    digest = hashlib.sha256()
    n = 110
    with open(m.path / "ckpt.bin", "wb") as f:
        for i in range(n):
            piece = chunk[i:] + chunk[:i]  # every MiB different
            f.write(piece)
            digest.update(piece)
    stored = s3_server.read_object(s3_config.bucket, "ckpt.bin")
    assert len(stored) == n * MiB
    assert hashlib.sha256(stored).digest() == digest.digest()
    assert os.stat(m.path / "ckpt.bin").st_size == n * MiB
    with open(m.path / "ckpt.bin", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == digest.digest()


def test_create_overwrite_truncate_append(s3_target: S3Target, mount_fs: Callable[..., Mounted]) -> None:
    d = s3_target.under(mount_fs(s3_target.config).path)
    p = d / "notes.txt"
    p.write_bytes(b"hello world")
    assert s3_target.read("notes.txt") == b"hello world"
    assert p.read_bytes() == b"hello world"
    p.write_bytes(b"short")  # O_TRUNC overwrite
    assert s3_target.read("notes.txt") == b"short"
    assert p.read_bytes() == b"short"
    with open(p, "ab") as f:
        f.write(b"+more")
    assert s3_target.read("notes.txt") == b"short+more"
    os.truncate(p, 3)
    assert s3_target.read("notes.txt") == b"sho"
    assert os.stat(p).st_size == 3
    with open(p, "r+b") as f:  # random write inside an existing object
        f.seek(1)
        f.write(b"X")
    assert s3_target.read("notes.txt") == b"sXo"
    (d / "empty").touch()
    assert s3_target.read("empty") == b""
    os.utime(d / "empty", (1, 1))  # accepted, a no-op
    assert s3_target.keys() == ["empty", "notes.txt"]


def test_unlink_rename_mkdir_rmdir(
    s3_server: RcloneS3, s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted]
) -> None:
    client = s3_server.client()
    for k in ("a.txt", "dir/b.txt", "dir/sub/c.txt"):
        client.put_object(Bucket=s3_config.bucket, Key=k, Body=k.encode())
    m = mount_fs(dataclasses.replace(s3_config, endpoint_url=counting_proxy.endpoint))
    os.rename(m.path / "a.txt", m.path / "dir" / "renamed.txt")
    assert (m.path / "dir" / "renamed.txt").read_bytes() == b"a.txt"
    assert not (m.path / "a.txt").exists()
    assert keys(s3_server, s3_config.bucket) == ["dir/b.txt", "dir/renamed.txt", "dir/sub/c.txt"]
    with pytest.raises(OSError) as exc:
        os.rename(m.path / "dir" / "sub", m.path / "moved")
    assert exc.value.errno == errno.EXDEV  # mv falls back to copy + delete
    with pytest.raises(OSError) as exc:
        os.rmdir(m.path / "dir")
    assert exc.value.errno == errno.ENOTEMPTY
    os.unlink(m.path / "dir" / "b.txt")
    assert not (m.path / "dir" / "b.txt").exists()
    assert "b.txt" not in os.listdir(m.path / "dir")
    with pytest.raises(IsADirectoryError):
        os.unlink(m.path / "dir" / "sub")

    # rclone's local backend stores a `newdir/` marker as an empty *file* `newdir` (real S3 and GCS
    # keep it as a marker), so a fresh LIST from rclone would show a file: list the root first so
    # the check below sees the mount's own view. (test_mkdir_write_list_rmdir does more on moto.)
    os.listdir(m.path)
    counting_proxy.reset()
    os.mkdir(m.path / "newdir")
    assert counting_proxy.snapshot()["PUT"] == 1  # the `newdir/` marker
    assert os.path.isdir(m.path / "newdir") and os.listdir(m.path / "newdir") == []
    assert "newdir" in os.listdir(m.path)
    with pytest.raises(FileExistsError):
        os.mkdir(m.path / "newdir")
    os.rmdir(m.path / "newdir")
    assert "newdir" not in os.listdir(m.path)
    assert not any(k.startswith("newdir") for k in keys(s3_server, s3_config.bucket))
    assert counting_proxy.snapshot()["DELETE"] == 1


def test_mkdir_write_list_rmdir(moto_server: MotoS3, tmp_path: Path, mount_fs: Callable[..., Mounted]) -> None:
    """The workflow rclone's local backend cannot hold (a `d/` marker beside keys under d/), on
    moto, which keeps both as S3 does: mkdir, write inside, list, rename inside, rmdir refused
    while full, then emptied and removed; a new mount sees what the store holds."""
    bucket = moto_server.create_bucket()
    with CountingProxy(moto_server.port) as proxy:
        config = MountConfig(backend="s3", bucket=bucket, endpoint_url=proxy.endpoint,
                             credentials=moto_server.credentials, cache_dir=str(tmp_path / "cache"))
        m = mount_fs(config)
        proxy.reset()
        os.mkdir(m.path / "newdir")
        assert proxy.snapshot()["PUT"] == 1  # the `newdir/` marker
        os.mkdir(m.path / "newdir" / "sub")
        (m.path / "newdir" / "a.txt").write_bytes(b"a")
        (m.path / "newdir" / "sub" / "b.txt").write_bytes(b"b")
        os.rename(m.path / "newdir" / "a.txt", m.path / "newdir" / "sub" / "c.txt")
        assert sorted(os.listdir(m.path / "newdir")) == ["sub"]
        assert sorted(os.listdir(m.path / "newdir" / "sub")) == ["b.txt", "c.txt"]
        client = moto_server.client()
        listed = client.list_objects_v2(Bucket=bucket)
        assert sorted(o["Key"] for o in listed["Contents"]) == [
            "newdir/", "newdir/sub/", "newdir/sub/b.txt", "newdir/sub/c.txt"]
        with pytest.raises(OSError) as exc:
            os.rmdir(m.path / "newdir")
        assert exc.value.errno == errno.ENOTEMPTY
        m.unmount()
        again = mount_fs(config, "again")
        assert (again.path / "newdir" / "sub" / "c.txt").read_bytes() == b"a"
        for name in ("b.txt", "c.txt"):
            os.unlink(again.path / "newdir" / "sub" / name)
        assert os.listdir(again.path / "newdir" / "sub") == []  # its marker keeps it
        os.rmdir(again.path / "newdir" / "sub")
        os.rmdir(again.path / "newdir")
        assert os.listdir(again.path) == []
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


def test_read_only_mount_refuses_writes(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="f.txt", Body=b"x")
    m = mount_fs(dataclasses.replace(s3_config, read_only=True))
    assert (m.path / "f.txt").read_bytes() == b"x"
    attempts: list[Callable[[], object]] = [
        lambda: open(m.path / "f.txt", "wb"),
        lambda: open(m.path / "new.txt", "wb"),
        lambda: os.mkdir(m.path / "d"),
        lambda: os.unlink(m.path / "f.txt"),
        lambda: os.rename(m.path / "f.txt", m.path / "g.txt"),
        lambda: os.truncate(m.path / "f.txt", 0),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS
    assert s3_server.read_object(s3_config.bucket, "f.txt") == b"x"


def test_owner_modes_and_statfs(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted], tmp_path: Path
) -> None:
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="d/f.txt", Body=b"abc")
    m = mount_fs(dataclasses.replace(s3_config, uid=1234, gid=2345, file_mode=0o640, dir_mode=0o750))
    f = os.stat(m.path / "d" / "f.txt")
    d = os.stat(m.path / "d")
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode), f.st_size) == (1234, 2345, 0o640, 3)
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (1234, 2345, 0o750)
    assert stat.S_ISDIR(os.stat(m.path).st_mode)
    with pytest.raises(PermissionError):
        os.chmod(m.path / "d" / "f.txt", 0o600)
    with pytest.raises(PermissionError):
        os.chown(m.path / "d" / "f.txt", 0, 0)
    vfs = os.statvfs(m.path)
    assert vfs.f_namemax == 255 and vfs.f_bavail > 0


def test_rename_before_close_and_reading_while_another_handle_writes(
    s3_target: S3Target, mount_fs: Callable[..., Mounted]
) -> None:
    d = s3_target.under(mount_fs(s3_target.config).path)
    with open(d / "part.tmp", "wb") as f:
        f.write(b"checkpoint")
        f.flush()
        with open(d / "part.tmp", "rb") as r:  # another handle sees the unflushed bytes
            assert r.read() == b"checkpoint"
        os.rename(d / "part.tmp", d / "final.bin")  # written before it is copied
    assert s3_target.keys() == ["final.bin"]
    assert s3_target.read("final.bin") == b"checkpoint"
    assert (d / "final.bin").read_bytes() == b"checkpoint"


def test_a_file_being_written_is_listed_before_its_close(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    # metadata_ttl=0: every readdir lists the store again, which holds nothing of the file until
    # its close: `ls` while a checkpoint is written must show it all the same (as any filesystem).
    m = mount_fs(dataclasses.replace(s3_config, metadata_ttl=0.0))
    with open(m.path / "ckpt.part", "wb") as f:
        f.write(b"x" * 1000)
        assert keys(s3_server, s3_config.bucket) == []
        assert os.listdir(m.path) == ["ckpt.part"]
        assert [e.name for e in os.scandir(m.path)] == ["ckpt.part"]
    assert keys(s3_server, s3_config.bucket) == ["ckpt.part"]
    assert os.listdir(m.path) == ["ckpt.part"]
