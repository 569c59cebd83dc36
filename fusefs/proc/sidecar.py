"""``objfs sidecar --dir DIR``: the FUSE servers of one pod, running inside that pod.

The CSI node plugin mounts each objfs volume of the pod itself and hands the mounted /dev/fuse
fd over to this process (``fusefs.wire.handoff``, socket ``DIR/objfs.sock``), with the MountConfig
(no secret, no endpoint, no node path) and one socket connected to the node's data service for
this volume's grant (``fusefs.wire.grant``): every byte of the volume comes through it, and the
node cache and the credentials stay on the node's side. This process is the tenant's (they can
exec into it): it holds nothing worth more than the pod's own volumes. Every volume gets a child
process forked from this one (imports done once, as in ``objfs zygote``), so one volume that fails
takes no other with it. A restarted node plugin hands each child its next grant connection
through here (``regrant``). The FUSE servers' memory and CPU are the pod's, and they live and die with the pod: a
restart or upgrade of the node plugin touches none of them.

Runs unprivileged (uid 65534, no capabilities, read-only root): it writes only under DIR
(``tmp/`` for upload staging, ``metrics/<volume>.prom``).

Stopping: on SIGTERM (kubelet stopping the container) every server lets open files finish their
uploads, then unmounts its end; this process exits once they all have. A sidecar that kubelet
does not stop by itself (a regular container on Kubernetes < 1.29) does the same once the file
``DIR/exit`` appears: the node plugin writes it once the pod's other containers are done for good
(``csi.node.podexit``), so a Job's pod completes.

This process stays single-threaded: fork() copies only the calling thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import selectors
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import NoReturn

from fusefs.config import MountConfig
from fusefs.proc.fork import preload, run_child
from fusefs.wire import handoff
from fusefs.wire import regrant as regrant_wire

log = logging.getLogger(__name__)

EXIT_FILE_POLL = 1.0  # seconds between looks for DIR/exit


@dataclass
class _Volume:
    pid: int
    regrant: socket.socket  # our end of the child's channel for new grant connections
    status: int | None = None  # wait status once the server exited


class Sidecar:
    def __init__(self, directory: str) -> None:
        self.dir = os.path.abspath(directory)
        self.volumes: dict[str, _Volume] = {}
        self.stopping = False
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self) -> None:
        os.umask(0o077)
        staging = os.path.join(self.dir, "tmp")
        os.makedirs(staging, mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.dir, "metrics"), mode=0o755, exist_ok=True)
        os.chmod(os.path.join(self.dir, "metrics"), 0o755)  # the node plugin re-exports them
        tempfile.tempdir = staging  # the root file system is read-only: upload staging lives here
        preload()
        self.listener = self._listen()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)  # handled in the loop, through the wakeup fd
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "signal")

    def _listen(self) -> socket.socket:
        # Bound through /proc/self/fd: DIR may be longer than a socket path may be (108 bytes).
        dirfd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY)
        try:
            path = f"/proc/self/fd/{dirfd}/{handoff.SIDECAR_SOCKET}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # an earlier life's
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.bind(path)
        finally:
            os.close(dirfd)
        sock.listen(64)
        return sock

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        log.warning("objfs sidecar serving hand-overs in %s", self.dir)
        while not (self.stopping and not self._running()):
            for key, _ in self.sel.select(EXIT_FILE_POLL):
                if key.data == "accept":
                    self._accept()
                elif key.data == "signal":
                    self._signals()
                else:
                    self._request(key.fileobj)  # type: ignore[arg-type]
            self._reap()
            if not self.stopping and os.path.exists(os.path.join(self.dir, handoff.EXIT_FILE)):
                log.warning("%s appeared: stopping", handoff.EXIT_FILE)
                self._stop()
        log.warning("objfs sidecar: every volume is done; exiting")
        if self.listener is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.dir, handoff.SIDECAR_SOCKET))
        return 0

    def _running(self) -> list[_Volume]:
        return [v for v in self.volumes.values() if v.status is None]

    def _signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            data = self._wake_r.recv(64)
            if any(s in data for s in (signal.SIGTERM, signal.SIGINT)) and not self.stopping:
                log.warning("asked to stop: finishing uploads and unmounting %d volume(s)", len(self._running()))
                self._stop()

    def _stop(self) -> None:
        self.stopping = True
        for vol in self._running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(vol.pid, signal.SIGTERM)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for name, vol in self.volumes.items():
                if vol.pid == pid:
                    vol.status = status
                    level = logging.WARNING if status == 0 else logging.ERROR
                    log.log(level, "volume %s: server exited (%s)", name, _describe(status))

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            handoff.send_hello(conn, self.dir)
        except OSError:
            conn.close()
            return
        self.sel.register(conn, selectors.EVENT_READ, "request")

    def _request(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        try:
            request = handoff.receive_request(conn)
        except (handoff.ProtocolError, OSError) as exc:
            with contextlib.suppress(OSError):
                conn.send(f"{handoff.ERROR_PREFIX} {exc}".encode())
            conn.close()
            return
        if request.volume is not None:
            self._serve(conn, request.volume)
            return
        answer = self._status(request.name)
        if request.grant_fd is not None:
            answer = self._regrant(request.name, request.grant_fd)
        with contextlib.suppress(OSError):
            conn.send(answer.encode())
        conn.close()

    def _regrant(self, name: str, grant_fd: int) -> str:
        """Forward a new grant connection to the volume's server."""
        try:
            vol = self.volumes.get(name)
            if vol is None or vol.status is not None:
                return f"{handoff.ERROR_PREFIX} volume {name} is not served here"
            try:
                regrant_wire.send_grant_fd(vol.regrant, grant_fd)
            except OSError as exc:
                return f"{handoff.ERROR_PREFIX} the server of volume {name} did not take it: {exc}"
            return handoff.OK
        finally:
            os.close(grant_fd)

    def _status(self, name: str) -> str:
        vol = self.volumes.get(name)
        if vol is None:
            return handoff.UNKNOWN
        return handoff.SERVING if vol.status is None else f"exited {_describe(vol.status)}"

    def _serve(self, conn: socket.socket, volume: handoff.VolumeHandOver) -> None:
        refusal = None
        if self.stopping:
            refusal = "the objfs sidecar is stopping"
        elif (earlier := self.volumes.get(volume.name)) is not None and earlier.status is None:
            refusal = f"volume {volume.name} is already served by this sidecar"
        if refusal is not None:
            volume.close()
            with contextlib.suppress(OSError):
                conn.send(f"{handoff.ERROR_PREFIX} {refusal}".encode())
            conn.close()
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            volume.close()
            ours.close()
            theirs.close()
            with contextlib.suppress(OSError):
                conn.send(f"{handoff.ERROR_PREFIX} fork failed: {exc.strerror}".encode())
            conn.close()
            return
        if pid == 0:
            ours.close()
            self._child(conn, volume, theirs)  # never returns
        theirs.close()
        volume.close()
        conn.close()
        earlier = self.volumes.get(volume.name)
        if earlier is not None:
            earlier.regrant.close()
        self.volumes[volume.name] = _Volume(pid, ours)
        log.warning("volume %s (%s): server %d started", volume.name, volume.config.source, pid)

    # -- a child: one volume -----------------------------------------------------------------
    def _child(self, conn: socket.socket, volume: handoff.VolumeHandOver, regrant: socket.socket) -> NoReturn:
        def body() -> int:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            self.sel.close()
            for sock in (self.listener, self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            for other in self.volumes.values():
                other.regrant.close()  # the other volumes' channels are not this child's business
            random.seed()  # every child would otherwise draw the same retry jitter
            return serve_volume(self.dir, volume, conn.detach(), regrant)

        run_child(body)


def server_config(directory: str, volume: handoff.VolumeHandOver) -> MountConfig:
    """The config as this pod's server uses it: its figures written into the pod's directory."""
    metrics = os.path.join(directory, "metrics", f"{volume.name}.prom")
    return dataclasses.replace(volume.config, metrics_path=metrics)


def serve_volume(directory: str, volume: handoff.VolumeHandOver, status_fd: int, regrant: socket.socket) -> int:
    """Serve one handed-over volume until it is unmounted or told to stop; report on ``status_fd``."""
    from fusefs.proc.serve import serve_reporting

    grant = socket.socket(fileno=volume.grant_fd)
    return serve_reporting(handoff.StatusReporter(status_fd), f"objfs sidecar: volume {volume.name}",
                           server_config(directory, volume), f"/dev/fd/{volume.fuse_fd}", grant=grant,
                           regrant=regrant)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def run(directory: str) -> int:
    if not os.path.isdir(directory):
        print(f"objfs sidecar: {directory} is not a directory: mount the objfs-tmp emptyDir there", file=sys.stderr)
        return 2
    sidecar = Sidecar(directory)
    sidecar.prepare()
    return sidecar.run()
