"""A pod's FUSE server answers a read-write open with a backing id of a shared cache file.

The kernel reopens a FUSE passthrough backing file with the credentials of whoever registered it
and with the open flags of the user. The servers are the tenants' (they can answer any open with
any id their connection holds), so a backing file registered by root through a writable path is a
way to write into the node cache that every pod on the node reads: the next pod loads poisoned
bytes. The data service therefore opens complete files through a read-only mount of the cache
before the broker registers them (``csi/dataservice.readonly_mirror``, ``fusefs.service.local``).

Here a deliberately malicious FUSE server (pyfuse3, passthrough negotiated) answers every open of
its one file with the backing id it got. Through the read-only mirror and the broker, as the plugin
does it, a read-write open fails and the cache file stays as it was; a read-only open still works
(the id is real). Registered by root through the writable path, as before this change, the same
open succeeds and writes into the cache file: the attack the test guards against.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.node.broker import Broker
from csi.node.dataservice import readonly_mirror
from fusefs import kernel
from fusefs.passthrough import backing
from testing.pods import REPO, wait_for

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not backing.patched_pyfuse3(), reason="pyfuse3 without the passthrough API"),
]
CONTENT = b"model weights " * 4096

EVIL_SERVER = r"""
import errno, os, stat, sys
sys.path.insert(0, sys.argv[1])
import pyfuse3, trio
from fusefs import kernel
from fusefs.passthrough.backing import SelfRegistrar
from fusefs.passthrough.broker import BrokerClient

mountpoint, path, broker = sys.argv[2], sys.argv[3], sys.argv[4]
registrar = BrokerClient(broker) if broker else SelfRegistrar()
size = os.stat(path).st_size

class Evil(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o666)
        attr.st_size = 0 if inode == pyfuse3.ROOT_INODE else size
        attr.st_nlink = 1
        return attr

    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == b"f":
            return await self.getattr(2)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode, flags, ctx):
        fd = os.open(path, os.O_RDONLY)  # what the data service sends the broker
        try:
            backing_id = registrar.open(pyfuse3.fuse_fd(), fd)
        finally:
            os.close(fd)
        info = pyfuse3.FileInfo(fh=1)
        info.backing_id = backing_id  # whatever the flags: the tenant's server may answer anything
        return info

fuse_fd = kernel.mount_fuse(mountpoint, allow_other=True)
pyfuse3.init(Evil(), f"/dev/fd/{fuse_fd}", {"fsname=evil", "passthrough"})
print("ready", flush=True)
trio.run(pyfuse3.main)
"""


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    objects = tmp_path / "cache" / "objects" / "ab"
    objects.mkdir(parents=True)
    complete = objects / "model.obj"
    complete.write_bytes(CONTENT)
    complete.chmod(0o444)  # a complete file, as fusefs.nodecache.objectfiles leaves it
    return complete


@contextlib.contextmanager
def serve(tmp_path: Path, path: Path, broker: str) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "evil.py"
    script.write_text(EVIL_SERVER)
    log = (tmp_path / "evil.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), str(mnt), str(path), broker],
                            stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready", (tmp_path / "evil.log").read_text()
        wait_for(lambda: kernel.find_mount(str(mnt)) is not None, what="the evil mount")
        yield mnt / "f"
    finally:
        if kernel.find_mount(str(mnt)) is not None:
            kernel.unmount(str(mnt), lazy=True)
        proc.kill()
        proc.wait()
        log.close()


def _try_to_write(f: Path) -> OSError | None:
    try:
        fd = os.open(f, os.O_RDWR)
    except OSError as exc:
        return exc
    try:
        os.pwrite(fd, b"POISON", 0)
    finally:
        os.close(fd)
    return None


def test_a_read_write_open_answered_with_a_backing_id_cannot_write_the_cache(cache: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    mirror = readonly_mirror(str(cache_dir), str(tmp_path / "cache-ro"))
    assert mirror is not None
    broker = Broker(str(tmp_path / "broker"), mirror, client_uid=0)
    try:
        through_mirror = Path(mirror) / cache.relative_to(cache_dir)
        with serve(tmp_path, through_mirror, broker.path) as f:
            assert f.read_bytes() == CONTENT  # the id works: read-only opens pass through
            refused = _try_to_write(f)
            assert refused is not None, "a write open through a backing id succeeded"
    finally:
        broker.close()
        kernel.unmount(mirror, lazy=True)
    assert cache.read_bytes() == CONTENT


def test_without_the_read_only_mount_the_same_answer_writes_the_cache(cache: Path, tmp_path: Path) -> None:
    """What the read-only mount prevents: root's registration of the writable path lets the
    tenant's server hand out write access to the shared file (the design before this change)."""
    with serve(tmp_path, cache, "") as f:
        assert _try_to_write(f) is None
    assert cache.read_bytes().startswith(b"POISON")
