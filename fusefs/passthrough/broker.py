"""The passthrough broker's protocol, both ends, and its client: an unprivileged data service
registers complete node-cache files as FUSE backing files through the node plugin's broker
(``csi.node.broker``, which keeps the privileged serving loop and the ioctl), as a
``fusefs.passthrough.backing.Registrar``.

One request per SOCK_STREAM connection, descriptors attached (SCM_RIGHTS):

- ``O`` with fds [/dev/fuse, file]: register ``file`` as a backing file on that FUSE connection;
- ``C`` + the backing id (native i32) with fds [/dev/fuse]: unregister it.

The answer is one native i32: the backing id (open), 0 (close), or -errno (refused or failed).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

OPEN = b"O"
CLOSE = b"C"
REQUEST_SIZE = 16  # the longest request is 5 bytes
MAX_FDS = 2
_I32 = struct.Struct("=i")
ANSWER_SIZE = _I32.size
TIMEOUT = 10.0  # seconds for one request: a broker that does not answer means the server path


# -- the client's end ----------------------------------------------------------------------------
def open_request() -> bytes:
    return OPEN


def close_request(backing_id: int) -> bytes:
    return CLOSE + _I32.pack(backing_id)


def decode_answer(answer: bytes) -> int:
    """The backing id (or 0); OSError with the broker's errno if it refused."""
    value: int = _I32.unpack(answer)[0]
    if value < 0:
        raise OSError(-value, f"the passthrough broker refused: {os.strerror(-value)}")
    return value


# -- the broker's end ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    op: bytes  # OPEN (fds: fuse, file) or CLOSE (fds: fuse)
    backing_id: int = 0  # CLOSE


def decode_request(msg: bytes, nfds: int) -> Request | None:
    """The request in ``msg`` that came with ``nfds`` descriptors, or None if it is malformed."""
    if msg[:1] == OPEN and nfds == 2:
        return Request(OPEN)
    if msg[:1] == CLOSE and len(msg) == 1 + _I32.size and nfds == 1:
        return Request(CLOSE, _I32.unpack(msg[1:])[0])
    return None


def encode_answer(value: int) -> bytes:
    return _I32.pack(value)


# -- the client ------------------------------------------------------------------------------------
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
            while len(answer) < ANSWER_SIZE:
                chunk = sock.recv(ANSWER_SIZE - len(answer))
                if not chunk:
                    raise OSError(errno.EPROTO, "the passthrough broker closed the connection")
                answer += chunk
        return decode_answer(answer)

    def open(self, fuse_fd: int, file_fd: int) -> int:
        backing_id = self._ask(open_request(), [fuse_fd, file_fd])
        if backing_id <= 0:
            raise OSError(errno.EIO, "the passthrough broker returned no backing id")
        return backing_id

    def close(self, fuse_fd: int, backing_id: int) -> None:
        self._ask(close_request(backing_id), [fuse_fd])
