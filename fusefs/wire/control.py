"""The control link between the CSI node plugin and the node's data service: both ends.

One SOCK_SEQPACKET socket pair, made by the plugin when it starts the service (the service's end is
an inherited fd: no path anyone else could connect to). Every message is one datagram of JSON,
with descriptors attached where it says so; the plugin sends one request at a time and the service
answers each with one datagram, in order:

- ``{"op": "grant", "id": G, "config": MountConfig}`` + [the service's end of a grant connection]:
  serve that connection for that grant (``fusefs.wire.grant``). The config carries the volume's
  credentials; it is never logged. Answer ``{"ok": true}`` or ``{"error": "..."}``.
- ``{"op": "revoke", "id": G}``: close every connection of grant G (the volume was unpublished).
- ``{"op": "ping"}``: ``{"ok": true}`` once the service is up (its store SDKs imported).

The service exits when the link closes (the plugin is gone; its restart starts a new service and
hands every live sidecar a new grant connection).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from typing import Any

from fusefs.config import MountConfig

MAX_MESSAGE = 1 << 20
TIMEOUT = 30.0  # seconds the plugin waits for an answer: a hung service fails the publish, not the plugin


#: socket buffers of a grant connection: a block (8 MiB) crosses in a few system calls instead of
#: forty at the default 208 KiB, each waking both processes (cold reads through the service)
GRANT_BUFFER = 8 * 1024 * 1024
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux: beyond net.core.[rw]mem_max, for root


def widen(sock: socket.socket, size: int = GRANT_BUFFER) -> None:
    """Large send and receive buffers (forced past the sysctl limit where we may: root)."""
    for forced, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class ControlError(Exception):
    """The data service refused a request or is gone; the text says which."""


# -- the plugin's end (blocking, thread-safe) --------------------------------------------------
class ServiceLink:
    def __init__(self, sock: socket.socket, timeout: float = TIMEOUT) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._lock = threading.Lock()

    def _ask(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode()
        with self._lock:
            try:
                if fds:
                    socket.send_fds(self.sock, [data], fds)
                else:
                    self.sock.send(data)
                answer = self.sock.recv(MAX_MESSAGE)
            except OSError as exc:
                raise ControlError(f"the node's data service did not answer: {exc}") from None
        if not answer:
            raise ControlError("the node's data service is gone")
        try:
            reply = json.loads(answer)
        except ValueError:
            raise ControlError("the node's data service answered garbage") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else None
            raise ControlError(str(error or "the node's data service refused the request"))

    def ping(self) -> None:
        self._ask({"op": "ping"})

    def grant(self, grant_id: str, config: MountConfig) -> socket.socket:
        """A connection for ``grant_id``: its other end is served by the data service."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            widen(end)
        try:
            self._ask({"op": "grant", "id": grant_id, "config": json.loads(config.to_json())}, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def revoke(self, grant_id: str) -> None:
        self._ask({"op": "revoke", "id": grant_id})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the service's end ---------------------------------------------------------------------------
def parse(data: bytes, fds: list[int]) -> tuple[str, str, MountConfig | None, int | None]:
    """(op, grant id, config, connection fd) of one request; ValueError if malformed (fds closed)."""
    try:
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        op = message.get("op")
        if op == "ping":
            if fds:
                raise ValueError("ping with descriptors")
            return "ping", "", None, None
        grant_id = message.get("id")
        if not isinstance(grant_id, str) or not grant_id:
            raise ValueError("no grant id")
        if op == "revoke":
            if fds:
                raise ValueError("revoke with descriptors")
            return "revoke", grant_id, None, None
        if op != "grant" or len(fds) != 1:
            raise ValueError(f"unknown request {op!r} or wrong descriptors")
        config = MountConfig.from_json(json.dumps(message.get("config")))
        return "grant", grant_id, config, fds[0]
    except (ValueError, TypeError) as exc:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"malformed control request: {type(exc).__name__}: {exc}"[:300]) from None
