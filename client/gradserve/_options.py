"""Typed request options: what a call asks for besides its tensors, checked once when built.

Each SDK method builds one ``ComputeOptions`` (frozen, hashable); ``compute`` and ``stream``
build it from their keyword arguments with ``ComputeOptions.of``. The encoder in ``_requests``
is the only reader. Tensors other than the inputs (baselines, tangents, cotangents) travel
apart, in ``Operands``, because they are data, not options.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradserve import _names
from gradserve._exceptions import InvalidArgument

__all__ = ["Target", "Selection", "IntegratedGradientsOptions", "SmoothGradOptions",
           "ComputeOptions", "Operands", "quadrature_of"]


#: None (sum per example), an int, a sequence of ints (one per example) or "argmax".
Target = int | Sequence[int] | str | None


def _positive(value: int | None, field: str) -> int | None:
    """None (the server's default) or a positive int; 0 and below are refused, not defaulted."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidArgument(f"{field}: must be a positive int (None for the server's default), got {value!r}")
    return int(value)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)   # normalising a frozen dataclass in __post_init__


@dataclass(frozen=True, slots=True)
class Selection:
    """Which scalar per example is differentiated: ``target`` of output ``output`` after ``transform``.

    ``target`` is normalised to None, an int, "argmax" or a tuple of ints (one per example).
    """

    target: Any = None
    output: str | int | None = None
    transform: str | None = None
    logits: bool = False

    def __post_init__(self) -> None:
        target = self.target
        if isinstance(target, str):
            if target != "argmax":
                raise InvalidArgument(f"target: expected None, an int, a sequence of ints or 'argmax', got {target!r}")
        elif target is not None and not isinstance(target, int):
            idx = np.asarray(target)
            if idx.dtype.kind not in "iu" or idx.ndim > 1:
                raise InvalidArgument("target: expected an int or a 1-D sequence of ints")
            _set(self, "target", int(idx) if idx.ndim == 0 else tuple(idx.tolist()))
        elif isinstance(target, bool):
            raise InvalidArgument("target: expected an int or a 1-D sequence of ints, got a bool")
        if self.transform is not None and self.transform not in _names.TRANSFORMS:
            raise InvalidArgument(f"transform: expected one of {sorted(_names.TRANSFORMS)}, "
                                  f"got {self.transform!r}")
        if isinstance(self.output, np.integer):
            _set(self, "output", int(self.output))
        elif self.output is not None and not isinstance(self.output, (str, int)):
            raise InvalidArgument(f"output: expected an output name or index, got {self.output!r}")
        if type(self.logits) is not bool:
            _set(self, "logits", bool(self.logits))

    @property
    def per_example(self) -> bool:
        """Whether ``target`` holds one index per example (sliced with the rows of a chunk)."""
        return isinstance(self.target, tuple)


@dataclass(frozen=True, slots=True)
class IntegratedGradientsOptions:
    """Path steps (None: the server's default, 50), quadrature rule, and whether to return the
    per-example convergence delta."""

    steps: int | None = None
    quadrature: str = "gausslegendre"
    return_delta: bool = False

    def __post_init__(self) -> None:
        _set(self, "steps", _positive(self.steps, "steps"))
        if self.quadrature not in _names.QUADRATURES:
            raise InvalidArgument(f"quadrature: unknown quadrature {self.quadrature!r}; expected one of "
                                  f"{sorted(_names.QUADRATURES)}")


@dataclass(frozen=True, slots=True)
class SmoothGradOptions:
    """Noisy samples (None: the server's default, 50), noise level, aggregation, seed and the
    attribution method averaged."""

    samples: int | None = None
    noise: float | None = None
    stdev: float | None = None
    kind: str = "mean"
    seed: int | None = None
    base_method: str = "gradient"

    def __post_init__(self) -> None:
        _set(self, "samples", _positive(self.samples, "samples"))
        if self.kind not in _names.AGGREGATIONS:
            raise InvalidArgument(f"kind: expected one of {sorted(_names.AGGREGATIONS)}, got {self.kind!r}")
        if self.base_method not in _names.SMOOTHGRAD_BASES:
            raise InvalidArgument(f"base_method: expected gradient, input_x_gradient or integrated_gradients, "
                                  f"got {self.base_method!r}")


@dataclass(frozen=True, slots=True)
class ComputeOptions:
    """Everything one call asks for except its tensors. Built once per call; hashable."""

    method: str
    version: int = 0
    selection: Selection | None = None
    wrt: Sequence[str] = ()   # a tuple once built
    return_outputs: bool = False
    layer: str | None = None
    integrated_gradients: IntegratedGradientsOptions | None = None
    smoothgrad: SmoothGradOptions | None = None
    upsample: bool = False

    def __post_init__(self) -> None:
        if self.method not in _names.METHODS:
            raise InvalidArgument(f"method: unknown method {self.method!r}; expected one of {sorted(_names.METHODS)}")
        if isinstance(self.wrt, str):
            raise InvalidArgument("wrt: expected a sequence of input names, got a str")
        if not isinstance(self.wrt, tuple):
            _set(self, "wrt", tuple(self.wrt or ()))

    @classmethod
    def of(cls, method: str, *, version: int = 0, target: Target = None, output: str | int | None = None,
           transform: str | None = None, logits: bool = False, wrt: Sequence[str] | None = None,
           return_outputs: bool = False, layer: str | None = None, steps: int | None = None,
           quadrature: str = "gausslegendre", return_delta: bool = False, samples: int | None = None,
           noise: float | None = None, stdev: float | None = None, kind: str = "mean", seed: int | None = None,
           base_method: str = "gradient", upsample: bool = False) -> "ComputeOptions":
        """The options of ``method`` from the keyword arguments ``compute`` and ``stream`` take.

        Options that ``method`` does not use are checked, then ignored (as the server ignores them).
        """
        # Built (and so checked) whether used or not: steps=0 is refused, never silently ignored.
        ig = IntegratedGradientsOptions(steps, quadrature, bool(return_delta))
        sg = SmoothGradOptions(samples, noise, stdev, kind, seed, base_method)
        uses_ig = method == "integrated_gradients" or (method == "smoothgrad" and base_method == "integrated_gradients")
        return cls(
            method, int(version),
            None if method == "predict" else Selection(target, output, transform, logits),
            tuple(wrt or ()), bool(return_outputs), layer or None,
            ig if uses_ig else None, sg if method == "smoothgrad" else None, bool(upsample))


@dataclass(frozen=True, slots=True)
class Operands:
    """The tensors of a call besides its inputs, given like the inputs (array, list or dict)."""

    baseline: Any = 0.0
    tangents: Any = None
    cotangents: Any = None


def quadrature_of(quadrature: str, method: str | None) -> str:
    """``quadrature``, or the deprecated ``method=`` of ``integrated_gradients`` that meant it."""
    if method is None:
        return quadrature
    warnings.warn("integrated_gradients(method=...) is deprecated: pass quadrature=... (method names the "
                  "sensitivity method everywhere else)", DeprecationWarning, stacklevel=3)
    if quadrature != "gausslegendre" and quadrature != method:
        raise InvalidArgument(f"quadrature: given as {quadrature!r} and, deprecated, as method={method!r}; "
                              "pass quadrature only")
    return method
