"""What the gRPC and REST front-ends of the Open Inference Protocol share: health, metadata, and one
inference from decoded request to answer tensors inside the call envelope."""
from __future__ import annotations

import importlib.metadata
from typing import Callable

import numpy as np

from gradserve.server.core.models import validate_model_name
from gradserve.server.core.results import ComputeResult
from gradserve.server.dataplane import DataPlane
from gradserve.server.frontends.oip.translate import (
    InferRequest,
    ModelMetadata,
    compute_request,
    deadline_seconds,
    model_metadata,
    parse_version,
    response_tensors,
)
from gradserve.server.ops.calls import Call, CallEnvelope

__all__ = ["InferenceFrontEnd", "EXTENSIONS", "SERVER_NAME"]

SERVER_NAME = "gradserve"
#: Protocol extensions named in ServerMetadata (``binary_tensor_data``: REST only).
EXTENSIONS = ("binary_tensor_data", "parameters", "gradserve_sensitivity")


class InferenceFrontEnd:
    """One server's OIP answers, shared by its gRPC servicer and its REST app.

    Parameters
    ----------
    dataplane
        The server's data plane.
    envelope
        The server's call envelope: every inference is a call in it (protocol ``oip-grpc`` or
        ``oip-rest``), with deadlines, admission, the memory budget and metrics.
    ready
        Whether the server is ready (its configured models are loaded).
    """

    def __init__(self, dataplane: DataPlane, envelope: CallEnvelope, ready: Callable[[], bool] = lambda: True) -> None:
        self.dataplane = dataplane
        self.envelope = envelope
        self._ready = ready
        try:
            self.version = importlib.metadata.version("gradserve")
        except importlib.metadata.PackageNotFoundError:
            self.version = "0"

    def live(self) -> bool:
        return self.dataplane.live()

    def ready(self) -> bool:
        return self.dataplane.live() and self._ready()

    def model_ready(self, name: str, version: str) -> bool:
        """Whether ``name`` at ``version`` can be computed on; domain errors for a malformed name
        or version."""
        validate_model_name(name, "name")
        return self.dataplane.ready(name, parse_version(version, "version"))

    def model_metadata(self, name: str, version: str) -> ModelMetadata:
        return model_metadata(self.dataplane.model_info(name), version)

    async def infer(self, call: Call, req: InferRequest,
                    nbytes: int) -> tuple[ComputeResult, list[tuple[str, np.ndarray]]]:
        """Translate, admit, compute and select the answer's tensors of one request, inside
        ``call`` (opened by the transport); raises domain errors.

        ``nbytes``: the request's size on the wire, held against the memory budget. Triton's
        ``timeout`` parameter (microseconds) shortens the call's deadline.
        """
        method = req.parameters.get("method", "predict")
        batch = None
        for inp in req.inputs:
            batch = int(inp.shape[0]) if len(inp.shape) and type(inp.shape[0]) is int else None
            break
        call.describe(req.model, method if isinstance(method, str) else "invalid", batch, req.id)
        timeout = deadline_seconds(req.parameters)
        if timeout is not None:
            call.tighten(timeout)
        request = compute_request(req, self.dataplane.limits, nbytes)
        call.admit(request.held_bytes())
        result = await call.run(self.dataplane.compute(request, call.control))
        return result, response_tensors(result, req.outputs)
