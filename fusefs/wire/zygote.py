"""The zygote protocol: both ends of the socket between the node plugin (``csi.node.zygote_client``)
and ``objfs zygote`` (``fusefs.proc.zygote``), which forks ``objfs serve``s on request.

One SOCK_SEQPACKET socket pair, one datagram per message:

- the zygote greets once with ``ready`` when it has imported everything;
- a request is ``start`` with six descriptors attached (SCM_RIGHTS), in the order of ``ServerFds``:
  the config pipe's read end, the mounted /dev/fuse, the ready pipe's write end, the server's log
  file, its grant connection to the node's data service and the socket it takes the next one on
  (``fusefs.wire.regrant``);
- the answer is ``pid <n>``, or ``error <message>``.

The config travels over the serve pipe (``fusefs.wire.handoff``), never through these messages.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from fusefs.wire.fds import close_all

READY = b"ready"
START = b"start"
FDS_PER_SERVER = 6
MAX_MESSAGE = 4096
_PID = b"pid "
_ERROR = b"error "


class ServerFds(NamedTuple):
    """What a forked server inherits, in the order they travel."""

    config: int  # read end of the serve pipe's config half
    fuse: int  # the mounted /dev/fuse
    ready: int  # write end of the serve pipe's status half
    log: int  # becomes the server's stdout and stderr
    grant: int  # its connection to the node's data service
    regrant: int  # where it takes the next one


class MalformedRequest(Exception):
    """A request that is not ``start`` with six descriptors (those are closed)."""


class ZygoteGone(Exception):
    """The zygote hung up, or answered neither ``pid`` nor ``error``."""


# -- the plugin's end --------------------------------------------------------------------------
def wait_ready(sock: socket.socket) -> bool:
    """Whether the zygote greeted (within the socket's timeout)."""
    try:
        return sock.recv(MAX_MESSAGE) == READY
    except OSError:
        return False


def request_server(sock: socket.socket, fds: tuple[int, int, int, int, int, int]) -> int | str:
    """Ask for one server: its pid, or the zygote's error message (nothing was started then).
    OSError if the socket failed, ZygoteGone if the zygote hung up (whether it forked is unknown)."""
    socket.send_fds(sock, [START], list(fds))
    reply = sock.recv(MAX_MESSAGE)
    if reply.startswith(_PID):
        return int(reply[len(_PID) :])
    if reply.startswith(_ERROR):
        return reply[len(_ERROR) :].decode(errors="replace")
    raise ZygoteGone("objfs zygote exited during a request (see its log)")


# -- the zygote's end --------------------------------------------------------------------------
def send_ready(sock: socket.socket) -> None:
    sock.send(READY)


def receive_request(sock: socket.socket) -> ServerFds | None:
    """The next request's descriptors, or None once the plugin hung up. MalformedRequest (its
    descriptors closed) for anything else."""
    msg, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, FDS_PER_SERVER)
    if not msg:
        close_all(fds)
        return None
    if msg != START or len(fds) != FDS_PER_SERVER:
        close_all(fds)
        raise MalformedRequest("malformed request to objfs zygote")
    return ServerFds(*fds)


def answer_pid(sock: socket.socket, pid: int) -> None:
    sock.send(_PID + str(pid).encode())


def answer_error(sock: socket.socket, message: str) -> None:
    sock.send(_ERROR + message.encode())
