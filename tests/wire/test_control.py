"""The control link (``fusefs.wire.control``): the node plugin and the node's data service, one JSON
datagram per request and per answer on a SOCK_SEQPACKET pair. Both ends run against bytes written by
hand: a restarted plugin may drive a data service that an older plugin started."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from fusefs.config import Credentials, MountConfig
from fusefs.wire import control


def pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class HandService:
    """The service's end written by hand: records each request and answers the next canned bytes."""

    def __init__(self, sock: socket.socket, answers: list[bytes]) -> None:
        self.sock = sock
        self.answers = answers
        self.requests: list[tuple[bytes, list[int]]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for answer in self.answers:
            data, fds, _, _ = socket.recv_fds(self.sock, control.MAX_MESSAGE, 4)
            self.requests.append((data, fds))
            self.sock.send(answer)


def test_ping_and_revoke_are_these_bytes() -> None:
    plugin, service = pair()
    with plugin, service:
        hand = HandService(service, [b'{"ok": true}', b'{"ok": true}'])
        link = control.ServiceLink(plugin)
        link.ping()
        link.revoke("g-1")
        hand.thread.join(5)
        assert [data for data, _ in hand.requests] == [b'{"op": "ping"}', b'{"op": "revoke", "id": "g-1"}']
        assert all(fds == [] for _, fds in hand.requests)


def test_a_grant_carries_the_config_and_one_connection() -> None:
    creds = Credentials(access_key_id="AK", secret_access_key="SK")
    config = MountConfig(backend="s3", bucket="b", prefix="p/", credentials=creds)
    plugin, service = pair()
    with plugin, service:
        hand = HandService(service, [b'{"ok": true}'])
        ours = control.ServiceLink(plugin).grant("g-2", config)
        hand.thread.join(5)
        (data, fds), = hand.requests
        message = json.loads(data)
        assert list(message) == ["op", "id", "config"]
        assert message["op"] == "grant" and message["id"] == "g-2"
        assert message["config"] == json.loads(config.to_json())  # credentials included: the service needs them
        assert len(fds) == 1
        with ours, socket.socket(fileno=fds[0]) as theirs:
            ours.sendall(b"z")
            assert theirs.recv(1) == b"z"  # the attached descriptor is the other end of the returned socket


@pytest.mark.parametrize("answer, message", [
    (b'{"error": "bucket b is not served here"}', "bucket b is not served here"),
    (b'{"ok": false}', "refused the request"),
    (b"not json", "answered garbage"),
    (b"[1, 2]", "refused the request"),
])
def test_the_plugin_reads_refusals_written_by_hand(answer: bytes, message: str) -> None:
    plugin, service = pair()
    with plugin, service:
        HandService(service, [answer])
        with pytest.raises(control.ControlError, match=message):
            control.ServiceLink(plugin).ping()


def test_a_service_that_is_gone_is_said_so() -> None:
    plugin, service = pair()
    with plugin:
        service.close()
        with pytest.raises(control.ControlError, match=r"did not answer|is gone"):
            control.ServiceLink(plugin, timeout=5).ping()


def test_the_service_parses_requests_written_by_hand() -> None:
    assert control.parse(b'{"op": "ping"}', []) == ("ping", "", None, None)
    assert control.parse(b'{"op": "revoke", "id": "g-1"}', []) == ("revoke", "g-1", None, None)
    config = MountConfig(backend="s3", bucket="b", prefix="p/")
    r, w = os.pipe()
    try:
        op, grant, parsed, fd = control.parse(
            b'{"op": "grant", "id": "g-3", "config": ' + config.to_json().encode() + b"}", [r])
        assert (op, grant, parsed, fd) == ("grant", "g-3", config, r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("data, nfds", [
    (b"garbage", 0),
    (b'["ping"]', 0),
    (b'{"op": "ping"}', 1),  # a ping with a descriptor
    (b'{"op": "revoke"}', 0),  # no grant id
    (b'{"op": "revoke", "id": "g"}', 1),
    (b'{"op": "grant", "id": "g", "config": {"backend": "s3", "bucket": "b"}}', 0),  # no connection
    (b'{"op": "grant", "id": "g", "config": {"backend": "s3", "bucket": "b"}}', 2),  # two
    (b'{"op": "grant", "id": "g", "config": {"backend": "s3", "bucket": "b", "nonsense": 1}}', 1),
    (b'{"op": "format-disk", "id": "g"}', 1),
])
def test_the_service_refuses_malformed_requests_and_closes_their_descriptors(data: bytes, nfds: int) -> None:
    pipes = [os.pipe() for _ in range(nfds)]
    fds = [r for r, _ in pipes]
    try:
        with pytest.raises(ValueError, match="malformed control request"):
            control.parse(data, fds)
        for _, w in pipes:
            with pytest.raises(BrokenPipeError):
                os.write(w, b"x")  # its read end was closed by parse
    finally:
        for _, w in pipes:
            os.close(w)
