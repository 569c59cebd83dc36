"""Every RPC of objfs-csi, in process on a unix socket, against a real local S3 (rclone):
argument validation and error codes, then real publishes (real FUSE mounts)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.v1 import csi_pb2 as pb
from fusefs import kernel
from fusefs.config import Tuning
from testing.plugin import Client, PluginDirs, in_process_plugin, unmount_all_under
from testing.pods import cap, wait_for
from testing.servers import RcloneS3

Mode = pb.VolumeCapability.AccessMode
SNW = Mode.SINGLE_NODE_WRITER


def code_of(fn: object, *args: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        fn(*args)  # type: ignore[operator]
    return ei.value.code(), ei.value.details()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def plugin(s3_server: RcloneS3) -> Iterator[tuple[Client, PluginDirs]]:
    # Inline volumes may point at the test store (by default they may not set an endpoint).
    with in_process_plugin("objfs-csi-rpc-", "node-a", ["--inline-endpoints", s3_server.endpoint]) as plugin:
        yield plugin


@pytest.fixture
def client(plugin: tuple[Client, PluginDirs]) -> Client:
    return plugin[0]


@pytest.fixture
def pods(plugin: tuple[Client, PluginDirs]) -> Iterator[str]:
    """Where kubelet-shaped target paths go (cleaned after the test)."""
    path = tempfile.mkdtemp(prefix="pods-", dir=plugin[1].root)
    yield path
    unmount_all_under(path)
    shutil.rmtree(path, ignore_errors=True)


def secrets(s3: RcloneS3) -> dict[str, str]:
    return {"accessKeyID": s3.access_key, "secretAccessKey": s3.secret_key}


def sc_params(s3: RcloneS3, **extra: str) -> dict[str, str]:
    return {"endpoint": s3.endpoint, "region": "us-east-1", **extra}


def create(client: Client, s3: RcloneS3, name: str, **params: str) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=name, volume_capabilities=[cap()], parameters=sc_params(s3, **params),
                                 secrets=secrets(s3), capacity_range=pb.CapacityRange(required_bytes=1 << 30))
    return client.controller.CreateVolume(req).volume


def target_in(pods: str, pod: str = "pod-1", pv: str = "pv-1") -> str:
    parent = os.path.join(pods, pod, "volumes", "kubernetes.io~csi", pv)
    os.makedirs(parent, exist_ok=True)  # kubelet creates the parent; the driver creates "mount"
    return os.path.join(parent, "mount")


# -- identity ------------------------------------------------------------------------------------
def test_identity(client: Client) -> None:
    info = client.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "objfs.csi.dev" and info.vendor_version
    caps = client.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    assert [c.service.type for c in caps if c.HasField("service")] == [pb.PluginCapability.Service.CONTROLLER_SERVICE]
    # expansion only records the size: a volume in use grows as well as one that is not
    assert [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")] == \
        [pb.PluginCapability.VolumeExpansion.ONLINE]
    assert client.identity.Probe(pb.ProbeRequest()).ready.value is True


# -- controller -----------------------------------------------------------------------------------
def test_create_volume_validation(client: Client, s3_server: RcloneS3) -> None:
    create_rpc = client.controller.CreateVolume
    base = {"name": "v1", "volume_capabilities": [cap()], "parameters": sc_params(s3_server),
            "secrets": secrets(s3_server)}
    cases: list[tuple[dict[str, object], str]] = [
        ({"name": ""}, "name is required"),
        ({"volume_capabilities": []}, "volume_capabilities are required"),
        ({"volume_capabilities": [cap(block=True)]}, "block access is not supported"),
        ({"volume_capabilities": [cap(mode=Mode.UNKNOWN)]}, "access_mode"),
        ({"parameters": sc_params(s3_server, readOnly="true")}, "unknown volume parameter(s) readOnly"),
        ({"parameters": sc_params(s3_server, bucket="shared", prefix="a/../../etc")}, "'..'"),
        ({"parameters": sc_params(s3_server, backend="azure")}, "backend 'azure'"),
        ({"secrets": {"accessKeyID": "only-half"}}, "both accessKeyID and secretAccessKey"),
        ({"volume_content_source": pb.VolumeContentSource(
            volume=pb.VolumeContentSource.VolumeSource(volume_id=""))}, "volume_id is required"),
        ({"volume_content_source": pb.VolumeContentSource()}, "neither a snapshot nor a volume"),
        ({"name": ".objfs-snapshots"}, "reserved"),
    ]
    for change, message in cases:
        code, details = code_of(create_rpc, pb.CreateVolumeRequest(**{**base, **change}))  # type: ignore[arg-type]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (change, details)
        assert message in details, (change, details)


def test_create_volume_with_wrong_or_absent_secrets(client: Client, s3_server: RcloneS3,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for creds in ({"accessKeyID": "nobody", "secretAccessKey": "wrong"}, {}):
        req = pb.CreateVolumeRequest(name="v-secrets", volume_capabilities=[cap()],
                                     parameters=sc_params(s3_server), secrets=creds)
        code, details = code_of(client.controller.CreateVolume, req)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "wrong" not in details


def test_bucket_per_volume_lifecycle(client: Client, s3_server: RcloneS3) -> None:
    name = "sanity-like-" + "0123456789ABCDEF" * 7  # 124 characters of upper-case hex
    vol = create(client, s3_server, name, **{"csi.storage.k8s.io/pvc/name": "claim"})
    assert vol.capacity_bytes == 1 << 30 and "endpoint" not in vol.volume_context
    assert create(client, s3_server, name).volume_id == vol.volume_id  # idempotent by name
    bigger = pb.CreateVolumeRequest(name=name, volume_capabilities=[cap()], parameters=sc_params(s3_server),
                                    secrets=secrets(s3_server), capacity_range=pb.CapacityRange(required_bytes=2 << 30))
    assert code_of(client.controller.CreateVolume, bigger)[0] == grpc.StatusCode.ALREADY_EXISTS
    bucket = vol.volume_id.split(":")[3]
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="data/file.bin", Body=b"x" * 100)
    client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=secrets(s3_server)))
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    # Deleting again (or an unknown or malformed ID) is OK.
    client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=secrets(s3_server)))
    client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="not-ours"))
    assert code_of(client.controller.DeleteVolume, pb.DeleteVolumeRequest())[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_prefix_volumes_and_forged_ids(client: Client, s3_server: RcloneS3, bucket: str) -> None:
    vol = create(client, s3_server, "pvc-1", bucket=bucket, prefix="vols")
    s3 = s3_server.client()
    marker = json.loads(s3.get_object(Bucket=bucket, Key="vols/pvc-1/.objfs-volume.json")["Body"].read())
    assert marker["name"] == "pvc-1" and marker["capacity"] == 1 << 30
    s3.put_object(Bucket=bucket, Key="vols/pvc-1/a/b.txt", Body=b"1")
    s3.put_object(Bucket=bucket, Key="vols/pvc-10/keep.txt", Body=b"2")
    s3.put_object(Bucket=bucket, Key="precious/keep.txt", Body=b"3")
    # An ID forged to point at data that is not a volume deletes nothing.
    forged = vol.volume_id.replace("vols/pvc-1/", "precious/")
    client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=forged, secrets=secrets(s3_server)))
    client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=secrets(s3_server)))
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    assert keys == ["precious/keep.txt", "vols/pvc-10/keep.txt"]


def test_create_in_missing_bucket_is_not_found(client: Client, s3_server: RcloneS3) -> None:
    req = pb.CreateVolumeRequest(name="v", volume_capabilities=[cap()], secrets=secrets(s3_server),
                                 parameters=sc_params(s3_server, bucket="no-such-bucket-here"))
    code, details = code_of(client.controller.CreateVolume, req)
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-bucket-here" in details


def test_validate_volume_capabilities(client: Client, s3_server: RcloneS3, bucket: str) -> None:
    vv = client.controller.ValidateVolumeCapabilities
    vol = create(client, s3_server, "pvc-validate", bucket=bucket)
    req = pb.ValidateVolumeCapabilitiesRequest
    assert code_of(vv, req(volume_capabilities=[cap()]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(vv, req(volume_id=vol.volume_id))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(vv, req(volume_id="fake", volume_capabilities=[cap()]))[0] == grpc.StatusCode.NOT_FOUND
    gone = vol.volume_id.replace("pvc-validate", "pvc-gone")
    assert code_of(vv, req(volume_id=gone, volume_capabilities=[cap()], secrets=secrets(s3_server)))[0] == \
        grpc.StatusCode.NOT_FOUND
    ok = vv(req(volume_id=vol.volume_id, volume_capabilities=[cap(Mode.MULTI_NODE_READER_ONLY)],
                secrets=secrets(s3_server)))
    assert ok.confirmed.volume_capabilities[0].access_mode.mode == Mode.MULTI_NODE_READER_ONLY
    blocked = vv(req(volume_id=vol.volume_id, volume_capabilities=[cap(block=True)], secrets=secrets(s3_server)))
    assert not blocked.HasField("confirmed") and "block" in blocked.message
    caps = client.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest()).capabilities
    assert pb.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME in [c.rpc.type for c in caps]


def test_secrets_never_logged(client: Client, s3_server: RcloneS3, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="objfs.csi")
    create(client, s3_server, "pvc-logged")
    req = pb.CreateVolumeRequest(name="pvc-logged-bad", volume_capabilities=[cap()],
                                 parameters=sc_params(s3_server), secrets={"accessKeyID": "AKIDLEAK",
                                                                           "secretAccessKey": "SECRETLEAK"})
    code_of(client.controller.CreateVolume, req)
    assert "CreateVolume" in caplog.text
    for secret in (s3_server.secret_key, "SECRETLEAK"):
        assert secret not in caplog.text


# -- node: validation ------------------------------------------------------------------------------
def test_node_publish_validation(client: Client, s3_server: RcloneS3, pods: str, bucket: str) -> None:
    publish = client.node.NodePublishVolume
    target = target_in(pods)
    static = {"bucket": bucket, "endpoint": s3_server.endpoint}
    base = {"volume_id": "static-1", "target_path": target, "volume_capability": cap(),
            "volume_context": static, "secrets": secrets(s3_server)}
    cases: list[tuple[dict[str, object], grpc.StatusCode, str]] = [
        ({"volume_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required"),
        ({"target_path": ""}, grpc.StatusCode.INVALID_ARGUMENT, "target_path is required"),
        ({"volume_capability": None}, grpc.StatusCode.INVALID_ARGUMENT, "volume_capability is required"),
        ({"volume_capability": cap(block=True)}, grpc.StatusCode.INVALID_ARGUMENT, "block"),
        ({"target_path": "relative/mount"}, grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
        ({"target_path": pods + "/../../etc/mount"}, grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        ({"volume_context": {**static, "prefix": "../other"}}, grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        ({"volume_context": {**static, "mountOptions": "x"}}, grpc.StatusCode.INVALID_ARGUMENT, "mountOptions"),
        ({"volume_capability": cap(group="staff")}, grpc.StatusCode.INVALID_ARGUMENT, "volume_mount_group"),
        ({"volume_context": {}}, grpc.StatusCode.NOT_FOUND, "not an objfs volume ID"),
        ({"volume_context": {"csi.storage.k8s.io/ephemeral": "true"}}, grpc.StatusCode.INVALID_ARGUMENT,
         "need 'bucket'"),
        # Inline volumes: no secret means the node's identity (refused unless allowed), no foreign endpoint.
        ({"volume_context": {**static, "csi.storage.k8s.io/ephemeral": "true"}, "secrets": {}},
         grpc.StatusCode.FAILED_PRECONDITION, "--allow-inline-node-identity"),
        ({"volume_context": {**static, "csi.storage.k8s.io/ephemeral": "true", "endpoint": "http://127.0.0.1:1"}},
         grpc.StatusCode.FAILED_PRECONDITION, "--inline-endpoints"),
    ]
    for change, want, message in cases:
        fields: dict[str, Any] = {**base, **{k: v for k, v in change.items() if v is not None}}
        req = pb.NodePublishVolumeRequest(**fields)
        if change.get("volume_capability", 1) is None:
            req.ClearField("volume_capability")
        code, details = code_of(publish, req)
        assert (code, message in details) == (want, True), (change, code, details)
    assert not os.path.exists(target)


def test_node_unpublish_and_stats_validation(client: Client, pods: str) -> None:
    unpublish, stats = client.node.NodeUnpublishVolume, client.node.NodeGetVolumeStats
    ureq, sreq = pb.NodeUnpublishVolumeRequest, pb.NodeGetVolumeStatsRequest
    assert code_of(unpublish, ureq(target_path="/x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(unpublish, ureq(volume_id="v"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(unpublish, ureq(volume_id="v", target_path="/a/../b"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    client.node.NodeUnpublishVolume(ureq(volume_id="unknown", target_path=os.path.join(pods, "never")))
    assert code_of(stats, sreq(volume_path="/x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stats, sreq(volume_id="v"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stats, sreq(volume_id="v", volume_path="some/path"))[0] == grpc.StatusCode.NOT_FOUND
    caps = client.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
    rpc = pb.NodeServiceCapability.RPC
    assert {rpc.GET_VOLUME_STATS, rpc.VOLUME_CONDITION, rpc.VOLUME_MOUNT_GROUP} <= {c.rpc.type for c in caps}
    assert client.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id == "node-a"


# -- node: real publishes -----------------------------------------------------------------------------
@pytest.mark.fuse
def test_publish_with_wrong_secrets_leaves_nothing(client: Client, s3_server: RcloneS3, pods: str,
                                                   bucket: str) -> None:
    target = target_in(pods)
    req = pb.NodePublishVolumeRequest(
        volume_id="static-bad", target_path=target, volume_capability=cap(),
        volume_context={"bucket": bucket, "endpoint": s3_server.endpoint},
        secrets={"accessKeyID": "nobody", "secretAccessKey": "wrong-secret"},
    )
    code, details = code_of(client.node.NodePublishVolume, req)
    assert code != grpc.StatusCode.OK and "wrong-secret" not in details and details
    assert kernel.find_mount(target) is None and not os.path.exists(target)


@pytest.mark.fuse
def test_publish_dynamic_volume_lifecycle(client: Client, s3_server: RcloneS3, pods: str, bucket: str) -> None:
    vol = create(client, s3_server, "pvc-rw", bucket=bucket)
    s3_server.client().put_object(Bucket=bucket, Key="pvc-rw/hello.txt", Body=b"hello objfs")
    target = target_in(pods)
    req = pb.NodePublishVolumeRequest(volume_id=vol.volume_id, target_path=target, volume_capability=cap(),
                                      volume_context=vol.volume_context, secrets=secrets(s3_server))
    client.node.NodePublishVolume(req)
    try:
        assert kernel.find_mount(target) is not None
        with open(os.path.join(target, "hello.txt"), "rb") as f:
            assert f.read() == b"hello objfs"
        # raised once FUSE INIT is through (set before it, the kernel caps it at 128 KiB again)
        bdi = f"/sys/class/bdi/{kernel.find_mount(target).major_minor}/read_ahead_kb"  # type: ignore[union-attr]
        wait_for(lambda: Path(bdi).read_text().strip() == str(Tuning().readahead_kb), 30, "readahead raised")
        client.node.NodePublishVolume(req)  # the same again: OK
        other = pb.NodePublishVolumeRequest()
        other.CopyFrom(req)
        other.readonly = True
        assert code_of(client.node.NodePublishVolume, other)[0] == grpc.StatusCode.ALREADY_EXISTS
        st = client.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target))
        assert st.usage and not st.volume_condition.abnormal
        assert code_of(client.node.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id="other-volume", volume_path=target))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target))
    assert kernel.find_mount(target) is None and not os.path.exists(target)
    client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target))


@pytest.mark.fuse
def test_readonly_modes_are_enforced(client: Client, s3_server: RcloneS3, pods: str, bucket: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="w/model.bin", Body=b"weights")
    for i, (mode, flag) in enumerate([(Mode.MULTI_NODE_READER_ONLY, False), (Mode.SINGLE_NODE_WRITER, True)]):
        target = target_in(pods, pod=f"ro-{i}")
        req = pb.NodePublishVolumeRequest(
            volume_id=f"static-ro-{i}", target_path=target, volume_capability=cap(mode), readonly=flag,
            volume_context={"bucket": bucket, "prefix": "w", "endpoint": s3_server.endpoint},
            secrets=secrets(s3_server))
        client.node.NodePublishVolume(req)
        try:
            assert "ro" in kernel.find_mount(target).options.split(",")  # type: ignore[union-attr]
            with open(os.path.join(target, "model.bin"), "rb") as f:
                assert f.read() == b"weights"
            with pytest.raises(OSError) as ei:
                open(os.path.join(target, "new.txt"), "wb").close()
            assert ei.value.errno == errno.EROFS
        finally:
            client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=req.volume_id, target_path=target))


@pytest.mark.fuse
def test_inline_ephemeral_volume_with_fsgroup(client: Client, s3_server: RcloneS3, pods: str, bucket: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="data/x.txt", Body=b"x")
    target = target_in(pods, pod="inline")
    ctx = {"bucket": bucket, "prefix": "data", "endpoint": s3_server.endpoint, "uid": "1000",
           "csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "p",
           "csi.storage.k8s.io/pod.namespace": "default", "csi.storage.k8s.io/pod.uid": "inline",
           "csi.storage.k8s.io/serviceAccount.name": "default"}
    req = pb.NodePublishVolumeRequest(volume_id="csi-0123abcd", target_path=target, volume_capability=cap(group="4242"),
                                      volume_context=ctx, secrets=secrets(s3_server))
    client.node.NodePublishVolume(req)
    try:
        st = os.stat(os.path.join(target, "x.txt"))
        assert (st.st_uid, st.st_gid) == (1000, 4242)
    finally:
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=req.volume_id, target_path=target))
    assert not os.path.exists(target)


@pytest.mark.fuse
def test_dead_server_is_reported_abnormal_and_unpublish_cleans_up(
    client: Client, plugin: tuple[Client, PluginDirs], s3_server: RcloneS3, pods: str, bucket: str
) -> None:
    target = target_in(pods, pod="dies")
    req = pb.NodePublishVolumeRequest(volume_id="static-dies", target_path=target, volume_capability=cap(),
                                      volume_context={"bucket": bucket, "endpoint": s3_server.endpoint},
                                      secrets=secrets(s3_server))
    client.node.NodePublishVolume(req)
    from csi.node.state import StateStore

    rec = StateStore(plugin[1].state).get(target)
    assert rec is not None
    os.kill(rec.pid, signal.SIGKILL)
    sreq = pb.NodeGetVolumeStatsRequest(volume_id=req.volume_id, volume_path=target)
    for _ in range(100):
        st = client.node.NodeGetVolumeStats(sreq)
        if st.volume_condition.abnormal:
            break
    # Either the server is seen gone, or (a moment earlier) its connection is already aborted.
    msg = st.volume_condition.message
    assert st.volume_condition.abnormal and ("not running" in msg or "statfs" in msg), msg
    client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=req.volume_id, target_path=target))
    assert kernel.find_mount(target) is None and not os.path.exists(target)


def test_controller_expand_volume(client: Client, s3_server: RcloneS3, bucket: str) -> None:
    expand = client.controller.ControllerExpandVolume
    req = pb.ControllerExpandVolumeRequest
    vol = create(client, s3_server, "pvc-grow", bucket=bucket)
    assert code_of(expand, req(capacity_range=pb.CapacityRange(required_bytes=1)))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(expand, req(volume_id=vol.volume_id))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(expand, req(volume_id="fake", capacity_range=pb.CapacityRange(required_bytes=1)))[0] == \
        grpc.StatusCode.NOT_FOUND
    grown = expand(req(volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=3 << 30),
                       secrets=secrets(s3_server)))
    assert grown.capacity_bytes == 3 << 30 and not grown.node_expansion_required
    marker = json.loads(s3_server.client().get_object(Bucket=bucket, Key="pvc-grow/.objfs-volume.json")["Body"].read())
    assert marker["capacity"] == 3 << 30
    same = expand(req(volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 << 30),
                      secrets=secrets(s3_server)))
    assert same.capacity_bytes == 3 << 30
