"""The grant connection (``fusefs.wire.grant``) end to end in one process: a ``GrantClient`` on one
end of a socket pair, the data service's ``GrantServer`` with a ``LocalData`` on the other, a real
S3 server behind it. Also the frame bytes themselves: old sidecars keep talking to new plugins."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from fusefs import errors
from fusefs.config import MountConfig, Tuning
from fusefs.nodecache.cache import NodeCache
from fusefs.retry import RetryPolicy
from fusefs.service.local import LocalData
from fusefs.service.scope import ReadOnlyError
from fusefs.store import AsyncStore, open_store
from fusefs.store.base import ObjectInfo
from fusefs.wire import grant as W
from testing.servers import RcloneS3, random_bytes

MiB = 1024 * 1024
BLOCK = MiB


def local_data(config: MountConfig, prefix: str = "", read_only: bool = False,
               cache: NodeCache | None = None) -> LocalData:
    store = AsyncStore(open_store(config), 8, RetryPolicy(deadline=5))
    volume = dataclasses.replace(config, prefix=prefix, read_only=read_only, tuning=Tuning(block_size=BLOCK))
    return LocalData.for_config(volume, store, cache=cache)


@asynccontextmanager
async def connected(data: LocalData) -> AsyncIterator[W.GrantClient]:
    ours, theirs = socket.socketpair()

    async def make(_fuse_fd: int | None) -> LocalData:
        return data

    async with trio.open_nursery() as nursery:
        nursery.start_soon(W.GrantServer(theirs, make).serve)
        async with W.GrantClient(ours, None, reconnect_wait=5) as client:
            yield client
        nursery.cancel_scope.cancel()


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


def test_frames_are_pinned_byte_for_byte() -> None:
    """The layout old sidecars and new plugins (and the other way round) must both read."""
    frame = b"".join(bytes(b) for b in W.encode({"id": 7, "op": "head", "key": "a"}, b"xyz"))
    head = b'{"id":7,"op":"head","key":"a"}'
    assert frame == struct.pack("!IQ", len(head), 3) + head + b"xyz"
    assert W.VERSION == 1
    # metadata rides in the header, only when there is some: a request without it is unchanged
    assert W._with_meta({"id": 8, "op": "put", "key": "a"}, None) == {"id": 8, "op": "put", "key": "a"}
    put = b"".join(bytes(b) for b in W.encode(W._with_meta({"id": 8, "op": "put", "key": "a"}, {"mtime": "5"}), b"x"))
    head = b'{"id":8,"op":"put","key":"a","meta":{"mtime":"5"}}'
    assert put == struct.pack("!IQ", len(head), 1) + head + b"x"
    info = ObjectInfo("a", 1, "e", 2.0, (("mode", "33188"),))
    set_meta = json.dumps({"id": 9, "op": "set_meta", "key": "a", "info": W._info_to(info), "meta": {"uid": "7"}},
                          separators=(",", ":"))
    assert set_meta == ('{"id":9,"op":"set_meta","key":"a","info":{"key":"a","size":1,"version":"e","mtime":2.0,'
                        '"meta":{"mode":"33188"}},"meta":{"uid":"7"}}')
    assert W._info_from(json.loads(set_meta)["info"]) == info
    assert W._info_to(ObjectInfo("a", 1, "e", 2.0)) == {"key": "a", "size": 1, "version": "e", "mtime": 2.0}


def test_reads_lists_and_writes_through_the_connection(s3_server: RcloneS3, bucket: str) -> None:
    data = random_bytes(2 * BLOCK + 123, seed=1)
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="vol/a.bin", Body=data)
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=s3_server.endpoint,
                         credentials=s3_server.credentials)

    async def main() -> None:
        async with connected(local_data(config, "vol/")) as client:
            assert client.block_size == BLOCK and not client.node_cache
            info = await client.head("vol/a.bin")
            assert info.size == len(data)
            blocks = [await client.read_block(info, i) for i in range(3)]
            assert b"".join(blocks) == data
            assert await client.get_range("vol/a.bin", 5, 10, info.version) == data[5:15]
            page = await client.list("vol/", "/")
            assert [o.key for o in page.objects] == ["vol/a.bin"]
            stored = await client.put("vol/b.txt", b"hello")
            assert stored.size == 5
            upload = await client.create_multipart("vol/c.bin")
            await client.upload_part(upload, 1, data[: 5 * MiB] if len(data) > 5 * MiB else data)
            done = await client.complete(upload)
            assert done.size == len(data)
            await client.delete("vol/b.txt")
            with pytest.raises(errors.NotFoundError):
                await client.head("vol/b.txt")

    run(main)
    assert s3_server.read_object(bucket, "vol/c.bin") == data


def test_a_grant_reaches_only_its_prefix_and_a_read_only_grant_writes_nothing(
        s3_server: RcloneS3, bucket: str) -> None:
    """A sidecar that names another volume's keys (or writes through a read-only volume) is refused
    by the service: the credentials that could do it never leave the service."""
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="tenant-a/secret.txt", Body=b"a's data")
    s3.put_object(Bucket=bucket, Key="tenant-b/mine.txt", Body=b"b's data")
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=s3_server.endpoint,
                         credentials=s3_server.credentials)
    other = ObjectInfo("tenant-a/secret.txt", 8, "x", 0.0)

    async def main() -> None:
        async with connected(local_data(config, "tenant-b/", read_only=True)) as client:
            assert (await client.head("tenant-b/mine.txt")).size == 8
            for attempt in (client.head("tenant-a/secret.txt"), client.list("tenant-a/", "/"),
                            client.list("", "/"), client.list("tenant-", "/"),
                            client.get_range("tenant-a/secret.txt", 0, 8), client.read_block(other, 0),
                            client.copy("tenant-a/secret.txt", "tenant-b/stolen.txt")):
                with pytest.raises(errors.AccessDeniedError):
                    await attempt
            mine = await client.head("tenant-b/mine.txt")
            for write in (client.put("tenant-b/new.txt", b"x"), client.delete("tenant-b/mine.txt"),
                          client.create_multipart("tenant-b/big.bin"), client.set_meta(mine, {"mode": "33279"}),
                          client.put("tenant-b/link", b"mine.txt", {"mode": "41471"})):
                with pytest.raises(ReadOnlyError):
                    await write
        async with connected(local_data(config, "tenant-b/")) as client:
            # writable, but still only its own prefix: metadata onto another tenant's object is refused
            with pytest.raises(errors.AccessDeniedError):
                await client.set_meta(other, {"mode": "33279"})
            with pytest.raises(errors.AccessDeniedError):
                await client._call({"op": "set_meta", "key": other.key, "info": W._info_to(other),
                                    "meta": {"mode": "33279"}})
            # a part copied from another tenant's object into an upload of this volume: refused
            upload = await client.create_multipart("tenant-b/copy.bin")
            with pytest.raises(errors.AccessDeniedError):
                await client.upload_part_copy(upload, 1, other, 0, 8)
            mine = await client.head("tenant-b/mine.txt")
            with pytest.raises(errors.InvalidRequestError):
                await client.upload_part_copy(upload, 1, mine, 4, 8)  # past its end
            await client.abort(upload)

    run(main)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"tenant-a/secret.txt", "tenant-b/mine.txt"}
    assert s3.head_object(Bucket=bucket, Key="tenant-a/secret.txt")["Metadata"] == {}
    assert s3.head_object(Bucket=bucket, Key="tenant-b/mine.txt")["Metadata"] == {}


def test_malformed_requests_get_errors_and_the_connection_keeps_serving(s3_server: RcloneS3, bucket: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"v")
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=s3_server.endpoint,
                         credentials=s3_server.credentials)

    async def main() -> None:
        async with connected(local_data(config)) as client:
            for header in ({"op": "nope"}, {"op": "head", "key": 5}, {"op": "read", "info": "x", "index": 0},
                           {"op": "read", "info": {"key": "k", "size": -1, "version": "v"}, "index": 0},
                           {"op": "mp_part", "upload": 99, "number": 1, "key": "k"},
                           {"op": "range", "key": "k", "start": 0, "length": 65 * MiB},
                           {"op": "put", "key": "k", "meta": {"Bad Name": "x"}},
                           {"op": "put", "key": "k", "meta": {"big": "x" * 3000}},
                           {"op": "set_meta", "key": "k", "info": {"key": "k", "size": 1, "version": "v"},
                            "meta": ["mode"]}):
                with pytest.raises(errors.StoreError):
                    await client._call(header)
            assert (await client.head("k")).size == 1

    run(main)


def test_requests_wait_for_a_new_connection_after_the_service_went_away(s3_server: RcloneS3, bucket: str) -> None:
    """A restarted plugin hands the server a new connection: a request in between waits for it."""
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"value")
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=s3_server.endpoint,
                         credentials=s3_server.credentials)

    async def main() -> None:
        data = local_data(config)

        async def make(_fuse_fd: int | None) -> LocalData:
            return data

        async def service(sock: socket.socket, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await W.GrantServer(sock, make).serve()

        first, first_service = socket.socketpair()
        async with trio.open_nursery() as nursery:
            first_scope = await nursery.start(service, first_service)
            async with W.GrantClient(first, None, reconnect_wait=30) as client:
                assert (await client.head("k")).size == 5
                first_scope.cancel()  # the data service dies with the plugin (its end closes)
                with trio.fail_after(10):
                    while client.connected:  # noqa: ASYNC110 (the client's own state: no event to wait on)
                        await trio.sleep(0.01)
                got: list[int] = []
                answered = trio.Event()

                async def ask() -> None:
                    got.append((await client.head("k")).size)
                    answered.set()

                nursery.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []  # waiting for a connection, not failed
                second, second_service = socket.socketpair()
                await nursery.start(service, second_service)
                client.replace(second)
                with trio.fail_after(10):
                    await answered.wait()
                assert got == [5]
            nursery.cancel_scope.cancel()

    run(main)


def test_the_node_cache_stays_on_the_service_side(s3_server: RcloneS3, bucket: str, tmp_path: Path) -> None:
    data = random_bytes(BLOCK + 10, seed=2)
    s3_server.client().put_object(Bucket=bucket, Key="m.bin", Body=data)
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=s3_server.endpoint,
                         credentials=s3_server.credentials)
    cache = NodeCache(str(tmp_path / "cache"), 64 * MiB)

    async def main() -> None:
        async with connected(local_data(config, cache=cache)) as client:
            assert client.node_cache
            info = await client.head("m.bin")
            assert await client.read_block(info, 0) + await client.read_block(info, 1) == data
            with trio.fail_after(20):
                while not await client.on_node(info, 0):  # noqa: ASYNC110 (the cache's writer thread)
                    await trio.sleep(0.05)

    try:
        run(main)
    finally:
        cache.close()


def test_hello_must_come_first(s3_server: RcloneS3, bucket: str) -> None:
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=s3_server.endpoint,
                         credentials=s3_server.credentials)

    async def main() -> None:
        ours, theirs = socket.socketpair()

        async def make(_fd: int | None) -> LocalData:
            return local_data(config)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(W.GrantServer(theirs, make).serve)
            sock = trio.socket.from_stdlib_socket(ours)
            await sock.send(b"".join(bytes(b) for b in W.encode({"id": 1, "op": "head", "key": "k"})))
            header, _ = await W.read_frame(sock)
            assert "error" in header and "hello" in json.dumps(header)

    run(main)


def test_peek_frames_are_pinned_byte_for_byte() -> None:
    """A GET that describes an object (``peek``): the request the client sends and the answer it
    reads, as bytes on the socket (the test plays the data service)."""

    async def main() -> None:
        ours, theirs = socket.socketpair()
        service = trio.socket.from_stdlib_socket(theirs)
        hello = {"version": 1, "identity": "s3|x|b", "block_size": BLOCK, "node_cache": False,
                 "limits": {"max_parts": 10000, "min_part_size": 5 * MiB, "max_part_size": 5 * 1024 * MiB,
                            "max_object_size": 5 * 1024 * 1024 * MiB, "part_copy": "ranges"}}
        seen: list[bytes] = []

        async def serve() -> None:
            await W.read_frame(service)  # hello (pinned by the tests above)
            await W._send(service, W.encode(hello))
            raw = b""
            while len(raw) < 12 or len(raw) < 12 + struct.unpack("!IQ", raw[:12])[0]:
                raw += await service.recv(4096)
            seen.append(raw)
            answer = (b'{"id":1,"info":{"key":"vol/a","size":9,"version":"e1","mtime":2.0,'
                      b'"meta":{"mtime":"5"}}}')
            await service.send(struct.pack("!IQ", len(answer), 4) + answer + b"abcd")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            async with W.GrantClient(ours, None, reconnect_wait=5) as client:
                got = await client.peek("vol/a", 4)
            nursery.cancel_scope.cancel()
        request = b'{"id":1,"op":"peek","key":"vol/a","length":4}'
        assert seen == [struct.pack("!IQ", len(request), 0) + request]
        assert got == (ObjectInfo("vol/a", 9, "e1", 2.0, (("mtime", "5"),)), b"abcd")
        assert W.STORE_KINDS["peek"] == "GET"

    run(main)


def test_peek_reaches_only_the_grants_prefix_and_fills_the_node_cache(
        s3_server: RcloneS3, bucket: str, tmp_path: Path) -> None:
    """``peek`` (a GET of an object's first bytes with its description) is a read: a read-only
    grant may do it under its prefix, never of another tenant's key or outside its prefix; the
    block it fetched is in the node cache under the version it answered."""
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="tenant-a/secret.txt", Body=b"a's data")
    s3.put_object(Bucket=bucket, Key="tenant-b/mine.txt", Body=b"b's data", Metadata={"mode": "33188"})
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=s3_server.endpoint,
                         credentials=s3_server.credentials)
    cache = NodeCache(str(tmp_path / "cache"), 64 * MiB)

    async def main() -> None:
        async with connected(local_data(config, "tenant-b/", read_only=True, cache=cache)) as client:
            info, data = await client.peek("tenant-b/mine.txt", BLOCK)
            assert (info.size, data, dict(info.meta or ())) == (8, b"b's data", {"mode": "33188"})
            assert info.version == (await client.head("tenant-b/mine.txt")).version
            with trio.fail_after(20):
                while not await client.on_node(info, 0):  # noqa: ASYNC110 (the cache's writer thread)
                    await trio.sleep(0.05)
            assert await client.read_block(info, 0) == b"b's data"
            for key in ("tenant-a/secret.txt", "secret.txt", "tenant-", "", "tenant-b"):
                with pytest.raises(errors.AccessDeniedError):
                    await client.peek(key, 8)
            with pytest.raises(errors.AccessDeniedError):
                await client._call({"op": "peek", "key": "tenant-a/secret.txt", "length": 8})
            for header in ({"op": "peek", "key": "tenant-b/mine.txt", "length": 0},
                           {"op": "peek", "key": "tenant-b/mine.txt", "length": BLOCK + 1},
                           {"op": "peek", "key": "tenant-b/mine.txt", "length": "8"},
                           {"op": "peek", "key": ["tenant-b/mine.txt"], "length": 8}):
                with pytest.raises(errors.InvalidRequestError):
                    await client._call(header)
            with pytest.raises(errors.NotFoundError):
                await client.peek("tenant-b/nothing", 8)

    try:
        run(main)
    finally:
        cache.close()
