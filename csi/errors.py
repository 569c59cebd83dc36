"""Exceptions that carry a gRPC status code.

RPC handlers raise these; the interceptor in ``csi.main`` turns them into the status the CO sees.
Messages say what was wrong and what to do about it, and never contain secrets.
"""

from __future__ import annotations

import grpc

from fusefs import errors as store_errors


class CsiError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CsiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CsiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CsiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CsiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(CsiError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Aborted(CsiError):
    """Another operation on the same volume or target is in progress: the CO retries."""

    code = grpc.StatusCode.ABORTED


class Unavailable(CsiError):
    code = grpc.StatusCode.UNAVAILABLE


class OutOfRange(CsiError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Internal(CsiError):
    code = grpc.StatusCode.INTERNAL


def from_store_error(exc: store_errors.StoreError, what: str) -> CsiError:
    """Translate a typed store error into the CSI error a CO can act on."""
    msg = f"{what}: {exc}"
    if isinstance(exc, store_errors.BucketNotFoundError | store_errors.NotFoundError):
        return NotFound(msg)
    if isinstance(exc, store_errors.AccessDeniedError):
        return PermissionDenied(msg)
    if isinstance(exc, store_errors.TransientError):
        return Unavailable(msg)
    if isinstance(exc, store_errors.InvalidRequestError):
        return InvalidArgument(msg)
    if isinstance(exc, store_errors.AlreadyExistsError):
        return AlreadyExists(msg)
    return Internal(msg)
