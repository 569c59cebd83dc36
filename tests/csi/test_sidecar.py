"""The sidecar launcher with real processes and real mounts.

The node plugin runs as the init of a PID namespace of its own (killing it is a restart of its
container: everything it started dies with it). Each "pod" is an ``objfs sidecar`` in a mount and
PID namespace of its own, uid 65534 without capabilities, read-only root, the plugin's directories
hidden from it. kubelet is played by the test: a kubelet root in a temp dir, the pod's objfs-tmp
emptyDir, NodePublishVolume before the pod's containers start (so before the sidecar listens).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi.node.state import PENDING, SERVED, StateStore
from csi.v1 import csi_pb2 as pb
from fusefs import kernel, metrics
from fusefs.passthrough import backing
from testing.kubemock import FakeApiServer
from testing.plugin import Client, PluginDirs, PluginProcess, unmount_all_under
from testing.pods import FakeKubelet, SidecarPod, objfs_command_for_nobody, wait_for
from testing.proxy import CountingProxy
from testing.scrape import parse, value
from testing.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse
MiB = 1024 * 1024


@dataclass
class Node:
    root: Path
    dirs: PluginDirs
    kubelet: FakeKubelet
    command: str
    plugin: PluginProcess | None = None
    client: Client | None = None
    pods: list[SidecarPod] = field(default_factory=list)

    def start_plugin(self, *extra: str) -> Client:
        self.plugin = PluginProcess(self.dirs, node_id="node-s", pid_namespace=True, extra_args=[
            "--launcher", "sidecar", "--kubelet-root", str(self.kubelet.root), "--server-uid", "65534",
            "--server-gid", "65534", "--data-uid", "65532", "--data-gid", "65532", "--server-command", self.command,
            "--sidecar-wait", "1", *extra])
        self.client = self.plugin.start()
        return self.client

    def kill_plugin(self) -> None:
        assert self.plugin is not None and self.client is not None
        self.client.close()
        self.plugin.kill()

    def pod(self, uid: str) -> SidecarPod:
        pod = SidecarPod(self.kubelet.empty_dir(uid), self.command, hide=[Path(self.dirs.root)])
        self.pods.append(pod)
        return pod.start()

    def records(self) -> list[str]:
        state = Path(self.dirs.state)
        return sorted(os.listdir(state / "targets")) + sorted(os.listdir(state / "grants"))

    def phase(self, target: str) -> str | None:
        rec = StateStore(self.dirs.state).get(target)
        return rec.phase if rec is not None else None


@pytest.fixture
def node() -> Iterator[Node]:
    root = Path(tempfile.mkdtemp(prefix="objfs-sidecar-"))
    os.chmod(root, 0o755)
    command = objfs_command_for_nobody(root / "objfs")
    if command is None:
        shutil.rmtree(root)
        pytest.skip("no interpreter uid 65534 can run objfs with here")
    n = Node(root, PluginDirs(str(root / "plugin")), FakeKubelet(root / "kubelet"), command)
    try:
        yield n
    finally:
        if n.client is not None:
            n.client.close()
        if n.plugin is not None:
            n.plugin.kill()
        for p in n.pods:
            p.close()
        unmount_all_under(str(root))
        if not os.environ.get("OBJFS_KEEP_TEST_DIRS"):
            shutil.rmtree(root, ignore_errors=True)


def secrets_of(s3: RcloneS3) -> dict[str, str]:
    return {"accessKeyID": s3.access_key, "secretAccessKey": s3.secret_key}


def status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def stats(client: Client, volume_id: str, target: str) -> pb.NodeGetVolumeStatsResponse:
    return client.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=target))


def test_a_pod_keeps_reading_across_a_restart_of_the_plugins_container(
        node: Node, s3_server: RcloneS3, bucket: str) -> None:
    data = random_bytes(3 * MiB + 17, seed=3)
    s3_server.client().put_object(Bucket=bucket, Key="w/model.bin", Body=data)
    client = node.start_plugin()
    uid = node.kubelet.new_pod()
    ctx = {"bucket": bucket, "prefix": "w", "endpoint": s3_server.endpoint}
    # kubelet publishes before it starts any container: the sidecar is not there yet.
    target = node.kubelet.publish(client, uid, "pv-model", "model", ctx, secrets_of(s3_server))
    assert kernel.find_mount(target) is not None and node.phase(target) == PENDING
    cond = stats(client, "model", target).volume_condition
    assert not cond.abnormal and "waiting for the pod's objfs-sidecar" in cond.message

    pod = node.pod(uid)  # the pod's first container starts and takes the volume
    wait_for(lambda: node.phase(target) == SERVED, what="the hand-over")
    assert (Path(target) / "model.bin").read_bytes() == data
    (server,) = pod.server_pids()
    fields = status_of(server)
    assert fields["Uid"].split() == ["65534"] * 4 and int(fields["CapEff"], 16) == 0
    with open(f"/proc/{server}/environ", "rb") as f:
        assert s3_server.secret_key.encode() not in f.read()
    # The pod's server holds no secret and no node path; the grant record's secret is encrypted.
    record = next((Path(node.dirs.state) / "grants").iterdir()).read_bytes()
    assert s3_server.secret_key.encode() not in record and s3_server.access_key.encode() not in record
    assert stats(client, "model", target).volume_condition.message == "serving"

    node.kill_plugin()  # the plugin's whole PID namespace dies
    assert (Path(target) / "model.bin").read_bytes() == data
    client = node.start_plugin()
    assert (Path(target) / "model.bin").read_bytes() == data
    assert stats(client, "model", target).volume_condition.message == "serving"
    # A republish (kubelet, after a restart) is a no-op on a serving mount.
    node.kubelet.publish(client, uid, "pv-model", "model", ctx, secrets_of(s3_server))
    assert pod.server_pids() == [server]

    node.kubelet.unpublish(client, "model", target)
    assert kernel.find_mount(target) is None and not os.path.exists(target)
    assert node.records() == []
    wait_for(lambda: pod.server_pids() == [], what="the volume's server to exit")
    pod.terminate()
    assert pod.wait() == 0


def test_a_killed_sidecar_fails_reads_fast_is_reported_and_unpublishes_cleanly(
        node: Node, s3_server: RcloneS3, bucket: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="f.txt", Body=b"hello")
    client = node.start_plugin()
    uid = node.kubelet.new_pod()
    pod = node.pod(uid)  # already listening: this publish answers once the mount serves
    target = node.kubelet.publish(client, uid, "pv-f", "vol-f", {"bucket": bucket, "endpoint": s3_server.endpoint},
                                  secrets_of(s3_server))
    assert node.phase(target) == SERVED
    assert (Path(target) / "f.txt").read_bytes() == b"hello"
    pod.kill()
    with pytest.raises(OSError) as err:
        (Path(target) / "f.txt").read_bytes()
    assert err.value.errno == errno.ENOTCONN
    cond = stats(client, "vol-f", target).volume_condition
    assert cond.abnormal and "objfs-sidecar container of pod" in cond.message and "restarted" in cond.message
    node.kubelet.unpublish(client, "vol-f", target)
    assert kernel.find_mount(target) is None and not os.path.exists(target)
    assert node.records() == []


def test_a_pod_without_a_sidecar_is_told_how_to_fix_it(node: Node, s3_server: RcloneS3, bucket: str) -> None:
    client = node.start_plugin()
    uid = node.kubelet.new_pod(sidecar=False)
    with pytest.raises(grpc.RpcError) as err:
        node.kubelet.publish(client, uid, "pv-x", "vol-x", {"bucket": bucket, "endpoint": s3_server.endpoint},
                             secrets_of(s3_server))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert 'objfs.csi.dev/inject: "true"' in (err.value.details() or "")
    assert "--allow-process-fallback" in (err.value.details() or "")
    parent = node.kubelet.pod_dir(uid) / "volumes" / "kubernetes.io~csi" / "pv-x"
    assert os.listdir(parent) == [] and node.records() == []


def test_two_volumes_in_a_pod_and_pods_sharing_the_node_cache(
        node: Node, s3_server: RcloneS3, bucket: str) -> None:
    data = random_bytes(9 * MiB + 5, seed=8)  # two cache blocks
    s3_server.client().put_object(Bucket=bucket, Key="shared/weights.bin", Body=data)
    s3_server.client().put_object(Bucket=bucket, Key="own/notes.txt", Body=b"own")
    with CountingProxy(s3_server.port) as proxy:
        client = node.start_plugin()
        shared = {"bucket": bucket, "prefix": "shared", "endpoint": proxy.endpoint}
        uids = [node.kubelet.new_pod() for _ in range(3)]
        targets = [node.kubelet.publish(client, u, "pv-shared", "shared", shared, secrets_of(s3_server), readonly=True,
                                        mode=pb.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY) for u in uids]
        own = node.kubelet.publish(client, uids[0], "pv-own", "own", {"bucket": bucket, "prefix": "own",
                                   "endpoint": proxy.endpoint}, secrets_of(s3_server))
        pods = [node.pod(u) for u in uids]
        for t in [*targets, own]:
            wait_for(lambda t=t: node.phase(t) == SERVED, what=f"the hand-over of {t}")
        assert len(pods[0].server_pids()) == 2  # one server per volume
        assert (Path(own) / "notes.txt").read_bytes() == b"own"
        proxy.reset()
        for t in targets:
            assert (Path(t) / "weights.bin").read_bytes() == data
        got = proxy.tally()
        # One fetch per block for the node, not per pod: the three pods' servers share the cache.
        assert got.body_bytes["GET"] <= len(data) + 2 * MiB, got.as_dict()
        for t in targets:
            node.kubelet.unpublish(client, "shared", t)
        node.kubelet.unpublish(client, "own", own)
        assert node.records() == []
        for p in pods:
            wait_for(lambda p=p: p.server_pids() == [], what="the pod's servers to exit")


def test_sigterm_lets_open_files_finish_their_upload(node: Node, s3_server: RcloneS3, bucket: str) -> None:
    client = node.start_plugin()
    uid = node.kubelet.new_pod()
    pod = node.pod(uid)
    target = node.kubelet.publish(client, uid, "pv-w", "vol-w", {"bucket": bucket, "endpoint": s3_server.endpoint},
                                  secrets_of(s3_server))
    payload = random_bytes(2 * MiB + 3, seed=5)
    with open(Path(target) / "ckpt.bin", "wb") as f:
        f.write(payload[: MiB])
        pod.terminate()  # kubelet stops the sidecar while the file is still open
        f.write(payload[MiB:])
    assert pod.wait() == 0
    assert s3_server.client().get_object(Bucket=bucket, Key="ckpt.bin")["Body"].read() == payload
    node.kubelet.unpublish(client, "vol-w", target)
    assert kernel.find_mount(target) is None and node.records() == []


def job_pod(uid: str, name: str, native: bool, job_state: dict[str, object]) -> dict[str, object]:
    """The pod as the API server would show it: the webhook's sidecar, one container "job"."""
    sidecar = {"name": "objfs-sidecar", "image": "objfs-csi", **({"restartPolicy": "Always"} if native else {})}
    spec: dict[str, object] = {"restartPolicy": "Never", "containers": [{"name": "job", "image": "trainer"}]}
    if native:
        spec["initContainers"] = [sidecar]
    else:
        spec["containers"] = [sidecar, {"name": "job", "image": "trainer"}]
    return {"metadata": {"name": name, "namespace": "ml", "uid": uid}, "spec": spec,
            "status": {"containerStatuses": [{"name": "objfs-sidecar", "state": {"running": {}}},
                                             {"name": "job", "state": job_state}]}}


def test_a_job_with_a_regular_sidecar_completes_with_its_uploads_done(
        node: Node, s3_server: RcloneS3, bucket: str) -> None:
    with FakeApiServer(node.root / "api") as api:
        client = node.start_plugin("--kube-api", api.url, "--kube-token-file", str(api.token_file),
                                   "--kube-ca-file", str(api.ca_file), "--sidecar-exit-poll", "0.2")
        ctx = {"bucket": bucket, "prefix": "runs", "endpoint": s3_server.endpoint}
        job, native = node.kubelet.new_pod(), node.kubelet.new_pod()
        paths = {u: f"/api/v1/namespaces/ml/pods/pod-{u[:5]}" for u in (job, native)}  # FakeKubelet's names
        running: dict[str, object] = {"running": {"startedAt": "2026-12-02T16:00:00Z"}}
        api.put(paths[job], job_pod(job, f"pod-{job[:5]}", False, running))
        api.put(paths[native], job_pod(native, f"pod-{native[:5]}", True, running))
        targets = {u: node.kubelet.publish(client, u, "pv-runs", "runs", ctx, secrets_of(s3_server))
                   for u in (job, native)}
        pods = {u: node.pod(u) for u in (job, native)}
        for t in targets.values():
            wait_for(lambda t=t: node.phase(t) == SERVED, what=f"the hand-over of {t}")

        # The Job's container: writes its result and exits (its last close starts the upload).
        payload = random_bytes(12 * MiB + 11, seed=12)
        writer = ("import sys; f = open(sys.argv[1], 'wb'); [f.write(sys.stdin.buffer.read(1 << 20)) "
                  "for _ in range(13)]; f.close()")
        subprocess.run([sys.executable, "-c", writer, f"{targets[job]}/result.bin"], input=payload, check=True)
        # While the API says it still runs, the sidecar is left alone (looked at again and again).
        wait_for(lambda: api.count("GET", paths[job]) >= 3, what="the plugin to look at the Job's pod")
        exit_file = node.kubelet.empty_dir(job) / "exit"
        job_proc = pods[job].proc
        assert not exit_file.exists() and job_proc is not None and job_proc.poll() is None
        # The pod with a native sidecar was read once and then left alone: kubelet stops that one.
        assert api.count("GET", paths[native]) == 1
        # kubelet reports the container done: the plugin tells the sidecar, which uploads and exits 0.
        api.put(paths[job], job_pod(job, f"pod-{job[:5]}", False, {"terminated": {"exitCode": 0}}))
        assert pods[job].wait() == 0
        assert exit_file.exists()
        cond = stats(client, "runs", targets[job]).volume_condition
        assert not cond.abnormal and "exited as told" in cond.message  # done, not broken
        assert s3_server.client().get_object(Bucket=bucket, Key="runs/result.bin")["Body"].read() == payload
        assert api.count("GET", paths[native]) == 1 and not (node.kubelet.empty_dir(native) / "exit").exists()
        native_proc = pods[native].proc
        assert native_proc is not None and native_proc.poll() is None

        for t in targets.values():
            node.kubelet.unpublish(client, "runs", t)
            assert kernel.find_mount(t) is None
        assert node.records() == []
        pods[native].terminate()
        assert pods[native].wait() == 0


@pytest.mark.skipif(not backing.patched_pyfuse3(), reason="pyfuse3 without the passthrough API")
def test_a_complete_cached_file_reaches_the_pod_through_passthrough(
        node: Node, s3_server: RcloneS3, bucket: str) -> None:
    """The pod's server holds no cache: the data service registers the complete file (through the
    plugin's broker, read-only) on the pod's FUSE connection, and the kernel reads it directly."""
    data = random_bytes(20 * MiB + 5, seed=9)
    s3_server.client().put_object(Bucket=bucket, Key="m/w.bin", Body=data)
    client = node.start_plugin()
    uid = node.kubelet.new_pod()
    target = node.kubelet.publish(client, uid, "pv-m", "m", {"bucket": bucket, "prefix": "m",
                                  "endpoint": s3_server.endpoint}, secrets_of(s3_server), readonly=True,
                                  mode=pb.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY)
    node.pod(uid)
    wait_for(lambda: node.phase(target) == SERVED, what="the hand-over")
    assert (Path(target) / "w.bin").read_bytes() == data  # fills the node cache
    wait_for(lambda: any(Path(node.dirs.cache).rglob("*.obj")), what="the complete file")
    figures = node.kubelet.empty_dir(uid) / "metrics" / "pv-m.prom"

    def passthrough_opens() -> float:
        return value(parse(figures.read_text()), "objfs_fuse_passthrough_opens_total") if figures.exists() else 0

    opened = passthrough_opens()

    def read_through_passthrough() -> bool:
        # a new open each time (the kernel reads the cache file itself); the figures are written
        # every few seconds, and the service may still be checking the file at the first open
        assert (Path(target) / "w.bin").read_bytes() == data
        with contextlib.suppress(AssertionError):
            wait_for(lambda: passthrough_opens() > opened, timeout=2 * metrics.WRITE_INTERVAL, what="")
            return True
        return False

    wait_for(read_through_passthrough, what="a passthrough open counted by the pod's server")
    node.kubelet.unpublish(client, "m", target)
