"""The object store protocol.

Backends (``s3``, ``gcs``) implement ``BlockingStore``: plain blocking, thread-safe methods that
raise only ``fusefs.errors`` exceptions. ``AsyncStore`` wraps one for trio code: every call runs
in a worker thread under a capacity limiter (the event loop never blocks on the network) inside
our single retry policy. The CSI controller, which is threaded, calls a ``BlockingStore`` through
``retry.call_sync``.

Keys here are full keys inside the bucket; the mount's prefix is applied by the layers above.
``ObjectInfo.version`` is the token that pins one version of an object: the S3 ETag, or the
GCS generation. ``get_range`` with ``version`` set fails with ``ObjectChangedError`` instead of
returning bytes of another version. In an S3 bucket that keeps versions, a version can also be
pinned by its version id, as the token ``vid:<VersionId>`` (``pinned_version_id``): such a
version stays readable after the object is overwritten or deleted (snapshots pin them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import trio

from fusefs import metrics, retry
from fusefs.config import GiB, MiB, TiB
from fusefs.retry import RetryPolicy

T = TypeVar("T")


#: a ``version`` token that names an S3 version id rather than an ETag
VERSION_ID_TAG = "vid:"


def pinned_version_id(version: str | None) -> str | None:
    """The S3 version id a ``vid:`` version token names, None for an ETag or generation."""
    if version and version.startswith(VERSION_ID_TAG):
        return version[len(VERSION_ID_TAG):]
    return None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    version: str  # S3 ETag (quotes stripped) or GCS generation
    mtime: float  # seconds since the epoch
    #: the object's user metadata (names lower-case), sorted; None where the answer did not say
    #: (an S3 listing carries none: a HEAD does)
    meta: tuple[tuple[str, str], ...] | None = None


@dataclass
class ListPage:
    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)  # full keys ending in the delimiter
    next_token: str | None = None


@dataclass(frozen=True)
class StoreLimits:
    """What one backend accepts in a multipart upload (``fusefs.fs.parts`` plans within it)."""

    max_parts: int  # parts of one upload, numbered 1..max_parts
    min_part_size: int  # every part but the last is at least this big
    max_part_size: int
    max_object_size: int
    #: server-side part copies of an existing object (``MultipartUpload.upload_part_copy``):
    #: "ranges" (S3 UploadPartCopy), "whole" (only a whole object: a GCS compose), "" (none)
    part_copy: str = ""


#: Amazon S3's multipart limits (S3-compatible stores accept at least these, most the same); here,
#: not in ``s3``, so that the memory store can keep them without importing boto3
S3_LIMITS = StoreLimits(max_parts=10_000, min_part_size=5 * MiB, max_part_size=5 * GiB, max_object_size=5 * TiB,
                        part_copy="ranges")


class MultipartUpload(Protocol):
    """One in-progress multipart upload. Parts are numbered from 1 to the store's
    ``limits.max_parts``; all but the last are at least ``limits.min_part_size`` bytes."""

    key: str

    def upload_part(self, number: int, data: bytes | memoryview) -> None: ...
    def upload_part_copy(self, number: int, src: ObjectInfo, start: int, length: int) -> None:
        """Part ``number`` is bytes [start, start + length) of the object ``src`` (that version:
        ObjectChangedError if it changed), copied by the store; UnsupportedError where it cannot
        (``StoreLimits.part_copy``)."""
        ...
    def complete(self) -> ObjectInfo: ...
    def abort(self) -> None: ...


class BlockingStore(Protocol):
    """A bucket on some object store, with blocking calls. Implementations are thread-safe."""

    #: identifies the store and bucket in cache keys, e.g. "s3|http://127.0.0.1:9000|bucket"
    identity: str
    bucket: str
    limits: StoreLimits

    def head(self, key: str) -> ObjectInfo: ...
    def list(
        self, prefix: str, delimiter: str | None = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage: ...
    def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes: ...
    def get_first(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        """What ``head`` answers of ``key`` (size, version, user metadata) and its first ``length``
        bytes (fewer when it is shorter), both of one version, in one GET where the store can
        (S3: a ranged GetObject carries the description in its headers)."""
        ...
    def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo: ...
    def put_file(self, key: str, path: str) -> ObjectInfo: ...
    def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> MultipartUpload: ...
    def copy(self, src: str, dst: str) -> ObjectInfo: ...
    def set_meta(self, key: str, meta: Mapping[str, str], size: int, version: str) -> ObjectInfo:
        """Replace the user metadata of ``key`` (``size`` bytes, version ``version``: a key
        changed since fails with ``ObjectChangedError``), keeping its bytes: S3 copies the object
        onto itself with the new metadata (UploadPartCopy above the single-copy limit), GCS
        patches it (the generation, so the node cache's copy, stays valid)."""
        ...
    def copy_from(self, src_bucket: str, src_key: str, dst_key: str, size: int, version: str | None = None
                  ) -> ObjectInfo:
        """Server-side copy of ``src_bucket/src_key`` (``size`` bytes, as a listing gave it) to
        ``dst_key`` in this bucket, on the same store: no HEAD before or after (the listing
        already has what it would tell), so a copy costs one request below the store's
        single-request copy limit. With ``version`` set, a source that changed since fails
        with ``ObjectChangedError`` instead of copying another version."""
        ...
    def keeps_versions(self) -> bool:
        """Whether the bucket keeps every version of its objects (S3 versioning Enabled), so that
        ``list_current_versions`` tokens stay readable. False where objfs does not pin versions."""
        ...
    def list_current_versions(self, prefix: str, token: str | None = None, max_keys: int = 1000) -> ListPage:
        """Where ``keeps_versions``: a page of the current objects under ``prefix``, each ``version``
        a token that pins that version for good (no delimiter: every object under the prefix)."""
        ...
    def delete(self, key: str) -> None: ...
    def bucket_exists(self) -> bool: ...
    def create_bucket(self) -> None: ...
    def delete_bucket(self) -> None: ...
    def check_access(self) -> None:
        """Raise the right error if the bucket is missing, unreachable or denied."""
        ...


class AsyncStore:
    """Trio front of a ``BlockingStore``: worker threads, a limiter, one retry policy."""

    def __init__(self, store: BlockingStore, max_concurrent: int = 16, policy: RetryPolicy | None = None):
        self.blocking = store
        self.identity = store.identity
        self.limits = store.limits
        self.limiter = trio.CapacityLimiter(max_concurrent)
        self.policy = policy or RetryPolicy()
        self.requests = 0  # requests issued, retries included (for stats)

    async def _run(self, what: str, fn: Callable[[], T], sent: int = 0, policy: RetryPolicy | None = None) -> T:
        counted = metrics.store_kind(what)  # the one place store requests are counted
        attempts = 0

        async def attempt() -> T:
            nonlocal attempts
            self.requests += 1
            attempts += 1
            counted.attempt(attempts)
            return await trio.to_thread.run_sync(counted.call, fn, sent, limiter=self.limiter,
                                                 abandon_on_cancel=True)

        try:
            return await retry.call_async(attempt, policy or self.policy, what)
        except Exception as exc:
            counted.failed(exc)
            raise

    async def check_access(self, policy: RetryPolicy | None = None) -> None:
        await self._run("CHECK", self.blocking.check_access, policy=policy)

    async def head(self, key: str) -> ObjectInfo:
        return await self._run(f"HEAD {key}", lambda: self.blocking.head(key))

    async def list(
        self, prefix: str, delimiter: str | None = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        return await self._run(
            f"LIST {prefix}", lambda: self.blocking.list(prefix, delimiter, token, max_keys)
        )

    async def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes:
        return await self._run(
            f"GET {key}[{start}:+{length}]", lambda: self.blocking.get_range(key, start, length, version)
        )

    async def get_first(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        return await self._run(f"GET {key}[0:+{length}]", lambda: self.blocking.get_first(key, length))

    async def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo:
        return await self._run(f"PUT {key}", lambda: self.blocking.put(key, data, meta))

    async def put_file(self, key: str, path: str) -> ObjectInfo:
        return await self._run(f"PUT {key}", lambda: self.blocking.put_file(key, path))

    async def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> MultipartUpload:
        return await self._run(f"CREATE-MULTIPART {key}", lambda: self.blocking.create_multipart(key, meta))

    async def upload_part(self, upload: MultipartUpload, number: int, data: bytes | memoryview) -> None:
        await self._run(f"PART {upload.key}#{number}", lambda: upload.upload_part(number, data), len(data))

    async def upload_part_copy(self, upload: MultipartUpload, number: int, src: ObjectInfo, start: int,
                               length: int) -> None:
        await self._run(f"PART-COPY {upload.key}#{number}",
                        lambda: upload.upload_part_copy(number, src, start, length))

    async def complete(self, upload: MultipartUpload) -> ObjectInfo:
        return await self._run(f"COMPLETE {upload.key}", upload.complete)

    async def abort(self, upload: MultipartUpload) -> None:
        await self._run(f"ABORT {upload.key}", upload.abort)

    async def copy(self, src: str, dst: str) -> ObjectInfo:
        return await self._run(f"COPY {src} {dst}", lambda: self.blocking.copy(src, dst))

    async def set_meta(self, key: str, meta: Mapping[str, str], size: int, version: str) -> ObjectInfo:
        return await self._run(f"SET-META {key}", lambda: self.blocking.set_meta(key, meta, size, version))

    async def delete(self, key: str) -> None:
        await self._run(f"DELETE {key}", lambda: self.blocking.delete(key))
