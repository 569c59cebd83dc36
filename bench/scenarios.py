"""The scenarios (those of objfs-csi, 10, 12 and 13, are in csi_publish.py and csi_sidecar.py). Each
measures every client it applies to, alternating the order of the clients from one repetition to the
next, and checks every byte read against the manifest."""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import io
import itertools
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3.s3.transfer as tr

from bench import procs
from bench.clients import OBJFS, RCLONE, RCLONE_FULL, S3FS, S3FS_CACHE, Client, Mounted, Store
from bench.data import LARGE_KEY, MEMORY_KEY, MODEL_KEY, Manifest, Sizes
from bench.report import Goal, Run, Scenario
from testing.proxy import CountingProxy

MB = 1e6
MiB = 1 << 20
READ = 1 << 20  # application read size: 1 MiB, like dd bs=1M


class WrongBytes(AssertionError):
    """A client returned bytes that differ from the generated data: the run fails."""


@dataclass
class Ctx:
    store: Store
    manifest: Manifest
    sizes: Sizes
    run: Run
    bucket_dir: Path
    workdir: Path
    proxy: CountingProxy
    boto: Any
    mount_clients: list[Client]  # the FUSE clients available in this run
    log: Callable[[str], None]
    latency_ms: float = 10.0  # one way, of the latency proxy behind store.latency_endpoint
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def mountpoint(self, name: str) -> Path:
        path = self.workdir / "mnt" / f"{name}-{next(self._counter)}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clients(self, *wanted: Client) -> list[Client]:
        return [c for c in wanted if c in self.mount_clients]

    def peers(self, clients: Sequence[Client]) -> list[str]:
        return [c.name for c in clients if c.is_peer]


def rotated(items: Sequence[Any], rep: int) -> list[Any]:
    """The clients in a different order each repetition, so none always goes first."""
    k = rep % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def check(data: bytes | bytearray | memoryview, sha: str, what: str) -> None:
    if hashlib.sha256(data).hexdigest() != sha:
        raise WrongBytes(f"{what}: bytes differ from the generated data")


def buffer(size: int) -> bytearray:
    """A read buffer with every page already mapped: a fresh ``bytearray`` is mapped lazily, and the
    first timed read into it would pay a page fault per 4 KiB (a quarter of a second per GiB here)."""
    buf = bytearray(size)
    for i in range(0, size, mmap.PAGESIZE):
        buf[i] = 1
    return buf


def warm_store(ctx: Ctx) -> None:
    """Ask the store for the folders the scenarios read, untimed: ``rclone serve s3`` builds its own
    directory cache on the first request to a folder (~0.4 s for the large object's), which would
    otherwise be charged to whichever client happens to go first."""
    for prefix in ("large/", "model/"):
        ctx.boto.list_objects_v2(Bucket=ctx.store.bucket, Prefix=prefix, Delimiter="/")
    ctx.boto.head_object(Bucket=ctx.store.bucket, Key=LARGE_KEY)


def timed_read(path: Path, buf: bytearray) -> float:
    """Read the whole file into ``buf`` with 1 MiB reads; return seconds. Verification comes after."""
    view = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < len(buf):
            n = os.readv(fd, [view[off:off + READ]])
            if n == 0:
                raise WrongBytes(f"{path}: short read at {off} of {len(buf)}")
            off += n
        if os.read(fd, 1):
            raise WrongBytes(f"{path}: longer than {len(buf)} bytes")
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def read_all(path: Path, size: int) -> None:
    """Read a file without timing, to warm a cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * READ):
            pass


def fresh_cache(ctx: Ctx, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"cache-{name}-", dir=ctx.workdir))


def _boto_parallel_get(ctx: Ctx, key: str, buf: bytearray, part: int = 8 * MiB, workers: int = 8) -> float:
    view = memoryview(buf)

    def fetch(start: int) -> None:
        end = min(start + part, len(buf)) - 1
        body = ctx.boto.get_object(Bucket=ctx.store.bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
        off = start
        while chunk := body.read(READ):
            view[off:off + len(chunk)] = chunk
            off += len(chunk)
        if off != end + 1:
            raise WrongBytes(f"boto3 range {start}-{end}: got {off - start} bytes")

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fetch, range(0, len(buf), part)))
    return time.perf_counter() - t0


# 1 -----------------------------------------------------------------------------------------------
def cold_sequential(ctx: Ctx) -> Scenario:
    clients = ctx.clients(OBJFS, *[c for c in ctx.mount_clients if c is not OBJFS])
    sc = ctx.run.scenario("1", f"Cold sequential read, {ctx.sizes.large // MiB} MiB", "MB/s", True,
                          ctx.peers(clients))
    sc.goals += [Goal("objfs >= 1.5x the faster peer", "objfs", factor=1.5),
                 Goal("objfs >= 0.8x boto3 (8 parallel 8 MiB ranges)", "objfs", ref="boto3", factor=0.8),
                 Goal("objfs with the node cache >= 0.95x without it", "objfs", ref="objfs-nocache", factor=0.95),
                 Goal("objfs CPU per GB with the node cache <= 1.2x without it", "objfs", ref="objfs-nocache",
                      metric="cpu s/GB", op="<=", value=1.2)]
    size, sha = ctx.sizes.large, ctx.manifest.objects[LARGE_KEY]
    buf = buffer(size)
    names: list[Client | str] = [*clients, "boto3"]
    for rep in range(ctx.sizes.reps):
        for c in rotated(names, rep):
            if c == "boto3":
                procs.drop_caches()
                secs = _boto_parallel_get(ctx, LARGE_KEY, buf)
                check(buf, sha, "boto3 parallel GET")
                sc.add("boto3", size / MB / secs)
                continue
            assert isinstance(c, Client)
            with c.mount(ctx.store, "large", ctx.mountpoint(c.name)) as m:
                procs.drop_caches()
                cpu0 = procs.tree_cpu_seconds(m.cpu_pids)
                secs = timed_read(m.path / "object.bin", buf)
                cpu = procs.tree_cpu_seconds(m.cpu_pids) - cpu0
            check(buf, sha, f"{c.name} cold read")
            sc.add(c.name, size / MB / secs, **{"cpu s/GB": cpu * 1e9 / size})
            ctx.log(f"  1 {c.name}: {size / MB / secs:.0f} MB/s")
    return sc


# 2 and 3 -----------------------------------------------------------------------------------------
@contextmanager
def mounted_all(ctx: Ctx, clients: Sequence[Client], prefix: str, **kw: Any) -> Iterator[dict[str, Mounted]]:
    with ExitStack() as stack:
        yield {c.name: stack.enter_context(c.mount(ctx.store, prefix, ctx.mountpoint(c.name), **kw))
               for c in clients}


def warm_node_cache(ctx: Ctx) -> Scenario:
    clients = ctx.clients(OBJFS, S3FS_CACHE, RCLONE_FULL)
    sc = ctx.run.scenario("2", "Warm read from the node's disk cache (page cache dropped)", "MB/s", True,
                          ctx.peers(clients))
    sc.goals += [Goal("objfs >= the faster peer's disk-cache mode", "objfs", factor=1.0),
                 Goal("objfs >= 0.85x local disk", "objfs", ref="local disk", factor=0.85)]
    size, sha = ctx.sizes.large, ctx.manifest.objects[LARGE_KEY]
    buf = buffer(size)
    local = ctx.bucket_dir / LARGE_KEY
    with mounted_all(ctx, clients, "large") as mounts:
        for name, m in mounts.items():
            read_all(m.path / "object.bin", size)
            ctx.log(f"  2 warmed {name}")
        time.sleep(2)  # let write-behind disk caches (rclone's) finish writing the blocks
        for rep in range(ctx.sizes.reps):
            for name in rotated([*mounts, "local disk"], rep):
                procs.drop_caches()
                path = local if name == "local disk" else mounts[name].path / "object.bin"
                secs = timed_read(path, buf)
                check(buf, sha, f"{name} warm read")
                sc.add(name, size / MB / secs)
                ctx.log(f"  2 {name}: {size / MB / secs:.0f} MB/s")
    return sc


def hot_reread(ctx: Ctx) -> Scenario:
    clients = ctx.clients(*ctx.mount_clients)
    sc = ctx.run.scenario("3", "Hot re-read (kernel page cache kept)", "MB/s", True, ctx.peers(clients))
    sc.goals += [Goal("objfs >= 3 GB/s", "objfs", ref=None, op=">=", value=3000)]
    size, sha = ctx.sizes.large, ctx.manifest.objects[LARGE_KEY]
    buf = buffer(size)
    with mounted_all(ctx, clients, "large") as mounts:
        for m in mounts.values():
            read_all(m.path / "object.bin", size)
        time.sleep(2)  # as in scenario 2: write-behind disk caches (rclone's) finish first, not during a timed read
        for rep in range(ctx.sizes.reps):
            for name in rotated(list(mounts), rep):
                # Read again right before the timed read: this VM trims idle page cache (tens of MB every
                # few seconds with 20 GB free), so pages cached a minute ago may be gone.
                read_all(mounts[name].path / "object.bin", size)
                secs = timed_read(mounts[name].path / "object.bin", buf)
                check(buf, sha, f"{name} hot read")
                sc.add(name, size / MB / secs)
    return sc


# 4 -----------------------------------------------------------------------------------------------
def small_files(ctx: Ctx) -> Scenario:
    clients = ctx.clients(*ctx.mount_clients)
    n = len(ctx.manifest.small)
    sc = ctx.run.scenario("4", f"Small files: walk + open + read {n} x 64 KiB, fresh mount", "files/s", True,
                          ctx.peers(clients))
    sc.goals += [Goal("objfs >= 2x the faster peer", "objfs", factor=2.0),
                 Goal("objfs <= 1.05 requests per file", "objfs", ref=None, metric="req/file", op="<=",
                      value=1.05),
                 Goal("objfs-meta (fileMetadata) <= 1.05 requests per file", "objfs-meta", ref=None,
                      metric="req/file", op="<=", value=1.05),
                 Goal("objfs CPU per 1,000 files with the node cache <= 1.2x without it", "objfs",
                      ref="objfs-nocache", metric="cpu s/1000 files", op="<=", value=1.2)]
    expected = {k.removeprefix("small/"): ctx.manifest.objects[k] for k in ctx.manifest.small}
    for rep in range(ctx.sizes.reps):
        for c in rotated(clients, rep):
            with c.mount(ctx.store, "small", ctx.mountpoint(c.name), via_proxy=True) as m:
                procs.drop_caches()
                ctx.proxy.reset()
                cpu0 = procs.tree_cpu_seconds(m.cpu_pids)
                t0 = time.perf_counter()
                got = _walk_and_read(m.path)
                secs = time.perf_counter() - t0
                cpu = procs.tree_cpu_seconds(m.cpu_pids) - cpu0
                tally = ctx.proxy.tally()
            if got.keys() != expected.keys():
                raise WrongBytes(f"{c.name}: walk found {len(got)} files, expected {len(expected)}")
            for rel, data in got.items():
                check(data, expected[rel], f"{c.name} {rel}")
            sc.add(c.name, n / secs, **{"req/file": tally.total / n, "seconds": secs,
                                        "cpu s/1000 files": cpu * 1000 / n},
                   **{f"{k}/file": v / n for k, v in tally.requests.items()})
            ctx.log(f"  4 {c.name}: {n / secs:.0f} files/s, {tally.total / n:.2f} req/file {dict(tally.requests)}")
    return sc


def _walk_and_read(root: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = f.read()
    return found


# 5 -----------------------------------------------------------------------------------------------
def list_many(ctx: Ctx) -> Scenario:
    clients = ctx.clients(OBJFS, S3FS, RCLONE)
    n = len(ctx.manifest.many)
    sc = ctx.run.scenario("5", f"ls -l of a directory of {n:,} objects, fresh mount", "seconds", False,
                          ctx.peers(clients))
    sc.goals += [Goal("objfs faster than both peers", "objfs", factor=1.0),
                 Goal("objfs sends LIST pages only", "objfs", ref=None, metric="non-LIST requests", op="<=",
                      value=0)]
    timeout = 120 + n / 50  # s3fs sends a HEAD per entry
    for rep in range(ctx.sizes.reps):
        for c in rotated(clients, rep):
            with c.mount(ctx.store, "many", ctx.mountpoint(c.name), via_proxy=True) as m:
                ctx.proxy.reset()
                t0 = time.perf_counter()
                try:
                    out = subprocess.run(["ls", "-l", str(m.path)], capture_output=True, timeout=timeout, check=True)
                except subprocess.TimeoutExpired:
                    sc.notes.append(f"{c.name}: ls -l did not finish within {timeout:.0f}s")
                    continue
                secs = time.perf_counter() - t0
                tally = ctx.proxy.tally()
            names = {line.split()[-1] for line in out.stdout.decode().splitlines()[1:] if line.strip()}
            if names != set(ctx.manifest.many):
                raise WrongBytes(f"{c.name}: ls -l listed {len(names)} names, expected {n}")
            lists = tally.requests.get("LIST", 0)
            sc.add(c.name, secs, **{"LIST pages": lists, "non-LIST requests": tally.total - lists})
            ctx.log(f"  5 {c.name}: {secs:.2f}s {dict(tally.requests)}")
    return sc


# 6 -----------------------------------------------------------------------------------------------
def shared_cache(ctx: Ctx) -> Scenario:
    clients = ctx.clients(OBJFS, S3FS, RCLONE)
    size, sha = ctx.sizes.large, ctx.manifest.objects[LARGE_KEY]
    sc = ctx.run.scenario("6", "4 FUSE servers read one object at once: bytes the store sent / object size",
                          "x size", False, ctx.peers(clients))
    sc.goals += [Goal("objfs store sends the object once (<= 1.1x its size)", "objfs", ref=None, op="<=", value=1.1)]
    bufs = [buffer(size) for _ in range(4)]
    for rep in range(ctx.sizes.reps):
        for c in rotated(clients, rep):
            shared = fresh_cache(ctx, c.name)
            try:
                with ExitStack() as stack:
                    mounts = [stack.enter_context(c.mount(ctx.store, "large", ctx.mountpoint(c.name),
                                                          via_proxy=True, cache_dir=shared if c is OBJFS else None))
                              for _ in range(4)]
                    procs.drop_caches()
                    ctx.proxy.reset()
                    t0 = time.perf_counter()
                    with concurrent.futures.ThreadPoolExecutor(4) as pool:
                        list(pool.map(timed_read, [m.path / "object.bin" for m in mounts], bufs))
                    secs = time.perf_counter() - t0
                    tally = ctx.proxy.tally()
            finally:
                shutil.rmtree(shared, ignore_errors=True)
            for i, b in enumerate(bufs):
                check(b, sha, f"{c.name} reader {i}")
            sent = tally.body_bytes.get("GET", 0)
            sc.add(c.name, sent / size, seconds=secs, **{"aggregate MB/s": 4 * size / MB / secs})
            ctx.log(f"  6 {c.name}: store sent {sent / size:.2f}x in {secs:.1f}s")
    return sc


# 7 -----------------------------------------------------------------------------------------------
def first_byte(ctx: Ctx) -> Scenario:
    clients = ctx.clients(*ctx.mount_clients)
    sc = ctx.run.scenario("7", "Time to first byte of a large object (fresh mount, cold)", "ms", False,
                          ctx.peers(clients))
    sc.goals += [Goal("objfs at least as fast as the faster peer", "objfs", factor=1.0)]
    with open(ctx.bucket_dir / LARGE_KEY, "rb") as f:
        head = f.read(4096)
    names: list[Client | str] = [*clients, "boto3"]
    for rep in range(ctx.sizes.ttfb_reps):
        for c in rotated(names, rep):
            if c == "boto3":
                procs.drop_caches()
                t0 = time.perf_counter()
                body = ctx.boto.get_object(Bucket=ctx.store.bucket, Key=LARGE_KEY)["Body"]
                first = body.read(1)
                secs = time.perf_counter() - t0
                body.close()
                if first != head[:1]:
                    raise WrongBytes("boto3 first byte")
                sc.add("boto3", secs * 1000)
                continue
            assert isinstance(c, Client)
            with c.mount(ctx.store, "large", ctx.mountpoint(c.name)) as m:
                procs.drop_caches()
                t0 = time.perf_counter()
                fd = os.open(m.path / "object.bin", os.O_RDONLY)
                first = os.read(fd, 4096)
                secs = time.perf_counter() - t0
                os.close(fd)
            if first != head[:len(first)] or not first:
                raise WrongBytes(f"{c.name}: first bytes differ")
            sc.add(c.name, secs * 1000)
    return sc


# 8 -----------------------------------------------------------------------------------------------
def sequential_write(ctx: Ctx) -> Scenario:
    clients = ctx.clients(*ctx.mount_clients)
    size, sha = ctx.sizes.large, ctx.manifest.objects[LARGE_KEY]
    sc = ctx.run.scenario("8", f"Sequential write of {size // MiB} MiB (until the object is in the store)",
                          "MB/s", True, ctx.peers(clients))
    sc.goals += [Goal("objfs >= 1.5x the faster peer", "objfs", factor=1.5)]
    data = memoryview((ctx.bucket_dir / LARGE_KEY).read_bytes())
    names: list[Client | str] = [*clients, "boto3"]
    for rep in range(ctx.sizes.reps):
        for c in rotated(names, rep):
            name = c if isinstance(c, str) else c.name
            key = f"writes/{name}-{rep}.bin"
            if c == "boto3":
                cfg = tr.TransferConfig(multipart_chunksize=8 * MiB, max_concurrency=8)
                t0 = time.perf_counter()
                ctx.boto.upload_fileobj(io.BytesIO(data), ctx.store.bucket, key, Config=cfg)
                secs = time.perf_counter() - t0
            else:
                assert isinstance(c, Client)
                with c.mount(ctx.store, "writes", ctx.mountpoint(name)) as m:
                    t0 = time.perf_counter()
                    with open(m.path / key.removeprefix("writes/"), "wb", buffering=0) as f:
                        for off in range(0, size, READ):
                            f.write(data[off:off + READ])
                    _wait_object(ctx, key, size, timeout=600)  # rclone's full mode uploads after close
                    secs = time.perf_counter() - t0
            got = ctx.boto.get_object(Bucket=ctx.store.bucket, Key=key)["Body"].read()
            check(got, sha, f"{name} written object")
            ctx.boto.delete_object(Bucket=ctx.store.bucket, Key=key)
            sc.add(name, size / MB / secs)
            ctx.log(f"  8 {name}: {size / MB / secs:.0f} MB/s")
    return sc


def _wait_object(ctx: Ctx, key: str, size: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ctx.boto.head_object(Bucket=ctx.store.bucket, Key=key)["ContentLength"] == size:
                return
        except Exception:  # not there yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{key} did not reach the store within {timeout}s")


# 9 -----------------------------------------------------------------------------------------------
def memory(ctx: Ctx) -> Scenario:
    clients = ctx.clients(OBJFS, S3FS, RCLONE)
    size, sha = ctx.sizes.memory, ctx.manifest.objects[MEMORY_KEY]
    sc = ctx.run.scenario("9", f"Peak RSS of the FUSE server reading {size // MiB} MiB cold", "MiB", False,
                          ctx.peers(clients))
    sc.goals += [Goal("objfs serve peak RSS <= 200 MiB", "objfs", ref=None, op="<=", value=200)]
    buf = buffer(size)
    for c in clients:
        with c.mount(ctx.store, "memory", ctx.mountpoint(c.name)) as m:
            if not m.server_pids:
                sc.notes.append(f"{c.name}: FUSE server process not found")
                continue
            procs.drop_caches()
            secs = timed_read(m.path / "object.bin", buf)
            peak = sum(procs.vm_hwm_kib(p) or 0 for p in m.server_pids) / 1024
        check(buf, sha, f"{c.name} memory read")
        sc.add(c.name, peak, **{"MB/s": size / MB / secs, "processes": len(m.server_pids)})
        ctx.log(f"  9 {c.name}: VmHWM {peak:.0f} MiB")
    return sc


# 15 ----------------------------------------------------------------------------------------------
#: how long the soak reads, by data size (quick: a smoke test; make test's short soak is tests/fuse/test_soak.py);
#: OBJFS_SOAK_SECONDS overrides it
SOAK_SECONDS = {"quick": 10.0, "small": 120.0, "full": 300.0}
SOAK_READERS = 32


def soak_scenario(ctx: Ctx) -> Scenario:
    """32 readers for minutes on one objfs mount (random ranges of the large objects, the small files
    whole), every byte checked against the local copy; the server's RSS sampled every second."""
    from bench import soak

    seconds = float(os.environ.get("OBJFS_SOAK_SECONDS") or SOAK_SECONDS.get(ctx.run.size, 300.0))
    sc = ctx.run.scenario("15", f"objfs serve RSS growth over a {seconds:.0f} s soak, {SOAK_READERS} readers",
                          "MiB", False, [])
    sc.goals += [Goal("RSS growth <= 100 MiB", "objfs", ref=None, op="<=", value=100)]
    names = [LARGE_KEY, MEMORY_KEY, *ctx.manifest.small]
    sizes = {n: (ctx.bucket_dir / n).stat().st_size for n in names}
    with OBJFS.mount(ctx.store, "", ctx.mountpoint("objfs-soak")) as m:
        if not m.server_pids:
            sc.notes.append("objfs: FUSE server process not found")
            return sc
        result = soak.run(m.path, names, sizes, soak.local_truth(ctx.bucket_dir), sorted(m.server_pids), seconds,
                          SOAK_READERS, sample_every=1.0)
    if result.wrong:
        raise WrongBytes(f"soak: {len(result.wrong)} reads returned wrong bytes, e.g. {result.wrong[0]}")
    start, end = result.rss_mib(5.0), result.rss_mib(-1)
    sc.add("objfs", end - start, **{"RSS start MiB": start, "RSS end MiB": end, "RSS peak MiB": result.peak_mib,
                                    "reads": result.reads, "GB read": result.bytes / 1e9,
                                    "errors": len(result.errors)})
    sc.notes.append("RSS over time: " + result.series(max(10.0, seconds / 10)))
    if result.errors:
        sc.notes.append(f"{len(result.errors)} reads failed, e.g. {result.errors[0]}")
    ctx.log(f"  15 objfs: RSS {start:.0f} -> {end:.0f} MiB (peak {result.peak_mib:.0f}), {result.reads} reads, "
            f"{result.bytes / 1e9:.1f} GB")
    return sc


# 11 ----------------------------------------------------------------------------------------------
def _load_model(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _check_model(ctx: Ctx, tensors: dict[str, Any], who: str) -> None:
    if tensors.keys() != ctx.manifest.tensors.keys():
        raise WrongBytes(f"{who}: tensor names differ")
    for k, t in tensors.items():
        check(t.tobytes(), ctx.manifest.tensors[k], f"{who} tensor {k}")


def model_load(ctx: Ctx) -> Scenario:
    size = (ctx.bucket_dir / MODEL_KEY).stat().st_size
    mounts = ctx.clients(OBJFS, S3FS, RCLONE)
    names = [c.name for c in mounts] + ["objfs (node cache)"] * (OBJFS in mounts) + ["s5cmd", "local disk"]
    runai = importlib.util.find_spec("runai_model_streamer") is not None
    if runai:
        names.append("runai-streamer")
    sc = ctx.run.scenario("11", f"Load a {size / MiB:.0f} MiB safetensors model, every tensor (page cache dropped)",
                          "MB/s", True, [n for n in names if not n.startswith("objfs") and n != "local disk"])
    sc.goals += [Goal("objfs cold >= the fastest peer", "objfs", factor=1.0),
                 Goal("objfs from the node cache >= 0.85x local disk", "objfs (node cache)", ref="local disk",
                      factor=0.85)]
    node_cache = fresh_cache(ctx, "model")
    try:
        if OBJFS in mounts:  # fill the node cache once, through a mount that is then gone
            with OBJFS.mount(ctx.store, "model", ctx.mountpoint("objfs"), cache_dir=node_cache) as m:
                read_all(m.path / "model.safetensors", size)
        by_name = {c.name: c for c in mounts}
        for rep in range(ctx.sizes.reps):
            for name in rotated(names, rep):
                secs = _model_once(ctx, name, by_name, node_cache)
                sc.add(name, size / MB / secs)
                ctx.log(f"  11 {name}: {size / MB / secs:.0f} MB/s")
    finally:
        shutil.rmtree(node_cache, ignore_errors=True)
    if not runai:
        sc.notes.append("runai-model-streamer not measured: not installed (pip install runai-model-streamer "
                        "runai-model-streamer-s3; it pulls in torch)")
    return sc


#: the local file loaded with its pages already cached: the loader's own ceiling (scenario 14)
LOCAL_CACHED = "local disk, pages cached"


def _model_once(ctx: Ctx, name: str, by_name: dict[str, Client], node_cache: Path) -> float:
    if name in ("local disk", LOCAL_CACHED):
        procs.drop_caches()
        if name == LOCAL_CACHED:  # a first load fills the page cache: the timed one is the loader alone
            _check_model(ctx, _load_model(ctx.bucket_dir / MODEL_KEY), "local disk (first load)")
        t0 = time.perf_counter()
        tensors = _load_model(ctx.bucket_dir / MODEL_KEY)
        secs = time.perf_counter() - t0
    elif name == "runai-streamer":
        procs.drop_caches()
        env = dict(ctx.store.env(), AWS_ENDPOINT_URL=ctx.store.endpoint, RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
                   AWS_EC2_METADATA_DISABLED="true")
        out = subprocess.run([sys.executable, "-m", "bench.runai_load", f"s3://{ctx.store.bucket}/{MODEL_KEY}"],
                             env=env, check=True, capture_output=True, timeout=900)
        result = json.loads(out.stdout.decode().strip().splitlines()[-1])
        if result["tensors"] != ctx.manifest.tensors:
            raise WrongBytes("runai-streamer: tensor bytes differ from the generated model")
        return float(result["seconds"])
    elif name == "s5cmd":
        dest = Path(tempfile.mkdtemp(prefix="s5cmd-", dir=ctx.workdir))
        try:
            procs.drop_caches()
            t0 = time.perf_counter()
            subprocess.run([shutil.which("s5cmd") or "s5cmd", "--endpoint-url", ctx.store.endpoint, "cp",
                            f"s3://{ctx.store.bucket}/{MODEL_KEY}", str(dest) + "/"],
                           env=ctx.store.env(), check=True, capture_output=True, timeout=600)
            tensors = _load_model(dest / "model.safetensors")
            secs = time.perf_counter() - t0
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    else:
        client = by_name["objfs" if name.startswith("objfs") else name]
        cache = node_cache if name == "objfs (node cache)" else None
        with client.mount(ctx.store, "model", ctx.mountpoint(client.name), cache_dir=cache) as m:
            procs.drop_caches()
            t0 = time.perf_counter()
            tensors = _load_model(m.path / "model.safetensors")
            secs = time.perf_counter() - t0
    _check_model(ctx, tensors, name)
    return secs


# 14 ----------------------------------------------------------------------------------------------
def second_pod(ctx: Ctx) -> Scenario:
    """A second pod on the node loads the model the first one loaded: two objfs mounts of one node
    cache. With FUSE passthrough both read the cache's complete file, so the second finds its pages
    in the page cache the first one filled (no drop between them); local disk has the page cache
    dropped before each load. "local disk, pages cached" loads the local file a second time without
    a drop: the loader's own ceiling (its copying out of the page cache), which no filesystem under
    it can pass."""
    size = (ctx.bucket_dir / MODEL_KEY).stat().st_size
    sc = ctx.run.scenario("14", f"A second pod on the node loads the {size / MiB:.0f} MiB model after the first",
                          "MB/s", True, [])
    sc.goals += [Goal("objfs second pod >= 2x local disk", "objfs (second pod)", ref="local disk", factor=2.0)]
    node_cache = fresh_cache(ctx, "second-pod")
    try:
        # The node cache gets the complete file: a read does not wait for a busy cache disk, so a
        # block it could not hand over is filled by the next read (the note says how many it took).
        fills = 0
        while fills < 3:
            fills += 1
            with OBJFS.mount(ctx.store, "model", ctx.mountpoint("objfs"), cache_dir=node_cache) as m:
                read_all(m.path / "model.safetensors", size)
            time.sleep(2)  # its writer publishes the complete file on the way out
            if any(node_cache.rglob("*.obj")):
                break
        complete = any(node_cache.rglob("*.obj"))
        sc.notes.append(f"node cache complete after {fills} read(s)" if complete else
                        f"node cache not complete after {fills} reads: the loads went through the server")
        for rep in range(ctx.sizes.reps):
            for name in rotated(["objfs (second pod)", "local disk", LOCAL_CACHED], rep):
                if name in ("local disk", LOCAL_CACHED):
                    secs = _model_once(ctx, name, {}, node_cache)
                else:
                    with OBJFS.mount(ctx.store, "model", ctx.mountpoint("objfs-1"), cache_dir=node_cache) as first, \
                            OBJFS.mount(ctx.store, "model", ctx.mountpoint("objfs"), cache_dir=node_cache) as second:
                        procs.drop_caches()
                        _check_model(ctx, _load_model(first.path / "model.safetensors"), "objfs (first pod)")
                        t0 = time.perf_counter()
                        tensors = _load_model(second.path / "model.safetensors")
                        secs = time.perf_counter() - t0
                    _check_model(ctx, tensors, name)
                sc.add(name, size / MB / secs)
                ctx.log(f"  14 {name}: {size / MB / secs:.0f} MB/s")
    finally:
        shutil.rmtree(node_cache, ignore_errors=True)
    return sc


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
