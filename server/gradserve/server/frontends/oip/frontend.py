"""What the gRPC and REST front-ends of the Open Inference Protocol share: health, metadata, and one
inference from decoded request to answer tensors, with deadline, cancellation and metrics."""
from __future__ import annotations

import asyncio
import importlib.metadata
import time
from typing import Any, Callable

import grpc
import numpy as np
from prometheus_client import Counter

from gradserve.server.config import Limits
from gradserve.server.core.errors import DeadlineExceededError
from gradserve.server.core.models import validate_model_name
from gradserve.server.core.results import ComputeResult
from gradserve.server.dataplane.plane import DataPlane
from gradserve.server.frontends.oip.translate import (
    InferRequest,
    ModelMetadata,
    compute_request,
    deadline_seconds,
    model_metadata,
    parse_version,
    response_tensors,
)
from gradserve.server.ops import calls
from gradserve.server.ops.status import status_for

__all__ = ["InferenceFrontEnd", "Failure", "EXTENSIONS", "SERVER_NAME"]

SERVER_NAME = "gradserve"
#: Protocol extensions named in ServerMetadata (``binary_tensor_data``: REST only).
EXTENSIONS = ("binary_tensor_data", "parameters", "gradserve_sensitivity")


class Failure(Exception):
    """A request that failed, with the gRPC status the native API gives it (REST maps it to HTTP)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _failure(exc: BaseException, request_id: str = "") -> Failure:
    code, message = status_for(exc, request_id)
    return Failure(code, message)


class InferenceFrontEnd:
    """One server's OIP answers, shared by its gRPC servicer and its REST app.

    Parameters
    ----------
    dataplane
        The server's data plane.
    limits
        Default and maximum deadlines.
    metrics
        The server's ``ServerMetrics`` (or None): OIP requests count in its request metrics
        and, by protocol (``grpc`` or ``rest``), in ``gradserve_oip_requests_total``.
    ready
        Whether the server is ready (its configured models are loaded).
    """

    def __init__(self, dataplane: DataPlane, limits: Limits, metrics: Any = None,
                 ready: Callable[[], bool] = lambda: True) -> None:
        self.dataplane = dataplane
        self.limits = limits
        self._metrics = metrics
        self._ready = ready
        self._requests = None if metrics is None else Counter(
            "gradserve_oip_requests", "Open Inference Protocol requests by protocol, model, method and status code",
            ["protocol", "model", "method", "code"], registry=metrics.registry)
        try:
            self.version = importlib.metadata.version("gradserve")
        except importlib.metadata.PackageNotFoundError:
            self.version = "0"

    def live(self) -> bool:
        return self.dataplane.live()

    def ready(self) -> bool:
        return self.dataplane.live() and self._ready()

    def model_ready(self, name: str, version: str) -> bool:
        """Whether ``name`` at ``version`` can be computed on; Failure for a malformed name or version."""
        try:
            validate_model_name(name, "name")
            return self.dataplane.ready(name, parse_version(version, "version"))
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            raise _failure(exc) from exc

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        try:
            return model_metadata(self.dataplane.model_info(name), version)
        except Exception as exc:  # noqa: BLE001
            raise _failure(exc) from exc

    async def infer(self, decode: Callable[[], InferRequest], protocol: str,
                    time_remaining: float | None) -> tuple[ComputeResult, list[tuple[str, np.ndarray]], str]:
        """Decode, translate, compute and select the answer's tensors of one request.

        Returns the result, its tensors by OIP name and the request id; raises ``Failure``.
        ``time_remaining``: the caller's deadline in seconds (gRPC), cut to the server's maximum;
        without one the default deadline applies, or Triton's ``timeout`` parameter.
        """
        start = time.perf_counter()
        model, method, code, batch, request_id = "", "invalid", grpc.StatusCode.OK, None, ""
        control: calls.CallControl | None = None
        try:
            req = decode()
            model, request_id = req.model, req.id
            timeout = calls.effective_timeout(time_remaining, self.limits)
            given = deadline_seconds(req.parameters)
            if given is not None:
                timeout = min(timeout, given)
            native, method = compute_request(req)
            for tensor in native.inputs.values():
                batch = int(tensor.shape[0]) if len(tensor.shape) else None
                break
            # The engine stops between chunks at the deadline or once the caller went away.
            control = calls.CallControl(time.monotonic() + timeout, request_id=request_id)
            calls.activate(control)
            try:
                async with asyncio.timeout(timeout):
                    result = await self.dataplane.compute(native, control.deadline)
            except TimeoutError:
                control.cancelled.set()
                raise DeadlineExceededError(f"deadline: the call ran past its deadline of {timeout:.3f} s") from None
            return result, response_tensors(result, req.outputs), request_id
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            if control is not None:
                control.cancelled.set()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            failure = _failure(exc, request_id)
            code = failure.code
            raise failure from exc
        finally:
            self._record(protocol, model, method, code, time.perf_counter() - start, batch)

    def _record(self, protocol: str, model: str, method: str, code: grpc.StatusCode, seconds: float,
                batch: int | None) -> None:
        if self._metrics is None or self._requests is None:
            return
        # Label sets stay bounded: names of models the server does not host are pooled.
        label = model if model in self.dataplane.repository.names() else "unknown"
        self._metrics.observe_request(label, method, code.name, seconds, batch)
        self._requests.labels(protocol, label, method, code.name).inc()
