"""What the gRPC and REST front-ends of the Open Inference Protocol share: health, metadata, and one
inference from decoded request to answer tensors inside the call envelope."""
from __future__ import annotations

import importlib.metadata
from typing import Callable, Mapping

import numpy as np

from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.core.models import validate_model_name
from gradserve.server.core.results import ComputeResult
from gradserve.server.dataplane import DataPlane
from gradserve.server.frontends.oip.translate import (
    InferRequest,
    ModelMetadata,
    SharedMemoryRef,
    compute_request,
    deadline_seconds,
    model_metadata,
    parse_version,
    response_tensors,
)
from gradserve.server.frontends.shared_memory import Borrowed, SharedMemoryRegistry, write_array
from gradserve.server.ops.calls import Call, CallEnvelope

__all__ = ["InferenceFrontEnd", "EXTENSIONS", "SERVER_NAME", "write_outputs"]

SERVER_NAME = "gradserve"
#: Protocol extensions named in ServerMetadata (``binary_tensor_data``: REST only), and
#: ``system_shared_memory`` when shared memory is on (``InferenceFrontEnd.extensions``).
EXTENSIONS = ("binary_tensor_data", "parameters", "gradserve_sensitivity")


def write_outputs(tensors: list[tuple[str, np.ndarray]], refs: Mapping[str, SharedMemoryRef],
                  regions: Borrowed) -> None:
    """Write the tensors asked for in shared memory into their regions.

    As in Triton, a range may be larger than its tensor (the answer's shape says how much was
    written); a smaller one is refused before anything is written.
    """
    placed = [(name, arr, refs[name]) for name, arr in tensors if name in refs]
    for name, arr, ref in placed:
        if ref.byte_size < arr.nbytes:
            raise InvalidArgumentError(f"outputs[{name[:128]!r}].parameters.shared_memory_byte_size: {ref.byte_size} "
                                       f"bytes, but the output (shape {list(arr.shape)}) needs {arr.nbytes}")
    for name, arr, ref in placed:
        write_array(regions.view(ref.region, ref.offset, arr.nbytes, f"outputs[{name[:128]!r}].shared_memory"), arr)


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
    shared_memory
        The server's shared-memory registry (None: one that is off): inputs and requested outputs
        with ``shared_memory_*`` parameters are read from and written into its regions.
    """

    def __init__(self, dataplane: DataPlane, envelope: CallEnvelope, ready: Callable[[], bool] = lambda: True,
                 shared_memory: SharedMemoryRegistry | None = None) -> None:
        self.dataplane = dataplane
        self.envelope = envelope
        self._ready = ready
        self.shared_memory = shared_memory or SharedMemoryRegistry(enabled=False)
        #: The extensions ServerMetadata names.
        self.extensions = EXTENSIONS + (("system_shared_memory",) if self.shared_memory.enabled else ())
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
        ``timeout`` parameter (microseconds) shortens the call's deadline. The tensors asked for in
        shared memory (``req.output_shared_memory``) are written into their regions: their answer
        entries carry no data.
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
        # The regions the request names are held until its outputs are written (or it failed).
        with self.shared_memory.borrow() as regions:
            request = compute_request(req, self.dataplane.limits, nbytes, regions)
            call.admit(request.held_bytes())
            result = await call.run(self.dataplane.compute(request, call.control))
            tensors = response_tensors(result, req.outputs)
            if req.output_shared_memory:
                write_outputs(tensors, req.output_shared_memory, regions)
        return result, tensors
