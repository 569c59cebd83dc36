"""The zygote protocol: the datagrams between the node plugin (``csi.node.zygote_client.Zygote``) and
``objfs zygote``, on one SOCK_SEQPACKET socket pair.

The zygote greets with ``ready``; each request is ``start`` with six descriptors (config pipe,
/dev/fuse, ready pipe, log, grant connection, regrant socket, in that order); each answer is
``pid <n>`` or ``error <message>``. Both ends run here against datagrams written by hand."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.node.zygote_client import Zygote
from tests.wire.test_serve_pipe import ENV

FAKE_ZYGOTE = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--socket-fd") + 1]))
record = open(sys.argv[1], "w")
sock.send(b"ready")
for answer in sys.argv[2:sys.argv.index("zygote")]:
    msg, fds, _, _ = socket.recv_fds(sock, 4096, 8)
    record.write(f"{msg!r} {len(fds)}\\n")
    record.flush()
    sock.send(answer.encode())
sock.recv(4096)  # until the plugin hangs up
"""


def fake_zygote(tmp_path: Path, *answers: str) -> tuple[Zygote, Path]:
    script, record = tmp_path / "fake_zygote.py", tmp_path / "requests"
    script.write_text(FAKE_ZYGOTE)
    return Zygote([sys.executable, str(script), str(record), *answers], ENV, str(tmp_path / "zygote.log")), record


def six_fds() -> tuple[int, int, int, int, int, int]:
    fd = os.open(os.devnull, os.O_RDONLY)
    return (fd,) * 6  # type: ignore[return-value]


def test_the_plugin_sends_start_with_six_fds_and_reads_pid_and_error_answers(tmp_path: Path) -> None:
    zygote, record = fake_zygote(tmp_path, "pid 4242", "error cannot fork")
    fds = six_fds()
    try:
        assert zygote.start(fds) == 4242
        assert zygote.start(fds) is None  # an error answer: the caller starts the server itself
    finally:
        zygote.close()
        os.close(fds[0])
    assert record.read_text() == "b'start' 6\nb'start' 6\n"


def test_a_zygote_that_greets_otherwise_is_not_used(tmp_path: Path) -> None:
    script = tmp_path / "mute.py"
    script.write_text("import socket, sys\n"
                      "socket.socket(fileno=int(sys.argv[sys.argv.index('--socket-fd') + 1])).send(b'hello')\n")
    zygote = Zygote([sys.executable, str(script)], ENV, str(tmp_path / "zygote.log"))
    try:
        assert not zygote.ensure()
    finally:
        zygote.close()


@pytest.fixture
def objfs_zygote() -> Iterator[socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, "-m", "fusefs.proc.cli", "zygote", "--socket-fd", str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), env=ENV, cwd="/", stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    theirs.close()
    ours.settimeout(60)
    try:
        yield ours
    finally:
        ours.close()
        assert proc.wait(30) == 0  # the plugin hung up: the zygote leaves


def test_objfs_zygote_greets_forks_on_start_and_refuses_anything_else(objfs_zygote: socket.socket,
                                                                      tmp_path: Path) -> None:
    sock = objfs_zygote
    assert sock.recv(4096) == b"ready"
    null = os.open(os.devnull, os.O_RDONLY)
    for word, nfds in ((b"start", 5), (b"begin", 6), (b"start", 0)):
        socket.send_fds(sock, [word], [null] * nfds) if nfds else sock.send(word)
        assert sock.recv(4096) == b"error malformed request to objfs zygote"

    cfg_r, cfg_w = os.pipe()
    ready_r, ready_w = os.pipe()
    log = os.open(tmp_path / "server.log", os.O_WRONLY | os.O_CREAT, 0o600)
    socket.send_fds(sock, [b"start"], [cfg_r, null, ready_w, log, null, null])
    answer = sock.recv(4096)
    assert re.fullmatch(rb"pid [1-9][0-9]*", answer), answer
    for fd in (cfg_r, ready_w, log, null):
        os.close(fd)
    os.write(cfg_w, b"{not json")  # the child runs objfs serve: it answers on the ready pipe
    os.close(cfg_w)
    status = b""
    while chunk := os.read(ready_r, 4096):
        status += chunk
    os.close(ready_r)
    assert status.startswith(b"error: unreadable mount config: ") and status.endswith(b"\n")
