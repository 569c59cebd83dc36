"""Google Cloud Storage (and its emulator, fake-gcs-server) through google-cloud-storage.

SDK retries are off (``retry=None`` on every call, no urllib3 retries on the HTTP pool):
``fusefs.retry`` is the single retry policy. Every google.api_core / google.auth / requests
exception is translated to a ``fusefs.errors`` type in ``_translate``, by HTTP status and
exception class, never by message text.

``ObjectInfo.version`` is the object generation (a decimal string). A ranged read pinned to a
generation sends ``ifGenerationMatch`` and also checks the ``x-goog-generation`` header of the
answer, so a server that ignored the precondition still cannot hand us bytes of another version.

Multipart uploads are built with *compose*, not a resumable upload session: each part is
uploaded as its own temporary object and ``complete`` composes them into the key. Why:
the write layer uploads several parts at once and may finish them out of order, and
``fusefs.retry`` re-sends a failed part as a whole. A resumable session accepts only the next
chunk at the committed offset (256 KiB aligned), so parallel or retried parts would have to be
serialised and re-synchronised with the session's persisted offset; composed part objects are
independent, idempotent PUTs of any size. Costs: the temporary objects live under
``<dir>/.objfs-uploads/`` until complete/abort (the layers above hide that name), and a composite
object may have at most 1024 components, so an upload is limited to 1024 parts (``LIMITS``: the
upload planner, ``fusefs.fs.parts``, grows parts so that 1024 of them still reach the 5 TiB limit).

One compose request takes at most 32 sources, so ``complete`` composes in a tree: groups of 32
into temporary composites next to the parts, those again, and only the last compose writes the
key. Readers never see a partial object at the key, and a failure leaves nothing there; the
temporary composites are deleted whether ``complete`` succeeds or fails, the parts on success
(a failed ``complete`` keeps them, so the retry policy can send it again; ``abort`` deletes them).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import google.api_core.exceptions as gexc
import google.auth.exceptions
import requests
import requests.adapters
import urllib3.exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud.storage import Blob, Bucket, Client

from fusefs import errors, retry
from fusefs.config import Credentials, TiB
from fusefs.filemeta import pairs_of
from fusefs.retry import RetryPolicy
from fusefs.store.base import ListPage, ObjectInfo, StoreLimits

log = logging.getLogger(__name__)

#: name of the folder (inside the key's own directory) that holds parts of uploads in progress
UPLOAD_DIR = ".objfs-uploads"
UPLOAD_CHUNK = 16 * 1024 * 1024
#: a composite object has at most 1,024 components; objects are at most 5 TiB; compose takes
#: components of any size
LIMITS = StoreLimits(max_parts=1024, min_part_size=1, max_part_size=5 * TiB, max_object_size=5 * TiB,
                     part_copy="whole")
COMPOSE_FAN_IN = 32  # sources of one compose request
#: deleting temporary objects after the upload's outcome is known: brief, best effort
_CLEANUP_POLICY = RetryPolicy(deadline=5.0)
_SCOPES = ("https://www.googleapis.com/auth/devstorage.full_control",)


_REFUSED = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.NameResolutionError, ConnectionRefusedError)

# resets, read timeouts, truncated bodies: worth another try
_CONNECTION_ERRORS = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, ConnectionError,
                      TimeoutError, OSError)


def _is_refused(exc: BaseException) -> bool:
    """True if ``exc`` (a requests ConnectionError) means nobody accepted the TCP connection."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, _REFUSED):
            return True
        if isinstance(e, urllib3.exceptions.MaxRetryError):
            stack.append(e.reason)
        stack.extend(a for a in e.args if isinstance(a, BaseException))
        stack.extend([e.__cause__, e.__context__])
    return False


def _translate(exc: BaseException, where: str, key: str | None) -> errors.StoreError:
    """Map one SDK/transport exception to our error types (404 is resolved by the caller)."""
    if isinstance(exc, gexc.GoogleAPICallError):
        status = int(exc.code or 0)
        if status == 404:
            return errors.NotFoundError(f"{where} not found", key=key)
        if status in (401, 403):
            return errors.AccessDeniedError(
                f"access denied to {where} ({status}): check the service account and the bucket's IAM", key=key
            )
        if status == 412:
            return errors.ObjectChangedError(f"{where} changed while it was open", key=key)
        if status == 409:
            return errors.AlreadyExistsError(f"{where} already exists (409)", key=key)
        if status == 429:
            return errors.ThrottledError(f"{where}: throttled by the store (429)", key=key)
        if status >= 500 or status == 408:
            return errors.TransientError(f"{where}: store error {status}: {exc.message}", key=key)
        return errors.InvalidRequestError(f"{where}: {status}: {exc.message}", key=key)
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return errors.UnreachableError(f"cannot reach the store for {where}: connect timeout", key=key)
    if isinstance(exc, requests.exceptions.ConnectionError) and _is_refused(exc):
        return errors.UnreachableError(f"cannot reach the store for {where}: {exc}", key=key)
    if isinstance(exc, google.auth.exceptions.RefreshError | google.auth.exceptions.DefaultCredentialsError):
        return errors.AccessDeniedError(
            f"no usable Google credentials for {where}: give a service account JSON or set up "
            "application default credentials",
            key=key,
        )
    if isinstance(exc, google.auth.exceptions.TransportError):
        return errors.UnreachableError(f"cannot reach the token service for {where}: {exc}", key=key)
    if isinstance(exc, _CONNECTION_ERRORS):
        return errors.TransientError(f"{where}: connection error: {exc}", key=key)
    return errors.StoreError(f"{where}: unexpected error: {exc!r}", key=key)


def _info(blob: Blob) -> ObjectInfo:
    updated = blob.updated
    return ObjectInfo(
        key=str(blob.name), size=int(blob.size or 0), version=str(blob.generation or ""),
        mtime=updated.timestamp() if updated is not None else 0.0, meta=pairs_of(blob.metadata or {}),
    )


def _credentials(creds: Credentials, endpoint_url: str | None) -> tuple[Any, str | None]:
    """(google credentials or None for the standard chain, project)."""
    if creds.service_account_json:
        from google.oauth2 import service_account

        try:
            info = json.loads(creds.service_account_json)
            sa = service_account.Credentials.from_service_account_info(info, scopes=_SCOPES)
        except (ValueError, TypeError, AttributeError) as exc:
            # No text of the exception: parsers may quote the document, which holds a private key.
            raise errors.AccessDeniedError(
                f"the service account JSON is malformed ({type(exc).__name__}): give the key file "
                "exactly as Google issued it"
            ) from None
        return sa, info.get("project_id")
    if endpoint_url:
        # An emulator takes no credentials; the standard chain would look for real ones.
        return AnonymousCredentials(), "objfs-emulator"
    import google.auth

    found, project = google.auth.default(scopes=_SCOPES)
    return found, project


class GCSStore:
    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        credentials: Credentials | None = None,
        timeout: float = 60.0,
        max_connections: int = 32,
    ) -> None:
        self.bucket = bucket
        self.limits = LIMITS
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.identity = f"gcs|{self.endpoint_url or 'google'}|{bucket}"
        self._bucket_seen = False
        self.timeout: tuple[float, float] = (min(10.0, timeout), timeout)
        try:
            gcreds, project = _credentials(credentials or Credentials(), self.endpoint_url)
        except errors.StoreError:
            raise
        except Exception as exc:
            raise _translate(exc, f"gs://{bucket}", None) from exc
        # A 401 makes AuthorizedSession refresh the token and send again: right for real
        # credentials, a blind second request for anonymous ones (an emulator).
        anonymous = isinstance(gcreds, AnonymousCredentials)
        session = AuthorizedSession(gcreds, refresh_status_codes=() if anonymous else (401,))
        # Our own pool: big enough for the requests in flight, and no urllib3 retries.
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=max_connections, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        options = {"api_endpoint": self.endpoint_url} if self.endpoint_url else None
        self.client = Client(project=project, credentials=gcreds, _http=session, client_options=options)
        # google-cloud-storage >= 3.x fetches bucket metadata in a background thread for tracing
        # attributes: an extra GET per bucket that no retry policy or limiter of ours governs.
        if getattr(self.client, "_bucket_metadata_cache", None) is not None:
            self.client._bucket_metadata_cache = None
        self._bucket: Bucket = self.client.bucket(bucket)
        self._download_base = f"{self.client.api_endpoint}/download/storage/v1/b/{quote(bucket, safe='')}/o"

    # -- error handling ------------------------------------------------------------------------
    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Translate SDK errors. A 404 on a key is told apart from a missing bucket by asking."""
        try:
            yield
        except errors.StoreError:
            raise
        except Exception as exc:
            err = _translate(exc, self._where(key), key)
            if isinstance(err, errors.NotFoundError) and (
                key is None or (not self._bucket_seen and not self._bucket_exists_quiet())
            ):
                err = errors.BucketNotFoundError(f"bucket {self.bucket!r} does not exist", key=key)
            raise err from exc
        # Any answer proves the bucket exists: later 404s on keys need no extra request.
        self._bucket_seen = True

    def _where(self, key: str | None) -> str:
        return f"gs://{self.bucket}/{key}" if key else f"gs://{self.bucket}"

    def _bucket_exists_quiet(self) -> bool:
        """bucket_exists for error paths: if that fails too, assume the bucket is there."""
        try:
            return self.bucket_exists()
        except errors.StoreError:
            return True

    # -- reads -------------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        blob = self._bucket.blob(key)
        with self._errors(key):
            blob.reload(retry=None, timeout=self.timeout)
        return _info(blob)

    def list(
        self, prefix: str, delimiter: str | None = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        with self._errors(None):
            it = self._bucket.list_blobs(
                prefix=prefix or None, delimiter=delimiter or None, page_token=token, page_size=max_keys,
                retry=None, timeout=self.timeout,
            )
            page = next(it.pages)
            objects = [_info(b) for b in page]
            prefixes = sorted(page.prefixes)
            next_token = it.next_page_token
        return ListPage(objects=objects, prefixes=prefixes, next_token=next_token or None)

    def get_first(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        """Two requests here: the metadata, then a ranged media GET pinned to its generation (a
        media GET's answer carries no custom metadata). objfs asks it of S3 stores only: GCS
        listings carry each object's metadata already."""
        info = self.head(key)
        n = min(length, info.size)
        return info, self.get_range(key, 0, n, info.version) if n > 0 else b""

    def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes:
        """One ranged media GET, read straight into one buffer.

        Sent on the client's own authorized session rather than through ``Blob.download_as_bytes``:
        the SDK streams the body in 8 KiB pieces through a BytesIO, which halved the throughput of
        8 MiB ranges against fake-gcs-server (measured: ~250 vs ~550 MB/s, 4 in parallel).
        """
        if length <= 0:
            return b""
        params: dict[str, str] = {"alt": "media"}
        if version:
            params["ifGenerationMatch"] = version
        headers = {
            "Range": f"bytes={start}-{start + length - 1}",
            # the stored bytes, as sizes in metadata count them (no decompressive transcoding)
            "Accept-Encoding": "gzip",
        }
        with self._errors(key), self.client._http.get(
            f"{self._download_base}/{quote(key, safe='')}", params=params, headers=headers, stream=True,
            timeout=self.timeout,
        ) as resp:
            if resp.status_code >= 300:
                raise gexc.from_http_response(resp)
            # fake-gcs-server ignores ifGenerationMatch on downloads: the generation that was
            # actually served must still match, never bytes of another version.
            served = resp.headers.get("x-goog-generation")
            if version and served is not None and served != version:
                raise errors.ObjectChangedError(f"{self._where(key)} changed while it was open", key=key)
            return self._read_body(resp, key, start, length)

    def _read_body(self, resp: requests.Response, key: str, start: int, length: int) -> bytes:
        if resp.status_code == 200 and start != 0:  # the Range was ignored: these are not our bytes
            raise errors.TransientError(f"{self._where(key)}: the store ignored the byte range", key=key)
        if resp.status_code == 206:
            first = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-", 1)[0]
            if first != str(start):
                raise errors.TransientError(
                    f"{self._where(key)}: asked for bytes from {start}, got {resp.headers.get('Content-Range')}",
                    key=key,
                )
        size = min(length, int(resp.headers.get("Content-Length", length)))
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = resp.raw.readinto(view[got:])
            if not n:
                break
            got += n
        if got != size:
            raise errors.TransientError(f"short read of {self._where(key)}: {got} of {size} bytes", key=key)
        return bytes(buf)

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo:
        blob = self._bucket.blob(key)
        if meta:
            blob.metadata = dict(meta)  # sent with the upload: no second request
        with self._errors(key):
            blob.upload_from_string(bytes(data), retry=None, timeout=self.timeout, checksum=None)
        return _info(blob)

    def put_file(self, key: str, path: str) -> ObjectInfo:
        # Files over 8 MiB go up as a resumable upload; the SDK's default chunk (100 MiB) would be
        # held in memory per upload, so send 16 MiB chunks (a multiple of 256 KiB, as required).
        blob = self._bucket.blob(key, chunk_size=UPLOAD_CHUNK)
        with self._errors(key):
            blob.upload_from_filename(path, retry=None, timeout=self.timeout, checksum=None)
        return _info(blob)

    def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> GCSMultipartUpload:
        return GCSMultipartUpload(self, key, meta)

    def set_meta(self, key: str, meta: Mapping[str, str], size: int, version: str) -> ObjectInfo:
        # A patch merges into the metadata the object has (names not named stay): one request,
        # and the generation (the version reads pin, and the node cache's key) does not change.
        blob = self._bucket.blob(key)
        blob.metadata = dict(meta)
        with self._errors(key):
            blob.patch(if_generation_match=int(version) if version else None, retry=None, timeout=self.timeout)
        return _info(blob)

    def copy(self, src: str, dst: str) -> ObjectInfo:
        source = self._bucket.blob(src)
        target = self._bucket.blob(dst)
        with self._errors(src):
            token: str | None = None
            while True:  # rewrite copies large objects in several calls, each returning a token
                token, _, _ = target.rewrite(source, token=token, retry=None, timeout=self.timeout)
                if token is None:
                    break
        return _info(target)

    def copy_from(self, src_bucket: str, src_key: str, dst_key: str, size: int, version: str | None = None
                  ) -> ObjectInfo:
        source = self.client.bucket(src_bucket).blob(src_key)
        target = self._bucket.blob(dst_key)
        cond = {"if_source_generation_match": int(version)} if version else {}
        with self._errors(dst_key):
            token: str | None = None
            while True:  # rewrite copies large objects in several calls, each returning a token
                token, _, _ = target.rewrite(source, token=token, retry=None, timeout=self.timeout, **cond)
                if token is None:
                    break
        return _info(target)

    def keeps_versions(self) -> bool:
        # A generation of a bucket with object versioning stays readable too, but snapshots on GCS
        # own copies (rewrites) of their data: pinning generations is not implemented.
        return False

    def list_current_versions(self, prefix: str, token: str | None = None, max_keys: int = 1000) -> ListPage:
        raise errors.InvalidRequestError("objfs does not pin GCS generations (keeps_versions is False)", key=prefix)

    def delete(self, key: str) -> None:
        try:
            with self._errors(key):
                self._bucket.blob(key).delete(retry=None, timeout=self.timeout)
        except errors.NotFoundError:
            pass

    # -- buckets -----------------------------------------------------------------------------
    def bucket_exists(self) -> bool:
        try:
            with self._errors_plain():
                self._bucket.reload(retry=None, timeout=self.timeout)
            return True
        except errors.NotFoundError:
            return False

    @contextmanager
    def _errors_plain(self) -> Iterator[None]:
        try:
            yield
        except errors.StoreError:
            raise
        except Exception as exc:
            raise _translate(exc, self._where(None), None) from exc

    def create_bucket(self) -> None:
        try:
            with self._errors_plain():
                self.client.create_bucket(self.bucket, retry=None, timeout=self.timeout)
        except errors.AlreadyExistsError:
            if not self.bucket_exists():
                raise

    def delete_bucket(self) -> None:
        try:
            with self._errors_plain():
                self._bucket.delete(retry=None, timeout=self.timeout)
        except errors.NotFoundError:
            pass

    def check_access(self, prefix: str = "") -> None:
        self.list(prefix, "/", None, 1)


class GCSMultipartUpload:
    """Parts as temporary objects, composed into the key on ``complete`` (see the module doc)."""

    def __init__(self, store: GCSStore, key: str, meta: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.key = key
        self.meta = dict(meta or {})
        directory = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
        self.part_prefix = f"{directory}{UPLOAD_DIR}/{secrets.token_hex(8)}/"
        self._parts: dict[int, str] = {}
        self._lock = threading.Lock()
        self.size = 0

    def _part_name(self, number: int) -> str:
        return f"{self.part_prefix}{number:05d}"

    def upload_part(self, number: int, data: bytes | memoryview) -> None:
        self._add_part(number, len(data), lambda name: self.store.put(name, data))

    def upload_part_copy(self, number: int, src: ObjectInfo, start: int, length: int) -> None:
        """GCS copies no byte ranges: a part can be a whole object (an append keeps the old object
        as the first piece of the compose), copied server-side to a part name, bytes untouched."""
        if start != 0 or length != src.size:
            raise errors.UnsupportedError(f"{self.store._where(self.key)}: GCS copies whole objects only, "
                                          f"not bytes {start}+{length} of {src.size}", key=self.key)
        self._add_part(number, length,
                       lambda name: self.store.copy_from(self.store.bucket, src.key, name, length, src.version or None))

    def _add_part(self, number: int, length: int, make: Callable[[str], object]) -> None:
        if not 1 <= number <= LIMITS.max_parts:
            raise errors.InvalidRequestError(
                f"part number {number} of gs://{self.store.bucket}/{self.key} is outside 1..{LIMITS.max_parts}: "
                "use a larger part size", key=self.key,
            )
        name = self._part_name(number)
        make(name)
        with self._lock:
            if number not in self._parts:
                self.size += length
            self._parts[number] = name

    def complete(self) -> ObjectInfo:
        with self._lock:
            names = [n for _, n in sorted(self._parts.items())]
        if not names:
            return self.store.put(self.key, b"", self.meta)
        temporaries: list[str] = []
        try:
            with self.store._errors(self.key):
                target = self._compose_tree(names, temporaries)
        finally:
            self._delete_parts(temporaries)
        self._delete_parts(names)
        return _info(target)

    def _compose_tree(self, names: list[str], temporaries: list[str]) -> Blob:
        """Compose ``names`` (in order) into the key; intermediate composites are temporary
        objects next to the parts, listed in ``temporaries`` as they are made."""
        bucket = self.store._bucket
        timeout = self.store.timeout
        level = 0
        while len(names) > COMPOSE_FAN_IN:
            merged: list[str] = []
            for start in range(0, len(names), COMPOSE_FAN_IN):
                group = names[start : start + COMPOSE_FAN_IN]
                if len(group) == 1:
                    merged.append(group[0])
                    continue
                name = f"{self.part_prefix}compose-{level}-{start // COMPOSE_FAN_IN:05d}"
                temporaries.append(name)
                bucket.blob(name).compose([bucket.blob(n) for n in group], retry=None, timeout=timeout)
                merged.append(name)
            names, level = merged, level + 1
        target = bucket.blob(self.key)
        if self.meta:
            target.metadata = dict(self.meta)  # the composed object's (a compose request carries them)
        target.compose([bucket.blob(n) for n in names], retry=None, timeout=timeout)
        return target

    def abort(self) -> None:
        with self._lock:
            names = list(self._parts.values())
            self._parts.clear()
        self._delete_parts(names)

    def _delete_parts(self, names: list[str]) -> None:
        # Best effort: the object is already complete (or abandoned); a leftover part is garbage,
        # not a failure of the upload.
        for name in names:
            try:
                retry.call_sync(functools.partial(self.store.delete, name), _CLEANUP_POLICY, f"DELETE {name}")
            except errors.StoreError as exc:
                log.warning("could not delete upload part gs://%s/%s: %s", self.store.bucket, name, exc)
