"""The counting proxy (testing/proxy.py) counts a response before its client gets any of it, so
a test may count as soon as its calls return. Counted after relaying, the HEAD of
tests/layers/test_read_blocks.py::test_lookups_answer_from_the_listing was once missing from the
tally although the client had its answer (issue 22).

``settle()`` waits for what a client that has gone left in flight: a request answered after its
client closed the connection, and a connection the kernel took in that was not accepted yet. A
reset before it let an unmounted server's last GET land in the next mount's count (the flake of
test_passthrough.py::test_a_second_mount_reads_the_cached_part_of_an_object_from_the_cache_and_completes_it)."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from testing.proxy import CountingProxy

BODY = b"0123456789" * 1000


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the stores answer
    arrived = threading.Event()  # a GET of /bucket/held reached the store...
    release = threading.Event()  # ...which answers it once this is set

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()

    def do_GET(self) -> None:
        if self.path.endswith("held"):
            Upstream.arrived.set()
            Upstream.release.wait()
        self.send_response(200)
        if self.path.endswith("chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(BODY), 3000):
                piece = BODY[i:i + 3000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


class SlowCounting(CountingProxy):
    """Takes its time to count: a count made after relaying would then reach the tally well
    after the client had its answer (the window of the old flake, made wide)."""

    def _record(self, kind: str, status: int, nbytes: int, request: bool = True) -> None:
        time.sleep(0.05)
        super()._record(kind, status, nbytes, request)


@pytest.fixture
def upstream() -> Iterator[int]:
    """The store's port."""
    Upstream.arrived.clear()
    Upstream.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        Upstream.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(upstream: int) -> Iterator[CountingProxy]:
    with SlowCounting(upstream) as counting:
        yield counting


def send_and_leave(port: int, path: str) -> None:
    """What an exiting server does to a request in flight: sent, and the connection closed
    without waiting for the answer."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: store\r\n\r\n".encode())


def test_a_response_is_counted_before_its_client_has_it(proxy: CountingProxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        for n, path in enumerate(("/bucket/key", "/bucket/chunked"), 1):
            conn.request("GET", path)
            assert conn.getresponse().read() == BODY
            tally = proxy.tally()
            assert tally.requests["GET"] == n
            assert tally.body_bytes["GET"] == n * len(BODY)  # chunked: the payload, not the framing
        conn.request("HEAD", "/bucket/key")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert proxy.snapshot()["HEAD"] == 1
    finally:
        conn.close()


def test_settle_waits_for_the_answer_to_a_client_that_left(proxy: CountingProxy) -> None:
    send_and_leave(proxy.port, "/bucket/held")
    assert Upstream.arrived.wait(30)  # the store has it, the client is gone: the proxy waits for the answer
    Upstream.release.set()  # answered now, counted slowly (SlowCounting): a settle that did not wait would miss it
    proxy.settle()
    assert proxy.snapshot()["GET"] == 1  # counted before settle returned: a reset now excludes it
    proxy.reset()
    proxy.settle()  # nothing in flight: returns at once
    assert proxy.snapshot()["GET"] == 0


class AcceptsOnceAsked(SlowCounting):
    """Accepts no connection before ``settle`` has looked at its backlog: what a busy accept
    loop, a step behind a client that connected and left, looks like to ``settle``."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.looked = threading.Event()

    def _accept(self) -> None:
        self.looked.wait()
        super()._accept()

    def _pending(self) -> bool:
        pending = super()._pending()
        self.looked.set()
        return pending


def test_settle_waits_for_a_connection_not_accepted_yet(upstream: int) -> None:
    """A connection the kernel completed (its request in it) and the proxy has not accepted:
    nothing is open, only the backlog shows it."""
    counting = AcceptsOnceAsked(upstream).start()
    try:
        send_and_leave(counting.port, "/bucket/key")
        counting.settle()
        assert counting.snapshot()["GET"] == 1
    finally:
        counting.looked.set()
        counting.stop()


def test_settle_gives_up_on_a_client_that_stays(proxy: CountingProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)), pytest.raises(TimeoutError, match="client"):
        proxy.settle(patience=0.5)  # an idle keep-alive connection: settle is for after the clients exit
