"""What a Shapley-value or partial-dependence request asks for, checked against the model and the
limits before any evaluation.

Everything a caller can get wrong is refused here with the field that was wrong: the rows and
the background like a request's inputs (INVALID_ARGUMENT, NOT_FOUND for an unknown input), the
options, features and groups (INVALID_ARGUMENT), the work a request would take against
``max_explain_evaluations``, ``max_exact_shap_evaluations`` and ``max_shap_features``
(INVALID_ARGUMENT, naming the limit), answers that could not fit a message
(RESOURCE_EXHAUSTED), and gradients of integer inputs (FAILED_PRECONDITION).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradserve.server.config import Limits
from gradserve.server.core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from gradserve.server.core.explain import FeatureIndex, PartialDependenceOptions, ShapOptions
from gradserve.server.core.requests import ComputeRequest
from gradserve.server.core.spec import TargetSpec
from gradserve.server.dataplane.explain import coalitions, paths
from gradserve.server.dataplane.explain.evaluate import ALGORITHMS, Batch, PartialDependenceProblem, ShapProblem
from gradserve.server.dataplane.explain.features import Features
from gradserve.server.dataplane.explain.grid import axis_values
from gradserve.server.dataplane.explain.targets import Target
from gradserve.server.dataplane.validation import check_inputs, check_target
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["CheckedShap", "CheckedPartialDependence", "shap_problem", "partial_dependence_problem",
           "DEFAULT_GRID_RESOLUTION", "DEFAULT_PERCENTILES", "KINDS"]

DEFAULT_GRID_RESOLUTION = 20
DEFAULT_PERCENTILES = (0.05, 0.95)
#: Which curves partial dependence returns.
KINDS = ("average", "individual", "both")
#: Bytes of a response kept free for everything but the ICE curves.
_RESPONSE_OVERHEAD = 64 * 1024


@dataclass(frozen=True, eq=False)
class CheckedShap:
    """A checked Shapley-value request: the problem and the explained output head."""

    problem: ShapProblem
    target: TargetSpec


@dataclass(frozen=True, eq=False)
class CheckedPartialDependence:
    """A checked partial-dependence request: the problem, the output head and the curves asked for."""

    problem: PartialDependenceProblem
    target: TargetSpec
    kind: str


def _target(spec: TargetSpec, method: str) -> Target:
    if spec.use_logits:
        raise InvalidArgumentError(f"target.use_logits: {method} evaluates the model's outputs; explain the logits "
                                   "with a model that outputs them, or pick a transform")
    return Target(spec.kind, spec.transform, spec.indices)


def _fresh_seed() -> int:
    return int(np.random.default_rng().integers(1 << 62))


def _sizes(inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {name: math.prod(arr.shape[1:]) for name, arr in inputs.items()}


def _features(options: ShapOptions, inputs: Mapping[str, np.ndarray]) -> Features:
    sizes = _sizes(inputs)
    if not options.feature_groups:
        return Features.per_element(sizes)
    for name, labels in options.feature_groups.items():
        if name in inputs and labels.shape not in ((sizes[name],), inputs[name].shape[1:]):
            raise InvalidArgumentError(f"shap.feature_groups[{name!r}]: {labels.size} labels for {sizes[name]} "
                                       f"elements per example (shape {list(labels.shape)}; one example of the input "
                                       f"is {list(inputs[name].shape[1:])})")
    return Features.from_labels(options.feature_groups, sizes, "shap.feature_groups")


def shap_problem(request: ComputeRequest, model: ModelFunction, limits: Limits) -> CheckedShap:
    """The checked ``ShapProblem`` of a request (see the module docstring)."""
    options = request.options if isinstance(request.options, ShapOptions) else ShapOptions()
    if options.algorithm not in ALGORITHMS:
        raise InvalidArgumentError(f"shap.algorithm: expected one of {list(ALGORITHMS)}, got {options.algorithm!r}")
    inputs, rows = check_inputs(request.inputs, model, limits)
    background, background_rows = check_inputs(request.background, model, limits, "background")
    spec = check_target(request.target, model, rows)
    target = _target(spec, "shap")
    features = _features(options, inputs)
    m = features.count
    samples = int(options.samples)
    if samples < 0:
        raise InvalidArgumentError(f"shap.samples: {samples} is not a positive number (0: the default)")
    if options.algorithm == "gradient":
        for s in model.inputs:
            if not s.differentiable:
                raise FailedPreconditionError(f"shap: input {s.name!r} has dtype {s.dtype.name} and cannot be "
                                              "differentiated; the gradient algorithm needs floating inputs (the "
                                              "exact and kernel algorithms take any)")
        samples = samples or paths.default_samples(background_rows)
    else:
        if m > limits.max_shap_features:
            raise InvalidArgumentError(f"shap: {m} features, more than max_shap_features={limits.max_shap_features};"
                                       " group them (feature_groups)")
        if options.algorithm == "exact":
            if samples:
                raise InvalidArgumentError(f"shap.samples: {samples}, but the exact algorithm evaluates every "
                                           "coalition; leave samples unset (0)")
            per_row = (1 << m) * background_rows
            if per_row > limits.max_exact_shap_evaluations:
                raise InvalidArgumentError(
                    f"shap: exact values of {m} features take 2^{m} coalitions x {background_rows} background rows "
                    f"= {per_row} evaluations per row, more than max_exact_shap_evaluations="
                    f"{limits.max_exact_shap_evaluations}; use the kernel algorithm, feature groups or fewer "
                    "background rows")
        else:
            samples = samples or coalitions.default_samples(m)
    problem = ShapProblem(Batch.of(inputs), Batch.of(background), features, target, options.algorithm, samples,
                          _fresh_seed() if options.seed is None else int(options.seed), options.return_base)
    _within(problem.evaluations, limits, "shap", f"{rows} rows")
    return CheckedShap(problem, spec)


def _within(evaluations: int, limits: Limits, method: str, what: str) -> None:
    if evaluations > limits.max_explain_evaluations:
        raise InvalidArgumentError(f"{method}: {what} take {evaluations} model evaluations, more than "
                                   f"max_explain_evaluations={limits.max_explain_evaluations}; send fewer rows at "
                                   "a time (or fewer samples, background rows or grid points)")


def _feature(ref: FeatureIndex, i: int, inputs: Mapping[str, np.ndarray]) -> tuple[str, int]:
    field = f"partial_dependence.features[{i}]"
    names = list(inputs)
    name = ref.input
    if not name:
        if len(names) != 1:
            raise InvalidArgumentError(f"{field}.input: the model has several inputs {names}; name the input")
        name = names[0]
    if name not in inputs:
        raise NotFoundError(f"{field}.input: unknown input {name[:128]!r}; the model's inputs are {names}")
    size = math.prod(inputs[name].shape[1:])
    if not 0 <= ref.index < size:
        raise InvalidArgumentError(f"{field}.index: {ref.index} is out of range for input {name!r} with {size} "
                                   "elements per example")
    return name, int(ref.index)


def _axis(options: PartialDependenceOptions, f: int, column: np.ndarray, integer: bool, resolution: int,
          percentiles: tuple[float, float]) -> np.ndarray:
    given = options.grids[f] if f < len(options.grids) else None
    if given is None or given.size == 0:
        return axis_values(column, percentiles, resolution, integer=integer, field="partial_dependence")
    field = f"partial_dependence.grid[{f}]"
    values = np.asarray(given)
    if values.ndim != 1 or values.dtype.kind not in "iuf" or not np.isfinite(values).all():
        raise InvalidArgumentError(f"{field}: expected a 1-D array of finite numbers, got {values.dtype.name} "
                                   f"{list(values.shape)}")
    values = values.astype(np.float64)
    if integer and not np.array_equal(values, np.rint(values)):
        raise InvalidArgumentError(f"{field}: the feature is an integer input; give integer grid values")
    return values


def partial_dependence_problem(request: ComputeRequest, model: ModelFunction,
                               limits: Limits) -> CheckedPartialDependence:
    """The checked ``PartialDependenceProblem`` of a request (see the module docstring)."""
    options = (request.options if isinstance(request.options, PartialDependenceOptions)
               else PartialDependenceOptions())
    if not 1 <= len(options.features) <= 2:
        raise InvalidArgumentError(f"partial_dependence.features: one feature or two (a surface), got "
                                   f"{len(options.features)}")
    if options.kind not in KINDS:
        raise InvalidArgumentError(f"partial_dependence.kind: expected one of {list(KINDS)}, got {options.kind!r}")
    if options.grids and len(options.grids) != len(options.features):
        raise InvalidArgumentError(f"partial_dependence.grid: {len(options.grids)} grids for "
                                   f"{len(options.features)} features; give one per feature (empty: built)")
    resolution = int(options.grid_resolution) or DEFAULT_GRID_RESOLUTION
    if resolution < 2:
        raise InvalidArgumentError(f"partial_dependence.grid_resolution: {resolution} is below 2 (0: the default, "
                                   f"{DEFAULT_GRID_RESOLUTION})")
    low = DEFAULT_PERCENTILES[0] if options.lower_percentile is None else float(options.lower_percentile)
    high = DEFAULT_PERCENTILES[1] if options.upper_percentile is None else float(options.upper_percentile)
    if not 0.0 <= low < high <= 1.0:
        raise InvalidArgumentError(f"partial_dependence.percentiles: [{low:g}, {high:g}]; need 0 <= lower < upper "
                                   "<= 1")
    inputs, rows = check_inputs(request.inputs, model, limits)
    spec = check_target(request.target, model, rows)
    target = _target(spec, "partial_dependence")
    features = tuple(_feature(ref, i, inputs) for i, ref in enumerate(options.features))
    if len(set(features)) != len(features):
        raise InvalidArgumentError(f"partial_dependence.features: {features[0]} is given twice")
    x = Batch.of(inputs)
    axes = tuple(_axis(options, f, x.arrays[name][:, index], x.arrays[name].dtype.kind in "iub", resolution,
                       (low, high)) for f, (name, index) in enumerate(features))
    problem = PartialDependenceProblem(x, features, axes, target)
    _within(problem.evaluations, limits, "partial_dependence", f"{rows} rows x {problem.points} grid points")
    if options.kind != "average":
        size = 8 * rows * problem.points
        if size > limits.max_message_bytes - _RESPONSE_OVERHEAD:
            raise ResourceExhaustedError(f"partial_dependence: the ICE curves ({rows} rows x {problem.points} grid "
                                         f"points) take {size} bytes, more than max_message_bytes="
                                         f"{limits.max_message_bytes} allows; ask for kind 'average' or send fewer "
                                         "rows")
    return CheckedPartialDependence(problem, spec, options.kind)
