"""The node plugin's /metrics over real HTTP: CSI RPC counters with their codes, live mounts, the
node cache's size, and every FUSE server's figures re-exported with its volume and pod labels; the
volume condition says what a server reports a user must act on."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.node.state import PENDING, SIDECAR, PublishRecord, StateStore
from csi.v1 import csi_pb2 as pb
from fusefs import metrics as server_metrics
from testing.plugin import Client, InProcessPlugin, PluginDirs, unmount_all_under
from testing.scrape import Samples, scrape_until, value
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse
Mode = pb.VolumeCapability.AccessMode
CAP = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                          access_mode=Mode(mode=Mode.MULTI_NODE_READER_ONLY))


class Plugin:
    def __init__(self, dirs: PluginDirs, client: Client, port: int) -> None:
        self.dirs, self.client, self.url = dirs, client, f"http://127.0.0.1:{port}/metrics"

    def scrape(self, ok: object = None) -> Samples:
        return scrape_until(self.url, ok if callable(ok) else lambda s: True)

    def publish(self, s3: RcloneS3, bucket: str, volume_id: str, pod: str) -> str:
        parent = Path(self.dirs.root) / "pods" / str(uuid.uuid4()) / "volumes" / "kubernetes.io~csi" / volume_id
        parent.mkdir(parents=True)
        target = str(parent / "mount")
        self.client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=target, volume_capability=CAP,
            volume_context={"bucket": bucket, "endpoint": s3.endpoint, "csi.storage.k8s.io/pod.name": pod,
                            "csi.storage.k8s.io/pod.namespace": "ml"},
            secrets={"accessKeyID": s3.access_key, "secretAccessKey": s3.secret_key}))
        return target


@pytest.fixture
def plugin(request: pytest.FixtureRequest) -> Iterator[Plugin]:
    root = tempfile.mkdtemp(prefix="objfs-csi-metrics-")
    dirs = PluginDirs(root)
    if request.node.get_closest_marker("broken_cache"):  # before the data service opens it
        os.makedirs(os.path.join(dirs.cache, "cache.db"))  # a database that cannot open
    try:
        p = InProcessPlugin(dirs, node_id="node-m",
                            extra_args=["--metrics-address", "127.0.0.1:0", "--kubelet-root", root,
                                                     "--cache-size", "256M"])
        with p as client:
            yield Plugin(dirs, client, p.args.metrics.port)
    finally:
        unmount_all_under(root)
        shutil.rmtree(root, ignore_errors=True)


def test_rpcs_mounts_and_servers_figures(s3_server: RcloneS3, bucket: str, plugin: Plugin) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    s3_server.client().put_object(Bucket=bucket, Key="weights.bin", Body=data)
    before = plugin.scrape()
    ok = {"method": "NodePublishVolume", "code": "OK"}
    bad = {"method": "NodePublishVolume", "code": "INVALID_ARGUMENT"}

    with pytest.raises(grpc.RpcError):
        plugin.client.node.NodePublishVolume(pb.NodePublishVolumeRequest(target_path="/x", volume_capability=CAP))
    target = plugin.publish(s3_server, bucket, "models-a", "infer-0")
    assert (Path(target) / "weights.bin").read_bytes() == data

    got = plugin.scrape(lambda s: value(s, "objfs_store_received_bytes_total", volume="models-a") >= len(data))
    assert value(got, "objfs_csi_rpcs_total", **ok) - value(before, "objfs_csi_rpcs_total", **ok) == 1
    assert value(got, "objfs_csi_rpcs_total", **bad) - value(before, "objfs_csi_rpcs_total", **bad) == 1
    assert value(got, "objfs_csi_rpc_seconds_count", method="NodePublishVolume") >= 2
    assert value(got, "objfs_csi_mounts") == 1
    assert value(got, "objfs_store_requests_total", volume="models-a", pod="ml/infer-0", kind="GET") >= 1
    assert value(got, "objfs_fuse_operation_seconds_count", volume="models-a", op="read") >= 1
    sized = plugin.scrape(lambda s: value(s, "objfs_csi_node_cache_size_bytes") >= len(data))
    assert value(sized, "objfs_csi_node_cache_size_bytes") >= len(data)
    assert value(sized, "objfs_csi_node_cache_limit_bytes") == 256 << 20
    # the node cache's own figures come from the data service, which alone holds the cache
    cached = plugin.scrape(lambda s: value(s, "objfs_node_cache_stored_bytes_total") >= len(data))
    assert value(cached, "objfs_node_cache_stored_bytes_total") >= len(data)

    stats = plugin.client.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="models-a",
                                                                               volume_path=target))
    assert not stats.volume_condition.abnormal and stats.volume_condition.message == "serving"

    plugin.client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="models-a", target_path=target))
    gone = plugin.scrape()
    assert value(gone, "objfs_csi_mounts") == 0
    assert value(gone, "objfs_store_requests_total", volume="models-a") == 0  # its file went with it


def test_sidecar_servers_files_are_re_exported_but_not_forged_or_linked(plugin: Plugin) -> None:
    """The files of volumes the plugin's records say a pod's sidecar serves (tests/security has the attacks)."""
    state = StateStore(plugin.dirs.state)
    for name in ("a", "forged", "link"):
        state.put(PublishRecord(volume_id=f"side-{name}", target=f"/nowhere/{name}/mount", pid=0, start_time=0,
                                read_only=True, fingerprint="f", launcher=SIDECAR, pod_uid="uid-1", pod_namespace="ml",
                                pod_name="p", name=name, phase=PENDING))
    metrics_dir = Path(plugin.dirs.root) / "pods" / "uid-1" / "volumes" / "kubernetes.io~empty-dir" / "objfs-tmp"
    (metrics_dir / "metrics").mkdir(parents=True)
    server_metrics.Exporter({"volume": "side-a", "pod": "ml/p"}).write(str(metrics_dir / "metrics" / "a.prom"))
    (metrics_dir / "metrics" / "forged.prom").write_text(
        "# TYPE objfs_csi_mounts gauge\nobjfs_csi_mounts 99\n# TYPE other_thing gauge\nother_thing 1\n")
    os.symlink(metrics_dir / "metrics" / "a.prom", metrics_dir / "metrics" / "link.prom")
    got = plugin.scrape()
    assert value(got, "objfs_volume_problem", volume="side-a", reason="cache_disabled") == 0
    assert ("objfs_volume_problem", frozenset({("volume", "side-a"), ("pod", "ml/p"),
                                               ("reason", "cache_disabled")})) in got
    assert value(got, "objfs_csi_mounts") == 3  # the records, not the forged 99
    assert not any(name == "other_thing" for name, _ in got)
    # read once, not once more through the link
    assert sum(1 for name, labels in got if name == "objfs_open_handles") == 1


@pytest.mark.broken_cache
def test_volume_condition_says_the_node_cache_is_disabled(s3_server: RcloneS3, bucket: str, plugin: Plugin) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="f", Body=b"x")
    target = plugin.publish(s3_server, bucket, "vol-nocache", "p-1")
    assert (Path(target) / "f").read_bytes() == b"x"  # reads still work, from the store
    stats = plugin.client.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="vol-nocache",
                                                                               volume_path=target))
    assert stats.volume_condition.abnormal
    assert "node cache" in stats.volume_condition.message and "unusable" in stats.volume_condition.message
    assert stats.usage  # still serving: usage is reported too
