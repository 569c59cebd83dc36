"""The sidecar hand-over (``fusefs.wire.handoff``, second half): the datagrams between the node
plugin (``csi.node.launcher.SidecarLauncher``) and ``objfs sidecar`` in the pod.

Sidecars keep running in their pods while the node plugin is upgraded, so every datagram is
pinned: built here by hand, checked against what each end sends and accepted by the other end.
One connection: the sidecar's hello ``{"dir": DIR}``, one request (``serve`` with the FUSE fd
and the grant connection, ``regrant`` with a grant connection, ``status``), one answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from csi.node.launcher import EMPTY_DIR_NAME, NO_SIDECAR, ServerStartError, SidecarLauncher
from fusefs.wire import handoff
from tests.wire.test_serve_pipe import CONFIG_FIELDS, ENV, server_config


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def datagram(sock: socket.socket, max_fds: int = 4) -> tuple[bytes, list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, 1 << 20, max_fds)
    assert flags == 0
    return data, fds


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


SERVE: dict[str, object] = {"op": "serve", "name": "vol-a", "fds": ["fuse", "grant"], "config": CONFIG_FIELDS}
REGRANT: dict[str, object] = {"op": "regrant", "name": "vol-a", "fds": ["grant"]}
STATUS: dict[str, object] = {"op": "status", "name": "vol-a"}


def pinned(message: Mapping[str, object]) -> bytes:
    """json.dumps' default separators, in the order the keys are written above."""
    return json.dumps(message).encode()


def test_constants() -> None:
    assert (handoff.SIDECAR_SOCKET, handoff.EXIT_FILE, handoff.FD_ROLES) == ("objfs.sock", "exit", ("fuse", "grant"))
    assert (handoff.SERVING, handoff.UNKNOWN, handoff.OK, handoff.MAX_MESSAGE) == ("serving", "unknown", "ok", 1 << 20)


def test_the_sidecars_hello() -> None:
    a, b = seqpacket_pair()
    with a, b:
        handoff.send_hello(a, "/objfs-tmp")
        assert datagram(b) == (b'{"dir": "/objfs-tmp"}', [])
        b.send(b'{"dir": "/objfs-tmp"}')
        assert handoff.receive_hello(a) == "/objfs-tmp"
        for bad in (b'{"dir": "relative"}', b'{"dir": 5}', b"[]", b"not json"):
            b.send(bad)
            with pytest.raises(handoff.ProtocolError):
                handoff.receive_hello(a)


def test_a_serve_request_both_ways() -> None:
    a, b = seqpacket_pair()
    fuse_r, fuse_w = os.pipe()  # any two descriptors stand for the FUSE fd and the grant connection
    grant_a, grant_b = socket.socketpair()
    with a, b, grant_a, grant_b:
        handoff.send_volume(a, handoff.VolumeHandOver("vol-a", server_config(), fuse_r, grant_a.fileno()))
        data, fds = datagram(b)
        assert data == pinned(SERVE) and len(fds) == 2
        assert same_file(fds[0], fuse_r) and same_file(fds[1], grant_a.fileno())
        close(fds)

        socket.send_fds(a, [pinned(SERVE)], [fuse_r, grant_a.fileno()])
        request = handoff.receive_request(b)
        assert (request.op, request.name, request.grant_fd) == ("serve", "vol-a", None)
        assert request.volume is not None and request.volume.config == server_config()
        assert same_file(request.volume.fuse_fd, fuse_r) and same_file(request.volume.grant_fd, grant_a.fileno())
        request.volume.close()
    close([fuse_r, fuse_w])


def test_a_regrant_and_a_status_request_both_ways() -> None:
    a, b = seqpacket_pair()
    grant_a, grant_b = socket.socketpair()
    with a, b, grant_a, grant_b:
        handoff.send_regrant(a, "vol-a", grant_a.fileno())
        data, fds = datagram(b)
        assert data == pinned(REGRANT) and len(fds) == 1 and same_file(fds[0], grant_a.fileno())
        close(fds)
        handoff.send_status_request(a, "vol-a")
        assert datagram(b) == (pinned(STATUS), [])

        socket.send_fds(a, [pinned(REGRANT)], [grant_a.fileno()])
        request = handoff.receive_request(b)
        assert (request.op, request.name, request.volume) == ("regrant", "vol-a", None)
        assert request.grant_fd is not None and same_file(request.grant_fd, grant_a.fileno())
        os.close(request.grant_fd)
        a.send(pinned(STATUS))
        request = handoff.receive_request(b)
        assert (request.op, request.name, request.volume, request.grant_fd) == ("status", "vol-a", None, None)


def test_malformed_requests_are_refused_and_their_descriptors_closed() -> None:
    a, b = seqpacket_pair()
    r, w = os.pipe()
    open_before = len(os.listdir("/proc/self/fd"))
    with a, b:
        for message, nfds in (({**SERVE, "fds": ["fuse"]}, 1), (SERVE, 1), ({**SERVE, "config": {"bucket": ""}}, 2),
                              ({**REGRANT, "fds": ["fuse"]}, 1), (REGRANT, 0), (STATUS, 1),
                              ({"op": "mount", "name": "v"}, 0), ({"op": "status", "name": ""}, 0)):
            socket.send_fds(a, [pinned(message)], [r] * nfds) if nfds else a.send(pinned(message))
            with pytest.raises(handoff.ProtocolError):
                handoff.receive_request(b)
        assert len(os.listdir("/proc/self/fd")) == open_before  # what came with them is closed
    close([r, w])


# -- the two ends as they run ----------------------------------------------------------------------
@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[Path]:
    """A real ``objfs sidecar --dir DIR`` (no volume handed to it: it answers what it can)."""
    directory = tmp_path / "pod"
    directory.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "fusefs.proc.cli", "sidecar", "--dir", str(directory)], env=ENV,
                            cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield directory
    finally:
        proc.terminate()
        assert proc.wait(30) == 0  # no volume: it leaves at once


def connect(directory: Path) -> socket.socket:
    """A connection to the sidecar at ``directory`` (waiting for it to listen: it imports first)."""
    path = directory / handoff.SIDECAR_SOCKET
    for _ in range(600):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(str(path))
            sock.settimeout(30)
            return sock
        except OSError:
            sock.close()
            threading.Event().wait(0.1)
    raise AssertionError(f"the sidecar never listened on {path}")


def test_objfs_sidecar_greets_and_answers_in_the_pinned_words(sidecar: Path) -> None:
    def ask(message: bytes, fds: list[int] = ()) -> bytes:  # type: ignore[assignment]
        with connect(sidecar) as sock:
            assert datagram(sock) == (json.dumps({"dir": str(sidecar)}).encode(), [])
            socket.send_fds(sock, [message], fds) if fds else sock.send(message)
            return sock.recv(4096)

    assert ask(pinned(STATUS)) == b"unknown"
    grant_a, grant_b = socket.socketpair()
    with grant_a, grant_b:
        assert ask(pinned(REGRANT), [grant_a.fileno()]) == b"error: volume vol-a is not served here"
        assert ask(pinned({**SERVE, "fds": ["fuse"]}), [grant_a.fileno()]).startswith(
            b"error: hand-over request for vol-a carries descriptors ['fuse'], got 1: ")
    assert ask(b"not json") == b"error: hand-over message is not JSON"


def fake_sidecar(kubelet_root: Path, pod_uid: str, answer: Callable[[bytes, list[int]], bytes]
                 ) -> tuple[threading.Thread, list[tuple[bytes, int]]]:
    """A sidecar written by hand: it greets, records the request (bytes, number of fds) and answers."""
    directory = kubelet_root / "pods" / pod_uid / "volumes" / "kubernetes.io~empty-dir" / EMPTY_DIR_NAME
    directory.mkdir(parents=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        listener.bind(f"/proc/self/fd/{dirfd}/{handoff.SIDECAR_SOCKET}")  # the path is longer than 108 bytes
    finally:
        os.close(dirfd)
    listener.listen(1)
    seen: list[tuple[bytes, int]] = []

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.send(b'{"dir": "/objfs-tmp"}')
                data, fds = datagram(conn)
                seen.append((data, len(fds)))
                conn.send(answer(data, fds))
                close(fds)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, seen


def test_the_plugin_hands_a_volume_over_in_the_pinned_datagram(tmp_path: Path) -> None:
    thread, seen = fake_sidecar(tmp_path, "pod-1", lambda data, fds: b"ready\n")
    launcher = SidecarLauncher(str(tmp_path), ready_timeout=30, sync_wait=30)
    outcomes: list[tuple[str, str | None]] = []
    grant_a, grant_b = socket.socketpair()
    fuse = os.open(os.devnull, os.O_RDONLY)
    with grant_b:
        served = launcher.publish(str(tmp_path / "target"), "vol-a", "pod-1", server_config(), fuse, grant_a,
                                  lambda target, error: outcomes.append((target, error)))
    os.close(fuse)
    thread.join(30)
    assert served and seen == [(pinned(SERVE), 2)] and outcomes == []


def test_the_plugin_reads_a_refusal_written_by_hand(tmp_path: Path) -> None:
    thread, _ = fake_sidecar(tmp_path, "pod-1", lambda data, fds: b"error: volume vol-a is already served\n")
    launcher = SidecarLauncher(str(tmp_path), ready_timeout=30, sync_wait=30)
    grant_a, grant_b = socket.socketpair()
    fuse = os.open(os.devnull, os.O_RDONLY)
    with grant_b, pytest.raises(ServerStartError, match=r"^volume vol-a is already served$"):
        launcher.publish(str(tmp_path / "target"), "vol-a", "pod-1", server_config(), fuse, grant_a,
                         lambda target, error: None)
    os.close(fuse)
    thread.join(30)


def test_the_plugin_regrants_and_asks_status_in_the_pinned_datagrams(tmp_path: Path) -> None:
    launcher = SidecarLauncher(str(tmp_path))
    thread, seen = fake_sidecar(tmp_path, "pod-1", lambda data, fds: b"ok")
    grant_a, grant_b = socket.socketpair()
    with grant_a, grant_b:
        assert launcher.regrant("pod-1", "vol-a", grant_a)
    thread.join(30)
    assert seen == [(pinned(REGRANT), 1)]
    for pod, (answer, expected) in enumerate(((b"serving", "serving"), (b"exited status 0", "exited status 0"),
                                              (b"", NO_SIDECAR)), start=2):
        thread, seen = fake_sidecar(tmp_path, f"pod-{pod}", lambda data, fds, a=answer: a)  # type: ignore[misc]
        assert launcher.status(f"pod-{pod}", "vol-a") == expected
        thread.join(30)
        assert seen == [(pinned(STATUS), 0)]
    thread, _ = fake_sidecar(tmp_path, "pod-5", lambda data, fds: b"error: volume vol-a is not served here")
    grant_a, grant_b = socket.socketpair()
    with grant_a, grant_b:
        assert not launcher.regrant("pod-5", "vol-a", grant_a)
    thread.join(30)
