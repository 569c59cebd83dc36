"""The write path (fusefs.fs.write) through a real FUSE mount on a real ``rclone serve s3``: dd, cp,
random writes, appends, dup'd fds, streaming while open; every result is checked byte for byte
through a raw S3 client. (The filesystem's own write and namespace tests are in test_fs_write.py.)"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fusefs.config import MiB, MountConfig
from testing.fsmount import Mounted
from testing.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse




def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)


def test_dd_and_cp_of_a_big_file(
    s3_server: RcloneS3, bucket: str, s3_config: MountConfig, mount_fs: Callable[..., Mounted], tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    data = random_bytes(110 * MiB + 4321, seed=1)
    src.write_bytes(data)
    m = mount_fs(s3_config)
    run("dd", f"if={src}", f"of={m.path / 'dd.bin'}", "bs=1M")
    assert s3_server.read_object(bucket, "dd.bin") == data
    run("cp", str(src), str(m.path / "cp.bin"))
    assert s3_server.read_object(bucket, "cp.bin") == data
    assert (m.path / "cp.bin").stat().st_size == len(data)


def test_random_writes_append_and_overwrite(
    s3_server: RcloneS3, bucket: str, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    path = m.path / "random.bin"
    model = bytearray()

    def apply(offset: int, chunk: bytes) -> None:
        model.extend(bytes(max(0, offset + len(chunk) - len(model))))
        model[offset : offset + len(chunk)] = chunk

    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        writes = [(0, random_bytes(6 * MiB, 2)), (50 * MiB, random_bytes(MiB, 3)), (3 * MiB, random_bytes(4 * MiB, 4))]
        for offset, chunk in writes:
            assert os.pwrite(fd, chunk, offset) == len(chunk)
            apply(offset, chunk)
    finally:
        os.close(fd)
    assert s3_server.read_object(bucket, "random.bin") == bytes(model)

    with open(path, "ab") as f:  # append to the existing object
        tail = random_bytes(2 * MiB + 1, 5)
        f.write(tail)
    model += tail
    assert s3_server.read_object(bucket, "random.bin") == bytes(model)

    with open(path, "r+b") as rw:  # overwrite in place, read our own write before close
        rw.seek(10)
        rw.write(b"0123456789")
        rw.flush()
        rw.seek(5)
        assert rw.read(20) == bytes(model[5:10]) + b"0123456789" + bytes(model[20:25])
    model[10:20] = b"0123456789"
    assert s3_server.read_object(bucket, "random.bin") == bytes(model)

    os.truncate(path, 1000)
    assert s3_server.read_object(bucket, "random.bin") == bytes(model[:1000])
    assert path.read_bytes() == bytes(model[:1000])


def test_small_and_empty_files_and_dup_fds(
    s3_server: RcloneS3, bucket: str, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    (m.path / "empty").touch()
    assert s3_server.read_object(bucket, "empty") == b""
    (m.path / "hello.txt").write_text("hello\n")
    assert s3_server.read_object(bucket, "hello.txt") == b"hello\n"
    fd = os.open(m.path / "dup.txt", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    fd2 = os.dup(fd)
    os.write(fd, b"first ")
    os.close(fd)  # flush: visible now
    assert s3_server.read_object(bucket, "dup.txt") == b"first "
    os.write(fd2, b"second")  # the same open file, after a flush
    os.close(fd2)
    assert s3_server.read_object(bucket, "dup.txt") == b"first second"


def test_sequential_writes_stream_while_the_file_is_open(
    s3_server: RcloneS3, bucket: str, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    data = random_bytes(40 * MiB + 17, seed=6)
    client = s3_server.client()
    with open(m.path / "stream.bin", "wb") as f:
        f.write(data[: 36 * MiB])
        f.flush()
        # More than two parts written: the multipart upload is under way, the object not visible.
        listed = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [u["Key"] for u in listed] == ["stream.bin"]
        assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="stream.bin")
        f.write(data[36 * MiB :])
    assert s3_server.read_object(bucket, "stream.bin") == data
