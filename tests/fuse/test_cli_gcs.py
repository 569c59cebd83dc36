"""``objfs mount gs://...`` end to end against fake-gcs-server: list, read, write, read back."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs import kernel
from testing.servers import FakeGCS
from tests.fuse.test_cli import objfs

pytestmark = [pytest.mark.fuse, pytest.mark.gcs]


@pytest.fixture(scope="module")
def gcs() -> Iterator[FakeGCS]:
    with tempfile.TemporaryDirectory(prefix="objfs-gcs-cli-") as d, FakeGCS(Path(d)) as server:
        yield server


def test_mount_gcs_bucket_read_and_write(gcs: FakeGCS, tmp_path: Path) -> None:
    bucket = gcs.create_bucket()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    gcs.client().bucket(bucket).blob("models/weights.bin").upload_from_string(payload)
    target = tmp_path / "mnt"
    target.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOOGLE_")}
    r = objfs("mount", f"gs://{bucket}", str(target), "--endpoint-url", gcs.endpoint,
              "--cache-dir", str(tmp_path / "cache"), env=env)
    assert r.returncode == 0, r.stderr
    try:
        assert os.listdir(target) == ["models"]
        assert (target / "models" / "weights.bin").stat().st_size == len(payload)
        got = (target / "models" / "weights.bin").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        (target / "models" / "note.txt").write_bytes(b"written through objfs")
        blob = gcs.client().bucket(bucket).blob("models/note.txt")
        assert blob.download_as_bytes() == b"written through objfs"
    finally:
        r = objfs("unmount", str(target))
        if kernel.find_mount(str(target)) is not None:
            kernel.unmount(str(target), lazy=True)
    assert r.returncode == 0, r.stderr
