"""Starting the data service (``objfs data-service``, ``fusefs.proc.dataservice``) as a process of its
own, and talking to it over its control link (``fusefs.wire.control``).

The CSI node plugin runs it as a uid of its own (``csi/node/dataservice.py`` adds the privilege drop and
the grant records); a standalone ``objfs mount --data-service process`` runs it beside the mount, in
the shape of a node: the FUSE server then holds only its grant connection.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

from fusefs.config import MountConfig
from fusefs.wire.control import ControlError, ServiceLink

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0


def clean_env() -> dict[str, str]:
    """What the service inherits: nothing of ours, no credentials (they come over the control link)."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.defpath
    env = {"PATH": path, "LANG": "C.UTF-8", "HOME": "/", "PYTHONUNBUFFERED": "1"}
    if "OBJFS_LOG_LEVEL" in os.environ:
        env["OBJFS_LOG_LEVEL"] = os.environ["OBJFS_LOG_LEVEL"]
    return env


class ServiceProcess:
    """The data service process and its control link; started again on demand if it died."""

    def __init__(self, command: Sequence[str], cache_dir: str | None, cache_size: int, *,
                 backing_root: str | None = None, broker_socket: str = "", log_path: str = "",
                 env: dict[str, str] | None = None, own_session: bool = False, self_register: bool = False,
                 metrics_path: str = "") -> None:
        self.command = list(command)  # privilege drop + the objfs command
        self.cache_dir = cache_dir
        self.cache_size = cache_size
        self.backing_root = backing_root
        self.broker_socket = broker_socket
        self.log_path = log_path
        self.env = env if env is not None else clean_env()
        self.own_session = own_session  # outlives whoever started it (objfs mount returns at once)
        self.self_register = self_register  # registers passthrough files itself: root, one trust domain
        self.metrics_path = metrics_path
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._link: ServiceLink | None = None
        self.generation = 0  # bumped on every (re)start: grants of an older one must be handed out again
        self._closing = threading.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> ServiceLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [*self.command, "data-service", "--control-fd", str(theirs.fileno())]
        if self.cache_dir and self.cache_size > 0:
            argv += ["--cache-dir", self.cache_dir, "--cache-size", str(self.cache_size)]
            if self.backing_root and self.broker_socket:
                argv += ["--backing-root", self.backing_root, "--broker-socket", self.broker_socket]
            elif self.self_register:
                argv.append("--self-register")
        if self.metrics_path:
            argv += ["--metrics-path", self.metrics_path]
        out: int | None = None
        if self.log_path:
            out = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # The environment is ours minus nothing secret (the plugin has no secrets in it);
            # credentials only ever travel over the control link.
            self._proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), cwd="/", stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=out, env=self.env, start_new_session=self.own_session)
        finally:
            theirs.close()
            if out is not None:
                os.close(out)
        link = ServiceLink(ours, READY_TIMEOUT)
        link.ping()  # answered once the service is up
        self.generation += 1
        log.info("data service started (pid %d)", self._proc.pid)
        return link

    def link(self) -> ServiceLink:
        with self._lock:
            if self._link is None or self._proc is None or self._proc.poll() is not None:
                if self._proc is not None and self._proc.poll() is not None:
                    log.error("the data service exited (%s): starting it again", self._proc.returncode)
                if self._link is not None:
                    self._link.close()
                self._link = self._start()
            return self._link

    def grant(self, grant_id: str, config: MountConfig) -> socket.socket:
        """A connection served for the grant ``grant_id``; ControlError if the service refused it."""
        try:
            return self.link().grant(grant_id, config)
        except ControlError:
            raise
        except OSError as exc:
            raise ControlError(f"the node's data service cannot be started: {exc}") from None

    def watch(self, restarted: Callable[[], None]) -> None:
        """Start the service now, and again whenever it exits while the plugin runs; after each
        restart ``restarted`` hands the live servers their new grant connections."""
        def run() -> None:
            while not self._closing.is_set():
                try:
                    self.link()
                except (ControlError, OSError) as exc:
                    log.error("the data service does not start: %s; trying again", exc)
                    self._closing.wait(5)
                    continue
                proc = self._proc
                assert proc is not None
                generation = self.generation
                proc.wait()
                if self._closing.is_set():
                    return
                log.error("the data service exited (%s): restarting it", proc.returncode)
                self.link()
                if self.generation != generation:
                    restarted()

        threading.Thread(target=run, name="data-service-watch", daemon=True).start()

    def revoke(self, grant_id: str) -> None:
        with self._lock:
            link = self._link
        if link is None:
            return
        try:
            link.revoke(grant_id)
        except ControlError as exc:
            log.warning("revoking grant %s: %s", grant_id, exc)

    def link_fd(self) -> int:
        """The control link's fd, for a server to keep open (the service lives while it is)."""
        return self.link().sock.fileno()

    def detach(self) -> None:
        """Let go of the service without stopping it: whoever holds a copy of the link keeps it."""
        self._closing.set()
        with self._lock:
            if self._link is not None:
                self._link.close()
                self._link = None
            self._proc = None

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if self._link is not None:
                self._link.close()  # the service exits when its link closes
            if self._proc is not None:
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
