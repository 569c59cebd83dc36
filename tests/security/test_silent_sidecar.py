"""A pod whose "sidecar" greets the node plugin and then says nothing.

Before, the plugin's gRPC thread waited for the sidecar's ready line (60 s, twice: the publish and
its retry), so a handful of such pods held every worker and blocked every publish on the node. Now
a publish waits at most a few seconds (``SidecarLauncher.sync_wait``) and answers "pending"; the
hand-over goes on in the background and fails on its own deadline.

With two gRPC workers and three silent pods publishing at once, every publish is answered within a
deadline shorter than the old wait, and the node still answers other calls.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi.node.state import PENDING, StateStore
from csi.v1 import csi_pb2 as pb
from fusefs.wire import handoff
from testing.plugin import Client, PluginDirs, PluginProcess, unmount_all_under
from testing.pods import FakeKubelet
from testing.servers import RcloneS3

pytestmark = pytest.mark.fuse
DEADLINE = 30.0  # below the 60 s the plugin used to wait for one sidecar's word


class SilentSidecar:
    """Listens on the pod's hand-over socket, greets, reads the request, and never answers."""

    def __init__(self, directory: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dirfd = os.open(directory, os.O_PATH)
        try:
            self.sock.bind(f"/proc/self/fd/{dirfd}/{handoff.SIDECAR_SOCKET}")
        finally:
            os.close(dirfd)
        self.sock.listen(8)
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            handoff.send_hello(conn, "/objfs-tmp")
            self.held.append(conn)  # never a word more

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def plugin() -> Iterator[tuple[Client, PluginDirs, FakeKubelet]]:
    root = Path(tempfile.mkdtemp(prefix="objfs-silent-"))
    os.chmod(root, 0o755)
    dirs = PluginDirs(str(root / "plugin"))
    kubelet = FakeKubelet(root / "kubelet")
    proc = PluginProcess(dirs, node_id="node-s", extra_args=[
        "--launcher", "sidecar", "--kubelet-root", str(kubelet.root), "--workers", "2", "--sidecar-wait", "1"])
    client = proc.start()
    try:
        yield client, dirs, kubelet
    finally:
        client.close()
        proc.kill()
        unmount_all_under(str(root))
        shutil.rmtree(root, ignore_errors=True)


def test_silent_sidecars_hold_no_grpc_worker(plugin: tuple[Client, PluginDirs, FakeKubelet], s3_server: RcloneS3,
                                             bucket: str) -> None:
    client, dirs, kubelet = plugin
    pods = [kubelet.new_pod() for _ in range(3)]
    silent = [SilentSidecar(kubelet.empty_dir(uid)) for uid in pods]
    secrets = {"accessKeyID": s3_server.access_key, "secretAccessKey": s3_server.secret_key}
    try:
        with ThreadPoolExecutor(len(pods)) as pool:
            targets = list(pool.map(lambda uid: kubelet.publish(
                client, uid, "pv", f"vol-{uid[:8]}", {"bucket": bucket, "endpoint": s3_server.endpoint}, secrets,
                timeout=DEADLINE), pods))
        records = {r.target: r.phase for r in StateStore(dirs.state).all()}
        assert all(records[t] == PENDING for t in targets), records
        # the node still answers while three hand-overs hang in the background
        client.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=DEADLINE)
        for uid, target in zip(pods, targets, strict=True):
            kubelet.unpublish(client, f"vol-{uid[:8]}", target)
    except grpc.RpcError as exc:
        pytest.fail(f"a publish to a silent sidecar held the plugin: {exc.code()} {exc.details()}")
    finally:
        for s in silent:
            s.close()
