"""Sensitivity methods: the math of each method, written once against ``ModelFunction``.

A method does two things:

- ``plan(spec, model, limits)`` checks what only the model can tell (layers, shapes of
  directions, answer sizes) and turns a ``ComputeSpec`` into a ``PreparedCall``: a hashable static
  key (a ``NamedTuple`` of everything that changes the traced graph, the method's name first)
  plus the arrays that vary per request (inputs, target indices, baselines, alphas, noise, ...).
  Option values come typed and range-checked from ``validation``; methods do not re-check them.
- ``build(model, key)`` returns the Python function the engine compiles once per key:
  ``(batched: dict[str, Tensor], shared: dict[str, Tensor]) -> dict[str, Tensor]``.

A method whose call depends on a plain request only through its inputs (``rebinds``: predict,
gradient, input x gradient) also rebinds a call it planned to another request of the same
kind (``dataplane.validation.request_kind``): the data plane plans the first request of a kind
and rebinds the others, without a spec.

Methods register themselves with ``@register``; ``get(name)`` finds them (validation, once per
request, and the engine, once per compiled function).
"""
from __future__ import annotations

import abc
import importlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from gradserve.server.core.errors import InvalidArgumentError

if TYPE_CHECKING:  # the package imports without TensorFlow (quadrature is NumPy-only)
    import numpy as np

    from gradserve.server.config import Limits
    from gradserve.server.core.spec import ComputeSpec, PreparedCall
    from gradserve.server.models.modelfn import ModelFunction

__all__ = ["SensitivityMethod", "CompiledBody", "register", "get"]

#: The function a method builds for one static key.
CompiledBody = Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]

_REGISTRY: dict[str, "SensitivityMethod"] = {}


class SensitivityMethod(abc.ABC):
    """One sensitivity method (see the module docstring)."""

    #: SDK/CLI name, e.g. "gradient"; also the first element of every key it makes.
    name: ClassVar[str]
    #: Whether the method differentiates (needs a target and wrt inputs).
    differentiates: ClassVar[bool] = True
    #: Whether ``rebind`` works: the call of a plain request (no options, baselines, tangents,
    #: cotangent or target indices) depends on it only through its inputs.
    rebinds: ClassVar[bool] = False

    @abc.abstractmethod
    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        """Validate the method's options and prepare the engine call."""

    @abc.abstractmethod
    def build(self, model: ModelFunction, key: Any) -> CompiledBody:
        """The function to compile for ``key`` (as made by ``plan``)."""

    def rebind(self, call: PreparedCall, inputs: Mapping[str, np.ndarray], batch: int) -> PreparedCall:
        """The call of another plain request of the kind ``call`` was planned for (same model, target,
        wrt, layer and input names, dtypes and shapes less the batch; see ``rebinds``): ``call``'s
        key with ``inputs`` (``batch`` rows each, checked). Only where ``rebinds`` is true."""
        raise NotImplementedError(f"{self.name} plans every request")


def register(cls: type[SensitivityMethod]) -> type[SensitivityMethod]:
    """Class decorator: make a method available under its ``name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> SensitivityMethod:
    """The method called ``name``; InvalidArgumentError when there is none."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidArgumentError(f"method: {name!r} is not supported by this server") from None


#: Modules whose import registers methods; imported on first use so that importing this
#: package (e.g. for ``quadrature``) does not import TensorFlow.
_MODULES = ("gradient", "integrated", "smoothgrad", "jacobian", "directional", "gradcam")
_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in _MODULES:
            importlib.import_module(f"{__name__}.{module}")
        _loaded = True
