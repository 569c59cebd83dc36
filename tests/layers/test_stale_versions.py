"""Changes made from a version the store no longer holds are refused, not applied to the newer
object: chmod, chown and utimens replace an object's metadata by a copy onto itself, and a
partial overwrite copies the unchanged parts, each on condition that the source is still the
version the mount saw (S3 ``x-amz-copy-source-if-match``, GCS ``ifGenerationMatch``).

moto's server and fake-gcs-server ignore those conditions (moto honours only
``x-amz-copy-source-if-none-match`` on CopyObject, and nothing on UploadPartCopy), so the
refusal is tested here, on the in-memory store, which answers a failed condition as S3 does
(412 PreconditionFailed, ``ObjectChangedError``). Another client replaces the object between
the mount's lookup and its change; the mount answers ESTALE and the newer object stays as it is.
"""

from __future__ import annotations

import errno
import os
import random
import stat

import pyfuse3
import pytest

from fusefs.config import MiB
from tests.layers.conftest import Fs, setattr_fields


@pytest.fixture
def fs(meta_fs: Fs) -> Fs:
    """The conftest's filesystem on a volume that keeps per-file metadata (``meta_fs``)."""
    return meta_fs


def newer(fs: Fs, key: str, data: bytes) -> dict[str, str]:
    """Another client replaces ``key`` (other bytes, other metadata); what it stored."""
    meta = {"mode": str(stat.S_IFREG | 0o600), "mtime": "1234567890"}
    fs.memory.put(key, data, meta)
    return meta


def assert_untouched(fs: Fs, key: str, data: bytes, meta: dict[str, str]) -> None:
    now = fs.memory.head(key)
    assert fs.memory.get_range(key, 0, now.size) == data
    assert dict(now.meta or ()) == meta


@pytest.mark.parametrize("change", ["chmod", "chown", "utimens"])
async def test_a_metadata_change_of_a_replaced_object_is_estale(fs: Fs, change: str) -> None:
    fs.memory.put("f", b"first version", {"mode": str(stat.S_IFREG | 0o644)})
    ino = await fs.inode("f")  # the mount knows the first version (for its metadata TTL)
    meta = newer(fs, "f", b"second, by another client")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode, attr.st_uid, attr.st_gid, attr.st_mtime_ns = stat.S_IFREG | 0o640, 7, 8, 10**18
    fields = {"chmod": setattr_fields(update_mode=True), "chown": setattr_fields(update_uid=True, update_gid=True),
              "utimens": setattr_fields(update_mtime=True)}[change]
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.setattr(ino, attr, fields, None, fs.ctx)
    assert caught.value.errno == errno.ESTALE
    assert fs.store.calls["set_meta"] == 1  # it was asked, and refused by the store
    assert_untouched(fs, "f", b"second, by another client", meta)


async def test_a_partial_overwrite_of_a_replaced_object_is_estale(fs: Fs) -> None:
    """The written part is whole (nothing of the old version is fetched for it): only the part
    copies of the untouched 10 MiB depend on the old version, and they are refused."""
    old = random.Random(1).randbytes(15 * MiB)
    fs.memory.put("big.bin", old)
    info = await fs.ops.open(await fs.inode("big.bin"), os.O_RDWR, fs.ctx)
    patch = random.Random(2).randbytes(5 * MiB)
    for off in range(0, len(patch), MiB):
        await fs.ops.write(info.fh, off, patch[off:off + MiB])
    new = random.Random(3).randbytes(15 * MiB)  # the same size: only the version tells them apart
    meta = newer(fs, "big.bin", new)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.flush(info.fh)
    assert caught.value.errno == errno.ESTALE
    await fs.ops.release(info.fh)
    assert fs.store.calls["upload_part_copy"] >= 1 and fs.store.calls["get_range"] == 0
    assert fs.store.calls["complete"] == 0
    assert_untouched(fs, "big.bin", new, meta)
    assert fs.memory.uploads() == ()  # the refused upload was aborted
