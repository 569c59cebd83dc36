"""A counting reverse proxy for S3 requests, used by the tests and the benchmarks.

Put it between a client and ``rclone serve s3`` to prove what an operation costs the store: how
many requests of each kind (``classify``) and how many response bytes. It speaks just enough
HTTP/1.1 to stay transparent: keep-alive, Content-Length and chunked bodies streamed both ways,
and ``Expect: 100-continue`` relayed rather than answered (SDKs sign that header, and the Host
header passes unchanged, so SigV4 signatures still verify at the store).
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import parse_qs, urlsplit

CHUNK = 1 << 20


@dataclass
class Tally:
    """What clients asked of the store since the last reset."""

    requests: Counter[str] = field(default_factory=Counter)  # kind -> count
    body_bytes: Counter[str] = field(default_factory=Counter)  # kind -> response body bytes
    errors: int = 0  # responses with a status >= 400

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def as_dict(self) -> dict[str, object]:
        return {"requests": dict(self.requests), "body_bytes": dict(self.body_bytes),
                "total": self.total, "errors": self.errors}


def classify(method: str, path: str, headers: dict[str, str]) -> str:
    """The kind of S3 request: LIST, GET, HEAD, PUT, PART, COPY, CREATE-MULTIPART, COMPLETE, DELETE..."""
    url = urlsplit(path)
    query = parse_qs(url.query, keep_blank_values=True)
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


class _Reader:
    """Buffered reads from a socket: header lines and exact byte counts."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = cast(io.BufferedReader, sock.makefile("rb", buffering=CHUNK))

    def head(self) -> list[bytes] | None:
        lines: list[bytes] = []
        while True:
            line = self.file.readline(65536)
            if not line:
                return lines if lines else None
            if line in (b"\r\n", b"\n"):
                if lines:
                    return lines
                continue  # stray CRLF between messages
            lines.append(line)

    def copy(self, n: int, out: socket.socket) -> int:
        done = 0
        while done < n:
            data = self.file.read1(min(CHUNK, n - done))
            if not data:
                raise ConnectionError("peer closed mid-body")
            out.sendall(data)
            done += len(data)
        return done

    def copy_chunked(self, out: socket.socket) -> int:
        total = 0
        while True:
            size_line = self.file.readline(1024)
            if not size_line:
                raise ConnectionError("peer closed mid-chunk")
            out.sendall(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers end with an empty line
                    trailer = self.file.readline(65536)
                    out.sendall(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return total
            total += self.copy(size + 2, out) - 2

    def copy_to_eof(self, out: socket.socket) -> int:
        total = 0
        while data := self.file.read1(CHUNK):
            out.sendall(data)
            total += len(data)
        return total


def _headers(lines: list[bytes]) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        found[name.strip().lower()] = value.strip()
    return found


class CountingProxy:
    """``with CountingProxy(upstream_port) as proxy: ... proxy.endpoint ... proxy.snapshot()``:
    ``snapshot()`` is the request count by kind, ``tally()`` adds response bytes and errors."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = int(self.listener.getsockname()[1])
        self._lock = threading.Lock()
        self._tally = Tally()
        self._stopping = False
        self._conns: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self._tally = Tally()

    def tally(self) -> Tally:
        with self._lock:
            return Tally(Counter(self._tally.requests), Counter(self._tally.body_bytes), self._tally.errors)

    def snapshot(self) -> Counter[str]:
        """Requests by kind since the last reset (LIST, GET, HEAD, PUT, PART, DELETE, ...)."""
        return self.tally().requests

    def _record(self, kind: str, status: int, nbytes: int) -> None:
        with self._lock:
            self._tally.requests[kind] += 1
            self._tally.body_bytes[kind] += nbytes
            if status >= 400:
                self._tally.errors += 1

    def start(self) -> CountingProxy:
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.listener.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._conns.add(client)
        upstream: socket.socket | None = None
        try:
            creader = _Reader(client)
            ureader: _Reader | None = None
            while True:
                head = creader.head()
                if head is None:
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    ureader = _Reader(upstream)
                assert ureader is not None
                keep = self._exchange(head, creader, client, upstream, ureader)
                if not keep:
                    return
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            self._conns.discard(client)
            for s in (client, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def _exchange(self, head: list[bytes], creader: _Reader, client: socket.socket,
                  upstream: socket.socket, ureader: _Reader) -> bool:
        """Forward one request and its response; False when either side closes the connection."""
        method, target, _ = head[0].decode("latin-1").split(" ", 2)
        req = _headers(head)
        upstream.sendall(b"".join(head) + b"\r\n")
        if req.get("expect", "").lower() == "100-continue":
            interim = ureader.head()
            if interim is None:
                return False
            status = int(interim[0].split()[1])
            client.sendall(b"".join(interim) + b"\r\n")
            if status != 100:  # the server refused before the body: finish this response here
                return self._relay_body(method, target, status, _headers(interim), ureader, client, req)
        if "chunked" in req.get("transfer-encoding", "").lower():
            creader.copy_chunked(upstream)
        elif int(req.get("content-length", "0") or 0):
            creader.copy(int(req["content-length"]), upstream)
        resp = ureader.head()
        while resp is not None and resp[0].split()[1].startswith(b"1"):  # skip late interim responses
            client.sendall(b"".join(resp) + b"\r\n")
            resp = ureader.head()
        if resp is None:
            return False
        client.sendall(b"".join(resp) + b"\r\n")
        return self._relay_body(method, target, int(resp[0].split()[1]), _headers(resp), ureader, client, req)

    def _relay_body(self, method: str, target: str, status: int, resp: dict[str, str], ureader: _Reader,
                    client: socket.socket, req: dict[str, str]) -> bool:
        keep = "close" not in (resp.get("connection", "") + req.get("connection", "")).lower()
        if method == "HEAD" or status in (204, 304):
            nbytes = 0
        elif "chunked" in resp.get("transfer-encoding", "").lower():
            nbytes = ureader.copy_chunked(client)
        elif "content-length" in resp:
            nbytes = ureader.copy(int(resp["content-length"]), client)
        else:
            nbytes = ureader.copy_to_eof(client)
            keep = False
        self._record(classify(method, target, req), status, nbytes)
        return keep
