"""The protocol-independent data plane: every front-end hands it a neutral request.

``DataPlane.compute`` takes a ``core.requests.ComputeRequest`` (whatever protocol carried it)
and the call's ``CallControl`` (deadline, cancellation), resolves the model version, checks the
request against the model once (``validation.check``), plans it with its method, runs it
through the batcher and engine (``compute.runner.ComputeRunner``) and returns a
``core.results.ComputeResult`` of NumPy arrays; Shapley values and partial dependence take many
engine calls of their own (``explain``). ``DataPlane.analyze`` does the same for a global
sensitivity analysis (``gsa``). Failures are domain errors (``core.errors``); each front-end
maps them to its own status codes and encodes results in its own wire format. The model queries
(``model_info``, ``list_models``, ``ready``, ``live``) return plain data as well.

The common request takes a short path: the first request of a kind on a model version
(``validation.request_kind``: same method, target, wrt and input names, dtypes and shapes less
the batch) is checked and planned in full, and what that found is kept on the version
(``ModelVersion.plans``); a later request of the kind is checked for what depends on more than
its kind (``validation.checked_batch``) and its call is the first one's rebound to its arrays
(``SensitivityMethod.rebind``), with no spec built. Anything ``checked_batch`` finds wrong takes
the full check, which says what.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable, Mapping

import numpy as np

from gradserve.server.compute.methods import SensitivityMethod
from gradserve.server.compute.runner import ComputeRunner
from gradserve.server.config import Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.errors import NotFoundError
from gradserve.server.core.explain import EXPLAIN_METHODS
from gradserve.server.core.models import check_model_ref
from gradserve.server.core.requests import AnalysisRequest, ComputeRequest
from gradserve.server.core.results import ComputeResult, ModelInfo, VersionInfo
from gradserve.server.core.spec import ATTRIBUTION, EXTRA, OUTPUT, TARGET_INDICES, PreparedCall
from gradserve.server.dataplane.explain.run import explain
from gradserve.server.dataplane.gsa import problem as gsa_problem
from gradserve.server.dataplane.gsa.run import run_analysis
from gradserve.server.dataplane.validation import check, checked_batch, finite_inputs, request_kind
from gradserve.server.models.repository import ModelRepository, ModelVersion

__all__ = ["DataPlane", "AnalysisResult", "MAX_PLANS"]

#: Kinds of requests remembered per model version (``ModelVersion.plans``); past them, requests of
#: a new kind are checked and planned in full each time.
MAX_PLANS = 256


class _Plan:
    """What the full check and plan of a kind's first request found (see the module docstring)."""

    __slots__ = ("method", "call", "finite", "with_indices")

    def __init__(self, method: SensitivityMethod, call: PreparedCall, finite: tuple[str, ...],
                 with_indices: bool) -> None:
        self.method = method
        #: The first call's key and engine structure, without its arrays (``rebind`` fills them in).
        self.call = PreparedCall(call.key, {}, struct=call.struct)
        #: Inputs whose values are checked for NaN/Inf.
        self.finite = finite
        #: Whether the result carries the target indices (index and argmax targets).
        self.with_indices = with_indices


@dataclass(frozen=True)
class AnalysisResult:
    """A finished analysis: the model version it ran on, the checked problem, the indices by
    SALib's key names and the model's outputs at the samples."""

    model: str
    version: int
    analysis: gsa_problem.Analysis
    indices: Mapping[str, np.ndarray]
    outputs: np.ndarray


def _version_info(mv: ModelVersion) -> VersionInfo:
    eng = mv.engine
    if eng is None:
        return VersionInfo(mv.version, mv.state, mv.message, mv.source)
    return VersionInfo(mv.version, mv.state, mv.message, mv.source, eng.model.inputs, eng.model.outputs,
                       bool(eng.xla), eng.device, tuple(eng.buckets), tuple(eng.model.layer_names()),
                       dict(eng.trace_counts), dict(eng.compile_counts))


#: Where each key of an engine result goes (0: outputs, 1: attributions, 2: extras, 3: the
#: target indices, 4: nowhere) and under which name; memo of ``_where``.
_WHERE: dict[str, tuple[int, str]] = {}


def _where(key: str) -> tuple[int, str]:
    for slot, prefix in enumerate((OUTPUT, ATTRIBUTION, EXTRA)):
        if key.startswith(prefix):
            where = (slot, key[len(prefix):])
            break
    else:
        where = (3 if key == TARGET_INDICES else 4, "")
    if len(_WHERE) < 4096:  # keys are made of model tensor names: a bounded set
        _WHERE[key] = where
    return where


def _result(mv: ModelVersion, flat: Mapping[str, np.ndarray], with_indices: bool) -> ComputeResult:
    """Split the engine's flat result dict by its key prefixes."""
    groups: tuple[dict[str, np.ndarray], ...] = ({}, {}, {})
    indices = None
    for key, arr in flat.items():
        slot, name = _WHERE.get(key) or _where(key)
        if slot < 3:
            groups[slot][name] = arr
        elif slot == 3 and with_indices:
            indices = arr
    return ComputeResult(mv.name, mv.version, groups[0], groups[1], groups[2], indices)


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

    async def compute(self, request: ComputeRequest, control: CallControl | None = None) -> ComputeResult:
        """Check, plan and run one request; raises domain errors (``core.errors``).

        ``control`` carries the call's deadline and cancellation: work not started by the
        deadline is dropped, and the engine stops between chunks once it has passed or the
        caller went away.
        """
        mv = self.repository.serving(request.model, request.version)
        if mv is None:
            check_model_ref(request.model, request.version)  # path-like names never reach the repository
            mv = self.repository.get(request.model, request.version)
        mv.enter()  # an unloading version waits for this request before it goes
        try:
            plans = mv.plans
            kind: Hashable | None = request_kind(request)
            try:
                plan = plans.get(kind) if kind is not None else None
            except TypeError:  # an unhashable field (a list for wrt, say): checked in full
                kind = plan = None
            batch = -1 if plan is None else checked_batch(request, plan.finite, self.limits)
            if batch > 0:
                assert plan is not None
                call = plan.method.rebind(plan.call, request.inputs, batch)
                with_indices = plan.with_indices
            else:
                if request.method in EXPLAIN_METHODS:   # many engine calls of its own, chunk by chunk
                    return await explain(request, mv, self.runner.run, self.limits, control)
                method, spec = check(request, mv.model, self.limits)
                call = method.plan(spec, mv.model, self.limits)
                target = spec.target
                with_indices = target is not None and target.kind in ("index", "argmax")
                if kind is not None and method.rebinds and len(plans) < MAX_PLANS:
                    plan = plans[kind] = _Plan(method, call, finite_inputs(mv.model), with_indices)
            call.control = control
            # Inline, the engine checks the control before it starts; otherwise the call is not
            # queued once its deadline has passed or its caller went away.
            flat = self.runner.run_inline(mv, call)
            if flat is None:
                call.check()
                flat = await self.runner.run(mv, call)
            if plan is not None and plan.call.struct is None:  # the engine's, once it has run one
                plan.call.struct = call.struct
        finally:
            mv.leave()
        return _result(mv, flat, with_indices)

    async def analyze(self, request: AnalysisRequest, control: CallControl | None = None,
                      progress: Callable[[int, int], Awaitable[None]] | None = None,
                      reserve: Callable[[int], None] | None = None) -> AnalysisResult:
        """Check, sample, evaluate and analyse one global sensitivity analysis; ``progress(done,
        total)`` is awaited as the evaluations go (first with 0 done, once the problem is checked).

        ``reserve(nbytes)`` is called once the problem is checked, before anything is drawn, with
        the memory the analysis will hold at its peak (``gsa.problem.memory_for``): the caller
        holds it against its memory budget, or raises to refuse the analysis.
        """
        check_model_ref(request.model, request.version)
        mv = self.repository.get(request.model, request.version)
        with mv.acquire():  # an unloading version waits for this analysis
            analysis = gsa_problem.check(request, mv.model, self.limits)
            if reserve is not None:
                reserve(analysis.nbytes)
            if progress is not None:
                await progress(0, analysis.evaluations)
            indices, y = await run_analysis(analysis, mv, self.runner.run, self.limits, control=control,
                                            progress=progress)
        return AnalysisResult(mv.name, mv.version, analysis, indices, y)

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
