"""Domain errors raised by validation, the repository, the engine and the methods.

They know nothing of gRPC: ``gradserve.server.ops.status`` maps them to status codes in one place.
Messages name the offending field and never include payload bytes.
"""
from __future__ import annotations

__all__ = ["ServeError", "InvalidArgumentError", "NotFoundError", "AlreadyExistsError", "FailedPreconditionError",
           "UnavailableError", "ResourceExhaustedError", "DeadlineExceededError", "CancelledError",
           "UnimplementedError"]

_MAX_MESSAGE = 1024


class ServeError(Exception):
    """Base of the domain errors; ``message`` is safe to show to the caller (<= 1 KiB)."""

    def __init__(self, message: str) -> None:
        if len(message.encode()) > _MAX_MESSAGE:
            message = message.encode()[: _MAX_MESSAGE - 3].decode(errors="ignore") + "..."
        super().__init__(message)
        self.message = message


class InvalidArgumentError(ServeError):
    """Malformed tensor, dtype/shape/rank mismatch, bad option, static limit exceeded."""


class NotFoundError(ServeError):
    """Unknown model, version, input, output or layer."""


class AlreadyExistsError(ServeError):
    """A name that is already taken (a shared-memory region registered twice)."""


class FailedPreconditionError(ServeError):
    """The request is well formed but cannot be computed (e.g. an integer input as wrt)."""


class UnavailableError(ServeError):
    """Model loading, or the server draining."""


class ResourceExhaustedError(ServeError):
    """Queue full, memory budget, message too large."""


class DeadlineExceededError(ServeError):
    """The request's deadline passed before its work started."""


class CancelledError(ServeError):
    """The caller went away."""


class UnimplementedError(ServeError):
    """A feature this server does not offer, or offers only when started with it on."""
