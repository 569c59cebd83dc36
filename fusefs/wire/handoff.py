"""The hand-off between whoever mounts and ``objfs serve``: both ends of one small protocol.

The launcher (``objfs mount`` as root, or the CSI node plugin) writes the MountConfig as JSON to
a pipe and closes it — never argv or environment, which /proc shows to every user — and then
waits on a second pipe for one line from the server: ``ready`` once the store answered and the
FUSE loop is about to serve, or ``error: <message>`` before it exits non-zero.

The second half is the hand-over between the CSI node plugin and ``objfs sidecar`` (the server
that runs inside the consuming pod): see the comment above ``SIDECAR_SOCKET``. What a pod receives
there is worth no more than its own volume (../shared/DESIGN.md, "Trust boundary").
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fusefs.config import MountConfig

READY = "ready"
ERROR_PREFIX = "error:"


# -- launcher side ---------------------------------------------------------------------------
def send_config(fd: int, config: MountConfig) -> None:
    """Write ``config`` to ``fd`` and close it. A server that died first is not an error here:
    its status (or the missing ready line) tells why."""
    view = memoryview(config.to_json().encode())
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


def read_status(fd: int, timeout: float) -> str | None:
    """The server's status line: ``ready``, ``error: ...``, ``""`` if it closed the pipe without
    a word (it died), or None if nothing came within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def error_message(status: str) -> str | None:
    """The message of an ``error: ...`` status line, else None."""
    if status.startswith(ERROR_PREFIX):
        return status[len(ERROR_PREFIX) :].strip()
    return None


# -- server side -----------------------------------------------------------------------------
def receive_config(fd: int) -> MountConfig:
    """Read the whole config from ``fd`` (until the launcher closes it), close it, parse it."""
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return MountConfig.from_json(b"".join(chunks))


class StatusReporter:
    """Sends the one status line; later calls do nothing (only the first word counts)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def ready(self) -> None:
        self._send(READY)

    def error(self, message: str) -> None:
        self._send(f"{ERROR_PREFIX} {message}")

    def _send(self, line: str) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass  # the launcher is gone; nothing to tell
        finally:
            os.close(fd)


# -- node plugin <-> objfs sidecar -------------------------------------------------------------
# The sidecar (``objfs sidecar --dir DIR``, in the consuming pod) listens on DIR/objfs.sock, a
# SOCK_SEQPACKET socket: every message is one datagram, descriptors ride on it (SCM_RIGHTS). Per
# connection the sidecar first sends a hello (JSON ``{"dir": DIR}``: where the emptyDir is in the
# pod's own mount namespace), then the plugin sends one request:
#
# - ``{"op": "serve", "name": N, "fds": ["fuse", "grant"], "config": MountConfig}`` with those
#   descriptors attached, in that order: the mounted /dev/fuse and a connection to the node's data
#   service for this volume's grant (``fusefs.wire.grant``). The config holds no secret, no
#   endpoint and no node path: everything of value stays behind the grant connection. The sidecar
#   answers with one status line (``ready`` once the mount serves, ``error: <message>``), exactly
#   as ``objfs serve`` does on its ready pipe;
# - ``{"op": "regrant", "name": N, "fds": ["grant"]}``: the volume's next grant connection (the node
#   plugin restarted); answered ``ok`` once the volume's server has it, else ``error: ...``;
# - ``{"op": "status", "name": N}``: the sidecar answers ``serving``, ``exited <status>`` or ``unknown``.
SIDECAR_SOCKET = "objfs.sock"
#: written into DIR (by whoever knows the pod's main containers are done) to make a sidecar that
#: kubelet does not stop by itself (not a native sidecar) drain its volumes and exit
EXIT_FILE = "exit"
MAX_MESSAGE = 1 << 20
FD_ROLES = ("fuse", "grant")
SERVING = "serving"
UNKNOWN = "unknown"
OK = "ok"


class ProtocolError(Exception):
    """A malformed hand-over message; the text says what was wrong (never the config)."""


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


@contextlib.contextmanager
def _closed_on_error(fds: Sequence[int]) -> Iterator[None]:
    """Received descriptors are ours: a message refused must not leak them."""
    try:
        yield
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, max_fds)
    with _closed_on_error(fds):
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("hand-over message truncated")
        if not data:
            raise ProtocolError("the peer closed the connection")
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            raise ProtocolError("hand-over message is not JSON") from None
        if not isinstance(message, dict):
            raise ProtocolError("hand-over message is not a JSON object")
    return message, fds


def send_hello(sock: socket.socket, directory: str) -> None:
    _send(sock, {"dir": directory})


def receive_hello(sock: socket.socket) -> str:
    """The sidecar's directory in its own mount namespace."""
    message, _ = _receive(sock)
    directory = message.get("dir")
    if not isinstance(directory, str) or not directory.startswith("/"):
        raise ProtocolError("the sidecar's hello names no absolute directory")
    return directory


@dataclass
class VolumeHandOver:
    """One volume as the sidecar receives it. It owns the descriptors until it closes them."""

    name: str
    config: MountConfig
    fuse_fd: int
    grant_fd: int

    def close(self) -> None:
        for fd in (self.fuse_fd, self.grant_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def send_volume(sock: socket.socket, volume: VolumeHandOver) -> None:
    _send(sock, {"op": "serve", "name": volume.name, "fds": list(FD_ROLES),
                 "config": json.loads(volume.config.to_json())}, [volume.fuse_fd, volume.grant_fd])


def send_regrant(sock: socket.socket, name: str, grant_fd: int) -> None:
    _send(sock, {"op": "regrant", "name": name, "fds": ["grant"]}, [grant_fd])


def send_status_request(sock: socket.socket, name: str) -> None:
    _send(sock, {"op": "status", "name": name})


@dataclass
class Request:
    op: str  # "serve", "regrant" or "status"
    name: str
    volume: VolumeHandOver | None = None  # serve
    grant_fd: int | None = None  # regrant


def receive_request(sock: socket.socket) -> Request:
    """One request. ProtocolError if malformed (its descriptors closed)."""
    message, fds = _receive(sock, len(FD_ROLES))
    with _closed_on_error(fds):
        op, name = message.get("op"), message.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError("hand-over request names no volume")
        if op == "status":
            if fds:
                raise ProtocolError("status request with descriptors")
            return Request(op, name)
        if op == "regrant":
            if message.get("fds") != ["grant"] or len(fds) != 1:
                raise ProtocolError(f"regrant request for {name} must carry exactly one grant connection")
            return Request(op, name, grant_fd=fds[0])
        if op != "serve":
            raise ProtocolError(f"unknown hand-over request {op!r}")
        roles = message.get("fds")
        if roles != list(FD_ROLES) or len(fds) != len(FD_ROLES):
            raise ProtocolError(f"hand-over request for {name} carries descriptors {roles!r}, got {len(fds)}: "
                                "expected the FUSE fd and a grant connection (is the sidecar's image older "
                                "than the node plugin's?)")
        try:
            config = MountConfig.from_json(json.dumps(message.get("config")))
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"mount config of {name} is invalid: {type(exc).__name__}") from None
    return Request(op, name, VolumeHandOver(name, config, fds[0], fds[1]))
