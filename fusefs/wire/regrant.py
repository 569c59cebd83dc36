"""Handing a running FUSE server its next grant connection: both ends.

When the node plugin (and with it the data service) restarts, every live server's grant
connection breaks; its store requests wait (``fusefs.wire.grant.RECONNECT_WAIT``). The restarted
plugin makes a new connection per grant from its records and hands it to the server here:

- a pod's server: through its sidecar (``fusefs.wire.handoff``, op ``regrant``), which forwards it to the
  volume's child over a socket pair made when the child was forked;
- a server the plugin started (``objfs serve``): through a SOCK_SEQPACKET socket it listens on,
  made and bound by the plugin in its root-only state directory and inherited by the server; only
  root (the plugin) may hand over connections there.

Each handed-over connection is one datagram ``b"grant"`` with the socket attached (SCM_RIGHTS).
Nothing else is accepted: a datagram with another word, no descriptor or anything but a socket is
dropped (its descriptors closed).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
from collections.abc import Callable

import trio

from fusefs.wire.fds import recv_with_fds

log = logging.getLogger(__name__)

WORD = b"grant"


def send_grant(channel: socket.socket, conn: socket.socket) -> None:
    """Hand ``conn`` over (blocking). The caller closes its copy afterwards."""
    send_grant_fd(channel, conn.fileno())


def send_grant_fd(channel: socket.socket, fd: int) -> None:
    """``send_grant`` for a connection held as a bare descriptor (the sidecar forwarding one)."""
    socket.send_fds(channel, [WORD], [fd])


def _socket_of(msg: bytes, fds: list[int]) -> socket.socket | None:
    if msg != WORD or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None
    try:
        if stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
            return socket.socket(fileno=fds[0])
    except OSError:
        pass
    os.close(fds[0])
    return None


async def _take(sock: trio.socket.SocketType, replace: Callable[[socket.socket], None]) -> None:
    """Receive grant connections on one connected channel until it closes."""
    while True:
        try:
            data, fds = await recv_with_fds(sock, 64)
        except OSError as exc:
            log.warning("dropped a grant hand-over: %s", exc)
            continue
        if not data and not fds:
            return
        conn = _socket_of(data, fds)
        if conn is None:
            log.warning("dropped a malformed grant hand-over")
            continue
        log.info("a new grant connection arrived")
        replace(conn)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


async def receive_grants(channel: socket.socket, replace: Callable[[socket.socket], None]) -> None:
    """Serve ``channel`` (listening: accept root's connections; connected: read it) for the
    server's lifetime, calling ``replace`` with every new grant connection."""
    channel.setblocking(False)
    listening = bool(channel.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    sock = trio.socket.from_stdlib_socket(channel)
    if not listening:
        await _take(sock, replace)
        return
    while True:
        conn, _ = await sock.accept()
        with conn:
            if _peer_uid(conn) != 0:  # type: ignore[arg-type]
                log.warning("refused a grant hand-over from a process that is not the node plugin")
                continue
            with trio.move_on_after(10):
                await _take(conn, replace)
