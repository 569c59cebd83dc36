"""``python -m bench.profile MODE``: one objfs read of the benchmark's large object, with the
server's CPU time split into user and kernel, its peak memory, and optionally a ``perf`` profile.

The benchmark tables say how fast; this says where the time goes, for one case at a time:

- ``cold``: fresh mount and node cache, page cache dropped (scenario 1);
- ``warm``: blocks in the node cache, fresh server, page cache dropped (scenario 2);
- ``memory``: the first ``--limit`` bytes read twice, page cache dropped between: the second read
  is served from the server's memory (no store, no disk), which isolates the FUSE request path;
- ``hot``: read twice, the second from the kernel's page cache (scenario 3);
- ``small``: walk a fresh mount of the small files and read each (scenario 4, without the proxy).

``--perf`` records ``perf record -e cpu-clock -g`` of the server (``--perf-all``: of the whole
machine, to see the store and the idle time too) into ``bench/results/perf-MODE.data``; read it with
``perf report -i FILE --no-children --sort sym`` (or ``--sort comm``). ``--py-spy`` samples the
server's Python stacks (all threads, idle ones left out) into ``bench/results/py-spy-MODE.txt``,
one collapsed stack per line with its sample count. Uses the data of
``python -m bench --size small`` (``--size full``: of the full run; run that once first);
``--cache-dir`` puts the node cache elsewhere (tmpfs, to take the disk out of the picture).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import procs
from testing.servers import RcloneS3

REPO = Path(__file__).resolve().parent.parent
OBJFS = str(Path(sys.executable).parent / "objfs")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("cold", "warm", "memory", "hot", "small"))
    ap.add_argument("--no-cache", action="store_true", help="mount without the node cache")
    ap.add_argument("--limit", type=int, default=48 << 20, help="bytes read in memory mode (fits the server's memory)")
    ap.add_argument("--perf", action="store_true", help="record a perf profile of the server")
    ap.add_argument("--perf-all", action="store_true", help="record a perf profile of the whole machine")
    ap.add_argument("--py-spy", action="store_true", help="sample the server's Python stacks with py-spy")
    ap.add_argument("--rate", type=int, default=200, help="with --py-spy: samples per second")
    ap.add_argument("--gil", action="store_true",
                    help="with --py-spy: only the thread holding the GIL (the server's Python CPU time, without waits)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/objfs-bench"))
    ap.add_argument("--size", choices=("small", "full"), default="small", help="whose data: python -m bench --size X")
    ap.add_argument("--cache-dir", type=Path, help="node cache directory (default: under --workdir)")
    return ap.parse_args()


class Server:
    """The FUSE server of one mount: CPU times and peak memory from /proc."""

    def __init__(self, mountpoint: Path) -> None:
        pids = procs.fuse_server_pids(mountpoint)
        if len(pids) != 1:
            raise SystemExit(f"expected one objfs server for {mountpoint}, found {sorted(pids)}")
        self.pid = pids.pop()
        self.peak_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def cpu(self) -> tuple[float, float]:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) // 1024)
            except OSError:
                return

    def __enter__(self) -> Server:
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()


def read(path: Path, limit: int) -> tuple[int, float]:
    buf = bytearray(1 << 20)
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n < limit and (k := f.readinto(buf)):
            n += k
    return n, time.perf_counter() - t0


def walk(root: Path) -> tuple[int, float, int]:
    """Walk ``root`` and read every file: (bytes, seconds, files)."""
    n = files = 0
    t0 = time.perf_counter()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                n += len(f.read())
            files += 1
    return n, time.perf_counter() - t0, files


def main() -> int:
    args = parse_args()
    data = args.workdir / f"s3-{args.size}" / "data"
    if not (data / "bench" / "large" / "object.bin").exists():
        raise SystemExit(f"no benchmark data under {data}: run `python -m bench --size {args.size}` once first")
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    server = RcloneS3(root=data).start()
    env = dict(os.environ, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key,
               AWS_REGION="us-east-1")
    mnt = args.workdir / "profile-mnt"
    cache = args.cache_dir or args.workdir / "profile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    mnt.mkdir(parents=True, exist_ok=True)
    obj = mnt / "object.bin"
    limit = args.limit if args.mode == "memory" else 1 << 62

    prefix = "small" if args.mode == "small" else "large"

    def mount() -> None:
        opts = ["--no-cache"] if args.no_cache else ["--cache-dir", str(cache)]
        subprocess.run([OBJFS, "mount", f"s3://bench/{prefix}", str(mnt), "--endpoint-url", server.endpoint, *opts],
                       env=env, check=True)

    def unmount() -> None:
        if procs.is_mounted(mnt):
            subprocess.run([OBJFS, "unmount", str(mnt)], check=False)

    perf: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        mount()
        if args.mode in ("warm", "memory", "hot"):
            read(obj, limit)
        if args.mode == "warm":
            time.sleep(1)  # the cache's writer finishes
            unmount()
            mount()
        if args.mode != "hot":
            procs.drop_caches()
        with Server(mnt) as srv:
            if args.perf or args.perf_all:
                target = ["-a"] if args.perf_all else ["-p", str(srv.pid)]
                out = results / f"perf-{args.mode}.data"
                perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "2000", "-g", *target,
                                         "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            if args.py_spy:
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-r", str(args.rate),
                                        "-f", "raw", "-o", str(results / f"py-spy-{args.mode}.txt"),
                                        *(["--gil"] if args.gil else []), "-p", str(srv.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            user0, sys0 = srv.cpu()
            if args.mode == "small":
                n, secs, files = walk(mnt)
                print(f"small: {files / secs:.0f} files/s ({files} files)")
            else:
                n, secs = read(obj, limit)
            user1, sys1 = srv.cpu()
        print(f"{args.mode}{' (no cache)' if args.no_cache else ''}: {n / 1e6 / secs:.0f} MB/s for {n / 1e6:.0f} MB; "
              f"server CPU user {user1 - user0:.2f} s, kernel {sys1 - sys0:.2f} s in {secs:.2f} s; "
              f"peak RSS {srv.peak_rss} MiB")
        if perf is not None:
            perf.send_signal(2)
            perf.wait()
            print(f"profile: perf report -i {results / f'perf-{args.mode}.data'} --no-children --sort sym")
        if spy is not None:
            spy.send_signal(2)
            spy.wait()
            print(f"py-spy stacks: {results / f'py-spy-{args.mode}.txt'}")
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if perf is not None and perf.poll() is None:
            perf.kill()
        unmount()
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
