"""An object store in memory that behaves like S3 wherever the filesystem can tell.

For layer tests and examples: ``Operations`` and the layers under it run on it in-process, with
no server and no network. It keeps what the filesystem relies on, as Amazon S3 does it:

- every write makes a new object: an ETag (the MD5 of the bytes; ``<md5 of the parts' MD5s>-N``
  after a multipart upload, so it is not the content MD5 there) and a version id of its own;
  ``ObjectInfo.version`` is the ETag, as ``S3Store`` reports it;
- keys are flat: ``dir/`` is an object of its own beside ``dir/x``, and nothing is implied;
- listings are in key order, paginated (``max_keys``, at most 1000, counts objects and common
  prefixes alike) with an opaque continuation token, and group keys by the delimiter into common prefixes;
- a ranged GET pinned to a version that is no longer current fails with ``ObjectChangedError``
  (S3's 412); a range starting at or past the end fails with ``InvalidRequestError`` (416), one
  running past the end is cut short;
- multipart uploads check part numbers and sizes against ``limits`` (S3's by default) on
  upload and on complete; an aborted or completed upload is gone (``NotFoundError``);
- a missing bucket is ``BucketNotFoundError`` for every call; a non-empty one cannot be deleted.

Buckets live in a ``MemoryServer``: two stores on one server see each other's buckets (what
``copy_from`` between buckets needs). Every method holds the server's lock for its whole work, so
each call is atomic, as one request is to a store. Objects are immutable ``Stored`` records: a
new feature of the protocol (issue 25's copy with replaced metadata, part copies) is a method
that builds a new record from an old one.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fusefs import errors
from fusefs.filemeta import pairs_of
from fusefs.store.base import S3_LIMITS, ListPage, ObjectInfo, StoreLimits


@dataclass(frozen=True)
class Stored:
    """One version of one object."""

    data: bytes
    etag: str
    version_id: str
    mtime: float
    metadata: dict[str, str] = field(default_factory=dict)  # user metadata (x-amz-meta-*)

    def info(self, key: str, with_meta: bool = True) -> ObjectInfo:
        """As a HEAD answers it (with the user metadata), or as a listing does (``with_meta`` False:
        an S3 listing carries none)."""
        return ObjectInfo(key=key, size=len(self.data), version=self.etag, mtime=self.mtime,
                          meta=pairs_of(self.metadata) if with_meta else None)


@dataclass
class _Bucket:
    objects: dict[str, Stored] = field(default_factory=dict)
    uploads: dict[str, MemoryMultipartUpload] = field(default_factory=dict)  # upload id -> upload


class MemoryServer:
    """The buckets of one in-memory store, shared by the ``MemoryStore`` objects opened on it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.RLock()
        self.buckets: dict[str, _Bucket] = {}
        self.clock = clock
        self.name = f"memory-{secrets.token_hex(4)}"  # tells servers apart in store identities
        self._versions = itertools.count(1)

    def create_bucket(self, name: str | None = None) -> str:
        """Make a bucket (a fresh random name by default); return its name."""
        name = name or f"bucket-{secrets.token_hex(6)}"
        with self.lock:
            self.buckets.setdefault(name, _Bucket())
        return name

    def store(self, bucket: str, limits: StoreLimits = S3_LIMITS) -> MemoryStore:
        return MemoryStore(bucket, server=self, limits=limits, create=False)

    def new_version(self, data: bytes, etag: str | None = None, metadata: dict[str, str] | None = None) -> Stored:
        """A record for ``data`` written now (call with the lock held: version ids are ordered)."""
        return Stored(data=data, etag=etag or hashlib.md5(data).hexdigest(),
                      version_id=f"v{next(self._versions):08d}", mtime=self.clock(), metadata=dict(metadata or {}))


class MemoryStore:
    """A ``BlockingStore`` on a bucket of a ``MemoryServer`` (a private one by default, with
    the bucket already made unless ``create`` is False)."""

    def __init__(self, bucket: str = "memory", server: MemoryServer | None = None,
                 limits: StoreLimits = S3_LIMITS, create: bool = True) -> None:
        self.server = server or MemoryServer()
        self.bucket = bucket
        self.limits = limits
        self.identity = f"memory|{self.server.name}|{bucket}"
        if create:
            self.server.create_bucket(bucket)

    # -- helpers (call with the lock held) ---------------------------------------------------
    def _where(self, key: str | None) -> str:
        return f"memory://{self.bucket}/{key}" if key is not None else f"memory://{self.bucket}"

    def _bucket(self, key: str | None = None, name: str | None = None) -> _Bucket:
        name = name or self.bucket
        found = self.server.buckets.get(name)
        if found is None:
            raise errors.BucketNotFoundError(f"bucket {name!r} does not exist", key=key)
        return found

    def _object(self, key: str, bucket: str | None = None) -> Stored:
        found = self._bucket(key, bucket).objects.get(key)
        if found is None:
            raise errors.NotFoundError(f"{self._where(key)} not found", key=key)
        return found

    def _write(self, key: str, data: bytes, etag: str | None = None,
               metadata: dict[str, str] | None = None) -> ObjectInfo:
        if len(data) > self.limits.max_object_size:
            raise errors.FileTooLargeError(
                f"{self._where(key)}: {len(data)} bytes, more than one object holds "
                f"({self.limits.max_object_size})", key=key)
        bucket = self._bucket(key)
        stored = self.server.new_version(data, etag, metadata)
        bucket.objects[key] = stored
        return stored.info(key)

    # -- reads -------------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        with self.server.lock:
            return self._object(key).info(key)

    def version_id(self, key: str) -> str:
        """The version id of the current version of ``key`` (S3's x-amz-version-id)."""
        with self.server.lock:
            return self._object(key).version_id

    def keeps_versions(self) -> bool:
        # Every write has a version id here, but old versions are not kept readable (an unversioned
        # bucket's behaviour): snapshots of a memory volume make copies.
        return False

    def list_current_versions(self, prefix: str, token: str | None = None, max_keys: int = 1000) -> ListPage:
        raise errors.InvalidRequestError("the memory store keeps no old versions (keeps_versions is False)",
                                         key=prefix)

    def list(
        self, prefix: str, delimiter: str | None = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        if max_keys < 1:
            raise errors.InvalidRequestError(f"{self._where(prefix)}: max_keys must be at least 1, got {max_keys}")
        max_keys = min(max_keys, 1000)  # S3 answers at most 1000 per page, whatever was asked
        after, after_prefix = _decode_token(token) if token else ("", False)
        with self.server.lock:
            bucket = self._bucket(prefix)
            keys = sorted(k for k in bucket.objects if k.startswith(prefix) and k > after
                          and not (after_prefix and k.startswith(after)))
            page = ListPage()
            last: tuple[str, bool] | None = None
            for key in keys:
                rest = key[len(prefix):]
                cut = rest.find(delimiter) if delimiter else -1
                if cut >= 0:
                    common = prefix + rest[:cut + len(delimiter or "")]
                    if page.prefixes and page.prefixes[-1] == common:
                        continue
                    entry: tuple[str, bool] = (common, True)
                else:
                    entry = (key, False)
                if len(page.objects) + len(page.prefixes) == max_keys:
                    assert last is not None
                    page.next_token = _encode_token(*last)
                    break
                if entry[1]:
                    page.prefixes.append(entry[0])
                else:
                    page.objects.append(bucket.objects[key].info(key, with_meta=False))
                last = entry
            return page

    def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes:
        if length <= 0:
            return b""
        with self.server.lock:
            stored = self._object(key)
        if version and stored.etag != version:
            raise errors.ObjectChangedError(f"{self._where(key)} changed while it was open", key=key)
        if start < 0 or start >= len(stored.data):
            raise errors.InvalidRequestError(
                f"{self._where(key)}: 416 InvalidRange: bytes {start}-{start + length - 1} of "
                f"{len(stored.data)}", key=key)
        return stored.data[start:start + length]

    def get_first(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        with self.server.lock:
            stored = self._object(key)
        return stored.info(key), stored.data[:max(0, length)]

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo:
        with self.server.lock:
            return self._write(key, bytes(data), metadata=dict(meta or {}))

    def put_file(self, key: str, path: str) -> ObjectInfo:
        with open(path, "rb") as f:
            data = f.read()
        return self.put(key, data)

    def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> MemoryMultipartUpload:
        with self.server.lock:
            upload = MemoryMultipartUpload(self, key, secrets.token_hex(8), dict(meta or {}))
            self._bucket(key).uploads[upload.upload_id] = upload
            return upload

    def uploads(self) -> tuple[str, ...]:
        """Keys of the multipart uploads in progress (S3's ListMultipartUploads)."""
        with self.server.lock:
            return tuple(sorted(u.key for u in self._bucket().uploads.values()))

    def copy(self, src: str, dst: str) -> ObjectInfo:
        return self.copy_from(self.bucket, src, dst, -1)

    def copy_from(self, src_bucket: str, src_key: str, dst_key: str, size: int, version: str | None = None
                  ) -> ObjectInfo:
        with self.server.lock:
            source = self._object(src_key, src_bucket)
            if version and source.etag != version:
                raise errors.ObjectChangedError(
                    f"memory://{src_bucket}/{src_key} changed since it was listed", key=src_key)
            # S3 keeps the ETag of a single-request copy (and the user metadata: COPY directive)
            return self._write(dst_key, source.data, source.etag, source.metadata)

    def set_meta(self, key: str, meta: Mapping[str, str], size: int, version: str) -> ObjectInfo:
        with self.server.lock:
            stored = self._object(key)
            if (version and stored.etag != version) or len(stored.data) != size:
                raise errors.ObjectChangedError(f"{self._where(key)} changed since it was read", key=key)
            # S3 copies the object onto itself (the ETag of a single-request copy stays); GCS patches it
            return self._write(key, stored.data, stored.etag, dict(meta))

    def delete(self, key: str) -> None:
        with self.server.lock:
            self._bucket(key).objects.pop(key, None)

    # -- buckets -----------------------------------------------------------------------------
    def bucket_exists(self) -> bool:
        with self.server.lock:
            return self.bucket in self.server.buckets

    def create_bucket(self) -> None:
        self.server.create_bucket(self.bucket)

    def delete_bucket(self) -> None:
        with self.server.lock:
            bucket = self.server.buckets.get(self.bucket)
            if bucket is None:
                return
            if bucket.objects:
                raise errors.StoreError(f"bucket {self.bucket!r} is not empty")
            del self.server.buckets[self.bucket]

    def check_access(self) -> None:
        self.list("", "/", None, 1)


class MemoryMultipartUpload:
    """A multipart upload of a ``MemoryStore``: parts kept until complete or abort."""

    def __init__(self, store: MemoryStore, key: str, upload_id: str, metadata: dict[str, str] | None = None) -> None:
        self.parts: dict[int, bytes] = {}  # number -> bytes; a part sent again replaces the first
        self.metadata = metadata or {}
        self.key = key
        self.upload_id = upload_id
        self.store = store
        self.completed_size: int | None = None  # set once complete() went through

    def _live(self) -> None:
        """Raise as S3 does (NoSuchUpload) for an upload that was completed or aborted."""
        if self.store._bucket(self.key).uploads.get(self.upload_id) is not self:
            raise errors.NotFoundError(f"{self.store._where(self.key)}: no such upload {self.upload_id}",
                                       key=self.key)

    def upload_part(self, number: int, data: bytes | memoryview) -> None:
        limits = self.store.limits
        if not 1 <= number <= limits.max_parts:
            raise errors.InvalidRequestError(
                f"{self.store._where(self.key)}: part number {number} is outside 1..{limits.max_parts}", key=self.key)
        if len(data) > limits.max_part_size:
            raise errors.InvalidRequestError(
                f"{self.store._where(self.key)}: part {number} has {len(data)} bytes, more than "
                f"{limits.max_part_size}", key=self.key)
        with self.store.server.lock:
            self._live()
            self.parts[number] = bytes(data)

    def upload_part_copy(self, number: int, src: ObjectInfo, start: int, length: int) -> None:
        if not self.store.limits.part_copy:
            raise errors.UnsupportedError(f"{self.store._where(self.key)}: this store copies no parts", key=self.key)
        with self.store.server.lock:
            source = self.store._object(src.key)
            if source.etag != src.version:
                raise errors.ObjectChangedError(f"{self.store._where(src.key)} changed since it was read", key=src.key)
            if start < 0 or length <= 0 or start + length > len(source.data):
                raise errors.InvalidRequestError(
                    f"{self.store._where(src.key)}: bytes {start}-{start + length - 1} are not in its "
                    f"{len(source.data)}", key=src.key)
        self.upload_part(number, source.data[start:start + length])

    def complete(self) -> ObjectInfo:
        limits = self.store.limits
        with self.store.server.lock:
            if self.completed_size is not None:
                # Completed already (a retry whose first answer was lost): success if the object
                # is still the one completed, as S3MultipartUpload.complete decides it.
                info = self.store.head(self.key)
                if info.size != self.completed_size:
                    raise errors.StoreError(
                        f"{self.store._where(self.key)}: completed with {self.completed_size} bytes, now "
                        f"{info.size}: written again meanwhile?", key=self.key)
                return info
            self._live()
            numbers = sorted(self.parts)
            if not numbers:
                raise errors.InvalidRequestError(
                    f"{self.store._where(self.key)}: a multipart upload needs at least one part", key=self.key)
            for n in numbers[:-1]:  # S3's EntityTooSmall
                if len(self.parts[n]) < limits.min_part_size:
                    raise errors.InvalidRequestError(
                        f"{self.store._where(self.key)}: part {n} has {len(self.parts[n])} bytes, less than "
                        f"{limits.min_part_size} (only the last part may be smaller)", key=self.key)
            digests = b"".join(hashlib.md5(self.parts[n]).digest() for n in numbers)
            etag = f"{hashlib.md5(digests).hexdigest()}-{len(numbers)}"
            info = self.store._write(self.key, b"".join(self.parts[n] for n in numbers), etag, self.metadata)
            del self.store._bucket(self.key).uploads[self.upload_id]
            self.parts.clear()
            self.completed_size = info.size
            return info

    def abort(self) -> None:
        with self.store.server.lock:
            bucket = self.store.server.buckets.get(self.store.bucket)
            if bucket is not None and bucket.uploads.get(self.upload_id) is self:
                del bucket.uploads[self.upload_id]
            self.parts.clear()


def _encode_token(after: str, is_prefix: bool) -> str:
    """An opaque continuation token: list after ``after`` (past every key under it, for a
    common prefix)."""
    return base64.urlsafe_b64encode(json.dumps([after, is_prefix]).encode()).decode()


def _decode_token(token: str) -> tuple[str, bool]:
    try:
        after, is_prefix = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError) as exc:
        raise errors.InvalidRequestError(f"invalid continuation token {token!r}: pass the one a listing gave") \
            from exc
    return str(after), bool(is_prefix)
