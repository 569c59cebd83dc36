"""The write path (fusefs.fs.write) through a real FUSE mount on real S3 servers (``rclone serve
s3`` in the bucket's root; moto in a folder made by mkdir: ``S3Target``): dd, cp, random writes,
appends, dup'd fds, streaming while open; every result is checked byte for byte through a raw S3
client. (The filesystem's own write and namespace tests are in tests/layers.)"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fusefs.config import MiB
from testing.fsmount import Mounted
from testing.servers import random_bytes
from tests.fuse.conftest import S3Target

pytestmark = pytest.mark.fuse




def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)


def test_dd_and_cp_of_a_big_file(s3_target: S3Target, mount_fs: Callable[..., Mounted], tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = random_bytes(110 * MiB + 4321, seed=1)
    src.write_bytes(data)
    d = s3_target.under(mount_fs(s3_target.config).path)
    run("dd", f"if={src}", f"of={d / 'dd.bin'}", "bs=1M")
    assert s3_target.read("dd.bin") == data
    run("cp", str(src), str(d / "cp.bin"))
    assert s3_target.read("cp.bin") == data
    assert (d / "cp.bin").stat().st_size == len(data)


def test_random_writes_append_and_overwrite(s3_target: S3Target, mount_fs: Callable[..., Mounted]) -> None:
    path = s3_target.under(mount_fs(s3_target.config).path) / "random.bin"
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
    assert s3_target.read("random.bin") == bytes(model)

    with open(path, "ab") as f:  # append to the existing object
        tail = random_bytes(2 * MiB + 1, 5)
        f.write(tail)
    model += tail
    assert s3_target.read("random.bin") == bytes(model)

    with open(path, "r+b") as rw:  # overwrite in place, read our own write before close
        rw.seek(10)
        rw.write(b"0123456789")
        rw.flush()
        rw.seek(5)
        assert rw.read(20) == bytes(model[5:10]) + b"0123456789" + bytes(model[20:25])
    model[10:20] = b"0123456789"
    assert s3_target.read("random.bin") == bytes(model)

    os.truncate(path, 1000)
    assert s3_target.read("random.bin") == bytes(model[:1000])
    assert path.read_bytes() == bytes(model[:1000])


def test_small_and_empty_files_and_dup_fds(s3_target: S3Target, mount_fs: Callable[..., Mounted]) -> None:
    d = s3_target.under(mount_fs(s3_target.config).path)
    (d / "empty").touch()
    assert s3_target.read("empty") == b""
    (d / "hello.txt").write_text("hello\n")
    assert s3_target.read("hello.txt") == b"hello\n"
    fd = os.open(d / "dup.txt", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    fd2 = os.dup(fd)
    os.write(fd, b"first ")
    os.close(fd)  # flush: visible now
    assert s3_target.read("dup.txt") == b"first "
    os.write(fd2, b"second")  # the same open file, after a flush
    os.close(fd2)
    assert s3_target.read("dup.txt") == b"first second"
    assert sorted(os.listdir(d)) == ["dup.txt", "empty", "hello.txt"]


def test_sequential_writes_stream_while_the_file_is_open(
    s3_target: S3Target, mount_fs: Callable[..., Mounted]
) -> None:
    d = s3_target.under(mount_fs(s3_target.config).path)
    data = random_bytes(40 * MiB + 17, seed=6)
    client = s3_target.server.client()
    bucket, key = s3_target.config.bucket, s3_target.key("stream.bin")
    with open(d / "stream.bin", "wb") as f:
        f.write(data[: 36 * MiB])
        f.flush()
        # More than two parts written: the multipart upload is under way, the object not visible.
        listed = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [u["Key"] for u in listed] == [key]
        assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=key)
        f.write(data[36 * MiB :])
    assert s3_target.read("stream.bin") == data
