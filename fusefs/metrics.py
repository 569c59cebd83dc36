"""Prometheus figures of one FUSE server (one volume: every server is its own process).

The metric objects live at module level in ``REGISTRY``, without a ``volume`` label. The figures of
the hot paths (every FUSE operation's latency, every store request) are plain numbers bound once
per operation or request kind, read by a collector when the figures are collected: a count costs
an add, not a ``prometheus_client`` call (its label lookups, observability checks and value locks
were measurable CPU per file of a walk of small files). Rare events (errors, problems) keep
``prometheus_client``'s own metrics. ``exposition()`` adds the bounded labels of this server
(``volume``, and ``pod`` under Kubernetes) to every sample when the figures leave the process:
written to ``MountConfig.metrics_path`` every ``WRITE_INTERVAL`` seconds and at exit (temp file
+ rename, 0644: the node plugin re-exports it), and served over HTTP for a standalone
``objfs mount --metrics-address HOST:PORT``.

The server's health for the node plugin's volume condition rides in the same file, as
``objfs_volume_problem{reason=...} 1`` (see ``PROBLEMS``).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fusefs import errors

log = logging.getLogger(__name__)
T = TypeVar("T")

WRITE_INTERVAL = 5.0
#: store request kinds, as ``AsyncStore`` names them (the first word of its description)
STORE_KINDS = ("HEAD", "LIST", "GET", "PUT", "CREATE-MULTIPART", "PART", "COMPLETE", "ABORT", "COPY", "DELETE",
               "SET-META", "PART-COPY")
#: what a user must act on, by reason label, with the sentence the volume condition shows
PROBLEMS = {
    "store_access_denied": "the store denied access (check the volume's credentials and the bucket policy)",
    "store_unreachable": "the store did not answer (check the endpoint and the node's network)",
    "cache_disabled": "the node cache is configured but unusable, reads go to the store directly "
                      "(check the node cache directory: disk full, permissions, corrupt database)",
}

# No *_created series: they double the file and nobody queries them.
prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

STORE_FAILURES = Counter("objfs_store_errors", "Store requests that failed for good (after retries), by kind "
                         "and error class", ["kind", "error"], registry=REGISTRY)
#: (name, help) of the counters every ``StoreKind`` keeps, by kind (``_StoreCollector``)
_STORE_COUNTERS = (
    ("objfs_store_requests", "Requests sent to the object store, retries included, by kind"),
    ("objfs_store_retries", "Store requests that were attempts after a transient failure"),
    ("objfs_store_received_bytes", "Object bytes received from the store (GET bodies)"),
    ("objfs_store_sent_bytes", "Object bytes uploaded to the store (PUT bodies, multipart parts)"),
)
FUSE_SECONDS_NAME = "objfs_fuse_operation_seconds"
FUSE_SECONDS_HELP = "Time to answer a FUSE operation, by operation"
FUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
_FUSE_LE = (*(floatToGoString(b) for b in FUSE_BUCKETS), "+Inf")
FUSE_ERRORS = Counter("objfs_fuse_errors", "FUSE operations answered with an error, by operation and errno",
                      ["op", "errno"], registry=REGISTRY)
PASSTHROUGH_OPENS = Counter("objfs_fuse_passthrough_opens", "Opens answered with FUSE passthrough of a complete "
                            "node-cache file: the kernel reads it, no READ reaches this server", registry=REGISTRY)
PASSTHROUGH_REFUSED = Counter("objfs_fuse_passthrough_refused", "Complete node-cache files whose registration as a "
                              "backing file failed (the open then went through the server)", registry=REGISTRY)
HIDDEN_KEYS = Counter("objfs_hidden_keys", "Keys in the store that cannot be shown as file names, by reason "
                      "(too_long: a name over 255 bytes; invalid: an empty segment, '.', '..', NUL; outside: not "
                      "under the prefix listed), counted once per directory, when it is first listed",
                      ["reason"], registry=REGISTRY)
OPEN_HANDLES = Gauge("objfs_open_handles", "Open file and directory handles of this mount", registry=REGISTRY)
CACHE_REMOVED = Counter("objfs_node_cache_removed_blocks", "Block files this server removed from the node "
                        "cache: LRU evictions, and the few replaced or deleted as corrupt", registry=REGISTRY)
PROBLEM = Gauge("objfs_volume_problem", "1 while this server has a problem a user must act on, by reason",
                ["reason"], registry=REGISTRY)


class StoreKind:
    """The counters of one kind of store request, bound once: plain numbers under a lock of
    their own (requests finish in worker threads), exported by ``_StoreCollector``."""

    __slots__ = ("_lock", "kind", "received", "requests", "retries", "sent")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.received = 0
        self.sent = 0

    def attempt(self, number: int) -> None:
        with self._lock:
            self.requests += 1
            if number > 1:
                self.retries += 1

    def call(self, fn: Callable[[], T], sent: int) -> T:
        """``fn()`` counted as it returns, in its worker thread: a request abandoned by a
        cancelled task (its thread runs on) still counts the bytes it moved."""
        result = fn()
        self.succeeded(result, sent)
        return result

    def succeeded(self, result: object, sent: int) -> None:
        if isinstance(result, tuple) and len(result) == 2:  # a GET that answered a description too
            result = result[1]
        received = 0
        if isinstance(result, bytes | bytearray | memoryview):
            received = len(result)
        elif self.kind == "PUT":
            sent = getattr(result, "size", sent)  # put and put_file answer the stored object's size
        if received or sent:
            with self._lock:
                self.received += received
                self.sent += sent
        _health.store_answered()

    def failed(self, exc: BaseException) -> None:
        STORE_FAILURES.labels(self.kind, type(exc).__name__).inc()  # errors are rare: a lookup is fine
        _health.store_failed(exc)

    def figures(self) -> tuple[int, int, int, int]:
        """(requests, retries, received bytes, sent bytes), in the order of ``_STORE_COUNTERS``."""
        with self._lock:
            return self.requests, self.retries, self.received, self.sent


_KINDS = {kind: StoreKind(kind) for kind in STORE_KINDS}
_OTHER = StoreKind("OTHER")


def store_kind(what: str) -> StoreKind:
    """The counters for a request described as ``"<KIND> <key>..."`` (AsyncStore's descriptions)."""
    return _KINDS.get(what.split(" ", 1)[0], _OTHER)


class _StoreCollector(Collector):
    """The ``StoreKind`` counters, every kind (zeros included), as ``prometheus_client``'s
    labelled counters showed them."""

    def collect(self) -> Iterator[Metric]:
        kinds = [*_KINDS.values(), _OTHER]
        figures = [k.figures() for k in kinds]
        for i, (name, doc) in enumerate(_STORE_COUNTERS):
            family = CounterMetricFamily(name, doc, labels=["kind"])
            for kind, values in zip(kinds, figures, strict=True):
                family.add_metric([kind.kind], values[i])
            yield family


class FuseOp:
    """The latency histogram of one FUSE operation, bound once (at decoration time): counts per
    bucket and a sum, kept by the trio thread that answers the operations, exported by
    ``_FuseCollector`` as ``objfs_fuse_operation_seconds{op=...}``."""

    __slots__ = ("counts", "op", "total")
    op: str
    counts: list[int]
    total: float
    _all: ClassVar[dict[str, FuseOp]] = {}

    def __new__(cls, op: str) -> FuseOp:
        known = cls._all.get(op)  # one histogram per operation, however often it is bound
        if known is not None:
            return known
        made = super().__new__(cls)
        made.op = op
        made.counts = [0] * (len(FUSE_BUCKETS) + 1)  # per bucket (not cumulative), +Inf last
        made.total = 0.0
        cls._all[op] = made
        return made

    def observe(self, started: float) -> None:
        seconds = time.perf_counter() - started
        self.counts[bisect.bisect_left(FUSE_BUCKETS, seconds)] += 1  # le: the first bound >= it
        self.total += seconds

    def error(self, code: int) -> None:
        FUSE_ERRORS.labels(self.op, errno.errorcode.get(code, str(code))).inc()


class _FuseCollector(Collector):
    """Every bound ``FuseOp`` as one histogram sample set (cumulative buckets, count, sum)."""

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(FUSE_SECONDS_NAME, FUSE_SECONDS_HELP, labels=["op"])
        for op in list(FuseOp._all.values()):
            counts, total = list(op.counts), op.total  # a snapshot: the trio thread goes on counting
            cumulative, buckets = 0, []
            for le, count in zip(_FUSE_LE, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric([op.op], buckets, total)
        yield family


REGISTRY.register(_StoreCollector())
REGISTRY.register(_FuseCollector())


class _Health:
    """Which of ``PROBLEMS`` hold now. Store problems follow the last request that finished: the
    next answer clears them."""

    def __init__(self) -> None:
        self._store: str | None = None
        self.cache_disabled = False

    def store_answered(self) -> None:
        if self._store is not None:
            self._set_store(None)

    def store_failed(self, exc: BaseException) -> None:
        if isinstance(exc, errors.AccessDeniedError):
            self._set_store("store_access_denied")
        elif isinstance(exc, errors.UnreachableError):
            self._set_store("store_unreachable")

    def _set_store(self, reason: str | None) -> None:
        self._store = reason
        for name in ("store_access_denied", "store_unreachable"):
            PROBLEM.labels(name).set(1 if name == reason else 0)

    def set_cache_disabled(self, disabled: bool) -> None:
        self.cache_disabled = disabled
        PROBLEM.labels("cache_disabled").set(1 if disabled else 0)


_health = _Health()
for _reason in PROBLEMS:
    PROBLEM.labels(_reason).set(0)


class CacheFigures(Protocol):
    """What the figures read of a node cache (``fusefs.nodecache.NodeCache``, a layer above this one)."""

    @property
    def usable(self) -> bool: ...

    def stats(self) -> dict[str, int]: ...


class _NodeCacheCollector(Collector):
    """The node cache's own counters (``NodeCache.stats()``), read when the figures are collected:
    nothing is added to the read path. ``stats()`` asks SQLite: collect from a worker thread."""

    _COUNTERS = {
        "hits": ("objfs_node_cache_hits", "Block lookups answered by the node cache"),
        "misses": ("objfs_node_cache_misses", "Block lookups the node cache could not answer"),
        "hit_bytes": ("objfs_node_cache_read_bytes", "Bytes read from the node cache"),
        "fetches": ("objfs_node_cache_fetches", "Blocks fetched from the store through the node cache"),
        "waits": ("objfs_node_cache_waits", "Misses answered by another server's fetch of the same block"),
        "shared": ("objfs_node_cache_shared", "Misses answered by a fetch of this server already in flight"),
        "corrupt": ("objfs_node_cache_corrupt_blocks", "Blocks that failed their checksum (deleted, refetched)"),
        "errors": ("objfs_node_cache_errors", "Failures of the node cache itself (reads then go to the store)"),
        "stores": ("objfs_node_cache_stored_blocks", "Blocks written into the node cache"),
        "store_bytes": ("objfs_node_cache_stored_bytes", "Bytes written into the node cache"),
        "store_skipped": ("objfs_node_cache_skipped_blocks", "Fetched blocks not cached: the writer was behind"),
        "refills": ("objfs_node_cache_refilled_blocks", "Skipped blocks fetched again once the writer was idle, "
                    "to complete an object's file"),
        "refill_errors": ("objfs_node_cache_refill_errors", "Background refills that failed (the object changed, "
                          "or the store failed): its file stays partial"),
        "lock_timeouts": ("objfs_node_cache_lock_timeouts", "Waits for another fetcher that gave up"),
        "published": ("objfs_node_cache_published_objects", "Whole objects this server completed in the node "
                      "cache (what FUSE passthrough opens: reads of those then bypass the server)"),
    }

    def __init__(self, cache: CacheFigures) -> None:
        self.cache = cache
        self._sizes: dict[str, int] = {}  # the last size seen while the cache was open

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.cache.stats()
        except Exception as exc:  # the figures must not fail because the cache does
            log.debug("node cache stats: %s", exc)
            return
        if self.cache.usable:
            self._sizes = {k: stats[k] for k in ("volume", "entries") if k in stats}
        else:  # closed at exit: its last figures still hold for the directory
            stats.update(self._sizes)
        for key, (name, doc) in self._COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=stats[key])
        if "volume" in stats:
            yield GaugeMetricFamily("objfs_node_cache_size_bytes", "Bytes the node cache holds on disk "
                                    "(shared by every server of the node)", value=stats["volume"])
        if "entries" in stats:
            yield GaugeMetricFamily("objfs_node_cache_blocks", "Blocks in the node cache", value=stats["entries"])


class _Labelled(Collector):
    """Every sample of ``inner`` with this server's labels added."""

    def __init__(self, inner: Collector, labels: dict[str, str]) -> None:
        self.inner = inner
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**s.labels, **self.labels}) for s in family.samples]
            yield out


def server_labels(volume: str, pod: str = "") -> dict[str, str]:
    return {"volume": volume, "pod": pod} if pod else {"volume": volume}


class Forward(Collector):
    """Collects another registry (a registry cannot be registered in two places)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.source = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.source.collect()


class Endpoint:
    """A registry that can be served on ``/metrics`` over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._http: Any = None
        self.port = 0

    def serve(self, address: str) -> int:
        """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread; the port bound (0: any free one)."""
        host, port = parse_address(address)
        self._http, _ = prometheus_client.start_http_server(port, host, registry=self.registry)
        self.port = int(self._http.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class Exporter(Endpoint):
    """This server's figures with its labels: to a file, and over HTTP if asked."""

    def __init__(self, labels: dict[str, str], process_figures: bool = True) -> None:
        """``process_figures``: this process's own (FUSE, store requests); without them, only what
        is watched (the data service exports the node cache's: its servers count their requests)."""
        super().__init__()
        self._inner = CollectorRegistry(auto_describe=False)
        if process_figures:
            self._inner.register(Forward(REGISTRY))
        self.registry.register(_Labelled(self._inner, labels))

    def watch_cache(self, cache: CacheFigures) -> None:
        """Export the counters of a ``fusefs.nodecache.cache.NodeCache`` (its ``stats()``, ``usable``)."""
        self._inner.register(_NodeCacheCollector(cache))

    def text(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    def write(self, path: str) -> None:
        """Write the figures to ``path`` atomically (temp file + rename), readable by all (0644)."""
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        data = self.text()
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".prom")
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, data)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT', ':PORT' or '[v6]:PORT' -> (host, port); ValueError with what to write otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {address!r}: use HOST:PORT, e.g. 127.0.0.1:9810 or :9810")
    return host.strip("[]") or "0.0.0.0", int(port)


def cache_disabled(disabled: bool) -> None:
    """Report whether a configured node cache is unusable (a problem for the volume condition)."""
    _health.set_cache_disabled(disabled)


class MountExporter(Exporter):
    """The figures of one running mount: written every ``WRITE_INTERVAL`` s and at exit."""

    def __init__(self, labels: dict[str, str], path: str, process_figures: bool = True) -> None:
        super().__init__(labels, process_figures)
        self.path = path
        self._failed = False

    def watch_handles(self, count: Callable[[], int]) -> None:
        OPEN_HANDLES.set_function(count)

    async def run(self) -> None:
        """Write the file every ``WRITE_INTERVAL`` seconds (from a worker thread: the cache's stats
        ask SQLite) until cancelled."""
        import trio

        if not self.path:
            return
        while True:
            await trio.sleep(WRITE_INTERVAL)
            await trio.to_thread.run_sync(self.write_quietly)

    def write_quietly(self) -> None:
        if not self.path:
            return
        try:
            self.write(self.path)
        except OSError as exc:  # metrics must never take the mount down; say it once
            if not self._failed:
                log.warning("cannot write metrics to %s: %s", self.path, exc)
            self._failed = True

    def close(self) -> None:
        """The last figures, then stop serving. Blocking."""
        self.write_quietly()
        super().close()


def for_mount(volume: str, pod: str, path: str, address: str) -> MountExporter:
    """The exporter of a mount, already serving ``address`` if one is given; ValueError with a
    message for the user if that address is malformed or cannot be bound."""
    exporter = MountExporter(server_labels(volume, pod), path)
    if address:
        try:
            exporter.serve(address)
        except OSError as exc:
            raise ValueError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    return exporter
