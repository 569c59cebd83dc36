"""A file's own attributes kept in its object's user metadata (S3 ``x-amz-meta-*``, GCS custom
metadata): modification time, mode (with the file type: ``S_IFLNK`` marks a symlink, ``S_IFDIR``
a directory's ``dir/`` marker, as s3fs writes them), owner.

The names are s3fs's (``mtime``, ``mode``, ``uid``, ``gid``, decimal), so a bucket written by one is
read by the other; ``mtime`` carries nanoseconds as a decimal fraction (s3fs reads the seconds).
What a store sends back is untrusted text: anything malformed reads as absent, never as an error.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

MTIME, MODE, UID, GID = "mtime", "mode", "uid", "gid"
#: what one object may carry through a grant: S3 takes 2 KiB of user metadata in all
MAX_META_BYTES = 2048
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_MTIME = re.compile(r"^(\d{1,12})(?:\.(\d{1,9}))?$")

Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class FileMeta:
    mtime_ns: int | None = None
    mode: int | None = None  # st_mode, the type bits included
    uid: int | None = None
    gid: int | None = None

    @property
    def is_symlink(self) -> bool:
        return self.mode is not None and stat.S_ISLNK(self.mode)

    def merged(self, **changes: int | None) -> FileMeta:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_store(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.mtime_ns is not None:
            sec, ns = divmod(self.mtime_ns, 1_000_000_000)
            out[MTIME] = f"{sec}.{ns:09d}" if ns else str(sec)
        for name, value in ((MODE, self.mode), (UID, self.uid), (GID, self.gid)):
            if value is not None:
                out[name] = str(value)
        return out

    @classmethod
    def from_store(cls, pairs: Iterable[tuple[str, str]] | None) -> FileMeta:
        if not pairs:
            return cls()
        d = {k.lower(): v for k, v in pairs}
        mtime_ns = None
        m = _MTIME.match(d.get(MTIME, "").strip())
        if m:
            mtime_ns = int(m.group(1)) * 1_000_000_000 + int((m.group(2) or "0").ljust(9, "0"))
        mode = _small_int(d.get(MODE), 0o177777)
        if mode is not None and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFLNK, stat.S_IFDIR):
            mode = None  # a type objfs does not serve (a device, a FIFO): the mount's default
        return cls(mtime_ns, mode, _small_int(d.get(UID), 2**32 - 1), _small_int(d.get(GID), 2**32 - 1))


def _small_int(text: str | None, most: int) -> int | None:
    if text is None or not text.strip().isdigit():
        return None
    value = int(text.strip())
    return value if value <= most else None


def pairs_of(meta: Mapping[str, str] | None) -> Pairs | None:
    """A store's metadata as the hashable form ``ObjectInfo.meta`` holds (None: not known)."""
    return None if meta is None else tuple(sorted((str(k).lower(), str(v)) for k, v in meta.items()))


def check(meta: object) -> dict[str, str]:
    """Metadata a client asks to store, checked (names, size): ValueError says what is wrong."""
    if not isinstance(meta, dict):
        raise ValueError("metadata must be a map of names to strings")
    size = 0
    for name, value in meta.items():
        if not isinstance(name, str) or not _NAME.match(name) or not isinstance(value, str):
            raise ValueError(f"metadata name {name!r} must be lower-case letters, digits, '-', '_' or '.', "
                             "with a string value")
        size += len(name) + len(value.encode())
    if size > MAX_META_BYTES:
        raise ValueError(f"metadata of {size} bytes: at most {MAX_META_BYTES}")
    return dict(meta)
