"""Node cache faults under real FUSE mounts: truncated and bit-flipped block files and whole-object
files, a corrupt index (diskcache's SQLite), a full disk (a small tmpfs), a read-only cache
directory. Reads never return a wrong byte (they refetch from the store, or fail with EIO) and the
mount keeps serving.

Each case warms the cache through one mount, injects the fault with the server gone, and reads
everything again through a fresh mount (a fresh server: nothing of the first one's memory, and no
kernel page cache of the first mount), then once more to show the cache healed or stayed out of the
way. The tmpfs cases mount a filesystem of their own, so they need root like every FUSE test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sqlite3
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fusefs.config import GiB, KiB, MountConfig, Tuning
from fusefs.nodecache.cache import BlockKey, NodeCache
from testing import figures
from testing.fsmount import Mounted
from testing.servers import RcloneS3, random_bytes

pytestmark = pytest.mark.fuse

BS = 256 * KiB
#: two small objects of one size (each one entry of the index: a ``.val`` file), and two larger
#: ones (data files of four blocks, the last short, published complete once read whole)
OBJECTS = {
    "small/a.bin": random_bytes(40 * KiB, 1),
    "small/b.bin": random_bytes(40 * KiB, 2),
    "large/x.bin": random_bytes(3 * BS + 4321, 3),
    "large/y.bin": random_bytes(3 * BS + 4321, 4),
}
#: faults injected over the whole module (kind: count) and bytes read back and compared, reported
#: at the end (testing/figures.py: the run's summary shows them)
INJECTED: Counter[str] = Counter()
VERIFIED = [0]


@pytest.fixture(scope="module", autouse=True)
def _report_faults() -> Iterator[None]:
    yield
    if INJECTED:
        figures.report("cache_faults", dict(INJECTED), VERIFIED[0])


@pytest.fixture
def stored(s3_server: RcloneS3, s3_config: MountConfig) -> MountConfig:
    client = s3_server.client()
    for key, data in OBJECTS.items():
        client.put_object(Bucket=s3_config.bucket, Key=key, Body=data)
    return dataclasses.replace(s3_config, read_only=True, cache_size=1 * GiB,
                               tuning=Tuning(block_size=BS, memory_blocks=4))


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


class Reads:
    """Mounts ``config`` afresh and reads every object through it, counting the mounts."""

    def __init__(self, config: MountConfig, mount_fs: Callable[..., Mounted]) -> None:
        self.config = config
        self.mount_fs = mount_fs
        self.n = 0

    def __call__(self, unmount: bool = True) -> tuple[Mounted, str]:
        """Read everything twice (the second read of a mount hits its server's memory or the node
        cache); every byte must be right, or the read must fail with EIO (never a wrong byte).
        Returns the mount and its log."""
        self.n += 1
        m = self.mount_fs(self.config, name=f"mnt{self.n}")
        for _ in range(2):
            for key, data in OBJECTS.items():
                try:
                    got = (m.path / key).read_bytes()
                except OSError as exc:
                    assert exc.errno == errno.EIO, f"{key}: {exc}"
                    continue
                assert got == data, f"{key}: wrong bytes after a cache fault ({len(got)} read, {len(data)} stored)"
                VERIFIED[0] += len(got)
        assert sorted(os.listdir(m.path / "large")) == ["x.bin", "y.bin"]  # still serving
        assert m.proc.poll() is None, m.log_text()
        log = m.log_text()
        if unmount:
            m.unmount()
        return m, log


def cache_files(cache: Path) -> tuple[list[Path], list[Path]]:
    """(block files of whole entries, whole-object data files) in the node cache."""
    return sorted(cache.rglob("*.val")), sorted((cache / "objects").rglob("*.obj")) + sorted(
        (cache / "objects").rglob("*.part"))


def flip(path: Path, offset: int) -> None:
    """One bit flipped, the file's mode kept: the disk's fault, not a write of ours (a complete file
    made writable would no longer be opened with FUSE passthrough)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    os.chmod(path, mode)


@pytest.mark.parametrize("fault", ["truncate", "flip"])
@pytest.mark.parametrize("what", ["blocks", "objects"])
def test_damaged_cache_files_are_refetched(
    stored: MountConfig, mount_fs: Callable[..., Mounted], fault: str, what: str
) -> None:
    reads = Reads(stored, mount_fs)
    reads()
    blocks, objects = cache_files(Path(stored.cache_dir or ""))
    assert len(blocks) == 2 and len(objects) == 2, (blocks, objects)
    for path in blocks if what == "blocks" else objects:
        size = path.stat().st_size
        if fault == "truncate":
            os.chmod(path, 0o600)
            os.truncate(path, size // 2 if what == "blocks" else size - 1)
        else:
            flip(path, size // 3)  # block 1 of a data file, the middle of a small one
        INJECTED[f"{fault}-{what}"] += 1
    _, log = reads()
    assert "corrupt block" in log  # the damage was found, not missed
    _, log = reads()
    assert "corrupt block" not in log  # fetched again and cached right


def _swap_rows(db: Path, pattern: str) -> int:
    """Swap what two index rows point at (file name and tag): an index that names the wrong, but
    intact, file for a key. Returns the rows changed."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT rowid, filename, tag FROM Cache WHERE filename LIKE ? ORDER BY rowid",
                           (pattern,)).fetchall()
        assert len(rows) >= 2, rows
        (r1, f1, t1), (r2, f2, t2) = rows[:2]
        with con:
            con.execute("UPDATE Cache SET filename = ?, tag = ? WHERE rowid = ?", (f2, t2, r1))
            con.execute("UPDATE Cache SET filename = ?, tag = ? WHERE rowid = ?", (f1, t1, r2))
        return 2
    finally:
        con.close()


@pytest.mark.parametrize("fault", ["garbage", "truncated", "swapped-blocks", "swapped-objects"])
def test_corrupt_index_never_serves_wrong_bytes(
    stored: MountConfig, mount_fs: Callable[..., Mounted], fault: str
) -> None:
    reads = Reads(stored, mount_fs)
    reads()
    cache = Path(stored.cache_dir or "")
    db = cache / "cache.db"
    for extra in ("cache.db-wal", "cache.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            (cache / extra).unlink()
    if fault == "garbage":
        db.write_bytes(random_bytes(db.stat().st_size, 99))
    elif fault == "truncated":
        os.truncate(db, db.stat().st_size // 2)
    else:
        _swap_rows(db, "%.val" if fault == "swapped-blocks" else "objects/%")
    INJECTED[f"index-{fault}"] += 1
    reads()


def test_full_disk(stored: MountConfig, mount_fs: Callable[..., Mounted], tmp_path: Path) -> None:
    """A cache on a 1 MiB tmpfs for 1.7 MiB of objects: writes fail with ENOSPC part-way (blocks,
    data files, SQLite itself), reads stay right, and what did fit is still served."""
    with tmpfs(tmp_path / "small-disk", "1m") as disk:
        reads = Reads(dataclasses.replace(stored, cache_dir=str(disk / "cache")), mount_fs)
        _, log = reads()
        INJECTED["full-disk"] += 1
        assert "failed" in log and "node cache" in log, log  # the cache said it could not write
        reads()
        # full from the start: a file takes all but 64 KiB, so even the index cannot grow (when the
        # cache's own files already left less than that, the filler is empty: the disk is full anyway)
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * (64 * KiB))
        os.truncate(disk / "filler", max(0, os.path.getsize(disk / "filler") - 64 * KiB))
        INJECTED["full-disk-at-open"] += 1
        reads()


def test_read_only_cache_directory(stored: MountConfig, mount_fs: Callable[..., Mounted], tmp_path: Path) -> None:
    """Read-only from the start (the index cannot even be created), and made read-only under a
    warm cache (hits still verified; the access times and new blocks cannot be written)."""
    with tmpfs(tmp_path / "ro-empty", "64m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        INJECTED["read-only-at-open"] += 1
        _, log = Reads(dataclasses.replace(stored, cache_dir=str(disk / "cache")), mount_fs)()
        assert "node cache" in log, log
    with tmpfs(tmp_path / "ro-warm", "64m") as disk:
        reads = Reads(dataclasses.replace(stored, cache_dir=str(disk / "cache")), mount_fs)
        reads()
        reads.n = 10  # mount names of this half
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        INJECTED["read-only-warm"] += 1
        reads()
        reads()


def test_damage_while_a_mount_serves(stored: MountConfig, mount_fs: Callable[..., Mounted]) -> None:
    """Cache files damaged under a live server: a second server on the node finds the damage, and
    the first keeps serving."""
    reads = Reads(stored, mount_fs)
    first, _ = reads(unmount=False)
    blocks, objects = cache_files(Path(stored.cache_dir or ""))
    for path in [*blocks, *objects]:
        flip(path, path.stat().st_size // 2)
        INJECTED["flip-live"] += 1
    _, log = reads()
    assert "corrupt block" in log
    for key, data in OBJECTS.items():
        assert (first.path / key).read_bytes() == data
    assert first.proc.poll() is None


def test_a_complete_file_of_another_object_is_never_handed_out(tmp_path: Path) -> None:
    """What FUSE passthrough opens (``complete_file``) is read by the kernel unchecked: an index row
    that names another object's complete file must not be handed out for this one."""
    cache = NodeCache(str(tmp_path / "cache"), 1 * GiB)
    try:
        keys = {}
        for name in ("large/x.bin", "large/y.bin"):
            data = OBJECTS[name]
            keys[name] = [BlockKey("s3|http://127.0.0.1:1|b", name, "v1", i, BS, len(data), "t")
                          for i in range((len(data) + BS - 1) // BS)]
            for k in keys[name]:
                assert cache.put(k, data[k.index * BS:(k.index + 1) * BS])
        oids = [ks[0].object_id() for ks in keys.values()]
        paths = [cache.complete_file(oid) for oid in oids]
        assert all(p is not None and Path(p).read_bytes() == d
                   for p, d in zip(paths, [OBJECTS["large/x.bin"], OBJECTS["large/y.bin"]], strict=True))
    finally:
        cache.close()
    assert _swap_rows(tmp_path / "cache" / "cache.db", "objects/%") == 2
    INJECTED["index-swapped-complete-files"] += 1
    cache = NodeCache(str(tmp_path / "cache"), 1 * GiB)
    try:
        assert [cache.complete_file(oid) for oid in oids] == [None, None]
        for name, ks in keys.items():  # and blocks read through the server are refetched, not mixed up
            assert all(cache.get(k) is None for k in ks), name
    finally:
        cache.close()


def test_bit_rot_in_complete_files_is_never_passed_through(
    stored: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    """Complete files are what FUSE passthrough hands to the kernel, which reads them unchecked: a
    server checks a complete file whole before its first passthrough open, so one damaged after it
    was published is evicted and fetched again (with or without passthrough on this machine)."""
    reads = Reads(stored, mount_fs)
    reads()
    cache = Path(stored.cache_dir or "")
    for _ in range(4):  # opens of a fully cached object publish its file complete; a read
        m, _ = reads(unmount=False)  # skips blocks when the cache writer is behind: read again
        deadline = time.monotonic() + 10
        while len(list(cache.rglob("*.obj"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        m.unmount()
        if len(list(cache.rglob("*.obj"))) == 2:
            break
    complete = sorted(cache.rglob("*.obj"))
    assert len(complete) == 2, complete
    for path in complete:
        flip(path, path.stat().st_size // 2)
        INJECTED["flip-complete"] += 1
    _, log = reads()
    assert "failed its check" in log, log
    _, log = reads()
    assert "failed its check" not in log
