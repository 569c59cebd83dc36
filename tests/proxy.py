"""A counting reverse proxy for S3 requests: put it between objfs and the store to prove how many
requests of each kind an operation costs.

Threaded, HTTP/1.1 with keep-alive on both sides, bodies streamed through in chunks. Each client
connection gets its own upstream connection. The Host header is passed through unchanged, so
SigV4 signatures (which cover it) still verify at the store.
"""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHUNK = 1 << 20
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


def classify(method: str, path: str, headers: Any) -> str:
    """The kind of S3 request: LIST, GET, HEAD, PUT, PART, COPY, CREATE-MULTIPART, COMPLETE, DELETE..."""
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    parts = [p for p in url.path.split("/") if p]
    bucket_level = len(parts) <= 1
    if method == "GET":
        if bucket_level:
            return "LIST" if parts else "LIST-BUCKETS"
        return "GET"
    if method == "HEAD":
        return "HEAD-BUCKET" if bucket_level else "HEAD"
    if method == "PUT":
        if bucket_level:
            return "CREATE-BUCKET"
        if "uploadId" in query:
            return "PART"
        if headers.get("x-amz-copy-source"):
            return "COPY"
        return "PUT"
    if method == "POST":
        if "uploads" in query:
            return "CREATE-MULTIPART"
        if "uploadId" in query:
            return "COMPLETE"
        if "delete" in query:
            return "DELETE-MANY"
        return "POST"
    if method == "DELETE":
        if "uploadId" in query:
            return "ABORT"
        return "DELETE-BUCKET" if bucket_level else "DELETE"
    return method


class CountingProxy:
    """``with CountingProxy(upstream_port) as p: ... p.counts['GET']``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream_conn: http.client.HTTPConnection | None = None

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _conn(self) -> http.client.HTTPConnection:
                if self.upstream_conn is None:
                    self.upstream_conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                return self.upstream_conn

            def _relay(self) -> None:
                proxy.count(classify(self.command, self.path, self.headers))
                length = int(self.headers.get("Content-Length") or 0)
                chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
                body = self._read_body(length, chunked)
                conn = self._conn()
                try:
                    resp = self._forward(conn, body)
                except (OSError, http.client.HTTPException):
                    conn.close()  # a stale keep-alive connection: one fresh attempt
                    self.upstream_conn = None
                    resp = self._forward(self._conn(), body)
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                length_out = resp.getheader("Content-Length")
                if length_out is None and self.command != "HEAD" and resp.status not in (204, 304):
                    data = resp.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.end_headers()
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    self.wfile.write(chunk)

            def _read_body(self, length: int, chunked: bool) -> bytes:
                if chunked:
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(length) if length else b""

            def _forward(self, conn: http.client.HTTPConnection, body: bytes) -> http.client.HTTPResponse:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        conn.putheader(k, v)
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders()
                for i in range(0, len(body), CHUNK):
                    conn.send(body[i:i + CHUNK])
                return conn.getresponse()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="counting-proxy", daemon=True)

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CountingProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
