"""A request checked against its model, and the engine calls planned from it (no gRPC, no TF).

``ComputeSpec`` is what the data plane's check (``dataplane.validation``) makes of a neutral
``core.requests.ComputeRequest``: NumPy arrays, a resolved ``TargetSpec`` and the method's typed,
frozen options (``IntegratedGradientsOptions``, ``SmoothGradOptions``, ``GradCamOptions``), now
range-checked and with their defaults filled in. A method turns it into a ``PreparedCall``: a
hashable static key (a ``NamedTuple`` per method, whose first field is the method name) and the
arrays of the request. The engine returns a flat dict of per-example arrays that the data plane
splits into a ``ComputeResult``.

``TargetKey``, ``TargetSpec`` and ``ComputeSpec`` are typed ``NamedTuple`` records (immutable,
hashed in C, and built at a fifth of a frozen dataclass's cost: every request builds them);
change one with ``_replace``. The options stay frozen dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Hashable, Mapping, NamedTuple, Union

import numpy as np

from gradserve.server.core.control import CallControl
from gradserve.server.core.explain import PartialDependenceOptions, ShapOptions

__all__ = ["TargetKey", "TargetSpec", "IntegratedGradientsOptions", "SmoothGradOptions", "GradCamOptions",
           "MethodOptions", "ComputeSpec", "PreparedCall", "INPUT", "OUTPUT", "ATTRIBUTION", "EXTRA",
           "TARGET_INDICES"]

#: Key prefixes in PreparedCall.batched and in engine results.
INPUT = "input/"
OUTPUT = "output/"
ATTRIBUTION = "attribution/"
EXTRA = "extra/"
TARGET_INDICES = "target_indices"


class TargetKey(NamedTuple):
    """The static part of a target: what changes the traced graph (not the index values)."""

    output: str
    kind: str = "sum"                      # "sum" | "index" | "argmax"
    transform: str = "identity"            # "identity" | "softmax" | "log_softmax" | "sigmoid"
    use_logits: bool = False


class TargetSpec(NamedTuple):
    """Which scalar per example is differentiated (already resolved against the model)."""

    output: str
    kind: str = "sum"                      # "sum" | "index" | "argmax"
    indices: np.ndarray | None = None      # (batch,) int64, non-negative, for kind "index"
    transform: str = "identity"            # "identity" | "softmax" | "log_softmax" | "sigmoid"
    use_logits: bool = False

    @property
    def key(self) -> TargetKey:
        return TargetKey(self.output, self.kind, self.transform, self.use_logits)


#: Defaults of the wire's 0 ("use the default") values.
DEFAULT_STEPS = 50
DEFAULT_SAMPLES = 50
DEFAULT_NOISE = 0.15


@dataclass(frozen=True)
class IntegratedGradientsOptions:
    """Integrated gradients: path steps, quadrature rule, whether to return the delta."""

    steps: int = DEFAULT_STEPS
    quadrature: str = "gausslegendre"      # a rule of ``methods.quadrature``
    return_delta: bool = False


@dataclass(frozen=True)
class SmoothGradOptions:
    """SmoothGrad: samples, noise level (or absolute stdev), aggregation, seed and base method."""

    samples: int = DEFAULT_SAMPLES
    #: Noise stdev as a fraction of each example's value range (used when ``stdev`` is None).
    noise: float = DEFAULT_NOISE
    stdev: float | None = None
    aggregation: str = "mean"              # "mean" | "square" | "var"
    seed: int | None = None
    base_method: str = "gradient"          # "gradient" | "input_x_gradient" | "integrated_gradients"
    #: Options of the base method when it is integrated gradients.
    integrated: IntegratedGradientsOptions = IntegratedGradientsOptions()


@dataclass(frozen=True)
class GradCamOptions:
    """Grad-CAM: whether to resize the map to the image input's size."""

    upsample: bool = False


MethodOptions = Union[IntegratedGradientsOptions, SmoothGradOptions, GradCamOptions, ShapOptions,
                      PartialDependenceOptions]


#: The empty mapping of arrays that optional array fields default to (read-only: it is shared).
_NO_ARRAYS: Mapping[str, np.ndarray] = MappingProxyType({})


class ComputeSpec(NamedTuple):
    """A request checked against its model (see the module docstring)."""

    model: str
    version: int
    method: str
    inputs: Mapping[str, np.ndarray]
    batch_size: int
    target: TargetSpec | None = None
    wrt: tuple[str, ...] = ()
    #: Whether the caller named wrt; default wrt gives zeros for inputs the target ignores.
    wrt_explicit: bool = False
    include_outputs: bool = False
    request_id: str = ""
    layer: str = ""
    #: The method's typed options (None: the method has none, or their defaults).
    options: MethodOptions | None = None
    #: Integrated gradients' baselines by input name (scalars or arrays, broadcast by the method).
    baselines: Mapping[str, np.ndarray] = _NO_ARRAYS
    #: jvp/hvp tangents by input name.
    tangents: Mapping[str, np.ndarray] = _NO_ARRAYS
    #: vjp cotangent, shaped like the selected output.
    cotangent: np.ndarray | None = None


@dataclass(slots=True)
class PreparedCall:
    """One engine call: a static key (selects the compiled function) and its arrays.

    ``batched`` arrays have the batch as their first axis and may be merged with other calls of
    the same key and split back by rows; ``shared`` arrays are the same for every example and
    must be equal for calls to be merged.
    """

    #: A method's ``NamedTuple`` key; its first field is the method's name.
    key: tuple[Hashable, ...]
    batched: dict[str, np.ndarray]
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    #: The call it belongs to (deadline, cancellation); None for merged calls, which the
    #: batcher checks request by request.
    control: CallControl | None = None
    #: What selects the engine's compiled function for it (``CompiledModel._struct``: the key and
    #: the arrays' names, dtypes and shapes less the batch), set by the engine at the call's
    #: first run and carried by copies of the call with the same structure (merged calls, the
    #: data plane's calls planned from a first one), so that it is worked out once per kind.
    struct: tuple[Any, ...] | None = None

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` after which no further chunk is started (None: no deadline)."""
        return None if self.control is None else self.control.deadline

    def check(self) -> None:
        """Raise CancelledError or DeadlineExceededError when the work should not go on."""
        if self.control is not None:
            self.control.check()

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.batched.values())).shape[0]) if self.batched else 0
