"""``objfs zygote``: a process that has imported everything once and forks ``objfs serve``s.

Why: a Python ``objfs serve`` started from scratch spends a good part of a second of CPU before it
serves (importing pyfuse3, trio and the filesystem). When
twenty pods land on a 2-core node at once, their mounts then take seconds to appear. A fork of a
process that has done all that starts in milliseconds, and the servers share those pages
copy-on-write.

The launcher (the CSI node plugin) starts one zygote, already as the unprivileged server uid,
and talks to it over a SOCK_SEQPACKET socket, one exchange per server:

- request: ``start`` with six descriptors attached (SCM_RIGHTS): the config pipe's read end,
  the mounted /dev/fuse, the ready pipe's write end, the server's log file, its grant connection
  to the node's data service and the socket it takes the next one on (``fusefs.wire.regrant``);
- reply: ``pid <n>``, or ``error <message>``.

The child runs exactly what ``objfs serve --config-fd --fuse-fd --ready-fd`` runs, so the
hand-off protocol (``fusefs.wire.handoff``) is unchanged: the config travels over a pipe, never through
the zygote's messages (it holds no secret: those stay with the data service). The child starts
its own session, so servers outlive the zygote and the plugin. The zygote exits when the launcher's end closes.

The zygote must stay single-threaded: fork() copies only the calling thread, and a lock held by
another thread at that moment would stay held in the child forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

log = logging.getLogger(__name__)

START = b"start"
READY = b"ready"
FDS_PER_SERVER = 6
MAX_MESSAGE = 4096


def preload() -> None:
    """Import what every server needs. No store SDK: servers forked here (and a pod's sidecar) get
    their data through the node's data service, and every pod would pay boto3's memory for nothing."""
    from fusefs.proc import serve  # noqa: F401  (pyfuse3, trio, the operations, the grant client)


def run(sock_fd: int) -> int:
    """Serve start requests on the inherited socket until the launcher hangs up."""
    sock = socket.socket(fileno=sock_fd)
    preload()
    signal.signal(signal.SIGCHLD, _reap)
    sock.send(READY)
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, FDS_PER_SERVER)
        if not msg:
            _close(fds)
            return 0  # the launcher is gone; the servers we started live on
        if msg != START or len(fds) != FDS_PER_SERVER:
            _close(fds)
            sock.send(b"error malformed request to objfs zygote")
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            _close(fds)
            sock.send(f"error fork failed: {exc.strerror}".encode())
            continue
        if pid == 0:
            _child(sock, fds)  # never returns
        _close(fds)
        sock.send(f"pid {pid}".encode())


def run_child(body: Callable[[], int]) -> NoReturn:
    """The end of a forked child: run ``body`` and leave with its status, whatever happens (a
    forked child must never return into its parent's loop, nor run its parent's exit handlers)."""
    rc = 1
    try:
        rc = body()
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)


def _child(sock: socket.socket, fds: list[int]) -> NoReturn:
    def body() -> int:
        sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        random.seed()  # every child would otherwise draw the same retry jitter
        config_fd, fuse_fd, ready_fd, log_fd, grant_fd, regrant_fd = fds
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        from fusefs.proc.cli import serve

        return serve(config_fd, fuse_fd, ready_fd, None, grant_fd, regrant_fd)

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


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
