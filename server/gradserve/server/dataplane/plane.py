"""The protocol-independent data plane: every front-end (gRPC services, OIP) calls this object.

``DataPlane.compute`` takes a decoded request, resolves the model version, validates it into a
``ComputeSpec``, plans it with its method, runs it through the batcher and engine
(``runner.ComputeRunner``) and returns a ``ComputeResult`` of NumPy arrays. Failures are domain
errors (``errors``); each front-end maps them to its own status codes (``status`` for gRPC) and
encodes results in its own wire format (``encoding`` for the native protocol). The model queries
(``model_info``, ``list_models``, ``ready``, ``live``) return plain data as well.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from gradserve.server.compute.runner import ComputeRunner
from gradserve.server.config import Limits
from gradserve.server.core.errors import NotFoundError
from gradserve.server.core.models import check_model_ref
from gradserve.server.core.results import ComputeResult, ModelInfo, VersionInfo
from gradserve.server.core.spec import ATTRIBUTION, EXTRA, OUTPUT, TARGET_INDICES
from gradserve.server.dataplane.validation import validate_request
from gradserve.server.models.repository import ModelRepository, ModelVersion
from gradserve.server.ops import calls
from gradserve.server.ops.budget import MemoryBudget, request_bytes
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["DataPlane"]


def _version_info(mv: ModelVersion) -> VersionInfo:
    eng = mv.engine
    if eng is None:
        return VersionInfo(mv.version, mv.state, mv.message, mv.source)
    return VersionInfo(mv.version, mv.state, mv.message, mv.source, eng.model.inputs, eng.model.outputs,
                       bool(eng.xla), eng.device, tuple(eng.buckets), tuple(eng.model.layer_names()),
                       dict(eng.trace_counts), dict(eng.compile_counts))


def _result(mv: ModelVersion, flat: Mapping[str, np.ndarray], with_indices: bool) -> ComputeResult:
    """Split the engine's flat result dict by its key prefixes."""
    outputs: dict[str, np.ndarray] = {}
    attributions: dict[str, np.ndarray] = {}
    extras: dict[str, np.ndarray] = {}
    indices = None
    for key, arr in flat.items():
        if key.startswith(OUTPUT):
            outputs[key[len(OUTPUT):]] = arr
        elif key.startswith(ATTRIBUTION):
            attributions[key[len(ATTRIBUTION):]] = arr
        elif key.startswith(EXTRA):
            extras[key[len(EXTRA):]] = arr
        elif key == TARGET_INDICES and with_indices:
            indices = arr
    return ComputeResult(mv.name, mv.version, outputs, attributions, extras, indices)


class DataPlane:
    """Models, validation, planning and compute, for any front-end (see the module docstring).

    Parameters
    ----------
    repository
        The hosted models.
    runner
        Batchers and compute threads.
    limits
        Request limits.
    """

    def __init__(self, repository: ModelRepository, runner: ComputeRunner, limits: Limits) -> None:
        self.repository = repository
        self.runner = runner
        self.limits = limits
        #: Decompressed request bytes of the computations in flight (``limits.max_inflight_request_bytes``).
        self.request_memory = MemoryBudget(limits.max_inflight_request_bytes)

    async def compute(self, request: _pb2.ComputeRequest, deadline: float | None = None,
                      nbytes: int | None = None) -> ComputeResult:
        """Validate, plan and run one request; raises domain errors (``errors``).

        ``deadline`` is an absolute ``time.monotonic()`` time: work not started by then is
        dropped, and the engine stops between chunks once it has passed. Inside a native
        Compute call (``calls``) the call's own deadline and cancellation flag apply too.
        ``nbytes``: the request's size on the wire (decompressed), held against the memory
        budget until the answer is ready; None: the size of its tensors.
        """
        check_model_ref(request.model, request.version)  # path-like names never reach the repository
        mv = self.repository.get(request.model, request.version)
        # The request's bytes are held until its answer is ready: its tensors and their copies.
        # An unloading version waits for this request before it goes.
        with self.request_memory.hold(request_bytes(request) if nbytes is None else nbytes), mv.acquire():
            method, spec = validate_request(request, mv.model, self.limits)
            call = calls.attach(method.plan(spec, mv.model, self.limits))
            if call.deadline is None:
                call.deadline = deadline
                call.check()
            flat = await self.runner.run(mv, call, call.deadline if deadline is None else deadline)
        target = spec.target
        return _result(mv, flat, target is not None and target.kind in ("index", "argmax"))

    def model_info(self, name: str) -> ModelInfo:
        """Every version of ``name``; INVALID_ARGUMENT for a malformed name, NOT_FOUND if unknown."""
        return ModelInfo(name, tuple(_version_info(mv) for mv in self.repository.versions(name)))

    def list_models(self) -> list[ModelInfo]:
        """Every hosted model (a model removed meanwhile is left out)."""
        out = []
        for name in self.repository.names():
            try:
                out.append(self.model_info(name))
            except NotFoundError:
                continue
        return out

    def ready(self, name: str, version: int = 0) -> bool:
        """Whether ``name`` (``version``; 0: any) can be computed on now."""
        try:
            self.repository.get(name, version)
        except Exception:  # noqa: BLE001 - unknown, malformed, not loaded: not ready
            return False
        return True

    def live(self) -> bool:
        """Whether the data plane answers at all (the process is up and not shut down)."""
        return not self.runner.closed
