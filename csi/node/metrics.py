"""The node plugin's ``/metrics``: its own figures and every FUSE server's, re-exported.

Its own: CSI RPCs by method and gRPC code with their latency (``observe_rpc``, called by the
interceptor in ``csi.main``), live mounts, the node cache's size. The servers' figures come from
the files they write (``fusefs.metrics``): for each volume the plugin's records say it published,
``<state-dir>/metrics/<server>.prom`` (a server it launched itself) or
``<kubelet-root>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/objfs-tmp/metrics/<volume name>.prom``
(a server in the pod's sidecar). Those files are parsed (``prometheus_client.parser``) at each
scrape and merged by metric name.

A file in a pod's emptyDir is written where the pod's own containers can write too, so it is
untrusted input: only files of volumes in the plugin's records are read (a pod cannot make the
plugin read more by writing more), at most ``MAX_FILES_PER_DIR`` per directory, each up to
``MAX_FILE_BYTES`` (a larger one is skipped, with one log line), without following a symlink anywhere
below kubelet's root (``csi.node.podpath``); only ``objfs_`` metrics other than the plugin's own
``objfs_csi_`` ones are taken, and their ``volume`` and ``pod`` labels are the plugin's, from its
record: whatever the file says there is replaced, so a file cannot speak for another volume or pod.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from csi.node import podpath
from csi.node.launcher import EMPTY_DIR_NAME
from csi.node.state import SIDECAR, PublishRecord
from fusefs.metrics import PROBLEMS, Endpoint, Forward

log = logging.getLogger(__name__)

# A server's file is a few KiB (tens of series per volume). Read at every scrape, for every volume on
# the node: 1 MiB per file let one pod's files cost the plugin hundreds of MiB per scrape.
MAX_FILE_BYTES = 64 << 10
MAX_FILES_PER_DIR = 32  # files read per metrics directory (one pod's, or the plugin's own) per scrape
PLUGIN_LABELS = ("volume", "pod")  # set by the plugin, never taken from a file

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


@dataclass(frozen=True)
class ServerFile:
    """A server's metrics file as the plugin knows it: ``name`` in ``root/parts...`` (``root`` is the
    node's own, the ``parts`` below it are opened without following symlinks) and the labels its
    samples get."""

    root: str
    parts: tuple[str, ...]
    name: str
    labels: dict[str, str] = field(hash=False)

    @property
    def path(self) -> str:
        return os.path.join(self.root, *self.parts, self.name)


def server_files(records: Iterable[PublishRecord], kubelet_root: str) -> list[ServerFile]:
    """The metrics file of each published volume, labelled from its record."""
    files = []
    for rec in records:
        pod = f"{rec.pod_namespace}/{rec.pod_name}" if rec.pod_name else str(rec.config.get("metrics_pod") or "")
        labels = {"volume": rec.volume_id, **({"pod": pod} if pod else {})}
        if rec.launcher == SIDECAR:
            if rec.pod_uid and rec.name:
                parts = (*podpath.pod_dir_parts(rec.pod_uid, EMPTY_DIR_NAME), "metrics")
                files.append(ServerFile(kubelet_root, parts, f"{rec.name}.prom", labels))
        elif rec.config.get("metrics_path"):
            path = str(rec.config["metrics_path"])
            files.append(ServerFile(os.path.dirname(path), (), os.path.basename(path), labels))
    return files


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


class TooLarge(OSError):
    """A metrics file over MAX_FILE_BYTES."""


def read_file_at(root: str, parts: tuple[str, ...], name: str) -> str | None:
    """The text of ``name`` in ``root/parts...``, or None: missing, a symlink (at it or at any of
    ``parts``), not a regular file, unreadable, or not text. TooLarge past ``MAX_FILE_BYTES``."""
    try:
        dir_fd = podpath.open_dir_beneath(root, parts)
        try:
            fd = podpath.open_file_at(dir_fd, name, stat.S_IFREG, os.O_RDONLY)
        finally:
            os.close(dir_fd)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size > MAX_FILE_BYTES:
            raise TooLarge(f"{name}: over {MAX_FILE_BYTES} bytes")
        data = os.read(fd, MAX_FILE_BYTES + 1)  # it may have grown since fstat
    except TooLarge:
        raise
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise TooLarge(f"{name}: over {MAX_FILE_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def read_server_file(path: str) -> str | None:
    """The text of a server's metrics file at ``path`` (a path of the plugin's own), or None (see
    read_file_at; a file that is too large too)."""
    try:
        return read_file_at(os.path.dirname(path), (), os.path.basename(path))
    except TooLarge:
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


def relabelled(family: Metric, labels: dict[str, str]) -> list[Any]:
    """``family``'s samples with the plugin's ``labels`` in place of any the file gave them."""
    return [s._replace(labels={**{k: v for k, v in s.labels.items() if k not in PLUGIN_LABELS}, **labels})
            for s in family.samples]


class ServersCollector(Collector):
    """Every server's file, merged by metric name (one HELP/TYPE per name)."""

    def __init__(self, files: Callable[[], list[ServerFile]]) -> None:
        self.files = files
        self._too_large: set[str] = set()  # said once in the log while they stay too large

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        per_dir: dict[tuple[str, tuple[str, ...]], int] = {}
        too_large: set[str] = set()
        for f in self.files():
            where = (f.root, f.parts)
            per_dir[where] = per_dir.get(where, 0) + 1
            if per_dir[where] > MAX_FILES_PER_DIR:
                if per_dir[where] == MAX_FILES_PER_DIR + 1:
                    log.warning("metrics: more than %d volumes' files in %s: reading the first %d", MAX_FILES_PER_DIR,
                                os.path.join(f.root, *f.parts), MAX_FILES_PER_DIR)
                continue
            try:
                text = read_file_at(f.root, f.parts, f.name)
            except TooLarge:
                too_large.add(f.path)
                if f.path not in self._too_large:
                    log.warning("metrics: skipping %s: larger than %d bytes", f.path, MAX_FILE_BYTES)
                continue
            if text is None:
                continue
            for family in parse_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
                elif into.type != family.type:
                    continue  # a file of another objfs version that changed a metric's type
                into.samples.extend(relabelled(family, f.labels))
        self._too_large = too_large
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

    def __init__(self, kubelet_root: str, cache_dir: str | None, mounts: Callable[[], int] | None,
                 cache_limit: int = 0, records: Callable[[], Iterable[PublishRecord]] | None = None,
                 service_file: str = "") -> None:
        """``records``: the published volumes, whose servers' files are re-exported; ``service_file``:
        the node's data service's figures (the node cache's), re-exported without volume labels."""
        super().__init__()
        self.registry.register(Forward(REGISTRY))
        if mounts is not None:
            self.registry.register(NodeCollector(mounts, cache_dir, cache_limit))
        if records is not None:
            service = [ServerFile(os.path.dirname(service_file), (), os.path.basename(service_file), {})] \
                if service_file else []
            self.registry.register(ServersCollector(lambda: [*service, *server_files(records(), kubelet_root)]))
