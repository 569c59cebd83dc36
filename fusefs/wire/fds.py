"""Descriptors over unix sockets (SCM_RIGHTS) for trio code: the one receive helper every
protocol here uses, so none of them can forget to close what it did not ask for."""

from __future__ import annotations

import array
import contextlib
import os
import socket

import trio

MAX_FDS = 4


async def recv_with_fds(sock: trio.socket.SocketType, size: int, max_fds: int = MAX_FDS
                        ) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it. A truncated message (or descriptor
    list) raises OSError with every received descriptor closed."""
    data, ancdata, flags, _ = await sock.recvmsg(size, socket.CMSG_SPACE(max_fds * 4))
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_all(fds)
        raise OSError("message or its descriptors truncated")
    return data, fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
