"""The counting proxy (testing/proxy.py) counts a response before its client gets any of it, so
a test may count as soon as its calls return. Counted after relaying, the HEAD of
tests/layers/test_read_blocks.py::test_lookups_answer_from_the_listing was once missing from the
tally although the client had its answer (issue 22)."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from testing.proxy import CountingProxy

BODY = b"0123456789" * 1000


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the stores answer

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()

    def do_GET(self) -> None:
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
def proxy() -> Iterator[CountingProxy]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with SlowCounting(int(server.server_address[1])) as counting:
            yield counting
    finally:
        server.shutdown()
        server.server_close()


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
