"""The neutral request: what every front-end makes of its wire format.

The native protocol's ComputeRequest and the Open Inference Protocol's inference requests (over
gRPC or REST) are parsed by their front-ends into one ``ComputeRequest``: decoded arrays, names
instead of wire enums, and the method's options as typed, frozen objects (``core.spec``). The
data plane checks it against the model and the limits once, for every protocol
(``dataplane.validation.check``): so a bad value gets the same status and message whichever
protocol carried it.

``ComputeRequest`` and ``Selection`` are typed ``NamedTuple`` records: immutable like the frozen
dataclasses they were, at a fifth of the cost to build (a frozen dataclass sets each field
through ``object.__setattr__``: ~1.6 µs for a request, ~0.3 µs as a named tuple), since every
request builds them. Change one with ``_replace``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, NamedTuple

import numpy as np

from gradserve.server.core.spec import MethodOptions

__all__ = ["Selection", "ComputeRequest", "NO_ARRAYS"]

#: The empty mapping of arrays that optional array fields default to (read-only: it is shared).
NO_ARRAYS: Mapping[str, np.ndarray] = MappingProxyType({})


class Selection(NamedTuple):
    """Which scalar per example is differentiated, as the caller named it (the data plane resolves
    it against the model's outputs)."""

    #: The output, by name or by position (0: the first output).
    output: str | int = 0
    kind: str = "sum"                      # "sum" | "index" | "argmax"
    #: With kind "index": one index for every example, or one per example.
    indices: np.ndarray | None = None
    transform: str = "identity"            # "identity" | "softmax" | "log_softmax" | "sigmoid"
    #: Differentiate the logits feeding the output's final activation.
    logits: bool = False


class ComputeRequest(NamedTuple):
    """One computation asked for, whatever the protocol (see the module docstring)."""

    model: str
    #: Input arrays by model input name, batch first.
    inputs: Mapping[str, np.ndarray]
    method: str = "gradient"
    #: 0: the highest READY version.
    version: int = 0
    target: Selection = Selection()
    #: Inputs to differentiate; empty: every floating input.
    wrt: tuple[str, ...] = ()
    #: Also return the model outputs from the same pass.
    include_outputs: bool = False
    #: Attribute to this layer's output instead of the inputs ("" : the inputs).
    layer: str = ""
    #: The method's options as given (0 and None stand for the defaults); checked by the data plane.
    options: MethodOptions | None = None
    #: Integrated gradients' baselines by input name (scalars or arrays).
    baselines: Mapping[str, np.ndarray] = NO_ARRAYS
    #: jvp/hvp tangents by input name.
    tangents: Mapping[str, np.ndarray] = NO_ARRAYS
    #: vjp cotangent, shaped like the selected output.
    cotangent: np.ndarray | None = None
    #: shap: the background rows by input name, batch first.
    background: Mapping[str, np.ndarray] = NO_ARRAYS
    request_id: str = ""
    #: Bytes the request occupies (its size on the wire), held against the memory budget while it
    #: is served; 0: the size of its arrays.
    nbytes: int = 0

    @property
    def batch_size(self) -> int | None:
        """Rows of the first input (None when it has no batch axis)."""
        for arr in self.inputs.values():
            return int(arr.shape[0]) if arr.ndim else None
        return None

    def held_bytes(self) -> int:
        """What the request holds against the memory budget (``nbytes``, else its arrays' size)."""
        return self.nbytes or sum(arr.nbytes for arr in (*self.inputs.values(), *self.background.values()))


@dataclass(frozen=True)
class FactorRequest:
    """One varied input element of an analysis, as the caller named it."""

    #: Model input ("" : the only input) and the element's position in one example (C order).
    input: str
    index: int
    #: Display name ("" : made from the input and index).
    name: str = ""
    #: SALib's distribution name ("unif", "norm", "lognorm", "triang") and its parameters.
    distribution: str = "unif"
    params: tuple[float, ...] = ()


@dataclass(frozen=True)
class AnalysisRequest:
    """One global sensitivity analysis asked for (the data plane checks it against the model)."""

    model: str
    method: str                            # "sobol" | "dgsm" | "morris"
    factors: tuple[FactorRequest, ...]
    samples: int
    version: int = 0
    #: The analysed output, by name or position, and one element of its last axis (None: the sum).
    output: str | int = 0
    output_element: int | None = None
    seed: int | None = None
    #: 0: the defaults (0.95 and 100).
    conf_level: float = 0.0
    resamples: int = 0
    second_order: bool = False
    #: Morris grid levels (0: the default, 4).
    levels: int = 0
    request_id: str = ""
