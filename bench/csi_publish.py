"""Scenario 10: NodePublishVolume latency of objfs-csi, 20 publishes at once, over its gRPC socket.

A publish counts only if the mount answers a listing right after the call returns. The plugin
runs with its own state and cache directories under the run's work dir, and every target is
unpublished (and the plugin stopped) even when the scenario fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import procs
from bench.report import Goal, Scenario
from bench.scenarios import Ctx
from testing.servers import stop_process

SOCKET_WAIT = 30.0


def csi_available(repo: Path) -> str | None:
    exe = Path(sys.executable).parent / "objfs-csi"
    if not (repo / "csi" / "services" / "node.py").exists():
        return "csi/services/node.py is not there"
    if not exe.exists():
        return f"{exe} is not installed"
    try:
        import csi.v1.csi_pb2_grpc  # noqa: F401
    except ImportError as exc:
        return f"CSI stubs missing: {exc}"
    return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def node_publish(ctx: Ctx) -> Scenario:
    import grpc

    from csi.v1 import csi_pb2, csi_pb2_grpc

    n = ctx.sizes.publishes
    sc = ctx.run.scenario("10", f"NodePublishVolume, {n} at once, until the mount answers", "ms", False, [])
    sc.goals += [Goal("p50 <= 500 ms", "objfs-csi", ref=None, metric="p50 ms", op="<=", value=500),
                 Goal("p95 <= 1000 ms", "objfs-csi", ref=None, metric="p95 ms", op="<=", value=1000)]
    base = ctx.workdir / "csi"
    sock = base / "csi.sock"
    for d in ("state", "cache", "pods"):
        (base / d).mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    exe = Path(sys.executable).parent / "objfs-csi"
    log = open(base / "objfs-csi.log", "ab")
    plugin = subprocess.Popen([str(exe), "--endpoint", f"unix://{sock}", "--node-id", "bench", "--mode", "node",
                               "--state-dir", str(base / "state"), "--cache-dir", str(base / "cache"),
                               # the venv's interpreter lives where uid 65534 cannot execute it
                               "--server-uid", "0", "--server-gid", "0"],
                              stdout=log, stderr=log, start_new_session=True)
    targets = [base / "pods" / f"pod-{i:02d}" / "volumes" / "mount" for i in range(n)]
    channel = None
    try:
        deadline = time.monotonic() + SOCKET_WAIT
        while not sock.exists():
            if plugin.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"objfs-csi did not open {sock} (see {base / 'objfs-csi.log'})")
            time.sleep(0.05)
        channel = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(channel).result(timeout=SOCKET_WAIT)
        identity = csi_pb2_grpc.IdentityStub(channel)
        # Publishes are timed on a running plugin: wait until Probe says ready (its zygote is up)
        while not identity.Probe(csi_pb2.ProbeRequest(), timeout=SOCKET_WAIT).ready.value:
            if time.monotonic() > deadline + SOCKET_WAIT:
                raise RuntimeError("objfs-csi did not report ready")
            time.sleep(0.05)
        node = csi_pb2_grpc.NodeStub(channel)
        # rclone serve s3 answers its first LIST of a folder only after building its directory
        # cache (~400 ms here, and twenty at once take seconds): a cold start of this test store,
        # not of the driver, so it happens before the clock starts.
        ctx.boto.list_objects_v2(Bucket=ctx.store.bucket, Prefix="large/", Delimiter="/")
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY),
        )
        context = {"bucket": ctx.store.bucket, "prefix": "large", "endpoint": ctx.store.endpoint}
        secrets = {"accessKeyID": ctx.store.access_key, "secretAccessKey": ctx.store.secret_key}

        def publish(target: Path) -> float:
            target.parent.mkdir(parents=True, exist_ok=True)  # kubelet creates the parent, the driver the target
            t0 = time.perf_counter()
            node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=f"bench-{target.parent.parent.name}", target_path=str(target), volume_capability=cap,
                readonly=True, volume_context=context, secrets=secrets), timeout=120)
            names = procs.call_with_timeout(lambda: os.listdir(target), 30)
            secs = time.perf_counter() - t0
            if "object.bin" not in names:
                raise AssertionError(f"{target}: published mount does not list object.bin ({names})")
            return secs * 1000

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            latencies = list(pool.map(publish, targets))
        for ms in latencies:
            sc.add("objfs-csi", ms)
        sc.extras["objfs-csi"] = {"p50 ms": [statistics.median(latencies)],
                                  "p95 ms": [_percentile(latencies, 0.95)], "max ms": [max(latencies)]}
        ctx.log(f"  10 p50 {statistics.median(latencies):.0f} ms p95 {_percentile(latencies, 0.95):.0f} ms")
        for target in targets:
            node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=f"bench-{target.parent.parent.name}", target_path=str(target)), timeout=60)
    finally:
        if channel is not None:
            channel.close()
        for target in targets:  # whatever the plugin did not unpublish
            with contextlib.suppress(Exception):
                procs.force_unmount(target, None, timeout=10)
        stop_process(plugin)
        log.close()
    return sc
