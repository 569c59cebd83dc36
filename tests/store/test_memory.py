"""What the in-memory store does beyond the shared suite (test_store.py runs that on it too):
S3's rules the real servers here do not all enforce, and the failure-injecting wrapper."""

from __future__ import annotations

import errno
import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusefs import errors
from fusefs.config import MiB
from fusefs.store.base import S3_LIMITS, StoreLimits
from fusefs.store.faulty import FaultyStore
from fusefs.store.memory import MemoryServer, MemoryStore


def test_every_write_is_a_new_version_and_dir_markers_are_objects() -> None:
    store = MemoryStore()
    first = store.put("dir/", b"")
    v1 = store.version_id("dir/")
    again = store.put("dir/", b"")
    assert first.version == again.version == hashlib.md5(b"").hexdigest()  # the ETag: the bytes' MD5
    assert store.version_id("dir/") != v1  # yet a version of its own, as a versioned bucket gives
    store.put("dir/x", b"x")
    root = store.list("", "/")
    assert root.objects == [] and root.prefixes == ["dir/"]
    inside = store.list("dir/", "/")
    assert [o.key for o in inside.objects] == ["dir/", "dir/x"]  # the marker beside what it holds
    store.delete("dir/x")
    assert [o.key for o in store.list("dir/", "/").objects] == ["dir/"]  # no directory vanishes with it
    store.delete("dir/")
    assert store.list("", "/").prefixes == []


def test_common_prefixes_count_against_max_keys() -> None:
    store = MemoryStore()
    for key in ("a", "b/1", "b/2", "c/1", "d", "e/1/2"):
        store.put(key, b".")
    pages = []
    token: str | None = None
    while True:
        page = store.list("", "/", token, max_keys=2)
        pages.append(sorted([o.key for o in page.objects] + page.prefixes))
        token = page.next_token
        if token is None:
            break
    assert pages == [["a", "b/"], ["c/", "d"], ["e/"]]
    for i in range(1005):
        store.put(f"many/{i:04d}", b"")
    assert len(store.list("many/", "/", None, max_keys=5000).objects) == 1000  # S3's most per page
    with pytest.raises(errors.InvalidRequestError, match="continuation token"):
        store.list("", "/", "not a token")


def test_multipart_checks_sizes_and_numbers_as_s3_does() -> None:
    store = MemoryStore()
    assert store.limits == S3_LIMITS
    up = store.create_multipart("k")
    with pytest.raises(errors.InvalidRequestError, match="outside"):
        up.upload_part(0, b"x")
    with pytest.raises(errors.InvalidRequestError, match="outside"):
        up.upload_part(S3_LIMITS.max_parts + 1, b"x")
    up.upload_part(1, b"a" * 100)  # too small for a part that is not the last
    up.upload_part(2, b"b")
    assert store.uploads() == ("k",)
    with pytest.raises(errors.InvalidRequestError, match="less than"):
        up.complete()
    up.upload_part(1, b"a" * (5 * MiB))
    info = up.complete()
    assert info.version.endswith("-2")  # a multipart ETag, not the MD5 of the bytes
    assert info.version == up.complete().version  # a retried complete finds the object it made
    assert store.uploads() == ()
    with pytest.raises(errors.NotFoundError, match="no such upload"):
        up.upload_part(3, b"late")
    gone = store.create_multipart("g")
    gone.abort()
    with pytest.raises(errors.NotFoundError):
        gone.complete()
    with pytest.raises(errors.InvalidRequestError, match="at least one part"):
        store.create_multipart("empty").complete()


def test_limits_of_another_backend_and_too_large_objects() -> None:
    small = StoreLimits(max_parts=3, min_part_size=1, max_part_size=4, max_object_size=10)
    store = MemoryStore(limits=small)
    up = store.create_multipart("k")
    with pytest.raises(errors.InvalidRequestError):
        up.upload_part(4, b"x")
    with pytest.raises(errors.InvalidRequestError):
        up.upload_part(1, b"12345")
    with pytest.raises(errors.FileTooLargeError) as exc:
        store.put("big", b"x" * 11)
    assert exc.value.errno == errno.EFBIG


def test_buckets_on_one_server_and_copy_between_them() -> None:
    server = MemoryServer()
    src = server.store(server.create_bucket("src"))
    dst = server.store(server.create_bucket("dst"))
    info = src.put("a", b"abc")
    assert src.identity != dst.identity
    copied = dst.copy_from("src", "a", "b", info.size, info.version)
    assert dst.get_range("b", 0, 3, copied.version) == b"abc"
    src.put("a", b"xyz")
    with pytest.raises(errors.ObjectChangedError):
        dst.copy_from("src", "a", "c", info.size, info.version)
    with pytest.raises(errors.StoreError, match="not empty"):
        src.delete_bucket()
    with pytest.raises(errors.BucketNotFoundError):
        server.store("none").head("a")


def test_parallel_writers_each_land_whole() -> None:
    store = MemoryStore()
    with ThreadPoolExecutor(8) as pool:
        infos = list(pool.map(lambda i: store.put("same", bytes([i]) * 1000), range(64)))
    final = store.head("same")
    assert final.version in {i.version for i in infos}
    data = store.get_range("same", 0, 1000, final.version)
    assert data == data[:1] * 1000  # one writer's bytes, never a mix


# -- the failure wrapper --------------------------------------------------------------------------

def test_faulty_fails_the_nth_call_then_passes() -> None:
    faulty = FaultyStore(MemoryStore())
    faulty.put("k", b"data")
    faulty.fail("get_range", nth=2, times=2)
    assert faulty.get_range("k", 0, 4) == b"data"
    for _ in range(2):
        with pytest.raises(errors.TransientError, match="injected fault: get_range call") as exc:
            faulty.get_range("k", 0, 4)
        assert errors.is_temp_failure(exc.value)
    assert faulty.get_range("k", 0, 4) == b"data"
    assert faulty.calls["get_range"] == 4 and faulty.failed["get_range"] == 2


def test_faulty_permanent_errors_and_lost_answers() -> None:
    inner = MemoryStore()
    faulty = FaultyStore(inner)
    faulty.fail("head", error=errors.AccessDeniedError, times=0)
    for _ in range(3):
        with pytest.raises(errors.AccessDeniedError) as exc:
            faulty.head("k")
        assert not errors.is_temp_failure(exc.value) and exc.value.errno == errno.EACCES
    faulty.clear()
    faulty.fail("put", after=True)
    with pytest.raises(errors.TransientError, match="answer lost"):
        faulty.put("k", b"landed")
    assert inner.get_range("k", 0, 6) == b"landed"  # the store acted on it all the same
    up = faulty.create_multipart("mp")
    faulty.fail("complete", after=True)
    up.upload_part(1, b"only")
    with pytest.raises(errors.TransientError):
        up.complete()
    assert up.complete().size == 4  # the retry finds it done


def test_faulty_probability_is_seeded() -> None:
    def pattern(seed: int) -> list[bool]:
        faulty = FaultyStore(MemoryStore(), seed=seed)
        faulty.put("k", b"x")
        faulty.fail("get_range", probability=0.3, times=0, error=errors.ThrottledError)
        failed = []
        for _ in range(200):
            try:
                faulty.get_range("k", 0, 1)
                failed.append(False)
            except errors.ThrottledError:
                failed.append(True)
        return failed

    first = pattern(7)
    assert first == pattern(7)
    assert 30 <= sum(first) <= 90  # 0.3 of 200, give or take: some fail, most pass
    assert first != pattern(8)


def test_fault_rules_are_checked() -> None:
    faulty = FaultyStore(MemoryStore())
    for bad in ({"nth": 0}, {"probability": 1.5}, {"times": -1}):
        with pytest.raises(ValueError):
            faulty.fail("head", **bad)  # type: ignore[arg-type]
