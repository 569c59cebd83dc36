"""The grant connection: a pod's FUSE server (client) and the node's data service (server),
both ends of one protocol in one module.

The CSI node plugin connects a socket pair per published volume, gives one end to the data service
with the volume's grant (bucket, prefix, read-only, credentials: ``fusefs.proc.dataservice``) and the
other to the pod's sidecar. The sidecar holds nothing else of value: every store request and every
node-cache read of its volume goes through this connection, and the service answers only what the
grant covers (``fusefs.service.scope``).

Frames, both ways (this byte layout is a contract: old sidecars keep running while the node plugin
is upgraded; ``tests/unit/test_wire_grant.py`` pins it)::

    u32 header length (big-endian) | u64 payload length | header: UTF-8 JSON object | payload bytes

The first frame from the client is ``{"op": "hello", "version": 1}``, sent with the sidecar's
mounted /dev/fuse fd (SCM_RIGHTS) where FUSE passthrough may be used; the service answers with what
the client must know (block size, store limits, whether a node cache and passthrough are there).
Then requests ``{"id": N, "op": ..., args}``, answered in any order by ``{"id": N, ...result}`` or
``{"id": N, "error": {"type": <fusefs.errors class>, "message": ...}}``; a payload carries the bytes
of ``put``/``part`` requests and of ``read``/``range``/``peek`` answers. Many requests are in flight
at once.

A lost connection (node plugin restarted or upgraded) is not a lost mount: requests wait for the
next connection (``GrantClient.replace``, which the restarted plugin hands over from its records)
for at most ``RECONNECT_WAIT`` seconds, then fail with EIO. Multipart uploads are the service's
state: an upload whose connection was lost fails (its writer gets EIO at close), and is never
completed with missing parts.
"""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import trio

from fusefs import buffers, errors, filemeta, metrics
from fusefs.service.local import MAX_RANGE, LocalData
from fusefs.service.scope import ReadOnlyError
from fusefs.store.base import ListPage, MultipartUpload, ObjectInfo, StoreLimits
from fusefs.wire.fds import recv_with_fds

log = logging.getLogger(__name__)

VERSION = 1
FRAME = struct.Struct("!IQ")
MAX_HEADER = 64 * 1024
#: the largest payload either side accepts: a block, range or part is at most this
MAX_PAYLOAD = MAX_RANGE
#: requests one connection may have in flight at the service: a flood waits, it does not grow
SERVICE_IN_FLIGHT = 64
#: how long a request waits for a new connection after the service went away
RECONNECT_WAIT = 60.0
#: a client that does not say hello within this is dropped
HELLO_TIMEOUT = 10.0
FUSE_DEVICE = os.makedev(10, 229)

#: error types that cross the wire (by class name); anything else arrives as a StoreError (EIO)
ERRORS: dict[str, type[errors.StoreError]] = {
    cls.__name__: cls for cls in (
        errors.StoreError, errors.NotFoundError, errors.BucketNotFoundError, errors.AccessDeniedError,
        errors.ObjectChangedError, errors.AlreadyExistsError, errors.InvalidRequestError,
        errors.FileTooLargeError, errors.TransientError, errors.ThrottledError, errors.UnreachableError,
        errors.UnsupportedError, ReadOnlyError,
    )
}


#: the store request each grant request stands for, in this server's figures (``fusefs.metrics``)
STORE_KINDS = {"head": "HEAD", "list": "LIST", "range": "GET", "read": "GET", "peek": "GET", "put": "PUT",
               "mp_create": "CREATE-MULTIPART", "mp_part": "PART", "mp_complete": "COMPLETE", "mp_abort": "ABORT",
               "copy": "COPY", "delete": "DELETE", "check": "CHECK", "set_meta": "SET-META",
               "mp_copy": "PART-COPY"}


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed."""


# -- frames ------------------------------------------------------------------------------------
def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    """One frame as buffers to send (the payload is not copied)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise ProtocolError(f"header of {len(head)} bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes")
    return [FRAME.pack(len(head), len(payload)) + head, payload]


async def _read_exactly(sock: trio.socket.SocketType, n: int) -> bytearray:
    # A block's buffer comes from the process's pool (fusefs.buffers: the reader gives dropped
    # blocks back), every byte overwritten here: a fresh 8 MiB buffer per block costs thousands of
    # page faults, which made reads through the data service ~0.6x of reads served in-process.
    buf = buffers.take(n)
    with memoryview(buf) as view:
        got = 0
        while got < n:
            count = await sock.recv_into(view[got:])
            if not count:
                raise EOFError("the connection closed")
            got += count
    return buf


async def read_frame(sock: trio.socket.SocketType) -> tuple[dict[str, Any], bytes]:
    """The next frame; ProtocolError for a malformed one, EOFError at the end."""
    hlen, plen = FRAME.unpack(await _read_exactly(sock, FRAME.size))
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large (header {hlen}, payload {plen} bytes)")
    head = await _read_exactly(sock, hlen)
    try:
        header = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    # not copied into bytes: a block is 8 MiB, and every reader takes any buffer
    if not plen:
        return header, b""
    # Not copied into bytes (a block is 8 MiB): every reader of a payload takes any buffer.
    return header, cast(bytes, await _read_exactly(sock, plen))


async def _send(sock: trio.socket.SocketType, buffers: list[bytes | memoryview]) -> None:
    for buf in buffers:
        view = memoryview(buf).cast("B")
        while view:
            sent = await sock.send(view)
            view = view[sent:]


def _info_to(info: ObjectInfo, meta: bool = True) -> dict[str, Any]:
    """``meta``: with the object's metadata (not for reads: a block is the version's, whatever
    the metadata says, and a read request stays as small as before)."""
    d: dict[str, Any] = {"key": info.key, "size": info.size, "version": info.version, "mtime": info.mtime}
    if meta and info.meta is not None:  # absent: not known (an S3 listing), as before metadata was sent
        d["meta"] = dict(info.meta)
    return d


def _info_from(d: Any) -> ObjectInfo:
    if not isinstance(d, dict):
        raise ProtocolError("an object's description is not a JSON object")
    key, size, version, mtime = d.get("key"), d.get("size"), d.get("version"), d.get("mtime", 0.0)
    if (not isinstance(key, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0
            or not isinstance(version, str) or not isinstance(mtime, int | float)):
        raise ProtocolError("malformed object description")
    meta = d.get("meta")
    if meta is not None:
        try:
            meta = filemeta.pairs_of(filemeta.check(meta))
        except ValueError as exc:
            raise ProtocolError(f"malformed object metadata: {exc}") from None
    return ObjectInfo(key=key, size=size, version=version, mtime=float(mtime), meta=meta)


def _error_to(exc: BaseException) -> dict[str, Any]:
    name = type(exc).__name__
    for cls in type(exc).__mro__:  # the nearest class the other side knows
        if cls.__name__ in ERRORS:
            name = cls.__name__
            break
    else:
        name = "StoreError"
    return {"type": name, "message": str(exc)}


def _error_from(d: Any, key: str | None = None) -> errors.StoreError:
    if not isinstance(d, dict):
        return errors.StoreError("the data service answered a malformed error")
    cls = ERRORS.get(str(d.get("type")), errors.StoreError)
    return cls(str(d.get("message", "the data service refused the request"))[:1000], key=key)


# -- the client: the pod's FUSE server ------------------------------------------------------------
@dataclass
class RemoteUpload:
    """A multipart upload held by the data service (``MultipartUpload`` for the write layer)."""

    key: str
    handle: int
    connection: int  # which connection started it: after a reconnect the service has forgotten it

    def upload_part(self, number: int, data: bytes | memoryview) -> None:
        raise RuntimeError("remote uploads are driven through GrantClient")

    def upload_part_copy(self, number: int, src: ObjectInfo, start: int, length: int) -> None:
        raise RuntimeError("remote uploads are driven through GrantClient")

    def complete(self) -> ObjectInfo:
        raise RuntimeError("remote uploads are driven through GrantClient")

    def abort(self) -> None:
        raise RuntimeError("remote uploads are driven through GrantClient")


@dataclass
class _Waiter:
    done: trio.Event
    connection: int
    header: dict[str, Any] | None = None
    payload: bytes = b""


class GrantClient:
    """A ``fusefs.service.api.DataClient`` over a grant connection. Use ``async with``."""

    def __init__(self, sock: socket.socket, fuse_fd: int | None = None,
                 reconnect_wait: float = RECONNECT_WAIT) -> None:
        self._first = sock
        self.fuse_fd = fuse_fd
        self.reconnect_wait = reconnect_wait
        self.identity = ""
        self.limits = StoreLimits(10000, 5 * 1024 * 1024, 5 * 1024 ** 3, 5 * 1024 ** 4)
        self.block_size = 0
        self.node_cache = False
        self.cache_disabled = False
        self.passthrough = False
        self._requests = 0
        self._sock: trio.socket.SocketType | None = None
        self._connection = 0  # counts connections: answers and uploads belong to one
        self._connected = trio.Event()
        self._send_lock = trio.Lock()
        self._next_id = 1
        self._waiting: dict[int, _Waiter] = {}
        self._nursery: trio.Nursery | None = None
        self._new: trio.MemorySendChannel[socket.socket]
        self._new_rx: trio.MemoryReceiveChannel[socket.socket]
        self._new, self._new_rx = trio.open_memory_channel(4)

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def connected(self) -> bool:
        """Whether a connection to the data service is up (requests wait while it is not)."""
        return self._connected.is_set()

    async def __aenter__(self) -> GrantClient:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        await self._attach(self._first)
        self._nursery.start_soon(self._reconnector)
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        if self._sock is not None:
            self._sock.close()
        return await self._nursery_cm.__aexit__(*exc)  # type: ignore[arg-type]

    def replace(self, sock: socket.socket) -> None:
        """A new connection for this grant (the node plugin restarted): requests go on there."""
        self._new.send_nowait(sock)

    async def _reconnector(self) -> None:
        async for sock in self._new_rx:
            try:
                await self._attach(sock)
            except (OSError, EOFError, ProtocolError, errors.StoreError) as exc:
                log.warning("a new grant connection failed its greeting: %s", exc)

    async def _attach(self, raw: socket.socket) -> None:
        raw.setblocking(False)
        sock = trio.socket.from_stdlib_socket(raw)
        header, _ = await self._hello(sock)
        old, self._sock = self._sock, sock
        if old is not None:
            old.close()
        self._connection += 1
        self.identity = str(header.get("identity", ""))
        lim = header.get("limits") or {}
        self.limits = StoreLimits(int(lim["max_parts"]), int(lim["min_part_size"]), int(lim["max_part_size"]),
                                  int(lim["max_object_size"]), str(lim.get("part_copy") or ""))
        self.block_size = int(header["block_size"])
        self.node_cache = bool(header.get("node_cache"))
        self.cache_disabled = bool(header.get("cache_disabled"))
        self.passthrough = bool(header.get("passthrough"))
        assert self._nursery is not None
        self._nursery.start_soon(self._reader, sock, self._connection)
        self._connected.set()

    async def _hello(self, sock: trio.socket.SocketType) -> tuple[dict[str, Any], bytes]:
        buffers = encode({"op": "hello", "version": VERSION})
        data = b"".join(bytes(b) for b in buffers)
        if self.fuse_fd is not None:
            fds = array.array("i", [self.fuse_fd])
            sent = await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        else:
            sent = await sock.send(data)
        if sent < len(data):
            await _send(sock, [data[sent:]])
        with trio.fail_after(HELLO_TIMEOUT):
            header, payload = await read_frame(sock)
        if "error" in header:
            raise _error_from(header["error"])
        if header.get("version") != VERSION:
            raise ProtocolError(f"the data service speaks version {header.get('version')}, not {VERSION}")
        return header, payload

    async def _reader(self, sock: trio.socket.SocketType, connection: int) -> None:
        try:
            while True:
                header, payload = await read_frame(sock)
                waiter = self._waiting.get(header.get("id", -1))
                if waiter is None or waiter.connection != connection:
                    continue
                waiter.header, waiter.payload = header, payload
                waiter.done.set()
        except (OSError, EOFError, ProtocolError, trio.ClosedResourceError) as exc:
            log.debug("grant connection %d ended: %s", connection, exc)
        if connection == self._connection:
            self._connected = trio.Event()
            log.warning("the data service went away: store requests wait up to %.0fs for it to come back",
                        self.reconnect_wait)
        for waiter in list(self._waiting.values()):
            if waiter.connection == connection:
                waiter.done.set()  # without a header: sent again on the next connection

    async def _call(self, header: dict[str, Any], payload: bytes | memoryview = b"",
                    connection: int | None = None) -> tuple[dict[str, Any], bytes]:
        """One request, counted in this server's figures as the store request it stands for (a
        block the node cache answered is no GET)."""
        counted = metrics.store_kind(STORE_KINDS.get(str(header.get("op")), "OTHER"))
        try:
            answer, data = await self._exchange(header, payload, connection)
        except errors.StoreError as exc:
            counted.attempt(1)
            counted.failed(exc)
            raise
        if header.get("op") != "read" or answer.get("fetched"):
            counted.attempt(1)
            counted.succeeded(data if data else answer.get("info"), len(payload))
        return answer, data

    async def _exchange(self, header: dict[str, Any], payload: bytes | memoryview = b"",
                        connection: int | None = None) -> tuple[dict[str, Any], bytes]:
        """Send one request and wait for its answer, across reconnections (bounded)."""
        request_id = self._next_id
        self._next_id += 1
        header = {"id": request_id, **header}
        key = header.get("key")
        with trio.move_on_after(self.reconnect_wait) as waited:
            while True:
                await self._connected.wait()
                if connection is not None and connection != self._connection:
                    raise errors.TransientError("the data service restarted during this upload",
                                                key=key if isinstance(key, str) else None)
                sock = self._sock
                assert sock is not None
                waiter = _Waiter(trio.Event(), self._connection)
                self._waiting[request_id] = waiter
                try:
                    self._requests += 1
                    try:
                        async with self._send_lock:
                            await _send(sock, encode(header, payload))
                    except (OSError, trio.ClosedResourceError):
                        if self._sock is sock and self._connected.is_set():
                            self._connected = trio.Event()  # gone: wait for the next one
                        continue
                    await waiter.done.wait()
                finally:
                    self._waiting.pop(request_id, None)
                if waiter.header is not None:
                    break
        if waited.cancelled_caught:
            raise errors.UnreachableError(f"the node's data service did not come back within "
                                          f"{self.reconnect_wait:.0f}s", key=key if isinstance(key, str) else None)
        answer = waiter.header
        assert answer is not None
        if "error" in answer:
            raise _error_from(answer["error"], key if isinstance(key, str) else None)
        return answer, waiter.payload

    # -- DataClient ---------------------------------------------------------------------------
    async def check_access(self) -> None:
        await self._call({"op": "check"})

    async def head(self, key: str) -> ObjectInfo:
        answer, _ = await self._call({"op": "head", "key": key})
        return _info_from(answer.get("info"))

    async def list(self, prefix: str, delimiter: str | None = "/", token: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        answer, _ = await self._call({"op": "list", "key": prefix, "delimiter": delimiter, "token": token,
                                      "max_keys": max_keys})
        objects = answer.get("objects")
        prefixes = answer.get("prefixes")
        if not isinstance(objects, list) or not isinstance(prefixes, list):
            raise ProtocolError("malformed listing")
        next_token = answer.get("next_token")
        return ListPage([_info_from(o) for o in objects], [str(p) for p in prefixes],
                        next_token if isinstance(next_token, str) else None)

    async def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes:
        _, payload = await self._call({"op": "range", "key": key, "start": start, "length": length,
                                       "version": version})
        return payload

    async def peek(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        answer, payload = await self._call({"op": "peek", "key": key, "length": length})
        info = _info_from(answer.get("info"))
        if info.key != key or len(payload) > length:
            raise errors.StoreError(f"the data service answered a GET of {key!r} with another object", key=key)
        return info, payload

    async def read_block(self, info: ObjectInfo, index: int, warming: bool = False) -> bytes:
        _, payload = await self._call({"op": "read", "key": info.key, "info": _info_to(info, False), "index": index,
                                       "warming": warming})
        return payload

    async def on_node(self, info: ObjectInfo, index: int) -> bool:
        answer, _ = await self._call({"op": "on_node", "key": info.key, "info": _info_to(info, False),
                                      "index": index})
        return bool(answer.get("yes"))

    async def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo:
        answer, _ = await self._call(_with_meta({"op": "put", "key": key}, meta), data)
        return _info_from(answer.get("info"))

    async def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> MultipartUpload:
        answer, _ = await self._call(_with_meta({"op": "mp_create", "key": key}, meta))
        return RemoteUpload(key, int(answer["upload"]), self._connection)

    def _remote(self, upload: MultipartUpload) -> RemoteUpload:
        if not isinstance(upload, RemoteUpload):
            raise TypeError("not an upload of this grant connection")
        return upload

    async def upload_part(self, upload: MultipartUpload, number: int, data: bytes | memoryview) -> None:
        up = self._remote(upload)
        await self._call({"op": "mp_part", "key": up.key, "upload": up.handle, "number": number}, data,
                         connection=up.connection)

    async def upload_part_copy(self, upload: MultipartUpload, number: int, src: ObjectInfo, start: int,
                               length: int) -> None:
        up = self._remote(upload)
        await self._call({"op": "mp_copy", "key": up.key, "upload": up.handle, "number": number,
                          "src": _info_to(src), "start": start, "length": length}, connection=up.connection)

    async def complete(self, upload: MultipartUpload) -> ObjectInfo:
        up = self._remote(upload)
        answer, _ = await self._call({"op": "mp_complete", "key": up.key, "upload": up.handle},
                                     connection=up.connection)
        return _info_from(answer.get("info"))

    async def abort(self, upload: MultipartUpload) -> None:
        up = self._remote(upload)
        if up.connection != self._connection:
            return  # that service is gone, and with it the upload's state (the store expires it)
        await self._call({"op": "mp_abort", "key": up.key, "upload": up.handle}, connection=up.connection)

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        answer, _ = await self._call({"op": "copy", "key": src, "dst": dst})
        return _info_from(answer.get("info"))

    async def set_meta(self, info: ObjectInfo, meta: Mapping[str, str]) -> ObjectInfo:
        answer, _ = await self._call({"op": "set_meta", "key": info.key, "info": _info_to(info), "meta": dict(meta)})
        return _info_from(answer.get("info"))

    async def delete(self, key: str) -> None:
        await self._call({"op": "delete", "key": key})

    async def backing_open(self, info: ObjectInfo) -> int:
        answer, _ = await self._call({"op": "backing_open", "key": info.key, "info": _info_to(info, False)})
        backing_id = answer.get("backing_id", 0)
        return backing_id if isinstance(backing_id, int) and backing_id > 0 else 0

    async def backing_close(self, backing_id: int) -> None:
        await self._call({"op": "backing_close", "backing_id": backing_id})

    async def aclose(self) -> None:
        if self._sock is not None:
            self._sock.close()


# -- the server: the data service's end ------------------------------------------------------------
def received_fuse_fd(fds: list[int]) -> int | None:
    """The /dev/fuse fd a client sent with its hello (closing anything else), or None."""
    fuse_fd = None
    for fd in fds:
        try:
            st = os.fstat(fd)
            if fuse_fd is None and stat.S_ISCHR(st.st_mode) and st.st_rdev == FUSE_DEVICE:
                fuse_fd = fd
                continue
        except OSError:
            pass
        os.close(fd)  # not a FUSE connection: never kept, never used
    return fuse_fd


def _with_meta(header: dict[str, Any], meta: Mapping[str, str] | None) -> dict[str, Any]:
    """A request with its object's metadata, if any (absent: none, the bytes of a version-1
    request without metadata, which old services read as before)."""
    if meta is not None:
        header["meta"] = dict(meta)
    return header


def _meta(header: dict[str, Any]) -> dict[str, str] | None:
    meta = header.get("meta")
    if meta is None:
        return None
    try:
        return filemeta.check(meta)
    except ValueError as exc:
        raise errors.InvalidRequestError(str(exc)) from None


def _str(header: dict[str, Any], name: str) -> str:
    value = header.get(name)
    if not isinstance(value, str):
        raise errors.InvalidRequestError(f"{name!r} must be a string")
    return value


def _int(header: dict[str, Any], name: str) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.InvalidRequestError(f"{name!r} must be an integer")
    return value


class GrantServer:
    """Serves one grant connection with a ``LocalData`` built for it."""

    def __init__(self, sock: socket.socket, make_data: Callable[[int | None], Awaitable[LocalData]],
                 in_flight: int = SERVICE_IN_FLIGHT) -> None:
        sock.setblocking(False)
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.make_data = make_data
        self.slots = trio.Semaphore(in_flight)
        self._send_lock = trio.Lock()
        self._uploads: dict[int, MultipartUpload] = {}
        self._next_upload = 1
        self.fuse_fd: int | None = None

    async def serve(self) -> None:
        """Until the client hangs up (or breaks the protocol)."""
        try:
            data = await self._greet()
            if data is None:
                return
            try:
                async with trio.open_nursery() as nursery:
                    await self._requests(data, nursery)
                    nursery.cancel_scope.cancel()  # the client is gone: nobody reads the answers
            finally:
                for upload in self._uploads.values():
                    with trio.move_on_after(10):
                        try:
                            await data.abort(upload)
                        except errors.StoreError:
                            pass
                await data.aclose()
        except (EOFError, OSError, trio.ClosedResourceError):
            pass
        except ProtocolError as exc:
            log.warning("grant connection closed: %s", exc)
        finally:
            self.sock.close()
            if self.fuse_fd is not None:
                os.close(self.fuse_fd)

    async def _requests(self, data: LocalData, nursery: trio.Nursery) -> None:
        try:
            while True:
                header, payload = await read_frame(self.sock)
                await self.slots.acquire()  # bounded: a flood waits here, it does not grow
                nursery.start_soon(self._answer, data, header, payload)
        except (EOFError, OSError, trio.ClosedResourceError):
            pass
        except ProtocolError as exc:
            log.warning("grant connection closed: %s", exc)

    async def _greet(self) -> LocalData | None:
        with trio.move_on_after(HELLO_TIMEOUT):
            data, received = await recv_with_fds(self.sock, FRAME.size + 256, 1)
            self.fuse_fd = received_fuse_fd(received)
            hello = await self._rest_of_frame(data)
            if hello.get("op") != "hello" or hello.get("version") != VERSION:
                await _send(self.sock, encode({"version": VERSION, "error": {
                    "type": "InvalidRequestError", "message": f"say hello with version {VERSION} first"}}))
                return None
            data_client = await self.make_data(self.fuse_fd)
            await _send(self.sock, encode({
                "version": VERSION, "identity": data_client.identity, "block_size": data_client.block_size,
                "node_cache": data_client.node_cache, "cache_disabled": data_client.cache_disabled,
                "passthrough": data_client.passthrough,
                "limits": {"max_parts": data_client.limits.max_parts,
                           "min_part_size": data_client.limits.min_part_size,
                           "max_part_size": data_client.limits.max_part_size,
                           "max_object_size": data_client.limits.max_object_size,
                           "part_copy": data_client.limits.part_copy},
            }))
            return data_client
        log.warning("a grant connection did not say hello within %.0fs", HELLO_TIMEOUT)
        return None

    async def _rest_of_frame(self, start: bytes) -> dict[str, Any]:
        buf = bytearray(start)
        while len(buf) < FRAME.size:
            more = await self.sock.recv(FRAME.size - len(buf))
            if not more:
                raise EOFError("closed during hello")
            buf += more
        hlen, plen = FRAME.unpack(buf[:FRAME.size])
        if hlen > MAX_HEADER or plen:
            raise ProtocolError("malformed hello")
        rest = buf[FRAME.size:]
        if len(rest) < hlen:
            rest += await _read_exactly(self.sock, hlen - len(rest))
        try:
            header = json.loads(bytes(rest[:hlen]))
        except (ValueError, RecursionError):
            raise ProtocolError("hello is not JSON") from None
        if not isinstance(header, dict):
            raise ProtocolError("hello is not a JSON object")
        return header

    async def _answer(self, data: LocalData, header: dict[str, Any], payload: bytes) -> None:
        request_id = header.get("id")
        try:
            reply, out = await self._dispatch(data, header, payload)
            answer = {"id": request_id, **reply}
        except errors.StoreError as exc:
            answer, out = {"id": request_id, "error": _error_to(exc)}, b""
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            answer, out = {"id": request_id, "error": {"type": "InvalidRequestError",
                                                       "message": f"malformed request: {exc}"}}, b""
        finally:
            self.slots.release()
        try:
            async with self._send_lock:
                await _send(self.sock, encode(answer, out))
        except (OSError, trio.ClosedResourceError):
            pass  # the client went away; its requests die with it
        pool = buffers.pool()
        if pool is not None:
            pool.give(out)  # sent: the block's buffer takes the next GET, unless someone else holds it

    def _upload(self, header: dict[str, Any]) -> MultipartUpload:
        upload = self._uploads.get(_int(header, "upload"))
        if upload is None:
            raise errors.InvalidRequestError("no such upload on this connection")
        return upload

    async def _dispatch(self, data: LocalData, header: dict[str, Any],
                        payload: bytes) -> tuple[dict[str, Any], bytes | memoryview]:
        op = header.get("op")
        if op == "read":
            block, fetched = await data.read_block_from(_info_from(header.get("info")), _int(header, "index"),
                                                        bool(header.get("warming")))
            return {"fetched": fetched}, block
        if op == "range":
            version = header.get("version")
            if version is not None and not isinstance(version, str):
                raise errors.InvalidRequestError("'version' must be a string")
            return {}, await data.get_range(_str(header, "key"), _int(header, "start"), _int(header, "length"),
                                            version)
        if op == "peek":
            info, first = await data.peek(_str(header, "key"), _int(header, "length"))
            return {"info": _info_to(info)}, first
        if op == "head":
            return {"info": _info_to(await data.head(_str(header, "key")))}, b""
        if op == "list":
            delimiter, token = header.get("delimiter"), header.get("token")
            if not isinstance(delimiter, str | None) or not isinstance(token, str | None):
                raise errors.InvalidRequestError("'delimiter' and 'token' must be strings")
            page = await data.list(_str(header, "key"), delimiter, token, _int(header, "max_keys"))
            return {"objects": [_info_to(o) for o in page.objects], "prefixes": page.prefixes,
                    "next_token": page.next_token}, b""
        if op == "on_node":
            return {"yes": await data.on_node(_info_from(header.get("info")), _int(header, "index"))}, b""
        if op == "check":
            await data.check_access()
            return {}, b""
        if op == "put":
            return {"info": _info_to(await data.put(_str(header, "key"), payload, _meta(header)))}, b""
        if op == "mp_create":
            upload = await data.create_multipart(_str(header, "key"), _meta(header))
            handle = self._next_upload
            self._next_upload += 1
            self._uploads[handle] = upload
            return {"upload": handle}, b""
        if op == "mp_part":
            await data.upload_part(self._upload(header), _int(header, "number"), payload)
            return {}, b""
        if op == "mp_copy":
            await data.upload_part_copy(self._upload(header), _int(header, "number"), _info_from(header.get("src")),
                                        _int(header, "start"), _int(header, "length"))
            return {}, b""
        if op == "mp_complete":
            upload = self._upload(header)
            info = await data.complete(upload)
            self._uploads.pop(_int(header, "upload"), None)
            return {"info": _info_to(info)}, b""
        if op == "mp_abort":
            upload = self._upload(header)
            self._uploads.pop(_int(header, "upload"), None)
            await data.abort(upload)
            return {}, b""
        if op == "copy":
            return {"info": _info_to(await data.copy(_str(header, "key"), _str(header, "dst")))}, b""
        if op == "set_meta":
            info = _info_from(header.get("info"))
            if info.key != _str(header, "key"):
                raise errors.InvalidRequestError("'key' and 'info' name different objects")
            return {"info": _info_to(await data.set_meta(info, _meta(header) or {}))}, b""
        if op == "delete":
            await data.delete(_str(header, "key"))
            return {}, b""
        if op == "backing_open":
            return {"backing_id": await data.backing_open(_info_from(header.get("info")))}, b""
        if op == "backing_close":
            await data.backing_close(_int(header, "backing_id"))
            return {}, b""
        raise errors.InvalidRequestError(f"unknown request {op!r}")
