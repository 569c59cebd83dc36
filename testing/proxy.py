"""A counting, fault-injecting reverse proxy for store requests, used by the tests and the benchmarks.

Put it between a client and ``rclone serve s3`` (or fake-gcs-server) to prove what an operation
costs the store: how many requests of each kind (``classify``) and how many response bytes. It
speaks just enough HTTP/1.1 to stay transparent: keep-alive, Content-Length and chunked bodies
streamed both ways, and ``Expect: 100-continue`` relayed rather than answered (SDKs sign that
header, and the Host header passes unchanged, so SigV4 signatures still verify at the store).

With a ``FaultPlan`` (``proxy.inject(plan)``) it also misbehaves the way stores and networks do:
it answers 503 SlowDown or 500 InternalError itself, resets the connection in the middle of the
response body, stalls without answering, or closes the connection right after the response
headers (for answers without a body: in the middle of the headers, or before them). Faults
start at a given rate and come in bursts; which requests are hit follows a seeded random
sequence (deterministic in the order requests arrive), and the kinds take turns, so enough
faults cover every kind. ``proxy.down(kind)`` makes every request fail until
``proxy.up()``. What was injected is counted in ``tally().faults``.
"""

from __future__ import annotations

import contextlib
import io
import random
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self, cast
from urllib.parse import parse_qs, urlsplit

CHUNK = 1 << 20

SLOWDOWN, INTERNAL, RESET, STALL, CLOSE = "slowdown", "internal", "reset", "stall", "close-after-headers"
FAULT_KINDS = (SLOWDOWN, INTERNAL, RESET, STALL, CLOSE)
_ANSWERS = {SLOWDOWN: (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
            INTERNAL: (500, "Internal Server Error", "InternalError", "We encountered an internal error.")}


@dataclass
class FaultPlan:
    """Which requests misbehave, and how.

    ``rate``: chance that a request starts a burst of faults; a burst is 1 to ``burst`` requests
    in a row. ``kinds`` take turns. ``only``: the request kinds (``classify``) that may be hit,
    all if empty. ``skip``: how many of those requests are served normally before any is hit
    (with ``rate=1.0``: fail exactly from the request after them on). ``stall``: seconds a
    stalled request waits before its connection is closed (longer than the client's read
    timeout, so the client gives up first)."""

    rate: float = 0.03
    burst: int = 3
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    only: frozenset[str] = frozenset()
    skip: int = 0
    stall: float = 3.0
    _random: random.Random = field(init=False, repr=False)
    _left: int = field(default=0, init=False, repr=False)  # requests still to hit in this burst
    _turn: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be among {FAULT_KINDS}, got {self.kinds}")
        self._random = random.Random(self.seed)

    def next_fault(self, kind: str) -> str | None:
        """The fault for the next request of ``kind`` (None: serve it normally). Not thread-safe:
        the proxy calls it under its lock."""
        if self.only and kind not in self.only:
            return None
        if self.skip > 0:
            self.skip -= 1
            return None
        if self._left == 0 and self._random.random() < self.rate:
            self._left = self._random.randint(1, max(1, self.burst))
        if self._left == 0:
            return None
        self._left -= 1
        fault = self.kinds[self._turn % len(self.kinds)]
        self._turn += 1
        return fault


@dataclass
class Tally:
    """What clients asked of the store since the last reset."""

    requests: Counter[str] = field(default_factory=Counter)  # kind -> count
    body_bytes: Counter[str] = field(default_factory=Counter)  # kind -> response body bytes
    errors: int = 0  # responses with a status >= 400
    faults: Counter[str] = field(default_factory=Counter)  # fault kind -> requests it was injected into
    faulted: Counter[tuple[str, str]] = field(default_factory=Counter)  # (request kind, fault kind) -> count
    sent_bytes: Counter[str] = field(default_factory=Counter)  # kind -> request body bytes (uploads)
    gets: Counter[str] = field(default_factory=Counter)  # object path (/bucket/key) -> GET requests

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def as_dict(self) -> dict[str, object]:
        return {"requests": dict(self.requests), "body_bytes": dict(self.body_bytes),
                "total": self.total, "errors": self.errors, "faults": dict(self.faults),
                "faulted": {f"{k} {f}": n for (k, f), n in self.faulted.items()}}


def classify(method: str, path: str, headers: dict[str, str]) -> str:
    """The kind of S3 request: LIST, GET, HEAD, PUT, PART, COPY, CREATE-MULTIPART, COMPLETE, DELETE...
    (GCS JSON API requests: ``classify_gcs``)."""
    url = urlsplit(path)
    if url.path.startswith(_GCS_ROOTS):
        return classify_gcs(method, url.path)
    query = parse_qs(url.query, keep_blank_values=True)
    parts = [p for p in url.path.split("/") if p]
    bucket_level = len(parts) <= 1
    if method == "GET":
        if bucket_level and "versioning" in query:
            return "GET-VERSIONING"
        if bucket_level and "versions" in query:
            return "LIST-VERSIONS"
        if bucket_level:
            return "LIST" if parts else "LIST-BUCKETS"
        return "GET"
    if method == "HEAD":
        return "HEAD-BUCKET" if bucket_level else "HEAD"
    if method == "PUT":
        if bucket_level:
            return "CREATE-BUCKET"
        if "uploadId" in query:
            return "PART-COPY" if headers.get("x-amz-copy-source") else "PART"
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


_GCS_ROOTS = ("/storage/v1/b", "/upload/storage/v1/b/", "/download/storage/v1/b/")


def classify_gcs(method: str, path: str) -> str:
    """The kind of a GCS JSON API request, in S3's words where there is one (metadata GET is
    HEAD, media upload PUT), plus COMPOSE."""
    if path.startswith("/upload/"):
        return "PUT"
    if path.startswith("/download/"):
        return "GET"
    parts = path.removeprefix("/storage/v1/b").strip("/").split("/")
    if parts == [""]:
        return "CREATE-BUCKET" if method == "POST" else "LIST-BUCKETS"
    if len(parts) == 1:
        return {"GET": "HEAD-BUCKET", "DELETE": "DELETE-BUCKET"}.get(method, method)
    if len(parts) == 2:  # /b/<bucket>/o
        return "LIST" if method == "GET" else method
    if method == "POST" and len(parts) == 4 and parts[-1] == "compose":
        return "COMPOSE"
    if method == "POST" and "rewriteTo" in parts:
        return "COPY"
    return {"GET": "HEAD", "DELETE": "DELETE", "PATCH": "PATCH"}.get(method, method)


def _uncounted(n: int) -> None:
    pass


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

    def copy(self, n: int, out: socket.socket | _Sink, counted: Callable[[int], None] = _uncounted) -> int:
        """Relay ``n`` bytes; ``counted`` hears of each piece before ``out`` gets it."""
        done = 0
        while done < n:
            data = self.file.read1(min(CHUNK, n - done))
            if not data:
                raise ConnectionError("peer closed mid-body")
            counted(len(data))
            out.sendall(data)
            done += len(data)
        return done

    def copy_chunked(self, out: socket.socket | _Sink, counted: Callable[[int], None] = _uncounted) -> int:
        total = 0
        while True:
            size_line = self.file.readline(1024)
            if not size_line:
                raise ConnectionError("peer closed mid-chunk")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            out.sendall(size_line)
            if size == 0:
                while True:  # trailers end with an empty line
                    trailer = self.file.readline(65536)
                    out.sendall(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return total
            total += self.copy(size, out, counted)
            self.copy(2, out)  # the chunk's CRLF

    def copy_to_eof(self, out: socket.socket, counted: Callable[[int], None] = _uncounted) -> int:
        total = 0
        while data := self.file.read1(CHUNK):
            counted(len(data))
            out.sendall(data)
            total += len(data)
        return total


class _Sink:
    """Where the body of a request the proxy answers itself goes."""

    def sendall(self, data: bytes) -> None:
        pass


def _headers(lines: list[bytes]) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        found[name.strip().lower()] = value.strip()
    return found


class CountingProxy:
    """``with CountingProxy(upstream_port) as proxy: ... proxy.endpoint ... proxy.snapshot()``:
    ``snapshot()`` is the request count by kind, ``tally()`` adds response bytes, errors and the
    faults injected (``inject``, ``down``). A response is in the tally before its client gets any
    of it, so counts taken after the calls returned are exact; requests still in flight (a
    background prefetch) may or may not be in it yet: tests count only what they waited for.

    A client that has exited (an unmounted server) may still have requests in flight here: the
    store answers them after the client is gone, and they are counted then. ``settle()`` waits
    for those, so that a ``reset()`` after it starts a count none of them can reach, and a count
    after it holds all of them."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host  # where it listens (the e2e cluster's: the node's address, for pods)
        self.listener = socket.create_server((host, 0), backlog=256)
        self.port = int(self.listener.getsockname()[1])
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a connection was finished with (settle)
        self._tally = Tally()
        self._stopping = False
        self._conns: set[socket.socket] = set()
        self._open = 0  # connections accepted and not finished with: taken under the lock (settle)
        self._plan: FaultPlan | None = None
        self._down: str | None = None  # every request gets this fault

    def inject(self, plan: FaultPlan | None) -> None:
        """Misbehave as ``plan`` says from the next request on (None: stop)."""
        with self._lock:
            self._plan = plan

    def down(self, kind: str = SLOWDOWN) -> None:
        """Fail every request with ``kind`` until ``up()``: the store is down."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._down = kind

    def up(self) -> None:
        with self._lock:
            self._down = None

    def _fault_for(self, kind: str) -> tuple[str | None, float]:
        """The fault for the next request of ``kind``, and how long a stall lasts."""
        with self._lock:
            fault = self._down or (self._plan.next_fault(kind) if self._plan is not None else None)
            if fault is not None:
                self._tally.faults[fault] += 1
                self._tally.faulted[kind, fault] += 1
            return fault, self._plan.stall if self._plan is not None else FaultPlan.stall

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self._tally = Tally()

    def tally(self) -> Tally:
        with self._lock:
            return Tally(Counter(self._tally.requests), Counter(self._tally.body_bytes), self._tally.errors,
                         Counter(self._tally.faults), Counter(self._tally.faulted), Counter(self._tally.sent_bytes),
                         Counter(self._tally.gets))

    def snapshot(self) -> Counter[str]:
        """Requests by kind since the last reset (LIST, GET, HEAD, PUT, PART, DELETE, ...)."""
        return self.tally().requests

    def settle(self, patience: float = 60.0) -> None:
        """Until nothing is in flight here: every connection accepted has been closed by its
        client (a request on it was answered and counted first) and none waits to be accepted.

        Only for when every client of the proxy has exited (or closed its connections), e.g.
        after ``Mounted.unmount()``, which waits for the server process: a live client's idle
        keep-alive connection would keep it waiting (past ``patience``: TimeoutError). Once the
        clients are gone no new connection can come, except those the kernel had completed
        before (an exited client's request may sit in one, unread): the listener's backlog is
        looked at under the lock that the accept loop takes each connection under, so a
        connection is always either pending there or counted open. (A handshake the client
        never finished carries no request: its SYN-ACK meets a closed socket.)"""
        with self._changed:
            if not self._changed.wait_for(lambda: self._open == 0 and not self._pending(), patience):
                raise TimeoutError(f"the proxy still has {self._open} connection(s) open, or one to accept, "
                                   f"after {patience:.0f} s: is a client still running?")

    def _pending(self) -> bool:
        """A connection is waiting in the listener's backlog (under the lock)."""
        ready = select.poll()  # not select.select: no limit on the descriptor's number
        try:
            ready.register(self.listener, select.POLLIN)
        except (OSError, ValueError):  # closed: nothing more comes
            return False
        return any(events & select.POLLIN for _, events in ready.poll(0))

    def _record(self, kind: str, status: int, nbytes: int, request: bool = True) -> None:
        """Count a response (``request``) and ``nbytes`` of its body."""
        with self._lock:
            self._tally.body_bytes[kind] += nbytes
            if request:
                self._tally.requests[kind] += 1
                if status >= 400:
                    self._tally.errors += 1

    def start(self) -> Self:
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop's select
        with contextlib.suppress(OSError):
            self.listener.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        """Wait for a connection, then take it under the lock (non-blocking) and count it open in
        the same step: ``settle`` sees each one either in the backlog or open, never between."""
        self.listener.setblocking(False)
        ready = select.poll()
        ready.register(self.listener, select.POLLIN)
        while not self._stopping:
            try:
                ready.poll()
                with self._lock:
                    try:
                        conn, _ = self.listener.accept()
                    except BlockingIOError:  # not complete after all (or taken): wait again
                        continue
                    self._open += 1
            except (OSError, ValueError):  # stopped: the listener is shut down or closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            with contextlib.suppress(OSError):
                client.setblocking(True)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._relay_all(client)
        finally:
            with self._changed:
                self._open -= 1
                self._changed.notify_all()

    def _relay_all(self, client: socket.socket) -> None:
        """Relay the requests of one client connection until it closes."""
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
        fault, stall = self._fault_for(classify(method, target, req))
        if fault in _ANSWERS:
            self._answer(fault, method, target, req, creader, client)
            return False
        if fault is not None:
            self._misbehave(fault, stall, method, target, head, req, creader, client, upstream, ureader)
            return False
        upstream.sendall(b"".join(head) + b"\r\n")
        if req.get("expect", "").lower() == "100-continue":
            interim = ureader.head()
            if interim is None:
                return False
            if int(interim[0].split()[1]) != 100:  # the server refused before the body: finish this response here
                return self._relay(method, target, interim, ureader, client, req)
            client.sendall(b"".join(interim) + b"\r\n")
        if "chunked" in req.get("transfer-encoding", "").lower():
            creader.copy_chunked(upstream)
        elif int(req.get("content-length", "0") or 0):
            creader.copy(int(req["content-length"]), upstream)
        sent = int(req.get("x-amz-decoded-content-length") or req.get("content-length") or 0)
        if sent:
            with self._lock:
                self._tally.sent_bytes[classify(method, target, req)] += sent
        resp = ureader.head()
        while resp is not None and resp[0].split()[1].startswith(b"1"):  # skip late interim responses
            client.sendall(b"".join(resp) + b"\r\n")
            resp = ureader.head()
        if resp is None:
            return False
        return self._relay(method, target, resp, ureader, client, req)

    def _relay(self, method: str, target: str, head: list[bytes], ureader: _Reader, client: socket.socket,
               req: dict[str, str]) -> bool:
        """Relay one response. It is counted before the client gets any of it: a client that has
        its answer is always in the tally already, so a test may count as soon as its calls
        return (counted after the body, a response the client had finished reading could still
        be missing from the tally: the newcomer's flake of issue 22). Body bytes of a known
        length are counted with the request, in one step; chunked bodies piece by piece."""
        status = int(head[0].split()[1])
        resp = _headers(head)
        kind = classify(method, target, req)
        keep = "close" not in (resp.get("connection", "") + req.get("connection", "")).lower()
        bodyless = method == "HEAD" or status in (204, 304)
        length = 0 if bodyless or "content-length" not in resp else int(resp["content-length"])
        if kind == "GET":
            with self._lock:
                self._tally.gets[urlsplit(target).path] += 1
        self._record(kind, status, length)
        client.sendall(b"".join(head) + b"\r\n")
        if bodyless:
            return keep

        def counted(n: int) -> None:
            self._record(kind, status, n, request=False)

        if "chunked" in resp.get("transfer-encoding", "").lower():
            ureader.copy_chunked(client, counted)
        elif "content-length" in resp:
            ureader.copy(length, client)
        else:
            ureader.copy_to_eof(client, counted)
            keep = False
        return keep

    # -- faults ----------------------------------------------------------------------------------
    def _answer(self, fault: str, method: str, target: str, req: dict[str, str], creader: _Reader,
                client: socket.socket) -> None:
        """Answer an S3 error ourselves (the store never sees the request), then close."""
        status, reason, code, message = _ANSWERS[fault]
        if req.get("expect", "").lower() != "100-continue":  # the body is on its way: take it in
            if "chunked" in req.get("transfer-encoding", "").lower():
                creader.copy_chunked(_Sink())
            elif int(req.get("content-length", "0") or 0):
                creader.copy(int(req["content-length"]), _Sink())
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                f"</Message><Resource>{target}</Resource><RequestId>objfs-fault</RequestId></Error>").encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self._record(classify(method, target, req), status, 0)  # before the client has it (see _relay)
        client.sendall(head + (b"" if method == "HEAD" else body))

    def _misbehave(self, fault: str, stall: float, method: str, target: str, head: list[bytes], req: dict[str, str],
                   creader: _Reader, client: socket.socket, upstream: socket.socket, ureader: _Reader) -> None:
        """Send the request on (the store acts on it), then spoil the answer: reset in the middle
        of its body, close after its headers, or stall."""
        upstream.sendall(b"".join(head) + b"\r\n")
        if req.get("expect", "").lower() == "100-continue":
            interim = ureader.head()
            if interim is None:
                return
            client.sendall(b"".join(interim) + b"\r\n")
            if not interim[0].split()[1].startswith(b"100"):
                return
        if "chunked" in req.get("transfer-encoding", "").lower():
            creader.copy_chunked(upstream)
        elif int(req.get("content-length", "0") or 0):
            creader.copy(int(req["content-length"]), upstream)
        resp = ureader.head()
        while resp is not None and resp[0].split()[1].startswith(b"1"):
            resp = ureader.head()
        if resp is None:
            return
        status = int(resp[0].split()[1])
        self._record(classify(method, target, req), status, 0)
        if fault == STALL:  # nothing at all, until the client's read timeout gives up on us
            time.sleep(stall)
            return
        answer_head = b"".join(resp) + b"\r\n"
        rheaders = _headers(resp)
        length = int(rheaders.get("content-length", "0") or 0)
        # An answer without a body (an uploaded part, a HEAD) would be complete with its headers:
        # then the fault spoils the headers instead, or the client would never notice it.
        body = method != "HEAD" and status not in (204, 304) and (
            length > 1 or "chunked" in rheaders.get("transfer-encoding", "").lower())
        if fault == RESET:
            if body:
                client.sendall(answer_head)
                ureader.copy(length // 2, client)
            else:
                client.sendall(answer_head[: len(answer_head) // 2])
            # RST rather than FIN: the client sees "connection reset by peer"
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif body:  # CLOSE: headers only, then FIN: the body comes up short
            client.sendall(answer_head)
        # CLOSE of an answer without a body: FIN without any answer
