"""The compiled engine of one model version: tf.functions keyed so that requests never retrace.

For each (method key, array structure) the engine traces one ``tf.function`` whose input
signature leaves the batch dimension free, so every batch size reuses it. Batches are padded to
bucket sizes (repeating the last row, so padded rows stay finite) and larger batches run in
chunks of the biggest bucket, or of up to 16 of them for the one-pass methods (predict,
gradient): XLA, when on, compiles a bounded set of shapes. XLA "auto" times
the gradient both ways at warm-up and keeps the faster (``select_xla``); a function XLA cannot
compile falls back to a plain ``tf.function``. No gRPC here: the engine takes and returns NumPy
arrays.

Backends (``EngineConfig.backend``): the one-pass methods (``LITE_METHODS``) of a model on the
CPU may run in the LiteRT interpreter (``server/litert.py``) instead of TensorFlow. At a
function's first call (warm-up runs the smallest bucket first) the engine converts it (from the
concrete function it already traced: no second trace), runs both backends on that chunk and on
seeded random inputs of its shape, and chooses LiteRT for the function only where it reproduces
TensorFlow's answers (``litert.reproduces``) and, under "auto", is faster (``LITE_MARGIN``);
every later batch size is checked the same way and follows that choice, so that merged and
unmerged rows get the same bits. Everything else, every chunk bigger than the biggest
bucket (the large-batch steps) and every device other than the CPU runs in TensorFlow; the
cancellation check between chunks is the same for both. ``backends`` and ``backend_summary``
say which runs where.
"""
from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import tensorflow as tf

from gradserve.server.compute import litert, methods
from gradserve.server.config import EngineConfig
from gradserve.server.core.spec import PreparedCall
from gradserve.server.models.loading import device_scope
from gradserve.server.models.modelfn import ModelFunction

tf.get_logger().setLevel("ERROR")  # per-key functions are intended; silence the retracing warning

__all__ = ["CompiledModel", "XLA_MARGIN", "LITE_MARGIN", "LITE_MARGIN_COMPUTE_BOUND", "LITE_METHODS"]

_log = logging.getLogger("gradserve.server")

#: XLA "auto" keeps XLA only when its best time is below this fraction of the plain one.
XLA_MARGIN = 0.9
#: Methods whose work per row is one forward (and backward) pass run up to LARGE_STEP_BUCKETS
#: biggest-buckets of rows per engine call, while their inputs hold at most this many elements
#: (see ``CompiledModel._step``); the others run in chunks of the biggest bucket.
LARGE_STEP_ELEMENTS = {"predict": 1 << 20, "gradient": 1 << 18, "input_x_gradient": 1 << 18}
LARGE_STEP_BUCKETS = 16
#: Methods whose compiled function may run in LiteRT: one pass per row, no shared arrays.
#: (The others loop over path points or samples in chunks: TensorFlow's dispatch is a small
#: part of their cost, and their first call should not also pay a conversion.)
LITE_METHODS = frozenset({"predict", "gradient", "input_x_gradient"})
#: ``--backend auto`` chooses LiteRT for a function only when its best time at the function's
#: first batch size is below this fraction of TensorFlow's.
LITE_MARGIN = 0.9
#: A TensorFlow call slower than this is dominated by its kernels, not its dispatch: there the
#: two backends' times depend on the machine's load (TensorFlow's kernels use a thread pool,
#: the interpreter one thread; ``cnn``'s batch-64 gradient was 3x faster in LiteRT at one
#: warm-up and 3.5x slower in the next busy minute), so LiteRT must be at least twice as fast.
LITE_COMPUTE_BOUND_S = 1e-3
LITE_MARGIN_COMPUTE_BOUND = 0.5
#: Calls of each backend when a batch size is tried: untimed, then timed (best counts).
LITE_WARM = 3
LITE_REPEATS = 7
_TF = "tensorflow"
_LITE = "litert"


def _key_name(key: tuple[Hashable, ...]) -> str:
    """Readable counter name for a function key, e.g. "gradient(('alpha','sum',...),...)"."""
    return f"{key[0]}{key[1:]!r}" if len(key) > 1 else str(key[0])


#: Inputs at least this large enter TensorFlow through DLPack, without a copy (``_feed``).
ZERO_COPY_BYTES = 1 << 20


def _feed(chunk: dict[str, np.ndarray]) -> dict[str, Any]:
    """A chunk's arrays as a compiled function takes them. Converting a NumPy array copies it
    (measured: 34 ms for 64 MiB through an identity model against 8 ms without); a large, writable,
    C-contiguous, 64-byte-aligned array is handed over through DLPack instead, sharing its memory
    (e.g. a caller's shared-memory region). TensorFlow never writes into its inputs."""
    out: dict[str, Any] = {}
    for k, v in chunk.items():
        if (v.nbytes >= ZERO_COPY_BYTES and v.flags.c_contiguous and v.flags.writeable
                and v.ctypes.data % 64 == 0):
            out[k] = tf.experimental.dlpack.from_dlpack(v.__dlpack__())
        else:
            out[k] = v
    return out


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
        #: Keys of _functions compiled with XLA (they fall back to plain if XLA fails).
        self._xla_structs: set[tuple[Any, ...]] = set()
        #: Method keys that fell back from XLA to plain TensorFlow.
        self._plain_keys: set[tuple[Hashable, ...]] = set()
        self._lock = threading.Lock()
        #: Requested backend: "auto", "tensorflow" or "litert" (see the module docstring).
        self.backend = config.backend
        #: Function name -> {padded batch size: "litert" | "tensorflow"}, once that size ran.
        self.backends: dict[str, dict[int, str]] = {}
        self._lite_ok = self.backend != _TF and _on_cpu(self.device) and litert.available()
        #: Converted functions by struct (None: conversion failed); runners by (struct, bucket)
        #: (None: that size stays on TensorFlow).
        self._lite_fns: dict[tuple[Any, ...], litert.LiteFunction | None] = {}
        self._lite_runners: dict[tuple[Any, ...], litert.BucketRunner | None] = {}
        self._lite_lock = threading.Lock()
        #: Per function (struct): whether it runs in LiteRT, chosen at its first batch size.
        self._lite_chosen: dict[tuple[Any, ...], bool] = {}
        #: (struct, bucket) -> the LiteRT runner kept for it and the batched arrays' names in the
        #: runner's order: the short path of ``run`` for a call of one chunk.
        self._lite_kept: dict[tuple[Any, ...], tuple[litert.BucketRunner, tuple[str, ...]]] = {}
        #: The padded size of a batch of n rows, for n up to the biggest bucket.
        self._bucket_of = [self.bucket_for(n) for n in range(self.buckets[-1] + 1)]

    # -- public -----------------------------------------------------------------------------------
    def run(self, call: PreparedCall) -> dict[str, np.ndarray]:
        """Run a prepared call; returns per-example arrays (batch first) keyed as the method made them."""
        struct = call.struct
        if struct is None:
            struct = call.struct = self._struct(call)
        batched = call.batched
        n = next(iter(batched.values())).shape[0] if batched else 0
        if 0 < n < len(self._bucket_of):
            # One chunk whose size LiteRT already took: straight to the interpreter.
            kept = self._lite_kept.get((struct, self._bucket_of[n]))
            if kept is not None:
                runner, names = kept
                call.check()
                if runner.rows == n:
                    return runner.run([batched[k] for k in names])
                out = runner.run([_pad_rows(batched[k], runner.rows) for k in names])
                return {k: v[:n] for k, v in out.items()}
        return self._run(call, struct)

    def _run(self, call: PreparedCall, struct: tuple[Any, ...]) -> dict[str, np.ndarray]:
        fn = self._functions.get(struct) or self._function(call)
        n = call.batch_size
        biggest = self.buckets[-1]
        step = self._step(call, biggest) if n > biggest else biggest  # one chunk: no step to size
        lite = self._lite_ok and not call.shared and str(call.key[0]) in LITE_METHODS
        names = sorted(call.batched)
        parts: list[dict[str, np.ndarray]] = []
        with device_scope(self.device):
            shared = {k: tf.convert_to_tensor(v) for k, v in call.shared.items()}
            start = 0
            while start < n:
                call.check()  # a cancelled or expired call stops here, between chunks
                rows = min(step, n - start)
                if rows > biggest and self.xla and rows != step:
                    rows = bucket = biggest  # XLA compiles per shape: only the full step is large
                elif rows > biggest:  # a multiple of the biggest bucket, unpadded
                    rows -= rows % biggest
                    bucket = rows
                else:
                    bucket = self.buckets[bisect.bisect_left(self.buckets, rows)]
                chunk = {k: _pad_rows(v[start:start + rows], bucket) for k, v in call.batched.items()}
                self._note_shape(call.key, bucket)
                runner = self._lite_runner(call, struct, fn, chunk, bucket) if lite and bucket <= biggest else None
                if runner is not None:
                    out_np = runner.run([chunk[k] for k in names])
                    parts.append({k: v[:rows] for k, v in out_np.items()})
                    start += rows
                    continue
                feed = _feed(chunk)
                try:
                    out = fn(feed, shared)
                except tf.errors.OpError as exc:
                    fn = self._without_xla(call, exc)  # re-raises unless XLA was in use
                    out = fn(feed, shared)
                parts.append({k: v.numpy()[:rows] for k, v in out.items()})
                start += rows
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _step(self, call: PreparedCall, biggest: int) -> int:
        """Rows per engine call: the biggest bucket, or for the one-pass methods
        (``LARGE_STEP_ELEMENTS``) up to ``LARGE_STEP_BUCKETS`` times it while their inputs stay
        under that method's element cap.

        A plain function takes any batch without retracing (XLA compiles the one extra shape of
        the full step), and a pass over narrow rows costs mostly the ~0.25 ms of each call: 16 MiB
        of 1024-wide float32 rows was 64 predict calls, 16.8 ms, against 6 ms in calls of 1024
        rows, and a 1 GiB batch of ``dense2`` rows is 16x fewer gradient calls. Gradients get a
        smaller cap than predict: the tape keeps the activations of every row.
        """
        cap = LARGE_STEP_ELEMENTS.get(str(call.key[0]))
        if cap is None or not call.batched:
            return biggest
        row_elements = max(1, sum(math.prod(v.shape[1:]) for v in call.batched.values()))
        multiple = min(LARGE_STEP_BUCKETS, cap // (row_elements * biggest))
        step = biggest * max(1, multiple)
        # A batch smaller than one such step keeps bucket-sized chunks (and a cancellation
        # point between each).
        return step if call.batch_size >= step else biggest

    def select_xla(self, call: PreparedCall, repeats: int = 5) -> dict[str, float]:
        """Measure ``call`` compiled with and without XLA at the biggest bucket; keep the faster.

        Each variant is traced (and compiled) once, then timed ``repeats`` times; the best time
        counts, which is robust to a busy machine. XLA is kept only when clearly faster
        (``XLA_MARGIN``); a variant that fails (XLA cannot compile an op) loses. Sets
        ``self.xla``, keeps the winner as ``call``'s compiled function (so it never retraces) and
        returns the best time of each variant in seconds (inf: failed). Call it before any other
        function is compiled: the others follow ``self.xla``.
        """
        bucket = self.buckets[-1]
        chunk = {k: _pad_rows(v[:bucket], bucket) for k, v in call.batched.items()}
        timings: dict[str, float] = {}
        candidates: dict[str, Callable[..., Any]] = {}
        with device_scope(self.device):
            shared = {k: tf.convert_to_tensor(v) for k, v in call.shared.items()}
            for label, jit in (("plain", False), ("xla", True)):
                fn = self._compile(call, xla=jit)
                try:
                    best = float("inf")
                    for i in range(repeats + 1):
                        start = time.perf_counter()
                        out = fn(chunk, shared)
                        for v in out.values():
                            v.numpy()  # wait for the result: async devices return early
                        if i:  # the first call traces and compiles
                            best = min(best, time.perf_counter() - start)
                except Exception as exc:  # noqa: BLE001 - XLA may not support an op; plain wins
                    _log.info("the %s variant of %s failed at warm-up (%s: %s)", label, _key_name(call.key),
                              type(exc).__name__, str(exc)[:200])
                    best = float("inf")
                timings[label] = best
                candidates[label] = fn
        # XLA must win clearly: it also costs a compilation per new batch shape, and a near tie
        # is measurement noise on a busy machine.
        self.xla = timings["xla"] < XLA_MARGIN * timings["plain"]
        with self._lock:
            self._functions[self._struct(call)] = candidates["xla" if self.xla else "plain"]
            if self.xla:
                self._xla_structs.add(self._struct(call))
        if self.xla:
            self._note_shape(call.key, bucket)
        return timings

    def bucket_for(self, rows: int) -> int:
        """Padded size of a chunk of ``rows`` rows."""
        return self.buckets[bisect.bisect_left(self.buckets, min(rows, self.buckets[-1]))]

    def runs_in_litert(self, call: PreparedCall) -> bool:
        """Whether ``call`` would run in LiteRT as one chunk already tried and kept: a call of a
        few µs that holds no TensorFlow thread pool, which a caller may run inline (on its own
        thread) instead of handing it to the compute threads. False until that batch size has
        been tried (the first call of a size runs the trial, in TensorFlow's time)."""
        n = call.batch_size
        if not self._lite_ok or call.shared or not 0 < n <= self.buckets[-1]:
            return False
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        return self._lite_runners.get((self._struct(call), bucket)) is not None

    def backend_summary(self) -> dict[str, str]:
        """Function name -> where it runs, e.g. "litert (batch 1-64)", "tensorflow" or
        "litert (batch 1-8), tensorflow (batch 16-64)"."""
        out: dict[str, str] = {}
        for name, sizes in sorted(self.backends.items()):
            parts = []
            for backend in (_LITE, _TF):
                rows = sorted(b for b, v in sizes.items() if v == backend)
                if rows:
                    parts.append(f"{backend} (batch {rows[0]}-{rows[-1]})" if len(rows) > 1 else
                                 f"{backend} (batch {rows[0]})")
            out[name] = ", ".join(parts)
        return out

    def _lite_runner(self, call: PreparedCall, struct: tuple[Any, ...], fn: Callable[..., Any],
                     chunk: dict[str, np.ndarray], bucket: int) -> litert.BucketRunner | None:
        """The LiteRT runner of ``struct`` at ``bucket``, or None (TensorFlow runs the chunk).

        The first chunk of a size tries LiteRT (``_try_lite``); while one thread tries, the
        others run TensorFlow rather than wait.
        """
        key = (struct, bucket)
        try:
            return self._lite_runners[key]
        except KeyError:
            pass
        if not self._lite_lock.acquire(blocking=False):
            return None
        try:
            if key not in self._lite_runners:
                runner = self._lite_runners[key] = self._try_lite(call, struct, fn, chunk, bucket)
                if runner is not None:
                    self._lite_kept[key] = (runner, tuple(sorted(chunk)))
            return self._lite_runners[key]
        finally:
            self._lite_lock.release()

    def _try_lite(self, call: PreparedCall, struct: tuple[Any, ...], fn: Callable[..., Any],
                  chunk: dict[str, np.ndarray], bucket: int) -> litert.BucketRunner | None:
        """Convert (once per function) and check LiteRT against TensorFlow at ``bucket``.

        The backend is chosen once per function, at its first batch size (warm-up: the
        smallest): there LiteRT must reproduce TensorFlow's answers and, under auto, be faster.
        Every later size follows that choice after the same check, so that a row's answer does not
        depend on the batch it was merged into (the interpreter's kernels compute each row the same
        way at every batch size; two backends would differ in the last bits).
        """
        name = _key_name(call.key)
        sizes = self.backends.setdefault(name, {})
        sizes[bucket] = _TF
        if struct not in self._lite_fns:
            try:
                if not hasattr(fn, "concrete"):  # not a function _compile made (a test's wrapper)
                    raise litert.LiteUnsupported("no concrete function to convert")
                if fn.concrete is None:
                    fn(chunk, {})  # the concrete function exists once it has been called
                self._lite_fns[struct] = litert.convert(fn.concrete)
            except Exception as exc:  # noqa: BLE001 - any failure keeps TensorFlow
                self._lite_fns[struct] = None
                _log.info("%s stays on TensorFlow: %s", name, str(exc)[:300])
        converted = self._lite_fns[struct]
        if converted is None or self._lite_chosen.get(struct) is False:
            return None
        names = sorted(chunk)
        rng = np.random.default_rng(0)
        # The chunk itself and random inputs of its shape (zeros, as at warm-up, would hide
        # most differences): floating arrays standard normal, the others as they are.
        trials = [chunk, {k: (rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
                          for k, v in chunk.items()}]
        try:
            runner = converted.for_bucket(bucket)
            for inputs in trials:
                want = {k: v.numpy() for k, v in fn(inputs, {}).items()}
                diff = litert.reproduces(runner.run([inputs[k] for k in names]), want)
                if diff:
                    _log.warning("%s at batch %d stays on TensorFlow: LiteRT differs (%s)", name, bucket, diff)
                    self._lite_chosen.setdefault(struct, False)
                    return None
            if struct in self._lite_chosen:  # chosen at an earlier size
                sizes[bucket] = _LITE
                return runner
            t_tf = t_lite = float("inf")
            flat = [chunk[k] for k in names]
            for i in range(LITE_WARM + LITE_REPEATS):  # alternating: a busy spell hits both alike
                t0 = time.perf_counter()
                for v in fn(chunk, {}).values():
                    v.numpy()
                t1 = time.perf_counter()
                runner.run(flat)
                t2 = time.perf_counter()
                if i >= LITE_WARM:  # TensorFlow's first calls at a new shape are slower
                    t_tf, t_lite = min(t_tf, t1 - t0), min(t_lite, t2 - t1)
        except Exception as exc:  # noqa: BLE001 - e.g. an interpreter that cannot take the shape
            _log.info("%s at batch %d stays on TensorFlow: %s: %s", name, bucket, type(exc).__name__,
                      str(exc)[:300])
            self._lite_chosen.setdefault(struct, False)
            return None
        margin = LITE_MARGIN if t_tf < LITE_COMPUTE_BOUND_S else LITE_MARGIN_COMPUTE_BOUND
        if self.backend == "auto" and not t_lite < margin * t_tf:
            _log.info("%s stays on TensorFlow (%.0f us at batch %d) over LiteRT (%.0f us)", name, t_tf * 1e6,
                      bucket, t_lite * 1e6)
            self._lite_chosen[struct] = False
            return None
        self._lite_chosen[struct] = True
        sizes[bucket] = _LITE
        _log.info("%s runs in LiteRT (%.1f us at batch %d; TensorFlow %.0f us)", name, t_lite * 1e6, bucket,
                  t_tf * 1e6)
        return runner

    # -- internals --------------------------------------------------------------------------------
    def _note_shape(self, key: tuple[Hashable, ...], bucket: int) -> None:
        if self.xla and (key, bucket) not in self._shapes_seen and key not in self._plain_keys:
            with self._lock:
                if (key, bucket) not in self._shapes_seen:
                    self._shapes_seen.add((key, bucket))
                    self.compile_counts[_key_name(key)] += 1

    @staticmethod
    def _struct(call: PreparedCall) -> tuple[Any, ...]:
        """What selects a compiled function: the method key and the arrays' dtypes and shapes
        without the (free) batch dimension."""
        return (
            call.key,
            tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(call.batched.items())),
            tuple((k, v.dtype.str, v.ndim) for k, v in sorted(call.shared.items())),
        )

    def _without_xla(self, call: PreparedCall, exc: Exception) -> Callable[..., Any]:
        """Replace ``call``'s XLA function by a plain one after XLA failed on it (an op XLA
        cannot compile); re-raise ``exc`` when the function was not compiled with XLA."""
        struct = self._struct(call)
        with self._lock:
            if struct not in self._xla_structs:
                raise exc
            self._xla_structs.discard(struct)
            fn = self._functions[struct] = self._compile(call, xla=False)
            # No XLA compilation of this key succeeded or will happen: keep compile_counts true.
            self._plain_keys.add(call.key)
            self.compile_counts.pop(_key_name(call.key), None)
        _log.warning("XLA failed on %s (%s); this function runs without XLA", _key_name(call.key),
                     type(exc).__name__)
        return fn

    def _function(self, call: PreparedCall) -> Callable[..., Any]:
        struct = self._struct(call)
        fn = self._functions.get(struct)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._functions.get(struct)
            if fn is None:
                fn = self._compile(call)
                self._functions[struct] = fn
                if self.xla:
                    self._xla_structs.add(struct)
        return fn

    def _compile(self, call: PreparedCall, xla: bool | None = None) -> Callable[..., Any]:
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
        fn = tf.function(traced, input_signature=signature, jit_compile=(self.xla if xla is None else xla) or None,
                         autograph=False)
        # The signature fixes the one trace: calling its concrete function skips tf.function's
        # per-call argument binding and type matching (~390 -> ~220 us per batch-1 call). It is
        # made on the first call, so that nothing is traced before a call is known to run.
        # Its flat entry point (``_call_flat``) skips the structured binding as well, which
        # costs a batch-1 call ~100 us of GIL-holding Python that the event loop then waits
        # for; inputs go in the order tf.nest flattens the signature (dicts by sorted key).
        # Should that private entry point change or refuse, the public call is used instead.
        concrete: list[Any] = []
        order = [(0, k) for k in sorted(call.batched)] + [(1, k) for k in sorted(call.shared)]
        dtypes = [tf.as_dtype((call.batched, call.shared)[i][k].dtype) for i, k in order]
        flat_ok = [True]

        class CallConcrete:
            """The compiled function; ``concrete`` is its concrete function once called."""

            concrete: Any = None

            def __call__(self, batched: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, tf.Tensor]:
                return call_concrete(batched, shared)

        caller = CallConcrete()

        def call_concrete(batched: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, tf.Tensor]:
            if not concrete:
                concrete.append(fn.get_concrete_function())
                caller.concrete = concrete[0]
            cf = concrete[0]
            if flat_ok[0]:
                parts = (batched, shared)
                try:
                    flat = [tf.convert_to_tensor(parts[i][k], dt) for (i, k), dt in zip(order, dtypes)]
                    return cf._call_flat(flat, cf.captured_inputs)  # type: ignore[no-any-return]
                except (AttributeError, TypeError):
                    flat_ok[0] = False
            return cf(batched, shared)  # type: ignore[no-any-return]

        return caller


def _on_cpu(device: str) -> bool:
    """Whether the engine's functions run on the CPU (LiteRT never takes another device's work)."""
    if device:
        return tf.DeviceSpec.from_string(device).device_type in (None, "CPU")
    return not tf.config.list_logical_devices("GPU")
