"""Object user metadata in the stores (``BlockingStore.put(..., meta)``, ``set_meta``): moto's S3
server (both copy paths: one CopyObject, and UploadPartCopy above the single-copy limit) and
fake-gcs-server (a metadata patch that keeps the generation)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.config import MiB, MountConfig
from fusefs.filemeta import FileMeta
from fusefs.store import open_store
from fusefs.store import s3 as s3_module
from testing.servers import FakeGCS, MotoS3, random_bytes


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[FakeGCS]:
    with tempfile.TemporaryDirectory(prefix="objfs-gcs-meta-") as d, FakeGCS(Path(d)) as server:
        yield server


def test_s3_metadata_at_upload_and_replaced_in_place(moto_server: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = moto_server.create_bucket()
    store = open_store(MountConfig(backend="s3", bucket=bucket, endpoint_url=moto_server.endpoint,
                                   credentials=moto_server.credentials))
    small = store.put("small", b"bytes", {"mtime": "5", "mode": "33188"})
    assert small.meta == (("mode", "33188"), ("mtime", "5"))
    assert store.head("small").meta == small.meta
    assert store.list("", "/").objects[0].meta is None  # S3 lists no user metadata: not known
    changed = store.set_meta("small", {"mtime": "7", "mode": "33152"}, small.size, small.version)
    assert changed.version == small.version  # the same bytes: readers' pins and cached blocks stay good
    assert store.head("small").meta == (("mode", "33152"), ("mtime", "7"))
    assert store.get_range("small", 0, 5, changed.version) == b"bytes"
    # (moto ignores CopySourceIfMatch on CopyObject, so a stale version is not refused here)

    # above the single-copy limit (5 GiB on S3; 1 MiB here) the copy goes part by part
    data = random_bytes(6 * MiB + 7, 3)
    upload = store.create_multipart("big", {"mtime": "1"})
    upload.upload_part(1, data[: 5 * MiB])
    upload.upload_part(2, data[5 * MiB:])
    big = upload.complete()
    assert big.meta == (("mtime", "1"),)
    monkeypatch.setattr(s3_module, "COPY_OBJECT_LIMIT", MiB)
    monkeypatch.setattr(s3_module, "COPY_PART_SIZE", 5 * MiB)
    replaced = store.set_meta("big", {"mtime": "2", "uid": "1000"}, big.size, big.version)
    assert store.head("big").meta == (("mtime", "2"), ("uid", "1000"))
    assert replaced.size == len(data)
    assert store.get_range("big", 0, len(data), replaced.version) == data


def test_gcs_metadata_listed_and_patched_without_a_new_generation(gcs_server: FakeGCS) -> None:
    bucket = gcs_server.create_bucket()
    store = open_store(MountConfig(backend="gcs", bucket=bucket, endpoint_url=gcs_server.endpoint,
                                   credentials=gcs_server.credentials))
    own = FileMeta(1_000_000_000_500_000_000, 0o100600, 7, 8)
    info = store.put("d/f", b"bytes", own.to_store())
    assert FileMeta.from_store(info.meta) == own
    listed = store.list("d/", "/").objects
    assert [FileMeta.from_store(o.meta) for o in listed] == [own]  # a GCS listing carries it
    moved = own.merged(mode=0o100644)
    patched = store.set_meta("d/f", moved.to_store(), info.size, info.version)
    assert patched.version == info.version
    assert FileMeta.from_store(store.head("d/f").meta) == moved
    # (fake-gcs-server ignores ifGenerationMatch on a patch, so a stale generation is not refused here)
    upload = store.create_multipart("d/g", {"mtime": "3"})
    upload.upload_part(1, b"x" * 10)
    done = upload.complete()
    assert done.size == 10
    assert dict(done.meta or ())["mtime"] == dict(store.head("d/g").meta or ())["mtime"] == "3"


def test_metadata_from_a_store_is_untrusted_text() -> None:
    assert FileMeta.from_store([("Mtime", "12.5"), ("MODE", "33261"), ("uid", "x"), ("gid", "99999999999")]) == \
        FileMeta(12_500_000_000, 0o100755, None, None)
    assert FileMeta.from_store([("mode", str(0o040755))]).mode == 0o040755  # a `dir/` marker's (s3fs writes it)
    assert FileMeta.from_store([("mode", str(0o010644))]).mode is None  # a FIFO's: not a type objfs serves
    assert FileMeta.from_store([("mode", str(0o060644))]).mode is None  # a block device's
    assert FileMeta.from_store([("mtime", "-5")]).mtime_ns is None
    assert FileMeta.from_store([("mode", str(0o120777))]).is_symlink
    assert FileMeta(5_000_000_001, None, None, None).to_store() == {"mtime": "5.000000001"}
