"""Shapley values and partial dependence in the SDK: typed options, feature groups, request
planning, result decoding, and the ``shap`` and ``partial_dependence`` methods of both clients.

The server evaluates the model (thousands of times per explained row) and does the maths; the SDK
sends the rows, the background and the options, and shapes the answer like the inputs. A
``shap`` call with many rows is sent in row chunks (``batch_size``), a few in flight at once, so
that each request stays within the message limit and a caller can follow the progress; the
coalitions and path points depend only on the seed, not on the chunking. ``Client`` and
``AsyncClient`` get the methods from the two mixins at the end, which differ only in I/O.

Features (``features=`` of ``shap``): by default every element of every input is a feature. Or:

- a list (or a dict by display name) of groups, each an input name (the whole input), a sequence
  of element indices of the single input (C order), or ``(input name, indices)``; the groups must
  cover every element once;
- an integer label map of the single input's examples, shaped like one example or like its
  leading axes (an image's ``(H, W)`` superpixels for ``(H, W, C)`` inputs): one group per label,
  labels 0..G-1.

With groups the answer is one array ``(batch, groups)`` in group order.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from gradserve import _codec, _names
from gradserve._exceptions import Internal, InvalidArgument, ResourceExhausted, from_grpc_error
from gradserve._models import Inputs, ModelInfo, PreparedInputs, mirror, prepare_inputs
from gradserve._options import Selection, Target
from gradserve._requests import MESSAGE_OVERHEAD_BYTES, ComputeResult, _selector, decode_response
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["SHAP_METHODS", "PDP_KINDS", "ShapOptions", "PartialDependenceOptions", "PartialDependenceResult",
           "ExplainCall", "feature_labels", "feature_refs", "plan_shap", "plan_partial_dependence",
           "ExplanationMethods", "AsyncExplanationMethods", "ProgressCallback"]

#: ``shap(method=...)`` -> wire ShapAlgorithm.
SHAP_METHODS = _names.SHAP_ALGORITHMS
#: ``partial_dependence(kind=...)`` -> wire PartialDependenceKind.
PDP_KINDS = _names.PDP_KINDS
#: Called with (explained rows done, rows in all) as row chunks come back.
ProgressCallback = Callable[[int, int], None]
#: Row chunks of one ``shap`` call in flight at once.
WINDOW = 4
#: The attribution name of feature groups' values (batch, groups).
GROUPS = "groups"


def _int(value: Any, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgument(f"{field}: must be an int of at least {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True, slots=True)
class ShapOptions:
    """``method`` ("exact", "kernel" or "gradient"), ``samples`` (None: the server's default;
    kernel: coalitions, gradient: path points per row), ``seed``, ``return_base``."""

    method: str = "kernel"
    samples: int | None = None
    seed: int | None = None
    return_base: bool = False

    def __post_init__(self) -> None:
        if self.method not in SHAP_METHODS:
            raise InvalidArgument(f"method: unknown Shapley method {self.method!r}; expected one of "
                                  f"{sorted(SHAP_METHODS)}")
        if self.samples is not None:
            _int(self.samples, "samples", minimum=1)
            if self.method == "exact":
                raise InvalidArgument("samples: the exact method evaluates every coalition; leave samples None")
        if self.seed is not None:
            _int(self.seed, "seed", minimum=0)


@dataclass(frozen=True, slots=True)
class PartialDependenceOptions:
    """One feature or two (``(input name or "", element index)``), custom grids (None: built from
    the rows), ``grid_resolution``, ``percentiles`` and which curves come back (``kind``)."""

    features: tuple[tuple[str, int], ...]
    grid: tuple[np.ndarray | None, ...] = ()
    grid_resolution: int = 20
    percentiles: tuple[float, float] = (0.05, 0.95)
    kind: str = "both"

    def __post_init__(self) -> None:
        if not 1 <= len(self.features) <= 2:
            raise InvalidArgument(f"feature: one feature or a pair, got {len(self.features)}")
        _int(self.grid_resolution, "grid_resolution", minimum=2)
        low, high = self.percentiles
        if not 0.0 <= low < high <= 1.0:
            raise InvalidArgument(f"percentiles: {self.percentiles!r}; expected (low, high) with 0 <= low < high <= 1")
        if self.kind not in PDP_KINDS:
            raise InvalidArgument(f"kind: expected one of {sorted(PDP_KINDS)}, got {self.kind!r}")


# -- features ------------------------------------------------------------------------------------------
def _example_shapes(prepared: PreparedInputs) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in prepared.arrays[name].shape[1:]) for name in prepared.order
            if name in prepared.arrays}


def feature_labels(features: Any, prepared: PreparedInputs) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per-input label maps (int32, shaped like one example) and the group names, from ``features``
    (see the module docstring)."""
    shapes = _example_shapes(prepared)
    if isinstance(features, np.ndarray):
        if len(shapes) != 1:
            raise InvalidArgument(f"features: a label map labels a single input; the model has {list(shapes)}")
        (name, shape), = shapes.items()
        if features.dtype.kind not in "iu":
            raise InvalidArgument(f"features: a label map holds integers, got {features.dtype}")
        lead = features.reshape(features.shape + (1,) * max(0, len(shape) - features.ndim))
        try:
            labels = np.broadcast_to(lead, shape)
        except ValueError:
            raise InvalidArgument(f"features: a label map of shape {list(features.shape)} does not fit one example "
                                  f"{list(shape)} of input {name!r}") from None
        count = int(labels.max()) + 1 if labels.size else 0
        return {name: np.ascontiguousarray(labels, np.int32)}, [f"group {g}" for g in range(count)]
    if isinstance(features, Mapping):
        items = [(str(k), v) for k, v in features.items()]
    elif isinstance(features, (list, tuple)):
        items = [("", v) for v in features]
    else:
        raise InvalidArgument("features: expected a list or dict of groups, or an integer label map (ndarray)")
    if not items:
        raise InvalidArgument("features: no groups")
    labels_of = {name: np.full(math.prod(shape), -1, np.int64) for name, shape in shapes.items()}
    names = []
    for g, (display, group) in enumerate(items):
        name, members = _group(group, shapes, f"features[{display!r}]" if display else f"features[{g}]")
        taken = labels_of[name][members]
        if (taken >= 0).any():
            element = int(members[np.flatnonzero(taken >= 0)[0]])
            raise InvalidArgument(f"features: element {element} of input {name!r} is in groups {int(taken.max())} "
                                  f"and {g}; each element belongs to one group")
        labels_of[name][members] = g
        names.append(display or (name if len(members) == labels_of[name].size and isinstance(group, str)
                                 else f"group {g}"))
    for name, labels in labels_of.items():
        missing = np.flatnonzero(labels < 0)
        if missing.size:
            raise InvalidArgument(f"features: elements {missing[:8].tolist()}{' ...' if missing.size > 8 else ''} of "
                                  f"input {name!r} are in no group; every element belongs to one group")
    return {name: labels.astype(np.int32).reshape(shapes[name]) for name, labels in labels_of.items()}, names


def _group(group: Any, shapes: Mapping[str, tuple[int, ...]], field: str) -> tuple[str, np.ndarray]:
    """One group: (input name, flat element indices)."""
    if isinstance(group, str):
        if group not in shapes:
            raise InvalidArgument(f"{field}: unknown input {group!r}; the model's inputs are {list(shapes)}")
        return group, np.arange(math.prod(shapes[group]), dtype=np.int64)
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], str):
        name, members = group
        if name not in shapes:
            raise InvalidArgument(f"{field}: unknown input {name!r}; the model's inputs are {list(shapes)}")
    else:
        if len(shapes) != 1:
            raise InvalidArgument(f"{field}: the model has several inputs {list(shapes)}; give (input name, indices)")
        name, members = next(iter(shapes)), group
    index = np.asarray(members).reshape(-1)
    size = math.prod(shapes[name])
    if index.size == 0 or index.dtype.kind not in "iu":
        raise InvalidArgument(f"{field}: expected element indices (ints), got {members!r:.80}")
    if index.min() < 0 or index.max() >= size:
        raise InvalidArgument(f"{field}: index {int(index.max() if index.max() >= size else index.min())} is out of "
                              f"range for input {name!r} with {size} elements per example")
    return name, index.astype(np.int64)


def feature_refs(feature: Any) -> tuple[tuple[str, int], ...]:
    """``feature=`` of ``partial_dependence`` as (input name or "", element index) pairs: an int,
    ``(input name, index)``, or a pair of either (a two-way surface)."""
    def one(f: Any) -> tuple[str, int]:
        if isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], str):
            return f[0], _int(f[1], "feature", minimum=0)
        return "", _int(f, "feature", minimum=0)

    if isinstance(feature, (list, tuple)) and not (len(feature) == 2 and isinstance(feature[0], str)):
        if not 1 <= len(feature) <= 2:
            raise InvalidArgument(f"feature: one feature or a pair, got {len(feature)}")
        return tuple(one(f) for f in feature)
    return (one(feature),)


def _grids(grid: Any, count: int) -> tuple[np.ndarray | None, ...]:
    if grid is None:
        return ()
    values = [grid] if count == 1 else list(grid)
    if len(values) != count:
        raise InvalidArgument(f"grid: one grid per feature ({count}), got {len(values)}")
    out: list[np.ndarray | None] = []
    for i, g in enumerate(values):
        if g is None:
            out.append(None)
            continue
        arr = np.asarray(g, np.float64)
        if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
            raise InvalidArgument(f"grid[{i}]: expected a non-empty 1-D array of finite numbers")
        out.append(arr)
    return tuple(out)


# -- planning ------------------------------------------------------------------------------------------
class ExplainCall:
    """One ``shap`` or ``partial_dependence`` call: its requests (row chunks of a ``shap`` call) and
    how their answers are put together."""

    def __init__(self, method: str, prepared: PreparedInputs, bounds: list[tuple[int, int]],
                 encode: Callable[[int, int], _pb2.ComputeRequest], finish: Callable[[list[ComputeResult]], Any]):
        self.method = method
        self.prepared = prepared
        self.bounds = bounds
        self._encode = encode
        self._finish = finish
        self.first = encode(*bounds[0])   # encoding errors before anything is sent

    @property
    def rows(self) -> int:
        return self.bounds[-1][1]

    def requests(self) -> Iterator[_pb2.ComputeRequest]:
        for i, (start, stop) in enumerate(self.bounds):
            yield self.first if i == 0 else self._encode(start, stop)

    def finish(self, results: list[ComputeResult]) -> Any:
        return self._finish(results)


def _rows(prepared: PreparedInputs, field: str) -> int:
    sizes = {a.shape[0] if a.ndim else -1 for a in prepared.arrays.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise InvalidArgument(f"{field}: every input needs the same batch dimension")
    rows = sizes.pop()
    if rows == 0:
        raise InvalidArgument(f"{field}: no rows")
    return int(rows)


def _row_bounds(rows: int, batch_size: int | None, request_row: int, response_row: int, fixed: int,
                max_message_bytes: int | None) -> list[tuple[int, int]]:
    per_request = rows if batch_size is None else batch_size
    if max_message_bytes is not None:
        budget = max_message_bytes - MESSAGE_OVERHEAD_BYTES - fixed
        per_row = max(request_row, response_row, 1)
        if budget < per_row:
            raise ResourceExhausted(f"background: {fixed} bytes of background and feature groups leave no room for a "
                                    f"row within max_message_bytes={max_message_bytes}; send fewer background rows")
        per_request = min(per_request, budget // per_row)
    return [(i, min(i + per_request, rows)) for i in range(0, rows, per_request)]


def plan_shap(info: ModelInfo | None, model: str, x: Inputs, background: Inputs, options: ShapOptions,
              selection: Selection, *, features: Any = None, version: int = 0, batch_size: int | None = None,
              max_message_bytes: int | None = None) -> ExplainCall:
    """Check a ``shap`` call against the model's metadata and plan its row-chunk requests."""
    specs = info.inputs if info is not None else ()
    prepared = prepare_inputs(x, specs)
    bg = prepare_inputs(background, specs, "background")
    rows = _rows(prepared, "inputs")
    _rows(bg, "background")
    labels, groups = feature_labels(features, prepared) if features is not None else ({}, [])
    if batch_size is not None:
        _int(batch_size, "batch_size", minimum=1)
    if selection.per_example and len(selection.target) != rows:
        raise InvalidArgument(f"target: {len(selection.target)} indices for a batch of {rows} examples")
    fixed = sum(a.nbytes for a in bg.arrays.values()) + sum(a.nbytes for a in labels.values())
    request_row = sum(a.nbytes // rows for a in prepared.arrays.values())
    values_per_row = len(groups) if labels else sum(a.size // rows for a in prepared.arrays.values())
    response_row = 8 * values_per_row + 16   # float64 values, the base and framing
    bounds = _row_bounds(rows, batch_size, request_row, response_row, fixed, max_message_bytes)
    whole = len(bounds) == 1

    def encode(start: int, stop: int) -> _pb2.ComputeRequest:
        req = _pb2.ComputeRequest(model=model, version=version, method=_pb2.METHOD_SHAP)
        _codec.encode_map(prepared.arrays if whole else {k: a[start:stop] for k, a in prepared.arrays.items()},
                          req.inputs, "inputs")
        _codec.encode_map(bg.arrays, req.background, "background")
        target = selection.target
        _selector(req.target, selection, target[start:stop] if selection.per_example and not whole else target)
        msg = req.shap
        msg.algorithm = SHAP_METHODS[options.method]  # type: ignore[assignment]
        if options.samples is not None:
            msg.samples = options.samples
        if options.seed is not None:
            msg.seed = options.seed
        msg.return_base = options.return_base
        _codec.encode_map(labels, msg.feature_groups, "features")
        return req

    def finish(results: list[ComputeResult]) -> Any:
        attributions = _concat([r.attributions for r in results])
        phi = attributions[GROUPS] if labels else mirror(attributions, prepared)
        if options.return_base:
            return phi, _concat([r.extras for r in results])["base"]
        return phi

    return ExplainCall("shap", prepared, bounds, encode, finish)


def _concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return dict(parts[0])
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def plan_partial_dependence(info: ModelInfo | None, model: str, background: Inputs, options: PartialDependenceOptions,
                            selection: Selection, *, version: int = 0) -> ExplainCall:
    """Check a ``partial_dependence`` call and build its request (one: the grid comes from every row)."""
    prepared = prepare_inputs(background, info.inputs if info is not None else (), "background")
    rows = _rows(prepared, "background")
    if selection.per_example and len(selection.target) != rows:
        raise InvalidArgument(f"target: {len(selection.target)} indices for {rows} background rows")

    def encode(start: int, stop: int) -> _pb2.ComputeRequest:
        req = _pb2.ComputeRequest(model=model, version=version, method=_pb2.METHOD_PARTIAL_DEPENDENCE)
        _codec.encode_map(prepared.arrays, req.inputs, "background")
        _selector(req.target, selection, selection.target)
        msg = req.partial_dependence
        for name, index in options.features:
            msg.features.add(input=name, index=index)
        for i, g in enumerate(options.grid):
            _codec.encode(np.zeros(0) if g is None else g, f"grid[{i}]", out=msg.grid.add())
        msg.grid_resolution = options.grid_resolution
        msg.lower_percentile, msg.upper_percentile = options.percentiles
        msg.kind = PDP_KINDS[options.kind]  # type: ignore[assignment]
        return req

    def finish(results: list[ComputeResult]) -> PartialDependenceResult:
        (result,) = results
        extras = result.extras
        grids = [extras[f"grid_values/{i}"] for i in range(len(options.features))]
        if any(g is None for g in grids):
            raise Internal("partial dependence: the answer has no grid")
        return PartialDependenceResult(grids, extras.get("average"), extras.get("individual"), options.features)

    return ExplainCall("partial_dependence", prepared, [(0, rows)], encode, finish)


class PartialDependenceResult(Mapping[str, Any]):
    """Partial dependence under scikit-learn's names: ``grid_values`` (one 1-D array per feature),
    ``average`` (shaped like the grid: ``(points,)``, or ``(points0, points1)`` for two features)
    and ``individual`` (the ICE curves: ``(rows, *grid shape)``), each present when ``kind`` asked
    for it; ``grid`` is the grid of a single feature (the list for two). Unlike scikit-learn's, the
    arrays have no leading output axis: ``target``/``output`` select one value per row.
    """

    def __init__(self, grid_values: list[np.ndarray], average: np.ndarray | None, individual: np.ndarray | None,
                 features: tuple[tuple[str, int], ...] = ()) -> None:
        self._values: dict[str, Any] = {"grid_values": grid_values,
                                        "grid": grid_values[0] if len(grid_values) == 1 else grid_values}
        if average is not None:
            self._values["average"] = average
        if individual is not None:
            self._values["individual"] = individual
        self.features = features

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def grid_values(self) -> list[np.ndarray]:
        return list(self._values["grid_values"])

    @property
    def grid(self) -> Any:
        return self._values["grid"]

    @property
    def average(self) -> np.ndarray:
        return np.asarray(self._values["average"])

    @property
    def individual(self) -> np.ndarray:
        return np.asarray(self._values["individual"])

    def __repr__(self) -> str:
        shapes = {k: list(np.shape(v)) for k, v in self._values.items() if k in ("average", "individual")}
        points = [len(g) for g in self.grid_values]
        return f"PartialDependenceResult(features={list(self.features)!r}, grid points={points}, {shapes})"


# -- the methods -----------------------------------------------------------------------------------------
class _Methods:
    """What the two mixins share; the client provides ``_gsa_transport`` (its channel and metadata),
    ``_info_for_call`` and its default timeout."""

    _max_message_bytes: int

    def _timeout_for(self, timeout: float | None) -> float | None:
        raise NotImplementedError

    @staticmethod
    def _plan_shap(info: ModelInfo | None, model: str, x: Inputs, background: Inputs, method: str,
                   samples: int | None, seed: int | None, target: Target, output: str | int | None,
                   transform: str | None, features: Any, return_base: bool, version: int,
                   batch_size: int | None, max_message_bytes: int) -> ExplainCall:
        return plan_shap(info, model, x, background, ShapOptions(method, samples, seed, bool(return_base)),
                         Selection(target, output, transform), features=features, version=version,
                         batch_size=batch_size, max_message_bytes=max_message_bytes)

    @staticmethod
    def _plan_pdp(info: ModelInfo | None, model: str, background: Inputs, feature: Any, grid: Any,
                  grid_resolution: int, percentiles: Sequence[float], kind: str, target: Target,
                  output: str | int | None, transform: str | None, version: int) -> ExplainCall:
        refs = feature_refs(feature)
        low, high = (float(p) for p in percentiles)
        options = PartialDependenceOptions(refs, _grids(grid, len(refs)), grid_resolution, (low, high), kind)
        return plan_partial_dependence(info, model, background, options, Selection(target, output, transform),
                                       version=version)


_COMPUTE = "/gradserve.v1.SensitivityService/Compute"


def _serialize(request: _pb2.ComputeRequest) -> bytes:
    return bytes(request.SerializeToString())


class ExplanationMethods(_Methods):
    """``shap`` and ``partial_dependence`` for the blocking ``Client``."""

    def _gsa_transport(self) -> tuple[grpc.Channel, Any]:
        raise NotImplementedError

    def _info_for_call(self, model: str, timeout: float | None) -> tuple[ModelInfo | None, float | None]:
        raise NotImplementedError

    def _explain(self, call: ExplainCall, timeout: float | None, progress: ProgressCallback | None) -> Any:
        channel, metadata = self._gsa_transport()
        rpc = channel.unary_unary(_COMPUTE, request_serializer=_serialize, response_deserializer=None)
        timeout = self._timeout_for(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[ComputeResult] = []
        in_flight: deque[Any] = deque()
        done = 0
        try:
            for request in call.requests():
                in_flight.append(rpc.future(request, timeout=_left(deadline), metadata=metadata or None))
                if len(in_flight) >= WINDOW:
                    done = _add(results, in_flight.popleft().result(), call, done, progress)
            while in_flight:
                done = _add(results, in_flight.popleft().result(), call, done, progress)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            for future in in_flight:
                future.cancel()
        return call.finish(results)

    def shap(self, model: str, x: Inputs, *, background: Inputs, method: str = "kernel", samples: int | None = None,
             seed: int | None = None, target: Target = None, output: str | int | None = None,
             transform: str | None = None, features: Any = None, return_base: bool = False,
             batch_size: int | None = None, version: int = 0, timeout: float | None = None,
             progress: ProgressCallback | None = None) -> Any:
        """Shapley values of the target with respect to ``background`` rows, shaped like ``x``.

        Interventional Shapley values: the value of a coalition S of features for a row x is the
        mean over the background rows b of f(x on S, b elsewhere). ``method``: "exact" (every
        coalition; refused past the server's limit on 2^M x background rows), "kernel" (Kernel
        SHAP over ``samples`` coalitions, 2M + 2048 by default, every coalition when that covers
        them) or "gradient" (expected gradients at ``samples`` points per row, 200 rounded up to a
        multiple of the background rows by default). ``features``: None (one per element), or
        groups (see ``gradserve._explain``), answered as one array ``(batch, groups)``.
        ``target``/``output``/``transform`` pick the explained value as for ``gradient``. With
        ``return_base`` returns ``(values, base)``, base = E[f(background)] per row, so that the
        values of a row sum to f(x) - base (exactly for "exact" and "kernel"). Values are float64.
        ``batch_size``: explained rows per request (None: as many as fit one message);
        ``progress(done, total)`` is called as row chunks come back.
        """
        info, timeout = self._info_for_call(model, timeout)
        call = self._plan_shap(info, model, x, background, method, samples, seed, target, output, transform,
                               features, return_base, version, batch_size, self._max_message_bytes)
        return self._explain(call, timeout, progress)

    def partial_dependence(self, model: str, background: Inputs, *, feature: Any, grid: Any = None,
                           grid_resolution: int = 20, percentiles: Sequence[float] = (0.05, 0.95),
                           kind: str = "both", target: Target = None, output: str | int | None = None,
                           transform: str | None = None, version: int = 0,
                           timeout: float | None = None) -> PartialDependenceResult:
        """Partial dependence and ICE curves of the target over a grid of ``feature``.

        ``background``: the rows the curves are drawn for (scikit-learn's X), like a model's
        inputs. ``feature``: an element index of the single input, ``(input name, index)``, or a
        pair of them (a two-way surface). ``grid``: the values (a 1-D array; with two features a
        pair of them, None for one built from the rows); None builds it as scikit-learn does: the
        unique values if fewer than ``grid_resolution``, else that many points evenly spaced
        between the ``percentiles`` of the rows' values. ``kind``: "average", "individual" or
        "both". Returns a ``PartialDependenceResult`` (``grid_values``/``grid``, ``average``,
        ``individual``).
        """
        info, timeout = self._info_for_call(model, timeout)
        call = self._plan_pdp(info, model, background, feature, grid, grid_resolution, percentiles, kind, target,
                              output, transform, version)
        result: PartialDependenceResult = self._explain(call, timeout, None)
        return result



class AsyncExplanationMethods(_Methods):
    """``shap`` and ``partial_dependence`` as coroutines, for ``AsyncClient``."""

    def _gsa_transport(self) -> tuple[grpc.aio.Channel, Any]:
        raise NotImplementedError

    async def _info_for_call(self, model: str, timeout: float | None) -> tuple[ModelInfo | None, float | None]:
        raise NotImplementedError

    async def _explain(self, call: ExplainCall, timeout: float | None, progress: ProgressCallback | None) -> Any:
        channel, metadata = self._gsa_transport()
        rpc = channel.unary_unary(_COMPUTE, request_serializer=_serialize, response_deserializer=None)
        timeout = self._timeout_for(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[ComputeResult] = []
        in_flight: deque[Any] = deque()
        done = 0
        try:
            for request in call.requests():
                in_flight.append(asyncio.ensure_future(rpc(request, timeout=_left(deadline),
                                                           metadata=metadata or None)))
                if len(in_flight) >= WINDOW:
                    done = _add(results, await in_flight.popleft(), call, done, progress)
            while in_flight:
                done = _add(results, await in_flight.popleft(), call, done, progress)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            for task in in_flight:
                task.cancel()
        return call.finish(results)

    async def shap(self, model: str, x: Inputs, *, background: Inputs, method: str = "kernel",
                   samples: int | None = None, seed: int | None = None, target: Target = None,
                   output: str | int | None = None, transform: str | None = None, features: Any = None,
                   return_base: bool = False, batch_size: int | None = None, version: int = 0,
                   timeout: float | None = None, progress: ProgressCallback | None = None) -> Any:
        """The coroutine of [`Client.shap`][gradserve.Client.shap]."""
        info, timeout = await self._info_for_call(model, timeout)
        call = self._plan_shap(info, model, x, background, method, samples, seed, target, output, transform,
                               features, return_base, version, batch_size, self._max_message_bytes)
        return await self._explain(call, timeout, progress)

    async def partial_dependence(self, model: str, background: Inputs, *, feature: Any, grid: Any = None,
                                 grid_resolution: int = 20, percentiles: Sequence[float] = (0.05, 0.95),
                                 kind: str = "both", target: Target = None, output: str | int | None = None,
                                 transform: str | None = None, version: int = 0,
                                 timeout: float | None = None) -> PartialDependenceResult:
        """The coroutine of [`Client.partial_dependence`][gradserve.Client.partial_dependence]."""
        info, timeout = await self._info_for_call(model, timeout)
        call = self._plan_pdp(info, model, background, feature, grid, grid_resolution, percentiles, kind, target,
                              output, transform, version)
        result: PartialDependenceResult = await self._explain(call, timeout, None)
        return result


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _add(results: list[ComputeResult], response: bytes, call: ExplainCall, done: int,
         progress: ProgressCallback | None) -> int:
    result = decode_response(response)
    results.append(result)
    start, stop = call.bounds[len(results) - 1]
    done += stop - start
    if progress is not None:
        progress(done, call.rows)
    return done
