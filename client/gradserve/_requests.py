"""Planning, the one encoder and the one decoder: SDK calls -> ComputeRequests, answers -> NumPy.

``plan_call`` checks a call's inputs and operands against the model's metadata, splits a large
batch into row chunks that each fit a message, and returns a ``Call`` that encodes each chunk and
shapes the (merged) answer the way the caller passed the inputs. ``decode_response`` reads a
serialized ComputeResponse with its tensors as views of the received bytes. No I/O here:
``Client`` and ``AsyncClient`` send what this builds.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradserve import _codec
from gradserve._exceptions import GradserveError, Internal, InvalidArgument, ResourceExhausted, from_status
from gradserve._models import ModelInfo, PreparedInputs, TensorInfo, mirror, prepare_inputs
from gradserve._names import AGGREGATIONS, METHODS, QUADRATURES, TARGET_KINDS, TRANSFORMS
from gradserve._options import ComputeOptions, Operands, Selection
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["ComputeResult", "Limits", "Call", "plan_call", "build_call", "plan_rows", "response_row_bytes",
           "merge_results", "ChunkAssembler", "decode_response", "decode_stream_response",
           "MESSAGE_OVERHEAD_BYTES"]

#: Bytes of a message kept free for everything that is not per-row data (names, options, framing).
MESSAGE_OVERHEAD_BYTES = 64 * 1024
#: Field number of ComputeRequest.inputs (for ``_codec.append_tensor_map``).
_INPUTS_FIELD = _pb2.ComputeRequest.DESCRIPTOR.fields_by_name["inputs"].number
# Methods whose attributions are shaped like the inputs (per differentiated input).
_LIKE_INPUTS = frozenset({"gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vjp", "hvp",
                          "grad_cam"})


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


@dataclass(frozen=True, slots=True)
class Limits:
    """How large one request may be: ``max_message_bytes`` (None: one request, never split),
    ``max_rows`` examples, and ``chunk_bytes`` (split batches larger than this even when they fit)."""

    max_message_bytes: int | None = None
    max_rows: int = 65536
    chunk_bytes: int | None = None


# -- planning ---------------------------------------------------------------------------------
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


@dataclass(slots=True)
class _Operand:
    """One tensor map of a request besides the inputs, and which of its arrays follow the rows."""

    arrays: dict[str, np.ndarray]
    sliced: frozenset[str] = frozenset()

    def part(self, start: int, stop: int, whole: bool) -> dict[str, np.ndarray]:
        if whole or not self.sliced:
            return self.arrays
        return {k: a[start:stop] if k in self.sliced else a for k, a in self.arrays.items()}


_NO_OPERAND = _Operand({})   # shared: never sliced (``_plan_chunks`` skips empty operands)


def _rows_of(arr: np.ndarray, batch: int, rank: int | None) -> bool:
    """Whether ``arr`` holds one row per example (sliced per chunk) rather than a shared value."""
    return arr.ndim >= 1 and arr.shape[0] == batch and (rank is None or arr.ndim == rank)


def plan_call(info: ModelInfo | None, model: str, options: ComputeOptions, inputs: Any,
              operands: Operands | None = None, limits: Limits | None = None, request_id: str = "",
              encode_first: bool = True) -> "Call":
    """Check a call against the model's metadata (``info``, None if unknown) and plan its requests.

    Everything is checked here, before any request is sent. With ``limits.max_message_bytes`` a
    batch whose request or expected response would exceed one message is split into row chunks;
    without it the call is one request. ``encode_first=False`` leaves the first request to be
    encoded when it is sent (a call that may go through shared memory instead).
    """
    operands = operands or Operands()
    limits = limits or Limits()
    method = options.method
    prepared = prepare_inputs(inputs, info.inputs if info is not None else ())
    baselines = tangents = cotangent = _NO_OPERAND
    if options.integrated_gradients is not None:
        baselines = _Operand(_per_input(operands.baseline, prepared, "baseline"))
    if method in ("jvp", "hvp"):
        if operands.tangents is None:
            raise InvalidArgument("tangents: required for jvp and hvp")
        tangents = _Operand(_per_input(operands.tangents, prepared, "tangents"))
    elif method == "vjp":
        if operands.cotangents is None:
            raise InvalidArgument("cotangents: required for vjp")
        cotangent = _Operand({"": np.asarray(operands.cotangents)})
    arrays = prepared.arrays
    bounds = [(0, 0)]
    if len(arrays) == 1:   # the common case, without building sets
        only = next(iter(arrays.values()))
        batch = only.shape[0] if only.ndim else None
    else:
        sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
        batch = sizes.pop() if len(sizes) == 1 else None
    if batch is not None:
        bounds = [(0, batch)]
    selection = options.selection
    if selection is not None and type(selection.target) is tuple and batch is not None \
            and len(selection.target) != batch:
        raise InvalidArgument(f"target: {len(selection.target)} indices for a batch of {batch} examples")
    if limits.max_message_bytes is not None and batch is not None and batch > 1:
        bounds = _plan_chunks(info, options, prepared, batch, (baselines, tangents, cotangent), limits)
    return Call(model, options, prepared, info, bounds, baselines, tangents, cotangent, request_id, encode_first)


def _plan_chunks(info: ModelInfo | None, options: ComputeOptions, prepared: PreparedInputs, batch: int,
                 operands: tuple[_Operand, _Operand, _Operand], limits: Limits) -> list[tuple[int, int]]:
    """Row ranges of a batch; marks which operand arrays follow the rows (else shared by every chunk)."""
    assert limits.max_message_bytes is not None
    ranks = {k: a.ndim for k, a in prepared.arrays.items()}
    row_bytes = sum(a.nbytes for a in prepared.arrays.values()) // batch
    shared = 0
    for i, op in enumerate(operands):
        if not op.arrays:
            continue
        # Baselines and tangents follow an input's rows when shaped like it; the cotangent
        # (output-shaped) when its first dimension is the batch.
        op.sliced = frozenset(k for k, a in op.arrays.items() if _rows_of(a, batch, ranks.get(k) if i < 2 else None))
        row_bytes += sum(op.arrays[k].nbytes for k in op.sliced) // batch
        shared += sum(a.nbytes for k, a in op.arrays.items() if k not in op.sliced)
    selection = options.selection
    if selection is not None and selection.per_example:
        row_bytes += 8
    in_elems = sum(a.size for a in prepared.arrays.values()) // batch
    in_bytes = sum(a.nbytes for a in prepared.arrays.values()) // batch
    return plan_rows(batch, row_bytes, response_row_bytes(options.method, info, in_bytes, in_elems,
                                                          options.return_outputs),
                     shared, limits.max_message_bytes, limits.max_rows,
                     # SmoothGrad is compute-bound, and its noise is drawn per chunk: a seeded
                     # call is split only where it must be.
                     None if options.method == "smoothgrad" else limits.chunk_bytes)


def _selector(msg: _pb2.OutputSelector, selection: Selection, target: Any) -> None:
    output = selection.output
    if isinstance(output, str):
        msg.output_name = output
    elif output is not None:
        msg.output_index = output
    kind = "sum" if target is None else "argmax" if target == "argmax" else "index"
    msg.kind = TARGET_KINDS[kind]  # type: ignore[assignment]
    if kind == "index":
        if isinstance(target, int):
            msg.indices.append(target)
        else:
            msg.indices.extend(target)
    if selection.transform is not None:
        msg.transform = TRANSFORMS[selection.transform]  # type: ignore[assignment]
    if selection.logits:
        msg.use_logits = True


class Call:
    """One logical call: the row ranges it is sent in, the request of each, the answer's shape.

    A batch that fits in one message has one range; a larger one is split into row chunks that
    are sent as separate requests and put together again (``assembler``, ``finish``).
    """

    __slots__ = ("model", "options", "prepared", "info", "bounds", "_baselines", "_tangents", "_cotangent",
                 "_request_id", "_first")

    def __init__(self, model: str, options: ComputeOptions, prepared: PreparedInputs, info: ModelInfo | None,
                 bounds: list[tuple[int, int]], baselines: _Operand, tangents: _Operand, cotangent: _Operand,
                 request_id: str, encode_first: bool = True) -> None:
        self.model, self.options, self.prepared, self.info, self.bounds = model, options, prepared, info, bounds
        self._baselines, self._tangents, self._cotangent = baselines, tangents, cotangent
        self._request_id = request_id
        # Encoded now: the caller gets encoding errors before anything is sent. The first chunk
        # of a chunked call is sent as it is (the rest encode the same way).
        self._first: _pb2.ComputeRequest | None = self.encode(*bounds[0]) if encode_first else None

    def as_one_request(self) -> "Call":
        """This call as one request of every row (for shared memory, where no message limits
        apply), with nothing encoded yet."""
        if len(self.bounds) == 1:
            return self
        return Call(self.model, self.options, self.prepared, self.info, [(0, self.bounds[-1][1])], self._baselines,
                    self._tangents, self._cotangent, self._request_id, encode_first=False)

    @property
    def whole(self) -> bool:
        return len(self.bounds) == 1

    def encode(self, start: int, stop: int, with_inputs: bool = True) -> _pb2.ComputeRequest:
        """The request for rows ``start:stop``."""
        o = self.options
        whole = len(self.bounds) == 1
        req = _pb2.ComputeRequest(model=self.model, method=METHODS[o.method])  # type: ignore[arg-type]
        if o.version:
            req.version = o.version
        if o.return_outputs:
            req.include_outputs = True
        if self._request_id:
            req.request_id = self._request_id
        if with_inputs:
            arrays = self.prepared.arrays
            _codec.encode_map(arrays if whole else {k: a[start:stop] for k, a in arrays.items()}, req.inputs,
                              "inputs")
        if o.selection is not None:
            target = o.selection.target
            _selector(req.target, o.selection, target[start:stop] if o.selection.per_example and not whole
                      else target)
        if o.wrt:
            req.wrt.extend(o.wrt)
        if o.layer:
            req.layer = o.layer
        if o.integrated_gradients is not None:
            ig, opts = o.integrated_gradients, req.integrated_gradients
            if ig.steps is not None:
                opts.steps = ig.steps
            opts.quadrature = QUADRATURES[ig.quadrature]  # type: ignore[assignment]
            opts.return_delta = ig.return_delta
            _codec.encode_map(self._baselines.part(start, stop, whole), opts.baselines, "baseline")
        if o.smoothgrad is not None:
            sg, msg = o.smoothgrad, req.smoothgrad
            if sg.samples is not None:
                msg.samples = sg.samples
            msg.kind = AGGREGATIONS[sg.kind]  # type: ignore[assignment]
            msg.base_method = METHODS[sg.base_method]  # type: ignore[assignment]
            if sg.noise is not None:
                msg.noise = float(sg.noise)
            if sg.stdev is not None:
                msg.stdev = float(sg.stdev)
            if sg.seed is not None:
                msg.seed = int(sg.seed)
        if self._tangents.arrays:
            _codec.encode_map(self._tangents.part(start, stop, whole), req.tangents, "tangents")
        if self._cotangent.arrays:
            _codec.encode(self._cotangent.part(start, stop, whole)[""], "cotangent", out=req.cotangent)
        if o.upsample:
            req.grad_cam.upsample = True
        return req

    @property
    def request(self) -> _pb2.ComputeRequest:
        """The single request of an unchunked call."""
        if len(self.bounds) != 1:
            raise ValueError("this call is sent in several chunks; iterate requests()")
        return self._first if self._first is not None else self.encode(*self.bounds[0])

    def requests(self) -> Iterator[_pb2.ComputeRequest]:
        """The requests, encoded lazily so that only the chunks in flight are in memory."""
        for start, stop in self.bounds:
            yield self.encode(start, stop)

    def payloads(self) -> Iterator[_pb2.ComputeRequest | bytes]:
        """The requests of a chunked call, lazily: the first as the message encoded up front, the
        others serialized with one copy of their inputs' bytes (for ``serialize_request``)."""
        first, self._first = self._first, None
        for i, (start, stop) in enumerate(self.bounds):
            if i == 0 and first is not None:
                yield first
                continue
            head = self.encode(start, stop, with_inputs=False).SerializeToString()
            yield _codec.append_tensor_map(head, _INPUTS_FIELD,
                                           {k: a[start:stop] for k, a in self.prepared.arrays.items()}, "inputs")

    def assembler(self) -> "ChunkAssembler":
        """Where the results of this call's chunks are put together as they arrive."""
        return ChunkAssembler(self.bounds)

    def finish(self, results: ComputeResult | Sequence[ComputeResult]) -> Any:
        """The (merged) results shaped for the caller: like the inputs, with outputs and extras
        as the options asked."""
        result = results if isinstance(results, ComputeResult) else merge_results(results)
        o = self.options
        if o.method == "predict":
            return _mirror_outputs(result.outputs, self.info)
        if o.method in ("jvp", "grad_cam") or o.layer:
            # One result per selected output (jvp) or per layer (layer=, grad_cam): not per input.
            main: Any = next(iter(result.attributions.values())) if len(result.attributions) == 1 \
                else dict(result.attributions)
        else:
            main = mirror(result.attributions, self.prepared)
        extra: tuple[Any, ...] = ()
        if o.method == "integrated_gradients" and o.integrated_gradients is not None \
                and o.integrated_gradients.return_delta:
            extra = (result.extras.get("delta"),)
        if o.return_outputs:
            return (_mirror_outputs(result.outputs, self.info), main) + extra
        return (main,) + extra if extra else main


def _mirror_outputs(outputs: dict[str, np.ndarray], info: ModelInfo | None) -> Any:
    if len(outputs) == 1:
        return next(iter(outputs.values()))
    if info is not None and info.outputs:
        return {o.name: outputs[o.name] for o in info.outputs if o.name in outputs}
    return outputs


def build_call(info: ModelInfo | None, model: str, method: str, inputs: Any, *, baseline: Any = 0.0,
               tangents: Any = None, cotangents: Any = None, request_id: str = "",
               max_message_bytes: int | None = None, max_rows: int = 65536, chunk_bytes: int | None = None,
               **options: Any) -> Call:
    """``plan_call`` from keyword arguments (those of ``Client.compute``): ``options`` as in
    ``ComputeOptions.of``, tensors and limits as named here."""
    return plan_call(info, model, ComputeOptions.of(method, **options), inputs,
                     Operands(baseline, tangents, cotangents), Limits(max_message_bytes, max_rows, chunk_bytes),
                     request_id)


# -- results ----------------------------------------------------------------------------------
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


# -- the decoder ------------------------------------------------------------------------------
_TENSOR_MAPS = {4: "outputs", 5: "attributions", 6: "extras"}   # ComputeResponse's map<string, Tensor> fields


#: Below this many bytes a response is parsed by protobuf (C) and its few tensor bytes copied:
#: cheaper than walking the wire in Python (measured: about half the time for a batch-1 gradient).
SMALL_RESPONSE_BYTES = 512


def decode_response(buf: bytes | memoryview, aligned: bool = True) -> ComputeResult:
    """Decode a serialized ComputeResponse; its tensors are read-only arrays.

    Parsing with protobuf and then reading each tensor's ``data`` copies every tensor twice; so
    tensors of all but the smallest responses (``SMALL_RESPONSE_BYTES``) are views of ``buf``.
    ``aligned=False`` leaves tensors whose data is misaligned for their dtype as misaligned views
    (row chunks: they are copied into the result anyway). Raises ``Internal`` for a malformed
    response.
    """
    try:
        if len(buf) < SMALL_RESPONSE_BYTES:
            resp = _pb2.ComputeResponse.FromString(buf)
            outputs, attributions, extras = (_small_map(resp.outputs, "outputs"),
                                             _small_map(resp.attributions, "attributions"),
                                             _small_map(resp.extras, "extras"))
        else:
            rest, tensors = _codec.split_tensor_maps(buf, _TENSOR_MAPS, aligned)
            resp = _pb2.ComputeResponse.FromString(rest)
            outputs, attributions, extras = tensors["outputs"], tensors["attributions"], tensors["extras"]
    except (_codec.TensorError, ValueError) as exc:   # protobuf's DecodeError is a ValueError
        raise Internal(f"response: {exc}") from None
    indices = resp.target_indices
    return ComputeResult(resp.model, resp.version, resp.request_id, outputs, attributions, extras,
                         np.array(indices, dtype=np.int64) if indices else np.empty(0, np.int64))


def _small_map(tensors: Mapping[str, Any], field: str) -> dict[str, np.ndarray]:
    """``_codec.decode_map`` with the checks inlined for the common valid case."""
    out: dict[str, np.ndarray] = {}
    if not tensors:
        return out
    for name, tensor in tensors.items():
        dtype, data, shape = _DTYPES.get(tensor.dtype), tensor.data, tuple(tensor.shape)
        if dtype is None or (shape and min(shape) < 0) or math.prod(shape) * dtype.itemsize != len(data):
            _codec.decode(tensor, f"{field}[{name!r}]")   # raises the precise TensorError
        out[name] = np.frombuffer(data, dtype).reshape(shape)
    return out


_DTYPES = _codec.DTYPES


def decode_stream_response(buf: bytes) -> tuple[str, ComputeResult | GradserveError]:
    """A serialized ComputeStreamResponse: its request_id, and the result or the in-band error."""
    request_id, result = "", None
    error: GradserveError | None = None
    view = memoryview(buf)
    try:
        for number, wire_type, start, stop in _codec.fields(view):
            if wire_type != 2:
                continue
            if number == 1:
                request_id = str(view[start:stop], "utf-8")
            elif number == 2:
                result = decode_response(view[start:stop])   # tensors: views of ``buf``
            elif number == 3:
                status = _pb2.Status.FromString(view[start:stop])
                error = from_status(status.code, status.message)
    except (_codec.TensorError, ValueError) as exc:
        raise Internal(f"stream response: {exc}") from None
    if error is not None:
        return request_id, error
    if result is None:
        return request_id, Internal("stream response: neither a response nor an error")
    return request_id, result
