"""The compiled engine of one model version: tf.functions keyed so that requests never retrace.

For each (method key, array structure) the engine traces one ``tf.function`` whose input
signature leaves the batch dimension free, so every batch size reuses it. Batches are padded to
bucket sizes (repeating the last row, so padded rows stay finite) and larger batches run in
chunks of the biggest bucket: XLA, when on, compiles a bounded set of shapes. No gRPC here: the
engine takes and returns NumPy arrays.
"""
from __future__ import annotations

import bisect
import collections
import threading
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import tensorflow as tf

tf.get_logger().setLevel("ERROR")  # per-key functions are intended; silence the retracing warning

from gradserve.server import methods
from gradserve.server.config import EngineConfig
from gradserve.server.modelfn import ModelFunction
from gradserve.server.spec import PreparedCall

__all__ = ["CompiledModel"]


def _key_name(key: tuple[Hashable, ...]) -> str:
    """Readable counter name for a function key, e.g. "gradient(('alpha','sum',...),...)"."""
    return f"{key[0]}{key[1:]!r}" if len(key) > 1 else str(key[0])


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.repeat(a[-1:], rows - a.shape[0], axis=0)], axis=0)


class CompiledModel:
    """Compiled functions of one model version, on one device."""

    def __init__(self, model: ModelFunction, config: EngineConfig, *, xla: bool = False) -> None:
        self.model = model
        self.config = config
        self.buckets = config.bucket_sizes()
        self.xla = xla
        self.device = config.device
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self.compile_counts: collections.Counter[str] = collections.Counter()
        self._shapes_seen: set[tuple[Any, ...]] = set()
        self._functions: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------------------------------
    def run(self, call: PreparedCall) -> dict[str, np.ndarray]:
        """Run a prepared call; returns per-example arrays (batch first) keyed as the method made them."""
        fn = self._function(call)
        n = call.batch_size
        biggest = self.buckets[-1]
        shared = {k: tf.convert_to_tensor(v) for k, v in call.shared.items()}
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, n, biggest):
            rows = min(biggest, n - start)
            bucket = self.buckets[bisect.bisect_left(self.buckets, rows)]
            chunk = {k: _pad_rows(v[start:start + rows], bucket) for k, v in call.batched.items()}
            self._note_shape(call.key, bucket)
            with tf.device(self.device or None):
                out = fn(chunk, shared)
            parts.append({k: v.numpy()[:rows] for k, v in out.items()})
        result = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return call.finish(result) if call.finish is not None else result

    def bucket_for(self, rows: int) -> int:
        """Padded size of a chunk of ``rows`` rows."""
        return self.buckets[bisect.bisect_left(self.buckets, min(rows, self.buckets[-1]))]

    # -- internals --------------------------------------------------------------------------------
    def _note_shape(self, key: tuple[Hashable, ...], bucket: int) -> None:
        if self.xla and (key, bucket) not in self._shapes_seen:
            with self._lock:
                if (key, bucket) not in self._shapes_seen:
                    self._shapes_seen.add((key, bucket))
                    self.compile_counts[_key_name(key)] += 1

    def _function(self, call: PreparedCall) -> Callable[..., Any]:
        struct = (
            call.key,
            tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(call.batched.items())),
            tuple((k, v.dtype.str, v.ndim) for k, v in sorted(call.shared.items())),
        )
        fn = self._functions.get(struct)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._functions.get(struct)
            if fn is None:
                fn = self._compile(call)
                self._functions[struct] = fn
        return fn

    def _compile(self, call: PreparedCall) -> Callable[..., Any]:
        body = methods.get(str(call.key[0])).build(self.model, call.key)
        name = _key_name(call.key)
        counts = self.trace_counts

        def traced(batched: Mapping[str, tf.Tensor], shared: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            counts[name] += 1  # runs only while TensorFlow traces
            return body(batched, shared)

        signature = [
            {k: tf.TensorSpec((None,) + v.shape[1:], tf.as_dtype(v.dtype), name=None)
             for k, v in call.batched.items()},
            {k: tf.TensorSpec((None,) * v.ndim, tf.as_dtype(v.dtype)) for k, v in call.shared.items()},
        ]
        return tf.function(traced, input_signature=signature, jit_compile=self.xla or None,
                           autograph=False)
