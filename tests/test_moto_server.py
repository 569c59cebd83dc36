"""The moto S3 server helper (``tests.servers.MotoS3``): objfs's S3 client works against it, and
a versioned bucket keeps the versions a test overwrites or deletes (what rclone cannot)."""

from __future__ import annotations

from fusefs.config import MountConfig
from fusefs.store import open_store
from tests.servers import MotoS3


def test_objfs_store_and_versions_on_moto(moto_server: MotoS3) -> None:
    bucket = moto_server.create_bucket(versioned=True)
    store = open_store(MountConfig(backend="s3", bucket=bucket, endpoint_url=moto_server.endpoint,
                                   credentials=moto_server.credentials))
    first = store.put("dir/a", b"first")
    store.put("dir/a", b"second!")
    store.delete("dir/a")
    page = store.list("dir/", "/")
    assert page.objects == []
    versions = moto_server.client().list_object_versions(Bucket=bucket, Prefix="dir/")["Versions"]
    assert sorted(v["Size"] for v in versions) == [5, 7]
    old = next(v for v in versions if v["ETag"].strip('"') == first.version)
    body = moto_server.client().get_object(Bucket=bucket, Key="dir/a", VersionId=old["VersionId"])["Body"].read()
    assert body == b"first"


def test_unversioned_bucket_on_moto(moto_server: MotoS3) -> None:
    bucket = moto_server.create_bucket()
    assert "Status" not in moto_server.client().get_bucket_versioning(Bucket=bucket)
    store = open_store(MountConfig(backend="s3", bucket=bucket, endpoint_url=moto_server.endpoint,
                                   credentials=moto_server.credentials))
    info = store.put("k", b"0123456789")
    assert store.get_range("k", 2, 3, info.version) == b"234"
