"""Model metadata as the SDK sees it, and the conversion of caller inputs to wire tensors.

Shared by ``Client`` and ``AsyncClient`` so that both validate and convert identically.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from gradserve import _codec
from gradserve._exceptions import InvalidArgument, NotFound
from gradserve.v1 import model_service_pb2 as _model_pb2

__all__ = ["TensorInfo", "VersionInfo", "ModelInfo", "Inputs", "PreparedInputs", "prepare_inputs"]

#: What callers may pass as inputs: one array-like, a list in input order, or a dict by name.
Inputs = Any


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape (-1 for any size) of one model input or output."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    differentiable: bool = False


@dataclass(frozen=True)
class VersionInfo:
    """One version of a model and its signature."""

    version: int
    state: str
    message: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    source: str = ""
    xla: bool = False
    device: str = ""
    layers: tuple[str, ...] = ()
    batch_buckets: tuple[int, ...] = ()
    trace_counts: Mapping[str, int] = field(default_factory=dict)
    compile_counts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """A model and all of its versions (ascending)."""

    name: str
    versions: tuple[VersionInfo, ...]

    def ready(self, version: int = 0) -> VersionInfo | None:
        """The requested version if READY (version 0: the highest READY one), else None."""
        ready = [v for v in self.versions if v.state == "READY"]
        if version:
            ready = [v for v in ready if v.version == version]
        return ready[-1] if ready else None

    @cached_property
    def inputs(self) -> tuple[TensorInfo, ...]:
        """Inputs of the latest READY version (else of the latest one)."""
        v = self.ready() or (self.versions[-1] if self.versions else None)
        return v.inputs if v else ()

    @cached_property
    def outputs(self) -> tuple[TensorInfo, ...]:
        """Outputs of the latest READY version (else of the latest one)."""
        v = self.ready() or (self.versions[-1] if self.versions else None)
        return v.outputs if v else ()

    @classmethod
    def from_proto(cls, msg: _model_pb2.ModelInfo) -> "ModelInfo":
        def spec(s: Any) -> TensorInfo:
            return TensorInfo(s.name, _codec.DTYPES.get(s.dtype, np.dtype("V1")), tuple(s.shape),
                              s.differentiable)

        versions = tuple(
            VersionInfo(
                version=v.version,
                state=str(_model_pb2.ModelState.Name(v.state)).removeprefix("MODEL_STATE_"),
                message=v.message,
                inputs=tuple(spec(s) for s in v.inputs),
                outputs=tuple(spec(s) for s in v.outputs),
                source=v.source, xla=v.xla, device=v.device, layers=tuple(v.layers),
                batch_buckets=tuple(v.batch_buckets), trace_counts=dict(v.trace_counts),
                compile_counts=dict(v.compile_counts),
            )
            for v in msg.versions
        )
        return cls(msg.name, versions)


@dataclass(frozen=True)
class PreparedInputs:
    """Inputs keyed by model input name, plus how the caller structured them (to mirror results)."""

    arrays: dict[str, np.ndarray]
    structure: str  # "single" | "list" | "dict"
    order: tuple[str, ...]


def _convert(value: Any, spec: TensorInfo | None, field: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        raise InvalidArgument(f"{field}: cannot convert object array-like to a tensor")
    if spec is None:
        return arr
    if arr.dtype != spec.dtype:
        src, dst = arr.dtype, spec.dtype
        int_to_float = src.kind in "biu" and dst.kind == "f"
        if not (int_to_float or np.can_cast(src, dst, casting="same_kind")):
            raise InvalidArgument(f"{field}: dtype {src} cannot be converted to the model's "
                                  f"{dst} (same-kind casting)")
        arr = arr.astype(dst)
    if spec.shape:
        if arr.ndim != len(spec.shape):
            raise InvalidArgument(f"{field}: rank {arr.ndim} (shape {list(arr.shape)}) but the model "
                                  f"expects rank {len(spec.shape)} (shape {list(spec.shape)})")
        for i, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if i > 0 and want >= 0 and got != want:
                raise InvalidArgument(f"{field}: dimension {i} is {got} but the model expects {want}")
    return arr


def prepare_inputs(inputs: Inputs, specs: Sequence[TensorInfo], field: str = "inputs") -> PreparedInputs:
    """Convert caller inputs to arrays keyed by input name, checked against the model's specs.

    ``specs`` may be empty (metadata unknown): then a single array-like goes to input "input"
    and no conversion or shape check is made here (the server still validates).
    """
    by_name = {s.name: s for s in specs}
    order = tuple(s.name for s in specs)
    if isinstance(inputs, Mapping):
        unknown = [k for k in inputs if specs and k not in by_name]
        if unknown:  # NOT_FOUND, as the server answers it (docs/errors.md)
            raise NotFound(f"{field}: unknown input name {unknown[0]!r}; the model's inputs "
                                  f"are {list(order)}")
        missing = [k for k in order if k not in inputs]
        if missing:
            raise InvalidArgument(f"{field}: missing input {missing[0]!r}")
        arrays = {str(k): _convert(v, by_name.get(k), f"{field}[{k!r}]") for k, v in inputs.items()}
        return PreparedInputs(arrays, "dict", order or tuple(arrays))
    if len(specs) > 1:
        if not isinstance(inputs, (list, tuple)) or len(inputs) != len(specs):
            raise InvalidArgument(f"{field}: the model has {len(specs)} inputs {list(order)}; pass a "
                                  "dict by name or a list in that order")
        arrays = {s.name: _convert(v, s, f"{field}[{s.name!r}]") for s, v in zip(specs, inputs)}
        return PreparedInputs(arrays, "list", order)
    name = specs[0].name if specs else "input"
    return PreparedInputs({name: _convert(inputs, specs[0] if specs else None, field)}, "single", (name,))


def mirror(results: Mapping[str, np.ndarray], prepared: PreparedInputs) -> Any:
    """Shape a per-input result dict like the caller's inputs (array, list or dict)."""
    if prepared.structure == "dict":
        # The caller's key order first, then anything the caller did not name (e.g. ``wrt``).
        ordered = {k: results[k] for k in prepared.arrays if k in results}
        ordered.update({k: v for k, v in results.items() if k not in ordered})
        return ordered
    if prepared.structure == "single":
        if len(results) == 1:
            return next(iter(results.values()))
        return dict(results)
    return [results[n] for n in prepared.order if n in results]
