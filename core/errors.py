"""The one error hierarchy of Kybernate.

Every failure that crosses a process boundary (ttrpc to containerd, gRPC between shim
and agent) is a `KybernateError`; its `code` is the ttrpc/gRPC status code it travels
as. containerd 1.7 maps back only InvalidArgument, NotFound, AlreadyExists,
FailedPrecondition, Unavailable, Unimplemented, Canceled and DeadlineExceeded; every
other code reaches the user as "unknown", so prefer those where they fit.
"""

from __future__ import annotations

import copy
import enum
from typing import Self


class StatusCode(enum.IntEnum):
    """google.rpc.Code, shared by ttrpc and gRPC."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class KybernateError(Exception):
    """Base of all errors; `code` is the wire status it maps to."""

    code: StatusCode = StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def with_message(self, message: str) -> Self:
        """The same error (class, code and every field) saying `message` instead:
        for adding context on the way up without losing what the error carries."""
        other = copy.copy(self)
        other.message = message
        other.args = (message,)
        return other


class Cancelled(KybernateError):
    code = StatusCode.CANCELLED


class InvalidArgument(KybernateError):
    code = StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(KybernateError):
    code = StatusCode.DEADLINE_EXCEEDED


class NotFound(KybernateError):
    code = StatusCode.NOT_FOUND


class AlreadyExists(KybernateError):
    code = StatusCode.ALREADY_EXISTS


class PermissionDenied(KybernateError):
    code = StatusCode.PERMISSION_DENIED


class ResourceExhausted(KybernateError):
    code = StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(KybernateError):
    code = StatusCode.FAILED_PRECONDITION


class Aborted(KybernateError):
    code = StatusCode.ABORTED


class Unimplemented(KybernateError):
    code = StatusCode.UNIMPLEMENTED


class Internal(KybernateError):
    code = StatusCode.INTERNAL


class Unavailable(KybernateError):
    code = StatusCode.UNAVAILABLE


class DataLoss(KybernateError):
    code = StatusCode.DATA_LOSS


_BY_CODE: dict[int, type[KybernateError]] = {
    cls.code: cls
    for cls in (
        Cancelled, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted,
        Unimplemented, Internal, Unavailable, DataLoss,
    )
}


def error_from_status(code: int, message: str) -> KybernateError:
    """Rebuild the typed error a peer sent as (code, message)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = KybernateError(message)
        err.code = StatusCode(code) if code in StatusCode._value2member_map_ else StatusCode.UNKNOWN
        return err
    return cls(message)
