"""``objfs zygote``: a process that has imported everything once and forks ``objfs serve``s.

Why: a Python ``objfs serve`` started from scratch spends a good part of a second of CPU before it
serves (importing pyfuse3, trio and the filesystem). When
twenty pods land on a 2-core node at once, their mounts then take seconds to appear. A fork of a
process that has done all that starts in milliseconds, and the servers share those pages
copy-on-write.

The launcher (the CSI node plugin) starts one zygote, already as the unprivileged server uid,
and asks it for one server at a time over a socket (the protocol: ``fusefs.wire.zygote``).

The child runs exactly what ``objfs serve --config-fd --fuse-fd --ready-fd`` runs, so the
hand-off protocol (``fusefs.wire.handoff``) is unchanged: the config travels over a pipe, never through
the zygote's messages (it holds no secret: those stay with the data service). The child starts
its own session, so servers outlive the zygote and the plugin. The zygote exits when the launcher's end closes.

The zygote must stay single-threaded: fork() copies only the calling thread, and a lock held by
another thread at that moment would stay held in the child forever.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
from typing import NoReturn

from fusefs.proc.fork import preload, run_child
from fusefs.wire import zygote as wire
from fusefs.wire.fds import close_all

log = logging.getLogger(__name__)


def run(sock_fd: int) -> int:
    """Serve start requests on the inherited socket until the launcher hangs up."""
    sock = socket.socket(fileno=sock_fd)
    preload()
    signal.signal(signal.SIGCHLD, _reap)
    wire.send_ready(sock)
    while True:
        try:
            fds = wire.receive_request(sock)
        except wire.MalformedRequest as exc:
            wire.answer_error(sock, str(exc))
            continue
        if fds is None:
            return 0  # the launcher is gone; the servers we started live on
        try:
            pid = os.fork()
        except OSError as exc:
            close_all(list(fds))
            wire.answer_error(sock, f"fork failed: {exc.strerror}")
            continue
        if pid == 0:
            _child(sock, fds)  # never returns
        close_all(list(fds))
        wire.answer_pid(sock, pid)


def _child(sock: socket.socket, fds: wire.ServerFds) -> NoReturn:
    def body() -> int:
        sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        random.seed()  # every child would otherwise draw the same retry jitter
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(fds.log, 1)
        os.dup2(fds.log, 2)
        os.close(fds.log)
        from fusefs.proc.serve import serve_fds

        return serve_fds(fds.config, fds.fuse, fds.ready, None, fds.grant, fds.regrant)

    run_child(body)


def _reap(signum: int, frame: object) -> None:
    """Collect exited servers at once: the launcher tells a live server by its /proc entry, and
    a zombie's would linger."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
