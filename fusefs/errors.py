"""Typed store errors.

Backends translate every SDK exception into one of these, so the layers above never look at
SDK types or error strings. Each class carries the errno a FUSE operation returns for it and
whether a retry could help (``is_temp_failure``). They also derive from the matching built-in
exception (fsspec's convention), so callers outside the filesystem can catch
``FileNotFoundError`` or ``PermissionError``.

A store that still fails once ``fusefs.retry`` gave up (throttling, 5xx, resets, an endpoint that
does not answer) is ``EIO``. Never ``EAGAIN``/``EWOULDBLOCK`` or ``EINTR``: Python's file objects
take EAGAIN from a blocking read as "no data yet" (``readall`` returns what it has, buffered
``read`` returns None: a silent short read) and retry EINTR by themselves (PEP 475), so either
would turn a store outage into wrong data or a spin. ``errno_of`` enforces that for every error,
ours or the OS's, that reaches a FUSE reply.
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


class UnsupportedError(InvalidRequestError):
    """The store does not do what was asked (a ranged part copy on rclone's S3 server): the
    caller falls back to a way every store supports."""


class FileTooLargeError(StoreError):
    """More bytes than one object of the backend can hold."""

    default_errno = errno.EFBIG


class TransientError(StoreError):
    """Throttling, 5xx, connection resets, timeouts: worth retrying."""

    transient = True
    default_errno = errno.EIO


class ThrottledError(TransientError):
    """503 SlowDown, 429: retried; EIO once the retry deadline has passed (see the module doc)."""


class UnreachableError(TransientError):
    """The endpoint did not answer (refused, DNS, timeout)."""


#: errnos that callers' I/O libraries treat as "try again" rather than as a failure
_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})


def is_temp_failure(exc: BaseException) -> bool:
    """True if retrying the same request may succeed."""
    return isinstance(exc, StoreError) and exc.transient


def first_store_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first StoreError in ``group`` (requests run side by side in a nursery fail as a
    group), else the group itself."""
    for exc in group.exceptions:
        found = first_store_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, StoreError):
            return found
    return group


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE operation should return for ``exc``: never one that makes a caller's
    read loop stop short or spin (EAGAIN, EWOULDBLOCK, EINTR become EIO)."""
    code = exc.errno if isinstance(exc, OSError) else None
    if not code or code in _RETRY_ERRNOS:
        return errno.EIO
    return code


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception that is not a group, however deep."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
