"""Scenarios 16-20: small files and large objects through a store with a real network's latency
(``bench/latency.py``: every chunk forwarded ``--latency-ms`` late both ways; the counting proxy
behind it counts the requests), the way training jobs read them: a walk, and opening files by path
from a shuffled index with 1 and 8 readers (a PyTorch ``Dataset`` with DataLoader workers never
lists first). Scenario 21: a second read of the large object right after the first returns.

Every client in one run, order rotated per repetition; CPU seconds of each client's processes
(the FUSE server and its children: objfs's data service) are measured over the same timed section.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import procs
from bench.clients import OBJFS, OBJFS_GRANT, OBJFS_META, OBJFS_NOCACHE, Client, Mounted
from bench.data import LARGE_KEY, MODEL_KEY
from bench.report import Goal, Scenario
from bench.scenarios import MB, Ctx, WrongBytes, _check_model, _load_model, buffer, check, rotated, timed_read

READERS = 8


def latency_clients(ctx: Ctx) -> list[Client]:
    """objfs in each of its modes, and one mode of each peer (without its disk cache where the
    run has it: a cold read is what these scenarios measure)."""
    chosen = ctx.clients(OBJFS, OBJFS_GRANT, OBJFS_NOCACHE, OBJFS_META)
    for family in ("s3fs", "rclone"):
        mine = sorted((c for c in ctx.mount_clients if c.family == family), key=lambda c: c.cache)
        chosen += mine[:1]
    return chosen


def _files(ctx: Ctx) -> list[str]:
    """The small files these scenarios read (keys without the ``small/`` prefix)."""
    keys = ctx.manifest.small[:ctx.sizes.latency_files]
    return [k.removeprefix("small/") for k in keys]


def _walk(root: Path, wanted: set[str]) -> dict[str, bytes]:
    """os.walk that enters only the directories holding ``wanted`` files, reading each file found."""
    dirs_wanted = {""}
    for rel in wanted:
        parts = rel.split("/")[:-1]
        dirs_wanted.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    found: dict[str, bytes] = {}
    for dirpath, dirs, files in os.walk(root):
        here = os.path.relpath(dirpath, root)
        here = "" if here == "." else here
        dirs[:] = sorted(d for d in dirs if (f"{here}/{d}" if here else d) in dirs_wanted)
        for name in sorted(files):
            rel = f"{here}/{name}" if here else name
            if rel in wanted:
                with open(os.path.join(dirpath, name), "rb") as f:
                    found[rel] = f.read()
    return found


def _by_path(root: Path, order: list[str], readers: int) -> dict[str, bytes]:
    """Open and read each file of ``order`` by its path, ``readers`` at a time (like DataLoader
    workers fed from a shuffled index)."""
    def read(rel: str) -> tuple[str, bytes]:
        with open(root / rel, "rb") as f:
            return rel, f.read()

    if readers == 1:
        return dict(map(read, order))
    with concurrent.futures.ThreadPoolExecutor(readers) as pool:
        return dict(pool.map(read, order))


def _small(ctx: Ctx, sid: str, title: str, how: Callable[[Path, list[str]], dict[str, bytes]],
           goals: list[Goal]) -> Scenario:
    clients = latency_clients(ctx)
    files = _files(ctx)
    n = len(files)
    sc = ctx.run.scenario(sid, f"{title}, {n} x 64 KiB, {ctx.latency_ms * 2:g} ms round trip, fresh mount",
                          "files/s", True, ctx.peers(clients))
    sc.goals += goals
    expected = {rel: ctx.manifest.objects["small/" + rel] for rel in files}
    order = list(files)
    random.Random(26).shuffle(order)
    for rep in range(ctx.sizes.reps):
        for c in rotated(clients, rep):
            with c.mount(ctx.store, "small", ctx.mountpoint(c.name), slow=True) as m:
                procs.drop_caches()
                ctx.proxy.reset()
                cpu0 = procs.tree_cpu_seconds(m.cpu_pids)
                t0 = time.perf_counter()
                got = how(m.path, order)
                secs = time.perf_counter() - t0
                cpu = procs.tree_cpu_seconds(m.cpu_pids) - cpu0
                tally = ctx.proxy.tally()
            if got.keys() != expected.keys():
                raise WrongBytes(f"{c.name}: read {len(got)} files, expected {len(expected)}")
            for rel, data in got.items():
                check(data, expected[rel], f"{c.name} {rel}")
            sc.add(c.name, n / secs, **{"req/file": tally.total / n, "seconds": secs,
                                        "cpu s/1000 files": cpu * 1000 / n},
                   **{f"{k}/file": v / n for k, v in tally.requests.items()})
            ctx.log(f"  {sid} {c.name}: {n / secs:.0f} files/s, {tally.total / n:.2f} req/file "
                    f"{dict(tally.requests)}, cpu {cpu * 1000 / n:.2f} s/1000 files")
    return sc


def _req_goal() -> Goal:
    return Goal("objfs <= 1.1 requests per file", "objfs", ref=None, metric="req/file", op="<=", value=1.1)


# 16 ----------------------------------------------------------------------------------------------
def latency_walk(ctx: Ctx) -> Scenario:
    return _small(ctx, "16", "Walk + read small files", lambda root, order: _walk(root, set(order)),
                  [Goal("objfs >= 1,000 files/s", "objfs", ref=None, op=">=", value=1000), _req_goal()])


# 17, 18 ------------------------------------------------------------------------------------------
def latency_by_path_1(ctx: Ctx) -> Scenario:
    return _small(ctx, "17", "Open + read small files by path (shuffled index), 1 reader",
                  lambda root, order: _by_path(root, order, 1),
                  [Goal("objfs >= 2x the faster peer", "objfs", factor=2.0), _req_goal()])


def latency_by_path_8(ctx: Ctx) -> Scenario:
    return _small(ctx, "18", f"Open + read small files by path (shuffled index), {READERS} readers",
                  lambda root, order: _by_path(root, order, READERS),
                  [Goal("objfs >= 2x the faster peer", "objfs", factor=2.0), _req_goal()])


# 19 ----------------------------------------------------------------------------------------------
def latency_first_byte(ctx: Ctx) -> Scenario:
    clients = latency_clients(ctx)
    sc = ctx.run.scenario("19", f"Time to first byte of a large object, {ctx.latency_ms * 2:g} ms round trip "
                          "(fresh mount, cold)", "ms", False, ctx.peers(clients))
    sc.goals += [Goal("objfs at least as fast as the faster peer", "objfs", factor=1.0)]
    with open(ctx.bucket_dir / LARGE_KEY, "rb") as f:
        head = f.read(4096)
    for rep in range(ctx.sizes.ttfb_reps):
        for c in rotated(clients, rep):
            with c.mount(ctx.store, "large", ctx.mountpoint(c.name), slow=True) as m:
                procs.drop_caches()
                ctx.proxy.reset()
                t0 = time.perf_counter()
                fd = os.open(m.path / "object.bin", os.O_RDONLY)
                first = os.read(fd, 4096)
                secs = time.perf_counter() - t0
                os.close(fd)
                tally = ctx.proxy.tally()
            if not first or first != head[:len(first)]:
                raise WrongBytes(f"{c.name}: first bytes differ")
            sc.add(c.name, secs * 1000, requests=tally.total)
    return sc


# 20 ----------------------------------------------------------------------------------------------
def latency_model(ctx: Ctx) -> Scenario:
    clients = latency_clients(ctx)
    size = (ctx.bucket_dir / MODEL_KEY).stat().st_size
    sc = ctx.run.scenario("20", f"Load the {size / (1 << 20):.0f} MiB safetensors model, {ctx.latency_ms * 2:g} ms "
                          "round trip (fresh mount and cache, page cache dropped)", "MB/s", True, ctx.peers(clients))
    sc.goals += [Goal("objfs >= the fastest peer", "objfs", factor=1.0)]
    for rep in range(ctx.sizes.reps):
        for c in rotated([*clients, "local disk"], rep):
            procs.drop_caches()
            if c == "local disk":
                t0 = time.perf_counter()
                tensors = _load_model(ctx.bucket_dir / MODEL_KEY)
                secs = time.perf_counter() - t0
                _check_model(ctx, tensors, c)
                sc.add(c, size / MB / secs)
                continue
            assert isinstance(c, Client)
            with c.mount(ctx.store, "model", ctx.mountpoint(c.name), slow=True) as m:
                procs.drop_caches()
                cpu0 = procs.tree_cpu_seconds(m.cpu_pids)
                out = subprocess.run([sys.executable, "-m", "bench.model_load", str(m.path / "model.safetensors")],
                                     check=True, capture_output=True, timeout=900)
                cpu = procs.tree_cpu_seconds(m.cpu_pids) - cpu0
            result = json.loads(out.stdout.decode().strip().splitlines()[-1])
            if result["tensors"] != ctx.manifest.tensors:
                raise WrongBytes(f"{c.name}: tensor bytes differ from the generated model")
            secs = float(result["seconds"])
            sc.add(c.name, size / MB / secs, **{"cpu s/GB": cpu * 1e9 / size})
            ctx.log(f"  20 {c.name}: {size / MB / secs:.0f} MB/s")
    return sc


# 21 ----------------------------------------------------------------------------------------------
def reread_at_once(ctx: Ctx) -> Scenario:
    """The large object read cold on one mount; the moment that read returns (page cache dropped:
    a pod restarted, a model reloaded) it is read again on the same mount and on a second mount
    of the same node cache. Unlike scenario 2 nothing waits for the cache to publish its file."""
    size, sha = ctx.sizes.large, ctx.manifest.objects[LARGE_KEY]
    sc = ctx.run.scenario("21", f"Second read of the {size / (1 << 20):.0f} MiB object right after the first "
                          "(page cache dropped, no wait)", "MB/s", True, [])
    sc.goals += [Goal("objfs same mount >= 0.85x local disk", "objfs (same mount)", ref="local disk", factor=0.85),
                 Goal("objfs second mount >= 0.85x local disk", "objfs (second mount)", ref="local disk",
                      factor=0.85)]
    if OBJFS not in ctx.mount_clients:
        sc.notes.append("objfs not in this run")
        return sc
    buf, first_buf = buffer(size), buffer(size)  # the first read is checked after the second ones
    for rep in range(ctx.sizes.reps):
        for name in rotated(["objfs", "local disk"], rep):
            if name == "local disk":
                procs.drop_caches()
                secs = timed_read(ctx.bucket_dir / LARGE_KEY, buf)
                check(buf, sha, "local disk")
                sc.add(name, size / MB / secs)
                continue
            cache = Path(os.path.join(ctx.workdir, f"cache-reread-{rep}"))
            try:
                with OBJFS.mount(ctx.store, "large", ctx.mountpoint("objfs-a"), cache_dir=cache) as a, \
                        OBJFS.mount(ctx.store, "large", ctx.mountpoint("objfs-b"), cache_dir=cache) as b:
                    procs.drop_caches()
                    first = timed_read(a.path / "object.bin", first_buf)
                    for which, m in rotated([("objfs (same mount)", a), ("objfs (second mount)", b)], rep):
                        procs.drop_caches()
                        secs = _read_checked(m, buf, sha, which)
                        sc.add(which, size / MB / secs)
                        ctx.log(f"  21 {which}: {size / MB / secs:.0f} MB/s (first read {size / MB / first:.0f})")
                check(first_buf, sha, "objfs first read")
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    return sc


def _read_checked(m: Mounted, buf: bytearray, sha: str, who: str) -> float:
    secs = timed_read(m.path / "object.bin", buf)
    check(buf, sha, who)
    return secs
