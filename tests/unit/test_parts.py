"""The multipart planner (fusefs.fs.parts) against each backend's limits, and a real GCS compose.

The planner is a pure function of ``StoreLimits``, so hypothesis checks it over every size up to
the backend's largest object: the parts a write would send (``layout``, exactly as
``fusefs.fs.write`` cuts them) are a valid multipart upload of that backend. S3: at most 10,000
parts, each 5 MiB to 5 GiB but the last. GCS: a composite object has at most 1,024 components
(one compose request takes 32, so they are composed in a tree), any size. Above the largest
object, a clear EFBIG error.

Then the real thing on fake-gcs-server: an upload of the full 1,024 parts, composed while
another client keeps looking at the destination key (it is absent or whole, never partial), and
a compose that fails on the wire (no partial object, no temporary composite left behind).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusefs import errors
from fusefs.config import GiB, MiB, TiB
from fusefs.fs import parts
from fusefs.retry import RetryPolicy
from fusefs.store.base import AsyncStore, StoreLimits
from fusefs.store.gcs import COMPOSE_FAN_IN, UPLOAD_DIR, GCSMultipartUpload, GCSStore
from fusefs.store.gcs import LIMITS as GCS_LIMITS
from fusefs.store.s3 import LIMITS as S3_LIMITS
from testing import figures
from testing.observer import Observer
from testing.proxy import INTERNAL, RESET, CountingProxy, FaultPlan
from testing.servers import FakeGCS
from tests.store.test_store import all_keys, gcs_server

__all__ = ["gcs_server"]  # the session's fake-gcs-server fixture, shared with test_store

BACKENDS = {"s3": S3_LIMITS, "gcs": GCS_LIMITS}


def test_backends_declare_their_own_limits() -> None:
    """The numbers the providers document (S3: 10,000 parts of 5 MiB..5 GiB; GCS: 1,024
    components); a planner that assumed S3's 10,000 parts on GCS failed at close past ~8 GiB."""
    assert (S3_LIMITS.max_parts, S3_LIMITS.min_part_size, S3_LIMITS.max_part_size) == (10_000, 5 * MiB, 5 * GiB)
    assert S3_LIMITS.max_object_size == 5 * TiB
    assert GCS_LIMITS.max_parts == 1024 and GCS_LIMITS.max_object_size == 5 * TiB
    assert COMPOSE_FAN_IN == 32


def layout(plan: parts.PartPlan, total: int) -> list[tuple[int, int]]:
    """The parts an upload of ``total`` bytes sends under ``plan``, as runs of (size, count):
    part n has ``plan.size(n)`` bytes, the last one what is left (fusefs.fs.write cuts parts this
    way). Runs, not a list of 10,000 sizes, so that hypothesis can try hundreds of sizes."""
    runs: list[tuple[int, int]] = []
    left, number = total, 1
    limit = plan.limits.max_parts + 1  # one past the limit shows an overflow
    while left > 0 and number <= limit:
        size = plan.size(number)
        # the parts of this size: to the end of the doubling tier, or all, once at the largest part
        last = limit if size == plan.limits.max_part_size else ((number - 1) // plan.tier + 1) * plan.tier
        count = min(last - number + 1, left // size)
        if count:
            assert plan.size(number + count - 1) == size  # the run really is of one size
            runs.append((size, count))
            left -= size * count
            number += count
        if left and (count == 0 or number <= last):  # what is left is smaller than a part: the last
            runs.append((left, 1))
            left, number = 0, number + 1
    return runs


def assert_valid(plan: parts.PartPlan, total: int) -> list[tuple[int, int]]:
    limits = plan.limits
    runs = layout(plan, total)
    sizes = [size for size, _ in runs]
    assert sum(size * count for size, count in runs) == total, (plan, total)
    assert sum(count for _, count in runs) <= limits.max_parts, (plan, total, runs)
    assert all(s <= limits.max_part_size for s in sizes)
    assert all(s >= limits.min_part_size for s in sizes[:-1]), (plan, total)
    # write.py reuses one buffer from part to part: sizes never shrink (but the last)
    assert sizes[:-1] == sorted(sizes[:-1])
    assert plan.full(limits.max_parts) and not plan.full(limits.max_parts - 1)
    return runs


@dataclass
class Case:
    backend: str
    part_size: int
    total: int

    @property
    def limits(self) -> StoreLimits:
        return BACKENDS[self.backend]


# Sizes spread over every scale: bytes, parts, the edges of a doubling tier, up to the largest object.
def _sizes(limit: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, limit),
        st.integers(0, 64).map(lambda e: min(limit, 2**e)),
        st.sampled_from([0, 1, 5 * MiB - 1, 5 * MiB, 5 * MiB + 1, 8 * GiB, 8 * GiB + 1, 80 * GiB, limit - 1, limit]),
    )


_part_sizes = st.one_of(st.integers(1, 6 * GiB), st.sampled_from([1, 64 * 1024, 5 * MiB, 8 * MiB, 64 * MiB, 5 * GiB]))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    backend = draw(st.sampled_from(sorted(BACKENDS)))
    return Case(backend, draw(_part_sizes), draw(_sizes(BACKENDS[backend].max_object_size)))


@settings(max_examples=150, deadline=None)
@given(cases())
def test_every_size_up_to_the_largest_object_has_a_valid_plan(case: Case) -> None:
    """A file of known size (a staged upload): ``sized`` gives parts the backend accepts."""
    plan = parts.sized(case.limits, case.part_size, case.total, "k")
    assert_valid(plan, case.total)
    # the tuning's part size is kept wherever the backend allows it
    assert plan.base >= min(max(case.part_size, case.limits.min_part_size), case.limits.max_part_size)


@settings(max_examples=100, deadline=None)
@given(cases())
def test_a_streamed_upload_reaches_the_largest_object(case: Case) -> None:
    """A file of unknown size (a stream): its growing parts reach the backend's largest object
    within the part limit, so a stream is never cut short by the part count."""
    plan = parts.streaming(case.limits, case.part_size)
    assert parts.capacity(case.limits, plan.base, plan.tier) >= case.limits.max_object_size
    assert_valid(plan, case.total)
    assert plan.base == min(max(case.part_size, case.limits.min_part_size), case.limits.max_part_size)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(BACKENDS)), _part_sizes, st.integers(1, 10 * TiB))
def test_sizes_above_the_largest_object_are_a_clear_error(backend: str, part_size: int, excess: int) -> None:
    limits = BACKENDS[backend]
    total = limits.max_object_size + excess
    with pytest.raises(errors.FileTooLargeError) as exc:
        parts.sized(limits, part_size, total, "dir/huge.bin")
    assert exc.value.errno == errno.EFBIG  # "File too large" at close, not EIO
    assert str(exc.value) == (f"dir/huge.bin: {total} bytes is more than one object can hold "
                              f"({limits.max_object_size} bytes)")


@pytest.mark.parametrize("total", [8 * GiB + 1, 9 * GiB, 100 * GiB])
def test_gcs_streams_past_1024_parts_of_8_mib(total: int) -> None:
    """The case of the defect: 8 MiB parts, 1,024 components, a file past 8 GiB."""
    plan = parts.streaming(GCS_LIMITS, 8 * MiB)
    runs = assert_valid(plan, total)
    assert runs[0][0] == 8 * MiB
    # the same file on S3 keeps 8 MiB parts much longer (10,000 of them)
    s3 = parts.streaming(S3_LIMITS, 8 * MiB)
    assert s3.size(1000) == 8 * MiB and plan.size(1000) > 8 * MiB


def test_small_parts_are_raised_to_the_backend_minimum() -> None:
    assert parts.streaming(S3_LIMITS, 1).base == 5 * MiB
    assert parts.streaming(GCS_LIMITS, 1).base == 1
    assert parts.streaming(S3_LIMITS, 10 * GiB).base == 5 * GiB


# -- a real GCS compose on fake-gcs-server ----------------------------------------------------------

@dataclass
class Watcher(Observer):
    """Another client looking at the destination key (HEAD and LIST) as fast as it can while an
    upload completes: every sighting must be the whole object."""

    store: GCSStore
    key: str
    size: int
    seen: list[int] = field(default_factory=list)  # sizes seen at the key

    def look(self) -> None:
        try:
            self.seen.append(self.store.head(self.key).size)
        except errors.NotFoundError:
            pass
        page = self.store.list(self.key.rsplit("/", 1)[0] + "/", "/")
        self.seen += [o.size for o in page.objects if o.key == self.key]

    def check(self) -> None:
        assert self.looks > 0
        partial = [s for s in self.seen if s != self.size]
        assert partial == [], f"the key was seen partial: {sorted(set(partial))[:10]} (whole: {self.size})"


def _part(number: int) -> bytes:
    return (hashlib.sha256(number.to_bytes(4, "big")).digest() * 8)[: 100 + number % 50]


def _upload_parts(store: GCSStore, key: str, count: int) -> tuple[GCSMultipartUpload, bytes]:
    up = store.create_multipart(key)
    chunks = [_part(n) for n in range(1, count + 1)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: up.upload_part(n, chunks[n - 1]), range(1, count + 1)))
    return up, b"".join(chunks)


@pytest.fixture
def gcs_proxy(gcs_server: FakeGCS) -> Iterator[CountingProxy]:
    with CountingProxy(gcs_server.port) as proxy:
        yield proxy


@pytest.mark.timeout(240)
def test_gcs_1024_parts_compose_without_a_partial_destination(gcs_server: FakeGCS, gcs_proxy: CountingProxy) -> None:
    """The most parts a GCS upload may have: 1,024, composed 32 at a time into temporary
    composites and once into the key. A watcher never sees the key partial; afterwards only the
    key is left (no part, no temporary composite)."""
    bucket = gcs_server.create_bucket()
    store = GCSStore(bucket, gcs_proxy.endpoint)
    up, expected = _upload_parts(store, "d/big", GCS_LIMITS.max_parts)
    with pytest.raises(errors.InvalidRequestError, match=r"outside 1\.\.1024"):
        up.upload_part(GCS_LIMITS.max_parts + 1, b"x")
    gcs_proxy.reset()
    with Watcher(GCSStore(bucket, gcs_server.endpoint), "d/big", len(expected)) as watcher:
        info = up.complete()
    watcher.check()
    # 32 composites of 32 parts, then one compose of the 32 composites into the key
    assert gcs_proxy.snapshot()["COMPOSE"] == GCS_LIMITS.max_parts // COMPOSE_FAN_IN + 1
    assert info.size == len(expected)
    assert store.get_range("d/big", 0, info.size, info.version) == expected
    assert all_keys(store) == ["d/big"]


@pytest.mark.timeout(120)
def test_gcs_failed_compose_leaves_nothing_at_the_key(gcs_server: FakeGCS, gcs_proxy: CountingProxy) -> None:
    """The compose into the key fails (500 from the wire, the store never sees it): the key was
    never written, the temporary composites are gone, the parts stay for a retry of complete,
    which then lands the whole object; abort of another upload leaves nothing at all."""
    bucket = gcs_server.create_bucket()
    store = GCSStore(bucket, gcs_proxy.endpoint)
    up, expected = _upload_parts(store, "d/obj", 70)  # 3 composites (32, 32, 6), then the key
    gcs_proxy.inject(FaultPlan(rate=1.0, burst=1, kinds=(INTERNAL,), only=frozenset({"COMPOSE"}), skip=3))
    with pytest.raises(errors.TransientError):
        up.complete()
    assert gcs_proxy.tally().faults[INTERNAL] == 1
    with pytest.raises(errors.NotFoundError):
        store.head("d/obj")
    left = all_keys(store)
    assert len(left) == 70 and all(k.startswith(f"d/{UPLOAD_DIR}/") and "compose" not in k for k in left)
    gcs_proxy.inject(None)
    info = up.complete()  # what the retry policy does after a transient failure
    assert store.get_range("d/obj", 0, info.size, info.version) == expected
    assert all_keys(store) == ["d/obj"]
    other = store.create_multipart("d/aborted")
    other.upload_part(1, b"x" * 10)
    other.abort()
    assert all_keys(store) == ["d/obj"]


@pytest.mark.timeout(180)
async def test_gcs_upload_through_faults_is_whole(gcs_server: FakeGCS, gcs_proxy: CountingProxy) -> None:
    """Parts and composes through a store that throttles, fails, resets and stalls at a few
    percent, in bursts; the retry policy sends parts and ``complete`` again. The key ends whole,
    nothing else is left, and a watcher never saw it partial. Resets hit after the store acted
    (a compose that happened, its answer lost), which the retried complete must survive."""
    bucket = gcs_server.create_bucket()
    store = GCSStore(bucket, gcs_proxy.endpoint, timeout=5.0)
    astore = AsyncStore(store, policy=RetryPolicy(base_delay=0.01, max_delay=0.2, deadline=20.0))
    count = 200
    chunks = [_part(n) for n in range(1, count + 1)]
    plan = FaultPlan(rate=0.08, burst=3, seed=13, stall=0.5)
    gcs_proxy.inject(plan)
    up = await astore.create_multipart("d/faulty")
    for n, chunk in enumerate(chunks, 1):
        await astore.upload_part(up, n, chunk)
    part_faults = gcs_proxy.tally().faults
    assert sum(part_faults.values()) >= 5, part_faults
    gcs_proxy.inject(FaultPlan(rate=0.15, burst=2, seed=5, kinds=(RESET, INTERNAL), only=frozenset({"COMPOSE"})))
    with Watcher(GCSStore(bucket, gcs_server.endpoint), "d/faulty", sum(map(len, chunks))) as watcher:
        info = await astore.complete(up)
    watcher.check()
    gcs_proxy.inject(None)
    faults = gcs_proxy.tally().faults
    compose_faults = faults - part_faults
    assert compose_faults[RESET] >= 1 and compose_faults[INTERNAL] >= 1, compose_faults
    data = b"".join(chunks)
    assert info.size == len(data)
    assert store.get_range("d/faulty", 0, info.size, info.version) == data
    assert all_keys(GCSStore(bucket, gcs_server.endpoint)) == ["d/faulty"]
    figures.report("test_parts::gcs_upload_through_faults", dict(faults), len(data))


# -- partial overwrites (parts.patch) ----------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(base=st.integers(0, 200), grow=st.integers(0, 40),
       writes=st.lists(st.tuples(st.integers(0, 240), st.integers(1, 30)), max_size=8))
def test_patch_plans_cover_the_file_copy_only_untouched_bytes_and_keep_part_sizes(
    base: int, grow: int, writes: list[tuple[int, int]]
) -> None:
    """In MiB units: S3's least part is 5 of them. Every byte is in exactly one piece, copies
    come only from old bytes nobody wrote, every part but the last is at least the least part."""
    size = base + grow
    local: list[tuple[int, int]] = []
    for start, n in writes:
        start = min(start, size)
        local = parts.add_range(local, start * MiB, min(size, start + n) * MiB)
    local = [(a, b) for a, b in local if b > a]
    if local:
        size = max(size, local[-1][1] // MiB)
    pieces = parts.patch(S3_LIMITS, 8 * MiB, size * MiB, base * MiB, local)
    if pieces is None:
        return
    assert pieces[0].start == 0 and sum(p.length for p in pieces) == size * MiB
    for a, b in itertools.pairwise(pieces):
        assert a.start + a.length == b.start
        assert a.length >= S3_LIMITS.min_part_size
    for p in pieces:
        if p.copy:
            assert p.start + p.length <= base * MiB
            assert parts.gaps(local, p.start, p.start + p.length) == [(p.start, p.start + p.length)]


def test_patch_plans_of_the_usual_cases() -> None:
    one = parts.patch(S3_LIMITS, 8 * MiB, 25 * MiB, 25 * MiB, [(12 * MiB, 13 * MiB)])
    assert one == [parts.Piece(0, 12 * MiB, True), parts.Piece(12 * MiB, 5 * MiB, False),
                   parts.Piece(17 * MiB, 8 * MiB, True)]
    assert parts.patch(S3_LIMITS, 8 * MiB, 8 * MiB, 8 * MiB, [(MiB, 2 * MiB)]) is None  # nothing to copy
    append = parts.patch(GCS_LIMITS, 8 * MiB, 30 * MiB, 20 * MiB, [(20 * MiB, 30 * MiB)])
    assert append == [parts.Piece(0, 20 * MiB, True), parts.Piece(20 * MiB, 8 * MiB, False),
                      parts.Piece(28 * MiB, 2 * MiB, False)]
    assert parts.patch(GCS_LIMITS, 8 * MiB, 20 * MiB, 20 * MiB, [(MiB, 2 * MiB)]) is None  # no ranges on GCS
    assert parts.gaps([(2, 4), (6, 8)], 0, 10) == [(0, 2), (4, 6), (8, 10)]
    assert parts.add_range([(2, 4), (6, 8)], 4, 6) == [(2, 8)]
