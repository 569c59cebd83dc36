"""Processes and mounts for the benchmarks: page-cache drops, mount waits, reliable unmounts.

A FUSE mount whose server died blocks every stat of it, so nothing here touches a mount point
without a timeout, and every mount made by a run is recorded so that it is unmounted even when
the run fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fusefs.kernel import find_mount
from testing.servers import stop_process

_ACTIVE: dict[str, subprocess.Popen[bytes] | None] = {}  # mount point -> server process we started


def drop_caches() -> None:
    """Write back dirty pages and drop the kernel page cache (needs root): makes a read cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """Run ``fn`` in a daemon thread; raise TimeoutError if it does not return in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def is_mounted(path: str | Path) -> bool:
    return find_mount(os.path.realpath(path)) is not None


def wait_mounted(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """Wait until ``path`` is a mount point that answers a directory listing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount server exited with {proc.returncode} before {path} was mounted")
        if is_mounted(path):
            # stat, not listdir: a listing here would warm the directory cache that scenarios measure
            call_with_timeout(lambda: os.stat(path), max(1.0, deadline - time.monotonic()))
            return
        time.sleep(0.05)
    raise TimeoutError(f"{path} not mounted after {timeout}s")


def kill_lingering(pids: set[int], grace: float = 10.0) -> None:
    """After an unmount the servers should exit by themselves; end those that do not."""
    deadline = time.monotonic() + grace
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if Path(f"/proc/{p}").exists()}
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_guarded(fn: Callable[[], Any], timeout: float) -> Any:
    """Run ``fn`` (a scenario) in a thread; on timeout or interrupt, unmount everything lazily,
    which fails the reads stuck in the kernel, and re-raise. A hung mount must not hang the run."""
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(value=_capture(fn)), daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    try:
        while t.is_alive():
            t.join(min(1.0, max(0.0, deadline - time.monotonic())))
            if t.is_alive() and time.monotonic() >= deadline:
                raise TimeoutError(f"scenario still running after {timeout:.0f}s: unmounted everything")
    except BaseException:
        cleanup_all()
        t.join(30)
        raise
    value, error = box["value"]
    if error is not None:
        raise error
    return value


def _capture(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except BaseException as exc:  # handed to the waiting thread
        return None, exc


def register(path: Path, proc: subprocess.Popen[bytes] | None) -> None:
    _ACTIVE[str(path)] = proc


def force_unmount(path: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    """Unmount politely (fusermount3 -u), then lazily; then make sure the server is gone."""
    target = str(path)
    if is_mounted(target):
        ok = subprocess.run(["fusermount3", "-u", target], capture_output=True, timeout=timeout).returncode == 0
        if not ok or is_mounted(target):
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=timeout)
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc, grace=5)
    _ACTIVE.pop(target, None)


def cleanup_all() -> None:
    """Unmount everything this run mounted (last one first)."""
    for path, proc in reversed(list(_ACTIVE.items())):
        with contextlib.suppress(Exception):
            force_unmount(Path(path), proc, timeout=20)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so ``finally`` blocks unmount."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size of a process (VmHWM), in KiB; None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process still there."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue


def fuse_server_pids(mountpoint: Path) -> set[int]:
    """objfs serve processes of ``mountpoint`` (their command line names it) that hold /dev/fuse open."""
    found: set[int] = set()
    for pid, args in _command_lines():
        if b"serve" not in args or os.fsencode(mountpoint) not in args:
            continue
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse" for fd in os.listdir(f"/proc/{pid}/fd")):
                found.add(pid)
        except OSError:
            continue
    return found


def data_service_pids(cache_dir: Path) -> set[int]:
    """``objfs data-service`` processes of the node cache ``cache_dir`` (their command line names it):
    ``objfs mount --data-service process`` starts one that is not a child of the server."""
    return {pid for pid, args in _command_lines() if b"data-service" in args and os.fsencode(cache_dir) in args}


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of one live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pids: set[int]) -> float:
    """CPU seconds used so far by ``pids`` and every live descendant of theirs (a data service
    started beside an objfs server, rclone's and s3fs's threads are in their process already)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return sum(_cpu_of(p) for p in seen)
