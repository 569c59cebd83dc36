"""Kubelet-shaped end to end: objfs-csi as its own process, real FUSE mounts, real local S3.

A StorageClass-style CreateVolume; three "pods" publishing one ReadOnlyMany static volume at
kubelet's target paths and reading the same weights with mmap; a ReadWriteMany volume written by
one pod and read by another; then objfs-csi is killed with SIGKILL while volumes are published,
the mounts keep working, a restarted plugin unpublishes every one of them, and nothing is left.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi.node.launcher import proc_start_time
from csi.node.state import StateStore
from csi.v1 import csi_pb2 as pb
from fusefs import kernel
from testing.plugin import Client, PluginDirs, PluginProcess
from testing.pods import cap, kubelet_context
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse
Mode = pb.VolumeCapability.AccessMode


def publish(client: Client, dirs: PluginDirs, pv: str, volume_id: str, mode: int, context: dict[str, str],
            secrets: dict[str, str], readonly: bool = False) -> str:
    """What kubelet does for one pod: create the parent, pass pod info, publish."""
    pod_uid = str(uuid.uuid4())
    parent = os.path.join(dirs.root, "pods", pod_uid, "volumes", "kubernetes.io~csi", pv)
    os.makedirs(parent)
    target = os.path.join(parent, "mount")
    client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=volume_id, target_path=target, volume_capability=cap(mode), readonly=readonly,
        volume_context={**context, **kubelet_context(pod_uid)}, secrets=secrets))
    return target


def read_mmap(path: str) -> bytes:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return bytes(m[:])


def test_kubelet_shaped_lifecycle(s3_server: RcloneS3, bucket: str, dirs: PluginDirs) -> None:
    secrets = {"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key}
    weights = os.urandom(24 * 1024 * 1024 + 12345)
    s3_server.client().put_object(Bucket=bucket, Key="models/tiny/model.safetensors", Body=weights)
    plugin = PluginProcess(dirs, node_id="node-1")
    client = plugin.start()
    published: list[tuple[str, str]] = []
    try:
        # external-provisioner: StorageClass parameters plus its extra metadata.
        vol = client.controller.CreateVolume(pb.CreateVolumeRequest(
            name="pvc-" + str(uuid.uuid4()), volume_capabilities=[cap(Mode.MULTI_NODE_MULTI_WRITER)],
            capacity_range=pb.CapacityRange(required_bytes=5 << 30), secrets=secrets,
            parameters={"bucket": bucket, "prefix": "volumes", "endpoint": s3_server.endpoint, "metadataTTL": "1",
                        "csi.storage.k8s.io/pvc/name": "scratch", "csi.storage.k8s.io/pvc/namespace": "ml",
                        "csi.storage.k8s.io/pv/name": "pv-scratch"})).volume

        # Three pods read the same weights from one ReadOnlyMany static PV.
        static_ctx = {"bucket": bucket, "prefix": "models/tiny", "endpoint": s3_server.endpoint}
        ro_targets = [publish(client, dirs, "pv-models", "models-tiny", Mode.MULTI_NODE_READER_ONLY, static_ctx,
                              secrets, readonly=True) for _ in range(3)]
        published += [("models-tiny", t) for t in ro_targets]
        for t in ro_targets:
            assert read_mmap(os.path.join(t, "model.safetensors")) == weights

        # ReadWriteMany: one pod writes, another reads.
        writer = publish(client, dirs, "pv-scratch", vol.volume_id, Mode.MULTI_NODE_MULTI_WRITER,
                         dict(vol.volume_context), secrets)
        reader = publish(client, dirs, "pv-scratch", vol.volume_id, Mode.MULTI_NODE_MULTI_WRITER,
                         dict(vol.volume_context), secrets)
        published += [(vol.volume_id, writer), (vol.volume_id, reader)]
        payload = os.urandom(3 * 1024 * 1024)
        with open(os.path.join(writer, "checkpoint.bin"), "wb") as f:
            f.write(payload)
        with open(os.path.join(reader, "checkpoint.bin"), "rb") as f:
            assert f.read() == payload

        # The plugin dies hard, and the node's data service with it; the servers (own sessions) live
        # on, and their reads wait for the next plugin's grant connections instead of failing.
        servers = [(r.pid, r.start_time) for r in StateStore(dirs.state).all()]
        assert len(servers) == 5
        client.close()
        plugin.kill(signal.SIGKILL)
        with ThreadPoolExecutor(len(ro_targets)) as pool:
            reads = [pool.submit(read_mmap, os.path.join(t, "model.safetensors")) for t in ro_targets]
            plugin = PluginProcess(dirs, node_id="node-1")  # adopts them, and hands them new grants
            client = plugin.start()
            assert all(r.result(timeout=120) == weights for r in reads)
        with open(os.path.join(reader, "checkpoint.bin"), "rb") as f:
            assert f.read() == payload

        # The new plugin unpublishes every one.
        for volume_id, target in published:
            client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
        for _, target in published:
            assert kernel.find_mount(target) is None
            assert not os.path.exists(target)
        assert StateStore(dirs.state).all() == []
        for pid, start in servers:
            assert proc_start_time(pid) != start, f"objfs serve {pid} is still running"
        client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=secrets))
        left = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="volumes/").get("KeyCount", 0)
        assert left == 0
    finally:
        client.close()
        plugin.stop()


def test_restart_cleans_up_mounts_whose_server_died(s3_server: RcloneS3, bucket: str, dirs: PluginDirs) -> None:
    secrets = {"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key}
    plugin = PluginProcess(dirs, node_id="node-1")
    client = plugin.start()
    try:
        ctx = {"bucket": bucket, "endpoint": s3_server.endpoint}
        target = publish(client, dirs, "pv-x", "static-x", Mode.SINGLE_NODE_WRITER, ctx, secrets)
        (rec,) = StateStore(dirs.state).all()
        client.close()
        plugin.kill(signal.SIGKILL)
        os.kill(rec.pid, signal.SIGKILL)  # the server dies while no plugin runs
        plugin = PluginProcess(dirs, node_id="node-1")
        client = plugin.start()  # reconciles at start
        assert kernel.find_mount(target) is None and not os.path.exists(target)
        assert StateStore(dirs.state).all() == []
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="static-x", target_path=target))
    finally:
        client.close()
        plugin.stop()


def test_sigterm_shuts_down_cleanly_and_keeps_mounts(s3_server: RcloneS3, bucket: str, dirs: PluginDirs) -> None:
    secrets = {"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key}
    s3_server.client().put_object(Bucket=bucket, Key="f.txt", Body=b"still here")
    plugin = PluginProcess(dirs, node_id="node-1")
    client = plugin.start()
    target = publish(client, dirs, "pv-t", "static-t", Mode.SINGLE_NODE_WRITER,
                     {"bucket": bucket, "endpoint": s3_server.endpoint}, secrets)
    client.close()
    plugin.stop()
    assert plugin.proc is not None and plugin.proc.returncode == 0
    with open(plugin.log_path) as f:
        assert s3_server.secret_key not in f.read()
    with ThreadPoolExecutor(1) as pool:  # the mount waits for the next plugin's data service
        read = pool.submit(Path(target, "f.txt").read_bytes)
        plugin = PluginProcess(dirs, node_id="node-1")
        client = plugin.start()
        assert read.result(timeout=120) == b"still here"
    try:
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="static-t", target_path=target))
        assert kernel.find_mount(target) is None and not os.path.exists(target)
    finally:
        client.close()
        plugin.stop()


def test_cache_size_is_every_servers_limit(s3_server: RcloneS3, bucket: str, dirs: PluginDirs) -> None:
    """--cache-size reaches the servers: the shared cache's limit (diskcache keeps it in its
    settings, set by each opener) is the plugin's, not the 10G default."""
    secrets = {"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key}
    s3_server.client().put_object(Bucket=bucket, Key="w.bin", Body=b"w" * 100_000)
    plugin = PluginProcess(dirs, node_id="node-1", extra_args=["--cache-size=64M"])
    client = plugin.start()
    try:
        target = publish(client, dirs, "pv-c", "static-c", Mode.SINGLE_NODE_READER_ONLY,
                         {"bucket": bucket, "endpoint": s3_server.endpoint}, secrets, readonly=True)
        with open(os.path.join(target, "w.bin"), "rb") as f:
            assert f.read() == b"w" * 100_000
        with contextlib.closing(sqlite3.connect(f"file:{dirs.cache}/cache.db?mode=ro", uri=True)) as db:
            (limit,) = db.execute("SELECT value FROM Settings WHERE key = 'size_limit'").fetchone()
        assert limit == 64 << 20
        client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="static-c", target_path=target))
    finally:
        client.close()
        plugin.stop()
