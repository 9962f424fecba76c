"""What the data plane answers: computed arrays and model descriptions, as plain data (no TF, no gRPC).

``ComputeResult``, made for every request, is a typed ``NamedTuple`` (immutable, and cheap to
build); the model descriptions stay frozen dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, NamedTuple

import numpy as np

from gradserve.server.core.models import ModelState, TensorSpec

__all__ = ["ComputeResult", "ModelInfo", "VersionInfo"]


_NO_ARRAYS: Mapping[str, np.ndarray] = MappingProxyType({})


class ComputeResult(NamedTuple):
    """One computed request: per-example arrays (batch first) by output / input / extra name."""

    model: str
    version: int
    outputs: Mapping[str, np.ndarray] = _NO_ARRAYS
    attributions: Mapping[str, np.ndarray] = _NO_ARRAYS
    extras: Mapping[str, np.ndarray] = _NO_ARRAYS
    #: The output index each example's target used (index and argmax targets), else None.
    target_indices: np.ndarray | None = None


@dataclass(frozen=True)
class VersionInfo:
    """One version of a model: its state and, once loaded, its signature and engine facts."""

    version: int
    state: ModelState
    message: str = ""
    source: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    xla: bool = False
    device: str = ""
    batch_buckets: tuple[int, ...] = ()
    layers: tuple[str, ...] = ()
    trace_counts: Mapping[str, int] = field(default_factory=dict)
    compile_counts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """A hosted model and its versions (ascending)."""

    name: str
    versions: tuple[VersionInfo, ...]
