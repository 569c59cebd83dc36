"""What everyday tools do to a volume (``cp -a``, ``rsync -a``, ``tar``, ``touch``, ``ln``,
``mknod``, ``mkdir`` then write), through real FUSE mounts on real stores: ``rclone serve s3``,
moto's S3 server (which keeps ``dir/`` markers beside the keys under them, as S3 does) and
fake-gcs-server."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fusefs.config import MountConfig
from testing.fsmount import Mounted
from testing.proxy import CountingProxy
from testing.servers import FakeGCS, MotoS3, RcloneS3

pytestmark = pytest.mark.fuse

PAST_NS = 1_000_000_000_123_456_789  # 2001-09-09, with nanoseconds


@dataclasses.dataclass
class Store:
    """One store under test: a fresh bucket's mount config and a look behind objfs's back."""

    name: str
    config: MountConfig
    server: Any

    @property
    def keeps_markers(self) -> bool:
        # rclone serve s3 stores the `d/` marker of mkdir as a file `d`: writes under d/ then fail
        return self.name != "rclone"

    def read(self, key: str) -> bytes:
        if self.name == "gcs":
            return bytes(self.server.client().bucket(self.config.bucket).blob(key).download_as_bytes())
        return bytes(self.server.read_object(self.config.bucket, key))

    def user_meta(self, key: str) -> dict[str, str]:
        if self.name == "gcs":
            blob = self.server.client().bucket(self.config.bucket).get_blob(key)
            return dict(blob.metadata or {})
        meta = self.server.client().head_object(Bucket=self.config.bucket, Key=key)["Metadata"]
        return {k.lower(): v for k, v in meta.items()}


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[FakeGCS]:
    with tempfile.TemporaryDirectory(prefix="objfs-gcs-sem-") as d, FakeGCS(Path(d)) as server:
        yield server


@pytest.fixture(params=["rclone", "moto", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Each store in turn, a fresh bucket, a volume that keeps per-file metadata."""
    server: Any
    if request.param == "gcs":
        server = request.getfixturevalue("gcs_server")
        backend = "gcs"
    else:
        server = request.getfixturevalue("s3_server" if request.param == "rclone" else "moto_server")
        backend = "s3"
    config = MountConfig(backend=backend, bucket=server.create_bucket(), endpoint_url=server.endpoint,
                         credentials=server.credentials, cache_dir=str(tmp_path / "cache"), file_metadata=True)
    return Store(request.param, config, server)


def make_tree(root: Path, nested: bool) -> None:
    """Files of several modes and past times (nanoseconds), a symlink, nested folders."""
    root.mkdir(parents=True, exist_ok=True)
    files = {"a.txt": (b"alpha\n", 0o644), "run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
             "secret": (b"s" * 5000, 0o600), "empty": (b"", 0o640)}
    if nested:
        files.update({"d/b.bin": (os.urandom(70_000), 0o644), "d/e/deep.txt": (b"deep\n", 0o444)})
    for i, (rel, (data, mode)) in enumerate(sorted(files.items())):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
        os.utime(p, ns=(PAST_NS + i * 7_000_000_001, PAST_NS + i * 7_000_000_001))
    os.symlink("a.txt", root / "link")
    os.utime(root / "link", ns=(PAST_NS, PAST_NS), follow_symlinks=False)


def differences(src: Path, dst: Path, volume_root: bool = False) -> list[str]:
    """What ``rsync -a`` would still change to make ``dst`` like ``src`` (empty: the same modes,
    owners, times, sizes, symlinks, of directories too). ``volume_root``: ``dst`` shows the root
    of a volume, which has no ``dir/`` marker to keep its own attributes in (a bucket's root has
    no key): its line (``./``, and only it) is left out."""
    out = subprocess.run(["rsync", "-a", "--dry-run", "--itemize-changes", f"{src}/", f"{dst}/"],
                         check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip() and not (volume_root and line.endswith(" ./"))]


def test_chmod_chown_that_change_nothing_succeed(s3_config: MountConfig, mount_fs: Callable[..., Mounted]) -> None:
    m = mount_fs(s3_config)
    f = m.path / "f"
    f.write_bytes(b"x")
    st = os.stat(f)
    os.chmod(f, stat.S_IMODE(st.st_mode))
    os.chown(f, st.st_uid, st.st_gid)
    os.chmod(m.path, stat.S_IMODE(os.stat(m.path).st_mode))
    with pytest.raises(PermissionError):
        os.chmod(f, stat.S_IMODE(st.st_mode) ^ 0o100)
    with pytest.raises(PermissionError):
        os.chown(f, st.st_uid + 1, -1)
    assert os.stat(f).st_mode == st.st_mode
    assert "refused (EPERM)" in m.log_text()


def test_links_and_special_files_are_eperm_and_mknod_of_a_file_works(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    (m.path / "a").write_bytes(b"a")
    for make in (lambda: os.link(m.path / "a", m.path / "hard"),
                 lambda: os.mkfifo(m.path / "fifo"),
                 lambda: os.mknod(m.path / "dev", 0o644 | stat.S_IFCHR, os.makedev(1, 3))):
        with pytest.raises(OSError) as caught:
            make()
        assert caught.value.errno == errno.EPERM
    os.mknod(m.path / "plain", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(m.path / "plain").st_mode)
    assert s3_server.read_object(s3_config.bucket, "plain") == b""
    with pytest.raises(FileExistsError):
        os.mknod(m.path / "plain", 0o644 | stat.S_IFREG)
    assert sorted(os.listdir(m.path)) == ["a", "plain"]


def test_directory_times_are_not_1970(s3_config: MountConfig, mount_fs: Callable[..., Mounted]) -> None:
    before = time.time() - 5
    m = mount_fs(s3_config)
    assert os.stat(m.path).st_mtime > before
    os.mkdir(m.path / "d")
    assert os.stat(m.path / "d").st_mtime > before
    (m.path / "e.txt").write_bytes(b"e")
    os.listdir(m.path)
    assert os.stat(m.path).st_mtime > before  # its newest entry's
    out = subprocess.run(["ls", "-ld", "--time-style=+%Y", str(m.path), str(m.path / "d")], check=True,
                         capture_output=True, text=True).stdout
    assert "1970" not in out


# -- per-file metadata: the tools ------------------------------------------------------------------
def test_cp_a_and_rsync_a_round_trip(store: Store, tmp_path: Path, mount_fs: Callable[..., Mounted]) -> None:
    src = tmp_path / "src"
    make_tree(src, nested=store.keeps_markers)
    m = mount_fs(store.config)
    if store.keeps_markers:
        subprocess.run(["cp", "-a", str(src), str(m.path / "cp")], check=True, capture_output=True)
        subprocess.run(["rsync", "-a", f"{src}/", f"{m.path / 'rs'}/"], check=True, capture_output=True)
        targets = [m.path / "cp", m.path / "rs"]
    else:
        # rclone serve s3 over a folder cannot keep a `d/` marker beside the keys under d/ (it
        # stores the marker as a file `d`): no directories on it, the tree goes into the root,
        # whose own attributes are the volume's on every store (see ``differences``)
        subprocess.run(["cp", "-a", f"{src}/.", str(m.path)], check=True, capture_output=True)
        targets = [m.path]
    root = not store.keeps_markers
    for target in targets:
        assert differences(src, target, root) == []
    assert store.read("link" if not store.keeps_markers else "cp/link") == b"a.txt"  # text to other clients
    # the metadata is in the store, not in this mount's memory: a new mount sees it, and copies it out
    m.unmount()
    again = mount_fs(store.config, "again")
    for target in targets:
        moved = again.path / target.relative_to(m.path)
        assert differences(src, moved, root) == []
        out = tmp_path / f"out-{target.name}"
        subprocess.run(["cp", "-a", f"{moved}/.", str(out)], check=True, capture_output=True)
        assert differences(src, out, root) == []
        assert os.readlink(out / "link") == "a.txt"


def test_tar_x_and_touch_d_keep_times(store: Store, tmp_path: Path, mount_fs: Callable[..., Mounted]) -> None:
    src = tmp_path / "src"
    make_tree(src, nested=False)
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(src, arcname=".")
    m = mount_fs(store.config)
    subprocess.run(["tar", "xf", str(archive), "-C", str(m.path)], check=True, capture_output=True)
    for name in ("a.txt", "run.sh", "secret", "empty"):
        assert os.stat(m.path / name).st_mtime == os.stat(src / name).st_mtime, name
        assert stat.S_IMODE(os.stat(m.path / name).st_mode) == stat.S_IMODE(os.stat(src / name).st_mode), name
    (m.path / "t").write_bytes(b"t")
    subprocess.run(["touch", "-d", "2001-09-09 01:46:40.5 UTC", str(m.path / "t")], check=True)
    assert os.stat(m.path / "t").st_mtime_ns == 1_000_000_000_500_000_000
    assert store.user_meta("t")["mtime"] == "1000000000.500000000"
    assert store.read("t") == b"t"
    m.unmount()
    again = mount_fs(store.config, "again")
    assert os.stat(again.path / "t").st_mtime_ns == 1_000_000_000_500_000_000
    assert os.stat(again.path / "a.txt").st_mtime == os.stat(src / "a.txt").st_mtime


def test_symlinks_survive_a_remount_and_chmod_chown_are_kept(
    store: Store, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(store.config)
    (m.path / "target.txt").write_bytes(b"pointed at")
    os.symlink("target.txt", m.path / "rel")
    os.symlink("/etc/hostname", m.path / "abs")
    assert os.readlink(m.path / "rel") == "target.txt"
    assert (m.path / "rel").read_bytes() == b"pointed at"
    os.chmod(m.path / "target.txt", 0o600)
    os.chown(m.path / "target.txt", 1234, 5678)
    os.truncate(m.path / "target.txt", 7)  # a new version, the same owner and mode
    with pytest.raises(FileExistsError):
        os.symlink("x", m.path / "rel")
    m.unmount()
    again = mount_fs(store.config, "again")
    assert sorted(os.listdir(again.path)) == ["abs", "rel", "target.txt"]
    assert stat.S_ISLNK(os.lstat(again.path / "rel").st_mode)
    assert os.readlink(again.path / "rel") == "target.txt"
    assert os.readlink(again.path / "abs") == "/etc/hostname"
    st = os.stat(again.path / "target.txt")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o600, 1234, 5678, 7)
    assert (again.path / "rel").read_bytes() == b"pointed"
    with pytest.raises(OSError) as caught:
        os.readlink(again.path / "target.txt")
    assert caught.value.errno == errno.EINVAL
    os.unlink(again.path / "rel")
    assert sorted(os.listdir(again.path)) == ["abs", "target.txt"]


def test_directories_keep_their_mode_owner_and_time_in_their_marker(
    store: Store, mount_fs: Callable[..., Mounted]
) -> None:
    """mkdir stores the mode asked (less the umask) in the ``d/`` marker; chmod, chown, utime of
    a directory rewrite it; a directory only implied by its keys gets a marker when they are
    set. A new mount shows them all, from the markers."""
    if not store.keeps_markers:
        pytest.skip("rclone serve s3 stores the d/ marker as a file d: no directories there")
    if store.name == "gcs":
        store.server.client().bucket(store.config.bucket).blob("implied/x").upload_from_string(b"x")
    else:
        store.server.client().put_object(Bucket=store.config.bucket, Key="implied/x", Body=b"x")
    m = mount_fs(store.config)
    old = os.umask(0o022)
    try:
        os.mkdir(m.path / "d", 0o751)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(m.path / "d").st_mode) == 0o751
    assert int(store.user_meta("d/")["mode"]) == stat.S_IFDIR | 0o751
    (m.path / "d" / "f").write_bytes(b"f")
    os.chmod(m.path / "d", 0o700)
    os.chown(m.path / "d", 1234, 5678)
    os.utime(m.path / "d", ns=(PAST_NS, PAST_NS))
    os.chmod(m.path / "implied", 0o705)
    os.utime(m.path / "implied", ns=(PAST_NS + 1, PAST_NS + 1))
    assert store.read("implied/") == b"" and store.read("d/") == b""  # markers stay empty
    assert store.user_meta("d/")["mtime"] == "1000000000.123456789"
    m.unmount()
    again = mount_fs(store.config, "again")
    st = os.stat(again.path / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o700, 1234, 5678, PAST_NS)
    st = os.stat(again.path / "implied")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o705, PAST_NS + 1)
    assert sorted(os.listdir(again.path / "implied")) == ["x"]  # its marker is not an entry
    assert (again.path / "d" / "f").read_bytes() == b"f"


def test_without_file_metadata_directories_show_the_volumes_attributes(
    moto_server: MotoS3, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    """A volume that keeps no per-file metadata writes bare markers and ignores a marker's
    metadata (another client's, s3fs's): directories show its dirMode, uid, gid."""
    bucket = moto_server.create_bucket()
    moto_server.client().put_object(Bucket=bucket, Key="s3fs/", Body=b"",
                                    Metadata={"mode": str(stat.S_IFDIR | 0o700), "uid": "42"})
    config = MountConfig(backend="s3", bucket=bucket, endpoint_url=moto_server.endpoint,
                         credentials=moto_server.credentials, cache_dir=str(tmp_path / "cache"))
    m = mount_fs(config)
    os.mkdir(m.path / "d", 0o700)
    for name in ("d", "s3fs"):
        st = os.stat(m.path / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (config.dir_mode, config.uid, config.gid)
    assert moto_server.client().head_object(Bucket=bucket, Key="d/")["Metadata"] == {}
    with pytest.raises(PermissionError):
        os.chmod(m.path / "d", 0o700 if config.dir_mode != 0o700 else 0o755)


def test_mkdir_then_write_then_list(store: Store, mount_fs: Callable[..., Mounted]) -> None:
    if not store.keeps_markers:
        pytest.skip("rclone serve s3 stores the d/ marker as a file d: writes under d/ fail (HTTP 500)")
    m = mount_fs(store.config)
    os.mkdir(m.path / "d")
    os.mkdir(m.path / "d" / "e")
    (m.path / "d" / "f.txt").write_bytes(b"f")
    (m.path / "d" / "e" / "g.txt").write_bytes(b"g")
    assert sorted(os.listdir(m.path / "d")) == ["e", "f.txt"]
    assert os.listdir(m.path / "d" / "e") == ["g.txt"]
    m.unmount()
    again = mount_fs(store.config, "again")
    assert sorted(os.listdir(again.path / "d")) == ["e", "f.txt"]
    assert (again.path / "d" / "e" / "g.txt").read_bytes() == b"g"
    os.unlink(again.path / "d" / "e" / "g.txt")
    os.rmdir(again.path / "d" / "e")
    assert os.listdir(again.path / "d") == ["f.txt"]


def test_without_file_metadata_symlinks_are_eperm_and_times_are_the_stores(
    s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    m = mount_fs(s3_config)
    with open(m.path / "f", "wb") as f:
        f.write(b"f")
        while_open = os.fstat(f.fileno()).st_mtime_ns
    # whole seconds before and after the upload, as S3 keeps them: no jump back later
    assert while_open % 1_000_000_000 == 0 and os.stat(m.path / "f").st_mtime_ns % 1_000_000_000 == 0
    with pytest.raises(PermissionError):
        os.symlink("f", m.path / "l")
    os.utime(m.path / "f", ns=(PAST_NS, PAST_NS))  # accepted, not kept: the store's time shows
    assert os.stat(m.path / "f").st_mtime > time.time() - 3600
    assert "symlink refused (EPERM)" in m.log_text()


def test_a_walk_that_reads_costs_a_request_per_file_with_or_without_file_metadata(
    moto_server: MotoS3, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    """S3 lists no user metadata: a volume that shows each file's own attributes asks for them
    (one request per file, in parallel, once per listing): for these small files the GET that
    their reads then take, so a walk that reads costs what it costs without metadata. (moto:
    rclone takes an ``mtime`` metadata value for the object's LastModified, which hides the
    difference.)"""
    bucket = moto_server.create_bucket()
    client = moto_server.client()
    files = 120
    for i in range(files):
        client.put_object(Bucket=bucket, Key=f"w/f{i:03d}", Body=b"x" * (100 + i),
                          Metadata={"mtime": str(1_000_000_000 + i), "mode": str(stat.S_IFREG | 0o600)})
    per_file = {}
    with CountingProxy(moto_server.port) as proxy:
        for keep in (False, True):
            proxy.reset()
            config = MountConfig(backend="s3", bucket=bucket, endpoint_url=proxy.endpoint,
                                 credentials=moto_server.credentials, cache_dir=str(tmp_path / f"cache{keep}"),
                                 file_metadata=keep)
            m = mount_fs(config, f"m{keep}")
            for i, name in enumerate(sorted(os.listdir(m.path / "w"))):
                st = os.stat(m.path / "w" / name)
                assert (st.st_mtime == 1_000_000_000 + i) == keep
                assert (stat.S_IMODE(st.st_mode) == 0o600) == keep
                assert (m.path / "w" / name).read_bytes() == b"x" * (100 + i)
            counts = proxy.snapshot()
            per_file[keep] = sum(counts.values()) / files
            print(f"\nfileMetadata={keep}: {dict(counts)} -> {per_file[keep]:.3f} requests per file")
            m.unmount()
            proxy.settle()  # what this mount had in flight as it exited is not counted for the next one
    assert per_file[False] <= 1.05
    assert per_file[True] <= 1.05


@pytest.mark.parametrize("markers", ["none", "some"])
@pytest.mark.parametrize("name", ["moto", "gcs"])
def test_a_walk_learns_directory_attributes_from_the_listings_it_sends_anyway(
    name: str, markers: str, request: pytest.FixtureRequest, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    """A listing shows subdirectories as prefixes only: a volume that keeps per-file metadata
    lists each subdirectory when its parent is listed (its ``dir/`` marker, if any, comes back
    first) and keeps that page for the subdirectory's own listing, which the walk asks next. So
    a walk costs one LIST per directory, as without the metadata, and a GET per file; a marker
    costs one HEAD more on S3 (GCS lists its metadata); a tree written without markers (by
    another tool) none. Each directory shows its marker's attributes, or the volume's."""
    server = request.getfixturevalue({"moto": "moto_server", "gcs": "gcs_server"}[name])
    bucket = server.create_bucket()
    marked = {"a1", "a3", "a0/b1", "a1/b1", "a2/b1", "a3/b1"} if markers == "some" else set()
    dirs = [f"a{i}" for i in range(4)] + [f"a{i}/b{j}" for i in range(4) for j in range(3)]
    files = {f"{d}/f{k}": os.urandom(1000 + k) for d in dirs if "/" in d for k in range(2)}
    own = {d: (0o700 + n, 1_000_000_000 + n) for n, d in enumerate(sorted(marked))}

    def put(key: str, data: bytes, meta: dict[str, str] | None = None) -> None:
        if name == "gcs":
            blob = server.client().bucket(bucket).blob(key)
            blob.metadata = meta
            blob.upload_from_string(data)
        else:
            server.client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=meta or {})

    for d, (mode, mtime) in own.items():
        put(f"{d}/", b"", {"mode": str(stat.S_IFDIR | mode), "mtime": str(mtime)})
    for key, data in files.items():
        put(key, data)
    with CountingProxy(server.port) as proxy:
        config = MountConfig(backend="s3" if name == "moto" else "gcs", bucket=bucket,
                             endpoint_url=proxy.endpoint, credentials=server.credentials,
                             cache_dir=str(tmp_path / "cache"), file_metadata=True)
        m = mount_fs(config)
        proxy.reset()
        seen, read = {}, {}
        for top, subdirs, names in os.walk(m.path):
            for sub in subdirs:
                st = os.stat(Path(top) / sub)
                seen[os.path.relpath(Path(top) / sub, m.path)] = (stat.S_IMODE(st.st_mode), st.st_mtime)
            for n in names:
                read[os.path.relpath(Path(top) / n, m.path)] = (Path(top) / n).read_bytes()
        counts = proxy.snapshot()
    print(f"\nwalk of {len(dirs)} directories ({len(marked)} with markers), {len(files)} files: {dict(counts)}")
    assert read == files
    for d in dirs:
        if d in own:
            assert seen[d] == own[d], d
        else:
            assert seen[d][0] == config.dir_mode, d
    assert counts["LIST"] == len(dirs) + 1, dict(counts)  # the root and each directory, once
    assert counts["HEAD"] == (len(marked) if name == "moto" else 0), dict(counts)
    assert counts["GET"] <= len(files), dict(counts)
    assert sum(counts.values()) == counts["LIST"] + counts["HEAD"] + counts["GET"], dict(counts)


def test_read_after_write_costs_no_get(
    s3_config: MountConfig, counting_proxy: CountingProxy, mount_fs: Callable[..., Mounted]
) -> None:
    """The data service puts the bytes it stored into the node cache under the new version: the
    next read, through this mount or another on the node, is served from there."""
    config = dataclasses.replace(s3_config, endpoint_url=counting_proxy.endpoint)
    m = mount_fs(config)
    data = os.urandom(3 * 1024 * 1024 + 5)
    (m.path / "w.bin").write_bytes(data)
    counting_proxy.reset()
    assert (m.path / "w.bin").read_bytes() == data
    other = mount_fs(config, "other")  # a second mount on the node, the same cache
    assert (other.path / "w.bin").read_bytes() == data
    counts = counting_proxy.snapshot()
    assert counts["GET"] == 0, dict(counts)


# -- partial overwrites send what changed -------------------------------------------------------------
MiB = 1024 * 1024


@pytest.mark.parametrize("name", ["rclone", "moto", "gcs"])
def test_read_after_a_multipart_write_costs_no_get(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    """A file bigger than a part is uploaded in parts (by the data service): it keeps them on
    local disk until the store completes the upload and names its version, then puts its blocks
    into the node cache. Reading it back, here or from another mount on the node, costs no GET."""
    server = request.getfixturevalue({"rclone": "s3_server", "moto": "moto_server", "gcs": "gcs_server"}[name])
    data = os.urandom(21 * MiB + 5)  # three 8 MiB parts (the last short), blocks across their edges
    with CountingProxy(server.port) as proxy:
        config = MountConfig(backend="gcs" if name == "gcs" else "s3", bucket=server.create_bucket(),
                             endpoint_url=proxy.endpoint, credentials=server.credentials,
                             cache_dir=str(tmp_path / "cache"))
        m = mount_fs(config)
        with open(m.path / "w.bin", "wb") as f:
            for off in range(0, len(data), MiB):
                f.write(data[off:off + MiB])
        uploaded = proxy.snapshot()
        assert uploaded["PUT" if name == "gcs" else "PART"] >= 3, dict(uploaded)  # GCS: parts are objects
        proxy.reset()
        assert (m.path / "w.bin").read_bytes() == data
        assert proxy.snapshot()["GET"] == 0, dict(proxy.snapshot())
        other = mount_fs(config, "other")
        assert (other.path / "w.bin").read_bytes() == data
        tally = proxy.tally()
    if config.credentials.access_key_id:
        assert tally.requests["GET"] == 0, dict(tally.requests)
    else:  # fake-gcs-server takes no credentials: the other grant proves it may read, one byte
        assert tally.requests["GET"] == 1 and tally.body_bytes["GET"] == 1, dict(tally.requests)


def mount_looked_up(mount_fs: Callable[..., Mounted], config: MountConfig, name: str,
                    proxy: CountingProxy) -> Mounted:
    """A mount whose file ``name`` is looked up already; the proxy's counts start after that."""
    m = mount_fs(config)
    os.stat(m.path / name)
    proxy.reset()
    return m


def test_overwriting_1_mib_of_a_25_mib_file_copies_the_rest_in_the_store(
    moto_server: MotoS3, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    bucket = moto_server.create_bucket()
    data = bytearray(os.urandom(25 * MiB))
    moto_server.client().put_object(Bucket=bucket, Key="big.bin", Body=bytes(data))
    patch = os.urandom(MiB)
    with CountingProxy(moto_server.port) as proxy:
        m = mount_looked_up(mount_fs, MountConfig(
            backend="s3", bucket=bucket, endpoint_url=proxy.endpoint, credentials=moto_server.credentials,
            cache_dir=str(tmp_path / "cache")), "big.bin", proxy)
        with open(m.path / "big.bin", "r+b") as f:
            f.seek(12 * MiB)
            f.write(patch)
            f.seek(12 * MiB - 10)
            assert f.read(20) == bytes(data[12 * MiB - 10:12 * MiB]) + patch[:10]  # the old bytes and the new
        tally = proxy.tally()
        data[12 * MiB:13 * MiB] = patch
        assert (m.path / "big.bin").read_bytes() == bytes(data)
    assert moto_server.read_object(bucket, "big.bin") == bytes(data)
    print(f"\npartial overwrite: {dict(tally.requests)}, sent {dict(tally.sent_bytes)}, "
          f"received {dict(tally.body_bytes)}")
    # parts [0, 12 MiB) and [17, 25 MiB) copied in the store; [12, 17 MiB) uploaded (S3's 5 MiB
    # least part), its 4 MiB of old bytes fetched first
    assert tally.requests["PART-COPY"] == 2 and tally.requests["PART"] == 1
    assert sum(tally.sent_bytes.values()) <= 5 * MiB + 64 * 1024
    assert tally.body_bytes["GET"] <= 5 * MiB


def test_appending_to_a_gcs_object_composes_the_old_one(
    gcs_server: FakeGCS, tmp_path: Path, mount_fs: Callable[..., Mounted]
) -> None:
    """GCS copies no byte ranges, but an append keeps the whole old object as the first piece
    of a compose: the old bytes are neither downloaded nor sent again."""
    bucket = gcs_server.create_bucket()
    old = os.urandom(6 * MiB)
    gcs_server.client().bucket(bucket).blob("log.bin").upload_from_string(old)
    tail = os.urandom(MiB // 2)
    with CountingProxy(gcs_server.port) as proxy:
        m = mount_looked_up(mount_fs, MountConfig(
            backend="gcs", bucket=bucket, endpoint_url=proxy.endpoint, credentials=gcs_server.credentials,
            cache_dir=str(tmp_path / "cache")), "log.bin", proxy)
        with open(m.path / "log.bin", "ab") as f:
            f.write(tail)
        tally = proxy.tally()
        assert (m.path / "log.bin").read_bytes() == old + tail
    assert gcs_server.client().bucket(bucket).blob("log.bin").download_as_bytes() == old + tail
    print(f"\nappend: {dict(tally.requests)}, sent {dict(tally.sent_bytes)}, received {dict(tally.body_bytes)}")
    assert tally.requests["COMPOSE"] == 1
    assert sum(tally.sent_bytes.values()) <= MiB
    assert tally.body_bytes["GET"] == 0


def test_a_store_without_part_copies_gets_the_whole_file(
    s3_server: RcloneS3, s3_config: MountConfig, mount_fs: Callable[..., Mounted]
) -> None:
    """rclone's S3 server answers UploadPartCopy with nothing: the write falls back to
    uploading the whole file, and the bytes are right."""
    data = bytearray(os.urandom(12 * MiB + 3))
    s3_server.client().put_object(Bucket=s3_config.bucket, Key="f.bin", Body=bytes(data))
    m = mount_fs(s3_config)
    with open(m.path / "f.bin", "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"changed")
        f.flush()
        os.fsync(f.fileno())
        f.seek(11 * MiB)
        f.write(b"again")  # the second flush goes straight to the whole-file upload
    data[6 * MiB:6 * MiB + 7] = b"changed"
    data[11 * MiB:11 * MiB + 5] = b"again"
    assert s3_server.read_object(s3_config.bucket, "f.bin") == bytes(data)
    assert (m.path / "f.bin").read_bytes() == bytes(data)
    assert "does not support UploadPartCopy" in m.log_text()


def test_renaming_a_file_being_written_keeps_its_attributes(store: Store, mount_fs: Callable[..., Mounted]) -> None:
    """Open, write, chmod, rename, close: the rename stores the bytes under the new name (the
    close has nothing left to send), with the mode; the old name is gone."""
    m = mount_fs(store.config)
    with open(m.path / "app.log", "wb", buffering=0) as f:
        f.write(b"one\n")
        os.fchmod(f.fileno(), 0o640)
        f.write(b"two\n")
        os.rename(m.path / "app.log", m.path / "app.log.1")
    assert sorted(os.listdir(m.path)) == ["app.log.1"]
    m.unmount()
    again = mount_fs(store.config, "again")
    assert (again.path / "app.log.1").read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(os.stat(again.path / "app.log.1").st_mode) == 0o640
