"""The client of the node plugin's passthrough broker (``csi/node/broker.py``): an unprivileged server
registers its complete node-cache files as FUSE backing files through it (``fusefs.passthrough.backing``)."""

from __future__ import annotations

import errno
import os
import socket
import struct

_ANSWER = struct.Struct("=i")
TIMEOUT = 10.0  # seconds for one request: a broker that does not answer means the server path


class BrokerClient:
    """A ``fusefs.passthrough.backing.Registrar`` that asks the broker at ``socket_path`` (blocking calls)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def _ask(self, message: bytes, fds: list[int]) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(self.socket_path)
            socket.send_fds(sock, [message], fds)
            answer = b""
            while len(answer) < _ANSWER.size:
                chunk = sock.recv(_ANSWER.size - len(answer))
                if not chunk:
                    raise OSError(errno.EPROTO, "the passthrough broker closed the connection")
                answer += chunk
        value: int = _ANSWER.unpack(answer)[0]
        if value < 0:
            raise OSError(-value, f"the passthrough broker refused: {os.strerror(-value)}")
        return value

    def open(self, fuse_fd: int, file_fd: int) -> int:
        backing_id = self._ask(b"O", [fuse_fd, file_fd])
        if backing_id <= 0:
            raise OSError(errno.EIO, "the passthrough broker returned no backing id")
        return backing_id

    def close(self, fuse_fd: int, backing_id: int) -> None:
        self._ask(b"C" + _ANSWER.pack(backing_id), [fuse_fd])
