"""Starting ``objfs serve``: the launching end of the serve pipe (``fusefs.wire.handoff``), one
helper for ``objfs mount`` (``fusefs.proc.mount``) and the CSI node plugin (``csi.node.launcher``).

The contract: ``objfs serve --config-fd N [--fuse-fd M] --ready-fd K [--mountpoint P]
[--grant-fd G] [--regrant-fd R] [--service-link-fd L] [--debug]``. The server reads its
MountConfig as JSON from N until EOF, serves the mounted /dev/fuse M (or mounts P itself), and
writes ``ready`` or ``error: <message>`` to K. Whoever starts it (a fresh process, or a fork of
``objfs zygote``) hands it the server's ends of ``ServePipes``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from fusefs.config import MountConfig
from fusefs.wire import handoff


def serve_command(command: Sequence[str], config_fd: int, ready_fd: int, *, fuse_fd: int | None = None,
                  mountpoint: str | None = None, grant_fd: int | None = None, regrant_fd: int | None = None,
                  service_link_fd: int | None = None, debug: bool = False) -> tuple[list[str], list[int]]:
    """The argv of ``objfs serve`` (``command`` runs ``objfs``) and the descriptors it inherits."""
    argv = [*command, "serve", "--config-fd", str(config_fd)]
    fds = [config_fd]
    for flag, fd in (("--fuse-fd", fuse_fd), ("--ready-fd", ready_fd), ("--grant-fd", grant_fd),
                     ("--regrant-fd", regrant_fd), ("--service-link-fd", service_link_fd)):
        if fd is not None:
            argv += [flag, str(fd)]
            fds.append(fd)
    if mountpoint is not None:
        argv += ["--mountpoint", mountpoint]
    if debug:
        argv.append("--debug")
    return argv, fds


class ServePipes:
    """The two pipes of one server start: the config goes out on one, the status line comes back
    on the other. ``config_r`` and ``ready_w`` are the server's ends."""

    def __init__(self) -> None:
        self.config_r, self._config_w = os.pipe()
        self._ready_r, self.ready_w = os.pipe()
        self._open = [self.config_r, self._config_w, self._ready_r, self.ready_w]

    def started(self) -> None:
        """The server holds its copies of its ends now: ours go (so its death is an EOF here)."""
        self._close(self.config_r, self.ready_w)

    def hand_over(self, config: MountConfig, timeout: float) -> str | None:
        """Send ``config`` and wait for the status line (``handoff.read_status``)."""
        self._open.remove(self._config_w)
        handoff.send_config(self._config_w, config)  # closes it
        try:
            return handoff.read_status(self._ready_r, timeout)
        finally:
            self._close(self._ready_r)

    def close(self) -> None:
        """Whatever is still open (a start that failed half-way)."""
        self._close(*self._open)

    def _close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self._open:
                self._open.remove(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
