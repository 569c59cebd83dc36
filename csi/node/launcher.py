"""Starting and stopping ``objfs serve``, one per (pod, volume).

The contract with the server: ``objfs serve --config-fd N --fuse-fd M --ready-fd K --grant-fd G
--regrant-fd R``. It reads its MountConfig (without secrets: those stay with the data service) as
JSON from fd N until EOF, serves the already-mounted /dev/fuse fd M with the data of its grant
connection G (``fusefs.wire.grant``), takes later grant connections on the socket R
(``fusefs.wire.regrant``), and writes b"ready\\n" to K once the mount answers, or
b"error: <message>\\n" and exits non-zero.

``ProcessLauncher`` runs it in its own session (so it survives a plugin restart, even kill -9),
as an unprivileged uid/gid; setuid to a non-root uid drops every capability. Servers are forked
by an ``objfs zygote`` that has imported everything once (``csi.node.zygote_client``: milliseconds instead
of ~0.45 s of CPU each); without a working zygote, each is a fresh process.
``SidecarLauncher`` (``--launcher sidecar``) starts nothing: it hands the mounted fd to the
``objfs sidecar`` container of the consuming pod, so the server lives and dies with that pod.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from csi.node import podpath
from csi.node.zygote_client import Zygote, ZygoteError
from fusefs import kernel
from fusefs.config import MountConfig
from fusefs.proc.spawn import ServePipes, serve_command
from fusefs.wire import handoff
from fusefs.wire import regrant as regrant_wire
from fusefs.wire.zygote import ServerFds

log = logging.getLogger(__name__)


def drop_privileges(uid: int, gid: int) -> list[str]:
    """A setpriv prefix that becomes ``uid``/``gid`` with no groups, no capabilities and no way
    back (no_new_privs): the servers' and the data service's. Only when we can (root); as non-root,
    or for uid 0, the child is us. FileNotFoundError without setpriv (util-linux)."""
    if os.geteuid() != 0 or uid == 0:
        return []
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if setpriv is None:
        raise FileNotFoundError("setpriv (util-linux) is missing")
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all", "--no-new-privs", "--"]


class ServerStartError(Exception):
    """The server did not come up; the message is the server's own where it gave one."""


@dataclass(frozen=True)
class ServerHandle:
    pid: int
    start_time: int
    log_path: str = ""


class Launcher(Protocol):
    def start(self, config: MountConfig, fuse_fd: int, name: str, grant: socket.socket) -> ServerHandle: ...
    def regrant(self, name: str, conn: socket.socket) -> bool: ...
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
    run_cli = "import sys; from fusefs.proc.cli import main; sys.exit(main())"
    return [found] if found else [sys.executable, "-c", run_cli]


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
        channel_dir: str = "",
    ) -> None:
        self.command = command or default_server_command()
        #: where each server's regrant socket is bound (root-only: only the plugin hands over)
        self.channel_dir = channel_dir or os.path.join(os.path.dirname(log_dir), "servers")
        os.makedirs(self.channel_dir, mode=0o700, exist_ok=True)
        os.chmod(self.channel_dir, 0o700)
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

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def channel_path(self, name: str) -> str:
        return os.path.join(self.channel_dir, f"{name}.sock")

    def _channel(self, name: str) -> socket.socket:
        """The listening socket a server takes its next grant connections on (``fusefs.wire.regrant``)."""
        path = self.channel_path(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # an earlier server's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(path)
            sock.listen(4)
        except BaseException:
            sock.close()
            raise
        return sock

    def regrant(self, name: str, conn: socket.socket) -> bool:
        """Hand a server its next grant connection; False if it does not take it."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(5.0)
                sock.connect(self.channel_path(name))
                regrant_wire.send_grant(sock, conn)
            return True
        except OSError as exc:
            log.warning("server %s did not take its new grant connection: %s", name, exc)
            return False

    def start(self, config: MountConfig, fuse_fd: int, name: str, grant: socket.socket) -> ServerHandle:
        pipes = ServePipes()
        log_path = self.log_path(name)
        proc: subprocess.Popen[bytes] | None = None
        channel = self._channel(name)
        try:
            with open(log_path, "ab") as logf:
                os.fchmod(logf.fileno(), 0o600)
                fds = ServerFds(pipes.config_r, fuse_fd, pipes.ready_w, logf.fileno(), grant.fileno(),
                                channel.fileno())
                pid = self._fork(fds)
                if pid is None:
                    proc = self._spawn(fds, logf)
                    pid = proc.pid
        except BaseException:
            pipes.close()
            raise
        finally:
            channel.close()  # the server holds its copy
        pipes.started()
        with self._lock:
            if proc is not None:
                self._children[pid] = proc
        try:
            self._check_ready(pipes.hand_over(config, self.ready_timeout), pid, proc, log_path)
        except BaseException:
            self._kill(pid, proc)
            raise
        start_time = proc_start_time(pid)
        if start_time is None:
            raise ServerStartError(f"objfs serve exited right after reporting ready; see {log_path}")
        return ServerHandle(pid, start_time, log_path)

    def _fork(self, fds: ServerFds) -> int | None:
        """A server forked by the zygote: its pid, or None when there is no zygote to ask."""
        if self._zygote is None:
            return None
        try:
            return self._zygote.start(fds)
        except ZygoteError as exc:
            raise ServerStartError(f"{exc}; try again") from None

    def _spawn(self, fds: ServerFds, logf: BinaryIO) -> subprocess.Popen[bytes]:
        """A fresh ``objfs serve`` (when there is no zygote to fork one)."""
        argv, pass_fds = serve_command([*self._drop_privileges(), *self.command], fds.config, fds.ready,
                                       fuse_fd=fds.fuse, grant_fd=fds.grant, regrant_fd=fds.regrant)
        try:
            # No user=/group= here: asking Popen to switch uid makes it fork() instead of
            # vfork(), and a fork() of this multi-threaded gRPC process runs gRPC's fork
            # handlers in the child (seen crashing it). setpriv switches after the exec.
            return subprocess.Popen(
                argv, pass_fds=pass_fds, start_new_session=True, cwd="/",
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
        try:
            return drop_privileges(self.uid, self.gid)
        except FileNotFoundError as exc:
            raise ServerStartError(f"{exc}: needed to start servers as an unprivileged uid") from None

    @staticmethod
    def _env() -> dict[str, str]:
        # A clean environment: nothing of ours (and no credentials) leaks into the server.
        path = os.path.dirname(sys.executable) + os.pathsep + os.defpath
        return {"PATH": path, "LANG": "C.UTF-8", "HOME": "/", "PYTHONUNBUFFERED": "1"}

    def _check_ready(self, status: str | None, pid: int, proc: subprocess.Popen[bytes] | None, log_path: str
                     ) -> None:
        """ServerStartError unless ``status`` (the server's line, None if none came in time) is ready."""
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


# -- the sidecar launcher ----------------------------------------------------------------------
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"
EMPTY_DIR_NAME = "objfs-tmp"  # the emptyDir the webhook adds to the pod (mounted at /objfs-tmp)
NO_SIDECAR = "no sidecar"  # status(): nothing listens on the pod's hand-over socket


@dataclass
class _PendingHandOver:
    target: str
    name: str
    pod_uid: str
    config: MountConfig
    fuse_fd: int  # ours until the sidecar has taken it: the mount lives as long as someone holds it
    grant: socket.socket  # the volume's connection to the data service, for the sidecar
    on_done: Callable[[str, str | None], None]  # (target, None once served, or the error)
    readahead_kb: int
    cancelled: threading.Event
    finished: threading.Event = field(default_factory=threading.Event)  # the outcome is known
    tried: threading.Event = field(default_factory=threading.Event)  # the first connect was tried
    listening: bool = False  # ... and the sidecar was there
    error: str | None = None
    detached: bool = False  # the publish answered "pending": the outcome goes to on_done


class SidecarLauncher:
    """Hands mounted /dev/fuse fds to the ``objfs sidecar`` of the consuming pod (``fusefs.proc.sidecar``).

    kubelet mounts every volume of a pod before it starts any container, the sidecar included, so
    at NodePublishVolume time the sidecar usually is not listening yet. Then the publish answers
    once the target is mounted, and a thread keeps the fd and connects as soon as the sidecar's
    socket appears in the pod's emptyDir; until the sidecar serves, the kernel holds the pod's
    first requests (FUSE INIT is not answered yet), so nothing reads a wrong or empty tree. When
    the sidecar already listens (a second volume, a republish), the publish answers only once the
    mount serves. Once handed over, the plugin keeps no fd and no child for the volume.
    """

    def __init__(self, kubelet_root: str, pod_wait: float = 5.0, ready_timeout: float = 60.0,
                 handover_timeout: float = 600.0, poll: float = 0.1, check_peer_cgroup: bool = False,
                 sync_wait: float = 5.0) -> None:
        self.kubelet_root = kubelet_root
        self.sync_wait = sync_wait  # the longest a publish's gRPC thread waits for the sidecar
        # Whether a connection counts only if its peer runs in the pod's cgroup (csi.node.podpath.peer_in_pod):
        # needs a real kubelet's cgroups and the pods' PIDs visible to the plugin.
        self.check_peer_cgroup = check_peer_cgroup
        self.pod_wait = pod_wait
        self.ready_timeout = ready_timeout
        self.handover_timeout = handover_timeout
        self.poll = poll
        self._lock = threading.Lock()
        self._pending: dict[str, _PendingHandOver] = {}

    def pod_dir(self, pod_uid: str) -> str:
        return os.path.join(self.kubelet_root, "pods", pod_uid, "volumes", "kubernetes.io~empty-dir", EMPTY_DIR_NAME)

    def has_sidecar_dir(self, pod_uid: str, wait: float | None = None) -> bool:
        """Whether the pod has the objfs-tmp emptyDir. kubelet sets a pod's volumes up side by side,
        so it may appear a moment after our publish starts: look for ``wait`` seconds."""
        deadline = time.monotonic() + (self.pod_wait if wait is None else wait)
        while not os.path.isdir(self.pod_dir(pod_uid)):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # -- publish -----------------------------------------------------------------------------
    def publish(self, target: str, name: str, pod_uid: str, config: MountConfig, fuse_fd: int,
                grant: socket.socket, on_done: Callable[[str, str | None], None], readahead_kb: int = 0) -> bool:
        """Hand ``fuse_fd`` and the ``grant`` connection over: True once the mount serves, within
        ``sync_wait`` seconds; ServerStartError if the sidecar refused it by then; else False
        (pending: the sidecar is not listening yet, or is slow to answer) and ``on_done`` tells the
        outcome later. Either way the gRPC thread that asked waits at most ``sync_wait``: a pod
        whose sidecar greets and then says nothing holds no worker of the plugin. The caller keeps
        and closes its fd; the grant connection is ours from here on."""
        pending = _PendingHandOver(target, name, pod_uid, config, os.dup(fuse_fd), grant, on_done, readahead_kb,
                                   threading.Event())
        with self._lock:
            self._pending[target] = pending
        threading.Thread(target=self._wait_and_hand_over, args=(pending,), name=f"hand-over {name}",
                         daemon=True).start()
        pending.tried.wait(self.sync_wait)
        if pending.listening:  # not yet: nothing to wait for (kubelet starts containers after mounts)
            pending.finished.wait(self.sync_wait)
        with self._lock:
            if not pending.finished.is_set():
                pending.detached = True
                return False
            self._pending.pop(target, None)
        if pending.error is not None:
            raise ServerStartError(pending.error)
        return True

    def is_pending(self, target: str) -> bool:
        with self._lock:
            return target in self._pending

    def cancel(self, target: str) -> None:
        """Give up a pending hand-over (unpublish): its fd is closed, ``on_done`` is not called."""
        with self._lock:
            pending = self._pending.pop(target, None)
            if pending is not None:
                pending.cancelled.set()

    def _wait_and_hand_over(self, p: _PendingHandOver) -> None:
        deadline = time.monotonic() + self.handover_timeout
        error: str | None = None
        try:
            while not p.cancelled.is_set():
                sock = self._connect(p.pod_uid, self.ready_timeout)
                p.listening = sock is not None
                p.tried.set()
                if sock is not None:
                    with sock:
                        try:
                            self._hand_over(sock, p.name, p.config, p.fuse_fd, p.grant)
                        except (ServerStartError, handoff.ProtocolError, OSError) as exc:
                            error = str(exc)
                    break
                if time.monotonic() > deadline:
                    error = (f"the objfs-sidecar container of pod {p.pod_uid} did not take the volume within "
                             f"{self.handover_timeout:.0f}s: is it in the pod spec (webhook installed)?")
                    break
                p.cancelled.wait(self.poll)
        finally:
            os.close(p.fuse_fd)  # handed over, or given up: a mount nobody serves fails with ENOTCONN
            p.grant.close()
        if error is None:
            kernel.raise_readahead_soon(p.target, p.readahead_kb)
        with self._lock:
            p.error = error
            p.finished.set()
            if not p.detached:
                return  # the publish still waits: it tells the outcome itself
            if p.cancelled.is_set() or self._pending.get(p.target) is not p:
                return
            del self._pending[p.target]
            try:
                p.on_done(p.target, error)
            except Exception:  # the hand-over itself is done; only its record is behind
                log.exception("recording the hand-over of %s failed", p.target)
        if error is not None:
            log.warning("hand-over of %s to its sidecar failed: %s", p.target, error)

    def _connect(self, pod_uid: str, timeout: float) -> socket.socket | None:
        """A connection to the pod's sidecar, or None if nothing listens there (yet). The pod can write
        its emptyDir: a symlink it plants at the socket or above is not followed, a file there that is
        not a socket is not used, and (check_peer_cgroup) a listener outside the pod is refused."""
        parts = podpath.pod_dir_parts(pod_uid, EMPTY_DIR_NAME)
        try:
            sock = podpath.connect_in_pod(self.kubelet_root, parts, handoff.SIDECAR_SOCKET, socket.SOCK_SEQPACKET,
                                          timeout)
        except OSError:  # not there, not a socket, a symlink, nobody listening (yet), or too slow
            return None
        if self.check_peer_cgroup and not podpath.peer_in_pod(sock, pod_uid):
            log.warning("the process listening on the hand-over socket of pod %s is not in that pod's cgroup: "
                        "not handing it anything", pod_uid)
            sock.close()
            return None
        return sock

    def _hand_over(self, sock: socket.socket, name: str, config: MountConfig, fuse_fd: int,
                   grant: socket.socket) -> None:
        """Send one volume and wait for the sidecar's word; ServerStartError unless it serves."""
        try:
            handoff.receive_hello(sock)
        except (OSError, handoff.ProtocolError) as exc:
            raise ServerStartError(f"the pod's objfs sidecar did not greet: {exc}") from None
        handoff.send_volume(sock, handoff.VolumeHandOver(name, config, fuse_fd, grant.fileno()))
        status = handoff.read_status(sock.fileno(), self.ready_timeout)
        if status == handoff.READY:
            return
        if status is None:
            raise ServerStartError(f"the pod's objfs sidecar did not report ready within {self.ready_timeout:.0f}s")
        raise ServerStartError(handoff.error_message(status) or "the pod's objfs sidecar hung up without a word")

    def regrant(self, pod_uid: str, name: str, grant: socket.socket) -> bool:
        """Hand the volume's server in the pod its next grant connection (a restarted plugin)."""
        sock = self._connect(pod_uid, 5.0)
        if sock is None:
            return False
        with sock:
            try:
                handoff.receive_hello(sock)
                handoff.send_regrant(sock, name, grant.fileno())
                answer = sock.recv(4096).decode(errors="replace").strip()
            except (OSError, handoff.ProtocolError) as exc:
                answer = str(exc)
        if answer != handoff.OK:
            log.warning("the sidecar of pod %s did not take the new grant of %s: %s", pod_uid, name, answer)
        return answer == handoff.OK

    # -- status ------------------------------------------------------------------------------
    def status(self, pod_uid: str, name: str, timeout: float = 5.0) -> str:
        """``serving``, ``exited ...``, ``unknown`` (the sidecar never got it) or NO_SIDECAR."""
        sock = self._connect(pod_uid, timeout)
        if sock is None:
            return NO_SIDECAR
        with sock:
            try:
                handoff.receive_hello(sock)
                handoff.send_status_request(sock, name)
                return sock.recv(4096).decode(errors="replace").strip() or NO_SIDECAR
            except (OSError, handoff.ProtocolError):
                return NO_SIDECAR
