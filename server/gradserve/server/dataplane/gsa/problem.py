"""What an analysis asks for, checked against the model and the limits before any sampling.

``check`` turns a neutral ``core.requests.AnalysisRequest`` into an ``Analysis``: the factors (which input element each
one is, its distribution), the analysed output, the method's options and the number of model
evaluations it will take. Everything a caller can get wrong is refused here, with the field that
was wrong: a bad problem is INVALID_ARGUMENT, an unknown input or output NOT_FOUND, and a DGSM
factor on an input that cannot be differentiated FAILED_PRECONDITION.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradserve.server.config import Limits
from gradserve.server.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from gradserve.server.core.models import TensorSpec
from gradserve.server.core.requests import AnalysisRequest
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["Factor", "Analysis", "check", "evaluations_for", "elements", "memory_for", "METHODS", "DISTRIBUTIONS",
           "SLICE_ELEMENTS", "CHUNK_ELEMENTS", "OVERHEAD_BYTES", "Z_REACH"]

#: The analyses.
METHODS = ("sobol", "dgsm", "morris")
#: SALib's distribution name -> number of parameters.
DISTRIBUTIONS = {"unif": 2, "norm": 2, "lognorm": 2, "triang": 3}
DEFAULT_CONF_LEVEL = 0.95
DEFAULT_RESAMPLES = 100
MAX_RESAMPLES = 10_000
DEFAULT_LEVELS = 4
MAX_LEVELS = 1024
#: Elements of one working array of the sampling and the analysis: every loop over samples,
#: resamples or factor pairs goes in slices of about this size, and checks the call's deadline
#: and cancellation between them.
SLICE_ELEMENTS = 1 << 20
#: Input elements per evaluation chunk (``evaluate``).
CHUNK_ELEMENTS = 1 << 20
#: Bytes of an analysis that NumPy does not allocate (the engine's buffers of a chunk, the
#: allocator's slack): measured as the server's RSS growth beyond what tracemalloc sees, 50-70 MiB.
OVERHEAD_BYTES = 64 << 20
#: Standard deviations from the mean that a sample of a normal (or lognormal) factor can reach,
#: at most: the inverse CDF at 2^-64 is -9.3 (scipy's Sobol' points have 30 bits, and a point at 0
#: is taken at 2^-31, ``sampling.UNIT_FLOOR``: 6.1).
Z_REACH = 9.5
#: Largest argument of exp() that stays finite in float64.
_LOG_MAX = math.log(np.finfo(np.float64).max)


@dataclass(frozen=True)
class Factor:
    """One varied input element."""

    name: str
    #: Model input and the element's position in one example of it (C order).
    input: str
    index: int
    #: SALib's distribution name ("unif", "norm", "lognorm", "triang") and its parameters.
    dist: str
    params: tuple[float, ...]


@dataclass(frozen=True)
class Analysis:
    """A checked ``AnalysisRequest``."""

    method: str
    factors: tuple[Factor, ...]
    #: Shapes of one example of each input (the factors fill every element of each).
    inputs: dict[str, TensorSpec]
    output: str
    #: Index into the output's last axis; None: the sum of the output per example.
    element: int | None
    samples: int
    seed: int | None
    conf_level: float
    resamples: int
    second_order: bool
    levels: int
    #: Rows of the sample matrix: model evaluations (gradient evaluations for DGSM).
    evaluations: int
    #: Bytes the analysis holds at its peak, estimated up front (``memory_for``).
    nbytes: int = 0

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.factors]

    @property
    def dimension(self) -> int:
        return len(self.factors)

    def salib_problem(self) -> dict[str, Any]:
        """The problem as SALib describes it (its ``bounds`` are the distribution parameters)."""
        return {"num_vars": self.dimension, "names": self.names, "bounds": [list(f.params) for f in self.factors],
                "dists": [f.dist for f in self.factors]}

    def to_inputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of the sample matrix (n, D) as model inputs in the model's dtypes.

        Integer inputs get the nearest integer of each sample (Sobol' and Morris only; DGSM
        refuses them).
        """
        out: dict[str, np.ndarray] = {}
        for name, spec in self.inputs.items():
            out[name] = np.empty((x.shape[0], elements(spec)), dtype=np.float64)
        for j, f in enumerate(self.factors):
            out[f.input][:, f.index] = x[:, j]
        result = {}
        for name, flat in out.items():
            spec = self.inputs[name]
            if spec.dtype.kind in "iub":
                flat = np.rint(flat)
            shape = (x.shape[0],) + tuple(1 if d is None else int(d) for d in spec.shape[1:])
            result[name] = flat.astype(spec.dtype).reshape(shape)
        return result


def elements(spec: TensorSpec) -> int:
    """Elements of one example of an input (its shape beyond the batch, known by then)."""
    return math.prod(1 if d is None else int(d) for d in spec.shape[1:])


def evaluations_for(method: str, samples: int, dimension: int, second_order: bool = False) -> int:
    """Model evaluations an analysis takes (the rows of its sample matrix)."""
    if method == "sobol":
        return samples * (2 * dimension + 2 if second_order else dimension + 2)
    if method == "morris":
        return samples * (dimension + 1)
    return samples


def memory_for(method: str, samples: int, dimension: int, resamples: int, second_order: bool = False) -> int:
    """Bytes an analysis holds at its peak, as the modules here allocate them.

    What grows with the problem: the outputs (8 bytes per evaluation) and the Sobol' normalised
    outputs and their A/B/AB/BA columns, the Sobol' base points (N x 2D) and bootstrap index
    matrix (N x resamples, int32) and bootstrap values (2 x D x resamples), Morris's sample matrix
    (evaluations x D, which its analysis needs) and elementary effects (N x D), DGSM's
    gradients (N x D) and its bootstrap's counts (a few x N). What does not: the working arrays
    of one slice of sampling, evaluation or analysis (about ``SLICE_ELEMENTS`` or
    ``CHUNK_ELEMENTS`` elements each, a dozen of them at once), or fewer when the problem is
    smaller than a slice. And what is not NumPy's: the engine's buffers of one chunk, the
    allocator's slack (``OVERHEAD_BYTES``, measured).
    """
    n, d, r = samples, dimension, resamples
    evaluations = evaluations_for(method, n, d, second_order)
    f8 = 8
    held = OVERHEAD_BYTES + evaluations * f8  # the outputs
    chunk_rows = max(1, min(evaluations, CHUNK_ELEMENTS // max(1, d)))
    working = 12 * f8 * max(chunk_rows * d, 1)  # one evaluation chunk: rows, cross-sampling, inputs, outputs
    if method == "sobol":
        held += 3 * evaluations * f8 + n * 2 * d * f8 + n * r * 4 + 2 * d * r * f8
        # The slices of the bootstrap are at least two resamples wide (see analysis.sobol_indices);
        # second order: blocks of pairs x resamples x N of about a slice, four arrays of them.
        working = max(working, 12 * f8 * max(min(n * r, SLICE_ELEMENTS), 2 * n))
        if second_order:
            working = max(working, 4 * f8 * min(max(SLICE_ELEMENTS, 2 * n), n * r * (d - 1)))
    elif method == "morris":
        held += evaluations * d * f8 + n * d * f8
        working = max(working, 8 * f8 * min(max(n, SLICE_ELEMENTS), evaluations * d))
    else:
        held += n * d * f8 + 5 * n * f8
        working = max(working, 4 * f8 * min(SLICE_ELEMENTS, n * d))
    return int(held + working)


def _input_spec(model: ModelFunction, name: str, field: str) -> TensorSpec:
    names = [s.name for s in model.inputs]
    if not name:
        if len(names) != 1:
            raise InvalidArgumentError(f"{field}: the model has several inputs {names}; name the input of "
                                       "every factor (bounds as a dict by input name)")
        name = names[0]
    if name not in names:
        raise NotFoundError(f"{field}: unknown input {name[:128]!r}; the model's inputs are {names}")
    spec = model.input(name)
    if any(d is None for d in spec.shape[1:]):
        raise InvalidArgumentError(f"{field}: input {name!r} has free dimensions {list(spec.shape)} beyond the "
                                   "batch; global sensitivity needs a fixed number of elements per example")
    return spec


def _check_params(dist: str, params: tuple[float, ...], count: int, field: str) -> None:
    if len(params) != count:
        raise InvalidArgumentError(f"{field}.params: {dist!r} takes {count} parameters, got {len(params)}")
    if not all(math.isfinite(p) for p in params):
        raise InvalidArgumentError(f"{field}.params: {list(params)} must be finite")
    if dist in ("unif", "triang") and not params[0] < params[1]:
        raise InvalidArgumentError(f"{field}.params: bounds [{params[0]:g}, {params[1]:g}] need low < high")
    if dist in ("norm", "lognorm") and not params[1] > 0:
        raise InvalidArgumentError(f"{field}.params: the standard deviation {params[1]:g} must be > 0")
    if dist == "triang" and not 0 <= params[2] < 1:
        raise InvalidArgumentError(f"{field}.params: the peak {params[2]:g} is a fraction of the range, in [0, 1)")


def _sample_range(dist: str, params: tuple[float, ...]) -> tuple[float, float]:
    """The least and greatest value a sample of the factor can take (inf where float64 overflows)."""
    if dist in ("unif", "triang"):
        return params[0], params[1]
    reach = params[0] + Z_REACH * params[1]
    if dist == "norm":
        return params[0] - Z_REACH * params[1], reach
    return 0.0, math.exp(reach) if reach < _LOG_MAX else math.inf


def _check_range(dist: str, params: tuple[float, ...], spec: TensorSpec, field: str) -> None:
    """Refuse a factor whose samples (or the arithmetic on them) would overflow: a range wider
    than float64 holds, samples beyond float64, or beyond what the input's dtype holds."""
    if dist in ("unif", "triang") and not math.isfinite(params[1] - params[0]):
        raise InvalidArgumentError(f"{field}.params: the range [{params[0]:g}, {params[1]:g}] is wider than float64 "
                                   "holds (high - low overflows)")
    low, high = _sample_range(dist, params)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidArgumentError(f"{field}.params: {dist} {list(params)} reaches values beyond float64 within "
                                   f"{Z_REACH:g} standard deviations")
    dtype = spec.dtype
    if dtype.kind == "f":
        limit, reach = float(np.finfo(dtype).max), max(abs(low), abs(high))
        if reach > limit:
            raise InvalidArgumentError(f"{field}.params: samples of {dist} {list(params)} reach {reach:g}, beyond the "
                                       f"range of input {spec.name!r} ({dtype}, up to {limit:g})")
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        if low < int(info.min) or high > int(info.max):
            raise InvalidArgumentError(f"{field}.params: samples of {dist} {list(params)} reach beyond the range of "
                                       f"input {spec.name!r} ({dtype}, [{info.min}, {info.max}])")


def _factors(req: AnalysisRequest, model: ModelFunction, method: str,
             limits: Limits) -> tuple[tuple[Factor, ...], dict[str, TensorSpec]]:
    if not req.factors:
        raise InvalidArgumentError("factors: at least one factor is needed (bounds or problem)")
    if len(req.factors) > limits.max_gsa_dimension:
        raise InvalidArgumentError(f"factors: {len(req.factors)} factors, more than max_gsa_dimension="
                                   f"{limits.max_gsa_dimension}")
    factors: list[Factor] = []
    inputs: dict[str, TensorSpec] = {}
    taken: dict[tuple[str, int], int] = {}
    for i, f in enumerate(req.factors):
        field = f"factors[{i}]"
        spec = _input_spec(model, f.input, f"{field}.input")
        inputs[spec.name] = spec
        size = elements(spec)
        if not 0 <= f.index < size:
            raise InvalidArgumentError(f"{field}.index: {f.index} is out of range; input {spec.name!r} has {size} "
                                       "elements per example")
        if (spec.name, f.index) in taken:
            raise InvalidArgumentError(f"{field}: element {f.index} of input {spec.name!r} is already "
                                       f"factors[{taken[spec.name, f.index]}]")
        taken[spec.name, f.index] = i
        dist = f.distribution
        if dist not in DISTRIBUTIONS:
            raise InvalidArgumentError(f"{field}.distribution: unknown distribution {dist[:32]!r}; expected one of "
                                       f"{list(DISTRIBUTIONS)}")
        count = DISTRIBUTIONS[dist]
        if method != "sobol" and dist != "unif":
            raise InvalidArgumentError(f"{field}.distribution: {method} takes uniform factors only (bounds); "
                                       f"{dist!r} is for sobol")
        params = tuple(float(p) for p in f.params)
        _check_params(dist, params, count, field)
        _check_range(dist, params, spec, field)
        if method == "dgsm" and not spec.differentiable:
            raise FailedPreconditionError(f"{field}.input: input {spec.name!r} is {spec.dtype}, which cannot be "
                                          "differentiated; DGSM needs floating-point inputs")
        name = f.name or (f"{spec.name}[{f.index}]" if size > 1 or len(model.inputs) > 1 else spec.name)
        factors.append(Factor(name[:256], spec.name, int(f.index), dist, params))
    for spec in model.inputs:
        if spec.name not in inputs:
            raise InvalidArgumentError(f"factors: the model's input {spec.name!r} has no factors; every input "
                                       "must be covered")
        size = elements(spec)
        missing = [k for k in range(size) if (spec.name, k) not in taken]
        if missing:
            raise InvalidArgumentError(f"factors: elements {missing[:8]} of input {spec.name!r} have no factor; "
                                       f"it has {size} elements per example and each needs one")
    return tuple(factors), {s.name: inputs[s.name] for s in model.inputs}


def _output(req: AnalysisRequest, model: ModelFunction) -> tuple[str, int | None]:
    names = [s.name for s in model.outputs]
    if isinstance(req.output, str) and req.output:
        if req.output not in names:
            raise NotFoundError(f"output_name: unknown output {req.output[:128]!r}; the model's outputs are "
                                f"{names}")
        spec = model.output(req.output)
    else:
        index = int(req.output or 0)
        if not 0 <= index < len(names):
            raise NotFoundError(f"output_index: {index} is out of range; the model's outputs are {names}")
        spec = model.outputs[index]
    if req.output_element is None:
        return spec.name, None
    if len(spec.shape) < 2:
        raise InvalidArgumentError(f"output_element: output {spec.name!r} has one value per example; leave "
                                   "output_element unset")
    last = spec.shape[-1]
    element = int(req.output_element)
    if last is not None:
        if not -last <= element < last:
            raise InvalidArgumentError(f"output_element: {element} is out of range for output {spec.name!r} of "
                                       f"shape {list(spec.shape)}")
        element %= last
    elif element < 0:
        raise InvalidArgumentError(f"output_element: {element} counts from the end of a free dimension")
    return spec.name, element


def check(req: AnalysisRequest, model: ModelFunction, limits: Limits) -> Analysis:
    """Check ``req`` against ``model`` and ``limits``."""
    method = req.method
    if method not in METHODS:
        raise InvalidArgumentError(f"method: {method[:32]!r} is not an analysis; use sobol, dgsm or morris")
    factors, inputs = _factors(req, model, method, limits)
    output, element = _output(req, model)
    if req.samples <= 0:
        raise InvalidArgumentError(f"samples: {req.samples} must be positive")
    conf = req.conf_level or DEFAULT_CONF_LEVEL
    if not 0 < conf < 1:
        raise InvalidArgumentError(f"conf_level: {conf:g} must be in (0, 1)")
    resamples = req.resamples or DEFAULT_RESAMPLES
    if not 2 <= resamples <= MAX_RESAMPLES:
        raise InvalidArgumentError(f"resamples: {resamples} must be in [2, {MAX_RESAMPLES}]")
    levels = req.levels or DEFAULT_LEVELS
    if method == "morris" and (levels < 2 or levels % 2 or levels > MAX_LEVELS):
        raise InvalidArgumentError(f"morris.levels: {levels} must be even, in [2, {MAX_LEVELS}]")
    if method == "morris" and req.samples < 2:
        raise InvalidArgumentError("samples: Morris needs at least 2 trajectories")
    second_order = req.second_order and method == "sobol"
    if second_order and len(factors) < 2:
        raise InvalidArgumentError("sobol.second_order: needs at least two factors")
    evaluations = evaluations_for(method, int(req.samples), len(factors), second_order)
    if evaluations > limits.max_gsa_evaluations:
        raise InvalidArgumentError(f"samples: {req.samples} samples of {len(factors)} factors take {evaluations} "
                                   f"model evaluations, more than max_gsa_evaluations={limits.max_gsa_evaluations}")
    # What grows with the problem is bounded: Morris's sample matrix, DGSM's gradients and the
    # bootstrap's index matrix are held whole (``memory_for``).
    if evaluations * len(factors) > limits.max_elements or int(req.samples) * resamples > limits.max_elements:
        raise InvalidArgumentError(f"samples: {evaluations} evaluations of {len(factors)} factors with {resamples} "
                                   f"resamples exceed max_elements={limits.max_elements}")
    return Analysis(method, factors, inputs, output, element, int(req.samples),
                    req.seed, float(conf), int(resamples), second_order,
                    int(levels), evaluations,
                    memory_for(method, int(req.samples), len(factors), int(resamples), second_order))
