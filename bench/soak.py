"""Soak: many concurrent readers on one mount for a while, sampling the FUSE server's RSS.

Used by the short soak test in ``make test`` (tests/fuse/test_soak.py: 32 readers for 20 s, RSS growth
under a generous cap) and by the bench scenario ``soak`` (``python -m bench --only soak``: minutes,
RSS over time reported). Each reader opens a random file, reads it whole or a random range, compares
every byte with the truth (a callable, so the bench can read its local copy of the data) and
closes it again: handles, blocks, prefetch windows and cache entries come and go all the time,
which is where a leak would show.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
#: ranges read at random offsets are at most this long
MAX_RANGE = 2 * MiB
#: files up to this size are sometimes read whole (the bench's 1 GiB objects only in ranges: 32
#: readers holding a whole copy and its truth each would measure the readers, not the server)
WHOLE_MAX = 16 * MiB


def rss_kib(pid: int) -> int | None:
    """Resident set size (VmRSS) of a process in KiB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class SoakResult:
    seconds: float
    readers: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, RSS KiB of the servers)
    reads: int = 0
    bytes: int = 0
    wrong: list[str] = field(default_factory=list)  # reads that returned other bytes than stored
    errors: list[str] = field(default_factory=list)  # reads that failed (OSError)

    def rss_mib(self, at: float) -> float:
        """The RSS sample nearest to ``at`` seconds (negative: from the end), in MiB."""
        if not self.samples:
            return 0.0
        t = at if at >= 0 else self.samples[-1][0] + at
        return min(self.samples, key=lambda s: abs(s[0] - t))[1] / 1024

    @property
    def peak_mib(self) -> float:
        return max((s[1] for s in self.samples), default=0) / 1024

    def series(self, every: float = 10.0) -> str:
        """``t=0s:41MiB t=10s:88MiB ...``: the RSS over time, for a report."""
        out, next_t = [], 0.0
        for t, kib in self.samples:
            if t >= next_t:
                out.append(f"t={t:.0f}s:{kib / 1024:.0f}MiB")
                next_t = t + every
        return " ".join(out)


def run(mount: Path, names: Sequence[str], sizes: dict[str, int], truth: Callable[[str, int, int], bytes],
        pids: Sequence[int], seconds: float, readers: int = 32, sample_every: float = 0.5, seed: int = 0) -> SoakResult:
    """``readers`` threads read ``names`` under ``mount`` for ``seconds``; ``truth(name, offset, n)``
    gives the stored bytes. RSS of ``pids`` (summed) is sampled every ``sample_every`` seconds."""
    result = SoakResult(seconds, readers)
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds
    stop = threading.Event()

    def reader(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline and not stop.is_set():
            name = rng.choice(names)
            size = sizes[name]
            if size <= MAX_RANGE or (size <= WHOLE_MAX and rng.random() < 0.2):
                offset, n = 0, size
            else:
                offset = rng.randrange(0, size)
                n = rng.randrange(1, MAX_RANGE)
            try:
                got = _read(mount / name, offset, n)
            except OSError as exc:
                with lock:
                    result.errors.append(f"{name}@{offset}+{n}: {exc}")
                continue
            ok = got == truth(name, offset, min(n, size - offset))
            with lock:
                result.reads += 1
                result.bytes += len(got)
                if not ok:
                    result.wrong.append(f"{name}@{offset}+{n}: {len(got)} bytes, not the stored ones")

    threads = [threading.Thread(target=reader, args=(i,), name=f"soak-{i}", daemon=True) for i in range(readers)]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            total = sum(rss_kib(p) or 0 for p in pids)
            result.samples.append((time.monotonic() - start, total))
            time.sleep(sample_every)
    finally:
        stop.set()
        for t in threads:
            t.join()
    result.samples.append((time.monotonic() - start, sum(rss_kib(p) or 0 for p in pids)))
    return result


def _read(path: Path, offset: int, n: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer at the end of the file), with as many read(2) as it takes."""
    parts = []
    fd = os.open(path, os.O_RDONLY)
    try:
        while n > 0:
            chunk = os.pread(fd, min(n, MiB), offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            n -= len(chunk)
    finally:
        os.close(fd)
    return b"".join(parts)


def local_truth(root: Path) -> Callable[[str, int, int], bytes]:
    """Truth from a local copy of the data (the bench's bucket directory)."""
    def truth(name: str, offset: int, n: int) -> bytes:
        with open(root / name, "rb") as f:
            return os.pread(f.fileno(), n, offset)
    return truth
