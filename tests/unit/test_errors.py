"""SDK exceptions: one class per status code, chosen from a table, cause kept."""
from __future__ import annotations

import grpc
import pytest

import gradserve
from gradserve import _exceptions

CASES = [
    (grpc.StatusCode.INVALID_ARGUMENT, gradserve.InvalidArgument),
    (grpc.StatusCode.NOT_FOUND, gradserve.NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, gradserve.FailedPrecondition),
    (grpc.StatusCode.UNAVAILABLE, gradserve.Unavailable),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, gradserve.ResourceExhausted),
    (grpc.StatusCode.DEADLINE_EXCEEDED, gradserve.DeadlineExceeded),
    (grpc.StatusCode.UNAUTHENTICATED, gradserve.Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, gradserve.PermissionDenied),
    (grpc.StatusCode.INTERNAL, gradserve.Internal),
    (grpc.StatusCode.UNKNOWN, gradserve.Internal),
]


class _FakeRpcError(grpc.RpcError):
    """A grpc.RpcError as the channel raises it (code() and details())."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("code,cls", CASES, ids=lambda c: getattr(c, "name", getattr(c, "__name__", "")))
def test_status_code_maps_to_class(code, cls):
    rpc_error = _FakeRpcError(code, "inputs['x']: bad")
    err = _exceptions.from_grpc_error(rpc_error)
    assert type(err) is cls and isinstance(err, gradserve.GradserveError)
    assert err.code == code and err.details == "inputs['x']: bad"


def test_cause_is_kept_when_raised_from():
    rpc_error = _FakeRpcError(grpc.StatusCode.NOT_FOUND, "model: unknown")
    with pytest.raises(gradserve.NotFound) as info:
        raise _exceptions.from_grpc_error(rpc_error) from rpc_error
    assert info.value.__cause__ is rpc_error


def test_from_status_accepts_integer_codes():
    assert isinstance(_exceptions.from_status(3, "x"), gradserve.InvalidArgument)
    assert isinstance(_exceptions.from_status(12345, "x"), gradserve.Internal)
