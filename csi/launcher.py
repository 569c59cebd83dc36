"""Starting and stopping ``objfs serve``, one per (pod, volume).

The contract with the server: ``objfs serve --config-fd N --fuse-fd M --ready-fd K``. It reads
its MountConfig (secrets included) as JSON from fd N until EOF — never argv or environment, which
/proc shows to every user — serves the already-mounted /dev/fuse fd M, and writes b"ready\\n" to
K once the mount answers, or b"error: <message>\\n" and exits non-zero.

``ProcessLauncher`` runs it in its own session (so it survives a plugin restart, even kill -9),
as an unprivileged uid/gid; setuid to a non-root uid drops every capability. Servers are forked
by an ``objfs zygote`` that has imported everything once (``csi.zygote``: milliseconds instead
of ~0.45 s of CPU each); without a working zygote, each is a fresh process.
The ``Launcher`` protocol leaves room for a launcher that starts mount pods instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from fusefs import handoff
from fusefs.config import MountConfig

from .zygote import Zygote, ZygoteError

log = logging.getLogger(__name__)


class ServerStartError(Exception):
    """The server did not come up; the message is the server's own where it gave one."""


@dataclass(frozen=True)
class ServerHandle:
    pid: int
    start_time: int
    log_path: str = ""


class Launcher(Protocol):
    def start(self, config: MountConfig, fuse_fd: int, name: str) -> ServerHandle: ...
    def alive(self, handle: ServerHandle) -> bool: ...
    def stop(self, handle: ServerHandle) -> None: ...


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def runnable_as(uid: int, gid: int, command: list[str] | None = None) -> bool:
    """Whether ``uid`` can run the server's interpreter (a venv under a private home cannot)."""
    # The interpreter must be the very one we run, standard library included: an interpreter
    # under a private home can still be exec-ed, but then finds some other stdlib.
    if command is not None:
        probe = [*command, "--help"]
    else:
        probe = [sys.executable, "-c", f"import os, sys; sys.exit(os.__file__ != {os.__file__!r})"]
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if setpriv is None:
        return False
    try:
        return subprocess.run([setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *probe],
                              cwd="/", capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def default_server_command() -> list[str]:
    """The ``objfs`` console script of this installation (beside our interpreter), else PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "objfs")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("objfs")
    return [found] if found else [sys.executable, "-c", "import sys; from fusefs.cli import main; sys.exit(main())"]


class ProcessLauncher:
    def __init__(
        self,
        log_dir: str,
        command: list[str] | None = None,
        uid: int = 65534,
        gid: int = 65534,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        zygote: bool = True,
    ) -> None:
        self.command = command or default_server_command()
        self.uid, self.gid = uid, gid
        self.log_dir = log_dir
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        os.makedirs(log_dir, mode=0o700, exist_ok=True)
        self.warmed = threading.Event()
        self._zygote: Zygote | None = None
        if zygote:
            with contextlib.suppress(ServerStartError):  # no setpriv: start() reports that itself
                self._zygote = Zygote([*self._drop_privileges(), *self.command], self._env(),
                                      os.path.join(log_dir, "zygote.log"))

    def start(self, config: MountConfig, fuse_fd: int, name: str) -> ServerHandle:
        cfg_r, cfg_w = os.pipe()
        ready_r, ready_w = os.pipe()
        log_path = os.path.join(self.log_dir, f"{name}.log")
        proc: subprocess.Popen[bytes] | None = None
        try:
            with open(log_path, "ab") as logf:
                os.fchmod(logf.fileno(), 0o600)
                pid = self._fork(cfg_r, fuse_fd, ready_w, logf.fileno())
                if pid is None:
                    proc = self._spawn(cfg_r, fuse_fd, ready_w, logf)
                    pid = proc.pid
        except BaseException:
            for fd in (cfg_r, cfg_w, ready_r, ready_w):
                os.close(fd)
            raise
        os.close(cfg_r)
        os.close(ready_w)
        with self._lock:
            if proc is not None:
                self._children[pid] = proc
        try:
            handoff.send_config(cfg_w, config)
            self._wait_ready(ready_r, pid, proc, log_path)
        except BaseException:
            self._kill(pid, proc)
            raise
        finally:
            os.close(ready_r)
        start_time = proc_start_time(pid)
        if start_time is None:
            raise ServerStartError(f"objfs serve exited right after reporting ready; see {log_path}")
        return ServerHandle(pid, start_time, log_path)

    def _fork(self, cfg_r: int, fuse_fd: int, ready_w: int, log_fd: int) -> int | None:
        """A server forked by the zygote: its pid, or None when there is no zygote to ask."""
        if self._zygote is None:
            return None
        try:
            return self._zygote.start((cfg_r, fuse_fd, ready_w, log_fd))
        except ZygoteError as exc:
            raise ServerStartError(f"{exc}; try again") from None

    def _spawn(self, cfg_r: int, fuse_fd: int, ready_w: int, logf: BinaryIO) -> subprocess.Popen[bytes]:
        """A fresh ``objfs serve`` (when there is no zygote to fork one)."""
        argv = [*self._drop_privileges(), *self.command, "serve", "--config-fd", str(cfg_r),
                "--fuse-fd", str(fuse_fd), "--ready-fd", str(ready_w)]
        try:
            # No user=/group= here: asking Popen to switch uid makes it fork() instead of
            # vfork(), and a fork() of this multi-threaded gRPC process runs gRPC's fork
            # handlers in the child (seen crashing it). setpriv switches after the exec.
            return subprocess.Popen(
                argv, pass_fds=(cfg_r, fuse_fd, ready_w), start_new_session=True, cwd="/",
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self._env(),
            )
        except PermissionError:
            raise ServerStartError(
                f"uid {self.uid} cannot execute {self.command[0]}: install objfs where that uid can read it "
                "(or choose another --server-uid)"
            ) from None

    def warm_up(self) -> None:
        """Start the zygote now rather than at the first publish (from a background thread);
        ``warmed`` is set when that is done, whether it worked or not."""
        try:
            if self._zygote is not None:
                self._zygote.ensure()
        finally:
            self.warmed.set()

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.close()

    def _drop_privileges(self) -> list[str]:
        """A setpriv prefix that becomes the server uid/gid with no groups, no capabilities and
        no way back (no_new_privs). Only when we can (root); as non-root, the server is us."""
        if os.geteuid() != 0 or self.uid == 0:
            return []
        setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
        if setpriv is None:
            raise ServerStartError("setpriv (util-linux) is needed to start servers as an unprivileged uid")
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--inh-caps=-all",
                "--no-new-privs", "--"]

    @staticmethod
    def _env() -> dict[str, str]:
        # A clean environment: nothing of ours (and no credentials) leaks into the server.
        path = os.path.dirname(sys.executable) + os.pathsep + os.defpath
        return {"PATH": path, "LANG": "C.UTF-8", "HOME": "/", "PYTHONUNBUFFERED": "1"}

    def _wait_ready(self, fd: int, pid: int, proc: subprocess.Popen[bytes] | None, log_path: str) -> None:
        status = handoff.read_status(fd, self.ready_timeout)
        if status == handoff.READY:
            return
        if status is None:
            raise ServerStartError(f"objfs serve did not report ready within {self.ready_timeout:.0f}s")
        message = handoff.error_message(status)
        if message is not None:
            raise ServerStartError(message)
        exit_status = ""
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            exit_status = f" (status {proc.poll()})"
        raise ServerStartError(
            f"objfs serve (pid {pid}) exited{exit_status} without reporting ready: {_tail(log_path)}"
        )

    def alive(self, handle: ServerHandle) -> bool:
        with self._lock:
            proc = self._children.get(handle.pid)
        if proc is not None and proc.poll() is not None:
            return False  # our child, now reaped
        return proc_start_time(handle.pid) == handle.start_time

    def stop(self, handle: ServerHandle) -> None:
        """Wait for the server to leave (unmounting ends its loop), then insist."""
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and self.alive(handle):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, sig)
            if self._wait_gone(handle, self.stop_timeout if sig is None else 5.0):
                break
        with self._lock:
            self._children.pop(handle.pid, None)

    def _wait_gone(self, handle: ServerHandle, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive(handle):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _kill(self, pid: int, proc: subprocess.Popen[bytes] | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait()  # our child: reap it (a zygote reaps its own)
        with self._lock:
            self._children.pop(pid, None)


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text.splitlines()[-1] if text else "(empty log)"
