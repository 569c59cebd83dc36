"""A ``BlockingStore`` wrapper that fails chosen calls, for layer tests (as mountpoint-s3 keeps
a failure-injecting client beside its mock one).

``FaultyStore(store)`` passes every call on and counts it by operation (``calls``). Faults are
added with ``fail``: the Nth call of an operation (and the ``times - 1`` after it), or each call
with a probability drawn from a seeded generator (the same seed fails the same calls in the same
order of calls), raising a transient error (``TransientError``: the retry policy retries it) or
a permanent one (any other ``fusefs.errors`` type). With ``after=True`` the call reaches the
store first and only its answer is lost: a write that landed although the caller saw it fail.

Operations are the protocol's method names (``head``, ``list``, ``get_range``, ``put``,
``put_file``, ``create_multipart``, ``copy``, ``copy_from``, ``delete``, ``check_access``...) and,
for the uploads it creates, ``upload_part``, ``complete``, ``abort``. A method the protocol gains
is one line below: ``return self._call("name", lambda: self.inner.name(...))``.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from fusefs import errors
from fusefs.store.base import BlockingStore, ListPage, MultipartUpload, ObjectInfo

T = TypeVar("T")


@dataclass
class Fault:
    """Which calls of ``op`` fail, and with what."""

    op: str
    nth: int | None = None  # the first call to fail, counting the op's calls from 1 (None: any)
    times: int = 1  # calls in a row that fail from ``nth`` on (0: all of them)
    probability: float = 1.0  # chance that a call the rule covers fails
    error: type[errors.StoreError] = errors.TransientError
    after: bool = False  # the store acts on the call; the answer is what is lost
    hits: int = 0  # calls failed so far

    def __post_init__(self) -> None:
        if self.nth is not None and self.nth < 1:
            raise ValueError(f"nth counts calls from 1, got {self.nth}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within 0..1, got {self.probability}")
        if self.times < 0:
            raise ValueError(f"times must be 0 (no end) or more, got {self.times}")

    def covers(self, call: int) -> bool:
        if self.nth is not None and call < self.nth:
            return False
        if self.nth is not None and self.times and call >= self.nth + self.times:
            return False
        return not (self.nth is None and self.times and self.hits >= self.times)


class FaultyStore:
    """``store`` with faults injected on the calls ``fail`` names; thread-safe."""

    def __init__(self, store: BlockingStore, seed: int = 0) -> None:
        self.inner = store
        self.identity = store.identity
        self.bucket = store.bucket
        self.limits = store.limits
        self.calls: Counter[str] = Counter()  # op -> calls made (failed ones included)
        self.keys: Counter[tuple[str, str]] = Counter()  # (op, key) -> calls made, for calls naming a key
        self.failed: Counter[str] = Counter()  # op -> calls failed here
        self._faults: list[Fault] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def fail(self, op: str, nth: int | None = None, times: int = 1, probability: float = 1.0,
             error: type[errors.StoreError] = errors.TransientError, after: bool = False) -> Fault:
        """Fail calls of ``op`` from now on: the ``nth`` (from 1, counting calls made so far too)
        and ``times - 1`` after it; without ``nth``, the next ``times`` calls drawn with
        ``probability`` (``times=0``: without end)."""
        fault = Fault(op, nth, times, probability, error, after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """No more faults (the counts stay)."""
        with self._lock:
            self._faults.clear()

    def _fault_for(self, op: str) -> tuple[Fault | None, int]:
        with self._lock:
            self.calls[op] += 1
            call = self.calls[op]
            for fault in self._faults:
                if fault.op == op and fault.covers(call) and self._random.random() < fault.probability:
                    fault.hits += 1
                    self.failed[op] += 1
                    return fault, call
            return None, call

    def _call(self, op: str, fn: Callable[[], T], key: str | None = None) -> T:
        fault, call = self._fault_for(op)
        if key is not None:
            with self._lock:
                self.keys[op, key] += 1
        if fault is None:
            return fn()
        if fault.after:
            fn()
        raise fault.error(f"injected fault: {op} call {call}{f' ({key})' if key else ''} "
                          f"({'answer lost' if fault.after else 'refused'})", key=key)

    # -- the BlockingStore protocol ----------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        return self._call("head", lambda: self.inner.head(key), key)

    def list(
        self, prefix: str, delimiter: str | None = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        return self._call("list", lambda: self.inner.list(prefix, delimiter, token, max_keys), prefix)

    def get_range(self, key: str, start: int, length: int, version: str | None = None) -> bytes:
        return self._call("get_range", lambda: self.inner.get_range(key, start, length, version), key)

    def get_first(self, key: str, length: int) -> tuple[ObjectInfo, bytes]:
        return self._call("get_first", lambda: self.inner.get_first(key, length), key)

    def put(self, key: str, data: bytes | memoryview, meta: Mapping[str, str] | None = None) -> ObjectInfo:
        return self._call("put", lambda: self.inner.put(key, data, meta), key)

    def put_file(self, key: str, path: str) -> ObjectInfo:
        return self._call("put_file", lambda: self.inner.put_file(key, path), key)

    def create_multipart(self, key: str, meta: Mapping[str, str] | None = None) -> MultipartUpload:
        upload = self._call("create_multipart", lambda: self.inner.create_multipart(key, meta), key)
        return FaultyUpload(self, upload)

    def copy(self, src: str, dst: str) -> ObjectInfo:
        return self._call("copy", lambda: self.inner.copy(src, dst), dst)

    def copy_from(self, src_bucket: str, src_key: str, dst_key: str, size: int, version: str | None = None
                  ) -> ObjectInfo:
        return self._call("copy_from", lambda: self.inner.copy_from(src_bucket, src_key, dst_key, size, version),
                          dst_key)

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self.inner.delete(key), key)

    def set_meta(self, key: str, meta: Mapping[str, str], size: int, version: str) -> ObjectInfo:
        return self._call("set_meta", lambda: self.inner.set_meta(key, meta, size, version), key)

    def keeps_versions(self) -> bool:
        return self._call("keeps_versions", self.inner.keeps_versions)

    def list_current_versions(self, prefix: str, token: str | None = None, max_keys: int = 1000) -> ListPage:
        return self._call("list_current_versions", lambda: self.inner.list_current_versions(prefix, token, max_keys),
                          prefix)

    def bucket_exists(self) -> bool:
        return self._call("bucket_exists", self.inner.bucket_exists)

    def create_bucket(self) -> None:
        self._call("create_bucket", self.inner.create_bucket)

    def delete_bucket(self) -> None:
        self._call("delete_bucket", self.inner.delete_bucket)

    def check_access(self) -> None:
        self._call("check_access", self.inner.check_access)


class FaultyUpload:
    """A multipart upload whose calls go through its ``FaultyStore``'s faults."""

    def __init__(self, store: FaultyStore, inner: MultipartUpload) -> None:
        self.store = store
        self.inner = inner
        self.key = inner.key

    def upload_part(self, number: int, data: bytes | memoryview) -> None:
        self.store._call("upload_part", lambda: self.inner.upload_part(number, data), self.key)

    def upload_part_copy(self, number: int, src: ObjectInfo, start: int, length: int) -> None:
        self.store._call("upload_part_copy", lambda: self.inner.upload_part_copy(number, src, start, length),
                         self.key)

    def complete(self) -> ObjectInfo:
        return self.store._call("complete", self.inner.complete, self.key)

    def abort(self) -> None:
        self.store._call("abort", self.inner.abort, self.key)
