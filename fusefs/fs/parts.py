"""Planning multipart uploads within what the backend allows (``StoreLimits``).

An upload is a sequence of parts numbered from 1. A streamed upload does not know its final
size, so its parts grow: ``base`` bytes for the first ``tier`` parts, then doubled for each further
``tier`` parts, capped at the backend's largest part. ``tier`` is chosen per backend so that all
``max_parts`` parts together can hold the backend's largest object: S3 (10,000 parts) doubles
about every 1,000 parts, GCS (1,024 components of a composite object) about every 80, which is
what lets a streamed file grow past ``1,024 x 8 MiB`` there. Small files keep small parts either
way. An upload of a known size (a staged file) starts from the smallest base that fits it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusefs.errors import FileTooLargeError
from fusefs.store.base import StoreLimits

#: the schedule doubles at most about 10 times over the whole part range (S3: every 1,000 parts)
_TIERS = 10


def capacity(limits: StoreLimits, base: int, tier: int) -> int:
    """Bytes that ``max_parts`` parts of the growing schedule hold."""
    total, number, shift = 0, 0, 0
    while number < limits.max_parts:
        size = min(base << shift, limits.max_part_size)
        if size == limits.max_part_size:
            # Every further part is the largest: the rest at once. A loop to the end would be
            # max_parts / tier steps (10,000 on S3 for tier 1), run on the event loop whenever
            # a file is opened for writing or staged at close.
            return total + (limits.max_parts - number) * size
        count = min(tier, limits.max_parts - number)
        total += count * size
        number += count
        shift += 1
    return total


@dataclass(frozen=True)
class PartPlan:
    limits: StoreLimits
    base: int  # size of the first parts
    tier: int  # parts per doubling

    def size(self, number: int) -> int:
        """Size of part ``number`` (from 1); every part but the last of an upload has this size."""
        shift = min((number - 1) // self.tier, 62)
        return min(self.base << shift, self.limits.max_part_size)

    def full(self, parts: int) -> bool:
        """True once ``parts`` parts are all the backend accepts in one upload."""
        return parts >= self.limits.max_parts


def _plan(limits: StoreLimits, base: int) -> PartPlan:
    # The slowest growth (largest tier) whose parts still reach the largest object: capacity
    # only shrinks as the tier grows, so a binary search finds it.
    lo, hi = 1, max(1, limits.max_parts // _TIERS)
    if capacity(limits, base, lo) < limits.max_object_size:
        return PartPlan(limits, base, lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if capacity(limits, base, mid) >= limits.max_object_size:
            lo = mid
        else:
            hi = mid - 1
    return PartPlan(limits, base, lo)


def streaming(limits: StoreLimits, part_size: int) -> PartPlan:
    """The plan for an upload of unknown size that would like parts of ``part_size`` bytes."""
    return _plan(limits, min(max(part_size, limits.min_part_size), limits.max_part_size))


def sized(limits: StoreLimits, part_size: int, total: int, key: str) -> PartPlan:
    """The plan for an upload of ``total`` bytes; FileTooLargeError if the backend cannot hold it."""
    if total > limits.max_object_size:
        raise FileTooLargeError(
            f"{key}: {total} bytes is more than one object can hold ({limits.max_object_size} bytes)", key=key
        )
    base = max(part_size, limits.min_part_size, -(-total // limits.max_parts))
    return _plan(limits, min(base, limits.max_part_size))


# -- partial overwrites: parts copied by the store from the old object ----------------------------
@dataclass(frozen=True)
class Piece:
    """One part of a patched object: bytes [start, start + length), copied by the store from the
    old object (``copy``) or uploaded from the local copy."""

    start: int
    length: int
    copy: bool


def add_range(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """``ranges`` (sorted, disjoint, half-open) with [start, end) added, merged."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if b < start or a > end:
            out.append((a, b))
        else:
            start, end = min(start, a), max(end, b)
    out.append((start, end))
    return sorted(out)


def gaps(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) that ``ranges`` do not cover."""
    out, pos = [], start
    for a, b in ranges:
        if b <= pos or a >= end:
            continue
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    if pos < end:
        out.append((pos, end))
    return out


def patch(limits: StoreLimits, part_size: int, size: int, base_size: int,
          local: list[tuple[int, int]]) -> list[Piece] | None:
    """The parts of an object of ``size`` bytes whose bytes ``local`` were written here and the
    rest of [0, base_size) is the old object's: untouched runs the store can copy (``limits.part_copy``)
    are copied, the rest uploaded, every part but the last at least ``min_part_size``. None when
    nothing would be copied (then the whole file is uploaded as usual)."""
    untouched = [(a, b) for a, b in gaps(local, 0, min(base_size, size)) if b > a]
    if limits.part_copy == "whole":
        # GCS: only the whole old object, as the first piece (an append)
        if untouched != [(0, base_size)] or base_size == 0 or size <= base_size:
            return None
        whole = [Piece(0, base_size, True)]
        whole += [Piece(p, min(part_size, size - p), False) for p in range(base_size, size, part_size)]
        return whole if len(whole) <= limits.max_parts else None
    if limits.part_copy != "ranges":
        return None
    least = limits.min_part_size
    part = max(part_size, least, -(-size // max(1, limits.max_parts // 2)))
    copyable = [(a, b) for a, b in untouched if b - a >= least]
    pieces: list[Piece] = []
    p = 0
    while p < size:
        run = next(((a, b) for a, b in copyable if a <= p < b and b - p >= least), None)
        if run is not None:
            n = min(run[1] - p, limits.max_part_size)
            pieces.append(Piece(p, n, True))
            p += n
            continue
        # upload at least `least` bytes (the last part excepted), up to the next copyable run
        floor = min(size, p + least)
        nxt = min((max(a, floor) for a, b in copyable if b - max(a, floor) >= least), default=size)
        end = min(size, p + part, max(nxt, floor))
        pieces.append(Piece(p, end - p, False))
        p = end
    if not any(piece.copy for piece in pieces) or len(pieces) > limits.max_parts:
        return None
    return pieces
