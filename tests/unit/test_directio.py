"""fusefs.directio: O_DIRECT writes through a bounce buffer give exactly the bytes an ordinary
write would, at any offset and length, on ext4 (direct) and on tmpfs (whatever it supports)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusefs import buffers, directio
from testing.servers import random_bytes

KiB = 1024
MiB = 1024 * KiB
SIZES = [0, 1, 4095, 4096, directio.MIN_DIRECT - 1, directio.MIN_DIRECT + 7, 8 * MiB,
         8 * MiB + 123, directio.BOUNCE * 2 + 4096 * 3 + 5]


@pytest.fixture(params=["disk", "tmpfs"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "disk":
        # /var/tmp is on the node's disk here (tmp_path may be too, but make sure of ext4-like)
        d = Path("/var/tmp") / f"objfs-directio-{os.getpid()}"
        d.mkdir(exist_ok=True)
        yield d
        subprocess.run(["rm", "-rf", str(d)], check=False)
        return
    target = tmp_path / "tmpfs"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "objfs-test", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.parametrize("size", SIZES)
def test_new_file_holds_exactly_the_data(where: Path, size: int) -> None:
    data = random_bytes(size, seed=size)
    path = where / f"block-{size}"
    directio.write_new_file(str(path), data)
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_new_file_refuses_to_overwrite(where: Path) -> None:
    path = where / "exists"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        directio.write_new_file(str(path), random_bytes(MiB, seed=1))
    assert path.read_bytes() == b"keep"


def test_bytearray_and_memoryview_sources(where: Path) -> None:
    data = bytearray(random_bytes(3 * MiB + 17, seed=3))
    directio.write_new_file(str(where / "ba"), data)
    directio.write_new_file(str(where / "mv"), memoryview(data)[5:])
    assert (where / "ba").read_bytes() == data
    assert (where / "mv").read_bytes() == data[5:]


@pytest.mark.parametrize("size", [directio.MIN_DIRECT, 8 * MiB, 8 * MiB + 123])
def test_a_page_aligned_buffer_is_written_where_it_is(where: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetched block (``buffers.page_aligned``) goes to O_DIRECT without a copy into the bounce
    buffer; its unaligned tail, if any, the ordinary way. The file holds exactly its bytes."""
    data = buffers.page_aligned(size)
    data[:] = random_bytes(size, seed=size)

    def no_bounce() -> None:
        raise AssertionError("copied into the bounce buffer")

    monkeypatch.setattr(directio, "_bounce", no_bounce)
    path = where / "aligned"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    direct = directio.open_direct(fd)
    seen: list[bytes] = []
    try:
        directio.pwrite_all(fd, data, 4096, direct, lambda piece: seen.append(bytes(piece)))
    finally:
        if direct is not None:
            os.close(direct)
        os.close(fd)
    assert path.read_bytes() == bytes(4096) + data
    assert b"".join(seen) == data


writes = st.lists(
    st.tuples(st.integers(0, 6 * MiB), st.integers(0, 2 * MiB + 100), st.integers(0, 2**16)),
    min_size=1, max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=writes)
def test_random_pwrites_match_a_model(where: Path, ops: list[tuple[int, int, int]]) -> None:
    """Writes at any offset and length, through the direct fd where they are aligned and large
    enough and the ordinary fd elsewhere, leave the same bytes as writes into memory would; and
    the pieces a write reports as the kernel took them are exactly its bytes, in order (the node
    cache's block tags are computed from them)."""
    path = where / "staging"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    direct = directio.open_direct(fd)
    model = bytearray()
    seen: list[bytes] = []
    try:
        for offset, length, seed in ops:
            data = random_bytes(length, seed=seed)
            seen.clear()
            directio.pwrite_all(fd, data, offset, direct, lambda piece: seen.append(bytes(piece)))
            assert b"".join(seen) == data
            if length and len(model) < offset + length:  # an empty write does not extend a file
                model.extend(bytes(offset + length - len(model)))
            model[offset:offset + length] = data
            # read through the ordinary fd after every write: direct and cached views agree
            assert os.pread(fd, len(model) + 1, 0) == model
    finally:
        if direct is not None:
            os.close(direct)
        os.close(fd)


def test_open_direct_of_an_unlinked_file(where: Path) -> None:
    path = where / "gone"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink(path)
    direct = directio.open_direct(fd)
    try:
        data = random_bytes(MiB, seed=9)
        directio.pwrite_all(fd, data, 4096, direct)
        assert os.pread(fd, MiB + 4096, 0) == bytes(4096) + data
    finally:
        if direct is not None:
            os.close(direct)
        os.close(fd)
