"""Snapshots on a store that keeps versions (moto's S3 server, a versioned bucket: the manifest
pins version ids, nothing is copied) and on an unversioned moto bucket (copies), and read-only
volumes of a snapshot served through its manifest by the node's data service on a real mount.

Every restore is compared byte for byte with the volume's content at snapshot time, after the
volume changed, lost files and was deleted."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import uuid
from pathlib import Path

import grpc
import pytest
import trio

from csi import volume_id as V
from csi.errors import FailedPrecondition, InvalidArgument
from csi.services import snapshots as S
from csi.services.controller import ControllerService
from csi.v1 import csi_pb2 as pb
from fusefs import errors
from fusefs.config import ConfigError, MountConfig
from fusefs.service.local import LocalData
from fusefs.service.scope import ReadOnlyError
from fusefs.service.snapshot import SnapshotData
from fusefs.store import open_store
from fusefs.store.base import AsyncStore
from testing.plugin import Client, PluginDirs, PluginProcess
from testing.pods import cap, kubelet_context
from testing.servers import MotoS3, random_bytes
from tests.csi.test_snapshots import BIG, S3View, big_snapshot, create, from_snapshot, from_volume, s3_secrets, snap

Mode = pb.VolumeCapability.AccessMode




def fill(view: S3View, bucket: str, prefix: str) -> dict[str, bytes]:
    """The volume's content at snapshot time (a dir/ marker too: moto keeps one beside files)."""
    then = {"a.txt": b"alpha", "dir/": b"", "dir/b.bin": random_bytes(300_000, 1), "dir/sub/c": b"c" * 7,
            "empty": b"", "gone/d": b"deleted later"}
    for k, v in then.items():
        view.put(bucket, prefix + k, v)
    return then


def change(view: S3View, bucket: str, prefix: str) -> None:
    """After the snapshot: rewrite, delete and add files."""
    view.put(bucket, prefix + "a.txt", b"ALPHA changed after the snapshot")
    view.put(bucket, prefix + "dir/b.bin", random_bytes(1000, 2))
    view.delete(bucket, prefix + "gone/d")
    view.put(bucket, prefix + "new.txt", b"after the snapshot")


def delete_volume(ctl: ControllerService, volume_id: str, sec: dict[str, str]) -> None:
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id, secrets=sec), None)  # type: ignore[arg-type]


def delete_snapshot(ctl: ControllerService, snapshot_id: str, sec: dict[str, str]) -> None:
    ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=sec), None)  # type: ignore[arg-type]


def manifest_of(s3: MotoS3, snapshot_id: str) -> S.Manifest:
    sid = V.parse_snapshot(snapshot_id)
    return S.Manifest.loads(s3.read_object(sid.bucket, sid.prefix + S.MANIFEST))


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_snapshot_on_moto_restores_snapshot_time_bytes(moto_server: MotoS3, versioned: bool) -> None:
    ctl, sec, view = ControllerService(), s3_secrets(moto_server), S3View(moto_server)
    bucket = moto_server.create_bucket(versioned=versioned)
    params = {"endpoint": moto_server.endpoint, "region": "us-east-1", "bucket": bucket, "prefix": "vols"}
    vol = create(ctl, "pvc-src", params, sec)
    prefix = V.parse(vol.volume_id).prefix
    then = fill(view, bucket, prefix)

    s = snap(ctl, "snap-1", vol.volume_id, sec)
    assert s.ready_to_use and s.size_bytes == sum(map(len, then.values()))
    sid = V.parse_snapshot(s.snapshot_id)
    manifest = manifest_of(moto_server, s.snapshot_id)
    assert {e.key for e in manifest.entries} == set(then)
    if versioned:
        # the manifest pins the objects' version ids where they are: no copy was made
        assert manifest.pinned and manifest.data == prefix
        assert all(e.copy.startswith("vid:") for e in manifest.entries)
        assert view.keys(bucket, sid.prefix) == [sid.prefix + S.MANIFEST]
    else:
        assert not manifest.pinned and manifest.data == sid.prefix + S.DATA
        assert view.tree(bucket, sid.prefix + S.DATA) == then
    assert snap(ctl, "snap-1", vol.volume_id, sec) == s  # idempotent

    change(view, bucket, prefix)
    now = view.tree(bucket, prefix)
    assert now != then
    writable = create(ctl, "pvc-restored", params, sec, from_snapshot(s.snapshot_id))
    assert view.tree(bucket, V.parse(writable.volume_id).prefix) == then
    clone = create(ctl, "pvc-clone", params, sec, from_volume(vol.volume_id))
    assert view.tree(bucket, V.parse(clone.volume_id).prefix) == now

    # The source volume deleted: its objects are gone from listings, the snapshot is whole.
    delete_volume(ctl, vol.volume_id, sec)
    assert view.keys(bucket, prefix) == []
    again = create(ctl, "pvc-again", params, sec, from_snapshot(s.snapshot_id))
    assert view.tree(bucket, V.parse(again.volume_id).prefix) == then

    # A read-only volume of the snapshot copies nothing and holds the snapshot while it exists.
    ro = pb.CreateVolumeRequest(name="pvc-ro", volume_capabilities=[cap(Mode.MULTI_NODE_READER_ONLY)],
                                parameters=params, secrets=sec, volume_content_source=from_snapshot(s.snapshot_id))
    view_vol = ctl.CreateVolume(ro, None).volume  # type: ignore[arg-type]
    vvid = V.parse(view_vol.volume_id)
    assert vvid.kind == V.KIND_SNAPSHOT and vvid.snapshot_folder == sid.prefix
    assert view.keys(bucket, vvid.prefix) == [vvid.prefix + S.MARKER]
    assert ctl.CreateVolume(ro, None).volume.volume_id == view_vol.volume_id  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition, match="pvc-ro"):
        delete_snapshot(ctl, s.snapshot_id, sec)
    with pytest.raises(InvalidArgument, match="read-only volume of a snapshot"):
        snap(ctl, "snap-of-view", view_vol.volume_id, sec)
    # a clone of the read-only volume is a writable volume of the snapshot
    from_view = create(ctl, "pvc-from-view", params, sec, from_volume(view_vol.volume_id))
    assert view.tree(bucket, V.parse(from_view.volume_id).prefix) == then
    delete_volume(ctl, view_vol.volume_id, sec)
    delete_snapshot(ctl, s.snapshot_id, sec)
    assert view.keys(bucket, sid.prefix) == []
    # restores own their data: they outlive the snapshot
    assert view.tree(bucket, V.parse(writable.volume_id).prefix) == then


def test_versioned_snapshot_of_many_objects_counts_requests(moto_server: MotoS3) -> None:
    """A versioned bucket: one versioning GET, one ListObjectVersions pass, one PUT (the
    manifest), no COPY and no HEAD per object."""
    n = BIG
    s, tally, took = big_snapshot(moto_server, moto_server.create_bucket(versioned=True), n, writers=4)
    counts = tally.requests
    print(f"\nversioned snapshot of {n} objects: {took:.1f} s, requests {dict(counts)}, errors {tally.errors}")
    assert s.ready_to_use and s.size_bytes == sum(len(b"%d" % i) for i in range(n))
    assert counts["LIST-VERSIONS"] == n // 1000 + 1 and counts["PUT"] == 1 and counts["GET-VERSIONING"] == 1
    assert counts["HEAD"] == 1 and counts["GET"] == 1  # the source's marker; no manifest yet
    assert tally.total == counts["LIST-VERSIONS"] + 4
    manifest = manifest_of(moto_server, s.snapshot_id)
    assert manifest.count == n and manifest.pinned


# -- read-only volumes of a snapshot on a real mount -------------------------------------------------
def tree_of(root: str) -> dict[str, bytes]:
    """Every file under a mounted volume, as a reader sees it (directories implied)."""
    out: dict[str, bytes] = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.mark.fuse
@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
def test_read_only_volume_of_a_snapshot_reads_through_the_manifest(
        moto_server: MotoS3, dirs: PluginDirs, versioned: bool) -> None:
    """NodePublish of a ReadOnlyMany volume whose content source is a snapshot: the pod's server
    reads through the node's data service, which serves the manifest's versions (the source
    changed and lost files since, then was deleted); writes fail with EROFS."""
    sec = s3_secrets(moto_server)
    view = S3View(moto_server)
    bucket = moto_server.create_bucket(versioned=versioned)
    params = {"endpoint": moto_server.endpoint, "region": "us-east-1", "bucket": bucket, "prefix": "vols"}
    plugin = PluginProcess(dirs, node_id="node-1")
    client: Client = plugin.start()
    try:
        vol = client.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-data", volume_capabilities=[cap(Mode.MULTI_NODE_MULTI_WRITER)], parameters=params,
            secrets=sec)).volume
        prefix = V.parse(vol.volume_id).prefix
        then = fill(view, bucket, prefix)
        s = client.controller.CreateSnapshot(pb.CreateSnapshotRequest(
            name="snap-ro", source_volume_id=vol.volume_id, secrets=sec)).snapshot
        change(view, bucket, prefix)
        client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=sec))
        assert view.keys(bucket, prefix) == []

        ro = client.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-ro", volume_capabilities=[cap(Mode.MULTI_NODE_READER_ONLY)], parameters=params, secrets=sec,
            volume_content_source=from_snapshot(s.snapshot_id))).volume
        pod_uid = str(uuid.uuid4())
        parent = Path(dirs.root, "pods", pod_uid, "volumes", "kubernetes.io~csi", "pv-ro")
        parent.mkdir(parents=True)
        target = str(parent / "mount")
        client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=ro.volume_id, target_path=target, volume_capability=cap(Mode.MULTI_NODE_READER_ONLY),
            readonly=True, volume_context={**ro.volume_context, **kubelet_context(pod_uid)}, secrets=sec))
        # an object put in the snapshot's data folder behind its back is not the snapshot's
        view.put(bucket, V.parse_snapshot(s.snapshot_id).prefix + S.DATA + "intruder", b"not in the manifest")
        files = {k: v for k, v in then.items() if not k.endswith("/")}
        assert tree_of(target) == files  # every byte of snapshot time, nothing of later
        assert not os.path.exists(os.path.join(target, "intruder"))
        assert sorted(os.listdir(target)) == ["a.txt", "dir", "empty", "gone"]
        with pytest.raises(OSError) as exc, open(os.path.join(target, "a.txt"), "wb") as f:
            f.write(b"x")
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            os.unlink(os.path.join(target, "dir/sub/c"))
        assert exc.value.errno == errno.EROFS
        if versioned:  # no copies: only the intruder is there
            data = V.parse_snapshot(s.snapshot_id).prefix + S.DATA
            assert view.keys(bucket, data) == [data + "intruder"]

        # The snapshot is in use while the volume exists.
        with pytest.raises(grpc.RpcError) as rpc:
            client.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id, secrets=sec))
        assert rpc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=ro.volume_id, target_path=target))
        client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=ro.volume_id, secrets=sec))
        client.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id, secrets=sec))
        assert view.keys(bucket, V.parse_snapshot(s.snapshot_id).prefix) == []
    finally:
        client.close()
        plugin.kill(signal.SIGTERM)


# -- the data service of a snapshot's volume, called as a sidecar would --------------------------
def test_snapshot_data_service_answers_only_the_manifest(moto_server: MotoS3) -> None:
    """Listings page through the manifest; a key, version or size it does not list is refused
    before any request; writes are EROFS; reads are of the pinned versions."""
    ctl, sec, view = ControllerService(), s3_secrets(moto_server), S3View(moto_server)
    bucket = moto_server.create_bucket(versioned=True)
    params = {"endpoint": moto_server.endpoint, "region": "us-east-1", "bucket": bucket}
    vol = create(ctl, "pvc-svc", params, sec)
    prefix = V.parse(vol.volume_id).prefix
    files = {f"d/f{i}": b"%d" % i for i in range(5)} | {"top": b"top", "e/x": b"x"}
    for k, v in files.items():
        view.put(bucket, prefix + k, v)
    s = snap(ctl, "snap-svc", vol.volume_id, sec)
    for k in files:
        view.put(bucket, prefix + k, b"later")
    ro = pb.CreateVolumeRequest(name="pvc-svc-ro", volume_capabilities=[cap(Mode.MULTI_NODE_READER_ONLY)],
                                parameters=params, secrets=sec, volume_content_source=from_snapshot(s.snapshot_id))
    vvid = V.parse(ctl.CreateVolume(ro, None).volume.volume_id)  # type: ignore[arg-type]
    validate = ctl.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(  # type: ignore[arg-type]
        volume_id=str(vvid), volume_capabilities=[cap(Mode.MULTI_NODE_MULTI_WRITER)], secrets=sec), None)
    assert not validate.HasField("confirmed") and "read-only" in validate.message
    shown = vvid.snapshot_folder + S.DATA
    config = MountConfig(backend="s3", bucket=bucket, prefix=shown, endpoint_url=moto_server.endpoint,
                         region="us-east-1", credentials=moto_server.credentials, read_only=True,
                         snapshot=vvid.snapshot_folder + S.MANIFEST)
    with pytest.raises(ConfigError, match="read-only"):
        dataclasses.replace(config, read_only=False)

    async def main() -> None:
        data = LocalData.for_config(config, AsyncStore(open_store(config)))
        assert isinstance(data, SnapshotData)
        await data.check_access()
        top = await data.list(shown, "/", None, 1000)
        assert [o.key for o in top.objects] == [shown + "top"] and top.prefixes == [shown + "d/", shown + "e/"]
        keys, token = [], None
        while True:  # pages of two
            page = await data.list(shown, None, token, 2)
            assert len(page.objects) <= 2
            keys += [o.key for o in page.objects]
            token = page.next_token
            if not token:
                break
        assert keys == sorted(shown + k for k in files)
        info = await data.head(shown + "d/f3")
        assert info.version.startswith("vid:") and await data.read_block(info, 0) == b"3"
        assert await data.get_range(shown + "top", 1, 2) == b"op"
        with pytest.raises(errors.NotFoundError):
            await data.head(shown + "later-file")
        with pytest.raises(errors.ObjectChangedError):
            await data.read_block(dataclasses.replace(info, version="vid:other"), 0)
        with pytest.raises(errors.ObjectChangedError):
            await data.read_block(dataclasses.replace(info, size=99), 0)
        with pytest.raises(errors.AccessDeniedError):  # the source's key itself is not the volume's
            await data.read_block(dataclasses.replace(info, key=prefix + "d/f3"), 0)
        with pytest.raises(errors.AccessDeniedError):
            await data.list(prefix, "/", None, 10)
        with pytest.raises(ReadOnlyError):
            await data.put(shown + "top", b"x")
        with pytest.raises(ReadOnlyError):
            await data.delete(shown + "top")

    trio.run(main)
