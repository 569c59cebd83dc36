"""Typed store errors.

Backends translate every SDK exception into one of these, so the layers above never look at
SDK types or error strings. Each class carries the errno a FUSE operation returns for it and
whether a retry could help (``is_temp_failure``). They also derive from the matching built-in
exception (fsspec's convention), so callers outside the filesystem can catch
``FileNotFoundError`` or ``PermissionError``.
"""

from __future__ import annotations

import errno


class StoreError(OSError):
    """Base class: a store request failed. ``errno`` is what FUSE returns."""

    default_errno = errno.EIO
    transient = False

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(self.default_errno, message)
        self.key = key

    def __str__(self) -> str:
        return str(self.strerror)


class NotFoundError(StoreError, FileNotFoundError):
    default_errno = errno.ENOENT


class BucketNotFoundError(NotFoundError):
    """The bucket itself does not exist (as opposed to a key in it)."""


class AccessDeniedError(StoreError, PermissionError):
    default_errno = errno.EACCES


class ObjectChangedError(StoreError):
    """The object's version differs from the one pinned when the file was opened."""

    default_errno = errno.ESTALE


class AlreadyExistsError(StoreError, FileExistsError):
    default_errno = errno.EEXIST


class InvalidRequestError(StoreError):
    default_errno = errno.EINVAL


class TransientError(StoreError):
    """Throttling, 5xx, connection resets, timeouts: worth retrying."""

    transient = True
    default_errno = errno.EIO


class ThrottledError(TransientError):
    default_errno = errno.EAGAIN


class UnreachableError(TransientError):
    """The endpoint did not answer (refused, DNS, timeout)."""

    default_errno = errno.EHOSTUNREACH


def is_temp_failure(exc: BaseException) -> bool:
    """True if retrying the same request may succeed."""
    return isinstance(exc, StoreError) and exc.transient


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE operation should return for ``exc``."""
    if isinstance(exc, StoreError):
        return exc.errno or errno.EIO
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
