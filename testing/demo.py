"""`make demo`: objfs end to end on a local S3 server, no cluster needed.

1. starts a local S3 server (rclone) holding a generated model (safetensors, ~256 MiB);
2. starts objfs-csi, and does what external-provisioner and kubelet would: CreateVolume from a
   StorageClass, NodePublishVolume of a ReadOnlyMany static PV of the weights into two "pods";
3. loads the weights through the mounts (safe_open + get_tensor of every tensor) in pod 1 (cold:
   from S3) and pod 2 (warm: from the node cache), compares every tensor with the source;
4. writes a checkpoint into the provisioned ReadWriteMany volume from one pod, reads it in another;
5. unpublishes, deletes the volume, stops everything.

OBJFS_DEMO_MIB sets the model size (default 256).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors import safe_open
from safetensors.numpy import save_file

from csi.v1 import csi_pb2 as pb
from testing.plugin import Client, PluginDirs, PluginProcess, unmount_all_under
from testing.pods import cap
from testing.servers import RcloneS3

console = Console(emoji=False, log_path=False)
Mode = pb.VolumeCapability.AccessMode
MiB = 1024 * 1024


def make_model(path: Path, mib: int) -> dict[str, np.ndarray]:
    """A transformer-shaped checkpoint: float16 matrices plus small norm vectors."""
    rng = np.random.default_rng(7)
    hidden = 1024
    layers = max(1, mib // 8)  # 4 matrices of 1024x1024 float16 = 8 MiB per layer
    embed = rng.standard_normal((4096, hidden), np.float32).astype(np.float16)
    tensors: dict[str, np.ndarray] = {"embed.weight": embed}
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            tensors[f"layers.{i}.attn.{name}.weight"] = rng.standard_normal((hidden, hidden), np.float32).astype(
                np.float16)
        tensors[f"layers.{i}.norm.weight"] = np.ones(hidden, np.float32)
    save_file(tensors, str(path))
    return tensors


def load_all(path: str, progress: Progress, label: str) -> tuple[dict[str, np.ndarray], float]:
    start = time.perf_counter()
    out: dict[str, np.ndarray] = {}
    with safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
        task = progress.add_task(label, total=len(keys))
        for k in keys:
            out[k] = f.get_tensor(k)
            progress.advance(task)
    return out, time.perf_counter() - start


class Pods:
    """Kubelet's side: target paths, pod info in the volume context, publish and unpublish."""

    def __init__(self, client: Client, root: str, secrets: dict[str, str]) -> None:
        self.client, self.root, self.secrets = client, root, secrets
        self.published: list[tuple[str, str]] = []

    def publish(self, pod: str, pv: str, volume_id: str, mode: int, context: dict[str, str]) -> str:
        uid = str(uuid.uuid4())
        parent = os.path.join(self.root, "pods", uid, "volumes", "kubernetes.io~csi", pv)
        os.makedirs(parent)
        target = os.path.join(parent, "mount")
        info = {"csi.storage.k8s.io/pod.name": pod, "csi.storage.k8s.io/pod.namespace": "demo",
                "csi.storage.k8s.io/pod.uid": uid, "csi.storage.k8s.io/serviceAccount.name": "default",
                "csi.storage.k8s.io/ephemeral": "false"}
        t0 = time.perf_counter()
        self.client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=volume_id, target_path=target, volume_capability=cap(mode),
            readonly=mode == Mode.MULTI_NODE_READER_ONLY, volume_context={**context, **info}, secrets=self.secrets))
        console.log(f"[green]NodePublishVolume[/] {pod}: {pv} -> {target} ({(time.perf_counter() - t0) * 1000:.0f} ms)")
        self.published.append((volume_id, target))
        return target

    def unpublish_all(self) -> None:
        for volume_id, target in reversed(self.published):
            self.client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
            console.log(f"[green]NodeUnpublishVolume[/] {target}")
        self.published.clear()


@contextlib.contextmanager
def workspace() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="objfs-demo-")
    try:
        yield root
    finally:
        detached = unmount_all_under(root)
        if detached:
            console.log(f"[yellow]detached {len(detached)} leftover mount(s)")
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    mib = int(os.environ.get("OBJFS_DEMO_MIB", "256"))
    console.print(Panel.fit("[bold]objfs demo[/]: model weights from S3 through objfs-csi, the way Kubernetes "
                            "would mount them", border_style="cyan"))
    with workspace() as root, RcloneS3(Path(root) / "s3") as s3:
        s3c = s3.client()
        secrets = {"accessKeyID": s3.access_key, "secretAccessKey": s3.secret_key}
        console.log(f"local S3 server (rclone serve s3) at {s3.endpoint}")

        with console.status(f"generating a {mib} MiB safetensors model"):
            src = Path(root) / "model.safetensors"
            source = make_model(src, mib)
            size = src.stat().st_size
            s3.create_bucket("models")
            t0 = time.perf_counter()
            s3c.upload_file(str(src), "models", "tiny-llama/model.safetensors")
            s3c.put_object(Bucket="models", Key="tiny-llama/config.json", Body=b'{"model_type": "llama"}')
        console.log(f"uploaded s3://models/tiny-llama/model.safetensors: {size / MiB:.0f} MiB, {len(source)} tensors "
                    f"({size / MiB / (time.perf_counter() - t0):.0f} MiB/s)")

        dirs = PluginDirs(os.path.join(root, "node"))
        plugin = PluginProcess(dirs, node_id="demo-node")
        client = plugin.start()
        console.log(f"objfs-csi started (node plugin + controller) on {dirs.socket}; "
                    f"FUSE servers run as uid {dirs.argv('x')[-1]}")
        pods = Pods(client, dirs.root, secrets)
        rows: list[tuple[str, str, str, float, bool]] = []
        try:
            # external-provisioner: a PVC of StorageClass "objfs-scratch" (a bucket per volume).
            t0 = time.perf_counter()
            vol = client.controller.CreateVolume(pb.CreateVolumeRequest(
                name=f"pvc-{uuid.uuid4()}", volume_capabilities=[cap(Mode.MULTI_NODE_MULTI_WRITER)],
                capacity_range=pb.CapacityRange(required_bytes=10 << 30), secrets=secrets,
                parameters={"endpoint": s3.endpoint, "csi.storage.k8s.io/pvc/name": "scratch",
                            "csi.storage.k8s.io/pvc/namespace": "demo"})).volume
            took_ms = (time.perf_counter() - t0) * 1000
            console.log(f"[green]CreateVolume[/] scratch -> {vol.volume_id} ({took_ms:.0f} ms)")

            # A static ReadOnlyMany PV of the weights, mounted by two inference pods.
            weights_ctx = {"bucket": "models", "prefix": "tiny-llama", "endpoint": s3.endpoint, "prefetch": "*.json"}
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console) as progress:
                for pod, label in (("inference-1", "cold (from S3)"), ("inference-2", "warm (node cache)")):
                    target = pods.publish(pod, "pv-weights", "models-tiny-llama", Mode.MULTI_NODE_READER_ONLY,
                                          weights_ctx)
                    loaded, took = load_all(os.path.join(target, "model.safetensors"), progress, f"{pod} {label}")
                    ok = loaded.keys() == source.keys() and all(np.array_equal(loaded[k], v) for k, v in source.items())
                    rows.append((pod, label, f"{size / MiB / took:,.0f} MiB/s", took, ok))

            # The ReadWriteMany scratch volume: a trainer writes, an evaluator reads.
            writer = pods.publish("trainer", "pv-scratch", vol.volume_id, Mode.MULTI_NODE_MULTI_WRITER,
                                  dict(vol.volume_context))
            reader = pods.publish("evaluator", "pv-scratch", vol.volume_id, Mode.MULTI_NODE_MULTI_WRITER,
                                  dict(vol.volume_context))
            checkpoint = os.urandom(8 * MiB)
            with open(os.path.join(writer, "step-100.ckpt"), "wb") as f:
                f.write(checkpoint)
            with open(os.path.join(reader, "step-100.ckpt"), "rb") as f:
                shared_ok = f.read() == checkpoint
            console.log(f"trainer wrote step-100.ckpt (8 MiB), evaluator read it back: "
                        f"{'[green]identical' if shared_ok else '[red]DIFFERENT'}")
        finally:
            pods.unpublish_all()
            with contextlib.suppress(Exception):
                client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=secrets))
                console.log(f"[green]DeleteVolume[/] {vol.volume_id}")
            client.close()
            plugin.stop()
            console.log("objfs-csi stopped")

        table = Table(title=f"loading {len(source)} tensors ({size / MiB:.0f} MiB) through objfs")
        for col in ("pod", "read path", "throughput", "seconds", "tensors match"):
            table.add_column(col)
        for pod, label, rate, took, ok in rows:
            table.add_row(pod, label, rate, f"{took:.2f}", "[green]yes" if ok else "[red]NO")
        console.print(table)
        all_ok = all(r[4] for r in rows) and shared_ok
        console.print("[bold green]demo OK[/]" if all_ok else "[bold red]demo FAILED[/]")
        return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
