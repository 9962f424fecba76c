"""Sensitivity methods: the math of each method, written once against ``ModelFunction``.

A method does two things:

- ``plan(spec, model, limits)`` validates its own options and turns a ``ComputeSpec`` into a
  ``PreparedCall``: a hashable static key (everything that changes the traced graph) plus the
  arrays that vary per request (inputs, target indices, baselines, alphas, noise, ...).
- ``build(model, key)`` returns the Python function the engine compiles once per key:
  ``(batched: dict[str, Tensor], shared: dict[str, Tensor]) -> dict[str, Tensor]``.

Methods register themselves with ``@register``; ``get(name)`` finds them.
"""
from __future__ import annotations

import abc
from typing import Callable, ClassVar, Hashable, Mapping

import tensorflow as tf

from gradserve.server.config import Limits
from gradserve.server.errors import InvalidArgumentError
from gradserve.server.modelfn import ModelFunction
from gradserve.server.spec import ComputeSpec, PreparedCall

__all__ = ["SensitivityMethod", "CompiledBody", "register", "get", "names"]

#: The function a method builds for one static key.
CompiledBody = Callable[[Mapping[str, tf.Tensor], Mapping[str, tf.Tensor]], dict[str, tf.Tensor]]

_REGISTRY: dict[str, "SensitivityMethod"] = {}


class SensitivityMethod(abc.ABC):
    """One sensitivity method (see the module docstring)."""

    #: SDK/CLI name, e.g. "gradient"; also the first element of every key it makes.
    name: ClassVar[str]
    #: Whether the method differentiates (needs a target and wrt inputs).
    differentiates: ClassVar[bool] = True

    @abc.abstractmethod
    def plan(self, spec: ComputeSpec, model: ModelFunction, limits: Limits) -> PreparedCall:
        """Validate the method's options and prepare the engine call."""

    @abc.abstractmethod
    def build(self, model: ModelFunction, key: tuple[Hashable, ...]) -> CompiledBody:
        """The function to compile for ``key`` (as made by ``plan``)."""


def register(cls: type[SensitivityMethod]) -> type[SensitivityMethod]:
    """Class decorator: make a method available under its ``name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> SensitivityMethod:
    """The method called ``name``; InvalidArgumentError when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidArgumentError(f"method: {name!r} is not supported by this server") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


# Importing the modules registers their methods.
from gradserve.server.methods import gradient  # noqa: E402,F401
