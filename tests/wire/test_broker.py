"""The passthrough broker protocol: the bytes between the data service's client
(``fusefs.passthrough.broker.BrokerClient``) and the node plugin's broker (``csi.node.broker``).

One request per SOCK_STREAM connection: ``O`` with fds [/dev/fuse, file] (register a backing
file), or ``C`` and the backing id as a native i32 with fds [/dev/fuse] (unregister it). The
answer is one native i32: the backing id, 0 after a close, or -errno. Both ends run here against
bytes written by hand."""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi.node.broker import Broker
from fusefs.passthrough.broker import BrokerClient


def i32(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder, signed=True)


def fake_broker(path: Path, answers: list[bytes]) -> tuple[threading.Thread, list[tuple[bytes, int]]]:
    """A broker written by hand: per connection it records (request, number of fds) and answers."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(len(answers))
    seen: list[tuple[bytes, int]] = []

    def serve() -> None:
        with listener:
            for answer in answers:
                conn, _ = listener.accept()
                with conn:
                    msg, fds, _, _ = socket.recv_fds(conn, 16, 4)
                    seen.append((msg, len(fds)))
                    for fd in fds:
                        os.close(fd)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, seen


def test_the_client_sends_the_pinned_requests_and_reads_the_answers(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    thread, seen = fake_broker(path, [i32(7), i32(0), i32(-errno.EACCES), i32(0)])
    client = BrokerClient(str(path))
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        assert client.open(null, null) == 7
        client.close(null, 7)
        with pytest.raises(OSError) as refused:
            client.open(null, null)
        assert refused.value.errno == errno.EACCES
        with pytest.raises(OSError) as no_id:
            client.open(null, null)  # 0 is no backing id
        assert no_id.value.errno == errno.EIO
    finally:
        os.close(null)
    thread.join(30)
    assert seen == [(b"O", 2), (b"C" + i32(7), 1), (b"O", 2), (b"O", 2)]


def test_the_client_reads_an_answer_that_comes_in_pieces(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                _msg, fds, _, _ = socket.recv_fds(conn, 16, 4)
                for fd in fds:
                    os.close(fd)
                for byte in i32(300):
                    conn.sendall(bytes([byte]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        assert BrokerClient(str(path)).open(null, null) == 300
    finally:
        os.close(null)
    thread.join(30)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "cache" / "objects").mkdir(parents=True)
    b = Broker(str(tmp_path / "plugin"), str(tmp_path / "cache"), client_uid=65534)
    yield b
    b.close()


def ask(broker: Broker, message: bytes, fds: list[int]) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(broker.path)
        socket.send_fds(sock, [message], fds) if fds else sock.send(message)
        answer = b""
        while chunk := sock.recv(16):
            answer += chunk
    return answer


def with_fds(paths: list[tuple[str, int]], body: Callable[[list[int]], bytes]) -> bytes:
    fds = [os.open(p, flags) for p, flags in paths]
    try:
        return body(fds)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root")
def test_the_broker_answers_hand_written_requests_with_one_i32(broker: Broker, tmp_path: Path) -> None:
    assert broker.path == str(tmp_path / "plugin" / "broker.sock")
    cached = tmp_path / "cache" / "objects" / "ab.obj"
    cached.write_bytes(b"x")
    cached.chmod(0o444)
    outside = tmp_path / "other.obj"
    outside.write_bytes(b"x")
    outside.chmod(0o444)
    fuse, null = ("/dev/fuse", os.O_RDWR), (os.devnull, os.O_RDONLY)

    assert ask(broker, b"X", []) == i32(-errno.EINVAL)
    assert with_fds([null, (str(cached), os.O_RDONLY)], lambda fds: ask(broker, b"O", fds)) == i32(-errno.EINVAL)
    assert with_fds([fuse, (str(outside), os.O_RDONLY)], lambda fds: ask(broker, b"O", fds)) == i32(-errno.EACCES)
    assert with_fds([fuse, (str(cached), os.O_RDWR)], lambda fds: ask(broker, b"O", fds)) == i32(-errno.EACCES)
    assert with_fds([null], lambda fds: ask(broker, b"C" + i32(3), fds)) == i32(-errno.EINVAL)
    assert with_fds([fuse], lambda fds: ask(broker, b"C" + i32(3)[:3], fds)) == i32(-errno.EINVAL)
    # Well-formed requests pass every check and reach the ioctl, which an unmounted /dev/fuse refuses:
    # the answer is still one i32, a negative errno.
    for message, paths in ((b"O", [fuse, (str(cached), os.O_RDONLY)]), (b"C" + i32(3), [fuse])):
        answer = with_fds(paths, lambda fds, m=message: ask(broker, m, fds))  # type: ignore[misc]
        assert len(answer) == 4 and int.from_bytes(answer, sys.byteorder, signed=True) < 0
    assert broker.registered == 0
