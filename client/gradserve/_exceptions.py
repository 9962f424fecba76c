"""SDK exceptions, one per gRPC status code.

Hierarchy::

    GradserveError
    ├── InvalidArgument        INVALID_ARGUMENT (also raised before a call for bad inputs)
    ├── NotFound               NOT_FOUND
    ├── FailedPrecondition     FAILED_PRECONDITION
    ├── Unavailable            UNAVAILABLE
    ├── ResourceExhausted      RESOURCE_EXHAUSTED
    ├── DeadlineExceeded       DEADLINE_EXCEEDED
    ├── Cancelled              CANCELLED
    ├── Unauthenticated        UNAUTHENTICATED
    ├── PermissionDenied       PERMISSION_DENIED
    ├── Unimplemented          UNIMPLEMENTED
    └── Internal               INTERNAL, UNKNOWN and anything else

``from_grpc_error`` picks the class from a table; callers raise it ``from`` the original
``grpc.RpcError`` so the cause stays attached.
"""
from __future__ import annotations

from typing import Any

import grpc

__all__ = [
    "GradserveError", "InvalidArgument", "NotFound", "FailedPrecondition", "Unavailable",
    "ResourceExhausted", "DeadlineExceeded", "Cancelled", "Unauthenticated", "PermissionDenied",
    "Unimplemented", "Internal", "from_grpc_error", "from_status",
]


class GradserveError(Exception):
    """Base of every error the SDK raises. ``code`` is a ``grpc.StatusCode``."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(GradserveError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GradserveError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(GradserveError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GradserveError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(GradserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(GradserveError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(GradserveError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(GradserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GradserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(GradserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(GradserveError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[GradserveError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, Unavailable,
                              ResourceExhausted, DeadlineExceeded, Cancelled, Unauthenticated,
                              PermissionDenied, Unimplemented, Internal)
}
_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def from_status(code: grpc.StatusCode | int, details: str) -> GradserveError:
    """The exception for a status code (a ``grpc.StatusCode`` or its integer value)."""
    status = code if isinstance(code, grpc.StatusCode) else _BY_VALUE.get(int(code), grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(status, Internal)
    return cls(details, code=status)


def from_grpc_error(exc: grpc.RpcError) -> GradserveError:
    """The exception for a failed RPC; raise it ``from exc``."""
    call: Any = exc
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = call.details() if hasattr(call, "details") else str(exc)
    return from_status(code or grpc.StatusCode.UNKNOWN, details or "")
