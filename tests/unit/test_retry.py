"""The retry policy against real transient failures.

``FlakyProxy`` is a loopback TCP proxy in front of a real store server: its first N connections
are spoiled (reset after the request arrives, or answered with an HTTP error status), later ones
are piped to the server. The stores under test talk real HTTP through it, so this checks the
whole chain: SDK exception -> ``fusefs.errors`` type -> ``fusefs.retry`` decision.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from fusefs import errors, retry
from fusefs.retry import RetryPolicy
from fusefs.store.base import AsyncStore, BlockingStore
from tests.store import test_store
from tests.store.test_store import Backend

gcs_server = test_store.gcs_server  # the session's fake-gcs-server fixture, shared with test_store


@pytest.fixture(params=["s3", "gcs"])
def store_backend(request: pytest.FixtureRequest) -> Backend:
    return test_store.make_backend(request)

CUT = -1  # FlakyProxy status: forward part of the real answer, then reset
BIG = bytes(range(256)) * 4096  # 1 MiB, in every flaky_store bucket as "big"
FAST = RetryPolicy(max_attempts=8, base_delay=0.005, max_delay=0.05, deadline=30.0)
_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 412: "Precondition Failed",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


@dataclass
class FlakyProxy:
    """Spoil the first ``bad`` connections (``status`` 0 = reset), pipe the rest to ``upstream``."""

    upstream: int
    bad: int
    status: int = 0
    spoiled: int = 0  # connections spoiled so far
    listener: socket.socket = field(default_factory=socket.socket)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _socks: list[socket.socket] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self) -> FlakyProxy:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                spoil = self.spoiled < self.bad
                self.spoiled += spoil
                self._socks.append(conn)
            handler = self._spoil if spoil else self._pipe
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def _spoil(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:  # let the whole request head arrive first
                chunk = conn.recv(65536)
                if not chunk:
                    break
                head += chunk
            if self.status == CUT:
                self._cut(conn, head)
            elif self.status == 0:  # RST instead of an answer
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                body = json.dumps({"error": {"code": self.status, "message": "injected by FlakyProxy",
                                             "errors": [{"reason": "injected", "message": "injected"}]}}).encode()
                conn.sendall(
                    f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Error')}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    .encode() + body
                )
        conn.close()

    def _cut(self, conn: socket.socket, head: bytes) -> None:
        """Send the request on, forward the answer's first 64 KiB, then reset: a truncated body."""
        with socket.create_connection(("127.0.0.1", self.upstream)) as up:
            up.sendall(head)
            sent = 0
            while sent < 65536 and (data := up.recv(65536 - sent)):
                conn.sendall(data)
                sent += len(data)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def _pipe(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            conn.close()
            return
        with self._lock:
            self._socks.append(up)
        threading.Thread(target=_copy, args=(up, conn), daemon=True).start()
        _copy(conn, up)


def _copy(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 20):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def flaky_store(backend: Backend, bad: int, status: int = 0) -> Iterator[tuple[BlockingStore, FlakyProxy]]:
    """A store on a fresh bucket holding ``obj`` (``abc``) and ``big`` (BIG), reached through a FlakyProxy."""
    bucket = backend.new_bucket()
    direct = backend.store(bucket)
    direct.put("obj", b"abc")
    direct.put("big", BIG)
    port = int(backend.endpoint.rsplit(":", 1)[1])
    with FlakyProxy(port, bad, status) as proxy:
        yield backend.store(bucket, endpoint=proxy.endpoint, timeout=10.0), proxy


# -- the policy itself ---------------------------------------------------------------------------

def test_delays_respect_attempts_and_bounds() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=0.1, max_delay=0.3, deadline=100)
    delays = list(policy.delays())
    assert len(delays) == 4
    assert all(0 <= d <= min(0.3, 0.1 * 2**a) for a, d in enumerate(delays, 1))


def test_deadline_stops_retries() -> None:
    assert list(RetryPolicy(max_attempts=50, base_delay=10, max_delay=10, deadline=0).delays()) == []


def test_call_sync_does_not_retry_permanent_errors() -> None:
    calls = []

    def fail() -> None:
        calls.append(1)
        raise errors.NotFoundError("gone")

    with pytest.raises(errors.NotFoundError):
        retry.call_sync(fail, FAST)
    assert len(calls) == 1


# -- real transient failures through the proxy ---------------------------------------------------

@pytest.mark.timeout(120)
def test_reset_connections_are_retried(store_backend: Backend) -> None:
    with flaky_store(store_backend, bad=3) as (store, proxy):
        with pytest.raises(errors.TransientError) as exc:  # one try: the reset surfaces as transient
            store.get_range("obj", 0, 3)
        assert not isinstance(exc.value, errors.UnreachableError)
        assert retry.call_sync(lambda: store.get_range("obj", 0, 3), FAST, "GET obj") == b"abc"
        assert proxy.spoiled == 3


@pytest.mark.timeout(120)
async def test_truncated_body_is_retried_never_returned(store_backend: Backend) -> None:
    """The connection dies in the middle of the body: a transient error, then the whole range."""
    with flaky_store(store_backend, bad=2, status=CUT) as (store, proxy):
        with pytest.raises(errors.TransientError):
            store.get_range("big", 0, len(BIG))
        a = AsyncStore(store, policy=FAST)
        assert await a.get_range("big", 0, len(BIG)) == BIG
        assert a.requests == 2
        assert proxy.spoiled == 2


@pytest.mark.timeout(120)
async def test_async_store_retries_503(store_backend: Backend) -> None:
    with flaky_store(store_backend, bad=3, status=503) as (store, proxy):
        a = AsyncStore(store, policy=FAST)
        assert await a.get_range("obj", 1, 2) == b"bc"
        assert a.requests == 4
        assert proxy.spoiled == 3


@pytest.mark.timeout(120)
async def test_async_store_gives_up_after_max_attempts(store_backend: Backend) -> None:
    with flaky_store(store_backend, bad=1000, status=500) as (store, proxy):
        a = AsyncStore(store, policy=RetryPolicy(max_attempts=3, base_delay=0.005, max_delay=0.01))
        with pytest.raises(errors.TransientError):
            await a.head("obj")
        assert a.requests == 3
        assert proxy.spoiled == 3


@pytest.mark.timeout(120)
async def test_access_denied_is_not_retried(store_backend: Backend) -> None:
    with flaky_store(store_backend, bad=1000, status=403) as (store, proxy):
        a = AsyncStore(store, policy=FAST)
        with pytest.raises(errors.AccessDeniedError):
            await a.get_range("obj", 0, 1)
        assert a.requests == 1 and proxy.spoiled == 1


@pytest.mark.parametrize(
    ("status", "expected"),
    [(401, errors.AccessDeniedError), (403, errors.AccessDeniedError), (404, errors.NotFoundError),
     (412, errors.ObjectChangedError), (429, errors.ThrottledError), (500, errors.TransientError),
     (502, errors.TransientError), (503, errors.TransientError), (504, errors.TransientError),
     (400, errors.InvalidRequestError)],
)
@pytest.mark.timeout(60)
def test_status_translation(store_backend: Backend, status: int, expected: type[errors.StoreError]) -> None:
    """An HTTP status from the wire becomes the right error type (404: a key, the bucket exists)."""
    with flaky_store(store_backend, bad=1, status=status) as (store, _):
        with pytest.raises(errors.StoreError) as exc:
            store.get_range("obj", 0, 3)
        assert isinstance(exc.value, expected), (status, type(exc.value), exc.value)
        assert errors.is_temp_failure(exc.value) == issubclass(expected, errors.TransientError)
        if status == 404:
            assert not isinstance(exc.value, errors.BucketNotFoundError)
