"""Snapshots and clones (controller side) against real stores: rclone's S3 server (keeps no
versions: snapshots are copies) and fake-gcs-server. The controller is called in process; what
it leaves in the store is read behind its back with plain SDK clients."""

from __future__ import annotations

import os
import secrets as token
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from csi import volume_id as V
from csi.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange, Unavailable
from csi.services import snapshots as S
from csi.services.controller import ControllerService
from csi.v1 import csi_pb2 as pb
from testing.pods import cap
from testing.proxy import INTERNAL, CountingProxy, FaultPlan, Tally
from testing.servers import FakeGCS, RcloneS3, S3Server, random_bytes


def s3_secrets(s3: S3Server) -> dict[str, str]:
    return {"accessKeyID": s3.access_key, "secretAccessKey": s3.secret_key}


def create(ctl: ControllerService, name: str, params: dict[str, str], sec: dict[str, str],
           source: pb.VolumeContentSource | None = None, capacity: int = 1 << 30) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=name, volume_capabilities=[cap()], parameters=params, secrets=sec,
                                 capacity_range=pb.CapacityRange(required_bytes=capacity))
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return ctl.CreateVolume(req, None).volume  # type: ignore[arg-type]


def snap(ctl: ControllerService, name: str, volume_id: str, sec: dict[str, str], **params: str) -> pb.Snapshot:
    return ctl.CreateSnapshot(pb.CreateSnapshotRequest(  # type: ignore[arg-type]
        name=name, source_volume_id=volume_id, secrets=sec, parameters=params), None).snapshot


def from_snapshot(snapshot_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def from_volume(volume_id: str) -> pb.VolumeContentSource:
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=volume_id))


def listed(ctl: ControllerService, sec: dict[str, str], **kw: Any) -> list[pb.Snapshot]:
    resp = ctl.ListSnapshots(pb.ListSnapshotsRequest(secrets=sec, **kw), None)  # type: ignore[arg-type]
    return [e.snapshot for e in resp.entries]


class S3View:
    """Objects of a bucket as plain boto3 sees them."""

    def __init__(self, s3: S3Server) -> None:
        self.client = s3.client()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def tree(self, bucket: str, prefix: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                rel = o["Key"][len(prefix):]
                if rel != S.MARKER:
                    out[rel] = self.client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_snapshot_restore_clone_prefix_volumes(s3_server: RcloneS3, bucket: str) -> None:
    """Snapshot, then change, delete and add files; a volume from the snapshot has every byte of
    snapshot time, a clone of the volume has the current bytes; each outlives the other's deletion."""
    ctl, sec, view = ControllerService(), s3_secrets(s3_server), S3View(s3_server)
    params = {"endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket, "prefix": "vols"}
    vol = create(ctl, "pvc-src", params, sec)
    vid = V.parse(vol.volume_id)
    # (no "dir/" marker: rclone's local backend cannot keep one beside files in dir/)
    then = {"a.txt": b"alpha", "dir/b.bin": random_bytes(300_000, 1), "dir/sub/c": b"c" * 7,
            "empty": b""}
    for k, v in then.items():
        view.put(bucket, vid.prefix + k, v)

    s = snap(ctl, "snap-1", vol.volume_id, sec)
    assert s.ready_to_use and s.source_volume_id == vol.volume_id
    assert s.size_bytes == sum(map(len, then.values())) and s.creation_time.seconds > 0
    sid = V.parse_snapshot(s.snapshot_id)
    assert sid.bucket == bucket and sid.prefix == ".objfs-snapshots/snap-1/"
    assert not sid.prefix.startswith(vid.prefix)  # the volume's mount does not show it
    # idempotent by name and source; the same name of another source is refused
    assert snap(ctl, "snap-1", vol.volume_id, sec) == s
    other = create(ctl, "pvc-other", params, sec)
    with pytest.raises(AlreadyExists):
        snap(ctl, "snap-1", other.volume_id, sec)

    view.put(bucket, vid.prefix + "a.txt", b"ALPHA changed")
    view.delete(bucket, vid.prefix + "dir/b.bin")
    view.put(bucket, vid.prefix + "new.txt", b"after the snapshot")
    now = view.tree(bucket, vid.prefix)

    restored = create(ctl, "pvc-restored", params, sec, from_snapshot(s.snapshot_id))
    assert restored.content_source.snapshot.snapshot_id == s.snapshot_id
    assert view.tree(bucket, V.parse(restored.volume_id).prefix) == then
    clone = create(ctl, "pvc-clone", params, sec, from_volume(vol.volume_id))
    assert view.tree(bucket, V.parse(clone.volume_id).prefix) == now
    # repeats are idempotent; another source under the same name is not
    assert create(ctl, "pvc-restored", params, sec, from_snapshot(s.snapshot_id)).volume_id == restored.volume_id
    with pytest.raises(AlreadyExists):
        create(ctl, "pvc-restored", params, sec, from_volume(vol.volume_id))
    with pytest.raises(OutOfRange):
        create(ctl, "pvc-small", params, sec, from_snapshot(s.snapshot_id), capacity=10)
    missing = str(V.SnapshotId("s3", bucket, ".objfs-snapshots/none/", s3_server.endpoint, "us-east-1"))
    for gone in (missing, "non-existing-snapshot-id"):
        with pytest.raises(NotFound):
            create(ctl, "pvc-x", params, sec, from_snapshot(gone))
    with pytest.raises(NotFound):
        create(ctl, "pvc-x", params, sec, from_volume(vol.volume_id.replace("pvc-src", "pvc-none")))
    with pytest.raises(InvalidArgument):
        create(ctl, ".objfs-snapshots", params, sec)

    assert [x.snapshot_id for x in listed(ctl, sec, snapshot_id=s.snapshot_id)] == [s.snapshot_id]
    assert [x.snapshot_id for x in listed(ctl, sec, source_volume_id=vol.volume_id)] == [s.snapshot_id]
    assert listed(ctl, sec, source_volume_id=other.volume_id) == []
    assert listed(ctl, sec, snapshot_id=missing) == [] and listed(ctl, sec, snapshot_id="none-exist-id") == []

    # Deleting the source volume leaves the snapshot whole; deleting the snapshot leaves the restore.
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=sec), None)  # type: ignore[arg-type]
    assert view.keys(bucket, vid.prefix) == []
    again = create(ctl, "pvc-again", params, sec, from_snapshot(s.snapshot_id))
    assert view.tree(bucket, V.parse(again.volume_id).prefix) == then
    for _ in range(2):  # idempotent
        ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id, secrets=sec), None)  # type: ignore[arg-type]
    assert view.keys(bucket, sid.prefix) == [] and listed(ctl, sec) == []
    assert view.tree(bucket, V.parse(restored.volume_id).prefix) == then
    # a repeat of a finished CreateVolume is answered from its marker: its source may be gone
    assert create(ctl, "pvc-restored", params, sec, from_snapshot(s.snapshot_id)).volume_id == restored.volume_id


def test_snapshot_of_bucket_volume_needs_a_snapshot_bucket(s3_server: RcloneS3) -> None:
    ctl, sec, view = ControllerService(), s3_secrets(s3_server), S3View(s3_server)
    params = {"endpoint": s3_server.endpoint, "region": "us-east-1"}
    vol = create(ctl, "pvc-own-" + token.token_hex(4), params, sec)
    vid = V.parse(vol.volume_id)
    view.put(vid.bucket, "x/y", b"data")
    with pytest.raises(InvalidArgument, match=r"parameters\.bucket"):
        snap(ctl, "s-own", vol.volume_id, sec)
    with pytest.raises(InvalidArgument, match="own bucket"):
        snap(ctl, "s-own", vol.volume_id, sec, bucket=vid.bucket)
    snapshots = s3_server.create_bucket()
    s = snap(ctl, "s-own", vol.volume_id, sec, bucket=snapshots)
    assert V.parse_snapshot(s.snapshot_id).bucket == snapshots and s.size_bytes == 4
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=sec), None)  # type: ignore[arg-type]
    restored = create(ctl, "pvc-back-" + token.token_hex(4), params, sec, from_snapshot(s.snapshot_id))
    assert view.tree(V.parse(restored.volume_id).bucket, "") == {"x/y": b"data"}
    # an unfiltered list finds it (this controller has seen the root)
    assert [x.snapshot_id for x in listed(ctl, sec)] == [s.snapshot_id]

    # Snapshots kept in the bucket of another bucket-per-volume volume outlive that volume's deletion.
    host = create(ctl, "pvc-host-" + token.token_hex(4), params, sec)
    host_bucket = V.parse(host.volume_id).bucket
    view.put(host_bucket, "hosted-data", b"x")
    s2 = snap(ctl, "s-hosted", restored.volume_id, sec, bucket=host_bucket)
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=host.volume_id, secrets=sec), None)  # type: ignore[arg-type]
    assert view.keys(host_bucket, "") == [V.parse_snapshot(s2.snapshot_id).prefix + p
                                         for p in ("data/x/y", S.MANIFEST)]
    back = create(ctl, "pvc-back2-" + token.token_hex(4), params, sec, from_snapshot(s2.snapshot_id))
    assert view.tree(V.parse(back.volume_id).bucket, "") == {"x/y": b"data"}


#: 10,000 objects: 23-45 s to snapshot on a shared 2-core machine, plus ~20 s to PUT them
#: (OBJFS_BIG_SNAPSHOT=2000 for a quicker run)
BIG = int(os.environ.get("OBJFS_BIG_SNAPSHOT", "10000"))


def big_snapshot(server: S3Server, bucket: str, n: int, writers: int = 8) -> tuple[pb.Snapshot, Tally, float]:
    """A volume of ``n`` small objects in 50 folders, snapshotted through a counting proxy:
    (the snapshot, the requests of CreateSnapshot alone, its seconds)."""
    sec = s3_secrets(server)
    with CountingProxy(server.port) as proxy:
        params = {"endpoint": proxy.endpoint, "region": "us-east-1", "bucket": bucket}
        ctl = ControllerService()
        vol = create(ctl, "pvc-big", params, sec)
        prefix = V.parse(vol.volume_id).prefix
        clients = [server.client() for _ in range(writers)]
        with ThreadPoolExecutor(4 * writers) as pool:
            list(pool.map(lambda i: clients[i % writers].put_object(Bucket=bucket, Key=f"{prefix}d{i % 50}/f{i}",
                                                                     Body=b"%d" % i), range(n)))
        proxy.reset()
        t0 = time.monotonic()
        s = snap(ctl, "snap-big", vol.volume_id, sec)
        return s, proxy.tally(), time.monotonic() - t0


def test_snapshot_of_many_objects_counts_requests(s3_server: RcloneS3, bucket: str) -> None:
    """One LIST pass and one COPY per object, no HEAD per object, the manifest one PUT."""
    n = BIG
    view = S3View(s3_server)
    s, tally, took = big_snapshot(s3_server, bucket, n)
    counts = tally.requests
    print(f"\nsnapshot of {n} objects: {took:.1f} s, requests {dict(counts)}, errors {tally.errors}")
    assert s.ready_to_use and s.size_bytes == sum(len(b"%d" % i) for i in range(n))
    # a COPY the store answered with an error is sent again (the retry policy): counted too
    assert n <= counts["COPY"] <= n + tally.errors
    assert counts["LIST"] == n // 1000 + 1 and counts["PUT"] == 1  # the pages; the manifest
    assert counts["HEAD"] == 1 and counts["GET"] == 1  # the source's marker; no manifest yet
    assert counts["GET-VERSIONING"] == 1  # the bucket keeps no versions: copies
    assert tally.total == counts["COPY"] + counts["LIST"] + 4
    manifest = S.Manifest.loads(s3_server.read_object(bucket, V.parse_snapshot(s.snapshot_id).prefix + S.MANIFEST))
    assert manifest.count == n and len({e.key for e in manifest.entries}) == n
    sample = view.tree(bucket, V.parse_snapshot(s.snapshot_id).prefix + S.DATA + "d7/")
    assert len(sample) == n // 50 and all(v == k.split("f")[1].encode() for k, v in sample.items())


def test_store_fault_during_copies_leaves_no_snapshot(s3_server: RcloneS3, bucket: str) -> None:
    view = S3View(s3_server)
    sec = s3_secrets(s3_server)
    with CountingProxy(s3_server.port) as proxy:
        params = {"endpoint": proxy.endpoint, "region": "us-east-1", "bucket": bucket}
        ctl = ControllerService()
        vol = create(ctl, "pvc-faulty", params, sec)
        prefix = V.parse(vol.volume_id).prefix
        files = {f"f{i:03d}": random_bytes(1000 + i, i) for i in range(200)}
        for k, v in files.items():
            view.put(bucket, prefix + k, v)
        # every copy after the 50th fails (past the retries): the snapshot cannot complete
        proxy.inject(FaultPlan(rate=1.0, burst=1_000_000, kinds=(INTERNAL,), only=frozenset({"COPY"}), skip=50))
        with pytest.raises(Unavailable):
            snap(ctl, "snap-faulty", vol.volume_id, sec)
        proxy.inject(None)
        folder = S.folder_for("snap-faulty")
        assert view.keys(bucket, folder) == []  # no manifest, and the partial copies were removed
        assert listed(ctl, sec, source_volume_id=vol.volume_id) == []
        s = snap(ctl, "snap-faulty", vol.volume_id, sec)  # the retry makes it whole
        restored = create(ctl, "pvc-faulty-back", params, sec, from_snapshot(s.snapshot_id))
    assert view.tree(bucket, V.parse(restored.volume_id).prefix) == files


@pytest.fixture(scope="module")
def gcs() -> Iterator[FakeGCS]:
    with tempfile.TemporaryDirectory(prefix="objfs-gcs-") as d, FakeGCS(Path(d)) as server:
        yield server


@pytest.mark.gcs
def test_gcs_snapshot_restore_clone(gcs: FakeGCS) -> None:
    ctl = ControllerService()
    client = gcs.client()
    bucket = gcs.create_bucket()
    params = {"backend": "gcs", "endpoint": gcs.endpoint, "bucket": bucket}
    vol = create(ctl, "pvc-g", params, {})
    prefix = V.parse(vol.volume_id).prefix
    then = {"a": b"one", "d/b": random_bytes(100_000, 3), "d/": b""}
    for k, v in then.items():
        client.bucket(bucket).blob(prefix + k).upload_from_string(v)
    s = snap(ctl, "gsnap", vol.volume_id, {})
    assert s.ready_to_use and s.size_bytes == sum(map(len, then.values()))
    client.bucket(bucket).blob(prefix + "a").upload_from_string(b"changed")
    client.bucket(bucket).blob(prefix + "d/b").delete()

    def tree(p: str) -> dict[str, bytes]:
        return {b.name[len(p):]: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=p)
                if b.name[len(p):] != S.MARKER}

    now = tree(prefix)
    restored = create(ctl, "pvc-g2", params, {}, from_snapshot(s.snapshot_id))
    assert tree(V.parse(restored.volume_id).prefix) == then
    clone = create(ctl, "pvc-g3", params, {}, from_volume(vol.volume_id))
    assert tree(V.parse(clone.volume_id).prefix) == now
    ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id), None)  # type: ignore[arg-type]
    assert tree(V.parse_snapshot(s.snapshot_id).prefix) == {}


def test_object_deleted_during_the_snapshot_is_left_out(s3_server: RcloneS3, bucket: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An object listed but gone by the time of its copy is left out (one HEAD says so), not a
    failed snapshot: the volume is live while the snapshot runs."""
    ctl, sec, view = ControllerService(), s3_secrets(s3_server), S3View(s3_server)
    params = {"endpoint": s3_server.endpoint, "region": "us-east-1", "bucket": bucket}
    vol = create(ctl, "pvc-live", params, sec)
    prefix = V.parse(vol.volume_id).prefix
    view.put(bucket, prefix + "kept", b"kept")
    view.put(bucket, prefix + "gone", b"deleted meanwhile")
    real = S.list_volume

    def list_then_delete(store: Any, pfx: str, policy: Any, versions: bool = False) -> Any:
        listed_objects = real(store, pfx, policy, versions)
        view.delete(bucket, prefix + "gone")
        return listed_objects

    monkeypatch.setattr(S, "list_volume", list_then_delete)
    s = snap(ctl, "snap-live", vol.volume_id, sec)
    manifest = S.Manifest.loads(s3_server.read_object(bucket, V.parse_snapshot(s.snapshot_id).prefix + S.MANIFEST))
    assert [e.key for e in manifest.entries] == ["kept"] and s.size_bytes == 4


@pytest.mark.gcs
def test_gcs_store_fault_during_copies_then_restore_retried(gcs: FakeGCS) -> None:
    """On GCS too: a snapshot whose rewrites fail is not there at all, and its retry is whole; a
    restore whose copies fail leaves an unpopulated volume that the retry fills."""
    client = gcs.client()
    bucket = gcs.create_bucket()
    with CountingProxy(gcs.port) as proxy:
        params = {"backend": "gcs", "endpoint": proxy.endpoint, "bucket": bucket}
        ctl = ControllerService()
        vol = create(ctl, "pvc-gf", params, {})
        prefix = V.parse(vol.volume_id).prefix
        files = {f"f{i:02d}": random_bytes(500 + i, i) for i in range(60)}
        for k, v in files.items():
            client.bucket(bucket).blob(prefix + k).upload_from_string(v)
        plan = FaultPlan(rate=1.0, burst=1_000_000, kinds=(INTERNAL,), only=frozenset({"COPY"}), skip=20)
        proxy.inject(plan)
        with pytest.raises(Unavailable):
            snap(ctl, "gsnap-faulty", vol.volume_id, {})
        proxy.inject(None)
        assert list(client.list_blobs(bucket, prefix=S.folder_for("gsnap-faulty"))) == []
        s = snap(ctl, "gsnap-faulty", vol.volume_id, {})
        proxy.inject(FaultPlan(rate=1.0, burst=1_000_000, kinds=(INTERNAL,), only=frozenset({"COPY"}), skip=20))
        with pytest.raises(Unavailable):
            create(ctl, "pvc-gf2", params, {}, from_snapshot(s.snapshot_id))
        proxy.inject(None)
        restored = create(ctl, "pvc-gf2", params, {}, from_snapshot(s.snapshot_id))
    rprefix = V.parse(restored.volume_id).prefix
    got = {b.name[len(rprefix):]: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=rprefix)}
    marker = got.pop(S.MARKER)
    assert got == files and b'"populated": true' in marker
