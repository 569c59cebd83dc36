"""WriteHandle against a real ``rclone serve s3``: streaming multipart, staging, retries, memory."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusefs import errors
from fusefs.config import MiB, MountConfig, Tuning
from fusefs.fs.write import WriteHandle
from fusefs.retry import RetryPolicy
from fusefs.service.local import LocalData
from fusefs.service.scope import Scope
from fusefs.store import AsyncStore, ObjectInfo, open_store
from testing.servers import RcloneS3

PART = 5 * MiB
TUNING = Tuning(part_size=PART, max_upload_parts_in_flight=2)


@pytest.fixture
def astore(s3_config: MountConfig) -> AsyncStore:
    return AsyncStore(open_store(s3_config))


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


@pytest.fixture
def staging(tmp_path: Path) -> str:
    return str(tmp_path / "staging")


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def raw_get(server: RcloneS3, bucket: str, key: str) -> bytes:
    body: bytes = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def raw_put(server: RcloneS3, bucket: str, key: str, data: bytes) -> None:
    server.client().put_object(Bucket=bucket, Key=key, Body=data)


def uploads(server: RcloneS3, bucket: str) -> list[dict[str, Any]]:
    """Multipart uploads in progress (rclone answers NoSuchUpload for a bucket that never had one)."""
    try:
        found: list[dict[str, Any]] = server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] != "NoSuchUpload":
            raise
        return []
    return found


def exists(server: RcloneS3, bucket: str, key: str) -> bool:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
    return any(o["Key"] == key for o in listed)


def open_handle(
    store: AsyncStore,
    key: str,
    nursery: trio.Nursery,
    staging: str,
    existing: ObjectInfo | None = None,
    truncate: bool = True,
    tuning: Tuning = TUNING,
) -> WriteHandle:
    # the data served in-process, as a standalone mount has it (the tests' stores inject faults below it)
    data = LocalData(store, Scope(""), tuning.block_size)
    return WriteHandle(data, key, tuning, staging, nursery, existing, truncate)


async def write_chunks(h: WriteHandle, data: bytes, offset: int = 0, chunk: int = 128 * 1024) -> None:
    view = memoryview(data)
    for i in range(0, len(data), chunk):
        piece = bytes(view[i : i + chunk])
        assert await h.write(offset + i, piece) == len(piece)


# -- basic shapes ------------------------------------------------------------------------------------
async def test_small_write_is_one_put(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    h = open_handle(astore, "small.txt", nursery, staging)
    assert h.dirty and h.size == 0
    await h.write(0, b"hello ")
    await h.write(6, b"world")
    assert not exists(s3_server, bucket, "small.txt")  # visible at close, not before
    info = await h.flush()
    assert info.size == 11 and not h.dirty
    assert raw_get(s3_server, bucket, "small.txt") == b"hello world"
    assert uploads(s3_server, bucket) == []  # never started a multipart upload
    await h.release()


async def test_empty_new_file(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    h = open_handle(astore, "empty", nursery, staging)
    info = await h.flush()
    assert info.size == 0
    assert raw_get(s3_server, bucket, "empty") == b""
    await h.release()


async def test_clean_existing_flush_sends_nothing(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    raw_put(s3_server, bucket, "k", b"abc")
    existing = await astore.head("k")
    h = open_handle(astore, "k", nursery, staging, existing=existing, truncate=False)
    before = astore.requests
    assert await h.flush() == existing
    assert astore.requests == before and not h.dirty
    await h.release()


async def test_streaming_multipart_100mib(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    data = rand(103 * MiB + 12345, seed=1)
    h = open_handle(astore, "big.bin", nursery, staging)
    await write_chunks(h, data[: 20 * MiB])
    assert h.mode == "stream"
    # Parts are going up while the file is still open, but nothing is visible yet.
    assert [u["Key"] for u in uploads(s3_server, bucket)] == ["big.bin"]
    assert not exists(s3_server, bucket, "big.bin")
    await write_chunks(h, data[20 * MiB :], offset=20 * MiB)
    assert h.mode == "stream" and h.size == len(data)
    info = await h.flush()
    assert info.size == len(data)
    assert raw_get(s3_server, bucket, "big.bin") == data
    assert uploads(s3_server, bucket) == []
    await h.release()


async def test_random_writes_stage_losslessly(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    model = bytearray()

    def apply(offset: int, chunk: bytes) -> None:
        if len(model) < offset + len(chunk):
            model.extend(bytes(offset + len(chunk) - len(model)))
        model[offset : offset + len(chunk)] = chunk

    h = open_handle(astore, "random.bin", nursery, staging)
    first = rand(12 * MiB, seed=2)  # more than two parts: some uploaded, a tail buffered
    await write_chunks(h, first)
    apply(0, first)
    assert h.mode == "stream"
    far = rand(MiB, seed=3)
    await h.write(50 * MiB, far)  # a hole: switches to staging
    apply(50 * MiB, far)
    assert h.mode == "staged"
    middle = rand(3 * MiB, seed=4)
    await h.write(4 * MiB, middle)  # overwrite across the old part boundary
    apply(4 * MiB, middle)
    assert await h.read(0, len(model)) == bytes(model)
    await h.flush()
    assert raw_get(s3_server, bucket, "random.bin") == bytes(model)
    await h.release()
    assert uploads(s3_server, bucket) == []


async def test_append_to_existing(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    original = rand(11 * MiB + 7, seed=5)
    raw_put(s3_server, bucket, "log", original)
    existing = await astore.head("log")
    h = open_handle(astore, "log", nursery, staging, existing=existing, truncate=False)
    assert h.mode == "lazy" and h.size == len(original) and not h.dirty
    assert await h.read(len(original) - 10, 100) == original[-10:]  # from the store, pinned
    extra = rand(2 * MiB, seed=6)
    await write_chunks(h, extra, offset=len(original))
    # S3 copies parts: only the appended bytes are staged (rclone then refuses the copy at flush,
    # and the whole file goes up: tests/fuse/test_semantics.py)
    assert h.mode == "patch" and h.dirty
    assert await h.read(len(original) - 10, 20) == original[-10:] + extra[:10]
    await h.flush()
    assert raw_get(s3_server, bucket, "log") == original + extra
    await h.release()


async def test_existing_changed_before_first_write(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    raw_put(s3_server, bucket, "moving", b"v1" * 1000)
    existing = await astore.head("moving")
    raw_put(s3_server, bucket, "moving", b"v2" * 1000)
    h = open_handle(astore, "moving", nursery, staging, existing=existing, truncate=False)
    with pytest.raises(errors.ObjectChangedError):
        await h.write(0, b"x")
    assert raw_get(s3_server, bucket, "moving") == b"v2" * 1000
    await h.release()


async def test_truncating_open_of_existing(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    raw_put(s3_server, bucket, "t", b"old contents")
    existing = await astore.head("t")
    h = open_handle(astore, "t", nursery, staging, existing=existing, truncate=True)
    assert h.size == 0 and h.dirty
    await h.write(0, b"new")
    await h.flush()
    assert raw_get(s3_server, bucket, "t") == b"new"
    await h.release()


async def test_truncate_shrink_and_grow(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    original = rand(9 * MiB, seed=7)
    raw_put(s3_server, bucket, "trunc", original)
    existing = await astore.head("trunc")
    h = open_handle(astore, "trunc", nursery, staging, existing=existing, truncate=False)
    await h.truncate(3 * MiB)  # downloads only what is kept
    assert h.size == 3 * MiB
    await h.truncate(4 * MiB)  # grows with zeros
    expected = original[: 3 * MiB] + bytes(MiB)
    assert await h.read(0, 10 * MiB) == expected
    await h.flush()
    assert raw_get(s3_server, bucket, "trunc") == expected

    await h.truncate(0)  # back to an empty stream
    assert h.mode == "stream" and h.size == 0
    await h.write(0, b"fresh")
    await h.truncate(2)
    await h.flush()
    assert raw_get(s3_server, bucket, "trunc") == b"fr"
    await h.release()


async def test_truncate_streamed_file(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    data = rand(7 * MiB, seed=8)
    h = open_handle(astore, "ts", nursery, staging)
    await write_chunks(h, data)
    await h.truncate(6 * MiB)
    await h.write(6 * MiB, b"end")  # sequential again, but the handle stays staged
    await h.flush()
    assert raw_get(s3_server, bucket, "ts") == data[: 6 * MiB] + b"end"
    await h.release()


async def test_read_your_writes(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    data = rand(7 * MiB, seed=9)
    h = open_handle(astore, "ryw", nursery, staging)
    await write_chunks(h, data)
    assert h.mode == "stream"
    # Across the boundary between the written-through part and the buffered tail.
    assert await h.read(PART - 100, 200) == data[PART - 100 : PART + 100]
    assert await h.read(0, 10 * MiB) == data
    assert await h.read(len(data), 10) == b""
    assert await h.read(len(data) - 3, 10) == data[-3:]
    await h.write(10, b"XYZ")
    assert await h.read(8, 7) == data[8:10] + b"XYZ" + data[13:15]
    await h.release()
    assert not exists(s3_server, bucket, "ryw")


async def test_writes_after_flush(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    first = rand(6 * MiB, seed=10)
    h = open_handle(astore, "again", nursery, staging)
    await write_chunks(h, first)
    await h.flush()
    assert raw_get(s3_server, bucket, "again") == first
    more = b"more bytes after close of a dup'd fd"
    await h.write(len(first), more)
    assert h.dirty
    await h.flush()
    assert raw_get(s3_server, bucket, "again") == first + more
    await h.write(0, b"!")
    await h.flush()
    assert raw_get(s3_server, bucket, "again") == b"!" + first[1:] + more
    await h.release()
    with pytest.raises(errors.StoreError):
        await h.write(0, b"after release")


async def test_release_without_flush_aborts(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    h = open_handle(astore, "aborted", nursery, staging)
    await write_chunks(h, rand(12 * MiB, seed=11))
    assert [u["Key"] for u in uploads(s3_server, bucket)] == ["aborted"]
    await h.release()
    assert uploads(s3_server, bucket) == []
    assert not exists(s3_server, bucket, "aborted")


async def test_staging_file_is_private(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    h = open_handle(astore, "private", nursery, staging)
    await h.write(0, b"abc")
    await h.write(100, b"def")  # staged now
    assert os.listdir(staging) == []  # unlinked: nobody else can open it
    await h.release()


# -- failures ----------------------------------------------------------------------------------------
@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RcloneS3]:
    server = RcloneS3(tmp_path / "own-s3")
    server.start()
    yield server
    server.stop()


def quick_store(server: RcloneS3, bucket: str) -> AsyncStore:
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=server.endpoint, credentials=server.credentials)
    return AsyncStore(open_store(config), policy=RetryPolicy(max_attempts=2, base_delay=0.01, deadline=5))


@pytest.mark.parametrize("size", [100, 12 * MiB + 3])
async def test_failed_flush_keeps_data_for_retry(
    own_server: RcloneS3, nursery: trio.Nursery, staging: str, size: int
) -> None:
    bucket = own_server.create_bucket()
    store = quick_store(own_server, bucket)
    data = rand(size, seed=12)
    h = open_handle(store, "retry.bin", nursery, staging)
    await write_chunks(h, data[: size // 2])
    own_server.stop()  # parts in flight or still to come fail; so does the final request
    await write_chunks(h, data[size // 2 :], offset=size // 2)  # writes still succeed: staged locally
    with pytest.raises(errors.StoreError):
        await h.flush()
    assert h.dirty
    with pytest.raises(errors.StoreError):
        await h.flush()  # still down: fails again, still nothing lost
    own_server.start()  # same port, same data directory
    info = await h.flush()
    assert info.size == size and not h.dirty
    assert raw_get(own_server, bucket, "retry.bin") == data
    await h.release()
    assert uploads(own_server, bucket) == []


# -- property: a WriteHandle behaves like a bytearray --------------------------------------------------
SMALL = 64 * 1024  # rclone accepts small parts, so the property test can cross many part boundaries cheaply

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 5 * SMALL), st.integers(1, 2 * SMALL), st.integers(0, 2**16)),
    st.tuples(st.just("append"), st.just(0), st.integers(1, 3 * SMALL), st.integers(0, 2**16)),
    st.tuples(st.just("truncate"), st.integers(0, 5 * SMALL), st.just(0), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(initial=st.one_of(st.none(), st.integers(0, 3 * SMALL)), ops=st.lists(op, max_size=12))
async def test_property_matches_bytearray(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, staging: str, monkeypatch: pytest.MonkeyPatch,
    initial: int | None, ops: list[tuple[str, int, int, int]],
) -> None:
    monkeypatch.setattr(astore, "limits", replace(astore.limits, min_part_size=1))
    tuning = Tuning(part_size=SMALL, max_upload_parts_in_flight=2, block_size=SMALL)
    key = f"prop-{random.getrandbits(64):x}"
    model = bytearray()
    existing = None
    if initial is not None:
        model[:] = rand(initial, seed=initial)
        raw_put(s3_server, bucket, key, bytes(model))
        existing = await astore.head(key)
    async with trio.open_nursery() as nursery:
        h = open_handle(astore, key, nursery, staging, existing=existing, truncate=False, tuning=tuning)
        for kind, a, b, seed in ops:
            if kind in ("write", "append"):
                offset = len(model) if kind == "append" else a
                chunk = rand(b, seed)
                await h.write(offset, chunk)
                model.extend(bytes(max(0, offset + b - len(model))))
                model[offset : offset + b] = chunk
            elif kind == "truncate":
                await h.truncate(a)
                del model[a:]
                model.extend(bytes(a - len(model)))
            else:
                await h.flush()
                assert raw_get(s3_server, bucket, key) == bytes(model)
            assert h.size == len(model)
        assert await h.read(0, len(model) + 10) == bytes(model)
        await h.flush()
        assert raw_get(s3_server, bucket, key) == bytes(model)
        await h.release()
    assert [u for u in uploads(s3_server, bucket) if u["Key"] == key] == []


# -- memory and throughput (figures are printed; run with -s to see them) -----------------------------
async def test_1gib_stream_memory_bound(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    # The bytes the write path holds, traced by Python (tracemalloc): the process's RSS also counts
    # what glibc keeps of freed parts in its per-thread arenas, which depends on how many uploads
    # happened to run at once (on a loaded machine it exceeded the bound with nothing leaked).
    tuning = Tuning()  # the defaults
    total, chunk = 1024 * MiB, MiB
    block = bytearray(rand(chunk, seed=13))
    digest = hashlib.md5()
    h = open_handle(astore, "huge.bin", nursery, staging, tuning=tuning)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        start = time.perf_counter()
        for i in range(total // chunk):
            block[:8] = i.to_bytes(8, "big")  # every MiB differs: order mistakes change the digest
            piece = bytes(block)
            digest.update(piece)
            await h.write(i * chunk, piece)
        info = await h.flush()
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert h.mode == "staged" and info.size == total
    await h.release()
    growth = peak - base
    bound = (tuning.max_upload_parts_in_flight + 1) * tuning.part_size
    print(
        f"\n1 GiB streamed write: {total / elapsed / 1e6:.0f} MB/s, traced growth {growth / MiB:.0f} MiB "
        f"(bound (in_flight+1) x part = {bound / MiB:.0f} MiB)"
    )
    # "About" the bound: allow the part being cut and a write in hand on top.
    assert growth < bound + 2 * tuning.part_size
    got = hashlib.md5()
    body = s3_server.client().get_object(Bucket=bucket, Key="huge.bin")["Body"]
    for piece in iter(lambda: body.read(8 * MiB), b""):
        got.update(piece)
    assert got.hexdigest() == digest.hexdigest()
    s3_server.client().delete_object(Bucket=bucket, Key="huge.bin")  # a GiB less in the session's store


# -- part limits (the planner itself: tests/unit/test_parts.py) ---------------------------------------------
async def test_stream_out_of_parts_falls_back_to_staging(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(astore, "limits", replace(astore.limits, min_part_size=1, max_parts=3))
    h = open_handle(astore, "parts", nursery, staging, tuning=Tuning(part_size=64 * 1024))
    data = rand(MiB + 5, seed=14)
    await write_chunks(h, data, chunk=10_000)
    assert h.mode == "staged"  # a fourth part would exceed the (lowered) limit
    await h.flush()  # the whole-file upload picks a part size that fits in 3 parts
    assert raw_get(s3_server, bucket, "parts") == data
    await h.release()
    assert uploads(s3_server, bucket) == []


@pytest.fixture
def tiny_staging(tmp_path: Path) -> Iterator[str]:
    """A 1 MiB tmpfs as the staging directory, to make the local disk run out."""
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield str(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_full_staging_disk_is_an_error_that_loses_nothing(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, tiny_staging: str
) -> None:
    h = open_handle(astore, "nospace", nursery, tiny_staging)
    data = rand(2 * MiB, seed=15)
    await write_chunks(h, data)  # still in the part buffer: no disk needed yet
    with pytest.raises(errors.StoreError) as caught:
        await h.flush()  # the write-through of the tail finds no space
    assert caught.value.errno == errno.ENOSPC
    assert h.dirty and await h.read(0, len(data)) == data
    assert not exists(s3_server, bucket, "nospace")
    await h.release()


class CountingStore(AsyncStore):
    """The real store, counting part uploads in flight at once."""

    def __init__(self, inner: AsyncStore) -> None:
        super().__init__(inner.blocking)
        self.in_flight = self.most_in_flight = 0

    async def upload_part(self, upload: Any, number: int, data: bytes | memoryview) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(0.05)  # slow parts: the writer outruns them and has to wait
            await super().upload_part(upload, number, data)
        finally:
            self.in_flight -= 1


async def test_parts_in_flight_are_bounded(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    store = CountingStore(astore)
    h = open_handle(store, "bounded", nursery, staging)
    data = rand(8 * PART + 1, seed=16)
    await write_chunks(h, data, chunk=MiB)
    await h.flush()
    assert 1 <= store.most_in_flight <= TUNING.max_upload_parts_in_flight
    assert raw_get(s3_server, bucket, "bounded") == data
    await h.release()


class FailingComplete(AsyncStore):
    """The real store, except that completing a multipart upload fails while ``failing`` is set."""

    def __init__(self, inner: AsyncStore) -> None:
        super().__init__(inner.blocking)
        self.failing = True

    async def complete(self, upload: Any) -> ObjectInfo:
        if self.failing:
            raise errors.TransientError("injected: complete failed", key=upload.key)
        return await super().complete(upload)


async def test_failed_complete_is_aborted_and_retried_whole(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    store = FailingComplete(astore)
    data = rand(3 * PART + 99, seed=17)
    h = open_handle(store, "complete", nursery, staging)
    await write_chunks(h, data, chunk=MiB)
    with pytest.raises(errors.TransientError):
        await h.flush()
    assert h.dirty and not exists(s3_server, bucket, "complete")
    with trio.fail_after(30):  # the given-up upload is aborted in the background
        while uploads(s3_server, bucket):  # noqa: ASYNC110 (polls the server, nothing to wait on here)
            await trio.sleep(0.05)
    store.failing = False
    await h.flush()  # the retry uploads the staged copy: a new upload, completed
    assert raw_get(s3_server, bucket, "complete") == data
    await h.release()
    assert uploads(s3_server, bucket) == []


class PartFailsWhenLetGo(AsyncStore):
    """The real store, except that part ``number`` waits for ``gate`` and then fails once, as a part
    held by a data service that restarts fails (fusefs.wire.grant)."""

    def __init__(self, inner: AsyncStore, number: int) -> None:
        super().__init__(inner.blocking)
        self.number, self.gate, self.failed = number, trio.Event(), False

    async def upload_part(self, upload: Any, number: int, data: bytes | memoryview) -> None:
        if number == self.number and not self.failed:
            await self.gate.wait()
            self.failed = True
            raise errors.TransientError("injected: the data service restarted during this upload", key=upload.key)
        await super().upload_part(upload, number, data)


async def test_part_failing_while_the_upload_finishes_falls_back_to_the_staged_file(
    s3_server: RcloneS3, bucket: str, astore: AsyncStore, nursery: trio.Nursery, staging: str
) -> None:
    store = PartFailsWhenLetGo(astore, number=2)
    data = rand(2 * PART + 99, seed=18)
    h = open_handle(store, "late-part", nursery, staging)
    await write_chunks(h, data, chunk=MiB)  # parts 1 and 2 sent; part 2 held
    results: list[ObjectInfo] = []

    async def flush() -> None:
        results.append(await h.flush())

    async with trio.open_nursery() as n:
        n.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()  # the flush waits for part 2 (no error seen yet)
        assert not results and not store.failed
        store.gate.set()  # part 2 fails now, while the upload is finishing
    assert store.failed and results[0].size == len(data)
    assert raw_get(s3_server, bucket, "late-part") == data
    await h.release()
