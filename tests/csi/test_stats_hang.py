"""NodeGetVolumeStats on a hung mount: a real FUSE mount whose server is SIGSTOPped. kubelet keeps
polling; the plugin must answer abnormal every time without piling up threads stuck in statfs."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from csi.node.state import StateStore
from csi.v1 import csi_pb2 as pb
from testing.plugin import Client, PluginDirs, in_process_plugin
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse


def statfs_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("statvfs "))


def threads_but_grpc_workers() -> int:
    """The gRPC server's pool (threads "csi_N", at most --workers) grows with its own timing: not counted."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("csi_"))


@pytest.fixture
def plugin() -> Iterator[tuple[Client, PluginDirs]]:
    with in_process_plugin("objfs-csi-hang-", "node-h", ["--stats-timeout", "0.5"]) as plugin:
        yield plugin


def test_hung_server_is_reported_without_growing_threads(plugin: tuple[Client, PluginDirs], s3_server: RcloneS3,
                                                        bucket: str) -> None:
    client, dirs = plugin
    s3_server.client().put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    target = os.path.join(dirs.root, "pods", "p1", "volumes", "kubernetes.io~csi", "pv", "mount")
    os.makedirs(os.path.dirname(target))
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                              access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.
                                                                         SINGLE_NODE_WRITER))
    req = pb.NodePublishVolumeRequest(
        volume_id="static-hang", target_path=target, volume_capability=cap,
        volume_context={"bucket": bucket, "endpoint": s3_server.endpoint},
        secrets={"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key})
    client.node.NodePublishVolume(req)
    sreq = pb.NodeGetVolumeStatsRequest(volume_id=req.volume_id, volume_path=target)
    assert not client.node.NodeGetVolumeStats(sreq).volume_condition.abnormal
    rec = StateStore(dirs.state).get(target)
    assert rec is not None
    os.kill(rec.pid, signal.SIGSTOP)
    try:
        answers = [client.node.NodeGetVolumeStats(sreq) for _ in range(2)]
        after_two = threads_but_grpc_workers()
        answers += [client.node.NodeGetVolumeStats(sreq) for _ in range(10)]
        after_twelve = threads_but_grpc_workers()
        stuck = [t for t in threading.enumerate() if t.name.startswith("statvfs ")]
    finally:
        os.kill(rec.pid, signal.SIGCONT)
    for st in answers:
        assert st.volume_condition.abnormal and "has not answered statfs" in st.volume_condition.message
        assert not st.usage
    assert len(stuck) == 1  # one probe for the target, however often kubelet asks
    assert after_twelve == after_two
    # Once the server runs again the stuck probe finishes and the volume is healthy again.
    stuck[0].join(120)
    assert not stuck[0].is_alive() and statfs_threads() == 0
    st = client.node.NodeGetVolumeStats(sreq)
    assert not st.volume_condition.abnormal and st.usage, st.volume_condition.message
    assert statfs_threads() == 0
    client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=req.volume_id, target_path=target))
    assert not os.path.exists(target)
