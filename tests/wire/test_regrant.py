"""The regrant socket (``fusefs.wire.regrant``): a running server's next grant connection is one
SOCK_SEQPACKET datagram ``grant`` with the socket attached. The node plugin sends it to servers
it started (on their listening socket) and the sidecar forwards it to a volume's child (on a
connected pair); anything else is dropped with its descriptors."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from fusefs.wire import regrant


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def test_the_sender_writes_one_grant_datagram_with_the_socket() -> None:
    a, b = seqpacket_pair()
    conn, peer = socket.socketpair()
    with a, b, conn, peer:
        # the plugin's way (a socket) and the sidecar's (forwarding a bare descriptor)
        for send in (lambda: regrant.send_grant(a, conn), lambda: regrant.send_grant_fd(a, conn.fileno())):
            send()
            data, fds, flags, _ = socket.recv_fds(b, 64, 4)
            assert (data, len(fds), flags) == (b"grant", 1, 0)
            with socket.socket(fileno=fds[0]) as received:
                received.sendall(b"x")
                assert peer.recv(1) == b"x"
    assert regrant.WORD == b"grant"


def receive(channel: socket.socket) -> list[socket.socket]:
    got: list[socket.socket] = []
    trio.run(regrant.receive_grants, channel, got.append)
    return got


def test_a_connected_channel_takes_hand_written_grants_and_drops_the_rest() -> None:
    ours, theirs = seqpacket_pair()
    good, good_peer = socket.socketpair()
    r, w = os.pipe()
    with good, good_peer:
        open_before = len(os.listdir("/proc/self/fd"))
        socket.send_fds(ours, [b"grunt"], [good.fileno()])  # another word
        ours.send(b"grant")  # no socket
        socket.send_fds(ours, [b"grant"], [r])  # not a socket
        socket.send_fds(ours, [b"grant"], [good.fileno(), good.fileno()])  # two
        socket.send_fds(ours, [b"grant"], [good.fileno()])
        ours.close()
        got = receive(theirs)
        assert len(got) == 1
        with got[0] as conn:
            conn.sendall(b"y")
            assert good_peer.recv(1) == b"y"
        theirs.close()
        # what the dropped datagrams carried was closed (and so are our two channel ends)
        assert len(os.listdir("/proc/self/fd")) == open_before - 2
    os.close(r)
    os.close(w)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may hand over on a listening channel")
def test_a_listening_channel_takes_grants_from_root(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(tmp_path / "server.sock"))
    listener.listen(1)
    conn, peer = socket.socketpair()
    got: list[socket.socket] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            def take(sock: socket.socket) -> None:
                got.append(sock)
                nursery.cancel_scope.cancel()

            nursery.start_soon(regrant.receive_grants, listener, take)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sender:
                await trio.to_thread.run_sync(sender.connect, str(tmp_path / "server.sock"))
                sender.send(b"grunt")  # dropped; the next datagram still counts
                regrant.send_grant(sender, conn)
                await trio.sleep_forever()

    with conn, peer:
        trio.run(main)
        assert len(got) == 1
        with got[0] as received:
            received.sendall(b"z")
            assert peer.recv(1) == b"z"
    listener.close()
