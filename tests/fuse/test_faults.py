"""The store misbehaves; objfs keeps every byte right. Real FUSE mounts over ``rclone serve s3``
and fake-gcs-server behind ``testing.proxy.CountingProxy``, which answers 503 SlowDown and 500
itself, resets connections in the middle of a body, stalls, and closes after the headers: at a
few percent and in bursts, or for every request while the store is "down".

- ``objfs mount`` comes up through a mount-time check that is throttled, failed, reset and cut
  (each once); a single failed check used to fail the mount.
- Large reads (multi-block, sequential in parallel, and ranged) and small reads give exactly the
  stored bytes (hashes compared) with faults at a few percent.
- Writes land whole or fail at close/fsync; another client listing and HEADing the store during
  and after the writes never sees an object that is not whole.
- A store down past the retry deadline (shortened to 1 s for the test through
  ``Tuning.retry_deadline``; 30 s by default) gives the reader EIO, never a short read or EAGAIN,
  and never a hang; when the store is back, the same open file reads right, without a remount.

Each test reports ``FAULTS injected=N verified_bytes=M`` (testing/figures.py): ``pytest -s`` shows
the lines as they happen, and every run ends with them and their total.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from fusefs import errors, kernel
from fusefs.config import Credentials, MiB, MountConfig, Tuning
from fusefs.store.base import BlockingStore
from fusefs.store.gcs import UPLOAD_DIR
from testing import figures
from testing.fsmount import Mounted
from testing.observer import Observer
from testing.proxy import CLOSE, FAULT_KINDS, INTERNAL, RESET, SLOWDOWN, STALL, CountingProxy, FaultPlan
from testing.servers import random_bytes
from tests.store.test_store import Backend, gcs_server, make_backend

__all__ = ["gcs_server"]  # the session's fake-gcs-server fixture, shared with test_store

pytestmark = pytest.mark.fuse

ROOT = Path(__file__).resolve().parents[2]
#: a few percent of requests start a burst of 1 to 4 faults; stalls last half a second
FEW_PERCENT = FaultPlan(rate=0.04, burst=4, seed=1, stall=0.5)
#: what a "hang" is here: far past the 1 s deadline plus request timeouts, on a loaded machine
HANG = 120.0


@pytest.fixture(params=["s3", "gcs"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return make_backend(request)


@dataclass
class Side:
    """A fresh bucket, a store client that bypasses the proxy, and the proxy in front."""

    backend: Backend
    bucket: str
    direct: BlockingStore
    proxy: CountingProxy

    def config(self, tmp_path: Path, **tuning: Any) -> MountConfig:
        """A mount through the proxy, without a node cache (every read is a store read)."""
        return MountConfig(
            backend=self.backend.name, bucket=self.bucket, endpoint_url=self.proxy.endpoint,
            credentials=self.backend.server.credentials, cache_dir=None,
            tuning=Tuning(block_size=1 * MiB, **tuning),
        )

    def read(self, key: str, size: int) -> bytes:
        return b"".join(self.direct.get_range(key, off, min(8 * MiB, size - off))
                        for off in range(0, size, 8 * MiB))

    def objects(self, prefix: str = "") -> dict[str, int]:
        found: dict[str, int] = {}
        token: str | None = None
        while True:
            page = self.direct.list(prefix, None, token)
            found.update((o.key, o.size) for o in page.objects)
            token = page.next_token
            if not token:
                return found


@pytest.fixture
def side(backend: Backend) -> Iterator[Side]:
    bucket = backend.new_bucket()
    port = int(backend.endpoint.rsplit(":", 1)[1])
    with CountingProxy(port) as proxy:
        yield Side(backend, bucket, backend.store(bucket), proxy)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def outcome(fn: Callable[[], Any], limit: float = HANG) -> Any:
    """``fn()`` in a thread: its result or the exception it raised; fails the test if it is
    still running after ``limit`` seconds (a hang, not a slow answer)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the test
            box["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still waiting after {limit:.0f}s with the store down: a hang"
    return box["value"]


def assert_eio(result: Any) -> None:
    """A failure the caller's read loop cannot take for "no data yet" or a short file."""
    assert isinstance(result, OSError), f"expected EIO, got {result!r:.200}"
    assert result.errno == errno.EIO, result


# -- mount -----------------------------------------------------------------------------------------

def _flip_through(proxy: CountingProxy, kinds: tuple[str, ...], stop: threading.Event) -> None:
    """The store is down with each of ``kinds`` for one request, then up."""
    for n, kind in enumerate(kinds):
        proxy.down(kind)
        while sum(proxy.tally().faults.values()) <= n and not stop.wait(0.005):
            pass
    proxy.up()


def test_objfs_mount_comes_up_through_failed_checks(side: Side, tmp_path: Path) -> None:
    """The mount-time check is throttled (503 SlowDown), fails (500), is reset and cut after the
    headers, one request each: ``objfs mount`` retries it and comes up."""
    side.direct.put("hello.txt", b"hi")
    target = tmp_path / "mnt"
    target.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    creds = side.backend.server.credentials
    if side.backend.name == "s3":
        assert creds.access_key_id and creds.secret_access_key
        env.update(AWS_ACCESS_KEY_ID=creds.access_key_id, AWS_SECRET_ACCESS_KEY=creds.secret_access_key,
                   AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    scheme = "s3" if side.backend.name == "s3" else "gs"
    kinds = (SLOWDOWN, INTERNAL, RESET, CLOSE)
    stop = threading.Event()
    flipper = threading.Thread(target=_flip_through, args=(side.proxy, kinds, stop), daemon=True)
    flipper.start()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "fusefs.proc.cli", "mount", f"{scheme}://{side.bucket}", str(target),
             "--endpoint-url", side.proxy.endpoint, "--no-cache"],
            capture_output=True, text=True, env=env, timeout=HANG, cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr
        assert (target / "hello.txt").read_bytes() == b"hi"
    finally:
        stop.set()
        flipper.join(10)
        if kernel.find_mount(str(target)) is not None:
            kernel.unmount(str(target), lazy=True)
    faults = side.proxy.tally().faults
    assert set(faults) == set(kinds), faults  # each at least once (a quick retry may meet one twice)
    figures.report(f"mount_check[{side.backend.name}]", dict(faults), 2)


# -- answers cut short -----------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["LIST", "HEAD", "PUT", "CREATE-MULTIPART"])
def test_an_answer_cut_short_is_a_transient_error_never_an_empty_result(side: Side, op: str) -> None:
    """The connection closes or resets in the middle of an answer (after its headers, or in
    its body): the request fails as transient (retried), and is never taken for what a short
    body parses as. boto3 took a LIST answer cut after its headers for an empty listing (a
    directory that looked empty, names that were not found) and a CreateMultipartUpload one for
    an answer without an upload id (a KeyError, not retried: the close failed)."""
    if op == "CREATE-MULTIPART" and side.backend.name == "gcs":
        pytest.skip("a GCS upload starts without a request (parts are objects, composed at the end)")
    side.direct.put("a/x", b"1")
    side.direct.put("a/y", b"22")
    store = side.backend.store(side.bucket, endpoint=side.proxy.endpoint, timeout=10.0)
    calls: dict[str, Callable[[], object]] = {
        "LIST": lambda: sorted(o.key for o in store.list("a/").objects),
        "HEAD": lambda: store.head("a/y").size,
        "PUT": lambda: store.put("a/z", b"333").size,
        "CREATE-MULTIPART": lambda: bool(getattr(store.create_multipart("a/m"), "upload_id", None)),
    }
    expected = {"LIST": ["a/x", "a/y"], "HEAD": 2, "PUT": 3, "CREATE-MULTIPART": True}
    for kind in (CLOSE, RESET):
        side.proxy.inject(FaultPlan(rate=1.0, burst=1, kinds=(kind,), only=frozenset({op})))
        with pytest.raises(errors.TransientError) as exc:
            calls[op]()
        assert errors.is_temp_failure(exc.value)
        side.proxy.inject(None)
        assert calls[op]() == expected[op]  # what the retry gets
    faults = side.proxy.tally().faults
    assert faults == {CLOSE: 1, RESET: 1}, faults
    figures.report(f"cut_answer[{side.backend.name},{op}]", dict(faults), 0)


@pytest.mark.parametrize("kind", [RESET, STALL])
def test_a_complete_whose_answer_was_lost_is_retried_into_the_object(side: Side, kind: str) -> None:
    """The store completes a multipart upload but its answer is lost: the retry (what the
    policy sends) must find the object, not the upload gone. S3 answers NoSuchUpload to the
    second CompleteMultipartUpload, which was a NotFoundError: ENOENT at close for a file that
    had landed whole. (GCS composes again from the parts, which are kept until success.)"""
    store = side.backend.store(side.bucket, endpoint=side.proxy.endpoint, timeout=10.0)
    data = [random_bytes(5 * MiB, seed=600), random_bytes(1000, seed=601)]
    up = store.create_multipart("m/obj")
    for n, chunk in enumerate(data, 1):
        up.upload_part(n, chunk)
    final = "COMPLETE" if side.backend.name == "s3" else "COMPOSE"
    side.proxy.inject(FaultPlan(rate=1.0, burst=1, kinds=(kind,), only=frozenset({final}), stall=0.5))
    with pytest.raises(errors.TransientError):
        up.complete()
    faults = side.proxy.tally().faults
    side.proxy.inject(None)
    info = up.complete()
    whole = b"".join(data)
    assert info.size == len(whole) and side.read("m/obj", len(whole)) == whole
    assert set(side.objects()) == {"m/obj"}
    figures.report(f"lost_complete[{side.backend.name},{kind}]", dict(faults), len(whole))


# -- reads -----------------------------------------------------------------------------------------

def test_reads_through_faults_are_exact(side: Side, tmp_path: Path, mount_fs: Callable[..., Mounted]) -> None:
    """Multi-block files read whole, three at once; ranged reads across blocks, four at once;
    forty small files, eight at once: all through faults of every kind, all exact."""
    rng = random.Random(5)
    big = {f"big/{i}": random_bytes(12 * MiB + 4321 * i, seed=100 + i) for i in range(3)}
    ranged = random_bytes(16 * MiB + 3, seed=200)
    small = {f"small/{i:02d}": random_bytes(rng.randint(0, 64 * 1024), seed=300 + i) for i in range(40)}
    for key, data in [*big.items(), ("ranged", ranged), *small.items()]:
        side.direct.put(key, data)
    side.proxy.inject(FEW_PERCENT)
    m = mount_fs(side.config(tmp_path))
    verified = 0

    def whole(key: str) -> int:
        h = hashlib.sha256()
        with open(m.path / key, "rb") as f:
            while chunk := f.read(1 * MiB):
                h.update(chunk)
        assert h.hexdigest() == sha(big.get(key) or small[key]), key
        return len(big.get(key) or small[key])

    spans = [(rng.randrange(len(ranged)), rng.randint(1, 3 * MiB)) for _ in range(48)]
    fd = os.open(m.path / "ranged", os.O_RDONLY)

    def span(offset: int, length: int) -> int:
        got = os.pread(fd, length, offset)
        assert got == ranged[offset : offset + length], (offset, length)
        return len(got)

    try:
        with ThreadPoolExecutor(3) as pool:
            verified += sum(pool.map(whole, big))
        with ThreadPoolExecutor(4) as pool:
            verified += sum(pool.map(lambda s: span(*s), spans))
        with ThreadPoolExecutor(8) as pool:
            verified += sum(pool.map(whole, small))
    finally:
        os.close(fd)
    faults = side.proxy.tally().faults
    assert set(faults) == set(FAULT_KINDS), faults  # every kind of fault was met and ridden out
    figures.report(f"reads[{side.backend.name}]", dict(faults), verified)


# -- writes ----------------------------------------------------------------------------------------

@dataclass
class Sightings(Observer):
    """Another client listing and HEADing the store while objfs writes: every object it sees
    must be one of the writes, whole."""

    side: Side
    expected: dict[str, int]  # key -> size of the whole object
    seen: list[tuple[str, int]] = field(default_factory=list)
    join_timeout: ClassVar[float] = 60.0

    def look(self) -> None:
        listed = self.side.objects()
        self.seen += listed.items()
        for key in listed:
            try:
                self.seen.append((key, self.side.direct.head(key).size))
            except errors.NotFoundError:
                pass

    def check(self) -> None:
        assert self.looks > 1
        wrong = {(k, s) for k, s in self.seen if UPLOAD_DIR not in k and self.expected.get(k) != s}
        assert not wrong, f"objects seen that are not whole writes: {sorted(wrong)[:10]}"


def _write(path: Path, data: bytes, how: str) -> None:
    with open(path, "wb") as f:
        if how == "backwards":  # not sequential: the file is staged and uploaded whole at close
            half = len(data) // 2
            f.seek(half)
            f.write(data[half:])
            f.seek(0)
            f.write(data[:half])
        else:
            for off in range(0, len(data), 1 * MiB):
                f.write(data[off : off + 1 * MiB])
        f.flush()
        os.fsync(f.fileno())


def test_writes_land_whole_or_fail_at_close(side: Side, tmp_path: Path, mount_fs: Callable[..., Mounted]) -> None:
    """Streamed multipart files, a staged one and small ones written through faults: each close
    either succeeds with the whole object in the store or fails (EIO) at fsync/close; nothing
    partial is ever listed or HEADed, and no upload is left behind."""
    rng = random.Random(9)
    writes: dict[str, tuple[bytes, str]] = {
        **{f"stream{i}": (random_bytes(20 * MiB + 17 * i, seed=400 + i), "stream") for i in range(2)},
        "staged": (random_bytes(12 * MiB + 5, seed=410), "backwards"),
        **{f"small{i:02d}": (random_bytes(rng.randint(0, 100 * 1024), seed=420 + i), "stream") for i in range(10)},
    }
    side.proxy.inject(dataclasses.replace(FEW_PERCENT, rate=0.08))  # writes make fewer requests than reads
    m = mount_fs(side.config(tmp_path))
    failed: dict[str, OSError] = {}

    def one(key: str) -> None:
        data, how = writes[key]
        try:
            _write(m.path / key, data, how)
        except OSError as exc:
            failed[key] = exc

    whole = {k: len(d) for k, (d, _) in writes.items()}
    with Sightings(side, whole) as sightings:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, writes))
        empty_uploads = _wait_for_no_uploads(side)
    sightings.check()
    tally = side.proxy.tally()
    faults = tally.faults
    lost_creations = sum(n for (kind, fault), n in tally.faulted.items()
                         if kind == "CREATE-MULTIPART" and fault in (RESET, CLOSE, STALL))
    assert empty_uploads <= lost_creations, (empty_uploads, tally.faulted)
    side.proxy.inject(None)
    assert all(exc.errno == errno.EIO for exc in failed.values()), failed
    stored = side.objects()
    assert set(stored) <= set(whole), stored
    verified = 0
    for key, (data, _) in writes.items():
        if key in failed and key not in stored:
            continue  # failed at close and never stored: allowed
        assert stored[key] == len(data) and sha(side.read(key, len(data))) == sha(data), key
        verified += len(data)
    assert len(failed) <= 2, failed  # with a 30 s deadline, a few percent of faults fail (almost) nothing
    assert set(faults) == set(FAULT_KINDS), faults
    figures.report(f"writes[{side.backend.name}]", dict(faults), verified)


def _wait_for_no_uploads(side: Side, limit: float = 60.0) -> int:
    """Given-up uploads are aborted in the background (and at release, which the kernel sends
    after close returns): wait until no upload holds a part; the number of empty uploads left.

    Empty uploads are the creations whose answer was lost after the store acted (reset, cut,
    stalled): objfs never learned their IDs, so it cannot abort them (S3's lifecycle rule
    AbortIncompleteMultipartUpload does; they hold no data). Their number is checked against
    the faults that hit CREATE-MULTIPART after the store had acted."""
    deadline = threading.Event()
    timer = threading.Timer(limit, deadline.set)
    timer.start()
    try:
        while not deadline.is_set() and any(_uploads(side).values()):
            deadline.wait(0.1)
    finally:
        timer.cancel()
    left = _uploads(side)
    assert not any(left.values()), f"multipart uploads left behind with parts: {left}"
    return len(left)


def _uploads(side: Side) -> dict[str, int]:
    """Uploads in progress: S3 upload id -> its parts; GCS: part object -> 1."""
    if side.backend.name == "gcs":
        return {k: 1 for k in side.objects() if UPLOAD_DIR in k}
    client = side.backend.server.client()
    try:
        found = client.list_multipart_uploads(Bucket=side.bucket).get("Uploads", [])
    except client.exceptions.ClientError as exc:  # rclone: NoSuchUpload for a bucket that never had one
        if exc.response["Error"]["Code"] != "NoSuchUpload":
            raise
        return {}
    return {u["UploadId"]: len(client.list_parts(Bucket=side.bucket, Key=u["Key"], UploadId=u["UploadId"])
                               .get("Parts", [])) for u in found}


# -- the store down past the deadline --------------------------------------------------------------

@pytest.mark.parametrize(("backend", "kind"), [("s3", SLOWDOWN), ("s3", STALL), ("gcs", SLOWDOWN)],
                         indirect=["backend"])
def test_store_down_past_the_deadline_is_eio_then_recovers(
    side: Side, kind: str, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    """Throttled (503 SlowDown) or silent (stalls) for longer than the retry deadline: a read
    gets EIO (not EAGAIN, which Python's readers turn into a short read or None; not a hang), a
    name never seen gets EIO, a write fails at close and stores nothing. Once the store is back,
    the same open file reads right and the write goes through: no remount."""
    data = random_bytes(3 * MiB + 5, seed=500)
    later = random_bytes(100_000, seed=501)
    side.direct.put("r/file", data)
    m = mount_fs(side.config(tmp_path, retry_deadline=1.0, request_timeout=5.0))
    side.proxy.inject(FaultPlan(rate=0.0, stall=0.5))  # no faults yet; stalls (below) last 0.5 s
    reader = open(m.path / "r" / "file", "rb")  # kept open across the outage
    writer = open(m.path / "r" / "new", "wb")
    try:
        writer.write(later)  # small: nothing is sent before close
        # a name this mount has not seen, in a directory it has not listed (r is listed by now: the
        # lookups of file and new were two misses there, see fusefs.fs.meta.LIST_AFTER_MISSES)
        side.direct.put("s/later", later)
        side.proxy.down(kind)
        assert_eio(outcome(reader.read))  # buffered readall: raises, never returns part of the file
        assert_eio(outcome(lambda: os.pread(reader.fileno(), 4096, 2 * MiB)))
        assert_eio(outcome(lambda: (m.path / "s" / "later").read_bytes()))
        assert_eio(outcome(writer.close))
        if kind == SLOWDOWN:  # the store never saw the PUT
            with pytest.raises(errors.NotFoundError):
                side.direct.head("r/new")
        else:  # a stall forwards the request: the PUT may have landed, its answer lost; whole, then
            with contextlib.suppress(errors.NotFoundError):
                assert side.direct.head("r/new").size == len(later)
        faults = side.proxy.tally().faults
        assert faults[kind] >= 4, faults  # every request was retried until the deadline
        side.proxy.up()
        reader.seek(0)
        assert sha(reader.read()) == sha(data)
        assert (m.path / "s" / "later").read_bytes() == later
        (m.path / "r" / "new").write_bytes(later)
        assert side.read("r/new", len(later)) == later
    finally:
        reader.close()
        if not writer.closed:
            with pytest.raises(OSError):
                writer.close()
    figures.report(f"store_down[{side.backend.name},{kind}]", dict(faults), len(data) + 2 * len(later))


def test_shortened_deadline_is_a_tuning_knob() -> None:
    """The deadline the outage test shortens is the mount's own setting, 30 s unless changed,
    and it reaches the server with the rest of the configuration."""
    config = MountConfig(backend="s3", bucket="bkt", credentials=Credentials())
    assert config.tuning.retry_deadline == 30.0
    short = dataclasses.replace(config, tuning=Tuning(retry_deadline=2.0))
    assert MountConfig.from_json(short.to_json()).tuning.retry_deadline == 2.0


# -- prefetch ------------------------------------------------------------------------------------

def test_store_failing_during_prefetch_leaves_the_mount_serving(
    side: Side, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    """The `prefetch` globs warm the node cache in the background; the store fails every GET
    meanwhile (past the deadline). Prefetch gives up, the mount keeps serving, and once the
    store answers the files read right."""
    files = {f"warm/{i}.bin": random_bytes(300_000 + i, seed=700 + i) for i in range(3)}
    for key, data in files.items():
        side.direct.put(key, data)
    side.proxy.inject(FaultPlan(rate=1.0, burst=1, kinds=(INTERNAL,), only=frozenset({"GET"})))
    config = dataclasses.replace(side.config(tmp_path, retry_deadline=1.0), cache_dir=str(tmp_path / "cache"),
                                 prefetch=("warm/*.bin",))
    m = mount_fs(config)
    while side.proxy.tally().faults[INTERNAL] < 3 * len(files) and m.proc.poll() is None:
        threading.Event().wait(0.1)  # every object's warm-up met the failing store, retried
    while "prefetch" not in m.log_text() and m.proc.poll() is None:
        threading.Event().wait(0.1)  # and gave up
    faults = side.proxy.tally().faults
    side.proxy.inject(None)
    assert m.proc.poll() is None, f"the server died: {m.log_text()[-2000:]}"
    for key, data in files.items():
        assert (m.path / key).read_bytes() == data
    figures.report(f"prefetch[{side.backend.name}]", dict(faults), sum(map(len, files.values())))
