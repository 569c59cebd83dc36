"""S3 and S3-compatible stores through boto3.

SDK retries are off (``total_max_attempts=1``): ``fusefs.retry`` is the single retry policy. Every
botocore/urllib3 exception is translated to a ``fusefs.errors`` type in ``_translate``, by HTTP
status and S3 error code, never by message text.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig

from fusefs import buffers, errors
from fusefs.config import Credentials
from fusefs.filemeta import pairs_of
from fusefs.store.base import S3_LIMITS, VERSION_ID_TAG, ListPage, ObjectInfo, pinned_version_id
from fusefs.store.s3_get import DirectGet

log = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_FOUND = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_ACCESS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AllAccessDisabled",
           "InvalidToken", "ExpiredToken", "AccountProblem"}
_THROTTLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
             "RequestThrottled", "503"}
_TRANSIENT = {"InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
              "PriorRequestNotComplete", "500", "502", "504"}

#: user metadata in a GET's or HEAD's answer (boto3's ``Metadata`` without it)
_META_HEADER = "x-amz-meta-"
MULTIPART_THRESHOLD = 64 * 1024 * 1024
#: the largest object one CopyObject copies (Amazon S3's limit); larger ones go part by part
COPY_OBJECT_LIMIT = 5 * 1024**3
COPY_PART_SIZE = 512 * 1024 * 1024
LIMITS = S3_LIMITS
# Bounds the temporary buffer of each read from a response body read in pieces. Below glibc's mmap threshold
# (1 MiB here: fusefs.buffers.limit_malloc_retention), so each chunk reuses heap memory instead of
# a fresh mapping that costs a page fault per 4 KiB (a tenth of a cold read's CPU at 1 MiB).
READ_CHUNK = 256 * 1024


def _translate(exc: BaseException, key: str | None, bucket: str) -> errors.StoreError:
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = err.get("Message") or code
        if code == "NoSuchBucket":
            return errors.BucketNotFoundError(f"bucket {bucket!r} does not exist", key=key)
        if code in _NOT_FOUND or status == 404:
            return errors.NotFoundError(f"{where} not found", key=key)
        if code in _ACCESS or status in (401, 403):
            return errors.AccessDeniedError(
                f"access denied to {where} ({code}): check the credentials and the bucket policy", key=key
            )
        if code == "PreconditionFailed" or status == 412:
            return errors.ObjectChangedError(f"{where} changed while it was open", key=key)
        if code in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
            return errors.AlreadyExistsError(f"bucket {bucket!r} already exists ({code})", key=key)
        if code in _THROTTLE or status in (429, 503):
            return errors.ThrottledError(f"{where}: throttled by the store ({code})", key=key)
        if code in _TRANSIENT or status >= 500:
            return errors.TransientError(f"{where}: store error {status} {code}: {msg}", key=key)
        if code == "BucketNotEmpty":
            return errors.StoreError(f"bucket {bucket!r} is not empty", key=key)
        return errors.InvalidRequestError(f"{where}: {status} {code}: {msg}", key=key)
    if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
        return errors.UnreachableError(f"cannot reach the store for {where}: {exc}", key=key)
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return errors.AccessDeniedError(
            f"no usable S3 credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "a profile, or the volume's secrets",
            key=key,
        )
    # urllib3 errors reach us from the body stream (a connection cut mid-body): transient too
    if isinstance(exc, botocore.exceptions.BotoCoreError | urllib3.exceptions.HTTPError | ConnectionError
                  | TimeoutError | OSError):
        return errors.TransientError(f"{where}: connection error: {exc}", key=key)
    return errors.StoreError(f"{where}: unexpected error: {exc!r}", key=key)


def _check_body_length(response_dict: dict[str, Any], operation_model: Any, **_: Any) -> None:
    """botocore reads the body of a non-streaming answer without checking it against its
    Content-Length (it turns urllib3's check off) and parses whatever came: a LIST answer cut
    right after its headers parsed as an empty listing (a directory that looked empty), a
    CreateMultipartUpload answer as one without an UploadId. A short body is a broken
    connection, and is retried like one (IncompleteReadError is transient in ``_translate``)."""
    body = response_dict.get("body")
    if not isinstance(body, bytes) or operation_model.http.get("method") == "HEAD":
        return
    expected = str(response_dict["headers"].get("content-length", ""))
    if expected.isdigit() and len(body) != int(expected):
        raise botocore.exceptions.IncompleteReadError(actual_bytes=len(body), expected_bytes=int(expected))


def _info(key: str, size: int, etag: str, mtime: Any, meta: Mapping[str, str] | None = None) -> ObjectInfo:
    ts = mtime.timestamp() if hasattr(mtime, "timestamp") else 0.0
    return ObjectInfo(key=key, size=int(size), version=etag.strip('"'), mtime=ts, meta=pairs_of(meta))


_SESSION: boto3.session.Session | None = None


def _session() -> boto3.session.Session:
    """One boto3 session per process. It caches the S3 service model that creating a client
    loads (a good part of a server's start-up), so ``objfs zygote`` loads it once for every
    server it forks. Credentials are per client, never the session's own."""
    global _SESSION
    if _SESSION is None:
        _SESSION = boto3.session.Session()
    return _SESSION


def warm_up() -> None:
    """Load what an S3 client needs without sending anything (explicit dummy credentials and
    region: nothing is looked up, so nothing of this process's identity is cached)."""
    S3Store("warm-up", "http://127.0.0.1:9", "us-east-1", Credentials("warm-up", "warm-up"))


class S3Store:
    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        credentials: Credentials | None = None,
        max_connections: int = 32,
        timeout: float = 60.0,
    ) -> None:
        self.bucket = bucket
        self.region = region
        self.limits = LIMITS
        self.identity = f"s3|{endpoint_url or 'aws'}|{bucket}"
        # Set once any request proved the bucket exists: from then on a 404 on a key is a
        # missing key, and telling it from a missing bucket costs no extra request.
        self._bucket_seen = False
        creds = credentials or Credentials()
        cfg = botocore.config.Config(
            # total_max_attempts counts the first try; the older max_attempts key counts retries
            # (max_attempts=1 meant one SDK retry behind our policy's back).
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_connections,
            connect_timeout=min(10.0, timeout),
            read_timeout=timeout,
            tcp_keepalive=True,
            # S3-compatible stores are addressed by path: their buckets have no DNS names.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # No credentials given: the session's chain (environment, files, instance roles) finds them.
        self.client = _session().client(
            "s3", endpoint_url=endpoint_url, config=cfg, region_name=region or ("us-east-1" if endpoint_url else None),
            aws_access_key_id=creds.access_key_id, aws_secret_access_key=creds.secret_access_key,
            aws_session_token=creds.session_token,
        )
        self.client.meta.events.register("before-parse.s3", _check_body_length)
        self.direct = DirectGet(self.client)
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=16 * 1024 * 1024,
            max_concurrency=4, use_threads=True,
        )

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except errors.StoreError:
            raise
        except Exception as exc:
            raise _translate(exc, key, self.bucket) from exc
        self._bucket_seen = True

    def _call(self, key: str | None, fn: Callable[..., T], **kwargs: Any) -> T:
        with self._errors(key):
            return fn(Bucket=self.bucket, **kwargs)

    # -- reads -------------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        try:
            r = self._call(key, self.client.head_object, Key=key)
        except errors.BucketNotFoundError:
            raise
        except errors.NotFoundError:
            # A HEAD answer has no body, so a missing bucket looks like a missing key: ask,
            # unless an earlier answer already showed the bucket exists.
            if not self._bucket_seen and not self.bucket_exists():
                raise errors.BucketNotFoundError(f"bucket {self.bucket!r} does not exist", key=key) from None
            raise
        return _info(key, r["ContentLength"], r.get("ETag", ""), r["LastModified"], r.get("Metadata") or {})

    def list(
        self, prefix: str, delimiter: str | None = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        kw: dict[str, Any] = {"Prefix": prefix, "MaxKeys": max_keys}
        if delimiter:
            kw["Delimiter"] = delimiter
        if token:
            kw["ContinuationToken"] = token
        r = self._call(prefix, self.client.list_objects_v2, **kw)
        page = ListPage(
            objects=[
                _info(o["Key"], o["Size"], o.get("ETag", ""), o.get("LastModified")) for o in r.get("Contents", [])
            ],
            prefixes=[p["Prefix"] for p in r.get("CommonPrefixes", [])],
            next_token=r.get("NextContinuationToken") if r.get("IsTruncated") else None,
        )
        return page

    def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes:
        if length <= 0:
            return b""
        version_id = pinned_version_id(version)
        with self._errors(key):
            raw = None if version_id else self.direct.get(key, start, length, version)
            if raw is not None:
                return self._body(raw, raw.headers.get("ETag", ""), raw.headers.get("Content-Length"), length,
                                  key, version)
            kw: dict[str, Any] = {"Key": key, "Range": f"bytes={start}-{start + length - 1}"}
            if version_id:
                kw["VersionId"] = version_id  # a version id names immutable bytes: no If-Match needed
            elif version:
                kw["IfMatch"] = f'"{version}"'
            r = self.client.get_object(Bucket=self.bucket, **kw)
            body = r["Body"]
            return self._body(getattr(body, "_raw_stream", body), r.get("ETag", ""), r.get("ContentLength"), length,
                              key, version)

    def get_first(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        """One ranged GetObject: its headers say what a HEAD says (Content-Range's total is the
        size; ETag, Last-Modified, x-amz-meta-*), its body is the first ``length`` bytes. Sent by
        ``DirectGet`` where it can (a walk describes every small file this way: botocore's
        pipeline cost a millisecond of CPU a file more). An empty object has no byte 0 (416
        InvalidRange): a HEAD answers for it instead."""
        if length <= 0:
            return self.head(key), b""
        with self._errors(key):
            raw = self.direct.get(key, 0, length, None)
            if raw is not None:
                h = raw.headers
                meta = {k[len(_META_HEADER):]: v for k, v in h.items() if k.lower().startswith(_META_HEADER)}
                modified = h.get("Last-Modified")
                return self._first(raw, key, length, h.get("Content-Range"), h.get("Content-Length"),
                                   h.get("ETag", ""), parsedate_to_datetime(modified) if modified else None, meta)
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{length - 1}")
            except botocore.exceptions.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status != 416 and exc.response.get("Error", {}).get("Code") != "InvalidRange":
                    raise
                r = None
            if r is not None:
                body = r["Body"]
                return self._first(getattr(body, "_raw_stream", body), key, length, r.get("ContentRange"),
                                   r.get("ContentLength"), r.get("ETag", ""), r["LastModified"],
                                   r.get("Metadata") or {})
        return self.head(key), b""

    def _first(self, raw: Any, key: str, length: int, content_range: str | None, content_length: Any, etag: str,
               modified: Any, meta: Mapping[str, str]) -> tuple[ObjectInfo, bytes]:
        sent = int(content_length or 0)
        total = (content_range or "").rpartition("/")[2]
        info = _info(key, int(total) if total.isdigit() else sent, etag, modified, meta)
        if sent > length:  # a store that ignored the range: the description, not its whole body
            raw.close()
            return info, b""
        return info, self._body(raw, etag, sent, length, key, None)

    def _body(self, raw: Any, etag: str, content_length: Any, length: int, key: str, version: str | None) -> bytes:
        """Read a GET's body and give its connection back (or close it when the body was not read)."""
        done = False
        try:
            # A store that ignores If-Match must still never hand us bytes of another version.
            got = etag.strip('"')
            if version and got and got != version and not pinned_version_id(version):
                raise errors.ObjectChangedError(f"s3://{self.bucket}/{key} changed while it was open", key=key)
            data = _read_exactly(raw, int(content_length if content_length is not None else length), key)
            done = True
            return data
        finally:
            if done and hasattr(raw, "release_conn"):
                raw.release_conn()
            else:
                raw.close()

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo:
        r = self._call(key, self.client.put_object, Key=key, Body=bytes(data), Metadata=dict(meta or {}))
        return ObjectInfo(key=key, size=len(data), version=r["ETag"].strip('"'), mtime=_now(),
                          meta=pairs_of(meta or {}))

    def put_file(self, key: str, path: str) -> ObjectInfo:
        size = os.path.getsize(path)
        if size <= MULTIPART_THRESHOLD:
            with open(path, "rb") as f:
                r = self._call(key, self.client.put_object, Key=key, Body=f)
            return ObjectInfo(key=key, size=size, version=r["ETag"].strip('"'), mtime=_now())
        with self._errors(key):
            self.client.upload_file(path, self.bucket, key, Config=self.transfer)
        return self.head(key)

    def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> S3MultipartUpload:
        r = self._call(key, self.client.create_multipart_upload, Key=key, Metadata=dict(meta or {}))
        return S3MultipartUpload(self, key, r["UploadId"])

    def set_meta(self, key: str, meta: Mapping[str, str], size: int, version: str) -> ObjectInfo:
        info = self.copy_from(self.bucket, key, key, size, version or None, meta=meta)
        if not info.version:  # rclone answers a copy with an empty result: ask what it made
            return self.head(key)
        return dataclasses.replace(info, meta=pairs_of(meta))

    def copy(self, src: str, dst: str) -> ObjectInfo:
        with self._errors(src):
            self.client.copy({"Bucket": self.bucket, "Key": src}, self.bucket, dst, Config=self.transfer)
        return self.head(dst)

    def copy_from(self, src_bucket: str, src_key: str, dst_key: str, size: int, version: str | None = None,
                  meta: Mapping[str, str] | None = None) -> ObjectInfo:
        """``meta``: the copy's user metadata instead of the source's (REPLACE: a copy onto the
        same key changes only that)."""
        source = {"Bucket": src_bucket, "Key": src_key}
        cond: dict[str, str] = {}
        version_id = pinned_version_id(version)
        if version_id:
            source["VersionId"] = version_id
        elif version:
            cond["CopySourceIfMatch"] = f'"{version}"'
        if size <= COPY_OBJECT_LIMIT:
            replace = {"MetadataDirective": "REPLACE", "Metadata": dict(meta)} if meta is not None else {}
            r = self._call(dst_key, self.client.copy_object, Key=dst_key, CopySource=source, **cond, **replace)
            result = r.get("CopyObjectResult", {})
            return _info(dst_key, size, result.get("ETag", ""), result.get("LastModified"))
        # CopyObject takes at most 5 GiB: larger objects are copied as ranges (UploadPartCopy)
        # of one multipart upload, each pinned to the same source version.
        part = max(COPY_PART_SIZE, -(-size // LIMITS.max_parts))
        upload = self.create_multipart(dst_key, meta)
        try:
            for number, start in enumerate(range(0, size, part), 1):
                end = min(size, start + part) - 1
                part_r = self._call(dst_key, self.client.upload_part_copy, Key=dst_key, UploadId=upload.upload_id,
                                    PartNumber=number, CopySource=source, CopySourceRange=f"bytes={start}-{end}",
                                    **cond)
                etag = part_r.get("CopyPartResult", {}).get("ETag")
                if not etag:  # rclone's S3 server answers UploadPartCopy with an empty result
                    raise errors.InvalidRequestError(
                        f"s3://{self.bucket}/{dst_key}: the store does not support UploadPartCopy, needed to "
                        f"copy objects over {COPY_OBJECT_LIMIT} bytes server-side", key=dst_key)
                with upload._lock:
                    upload._parts[number] = etag
                    upload.size += end - start + 1
            return upload.complete()
        except BaseException:
            upload.abort()
            raise

    def keeps_versions(self) -> bool:
        try:
            return self._call(None, self.client.get_bucket_versioning).get("Status") == "Enabled"
        except (errors.TransientError, errors.NotFoundError):
            raise
        except errors.StoreError as exc:
            # Not allowed to ask (no s3:GetBucketVersioning) or a store without the call: copies
            # are right everywhere, pinning is the saving.
            log.info("bucket %s: versioning unknown (%s): snapshots copy", self.bucket, exc)
            return False

    def list_current_versions(self, prefix: str, token: str | None = None, max_keys: int = 1000) -> ListPage:
        """One page of ListObjectVersions: the current version of each object under ``prefix``,
        its ``version`` a ``vid:`` token (older versions and deleted objects are left out)."""
        kw: dict[str, Any] = {"Prefix": prefix, "MaxKeys": max_keys}
        if token:
            key_marker, _, version_marker = token.partition("\n")
            kw["KeyMarker"] = key_marker
            if version_marker:
                kw["VersionIdMarker"] = version_marker
        r = self._call(prefix, self.client.list_object_versions, **kw)
        objects = [_info(v["Key"], v["Size"], VERSION_ID_TAG + v["VersionId"], v.get("LastModified"))
                   for v in r.get("Versions", []) if v.get("IsLatest") and v.get("VersionId") not in (None, "null")]
        next_token = None
        if r.get("IsTruncated"):
            next_token = r.get("NextKeyMarker", "") + "\n" + (r.get("NextVersionIdMarker") or "")
        return ListPage(objects=objects, next_token=next_token)

    def delete(self, key: str) -> None:
        try:
            self._call(key, self.client.delete_object, Key=key)
        except errors.NotFoundError:
            pass

    # -- buckets -----------------------------------------------------------------------------
    def bucket_exists(self) -> bool:
        try:
            self._call(None, self.client.head_bucket)
            return True
        except errors.NotFoundError:
            return False

    def create_bucket(self) -> None:
        kw: dict[str, Any] = {}
        if self.region and self.region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._call(None, self.client.create_bucket, **kw)
        except errors.AlreadyExistsError:
            if not self.bucket_exists():
                raise

    def delete_bucket(self) -> None:
        try:
            self._call(None, self.client.delete_bucket)
        except errors.NotFoundError:
            pass

    def check_access(self, prefix: str = "") -> None:
        self.list(prefix, "/", None, 1)


class S3MultipartUpload:
    def __init__(self, store: S3Store, key: str, upload_id: str) -> None:
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self._parts: dict[int, str] = {}
        self._lock = threading.Lock()
        self.size = 0
        self._complete_sent = False  # a CompleteMultipartUpload went out (its answer may be lost)
        self._completed = False  # the store said it completed
        #: the ETag the completion answered ("": not known): the version ``complete`` returns comes
        #: from a HEAD after it, which names this upload's object when the two are the same
        self.completed_etag = ""

    def upload_part(self, number: int, data: bytes | memoryview) -> None:
        r = self.store._call(
            self.key, self.store.client.upload_part, Key=self.key, UploadId=self.upload_id,
            PartNumber=number, Body=bytes(data),
        )
        with self._lock:
            self._parts[number] = r["ETag"]
            self.size += len(data)

    def upload_part_copy(self, number: int, src: ObjectInfo, start: int, length: int) -> None:
        cond = {"CopySourceIfMatch": f'"{src.version}"'} if src.version else {}
        r = self.store._call(
            self.key, self.store.client.upload_part_copy, Key=self.key, UploadId=self.upload_id, PartNumber=number,
            CopySource={"Bucket": self.store.bucket, "Key": src.key},
            CopySourceRange=f"bytes={start}-{start + length - 1}", **cond,
        )
        etag = r.get("CopyPartResult", {}).get("ETag")
        if not etag:  # rclone's S3 server answers UploadPartCopy with an empty result
            raise errors.UnsupportedError(f"s3://{self.store.bucket}/{self.key}: the store does not support "
                                          "UploadPartCopy", key=self.key)
        with self._lock:
            self._parts[number] = etag
            self.size += length

    def complete(self) -> ObjectInfo:
        """Complete the upload; safe to call again after a failure (the retry policy does).

        A retry after the store completed the upload but the answer was lost (or after the HEAD
        below failed) finds the upload gone: NoSuchUpload. That is success if the object at the
        key now has our size, not a missing file (ENOENT at close for data that landed)."""
        with self._lock:
            parts = [{"PartNumber": n, "ETag": e} for n, e in sorted(self._parts.items())]
            resent, self._complete_sent = self._complete_sent, True
        if not self._completed:
            try:
                r = self.store._call(
                    self.key, self.store.client.complete_multipart_upload, Key=self.key,
                    UploadId=self.upload_id, MultipartUpload={"Parts": parts},
                )
                self.completed_etag = str(r.get("ETag") or "").strip('"')
            except errors.NotFoundError:
                if not resent:
                    raise
                info = self.store.head(self.key)
                if info.size != self.size:
                    raise errors.StoreError(
                        f"s3://{self.store.bucket}/{self.key}: the multipart upload is gone and the object "
                        f"there has {info.size} bytes, not the {self.size} uploaded: written again meanwhile?",
                        key=self.key,
                    ) from None
                self._completed = True
                return info
            self._completed = True
        # Some stores (rclone) answer a multipart ETag here but report the content MD5 on HEAD
        # and LIST; ask once so the version we pin is the one readers will see.
        return self.store.head(self.key)

    def abort(self) -> None:
        try:
            self.store._call(self.key, self.store.client.abort_multipart_upload, Key=self.key,
                             UploadId=self.upload_id)
        except errors.NotFoundError:
            pass


def _now() -> float:
    """The time a PUT answers for its object, in whole seconds as S3 keeps LastModified: a
    file's mtime does not jump back by the fraction once a HEAD or LIST describes it."""
    import time

    return float(int(time.time()))


def _read_exactly(raw: Any, n: int, key: str) -> bytes:
    """Read the whole response body into one preallocated buffer.

    Straight into the buffer where the body allows (``readinto`` of the http.client response
    under urllib3's, which botocore asks not to decode): one copy of each byte fewer than reading
    pieces and copying them in, which is CPU a 2-core node needs for moving the bytes at all.
    Otherwise a bounded piece at a time: urllib3's own ``readinto`` reads everything asked for
    into a temporary bytes object first, which doubles the memory of every block in flight."""
    buf = buffers.take(n)  # filled completely below, or not returned at all
    view = memoryview(buf)
    fp = getattr(raw, "_fp", None)
    readinto = getattr(fp, "readinto", None)
    got = 0
    while got < n:
        if readinto is not None:
            k = readinto(view[got:])  # no temporary buffer: as much as the socket has, at once
        else:
            chunk = raw.read(min(READ_CHUNK, n - got))
            k = len(chunk)
            view[got : got + k] = chunk
        if not k:
            break
        got += k
    if got != n:
        raise errors.TransientError(f"short read of {key}: {got} of {n} bytes")
    # The buffer itself, not a bytes copy of it: nothing mutates a fetched block, and a copy of
    # every byte costs CPU that a 2-core node needs for moving the bytes at all.
    return buf  # type: ignore[return-value]  # a bytearray serves wherever bytes are read
