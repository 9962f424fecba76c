"""The one place where exceptions become gRPC status codes and messages."""
from __future__ import annotations

import logging

import grpc

from gradserve.server.core import errors

__all__ = ["status_for"]

_log = logging.getLogger("gradserve.server")

_CODES: dict[type[errors.ServeError], grpc.StatusCode] = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.CancelledError: grpc.StatusCode.CANCELLED,
    errors.UnimplementedError: grpc.StatusCode.UNIMPLEMENTED,
}


def status_for(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """Status code and caller-safe message for an exception.

    Domain errors keep their message; anything else is logged with its traceback and answered
    INTERNAL with a generic text (never UNKNOWN, never a stack trace on the wire).
    """
    if isinstance(exc, errors.ServeError):
        for cls in type(exc).__mro__:
            code = _CODES.get(cls)
            if code is not None:
                return code, exc.message
    _log.error("internal error (request_id=%r)", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"
