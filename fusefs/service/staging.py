"""The parts of a multipart upload, kept on local disk until it completes, so what a mount wrote
goes into the node cache under the version the store answers (write-through of big files).

The data service uploads every part; only it knows the bytes the store acknowledged. It cannot
put them into the node cache as they arrive: a block is keyed by the object's version, which the
store names only at completion, and a part's place in the object is known only then (the object
is its parts in number order). So each acknowledged part is written to an unnamed temporary file
(never held in memory beyond the part the request carried), and at completion the blocks are cut
from them in order and stored one at a time. A part the store copied from another object
(``UploadPartCopy``) has no bytes here: such an upload is not cached at all (a later read fetches
it), never cached with bytes this side did not see.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

log = logging.getLogger(__name__)

_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class StagedParts:
    """The acknowledged parts of one upload: part number -> (unnamed file, length)."""

    directory: str
    budget: int  # bytes this upload may stage; beyond them it is not cached
    parts: dict[int, tuple[IO[bytes], int]] = field(default_factory=dict)
    given_up: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)  # parts are staged in parallel threads

    @property
    def staged(self) -> int:
        with self._lock:
            return sum(length for _, length in self.parts.values())

    def write(self, data: bytes | memoryview) -> IO[bytes] | None:
        """A part's bytes in an unnamed file (None: not kept: given up, over budget, a disk
        error). Blocking: run it in a worker thread, beside the part's upload; ``keep`` it once
        the store acknowledged the part, else close it."""
        with self._lock:
            if self.given_up or sum(length for _, length in self.parts.values()) + len(data) > self.budget:
                self.given_up = True
        if self.given_up:
            self.close()
            return None
        f: IO[bytes] | None = None
        try:
            f = tempfile.TemporaryFile(dir=self.directory)  # unnamed: gone with the process
            f.write(data)
            return f
        except OSError as exc:
            if f is not None:
                f.close()
            log.debug("not staging a part for the node cache: %s", exc)
            self.give_up()
            return None

    def keep(self, number: int, f: IO[bytes], length: int) -> None:
        """Part ``number`` as the store acknowledged it; one sent again replaces the first, as
        in the store."""
        with self._lock:
            kept = not self.given_up
            old = self.parts.get(number) if kept else None
            if kept:
                self.parts[number] = (f, length)
        if old is not None:
            old[0].close()
        if not kept:
            f.close()

    def add(self, number: int, data: bytes | memoryview) -> None:
        """``write`` and ``keep`` (blocking)."""
        f = self.write(data)
        if f is not None:
            self.keep(number, f, len(data))

    def give_up(self) -> None:
        """The upload will not be cached (a part copied in the store, too big, a disk error)."""
        with self._lock:
            self.given_up = True
        self.close()

    def close(self) -> None:
        with self._lock:
            files, self.parts = list(self.parts.values()), {}
        for f, _ in files:
            f.close()

    def proves(self, version: str, answered: str | None) -> bool:
        """Whether ``version``, which the store named after completing the upload, is the version
        of these bytes. ``answered``: the ETag the completion itself answered, when the version
        came from a later HEAD (S3: some stores list another ETag than the completion's), which
        could have seen another writer's object; None when the completion named the version
        (GCS's compose, the in-memory store). A HEAD that names the completion's ETag saw this
        upload's object; one that names a content MD5 (rclone) is checked against these bytes.
        Anything else is not cached. Blocking (may read every part)."""
        etag = version.strip('"').lower()
        if answered is None or etag == answered.strip('"').lower():
            return True
        if not _MD5.match(etag):
            return False
        with self._lock:
            ordered = [self.parts[n] for n in sorted(self.parts)]
        whole = hashlib.md5()
        for f, _ in ordered:
            f.seek(0)
            while chunk := f.read(1 << 20):
                whole.update(chunk)
        return whole.hexdigest() == etag

    def write_blocks(self, version: str, answered: str | None, size: int, block_size: int,
                     put: Callable[[int, bytes], bool]) -> bool:
        """Store the blocks of the object (``version``, ``size`` bytes, as completed) with
        ``put(index, block)``, cut from the parts in number order, one block in memory at a time;
        False (nothing more stored) when the parts are not that object (``proves``) or the cache
        refuses a block. Blocking."""
        if self.given_up or self.staged != size or not size or not self.proves(version, answered):
            return False
        with self._lock:
            ordered = [self.parts[n] for n in sorted(self.parts)]
        index, block = 0, bytearray()
        for f, length in ordered:
            f.seek(0)
            left = length
            while left:
                piece = f.read(min(left, block_size - len(block)))
                if not piece:
                    return False  # the file is shorter than what was written to it
                block += piece
                left -= len(piece)
                if len(block) == block_size:
                    if not put(index, bytes(block)):
                        return False
                    index, block = index + 1, bytearray()
        return not block or put(index, bytes(block))


def stage_dir(cache_directory: str) -> str:
    """Where parts are staged: beside the node cache (the node's local disk), in a folder of
    their own the cache's files never share."""
    path = os.path.join(cache_directory, "staged-parts")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path
