"""Turns a loaded model into a warmed-up engine: the ``Compiler`` the model repository is given."""
from __future__ import annotations

from typing import Any

import numpy as np

from gradserve.server.compute import methods
from gradserve.server.compute.engine import CompiledModel
from gradserve.server.config import EngineConfig, Limits
from gradserve.server.core.spec import ComputeSpec, TargetSpec
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["Compiler", "warm_up"]


class Compiler:
    """``compiler(model)``: a ``CompiledModel`` of ``model``, warmed up when the configuration says so."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    def __call__(self, model: ModelFunction) -> CompiledModel:
        engine = CompiledModel(model, self.config, xla=self.config.xla == "on")
        if self.config.warmup:
            warm_up(engine, self.config)
        return engine


def _zeros(model: ModelFunction, rows: int) -> dict[str, np.ndarray]:
    return {s.name: np.zeros((rows,) + tuple(1 if d is None else d for d in s.shape[1:]), s.dtype)
            for s in model.inputs}


def warm_up(engine: CompiledModel, config: EngineConfig) -> dict[str, float]:
    """Trace predict and the default gradient (with and without outputs) before READY.

    With ``config.xla == "auto"`` the default gradient is first timed with and without XLA at
    the biggest bucket and the faster is kept (``engine.xla``); the other functions follow that
    choice. Each function then runs at the smallest and the biggest bucket. Returns the XLA
    timings (empty unless measured).
    """
    model = engine.model
    limits = Limits()
    # The SDK's default target is the first output; an integer first output has no gradient.
    wrt = tuple(s.name for s in model.inputs if s.differentiable) if model.outputs[0].differentiable else ()
    target = TargetSpec(model.outputs[0].name)

    def calls(rows: int) -> list[Any]:
        inputs = _zeros(model, rows)
        plans = [methods.get("predict").plan(ComputeSpec("", 0, "predict", inputs, rows), model, limits)]
        if wrt:
            for outputs in (False, True):  # the SDK's gradient() and gradient(return_outputs=True)
                spec = ComputeSpec("", 0, "gradient", inputs, rows, target, wrt, include_outputs=outputs)
                plans.append(methods.get("gradient").plan(spec, model, limits))
        return plans

    timings: dict[str, float] = {}
    if config.xla == "auto":
        biggest = calls(engine.buckets[-1])
        timings = engine.select_xla(biggest[1] if wrt else biggest[0])
    for rows in sorted({engine.buckets[0], engine.buckets[-1]}):
        for call in calls(rows):
            engine.run(call)
    return timings
