"""The hand-off between whoever mounts and ``objfs serve``: both ends of one small protocol.

The launcher (``objfs mount`` as root, or the CSI node plugin) writes the MountConfig as JSON to
a pipe and closes it — never argv or environment, which /proc shows to every user — and then
waits on a second pipe for one line from the server: ``ready`` once the store answered and the
FUSE loop is about to serve, or ``error: <message>`` before it exits non-zero.
"""

from __future__ import annotations

import os
import select
import time

from .config import MountConfig

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
