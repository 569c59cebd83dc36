"""What one grant may touch: the keys under its prefix, read-only or not.

Every key a client names is checked here before the service sends a request for it, so a
connection lends exactly its volume: another tenant's prefix in the same bucket is out of reach
even with the same credentials (they stay on the service's side).
"""

from __future__ import annotations

from dataclasses import dataclass

from fusefs import errors


class ReadOnlyError(errors.StoreError):
    """A write through a read-only grant."""

    default_errno = 30  # EROFS


@dataclass(frozen=True)
class Scope:
    bucket: str
    prefix: str = ""  # "" (the whole bucket) or ending in "/"
    read_only: bool = False

    def __post_init__(self) -> None:
        if self.prefix and not self.prefix.endswith("/"):
            raise ValueError(f"a grant's prefix ends in '/': {self.prefix!r}")

    def key(self, key: str) -> str:
        """``key`` if this grant covers it; AccessDeniedError otherwise."""
        if not isinstance(key, str) or not key.startswith(self.prefix):
            raise errors.AccessDeniedError(f"{key!r} is outside this volume ({self.prefix or '/'})", key=str(key))
        return key

    def write(self, key: str) -> str:
        if self.read_only:
            raise ReadOnlyError(f"{key!r}: this volume is read-only", key=key)
        return self.key(key)
