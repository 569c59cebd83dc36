"""One suite for every store backend, against real servers on loopback.

``backend`` is parametrized over rclone's S3 server (the ``s3_server`` fixture of conftest),
fake-gcs-server (``gcs_server`` below) and the in-memory store (``fusefs.store.memory``, which
the layer tests run on: passing here is how it shows it behaves as the real ones do); each test
gets a fresh bucket. Nothing is mocked for the real backends: what passes here is what the
filesystem will see.

fake-gcs-server 1.56.1 ignores ``ifGenerationMatch`` on media downloads (it answers 200 with the
current generation); GCSStore therefore also checks the ``x-goog-generation`` header of every
pinned read, and ``test_version_pinning`` exercises exactly that path on the emulator.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from botocore.credentials import Credentials as BotoCredentials

from fusefs import errors
from fusefs.config import Credentials
from fusefs.config import MiB as MIB
from fusefs.retry import RetryPolicy
from fusefs.store.base import AsyncStore, BlockingStore
from fusefs.store.faulty import FaultyStore
from fusefs.store.gcs import UPLOAD_DIR, GCSStore
from fusefs.store.memory import MemoryServer
from fusefs.store.s3 import MULTIPART_THRESHOLD, S3Store
from testing.servers import FakeGCS, RcloneS3


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGCS]:
    """One fake-gcs-server for the whole session; each test gets its own bucket."""
    with FakeGCS(tmp_path_factory.mktemp("gcs")) as server:
        yield server


@dataclass
class Backend:
    """A running store server plus the way to open our store on it."""

    name: str
    server: RcloneS3 | FakeGCS

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def store(self, bucket: str, endpoint: str | None = None, credentials: Credentials | None = None,
              timeout: float = 30.0) -> BlockingStore:
        endpoint = endpoint or self.endpoint
        if self.name == "s3":
            return S3Store(bucket, endpoint, None, credentials or self.server.credentials, timeout=timeout)
        return GCSStore(bucket, endpoint, credentials or self.server.credentials, timeout=timeout)

    def new_bucket(self) -> str:
        return self.server.create_bucket()


@dataclass
class MemoryBackend:
    """The in-memory store, opened as ``Backend`` opens a real one."""

    server: MemoryServer
    name: str = "memory"

    @property
    def endpoint(self) -> str:
        return self.server.name

    def store(self, bucket: str, endpoint: str | None = None, credentials: Credentials | None = None,
              timeout: float = 30.0) -> BlockingStore:
        if endpoint in (None, self.endpoint):
            return self.server.store(bucket)
        # Another endpoint: the memory store has no network, so a store nobody answers is the
        # failure wrapper failing every call as an unreachable endpoint does.
        unreachable = FaultyStore(self.server.store(bucket))
        for op in ("head", "list", "get_range", "put", "put_file", "create_multipart", "copy", "copy_from",
                   "delete", "bucket_exists", "create_bucket", "delete_bucket", "check_access"):
            unreachable.fail(op, times=0, error=errors.UnreachableError)
        return unreachable

    def new_bucket(self) -> str:
        return self.server.create_bucket()


def make_backend(request: pytest.FixtureRequest) -> Backend:
    """The Backend for ``request.param``; only that backend's server gets started."""
    server = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
    return Backend(request.param, server)


@pytest.fixture(params=["s3", "gcs", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend | MemoryBackend:
    return MemoryBackend(MemoryServer()) if request.param == "memory" else make_backend(request)


@pytest.fixture
def store(backend: Backend | MemoryBackend) -> BlockingStore:
    return backend.store(backend.new_bucket())


def closed_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_all(store: BlockingStore, key: str, size: int, version: str | None = None, chunk: int = 8 * MIB) -> bytes:
    return b"".join(store.get_range(key, off, min(chunk, size - off), version) for off in range(0, size, chunk))


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MIB))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


def all_keys(store: BlockingStore, prefix: str = "") -> list[str]:
    keys: list[str] = []
    token: str | None = None
    while True:
        page = store.list(prefix, None, token)
        keys += [o.key for o in page.objects]
        token = page.next_token
        if not token:
            return keys


# -- reads ---------------------------------------------------------------------------------------

def test_head(store: BlockingStore) -> None:
    info = store.put("dir/file.bin", b"x" * 1234)
    got = store.head("dir/file.bin")
    assert (got.key, got.size, got.version) == ("dir/file.bin", 1234, info.version)
    assert got.version
    assert got.mtime > 0


def test_missing_key_is_not_found(store: BlockingStore) -> None:
    with pytest.raises(errors.NotFoundError) as exc:
        store.head("no/such/key")
    assert not isinstance(exc.value, errors.BucketNotFoundError)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(errors.NotFoundError) as exc2:
        store.get_range("no/such/key", 0, 10)
    assert not isinstance(exc2.value, errors.BucketNotFoundError)


def test_missing_bucket(backend: Backend | MemoryBackend) -> None:
    store = backend.store("nobucket-" + secrets.token_hex(6))
    assert not store.bucket_exists()
    for call in (lambda: store.head("k"), lambda: store.list(""), lambda: store.get_range("k", 0, 1),
                 store.check_access):
        with pytest.raises(errors.BucketNotFoundError):
            call()


def test_list_with_delimiter(store: BlockingStore) -> None:
    for key in ("top.txt", "a/1", "a/b/2", "a/b/c/3", "a/bz", "z/x"):
        store.put(key, key.encode())
    root = store.list("", "/")
    assert [o.key for o in root.objects] == ["top.txt"]
    assert root.prefixes == ["a/", "z/"]
    assert root.next_token is None
    a = store.list("a/", "/")
    assert [o.key for o in a.objects] == ["a/1", "a/bz"]
    assert a.prefixes == ["a/b/"]
    assert [o.size for o in a.objects] == [3, 4]
    deep = store.list("a/b/", "/")
    assert [o.key for o in deep.objects] == ["a/b/2"] and deep.prefixes == ["a/b/c/"]
    flat = store.list("a/", None)
    assert [o.key for o in flat.objects] == ["a/1", "a/b/2", "a/b/c/3", "a/bz"]
    assert flat.prefixes == []
    assert store.list("nothing/", "/").objects == []
    # the version a LIST reports is the one HEAD reports (metadata from LIST must be usable)
    assert {o.key: o.version for o in flat.objects}["a/1"] == store.head("a/1").version


def test_list_pagination(store: BlockingStore) -> None:
    keys = [f"many/{i:05d}" for i in range(1100)]
    # The first alone: rclone's local backend makes the folder `many` on a key's first PUT, and 16
    # first PUTs at once race to make it (one answers 500 InternalError; real stores have no folders).
    store.put(keys[0], b".")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put(k, b"."), keys[1:]))
    store.put("many/sub/inner", b"!")
    first = store.list("many/", "/")
    assert len(first.objects) == 1000
    assert first.next_token
    rest = store.list("many/", "/", first.next_token)
    assert rest.next_token is None
    assert [o.key for o in first.objects + rest.objects] == keys
    # fake-gcs-server repeats every common prefix on every page; callers merge pages as a set
    assert sorted(set(first.prefixes + rest.prefixes)) == ["many/sub/"]
    # small pages walk the same keys, without repeats
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page = store.list("many/", None, token, max_keys=300)
        assert len(page.objects) <= 300
        seen += [o.key for o in page.objects]
        pages += 1
        token = page.next_token
        if not token:
            break
    assert seen == sorted([*keys, "many/sub/inner"])
    assert pages == 4


def test_get_range_exact_bytes(store: BlockingStore) -> None:
    data = os.urandom(3 * MIB + 17)
    info = store.put("blob", data)
    n = len(data)
    for start, length in [(0, 1), (0, 1 * MIB), (12345, 1 * MIB + 3), (n // 2, 777), (n - 1, 1), (n - 100, 100),
                          (0, n)]:
        assert store.get_range("blob", start, length, info.version) == data[start : start + length], (start, length)
    assert store.get_range("blob", 5, 0) == b""
    # a range running past the end is cut at the end (what readers of the last block rely on)
    assert store.get_range("blob", n - 10, 100) == data[-10:]
    # a range starting at or after the end is refused alike on both stores (416)
    for start in (n, n + 5):
        with pytest.raises(errors.InvalidRequestError):
            store.get_range("blob", start, 10, info.version)


def test_key_names_needing_escapes(store: BlockingStore) -> None:
    key = "dir with space/ü#?%+&=;~'\"(x).txt"
    info = store.put(key, b"0123456789")
    assert store.head(key).version == info.version
    assert store.get_range(key, 3, 4, info.version) == b"3456"
    assert [o.key for o in store.list("dir with space/", "/").objects] == [key]
    assert store.list("", "/").prefixes == ["dir with space/"]
    assert store.copy(key, key + ".copy").size == 10
    store.delete(key)
    assert [o.key for o in store.list("dir with space/", "/").objects] == [key + ".copy"]


def test_version_pinning(store: BlockingStore) -> None:
    v1 = store.put("model.bin", b"A" * 4096)
    assert store.get_range("model.bin", 0, 10, v1.version) == b"A" * 10
    v2 = store.put("model.bin", b"B" * 4096)  # same size, other bytes: only the version tells
    assert v2.version != v1.version
    with pytest.raises(errors.ObjectChangedError) as exc:
        store.get_range("model.bin", 0, 10, v1.version)
    assert exc.value.errno == errno.ESTALE
    assert store.get_range("model.bin", 0, 10, v2.version) == b"B" * 10
    assert store.head("model.bin").version == v2.version


def test_s3_ranged_gets_skip_botocores_pipeline_once_learned(s3_server: RcloneS3) -> None:
    store = S3Store(s3_server.create_bucket(), s3_server.endpoint, None, s3_server.credentials)
    key = "dir with space/ü#?%+&=;~'\"(x).bin"
    data = os.urandom(MIB + 5)
    info = store.put(key, data)
    assert store.get_range(key, 0, 10, info.version) == data[:10]  # botocore's: teaches the URL
    assert store.direct.ready and store.direct.sent == 0
    for start, length in [(0, MIB + 5), (MIB, 5), (7, 1000)]:
        assert store.get_range(key, start, length, info.version) == data[start:start + length]
    assert store.direct.sent == 3
    # answers about the object go back to botocore, which maps them as always; the path stays on
    with pytest.raises(errors.NotFoundError):
        store.get_range("missing", 0, 10)
    store.put(key, b"other bytes")
    with pytest.raises(errors.ObjectChangedError):
        store.get_range(key, 0, 3, info.version)  # a 412, or (rclone ignores If-Match) the ETag check
    assert store.direct.ready
    # an answer that may be this path's own fault (here a 403: the credentials were revoked) turns
    # it off; the error the caller sees is botocore's
    cast(Any, store.client)._request_signer._credentials = BotoCredentials(s3_server.access_key, "revoked")
    with pytest.raises(errors.AccessDeniedError):
        store.get_range(key, 0, 3)
    assert not store.direct.enabled


# -- writes --------------------------------------------------------------------------------------

def test_put_and_put_file_small(store: BlockingStore, tmp_path: Path) -> None:
    info = store.put("p/small", memoryview(b"hello"))
    assert info.size == 5 and info.version == store.head("p/small").version
    path = tmp_path / "f"
    path.write_bytes(b"file contents")
    info = store.put_file("p/file", str(path))
    assert info.size == 13 and info.version == store.head("p/file").version
    assert store.get_range("p/file", 0, 13, info.version) == b"file contents"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert store.put_file("p/empty", str(empty)).size == 0
    assert store.head("p/empty").size == 0


def test_put_file_large(store: BlockingStore, tmp_path: Path) -> None:
    # above the S3 multipart threshold (and GCS's resumable-upload threshold)
    size = MULTIPART_THRESHOLD + 3 * MIB + 5
    path = tmp_path / "big"
    digest = random_file(path, size)
    info = store.put_file("big/file", str(path))
    head = store.head("big/file")
    assert info.size == head.size == size
    assert info.version == head.version
    assert hashlib.sha256(read_all(store, "big/file", size, head.version)).hexdigest() == digest


def test_multipart_upload(store: BlockingStore) -> None:
    parts = {1: os.urandom(5 * MIB), 2: os.urandom(5 * MIB + 1), 3: os.urandom(1234)}
    up = store.create_multipart("mp/obj")
    assert up.key == "mp/obj"
    with ThreadPoolExecutor(3) as pool:  # in parallel, finishing in any order
        list(pool.map(lambda n: up.upload_part(n, memoryview(parts[n])), [3, 1, 2]))
    info = up.complete()
    expected = parts[1] + parts[2] + parts[3]
    head = store.head("mp/obj")
    assert info.size == head.size == len(expected)
    assert info.version == head.version
    assert read_all(store, "mp/obj", len(expected), info.version) == expected
    # nothing but the object is left behind (GCS parts are temporary objects)
    assert all_keys(store) == ["mp/obj"]


def test_multipart_part_retry_overwrites(store: BlockingStore) -> None:
    """A part sent twice with the same bytes (what a retry does) counts once.

    (rclone refuses to replace a part with *different* bytes, 501 NotImplemented, so only the
    retry case is common ground.)"""
    up = store.create_multipart("mp/retried")
    up.upload_part(1, b"y" * (5 * MIB))
    up.upload_part(1, b"y" * (5 * MIB))
    up.upload_part(2, b"tail")
    info = up.complete()
    assert info.size == 5 * MIB + 4
    assert store.get_range("mp/retried", 5 * MIB - 2, 6, info.version) == b"yytail"


def test_multipart_abort(store: BlockingStore) -> None:
    up = store.create_multipart("mp/aborted")
    up.upload_part(1, os.urandom(5 * MIB))
    up.abort()
    up.abort()  # idempotent
    with pytest.raises(errors.NotFoundError):
        store.head("mp/aborted")
    assert all_keys(store) == []


def test_gcs_many_parts_compose_in_rounds(gcs_server: FakeGCS) -> None:
    """More parts than one compose request takes (32): composed in several rounds, in order."""
    store = GCSStore(gcs_server.create_bucket(), gcs_server.endpoint)
    up = store.create_multipart("d/many")
    chunks = [bytes([i]) * 1000 for i in range(70)]
    for i, c in enumerate(chunks, 1):
        up.upload_part(i, c)
    assert all(k.startswith(f"d/{UPLOAD_DIR}/") for k in all_keys(store))
    info = up.complete()
    assert store.get_range("d/many", 0, info.size, info.version) == b"".join(chunks)
    assert all_keys(store) == ["d/many"]


def test_copy(store: BlockingStore) -> None:
    data = os.urandom(2 * MIB + 3)
    store.put("src/a", data)
    info = store.copy("src/a", "dst/b")
    assert info.key == "dst/b" and info.size == len(data)
    assert info.version == store.head("dst/b").version
    assert store.get_range("dst/b", 0, len(data), info.version) == data
    assert store.head("src/a").size == len(data)  # the source stays
    with pytest.raises(errors.NotFoundError):
        store.copy("src/missing", "dst/c")


def test_delete_is_idempotent(store: BlockingStore) -> None:
    store.put("d/x", b"1")
    store.delete("d/x")
    with pytest.raises(errors.NotFoundError):
        store.head("d/x")
    store.delete("d/x")
    store.delete("never/existed")


def test_bucket_lifecycle(backend: Backend | MemoryBackend) -> None:
    name = "fresh-" + secrets.token_hex(5)
    store = backend.store(name)
    assert not store.bucket_exists()
    store.create_bucket()
    assert store.bucket_exists()
    store.create_bucket()  # idempotent
    store.check_access()
    store.delete_bucket()
    assert not store.bucket_exists()
    store.delete_bucket()  # idempotent


# -- failures ------------------------------------------------------------------------------------

def test_s3_wrong_credentials_access_denied(s3_server: RcloneS3) -> None:
    bucket = s3_server.create_bucket()
    wrong = Credentials(s3_server.access_key, "wrong-" + secrets.token_hex(8))
    store = S3Store(bucket, s3_server.endpoint, None, wrong)
    for call in (lambda: store.head("k"), lambda: store.list(""), store.check_access,
                 lambda: store.put("k", b"x")):
        with pytest.raises(errors.AccessDeniedError) as exc:
            call()
        assert exc.value.errno == errno.EACCES


@pytest.mark.timeout(60)
def test_unreachable_endpoint(backend: Backend | MemoryBackend) -> None:
    """Nobody listening: UnreachableError at once (no SDK retries hide it), which is transient."""
    store = backend.store("bucket", endpoint=f"http://127.0.0.1:{closed_port()}", timeout=5.0)
    for call in (lambda: store.head("k"), lambda: store.get_range("k", 0, 1), lambda: store.list("")):
        with pytest.raises(errors.UnreachableError) as exc:
            call()
        assert errors.is_temp_failure(exc.value)


# -- the trio wrapper ----------------------------------------------------------------------------

async def test_async_store(store: BlockingStore) -> None:
    a = AsyncStore(store, max_concurrent=4, policy=RetryPolicy(max_attempts=2))
    data = os.urandom(6 * MIB)
    info = await a.put("as/one", data)
    assert (await a.head("as/one")).version == info.version

    got: dict[int, bytes] = {}

    async def fetch(i: int) -> None:
        got[i] = await a.get_range("as/one", i * MIB, MIB, info.version)

    async with trio.open_nursery() as nursery:  # several ranged GETs in flight at once
        for i in range(6):
            nursery.start_soon(fetch, i)
    assert b"".join(got[i] for i in range(6)) == data

    up = await a.create_multipart("as/mp")
    await a.upload_part(up, 1, data[: 5 * MIB])
    await a.upload_part(up, 2, data[5 * MIB :])
    mp = await a.complete(up)
    assert mp.size == len(data)
    copied = await a.copy("as/mp", "as/copy")
    assert await a.get_range("as/copy", 0, len(data), copied.version) == data
    page = await a.list("as/", "/")
    assert [o.key for o in page.objects] == ["as/copy", "as/mp", "as/one"]
    await a.delete("as/copy")
    with pytest.raises(errors.NotFoundError):
        await a.head("as/copy")
    aborted = await a.create_multipart("as/aborted")
    await a.upload_part(aborted, 1, b"z" * 10)
    await a.abort(aborted)
    assert [o.key for o in (await a.list("as/", None)).objects] == ["as/mp", "as/one"]
    with pytest.raises(errors.ObjectChangedError):
        await a.put("as/one", b"new")
        await a.get_range("as/one", 0, 3, info.version)
    assert a.requests >= 14


async def test_async_store_not_found_is_not_retried(store: BlockingStore) -> None:
    a = AsyncStore(store, policy=RetryPolicy(max_attempts=5))
    with pytest.raises(errors.NotFoundError):
        await a.head("missing")
    assert a.requests == 1


# -- GCS credentials: a service account JSON, with its token endpoint on loopback -----------------

@dataclass
class TokenServer:
    """An OAuth token endpoint on loopback answering every request with ``status``."""

    status: int = 200
    requests: int = 0
    httpd: http.server.ThreadingHTTPServer | None = None

    @property
    def uri(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def __enter__(self) -> TokenServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ok = {"access_token": "tok-" + secrets.token_hex(8), "expires_in": 3600, "token_type": "Bearer"}
                body = json.dumps(ok if owner.status == 200 else {"error": "invalid_grant"}).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.httpd is not None
        self.httpd.shutdown()
        self.httpd.server_close()


def service_account_json(token_uri: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return json.dumps({
        "type": "service_account", "project_id": "objfs-test", "private_key_id": "k1", "private_key": pem,
        "client_email": "objfs@objfs-test.iam.gserviceaccount.com", "client_id": "1", "token_uri": token_uri,
    })


def test_gcs_service_account_json(gcs_server: FakeGCS) -> None:
    """Explicit service account JSON wins over anonymous access, even with an emulator endpoint."""
    bucket = gcs_server.create_bucket()
    with TokenServer() as tokens:
        creds = Credentials(service_account_json=service_account_json(tokens.uri))
        store = GCSStore(bucket, gcs_server.endpoint, creds)
        info = store.put("sa/obj", b"signed")
        assert store.get_range("sa/obj", 0, 6, info.version) == b"signed"
        assert tokens.requests == 1  # one token, reused while valid
        assert "PRIVATE KEY" not in repr(creds)


@pytest.mark.timeout(120)
def test_gcs_service_account_refused_token(gcs_server: FakeGCS) -> None:
    bucket = gcs_server.create_bucket()
    with TokenServer(status=400) as tokens:
        creds = Credentials(service_account_json=service_account_json(tokens.uri))
        store = GCSStore(bucket, gcs_server.endpoint, creds)
        with pytest.raises(errors.AccessDeniedError) as exc:
            store.head("k")
        assert not errors.is_temp_failure(exc.value)


@pytest.mark.timeout(120)
def test_gcs_service_account_token_service_unreachable(gcs_server: FakeGCS) -> None:
    bucket = gcs_server.create_bucket()
    sa = service_account_json(f"http://127.0.0.1:{closed_port()}/token")
    store = GCSStore(bucket, gcs_server.endpoint, Credentials(service_account_json=sa), timeout=5.0)
    with pytest.raises(errors.UnreachableError):
        store.get_range("k", 0, 1)


@pytest.mark.parametrize("text", ['{"type": "service_account"}', "not json", "[]", '{"private_key": "-----BEGIN x'])
def test_gcs_malformed_service_account_json(gcs_server: FakeGCS, text: str) -> None:
    with pytest.raises(errors.AccessDeniedError, match="service account JSON is malformed") as exc:
        GCSStore("b", gcs_server.endpoint, Credentials(service_account_json=text))
    assert "BEGIN" not in str(exc.value)
