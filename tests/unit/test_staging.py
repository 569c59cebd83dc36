"""``fusefs.service.staging``: the parts of a multipart upload become node-cache blocks only when
they are the object the store completed (the version a HEAD named after the completion must be
the completion's own ETag, or the MD5 of these bytes)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from fusefs.service.staging import StagedParts


def multipart_etag(parts: list[bytes]) -> str:
    return f"{hashlib.md5(b''.join(hashlib.md5(p).digest() for p in parts)).hexdigest()}-{len(parts)}"


def blocks_of(staged: StagedParts, version: str, size: int, block: int, answered: str | None = None
              ) -> dict[int, bytes] | None:
    """The blocks ``write_blocks`` stores; ``answered`` defaults to ``version`` (a HEAD that saw
    the completed upload's object)."""
    got: dict[int, bytes] = {}

    def put(index: int, data: bytes) -> bool:
        got[index] = data
        return True

    return got if staged.write_blocks(version, version if answered is None else answered, size, block, put) \
        else None


def test_parts_out_of_order_and_sent_again_make_the_blocks_in_number_order(tmp_path: Path) -> None:
    rng = random.Random(1)
    parts = [rng.randbytes(10_000), rng.randbytes(10_000), rng.randbytes(3_333)]
    staged = StagedParts(str(tmp_path), budget=1 << 20)
    staged.add(3, parts[2])
    staged.add(1, b"a first try, replaced")
    staged.add(2, parts[1])
    staged.add(1, parts[0])
    whole = b"".join(parts)
    got = blocks_of(staged, multipart_etag(parts), len(whole), 4096)
    assert got is not None
    assert b"".join(got[i] for i in sorted(got)) == whole
    assert sorted(got) == list(range(-(-len(whole) // 4096)))
    # rclone's HEAD names a multipart object by the MD5 of its bytes, not the completion's ETag
    assert blocks_of(staged, hashlib.md5(whole).hexdigest(), len(whole), 4096, multipart_etag(parts)) == got
    # a version the completion named itself (a GCS compose's generation)
    assert staged.write_blocks("1700000000123456", None, len(whole), 4096, lambda i, b: True)
    staged.close()


def test_another_objects_version_or_size_is_not_cached(tmp_path: Path) -> None:
    parts = [b"x" * 5000, b"y" * 100]
    staged = StagedParts(str(tmp_path), budget=1 << 20)
    for n, p in enumerate(parts, 1):
        staged.add(n, p)
    ours = multipart_etag(parts)
    other = multipart_etag([b"x" * 5000, b"z" * 100])  # another writer's object, the same size
    assert blocks_of(staged, other, 5100, 4096, answered=ours) is None
    assert blocks_of(staged, hashlib.md5(b"not these bytes").hexdigest(), 5100, 4096, answered=ours) is None
    assert blocks_of(staged, "an ETag of another form", 5100, 4096, answered=ours) is None
    assert blocks_of(staged, ours, 5100, 4096, answered="") is None  # the completion's answer was lost
    assert blocks_of(staged, multipart_etag(parts), 5101, 4096) is None
    assert blocks_of(staged, multipart_etag(parts), 5100, 4096) is not None
    staged.close()


def test_a_copied_part_or_too_many_bytes_give_up(tmp_path: Path) -> None:
    staged = StagedParts(str(tmp_path), budget=1 << 20)
    staged.add(1, b"a" * 100)
    staged.give_up()  # a part copied in the store: bytes this side never saw
    staged.add(2, b"b" * 100)
    assert blocks_of(staged, multipart_etag([b"a" * 100, b"b" * 100]), 200, 64) is None
    small = StagedParts(str(tmp_path), budget=150)
    small.add(1, b"a" * 100)
    small.add(2, b"b" * 100)
    assert small.given_up and not small.parts
    assert blocks_of(small, multipart_etag([b"a" * 100, b"b" * 100]), 200, 64) is None


def test_a_refused_block_stops_the_rest(tmp_path: Path) -> None:
    staged = StagedParts(str(tmp_path), budget=1 << 20)
    staged.add(1, b"q" * 1000)
    offered: list[int] = []

    def put(index: int, data: bytes) -> bool:
        offered.append(index)
        return index < 1

    assert not staged.write_blocks("e", "e", 1000, 256, put)
    assert offered == [0, 1]
    staged.close()
