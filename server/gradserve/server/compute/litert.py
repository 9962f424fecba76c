"""The LiteRT backend: compiled engine functions run in the LiteRT (TFLite) interpreter.

A small model's gradient is a few matrix products, but a call into a TensorFlow concrete function
costs ~150 µs of runtime dispatch (~60 µs with XLA) whatever the model. The same graph, with its
variables frozen to constants and converted to a TFLite flatbuffer, runs in the LiteRT
interpreter in a few µs. ``convert`` turns one of the engine's concrete functions (its
signature has a free batch dimension) into a ``LiteFunction``; ``LiteFunction.for_bucket`` gives
a ``BucketRunner`` holding interpreters resized to one padded batch size.

The engine decides per function and bucket, at the first call of that bucket, whether to keep
it: the answers must reproduce TensorFlow's (``reproduces``) and, under ``--backend auto``, the
interpreter must be faster. Gradient graphs use some ops TFLite has no kernel for; ``ReluGrad``
is rewritten as ``SelectV2(features > 0, gradients, 0)`` (the same values); others
(``BroadcastGradientArgs`` of a dynamic batch, for instance) make the conversion fail, and that
function stays on TensorFlow.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["LiteFunction", "BucketRunner", "LiteUnsupported", "available", "convert", "reproduces",
           "RTOL", "ATOL"]

#: Tolerance of ``reproduces``: |litert - tensorflow| <= ATOL * max(1, max |tensorflow|) + RTOL * |tensorflow|
#: elementwise, for floating outputs; other outputs must be equal, NaNs in the same places.
RTOL = 1e-5
ATOL = 1e-6


#: TensorFlow ops that TFLite has no builtin kernel for and that are left in a gradient graph
#: with a free batch dimension (``BroadcastGradientArgs``: the gradient of a broadcasting add).
_NO_KERNEL = frozenset({"BroadcastGradientArgs"})


class LiteUnsupported(Exception):
    """The function cannot run in LiteRT (conversion failed, or inputs it cannot take)."""


def available() -> bool:
    """Whether the LiteRT interpreter (``ai-edge-litert``) is installed."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # The converter warns on every from_concrete_functions call without a trackable object;
    # frozen graphs need none.
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _rewrite_unsupported(graph_def: Any) -> int:
    """Replace ops TFLite lacks by equivalents in ``graph_def``, in place; returns how many.

    ``ReluGrad(gradients, features)`` is ``gradients`` where ``features > 0`` and 0 elsewhere
    (TensorFlow's kernel); ``SelectV2`` gives exactly that (a product with a 0/1 mask would turn
    an infinite gradient into NaN).
    """
    from tensorflow.core.framework import attr_value_pb2, node_def_pb2, tensor_pb2, types_pb2

    added: list[Any] = []
    count = 0
    for node in graph_def.node:
        if node.op != "ReluGrad":
            continue
        grads, features = node.input[0], node.input[1]
        dtype = node.attr["T"].type
        zero = node_def_pb2.NodeDef(name=f"{node.name}/gs_zero", op="Const")
        zero.attr["dtype"].CopyFrom(attr_value_pb2.AttrValue(type=dtype))
        value = tensor_pb2.TensorProto(dtype=dtype)
        value.tensor_shape.SetInParent()
        if dtype == types_pb2.DT_DOUBLE:
            value.double_val.append(0.0)
        elif dtype in (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
            value.half_val.append(0)
        else:
            value.float_val.append(0.0)
        zero.attr["value"].CopyFrom(attr_value_pb2.AttrValue(tensor=value))
        positive = node_def_pb2.NodeDef(name=f"{node.name}/gs_positive", op="Greater",
                                        input=[features, zero.name])
        positive.attr["T"].CopyFrom(attr_value_pb2.AttrValue(type=dtype))
        zeros = node_def_pb2.NodeDef(name=f"{node.name}/gs_zeros", op="ZerosLike", input=[grads])
        zeros.attr["T"].CopyFrom(attr_value_pb2.AttrValue(type=dtype))
        added.extend((zero, positive, zeros))
        node.op = "SelectV2"
        del node.input[:]
        node.input.extend([positive.name, grads, zeros.name])
        count += 1
    graph_def.node.extend(added)
    return count


def convert(concrete: Any) -> "LiteFunction":
    """Convert one engine concrete function (flat inputs: batched arrays by sorted name, then
    shared ones; dict outputs) to a ``LiteFunction``.

    Raises
    ------
    LiteUnsupported
        LiteRT is not installed, or the graph has ops TFLite cannot run.
    """
    if not available():
        raise LiteUnsupported("ai-edge-litert is not installed")
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        frozen = convert_variables_to_constants_v2(concrete)
    except Exception as exc:  # noqa: BLE001 - e.g. resource ops the freezer cannot fold
        raise LiteUnsupported(f"freezing failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
    input_names = [t.name.split(":")[0] for t in frozen.inputs]
    output_names = [t.name.split(":")[0] for t in frozen.outputs]
    out_keys = sorted(concrete.structured_outputs)  # tf.nest flattens a dict by sorted key
    if not isinstance(concrete.structured_outputs, dict) or len(out_keys) != len(output_names):
        raise LiteUnsupported("outputs are not a flat dict of tensors")
    fn = frozen
    graph_def = frozen.graph.as_graph_def()
    lacking = sorted({n.op for n in graph_def.node} & _NO_KERNEL)
    if lacking:  # known to fail: skip the converter (and the MLIR errors it prints to stderr)
        raise LiteUnsupported(f"conversion failed (ops: {', '.join(lacking)})")
    if _rewrite_unsupported(graph_def):
        def imported() -> None:
            tf.compat.v1.import_graph_def(graph_def, name="")

        wrapped = tf.compat.v1.wrap_function(imported, [])
        g = wrapped.graph
        fn = wrapped.prune([g.as_graph_element(t.name) for t in frozen.inputs],
                           [g.as_graph_element(t.name) for t in frozen.outputs])
    try:
        # C++ that holds the GIL throughout (~0.1 s for a demo model's gradient): the longest
        # pause a load still imposes on the models serving beside it (``models.background``).
        with _quiet_absl():
            blob = tf.lite.TFLiteConverter.from_concrete_functions([fn]).convert()
    except Exception as exc:  # noqa: BLE001 - ConverterError names the ops TFLite lacks
        text = str(exc)
        ops = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("TF Select ops:")]
        raise LiteUnsupported(f"conversion failed ({'ops: ' + ', '.join(ops) if ops else text[:200]})") from exc
    return LiteFunction(bytes(blob), input_names, dict(zip(output_names, out_keys)))


class LiteFunction:
    """A converted function: one flatbuffer, interpreters made per padded batch size."""

    def __init__(self, blob: bytes, input_names: Sequence[str], outputs: dict[str, str]) -> None:
        self.blob = blob
        self._input_pos = {n: i for i, n in enumerate(input_names)}
        self._outputs = outputs
        self._runners: dict[int, BucketRunner] = {}
        self._lock = threading.Lock()

    def for_bucket(self, rows: int) -> "BucketRunner":
        """The runner of batch size ``rows`` (made on first use)."""
        runner = self._runners.get(rows)
        if runner is None:
            with self._lock:
                runner = self._runners.get(rows)
                if runner is None:
                    runner = self._runners[rows] = BucketRunner(self, rows)
        return runner

    def _interpreter(self, rows: int) -> tuple[Any, list[tuple[int, int]], list[tuple[str, int]]]:
        from ai_edge_litert.interpreter import Interpreter

        # One thread: the engine's callers are the parallelism, and a small model's call is
        # shorter than waking a pool.
        it = Interpreter(model_content=self.blob, num_threads=1)
        inputs = []
        for d in it.get_input_details():
            pos = self._input_pos.get(d["name"])
            if pos is None:
                raise LiteUnsupported(f"unexpected interpreter input {d['name']!r}")
            shape = [rows] + [int(s) for s in d["shape_signature"][1:]]
            if any(s < 0 for s in shape):
                raise LiteUnsupported("inputs with free dimensions other than the batch")
            it.resize_tensor_input(d["index"], shape, strict=False)
            inputs.append((d["index"], pos))
        it.allocate_tensors()
        outputs = []
        for d in it.get_output_details():
            key = self._outputs.get(d["name"])
            if key is None:
                raise LiteUnsupported(f"unexpected interpreter output {d['name']!r}")
            outputs.append((key, d["index"]))
        return it, inputs, outputs


#: One interpreter of a ``BucketRunner``: its input (tensor index, position in the flat list) and
#: output (key, tensor index) pairs, and its set-tensor, invoke and get-tensor calls.
_Entry = tuple[Any, list[tuple[int, int]], list[tuple[str, int]], Any, Any, Any]


def _calls(it: Any) -> tuple[Any, Any, Any]:
    """The interpreter's set-tensor, invoke and get-tensor functions: those of its C++ wrapper
    where it has them (the Python methods add a frame each, and ``invoke`` a check for NumPy
    views of the interpreter's buffers, which the engine never makes), else its public methods."""
    raw = getattr(it, "_interpreter", None)
    try:
        return raw.SetTensor, raw.Invoke, raw.GetTensor  # type: ignore[union-attr]
    except AttributeError:
        return it.set_tensor, it.invoke, it.get_tensor


class BucketRunner:
    """Runs a ``LiteFunction`` at one batch size; safe from several threads (an interpreter is
    not: each caller takes a free one, and one is made when none is free)."""

    def __init__(self, function: LiteFunction, rows: int) -> None:
        self._function = function
        self.rows = rows
        #: Free interpreters: ``list.pop`` and ``list.append`` are atomic, no lock is needed.
        self._free: list[_Entry] = []
        self._free.append(self._make())  # fail here, not on a request

    def _make(self) -> _Entry:
        it, inputs, outputs = self._function._interpreter(self.rows)
        return (it, inputs, outputs, *_calls(it))

    def run(self, flat: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs in the engine's flat order; returns the outputs by key (copies)."""
        try:
            entry = self._free.pop()
        except IndexError:
            entry = self._make()
        _, inputs, outputs, set_tensor, invoke, get_tensor = entry
        try:
            for index, pos in inputs:
                set_tensor(index, flat[pos])
            invoke()
            return {key: get_tensor(index) for key, index in outputs}
        finally:
            self._free.append(entry)


def reproduces(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str:
    """Empty when ``got`` reproduces ``want`` (same keys, dtypes and shapes; floating values within
    ``RTOL``/``ATOL``, others equal); else what differs."""
    if set(got) != set(want):
        return f"outputs {sorted(got)} != {sorted(want)}"
    for k, w in want.items():
        g = got[k]
        if g.dtype != w.dtype or g.shape != w.shape:
            return f"{k}: {g.dtype}{g.shape} != {w.dtype}{w.shape}"
        if w.dtype.kind in "fc" or w.dtype.name == "bfloat16":
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            finite = np.isfinite(w64)
            scale = max(1.0, float(np.max(np.abs(w64[finite]), initial=0.0)))
            if not np.array_equal(np.isnan(g64), np.isnan(w64)):
                return f"{k}: NaNs differ"
            if not np.array_equal(g64[~finite & ~np.isnan(w64)], w64[~finite & ~np.isnan(w64)]):
                return f"{k}: infinities differ"
            err = np.abs(g64[finite] - w64[finite])
            bound = ATOL * scale + RTOL * np.abs(w64[finite])
            if err.size and bool(np.any(err > bound)):
                return f"{k}: differs by up to {float(err.max()):.3g}"
        elif not np.array_equal(g, w):
            return f"{k}: values differ"
    return ""
