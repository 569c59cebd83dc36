"""Scenarios 12 and 13: the sidecar launcher's publish latency against the process launcher's, and
the memory of a pod's ``objfs sidecar``.

The pods are the tests' (``testing.pods``): a kubelet root in the work dir, each pod an
``objfs sidecar`` in a mount and PID namespace of its own, as uid 65534 with a read-only root.

12 times NodePublishVolume until it returns, one call after another:
- ``process``: ``--launcher process``, a pod without a sidecar; the call returns once the
  zygote-forked ``objfs serve`` serves.
- ``sidecar, pod not started``: the first volume of a pod, published before its containers start
  (what kubelet does): the call returns once the target is mounted; the hand-over waits.
- ``sidecar, after start``: from the sidecar listening to the pending mount listing (untimed by
  kubelet, but the pod's first read waits for it).
- ``sidecar, listening``: a second volume of a pod whose sidecar already runs: the call returns once
  the sidecar's server serves (the node cache is mounted into the pod as well).
13 reads the RSS (and PSS: the servers are forked from the sidecar, pages shared) of a sidecar
serving one volume, idle and while reading the large object cold.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import threading
import time
from collections.abc import Iterator

from bench import procs
from bench.data import LARGE_KEY
from bench.report import Goal, Scenario
from bench.scenarios import READ, Ctx, check
from csi.v1 import csi_pb2 as pb
from testing.plugin import Client, PluginDirs, PluginProcess, unmount_all_under
from testing.pods import FakeKubelet, SidecarPod, objfs_command_for_nobody

MiB = 1 << 20


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _proc_kib(pid: int, field: str, name: str = "status") -> int:
    """A ``kB`` field of /proc/<pid>/status or smaps_rollup (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Node:
    """A kubelet root, and objfs-csi plugins and pods on it."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.base = ctx.workdir / "csi-sidecar"
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        os.chmod(self.base, 0o755)
        self.command = objfs_command_for_nobody(self.base / "objfs")
        self.kubelet = FakeKubelet(self.base / "kubelet")
        self.volume = {"bucket": ctx.store.bucket, "prefix": "large", "endpoint": ctx.store.endpoint}
        self.secrets = {"accessKeyID": ctx.store.access_key, "secretAccessKey": ctx.store.secret_key}
        self.pods: list[SidecarPod] = []
        self.volume_ids: dict[str, str] = {}  # target -> volume ID

    @contextlib.contextmanager
    def plugin(self, name: str, *args: str) -> Iterator[Client]:
        plugin = PluginProcess(PluginDirs(str(self.base / name)), node_id="bench", extra_args=list(args))
        client = plugin.start()  # and Probe said ready (the process launcher's zygote is up)
        try:
            yield client
        finally:
            client.close()
            plugin.stop()

    def pod(self, uid: str) -> SidecarPod:
        assert self.command is not None
        pod = SidecarPod(self.kubelet.empty_dir(uid), self.command, hide=[self.base / "sidecar"])
        self.pods.append(pod)
        return pod.start()

    def publish(self, client: Client, uid: str, pv: str) -> tuple[str, float]:
        volume_id = f"bench-{uid[:8]}-{pv}"
        t0 = time.perf_counter()
        target = self.kubelet.publish(client, uid, pv, volume_id, self.volume, self.secrets, readonly=True,
                                      mode=pb.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY)
        ms = (time.perf_counter() - t0) * 1000
        self.volume_ids[target] = volume_id
        return target, ms

    @staticmethod
    def lists(target: str, timeout: float = 60) -> None:
        names = procs.call_with_timeout(lambda: os.listdir(target), timeout)
        if "object.bin" not in names:
            raise AssertionError(f"{target}: published mount does not list object.bin ({names})")

    def unpublish(self, client: Client, target: str) -> None:
        self.kubelet.unpublish(client, self.volume_ids.pop(target), target)

    def close(self) -> None:
        for pod in self.pods:
            pod.close()
        unmount_all_under(str(self.base))
        shutil.rmtree(self.base, ignore_errors=True)


def publish_latency(ctx: Ctx) -> Scenario:
    n = ctx.sizes.publishes
    sc = ctx.run.scenario("12", f"NodePublishVolume until it returns, {n} one after another: process vs sidecar "
                          "launcher", "ms", False, [])
    sc.goals += [Goal("listening sidecar p50 <= 500 ms", "sidecar, listening", ref=None, metric="p50 ms", op="<=",
                      value=500),
                 Goal("pod not started p90 <= 200 ms", "sidecar, pod not started", ref=None, metric="p90 ms", op="<=",
                      value=200)]
    node = _Node(ctx)
    if node.command is None:
        sc.notes.append("not available: no interpreter uid 65534 can run objfs with (testing.pods)")
        node.close()
        return sc
    # rclone serve s3 builds its directory cache at the first LIST of a folder: not the driver's time.
    ctx.boto.list_objects_v2(Bucket=ctx.store.bucket, Prefix="large/", Delimiter="/")
    try:
        with node.plugin("process", "--launcher", "process") as client:
            targets = []
            for _ in range(n):
                target, ms = node.publish(client, node.kubelet.new_pod(sidecar=False), "pv-a")
                sc.add("process", ms)
                node.lists(target)
                targets.append(target)
            for target in targets:
                node.unpublish(client, target)
        with node.plugin("sidecar", "--launcher", "sidecar", "--kubelet-root", str(node.kubelet.root),
                         "--sidecar-wait", "1") as client:
            for _ in range(n):
                uid = node.kubelet.new_pod()
                first, ms = node.publish(client, uid, "pv-a")  # kubelet: volumes before containers
                sc.add("sidecar, pod not started", ms)
                pod = node.pod(uid)  # returns once its socket listens
                t0 = time.perf_counter()
                node.lists(first)
                sc.add("sidecar, after start", (time.perf_counter() - t0) * 1000)
                second, ms = node.publish(client, uid, "pv-b")
                sc.add("sidecar, listening", ms)
                node.lists(second)
                for target in (first, second):
                    node.unpublish(client, target)
                pod.terminate()
                if pod.wait() != 0:
                    raise AssertionError(f"the sidecar of pod {uid} did not exit cleanly on SIGTERM")
    finally:
        node.close()
    for client_name, values in sc.samples.items():
        sc.extras[client_name] = {"p50 ms": [statistics.median(values)], "p90 ms": [_percentile(values, 0.9)],
                                  "max ms": [max(values)]}
        ctx.log(f"  12 {client_name}: p50 {statistics.median(values):.0f} ms p90 {_percentile(values, 0.9):.0f} ms")
    return sc


def sidecar_memory(ctx: Ctx) -> Scenario:
    sc = ctx.run.scenario("13", "memory of a pod's objfs sidecar serving one volume (sidecar + its server)", "MiB",
                          False, [])
    node = _Node(ctx)
    if node.command is None:
        sc.notes.append("not available: no interpreter uid 65534 can run objfs with (testing.pods)")
        node.close()
        return sc
    size = ctx.sizes.large
    try:
        with node.plugin("sidecar", "--launcher", "sidecar", "--kubelet-root", str(node.kubelet.root),
                         "--sidecar-wait", "1") as client:
            uid = node.kubelet.new_pod()
            target, _ = node.publish(client, uid, "pv-a")
            pod = node.pod(uid)
            node.lists(target)
            sidecar = pod.init_pid
            if sidecar is None:
                raise RuntimeError("the pod's sidecar process is gone before anything was measured")
            (server,) = pod.server_pids()
            time.sleep(2)  # idle: start-up done, nothing read

            def figures() -> tuple[float, float]:
                rss = sum(_proc_kib(p, "VmRSS") for p in (sidecar, server)) / 1024
                pss = sum(_proc_kib(p, "Pss", "smaps_rollup") for p in (sidecar, server)) / 1024
                return rss, pss

            rss, pss = figures()
            server_rss = _proc_kib(server, "VmRSS") / 1024
            sc.add("idle", rss, **{"PSS MiB": round(pss, 1), "server RSS MiB": round(server_rss, 1)})
            peak = [0.0, 0.0]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.05):
                    r, p = figures()
                    peak[0], peak[1] = max(peak[0], r), max(peak[1], p)

            sampler = threading.Thread(target=sample, daemon=True)
            buf = bytearray(size)
            view = memoryview(buf)
            sampler.start()
            t0 = time.perf_counter()
            try:
                with open(os.path.join(target, "object.bin"), "rb", buffering=0) as f:
                    got = 0
                    while got < size:
                        n = f.readinto(view[got:got + READ])
                        if not n:
                            break
                        got += n
            finally:
                done.set()
                sampler.join()
            secs = time.perf_counter() - t0
            check(view[:got], ctx.manifest.objects[LARGE_KEY], "sidecar read of the large object")
            server_hwm = _proc_kib(server, "VmHWM") / 1024
            hwm = _proc_kib(sidecar, "VmRSS") / 1024 + server_hwm
            sc.add("busy (cold read)", max(peak[0], hwm), **{"PSS MiB": round(peak[1], 1),
                                                             "server VmHWM MiB": round(server_hwm, 1),
                                                             "MB/s": round(got / secs / 1e6)})
            node.unpublish(client, target)
            pod.terminate()
            pod.wait()
    finally:
        node.close()
    for name in sc.samples:
        ctx.log(f"  13 {name}: {sc.median(name):.0f} MiB RSS {sc.extras[name]}")
    return sc
