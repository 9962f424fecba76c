"""A Shapley-value or partial-dependence request from check to answer, through the engine.

The algorithms (``evaluate``) reach the model through two functions made here: ``predict`` and
``gradient`` plan one engine call of the model's compiled functions for a chunk of rows, tie it
to the request's ``CallControl`` (the batcher and the engine stop at the deadline or when the
caller goes away) and run it through the ``ComputeRunner``, so the evaluations are queued and
merged with other callers' work and run on the configured device in the engine's biggest batches.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gradserve.server.compute import methods
from gradserve.server.config import Limits
from gradserve.server.core.control import CallControl
from gradserve.server.core.requests import ComputeRequest
from gradserve.server.core.results import ComputeResult
from gradserve.server.core.spec import ATTRIBUTION, OUTPUT, ComputeSpec, TargetSpec
from gradserve.server.dataplane.explain import evaluate
from gradserve.server.dataplane.explain.problem import partial_dependence_problem, shap_problem
from gradserve.server.models.repository import ModelVersion

__all__ = ["explain", "chunk_rows_for", "MAX_CHUNK_ROWS", "GROUPS"]

#: Most rows of one engine call.
MAX_CHUNK_ROWS = 1 << 16
#: The attribution name of the values of feature groups, (batch, groups).
GROUPS = "groups"


def chunk_rows_for(width: int, bucket: int, limits: Limits) -> int:
    """Rows per engine call: about ``limits.chunk_elements`` input elements, a multiple of the
    engine's biggest bucket (so that it never pads inside a chunk), at most ``MAX_CHUNK_ROWS``."""
    rows = min(MAX_CHUNK_ROWS, limits.chunk_elements // max(1, width))
    return max(bucket, rows - rows % bucket)


class _Engine:
    """``predict`` and ``gradient`` of one model version for the algorithms, and ``check``."""

    def __init__(self, mv: ModelVersion, run: Any, limits: Limits, target: TargetSpec,
                 control: CallControl | None) -> None:
        self.mv, self.run, self.limits, self.target, self.control = mv, run, limits, target, control
        self.names = tuple(s.name for s in mv.model.inputs)

    def check(self) -> None:
        if self.control is not None:
            self.control.check()

    async def _call(self, spec: ComputeSpec) -> dict[str, np.ndarray]:
        call = methods.get(spec.method).plan(spec, self.mv.model, self.limits)
        call.control = self.control
        call.check()
        result: dict[str, np.ndarray] = await self.run(self.mv, call)
        return result

    async def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(inputs[self.names[0]])
        result = await self._call(ComputeSpec(self.mv.name, self.mv.version, "predict", inputs, rows))
        return result[OUTPUT + self.target.output]

    async def gradient(self, inputs: dict[str, np.ndarray], indices: np.ndarray | None) -> dict[str, np.ndarray]:
        rows = len(inputs[self.names[0]])
        target = TargetSpec(self.target.output, "sum" if indices is None else "index", indices,
                            self.target.transform)
        result = await self._call(ComputeSpec(self.mv.name, self.mv.version, "gradient", inputs, rows,
                                              target=target, wrt=self.names))
        return {name: result[ATTRIBUTION + name] for name in self.names}


async def explain(request: ComputeRequest, mv: ModelVersion, run: Any, limits: Limits,
                  control: CallControl | None = None) -> ComputeResult:
    """Check and compute one ``shap`` or ``partial_dependence`` request on ``mv`` (``run``:
    ``ComputeRunner.run``)."""
    assert mv.engine is not None
    bucket = mv.engine.buckets[-1]
    if request.method == "shap":
        shap = shap_problem(request, mv.model, limits)
        p = shap.problem
        engine = _Engine(mv, run, limits, shap.target, control)
        rows = chunk_rows_for(sum(p.x.sizes.values()), bucket, limits)
        values = await evaluate.shap_values(p, engine.predict, engine.gradient, chunk_rows=rows, check=engine.check)
        if p.features.grouped:
            attributions = {GROUPS: values.values}
        else:
            attributions = {name: phi.reshape((len(phi),) + p.x.shapes[name])
                            for name, phi in p.features.split(values.values).items()}
        extras = {"base": values.base} if p.return_base and values.base is not None else {}
        return ComputeResult(mv.name, mv.version, {}, attributions, extras, values.indices)
    checked = partial_dependence_problem(request, mv.model, limits)
    q = checked.problem
    engine = _Engine(mv, run, limits, checked.target, control)
    rows = chunk_rows_for(sum(q.x.sizes.values()), bucket, limits)
    curves = await evaluate.partial_dependence(q, engine.predict, chunk_rows=rows, check=engine.check)
    extras = {f"grid_values/{f}": axis for f, axis in enumerate(q.axes)}
    if checked.kind in ("average", "both"):
        extras["average"] = curves.average
    if checked.kind in ("individual", "both"):
        extras["individual"] = curves.individual
    return ComputeResult(mv.name, mv.version, {}, {}, extras, curves.indices)
