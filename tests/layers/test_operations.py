"""The FUSE operations in-process, on the in-memory store (the ``fs`` fixture of conftest): what
each request answers and what it leaves in the bucket, with no kernel, mount or server."""

from __future__ import annotations

import errno
import os
import random
import stat

import pyfuse3
import pytest

from fusefs import errors
from fusefs.config import MiB
from tests.layers.conftest import ROOT, DirReply, Fs, setattr_fields


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_lookup_and_getattr(fs: Fs) -> None:
    fs.memory.put("top.txt", b"hello")
    fs.memory.put("d/sub/deep.bin", b"x" * 3000)
    attrs = await fs.lookup("top.txt")
    assert stat.S_ISREG(attrs.st_mode) and attrs.st_size == 5
    assert (await fs.ops.getattr(attrs.st_ino, fs.ctx)).st_size == 5
    assert stat.S_ISDIR((await fs.lookup("d")).st_mode)  # a directory only implied by its keys
    assert stat.S_ISDIR((await fs.lookup("d/sub")).st_mode)
    assert (await fs.lookup("d/sub/deep.bin")).st_size == 3000
    negative = await fs.ops.lookup(ROOT, b"missing", fs.ctx)
    assert negative.st_ino == 0  # a negative entry for the kernel to cache
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.ops.lookup(attrs.st_ino, b"below-a-file", fs.ctx)
    assert exc.value.errno == errno.ENOTDIR


async def test_readdir_in_pages(fs: Fs) -> None:
    names = [f"f{i:03d}" for i in range(25)]
    for name in names:
        fs.memory.put(f"dir/{name}", name.encode())
    fs.memory.put("dir/inner/x", b"")
    fs.memory.put("dir/", b"")  # the marker is the directory itself, never an entry of it
    expected = sorted([*names, "inner"])
    assert sorted(await fs.readdir("dir")) == expected
    # a reply buffer that takes 4 entries at a time: every entry once, resumed at its next id
    assert sorted(await fs.readdir("dir", capacity=4)) == expected
    # readdirplus: each entry carries its attributes
    fh = await fs.ops.opendir(await fs.inode("dir"), fs.ctx)
    reply = DirReply()
    await fs.ops.readdir(fh, 0, reply)  # type: ignore[arg-type]
    await fs.ops.releasedir(fh)
    by_name = {name: attrs for name, attrs, _ in reply.entries}
    assert by_name["f007"].st_size == 4 and stat.S_ISREG(by_name["f007"].st_mode)
    assert stat.S_ISDIR(by_name["inner"].st_mode)
    assert sorted(await fs.readdir("")) == ["dir"]


async def test_create_write_flush_release_and_read_back(fs: Fs) -> None:
    small = b"hello, layers\n"
    await fs.write_file("small.txt", small)
    assert fs.memory.get_range("small.txt", 0, 100) == small
    assert fs.store.calls["put"] == 1 and fs.store.calls["create_multipart"] == 0
    assert await fs.read_file("small.txt") == small

    big = rand(12 * MiB + 7, 1)  # above the 5 MiB part size: a streamed multipart upload
    await fs.write_file("big.bin", big, chunk=1 * MiB)
    assert fs.store.calls["create_multipart"] == 1 and fs.store.calls["complete"] == 1
    assert fs.memory.head("big.bin").version.endswith("-3")  # three parts
    assert fs.memory.uploads() == ()
    assert await fs.read_file("big.bin", chunk=300_000) == big
    assert (await fs.lookup("big.bin")).st_size == len(big)


async def test_a_new_file_is_stored_at_close_not_before(fs: Fs) -> None:
    assert await fs.readdir("") == []
    info, attrs = await fs.ops.create(ROOT, b"pending", 0o644, os.O_WRONLY | os.O_CREAT, fs.ctx)
    await fs.ops.write(info.fh, 0, b"abc")
    assert "pending" in await fs.readdir("")  # visible in the mount at once (in the cached listing)
    assert (await fs.lookup("pending")).st_ino == attrs.st_ino
    with pytest.raises(errors.NotFoundError):
        fs.memory.head("pending")
    # read through another handle while the first still writes: what this mount wrote
    other = await fs.ops.open(attrs.st_ino, os.O_RDONLY, fs.ctx)
    assert bytes(await fs.ops.read(other.fh, 0, 10)) == b"abc"
    await fs.ops.release(other.fh)
    await fs.ops.flush(info.fh)
    await fs.ops.release(info.fh)
    assert fs.memory.get_range("pending", 0, 10) == b"abc"


async def test_a_new_file_shows_in_a_listing_fetched_after_its_create(fs: Fs) -> None:
    # No listing of the directory is cached at create: the one fetched after it (from a store that
    # does not hold the file yet) must show it all the same, until its close stores it.
    info, _ = await fs.ops.create(ROOT, b"pending", 0o644, os.O_WRONLY | os.O_CREAT, fs.ctx)
    try:
        assert "pending" in await fs.readdir("")
        assert fs.memory.list("", None).objects == []  # not stored yet: the entry is this mount's
    finally:
        await fs.ops.release(info.fh)
    assert [o.key for o in fs.memory.list("", None).objects] == ["pending"]
    assert "pending" in await fs.readdir("")


async def test_a_new_file_whose_upload_failed_leaves_no_entry(fs: Fs) -> None:
    # The create's entry stands for bytes on their way to the store: when its close could not
    # store them, later listings must not show a file that does not exist.
    info, _ = await fs.ops.create(ROOT, b"lost", 0o644, os.O_WRONLY | os.O_CREAT, fs.ctx)
    await fs.ops.write(info.fh, 0, b"data")
    fs.store.fail("put", times=0, error=errors.AccessDeniedError)
    fs.store.fail("put_file", times=0, error=errors.AccessDeniedError)
    await fs.ops.release(info.fh)  # logs that the data was not stored
    fs.store.clear()
    assert fs.memory.list("", None).objects == []
    fs.ops.meta.invalidate_listing("")
    assert "lost" not in await fs.readdir("")


async def test_mkdir_and_rmdir(fs: Fs) -> None:
    attrs = await fs.ops.mkdir(ROOT, b"made", 0o755, fs.ctx)
    assert stat.S_ISDIR(attrs.st_mode)
    assert fs.memory.head("made/").size == 0  # the directory is its `made/` marker
    assert await fs.readdir("made") == []
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.ops.mkdir(ROOT, b"made", 0o755, fs.ctx)
    assert exc.value.errno == errno.EEXIST
    await fs.write_file("made/file", b"1")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.ops.rmdir(ROOT, b"made", fs.ctx)
    assert exc.value.errno == errno.ENOTEMPTY
    await fs.ops.unlink(attrs.st_ino, b"file", fs.ctx)
    await fs.ops.rmdir(ROOT, b"made", fs.ctx)
    assert fs.memory.list("", None).objects == []
    assert await fs.readdir("") == []


async def test_rename_and_unlink(fs: Fs) -> None:
    fs.memory.put("a.txt", b"content of a")
    fs.memory.put("dir/x", b"x")
    await fs.lookup("a.txt")
    await fs.ops.rename(ROOT, b"a.txt", await fs.inode("dir"), b"b.txt", 0, fs.ctx)
    assert fs.memory.get_range("dir/b.txt", 0, 100) == b"content of a"
    with pytest.raises(errors.NotFoundError):
        fs.memory.head("a.txt")
    assert sorted(await fs.readdir("dir")) == ["b.txt", "x"]
    assert await fs.read_file("dir/b.txt") == b"content of a"
    with pytest.raises(pyfuse3.FUSEError) as exc:  # onto an existing name, refused on request
        await fs.ops.rename(await fs.inode("dir"), b"b.txt", await fs.inode("dir"), b"x",
                            pyfuse3.RENAME_NOREPLACE, fs.ctx)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(pyfuse3.FUSEError) as exc:  # a directory has no single object to move
        await fs.ops.rename(ROOT, b"dir", ROOT, b"dir2", 0, fs.ctx)
    assert exc.value.errno == errno.EXDEV
    await fs.ops.unlink(await fs.inode("dir"), b"x", fs.ctx)
    assert [o.key for o in fs.memory.list("", None).objects] == ["dir/b.txt"]
    assert (await fs.ops.lookup(await fs.inode("dir"), b"x", fs.ctx)).st_ino == 0
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.ops.unlink(ROOT, b"never", fs.ctx)
    assert exc.value.errno == errno.ENOENT


async def test_setattr_truncates(fs: Fs) -> None:
    fs.memory.put("t.bin", b"0123456789")
    inode = await fs.inode("t.bin")
    size = pyfuse3.EntryAttributes()
    size.st_size = 4
    attrs = await fs.ops.setattr(inode, size, setattr_fields(update_size=True), None, fs.ctx)
    assert attrs.st_size == 4
    assert fs.memory.get_range("t.bin", 0, 100) == b"0123"
    size.st_size = 6  # longer: zeros, as a file grows by truncate
    await fs.ops.setattr(inode, size, setattr_fields(update_size=True), None, fs.ctx)
    assert await fs.read_file("t.bin") == b"0123\0\0"
    with pytest.raises(pyfuse3.FUSEError) as exc:  # objects have no owner or mode of their own
        await fs.ops.setattr(inode, size, setattr_fields(update_mode=True), None, fs.ctx)
    assert exc.value.errno == errno.EPERM


@pytest.mark.parametrize("fs", [0.0], indirect=True)  # the second open asks the store again
async def test_an_open_file_never_reads_another_version(fs: Fs) -> None:
    old = rand(3 * MiB, 2)
    fs.memory.put("model.bin", old)
    inode = await fs.inode("model.bin")
    pinned = await fs.ops.open(inode, os.O_RDONLY, fs.ctx)
    assert bytes(await fs.ops.read(pinned.fh, 0, 1000)) == old[:1000]
    new = rand(3 * MiB, 3)  # same size: only the version tells them apart
    fs.memory.put("model.bin", new)
    with pytest.raises(pyfuse3.FUSEError) as exc:  # a block not read yet: ESTALE, never new bytes
        await fs.ops.read(pinned.fh, 2 * MiB, 1000)
    assert exc.value.errno == errno.ESTALE
    await fs.ops.release(pinned.fh)
    assert await fs.read_file("model.bin") == new  # a new open pins the new version


async def test_a_failing_store_makes_a_read_fail_with_eio(fs: Fs) -> None:
    data = rand(2 * MiB + 10, 4)
    fs.memory.put("flaky.bin", data)
    fh = (await fs.ops.open(await fs.inode("flaky.bin"), os.O_RDONLY, fs.ctx)).fh
    fs.store.fail("get_range", times=0)  # every GET from now on: transient, retried, then given up
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.ops.read(fh, MiB, 4096)
    assert exc.value.errno == errno.EIO
    assert fs.store.failed["get_range"] >= 3  # retried before giving up
    fs.store.clear()
    assert bytes(await fs.ops.read(fh, MiB, 4096)) == data[MiB:MiB + 4096]  # the store is back
    # one lost GET is retried: the read answers, with the right bytes
    fs.store.fail("get_range", nth=fs.store.calls["get_range"] + 1)
    assert bytes(await fs.ops.read(fh, 2 * MiB, 100)) == data[2 * MiB:]
    await fs.ops.release(fh)


async def test_a_refused_read_is_not_retried(fs: Fs) -> None:
    fs.memory.put("secret", b"s" * 100)
    fh = (await fs.ops.open(await fs.inode("secret"), os.O_RDONLY, fs.ctx)).fh
    fs.store.fail("get_range", times=0, error=errors.AccessDeniedError)
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.ops.read(fh, 0, 100)
    assert exc.value.errno == errno.EACCES
    await fs.ops.release(fh)


async def test_a_failed_upload_leaves_the_old_object(fs: Fs) -> None:
    fs.memory.put("keep.txt", b"old")
    fs.store.fail("put", times=0)
    info = await fs.ops.open(await fs.inode("keep.txt"), os.O_WRONLY | os.O_TRUNC, fs.ctx)
    await fs.ops.write(info.fh, 0, b"new bytes")
    with pytest.raises(pyfuse3.FUSEError) as exc:
        await fs.ops.flush(info.fh)
    assert exc.value.errno == errno.EIO
    assert fs.memory.get_range("keep.txt", 0, 10) == b"old"
    fs.store.clear()
    await fs.ops.flush(info.fh)  # the data is still held: a later flush stores it
    await fs.ops.release(info.fh)
    assert fs.memory.get_range("keep.txt", 0, 20) == b"new bytes"
