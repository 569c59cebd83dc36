"""A loopback HTTP proxy that lets a test rewrite the store's responses (headers and body), to
show objfs answers a store does not give (no ETag in a listing, keys a disk cannot hold).

Each response is read whole, handed to ``rewrite(kind, headers, body)`` (``kind`` as
``testing.proxy.classify`` names requests: LIST, HEAD, GET...) and sent on with its length fixed.
Request bodies pass unchanged with their Host header, so SigV4 signatures still verify; chunked
request bodies are not supported (the tests that use this proxy send small PUTs at most).
For counting requests and streaming large bodies, use ``testing.proxy.CountingProxy``.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from testing.proxy import classify

Headers = list[tuple[str, str]]
Rewrite = Callable[[str, Headers, bytes], tuple[Headers, bytes]]
_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


def strip_etags(kinds: frozenset[str] = frozenset({"LIST"})) -> Rewrite:
    """A rewrite that removes every ETag (XML elements and headers) from responses of ``kinds``."""

    def rewrite(kind: str, headers: Headers, body: bytes) -> tuple[Headers, bytes]:
        if kind not in kinds:
            return headers, body
        kept = [(k, v) for k, v in headers if k.lower() != "etag"]
        return kept, re.sub(rb"<ETag>[^<]*</ETag>", b"", body) if kind == "LIST" else body

    return rewrite


class RewritingProxy:
    """``with RewritingProxy(upstream_port, rewrite) as proxy: ... proxy.endpoint ...``"""

    def __init__(self, upstream_port: int, rewrite: Rewrite) -> None:
        upstream = ("127.0.0.1", upstream_port)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def relay(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    self.send_error(501, "chunked request bodies are not supported by this test proxy")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                sent = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn = http.client.HTTPConnection(*upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=sent)
                    resp = conn.getresponse()
                    data = resp.read()
                    kind = classify(self.command, self.path, {k.lower(): v for k, v in sent.items()})
                    headers, data = rewrite(kind, resp.getheaders(), data)
                    upstream_length = resp.getheader("Content-Length")
                finally:
                    conn.close()
                self.send_response_only(resp.status, resp.reason)
                for k, v in headers:
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                if self.command == "HEAD":  # no body, but the length of the object's
                    if upstream_length is not None:
                        self.send_header("Content-Length", upstream_length)
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RewritingProxy:
        threading.Thread(target=self._server.serve_forever, name="rewrite-proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
