"""Builds ComputeRequests from SDK arguments and turns ComputeResponses back into NumPy.

The wire format is written here once; ``Client`` and ``AsyncClient`` only add I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from gradserve import _codec
from gradserve._exceptions import InvalidArgument, ResourceExhausted
from gradserve._models import ModelInfo, PreparedInputs, TensorInfo, mirror, prepare_inputs
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["ComputeResult", "Call", "build_call", "decode_response", "merge_results", "ChunkAssembler", "plan_rows",
           "METHODS", "Target", "MESSAGE_OVERHEAD_BYTES"]

#: SDK method name -> wire Method.
METHODS: Mapping[str, int] = {
    "predict": _pb2.METHOD_PREDICT,
    "gradient": _pb2.METHOD_GRADIENT,
    "input_x_gradient": _pb2.METHOD_INPUT_X_GRADIENT,
    "integrated_gradients": _pb2.METHOD_INTEGRATED_GRADIENTS,
    "smoothgrad": _pb2.METHOD_SMOOTHGRAD,
    "jacobian": _pb2.METHOD_JACOBIAN,
    "jvp": _pb2.METHOD_JVP,
    "vjp": _pb2.METHOD_VJP,
    "hvp": _pb2.METHOD_HVP,
    "grad_cam": _pb2.METHOD_GRAD_CAM,
}
_QUADRATURES = {
    "gausslegendre": _pb2.QUADRATURE_GAUSS_LEGENDRE,
    "riemann_left": _pb2.QUADRATURE_RIEMANN_LEFT,
    "riemann_right": _pb2.QUADRATURE_RIEMANN_RIGHT,
    "riemann_middle": _pb2.QUADRATURE_RIEMANN_MIDDLE,
    "riemann_trapezoid": _pb2.QUADRATURE_RIEMANN_TRAPEZOID,
}
_TRANSFORMS = {
    None: _pb2.TRANSFORM_IDENTITY, "identity": _pb2.TRANSFORM_IDENTITY,
    "softmax": _pb2.TRANSFORM_SOFTMAX, "log_softmax": _pb2.TRANSFORM_LOG_SOFTMAX,
    "sigmoid": _pb2.TRANSFORM_SIGMOID,
}
_AGGREGATIONS = {"mean": _pb2.NOISE_AGGREGATION_MEAN, "square": _pb2.NOISE_AGGREGATION_SQUARE,
                 "var": _pb2.NOISE_AGGREGATION_VAR}

#: None (sum per example), an int, a sequence of ints (one per example) or "argmax".
Target = int | Sequence[int] | str | None


@dataclass
class ComputeResult:
    """Everything a ComputeResponse carries, decoded to NumPy."""

    model: str
    version: int
    request_id: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    attributions: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    target_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class Call:
    """One logical call: the row ranges it is sent in, how to encode each, how to shape the answer.

    A batch that fits in one message has one range; a larger one is split into row chunks that
    are sent as separate requests and reassembled by ``finish`` (see ``plan_rows``).
    """

    bounds: list[tuple[int, int]]
    encode: Callable[[int, int], _pb2.ComputeRequest]
    shape: Callable[[ComputeResult], Any]
    #: Row chunk -> its request already serialized (or as a message): see ``payloads``.
    serialize: Callable[[int, int], _pb2.ComputeRequest | bytes] | None = None

    @property
    def request(self) -> _pb2.ComputeRequest:
        """The single request of an unchunked call."""
        if len(self.bounds) != 1:
            raise ValueError("this call is sent in several chunks; iterate requests()")
        return self.encode(*self.bounds[0])

    def requests(self) -> Iterator[_pb2.ComputeRequest]:
        """The requests, encoded lazily so that only the chunks in flight are in memory."""
        for start, stop in self.bounds:
            yield self.encode(start, stop)

    def payloads(self) -> Iterator[_pb2.ComputeRequest | bytes]:
        """The requests of a chunked call, lazily, each as serialized bytes (the inputs' bytes
        copied once) or as a message: for a request serializer that passes bytes through."""
        for start, stop in self.bounds:
            yield self.serialize(start, stop) if self.serialize is not None else self.encode(start, stop)

    def finish(self, results: ComputeResult | Sequence[ComputeResult]) -> Any:
        """Shape the (merged) results for the caller."""
        if isinstance(results, ComputeResult):
            return self.shape(results)
        return self.shape(merge_results(results))

    def assembler(self) -> "ChunkAssembler":
        """Where the results of this call's chunks are put together as they arrive."""
        return ChunkAssembler(self.bounds)


class ChunkAssembler:
    """Reassembles the results of row chunks, in order, into arrays allocated once.

    Each chunk's rows are copied into place as it arrives, so its message can be freed at once:
    the peak is the whole result plus the chunks in flight, not twice the result.
    """

    def __init__(self, bounds: Sequence[tuple[int, int]]) -> None:
        self._bounds = list(bounds)
        self._total = self._bounds[-1][1] if self._bounds else 0
        self._next = 0
        self._merged: ComputeResult | None = None
        self._indices: list[np.ndarray] = []

    def _place(self, merged: dict[str, np.ndarray], part: Mapping[str, np.ndarray], start: int, stop: int) -> None:
        for name, arr in part.items():
            if arr.ndim == 0 or arr.shape[0] != stop - start:
                merged.setdefault(name, arr)   # not per example: the first chunk's value
                continue
            if name not in merged:
                merged[name] = np.empty((self._total,) + arr.shape[1:], arr.dtype)
            merged[name][start:stop] = arr

    def add(self, result: ComputeResult) -> None:
        """Add the result of the next chunk."""
        start, stop = self._bounds[self._next]
        self._next += 1
        if self._merged is None:
            self._merged = ComputeResult(model=result.model, version=result.version, request_id=result.request_id)
        for field_name in ("outputs", "attributions", "extras"):
            self._place(getattr(self._merged, field_name), getattr(result, field_name), start, stop)
        self._indices.append(result.target_indices)

    def result(self) -> ComputeResult:
        """The merged result, once every chunk was added."""
        if self._merged is None or self._next != len(self._bounds):
            raise ValueError(f"{self._next} of {len(self._bounds)} chunks added")
        self._merged.target_indices = np.concatenate(self._indices)
        return self._merged


def merge_results(results: Sequence[ComputeResult]) -> ComputeResult:
    """Concatenate the results of row chunks along the batch axis, in order."""
    if len(results) == 1:
        return results[0]
    bounds, start = [], 0
    for r in results:
        rows = max((a.shape[0] for a in (*r.attributions.values(), *r.outputs.values()) if a.ndim), default=0)
        bounds.append((start, start + rows))
        start += rows
    assembler = ChunkAssembler(bounds)
    for r in results:
        assembler.add(r)
    return assembler.result()


def decode_response(resp: _pb2.ComputeResponse) -> ComputeResult:
    """Decode a response's tensors into a ComputeResult."""
    return ComputeResult(
        model=resp.model, version=resp.version, request_id=resp.request_id,
        outputs=_codec.decode_map(resp.outputs, "outputs"),
        attributions=_codec.decode_map(resp.attributions, "attributions"),
        extras=_codec.decode_map(resp.extras, "extras"),
        target_indices=np.asarray(resp.target_indices, dtype=np.int64),
    )


def _selector(msg: _pb2.OutputSelector, target: Target, output: str | int | None,
              transform: str | None, logits: bool) -> None:
    if isinstance(output, str):
        msg.output_name = output
    elif output is not None:
        msg.output_index = int(output)
    if target is None:
        msg.kind = _pb2.TARGET_KIND_SUM
    elif isinstance(target, str):
        if target != "argmax":
            raise InvalidArgument(f"target: expected None, an int, a sequence of ints or 'argmax', got {target!r}")
        msg.kind = _pb2.TARGET_KIND_ARGMAX
    else:
        idx = np.asarray(target)
        if idx.dtype.kind not in "iu" or idx.ndim > 1:
            raise InvalidArgument("target: expected an int or a 1-D sequence of ints")
        msg.kind = _pb2.TARGET_KIND_INDEX
        msg.indices.extend(int(i) for i in idx.reshape(-1))
    if transform not in _TRANSFORMS:
        raise InvalidArgument(f"transform: expected one of {sorted(k for k in _TRANSFORMS if k)}, got {transform!r}")
    msg.transform = _TRANSFORMS[transform]
    msg.use_logits = bool(logits)


def _per_input(value: Any, prepared: PreparedInputs, field: str) -> dict[str, np.ndarray]:
    """Baselines/tangents given like the inputs (array, list or dict) -> dict by input name."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): np.asarray(v) for k, v in value.items()}
    if prepared.structure == "list":
        if not isinstance(value, (list, tuple)) or len(value) != len(prepared.order):
            raise InvalidArgument(f"{field}: pass one per input, as a list in input order or a dict")
        return {n: np.asarray(v) for n, v in zip(prepared.order, value)}
    if prepared.structure == "dict" and len(prepared.order) > 1 and np.ndim(value) > 0:
        raise InvalidArgument(f"{field}: pass a dict by input name for a multi-input model")
    return {n: np.asarray(value) for n in prepared.order}


#: Field number of ComputeRequest.inputs (for ``_codec.append_tensor_map``).
_INPUTS_FIELD = _pb2.ComputeRequest.DESCRIPTOR.fields_by_name["inputs"].number
#: Bytes of a message kept free for everything that is not per-row data (names, options, framing).
MESSAGE_OVERHEAD_BYTES = 64 * 1024
# Methods whose attributions are shaped like the inputs (per differentiated input).
_LIKE_INPUTS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vjp", "hvp", "grad_cam")


def _row_elements(shape: Sequence[int]) -> int:
    # Unknown (-1) dimensions count as 1: the estimate is then a floor, and the server's own
    # limit still answers RESOURCE_EXHAUSTED if a response does not fit.
    return math.prod(max(int(d), 1) for d in shape)


def response_row_bytes(method: str, info: ModelInfo | None, input_row_bytes: int,
                       input_row_elements: int, include_outputs: bool) -> int:
    """Estimated response bytes per example: attributions, outputs and extras of ``method``."""
    outputs: tuple[TensorInfo, ...] = info.outputs if info is not None else ()
    out_elems = max((_row_elements(o.shape[1:]) for o in outputs), default=1)
    out_bytes = sum(_row_elements(o.shape[1:]) * max(o.dtype.itemsize, 4) for o in outputs)
    attributions = 0
    if method in _LIKE_INPUTS:
        attributions = max(input_row_bytes, 4 * input_row_elements)
    elif method == "jacobian":
        attributions = 4 * out_elems * input_row_elements
    elif method == "jvp":
        attributions = 4 * out_elems
    with_outputs = out_bytes if (include_outputs or method == "predict") else 0
    # 16 bytes: the per-example delta / target index extras.
    return attributions + with_outputs + 16


def _even_rows(rows: int) -> int:
    """``rows`` rounded down to a multiple of 64, or below 64 to a power of two: the server's
    default engine buckets, so that full chunks are never padded (a copy of the whole chunk)."""
    return rows - rows % 64 if rows >= 64 else 1 << (rows.bit_length() - 1)


def plan_rows(batch: int, request_row_bytes: int, response_row_bytes: int, shared_bytes: int,
              max_message_bytes: int, max_rows: int, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """Split ``batch`` examples into row ranges whose request and response each fit a message.

    With ``chunk_bytes``, a batch larger than that is split into chunks of about that size
    (rounded to bucket-friendly row counts) even when it would fit one message: smaller chunks
    in flight overlap encoding, transfer, compute and decoding on both sides. Raises
    ``ResourceExhausted`` when a single example does not fit a message.
    """
    per_row = max(request_row_bytes, response_row_bytes, 1)
    budget = max_message_bytes - MESSAGE_OVERHEAD_BYTES - shared_bytes
    if per_row > budget:
        raise ResourceExhausted(
            f"inputs: one example needs about {per_row} bytes in a request or response, more than "
            f"max_message_bytes={max_message_bytes} allows; raise the limit on both client and server")
    rows = max(1, min(budget // per_row, max_rows))
    if chunk_bytes is not None and batch * per_row + shared_bytes > chunk_bytes:
        # Rounded to the nearest row count: rows of exactly 1 MiB plus a few bytes of extras
        # make 16-row chunks of "16 MiB", not 15 (then 8).
        rows = min(rows, _even_rows(max(1, (chunk_bytes - shared_bytes + per_row // 2) // per_row)))
    if batch <= rows:
        return [(0, batch)]
    return [(i, min(i + rows, batch)) for i in range(0, batch, rows)]


def _batch_size(arrays: Mapping[str, np.ndarray]) -> int | None:
    sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
    return sizes.pop() if len(sizes) == 1 else None


def _rows_of(arr: np.ndarray, batch: int, rank: int | None) -> bool:
    """Whether ``arr`` holds one row per example (sliced per chunk) rather than a shared value."""
    return arr.ndim >= 1 and arr.shape[0] == batch and (rank is None or arr.ndim == rank)


def build_call(info: ModelInfo | None, model: str, method: str, inputs: Any, *,
               version: int = 0, target: Target = None, output: str | int | None = None,
               transform: str | None = None, logits: bool = False, wrt: Sequence[str] | None = None,
               return_outputs: bool = False, request_id: str = "", layer: str | None = None,
               baseline: Any = 0.0, steps: int = 50, quadrature: str = "gausslegendre",
               return_delta: bool = False, samples: int = 50, noise: float | None = None,
               stdev: float | None = None, kind: str = "mean", seed: int | None = None,
               base_method: str = "gradient", tangents: Any = None, cotangents: Any = None,
               upsample: bool = False, max_message_bytes: int | None = None,
               max_rows: int = 65536, chunk_bytes: int | None = None) -> Call:
    """Validate SDK arguments and build the requests for ``method`` plus their result shaper.

    Everything is checked here, before any request is sent. With ``max_message_bytes`` a batch
    whose request or expected response would exceed one message is split into row chunks
    (at most ``max_rows`` examples each); without it the call is one request. ``chunk_bytes``:
    the size to split a large batch into even when it fits one message (see ``plan_rows``).
    """
    if method not in METHODS:
        raise InvalidArgument(f"method: unknown method {method!r}; expected one of {sorted(METHODS)}")
    specs = info.inputs if info is not None else ()
    prepared = prepare_inputs(inputs, specs)
    if method != "predict":
        _selector(_pb2.OutputSelector(), target, output, transform, logits)  # validate early
    ig = method == "integrated_gradients" or (method == "smoothgrad" and base_method == "integrated_gradients")
    if ig and quadrature not in _QUADRATURES:
        raise InvalidArgument(f"method: unknown quadrature {quadrature!r}; expected one of {sorted(_QUADRATURES)}")
    if method == "smoothgrad":
        if kind not in _AGGREGATIONS:
            raise InvalidArgument(f"kind: expected one of {sorted(_AGGREGATIONS)}, got {kind!r}")
        if base_method not in ("gradient", "input_x_gradient", "integrated_gradients"):
            raise InvalidArgument(f"base_method: expected gradient, input_x_gradient or "
                                  f"integrated_gradients, got {base_method!r}")
    if method in ("jvp", "hvp") and tangents is None:
        raise InvalidArgument("tangents: required for jvp and hvp")
    if method == "vjp" and cotangents is None:
        raise InvalidArgument("cotangents: required for vjp")
    baselines = _per_input(baseline, prepared, "baseline") if ig else {}
    tangent_map = _per_input(tangents, prepared, "tangents") if method in ("jvp", "hvp") else {}
    cotangent = np.asarray(cotangents) if method == "vjp" else None

    # Row chunking: which arrays hold one row per example, and how many bytes a row costs.
    batch = _batch_size(prepared.arrays)
    chunkable = max_message_bytes is not None and batch is not None and batch > 1
    n = batch if batch is not None else 0
    ranks = {k: a.ndim for k, a in prepared.arrays.items()}
    sliced_baselines = {k for k, b in baselines.items() if chunkable and _rows_of(b, n, ranks.get(k))}
    sliced_tangents = {k for k, t in tangent_map.items() if chunkable and _rows_of(t, n, ranks.get(k))}
    slice_cotangent = cotangent is not None and chunkable and _rows_of(cotangent, n, None)
    index_target = not isinstance(target, (str, type(None))) and np.ndim(target) == 1
    if chunkable and index_target and len(np.asarray(target)) != n:
        raise InvalidArgument(f"target: {len(np.asarray(target))} indices for a batch of {n} examples")
    bounds = [(0, n)]
    if chunkable and max_message_bytes is not None:
        row_arrays = list(prepared.arrays.values()) + [baselines[k] for k in sliced_baselines] \
            + [tangent_map[k] for k in sliced_tangents] + ([cotangent] if slice_cotangent and cotangent is not None else [])
        shared = [baselines[k] for k in baselines if k not in sliced_baselines] \
            + [tangent_map[k] for k in tangent_map if k not in sliced_tangents] \
            + ([cotangent] if cotangent is not None and not slice_cotangent else [])
        in_bytes = sum(a.nbytes for a in prepared.arrays.values()) // n
        in_elems = sum(a.size for a in prepared.arrays.values()) // n
        bounds = plan_rows(n, sum(a.nbytes for a in row_arrays) // n + 8 * index_target,
                           response_row_bytes(method, info, in_bytes, in_elems, return_outputs),
                           sum(a.nbytes for a in shared), max_message_bytes, max_rows,
                           # SmoothGrad is compute-bound, and its noise is drawn per chunk: a
                           # seeded call is split only where it must be.
                           None if method == "smoothgrad" else chunk_bytes)
    whole = len(bounds) == 1

    def part(arr: np.ndarray, sliced: bool, start: int, stop: int) -> np.ndarray:
        return arr[start:stop] if sliced and not whole else arr

    def encode(start: int, stop: int, with_inputs: bool = True) -> _pb2.ComputeRequest:
        req = _pb2.ComputeRequest(model=model, version=int(version), method=METHODS[method],  # type: ignore[arg-type]
                                  include_outputs=bool(return_outputs), request_id=request_id)
        if with_inputs:
            _codec.encode_map({k: part(a, True, start, stop) for k, a in prepared.arrays.items()}, req.inputs,
                              "inputs")
        if method != "predict":
            chunk_target = np.asarray(target)[start:stop] if index_target and not whole else target
            _selector(req.target, chunk_target, output, transform, logits)  # type: ignore[arg-type]
        if wrt:
            req.wrt.extend(wrt)
        if layer:
            req.layer = layer
        if ig:
            opts = req.integrated_gradients
            opts.steps = int(steps)
            opts.quadrature = _QUADRATURES[quadrature]
            opts.return_delta = bool(return_delta)
            _codec.encode_map({k: part(b, k in sliced_baselines, start, stop) for k, b in baselines.items()},
                              opts.baselines, "baseline")
        if method == "smoothgrad":
            sg = req.smoothgrad
            sg.samples = int(samples)
            sg.kind = _AGGREGATIONS[kind]
            sg.base_method = METHODS[base_method]  # type: ignore[assignment]
            if noise is not None:
                sg.noise = float(noise)
            if stdev is not None:
                sg.stdev = float(stdev)
            if seed is not None:
                sg.seed = int(seed)
        if tangent_map:
            _codec.encode_map({k: part(t, k in sliced_tangents, start, stop) for k, t in tangent_map.items()},
                              req.tangents, "tangents")
        if cotangent is not None:
            _codec.encode(part(cotangent, slice_cotangent, start, stop), "cotangent", out=req.cotangent)
        if method == "grad_cam":
            req.grad_cam.upsample = bool(upsample)
        return req

    def shape(result: ComputeResult) -> Any:
        outputs = _mirror_outputs(result.outputs, info)
        if method == "predict":
            return outputs
        if method in ("jvp", "grad_cam") or layer:
            # One result per selected output (jvp) or per layer (layer=, grad_cam): not per input.
            main: Any = next(iter(result.attributions.values())) if len(result.attributions) == 1 \
                else dict(result.attributions)
        else:
            main = mirror(result.attributions, prepared)
        extra: tuple[Any, ...] = ()
        if method == "integrated_gradients" and return_delta:
            extra = (result.extras.get("delta"),)
        if return_outputs:
            return (outputs, main) + extra
        return (main,) + extra if extra else main

    if whole:
        # Encode now: the caller gets encoding errors before anything is sent.
        only = encode(0, n)
        return Call(bounds, lambda start, stop: only, shape)
    # Fail early on the first chunk (the rest encode the same way); it is sent as it is.
    first: list[_pb2.ComputeRequest] = [encode(*bounds[0])]

    def encode_chunk(start: int, stop: int) -> _pb2.ComputeRequest:
        if first and (start, stop) == bounds[0]:
            return first.pop()
        return encode(start, stop)

    def serialize(start: int, stop: int) -> _pb2.ComputeRequest | bytes:
        if first and (start, stop) == bounds[0]:
            return first.pop()
        head = encode(start, stop, with_inputs=False).SerializeToString()
        return _codec.append_tensor_map(head, _INPUTS_FIELD,
                                        {k: a[start:stop] for k, a in prepared.arrays.items()}, "inputs")
    return Call(bounds, encode_chunk, shape, serialize)


def _mirror_outputs(outputs: dict[str, np.ndarray], info: ModelInfo | None) -> Any:
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    if info is not None and info.outputs:
        return {o.name: outputs[o.name] for o in info.outputs if o.name in outputs}
    return outputs
