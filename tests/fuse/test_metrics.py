"""A FUSE server's Prometheus figures, against real mounts of the tests' S3 server behind the
counting proxy: reads and writes move the right counters by the right amounts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fusefs import errors, metrics
from fusefs.config import MiB, MountConfig, Tuning
from testing.fsmount import Mounted
from testing.proxy import CountingProxy
from testing.scrape import Samples, parse, scrape_until, value
from testing.servers import RcloneS3, free_port, random_bytes

pytestmark = pytest.mark.fuse

ROOT = Path(__file__).resolve().parents[2]
def figures_at_exit(m: Mounted) -> Samples:
    """Unmount and wait for the server to leave: it writes its last figures on the way out."""
    m.unmount()
    assert m.proc.returncode == 0, m.log_text()
    return parse(Path(m.config.metrics_path).read_text())


def figures_once(m: Mounted, ok: Callable[[Samples], bool], patience: float = 60.0) -> Samples:
    """The server's file once ``ok`` holds for it (it is rewritten every few seconds)."""
    deadline = time.monotonic() + patience
    while True:
        samples = parse(Path(m.config.metrics_path).read_text())
        if ok(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


@pytest.fixture
def config(s3_config: MountConfig, counting_proxy: CountingProxy, tmp_path: Path) -> MountConfig:
    return dataclasses.replace(
        # the server's own read path (FUSE passthrough would let the kernel read the cached file)
        s3_config, endpoint_url=counting_proxy.endpoint, tuning=Tuning(block_size=1 * MiB, passthrough=False),
        metrics_path=str(tmp_path / "metrics" / "a.prom"), metrics_volume="vol-a",
    )


def test_reads_count_store_and_node_cache_bytes(
    s3_server: RcloneS3, bucket: str, config: MountConfig, counting_proxy: CountingProxy,
    mount_fs: Callable[..., Mounted], tmp_path: Path,
) -> None:
    data = random_bytes(3 * MiB + 12345, seed=14)
    s3_server.client().put_object(Bucket=bucket, Key="dir/obj.bin", Body=data)

    counting_proxy.reset()
    first = mount_fs(config, "first")
    assert (first.path / "dir" / "obj.bin").read_bytes() == data
    # The first read's own small GET came first, then block 0's fetch: let it land in the cache.
    figures_once(first, lambda s: value(s, "objfs_node_cache_stored_blocks_total") == 4)
    cold = figures_at_exit(first)
    # The server counts a request as it sends it, the proxy as the store answers: a request still
    # being answered as the server exited would be in its figures and not yet in the tally, and
    # would then land in the second server's count. Once the proxy has settled it is in both.
    counting_proxy.settle()
    tally = counting_proxy.tally()
    tally.requests["LIST"] -= 1  # the access check at start-up (before the figures start) is one LIST
    for kind in ("GET", "HEAD", "LIST"):  # the server counted what the store saw
        assert value(cold, "objfs_store_requests_total", kind=kind) == tally.requests[kind], kind
    assert tally.requests["GET"] >= 4  # four 1 MiB blocks at least
    assert value(cold, "objfs_store_received_bytes_total", kind="GET") == tally.body_bytes["GET"]
    assert value(cold, "objfs_node_cache_read_bytes_total") == 0
    assert value(cold, "objfs_node_cache_misses_total") >= 4
    assert value(cold, "objfs_node_cache_stored_bytes_total") == len(data)
    assert value(cold, "objfs_fuse_operation_seconds_count", op="open") >= 1
    assert value(cold, "objfs_fuse_operation_seconds_count", op="read") >= 1
    assert value(cold, "objfs_store_retries_total") == 0
    assert value(cold, "objfs_volume_problem") == 0
    assert all(dict(labels)["volume"] == "vol-a" for _, labels in cold)

    # A second server on the same node cache: the blocks come from the cache, not the store.
    counting_proxy.reset()
    second = mount_fs(dataclasses.replace(config, metrics_path=str(tmp_path / "metrics" / "b.prom"),
                                          metrics_volume="vol-b", metrics_pod="ns/pod-b"), "second")
    assert (second.path / "dir" / "obj.bin").read_bytes() == data
    warm = figures_at_exit(second)
    counting_proxy.settle()  # what the second server sent is all in the tally
    assert counting_proxy.tally().requests["GET"] == 0
    assert value(warm, "objfs_store_requests_total", kind="GET") == 0
    assert value(warm, "objfs_node_cache_read_bytes_total") == len(data)
    assert value(warm, "objfs_node_cache_hits_total") == 4
    assert value(warm, "objfs_node_cache_size_bytes") >= len(data)
    assert all(dict(labels)["pod"] == "ns/pod-b" for _, labels in warm)


def test_a_write_counts_uploaded_bytes_and_requests(
    config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted],
) -> None:
    data = random_bytes(int(2.5 * MiB), seed=7)
    m = mount_fs(dataclasses.replace(config, cache_dir=None, tuning=Tuning(part_size=5 * MiB)))
    counting_proxy.reset()
    (m.path / "small.txt").write_bytes(b"hello")
    (m.path / "big.bin").write_bytes(data * 4)  # 10 MiB: a multipart upload of two parts
    figures = figures_at_exit(m)
    counting_proxy.settle()  # a request the server sent (and counted) before it exited is in the tally too
    tally = counting_proxy.tally()
    sent = {k: value(figures, "objfs_store_sent_bytes_total", kind=k) for k in ("PUT", "PART")}
    assert sum(sent.values()) == len(data) * 4 + 5
    assert sent["PART"] == len(data) * 4
    for kind in ("PUT", "PART", "CREATE-MULTIPART", "COMPLETE"):
        assert value(figures, "objfs_store_requests_total", kind=kind) == tally.requests[kind], kind
    assert tally.requests["PART"] == 2
    assert value(figures, "objfs_fuse_operation_seconds_count", op="write") >= 1
    assert value(figures, "objfs_fuse_operation_seconds_count", op="create") == 2


def test_errors_are_counted_by_operation_and_errno(config: MountConfig, mount_fs: Callable[..., Mounted]) -> None:
    m = mount_fs(config)
    (m.path / "f").write_bytes(b"x")
    for _ in range(3):
        with pytest.raises(PermissionError):
            os.chmod(m.path / "f", 0o600)  # modes are set per mount: EPERM
    figures = figures_at_exit(m)
    assert value(figures, "objfs_fuse_errors_total", op="setattr", errno="EPERM") == 3


def test_an_unusable_node_cache_is_reported_as_a_problem(
    config: MountConfig, mount_fs: Callable[..., Mounted], tmp_path: Path,
) -> None:
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("")
    m = mount_fs(dataclasses.replace(config, cache_dir=str(not_a_dir)))
    figures = figures_at_exit(m)
    assert value(figures, "objfs_volume_problem", reason="cache_disabled") == 1
    assert value(figures, "objfs_volume_problem", reason="store_access_denied") == 0


def test_store_health_follows_the_last_request() -> None:
    kind = metrics.store_kind("GET some/key[0:+1]")
    kind.failed(errors.AccessDeniedError("denied"))
    samples = parse(metrics.Exporter({"volume": "v"}).text().decode())
    assert value(samples, "objfs_volume_problem", reason="store_access_denied") == 1
    assert value(samples, "objfs_store_errors_total", kind="GET", error="AccessDeniedError") >= 1
    kind.succeeded(b"abc", 0)
    samples = parse(metrics.Exporter({"volume": "v"}).text().decode())
    assert value(samples, "objfs_volume_problem", reason="store_access_denied") == 0


def test_objfs_mount_serves_metrics_over_http(
    s3_server: RcloneS3, bucket: str, tmp_path: Path,
) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"12345")
    target = tmp_path / "mnt"
    target.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    cli = [sys.executable, "-m", "fusefs.proc.cli"]
    bad = subprocess.run([*cli, "mount", f"s3://{bucket}", str(target), "--metrics-address", "nowhere"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert bad.returncode != 0 and "HOST:PORT" in bad.stderr
    port = free_port()
    r = subprocess.run([*cli, "mount", f"s3://{bucket}", str(target), "--endpoint-url", s3_server.endpoint,
                        "--no-cache", "--metrics-address", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        assert (target / "k").read_bytes() == b"12345"
        samples = scrape_until(f"http://127.0.0.1:{port}/metrics",
                               lambda s: value(s, "objfs_store_received_bytes_total", kind="GET") >= 5)
        assert value(samples, "objfs_store_requests_total", volume=f"s3://{bucket}", kind="GET") >= 1
    finally:
        subprocess.run([*cli, "unmount", str(target)], capture_output=True, cwd=ROOT, timeout=60)


def test_node_cache_evictions_are_counted(tmp_path: Path) -> None:
    from fusefs.nodecache.cache import BlockKey, NodeCache

    cache = NodeCache(str(tmp_path / "cache"), size_limit=256 * 1024)
    removed = "objfs_node_cache_removed_blocks_total"
    before = metrics.REGISTRY.get_sample_value(removed) or 0
    try:
        for index in range(8):
            assert cache.put(BlockKey("s", "k", "v", index), random_bytes(64 * 1024, seed=index))
        entries = cache.stats()["entries"]
    finally:
        cache.close()
    assert entries < 8
    assert (metrics.REGISTRY.get_sample_value(removed) or 0) - before == 8 - entries


def test_closing_a_read_only_open_sends_no_flush(config: MountConfig, mount_fs: Callable[..., Mounted]) -> None:
    """A read-only open has nothing to flush: its open answers FOPEN_NOFLUSH, and the kernel sends
    no FLUSH at close (a request less per file a data loader opens); a write open still flushes,
    which is where its data is stored."""
    m = mount_fs(config)
    (m.path / "w").write_bytes(b"written")  # one write open, closed: one FLUSH at least
    for _ in range(5):
        assert (m.path / "w").read_bytes() == b"written"
    figures = figures_at_exit(m)
    assert value(figures, "objfs_fuse_operation_seconds_count", op="open") >= 5
    assert value(figures, "objfs_fuse_operation_seconds_count", op="flush") == 1
