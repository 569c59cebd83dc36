"""The node plugin's client of ``objfs zygote`` (``fusefs.proc.zygote``): start it, ask it for
servers (the messages: ``fusefs.wire.zygote``).

One zygote per plugin, started on first use (or by ``warm_up`` at start-up) with the same
privilege drop as the servers, restarted if it dies. ``start`` returns the new server's pid, or
None when there is no working zygote (it could not be started, or failed recently): the caller
then starts a fresh ``objfs serve`` itself, so a broken zygote costs speed, never a mount.

One exchange at a time on the socket (a lock held for the fork, a few milliseconds), not around
the publish: the publishing thread waits for the server's ready line without the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Sequence

from fusefs.wire import zygote as wire

log = logging.getLogger(__name__)

#: a zygote that failed to start is not tried again for this long (servers start directly meanwhile)
RETRY_AFTER = 60.0


class ZygoteError(Exception):
    """The zygote broke in the middle of a request: whether it forked is unknown."""


class Zygote:
    def __init__(self, command: Sequence[str], env: dict[str, str], log_path: str,
                 ready_timeout: float = 60.0, reply_timeout: float = 30.0) -> None:
        self.command = list(command)  # privilege-dropping prefix and the objfs command
        self.env = env
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.reply_timeout = reply_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._failed_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ensure(self) -> bool:
        """Whether a zygote is running (starting one if needed and not failed recently)."""
        with self._lock:
            return self._ensure()

    def start(self, fds: tuple[int, int, int, int, int, int]) -> int | None:
        """Fork a server with these descriptors (``fusefs.wire.zygote.ServerFds``); its pid, or
        None if there is no working zygote (nothing was started then)."""
        assert len(fds) == wire.FDS_PER_SERVER
        with self._lock:
            if not self._ensure():
                return None
            assert self._sock is not None
            try:
                answer = wire.request_server(self._sock, fds)
            except OSError as exc:
                self._stop()
                raise ZygoteError(f"objfs zygote failed during a request: {exc}") from None
            except wire.ZygoteGone as exc:
                self._stop()  # it died: the next request starts another
                raise ZygoteError(str(exc)) from None
            if isinstance(answer, str):
                log.warning("objfs zygote: %s; starting this server directly", answer)
                return None
            return answer

    def close(self) -> None:
        with self._lock:
            self._stop()

    # -- under the lock ------------------------------------------------------------------------
    def _ensure(self) -> bool:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return True
        self._stop()
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER:
            return False
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with open(self.log_path, "ab") as logf:
                os.fchmod(logf.fileno(), 0o600)
                proc = subprocess.Popen(
                    [*self.command, "zygote", "--socket-fd", str(child.fileno())], pass_fds=(child.fileno(),),
                    start_new_session=True, cwd="/", stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    env=self.env,
                )
        except OSError as exc:
            parent.close()
            return self._failed(f"cannot run {self.command[-1]} zygote: {exc}")
        finally:
            child.close()
        parent.settimeout(self.ready_timeout)
        if not wire.wait_ready(parent):
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            parent.close()
            return self._failed(f"objfs zygote did not start (see {self.log_path})")
        parent.settimeout(self.reply_timeout)
        self._sock, self._proc, self._failed_at = parent, proc, None
        log.info("objfs zygote %d ready", proc.pid)
        return True

    def _failed(self, message: str) -> bool:
        log.warning("%s; servers start directly for the next %.0fs", message, RETRY_AFTER)
        self._failed_at = time.monotonic()
        return False

    def _stop(self) -> None:
        """Close our end (the zygote exits on EOF; its servers live on) and reap it."""
        sock, proc, self._sock, self._proc = self._sock, self._proc, None, None
        if sock is not None:
            sock.close()
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
