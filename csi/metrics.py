"""The node plugin's ``/metrics``: its own figures and every FUSE server's, re-exported.

Its own: CSI RPCs by method and gRPC code with their latency (``observe_rpc``, called by the
interceptor in ``csi.main``), live mounts, the node cache's size. The servers' figures come from
the files they write (``fusefs.metrics``): ``<state-dir>/metrics/*.prom`` for servers the plugin
launched itself, ``<kubelet-root>/pods/*/volumes/kubernetes.io~empty-dir/objfs-tmp/metrics/*.prom``
for servers in pod sidecars. Those files are parsed (``prometheus_client.parser``) at each scrape
and merged by metric name; each server labels its own samples (``volume``, ``pod``).

A file in a pod's emptyDir is written where the pod's own containers could write too: such files
are read without following symlinks, up to ``MAX_FILE_BYTES``, and only ``objfs_`` metrics other
than the plugin's own ``objfs_csi_`` ones are taken from them.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from fusefs.metrics import PROBLEMS, Endpoint, Forward

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20
SIDECAR_GLOB = "pods/*/volumes/kubernetes.io~empty-dir/objfs-tmp/metrics/*.prom"

prometheus_client.disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
RPCS = Counter("objfs_csi_rpcs", "CSI RPCs answered, by method and gRPC code", ["method", "code"],
               registry=REGISTRY)
RPC_SECONDS = Histogram("objfs_csi_rpc_seconds", "Time to answer a CSI RPC (NodePublishVolume: mount and "
                        "server start), by method", ["method"], registry=REGISTRY,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))


def observe_rpc(method: str, code: grpc.StatusCode, seconds: float) -> None:
    RPCS.labels(method, code.name).inc()
    RPC_SECONDS.labels(method).observe(seconds)


def server_files(state_dir: str, kubelet_root: str) -> list[str]:
    """The metrics files of every server on the node: launched here, then in pod sidecars."""
    own = sorted(glob.glob(os.path.join(glob.escape(metrics_dir(state_dir)), "*.prom")))
    pods = sorted(glob.glob(os.path.join(glob.escape(kubelet_root), SIDECAR_GLOB)))
    return own + pods


def metrics_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "metrics")


def prepare_metrics_dir(state_dir: str, uid: int, gid: int) -> str:
    """``<state-dir>/metrics``: written by the unprivileged servers, read by the plugin."""
    path = metrics_dir(state_dir)
    os.makedirs(path, mode=0o755, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
    os.chmod(path, 0o755)
    return path


def read_server_file(path: str) -> str | None:
    """The text of a server's metrics file, or None: not a regular file (symlinks are not
    followed), larger than ``MAX_FILE_BYTES``, unreadable, or not text."""
    if os.path.realpath(os.path.dirname(path)) != os.path.normpath(os.path.dirname(path)):
        return None  # a symlinked metrics directory
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
            return None
        data = os.read(fd, MAX_FILE_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def parse_families(text: str) -> list[Metric]:
    """The server metrics in ``text``; [] if it does not parse (a half-written or forged file)."""
    try:
        families = list(text_string_to_metric_families(text))
    except Exception:  # the parser raises ValueError and others on malformed input
        return []
    return [f for f in families if f.name.startswith("objfs_") and not f.name.startswith("objfs_csi_")]


def problems(path: str) -> list[str]:
    """What the server writing ``path`` reports a user must act on (``fusefs.metrics.PROBLEMS``),
    as sentences; [] when the file is missing or says nothing is wrong."""
    text = read_server_file(path)
    if text is None:
        return []
    found = []
    for family in parse_families(text):
        if family.name != "objfs_volume_problem":
            continue
        for s in family.samples:
            reason = s.labels.get("reason", "")
            if s.value >= 1 and reason in PROBLEMS:
                found.append(PROBLEMS[reason])
    return found


class ServersCollector(Collector):
    """Every server's file, merged by metric name (one HELP/TYPE per name)."""

    def __init__(self, files: Callable[[], list[str]]) -> None:
        self.files = files

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for path in self.files():
            text = read_server_file(path)
            if text is None:
                continue
            for family in parse_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
                elif into.type != family.type:
                    continue  # a file of another objfs version that changed a metric's type
                into.samples.extend(family.samples)
        yield from merged.values()


class NodeCollector(Collector):
    """Figures read at scrape time: live mounts, the node cache's size on disk and its limit."""

    def __init__(self, mounts: Callable[[], int], cache_dir: str | None, cache_limit: int = 0) -> None:
        self.mounts = mounts
        self.cache_dir = cache_dir
        self.cache_limit = cache_limit

    def collect(self) -> Iterator[Metric]:
        with contextlib.suppress(OSError):
            yield GaugeMetricFamily("objfs_csi_mounts", "Volumes published on this node (one FUSE server each)",
                                    value=self.mounts())
        size = node_cache_bytes(self.cache_dir) if self.cache_dir else None
        if size is not None:
            yield GaugeMetricFamily("objfs_csi_node_cache_size_bytes", "Bytes the node cache holds on disk",
                                    value=size)
        if self.cache_dir and self.cache_limit:  # size / limit: how full the cache is (evictions start at 1)
            yield GaugeMetricFamily("objfs_csi_node_cache_limit_bytes", "The node cache's size limit (--cache-size)",
                                    value=self.cache_limit)


def node_cache_bytes(cache_dir: str) -> int | None:
    """The node cache's size as diskcache counts it (its index plus the blocks), read-only."""
    db = os.path.join(cache_dir, "cache.db")
    if not os.path.exists(db):
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            ((size,),) = con.execute("SELECT value FROM Settings WHERE key = 'size'").fetchall()
            ((pages,),) = con.execute("PRAGMA page_count").fetchall()
            ((page_size,),) = con.execute("PRAGMA page_size").fetchall()
        finally:
            con.close()
    except (sqlite3.Error, ValueError):
        return None
    return int(size) + int(pages) * int(page_size)


class PluginMetrics(Endpoint):
    """The plugin's ``/metrics`` endpoint."""

    def __init__(self, state_dir: str | None, kubelet_root: str, cache_dir: str | None,
                 mounts: Callable[[], int] | None, cache_limit: int = 0) -> None:
        super().__init__()
        self.registry.register(Forward(REGISTRY))
        if mounts is not None:
            self.registry.register(NodeCollector(mounts, cache_dir, cache_limit))
        if state_dir is not None:
            self.registry.register(ServersCollector(lambda: server_files(state_dir, kubelet_root)))
