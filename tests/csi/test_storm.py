"""A storm of concurrent publishes and unpublishes while the node plugin is killed (SIGKILL) at
random points: after the last restart, and once kubelet's retries went through, nothing is left
— no mount, no server process, no state file — and no retry was ever answered AlreadyExists
(the plugin records its intent before it mounts, so a half-done publish is finished or undone)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from csi.v1 import csi_pb2 as pb
from fusefs import kernel
from testing.plugin import Client, PluginDirs, PluginProcess, unmount_all_under
from testing.pods import cap, processes_holding
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse
TARGETS = 25  # a publish and an unpublish each: 50 calls
KILLS = 3
#: codes kubelet retries on (the plugin is gone or restarting, or busy with the same target)
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


@pytest.fixture
def root() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="objfs-storm-")
    yield d
    unmount_all_under(d)
    for pid in processes_holding(d):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(d, ignore_errors=True)


class Plugin:
    """The running plugin and a client for it, swapped on every restart."""

    def __init__(self, dirs: PluginDirs) -> None:
        self.dirs = dirs
        self.lock = threading.Lock()
        self.proc = PluginProcess(dirs, node_id="storm")
        self.client: Client = self.proc.start()

    def current(self) -> Client:
        with self.lock:
            return self.client

    def restart(self) -> None:
        with self.lock:
            self.proc.kill(signal.SIGKILL)
            self.client.close()
            self.proc = PluginProcess(self.dirs, node_id="storm", log_path=self.proc.log_path)
            self.client = self.proc.start()


def test_publish_storm_with_plugin_kills_leaks_nothing(s3_server: RcloneS3, bucket: str, root: str) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    dirs = PluginDirs(os.path.join(root, "plugin"))
    plugin = Plugin(dirs)
    ctx = {"bucket": bucket, "endpoint": s3_server.endpoint}
    secrets = {"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key}
    targets = []
    for i in range(TARGETS):
        parent = os.path.join(root, "kubelet", "pods", f"pod-{i}", "volumes", "kubernetes.io~csi", "pv")
        os.makedirs(parent)
        targets.append(os.path.join(parent, "mount"))
    refused: list[str] = []
    calls = 0
    done = threading.Event()

    def until_ok(call: str, target: str) -> None:
        nonlocal calls
        while True:
            client = plugin.current()
            try:
                if call == "publish":
                    client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
                        volume_id=f"vol-{os.path.basename(os.path.dirname(os.path.dirname(target)))}",
                        target_path=target, volume_capability=cap(), volume_context=ctx, secrets=secrets), timeout=60)
                else:
                    client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
                        volume_id="vol", target_path=target), timeout=60)
                calls += 1
                return
            except grpc.RpcError as exc:
                if exc.code() not in RETRIED:
                    refused.append(f"{call} {target}: {exc.code().name} {exc.details()}")
                    return
                time.sleep(0.05 + rng.random() * 0.1)  # kubelet backs off, then retries
            except ValueError:  # "closed channel": the killer restarted the plugin after we took its client
                time.sleep(0.05 + rng.random() * 0.1)

    def pod(target: str) -> None:
        time.sleep(rng.random() * 0.5)
        until_ok("publish", target)
        time.sleep(rng.random() * 0.5)
        until_ok("unpublish", target)

    def killer() -> None:
        for _ in range(KILLS):
            if done.wait(0.1 + rng.random() * 0.8):
                return
            plugin.restart()

    workers = [threading.Thread(target=pod, args=(t,)) for t in targets]
    kill_thread = threading.Thread(target=killer)
    for w in [*workers, kill_thread]:
        w.start()
    for w in workers:
        w.join(300)
    done.set()
    kill_thread.join(120)
    try:
        assert refused == [], f"seed {seed}: {refused}"
        assert calls == 2 * TARGETS
        assert [t for t in targets if kernel.find_mount(t) is not None or os.path.exists(t)] == []
        assert os.listdir(os.path.join(dirs.state, "targets")) == []
        assert os.listdir(os.path.join(dirs.state, "grants")) == []  # no grant (nor its secret) outlives its volume
        assert os.listdir(os.path.join(dirs.state, "servers")) == []
        assert [f for f in os.listdir(os.path.join(dirs.state, "logs")) if f != "zygote.log"] == []
    finally:
        plugin.current().close()
        plugin.proc.stop()
    # Every server ended with its mount; the zygote with the plugin. Nothing holds a file of ours.
    deadline = time.monotonic() + 30
    while processes_holding(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_holding(root) == [], f"seed {seed}"
