"""A loaded model as one callable with a signature: dict of input tensors -> dict of outputs.

Keras models and SavedModel serving signatures look the same to the engine and the methods
through ``ModelFunction``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf

from gradserve.server.core.models import TensorSpec

__all__ = ["TensorSpec", "ModelFunction", "from_keras", "np_dtype", "shape_of"]


@dataclass
class ModelFunction:
    """What the engine and the methods know of a model."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: dict of input tensors (by name) -> dict of output tensors (by name).
    call: Callable[[Mapping[str, tf.Tensor]], dict[str, tf.Tensor]]
    #: The Keras model, when there is one (layer attribution and Grad-CAM need its layers).
    keras_model: Any = None

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(s for s in self.outputs if s.name == name)

    def layer_names(self) -> list[str]:
        if self.keras_model is None:
            return []
        return [layer.name for layer in self.keras_model.layers
                if not layer.__class__.__name__ == "InputLayer"]


def np_dtype(dtype: Any) -> np.dtype[Any]:
    """NumPy dtype of a TensorFlow or Keras dtype (name or object)."""
    result: np.dtype[Any] = np.dtype(tf.as_dtype(dtype).as_numpy_dtype)
    return result


def shape_of(shape: Any) -> tuple[int | None, ...]:
    """A shape as a tuple of ints with None for free dimensions."""
    return tuple(None if d is None else int(d) for d in shape)


def _output_names(model: Any, tensors: list[Any]) -> list[str]:
    """Names of list outputs: Keras' ``output_names`` (functional models), else the producing
    layers' names (Sequential has no ``output_names``); made unique so none is lost."""
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(tensors):
        names = []
        for t in tensors:
            history = getattr(t, "_keras_history", None)
            names.append(history.operation.name if history is not None else "output")
    seen: dict[str, int] = {}
    unique = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n}_{seen[n] - 1}")
    return unique


def from_keras(model: Any) -> ModelFunction:
    """Wrap a built Keras 3 model (functional, sequential or subclassed with known inputs)."""
    inputs = tuple(TensorSpec(t.name, np_dtype(t.dtype), shape_of(t.shape)) for t in model.inputs)
    struct = getattr(model, "_inputs_struct", None)
    names = [s.name for s in inputs]

    # Probe the output structure once on a symbolic call so that names match what call() returns.
    symbolic = model.outputs
    out_struct = getattr(model, "_outputs_struct", None)
    if isinstance(out_struct, dict):
        out_names = list(out_struct.keys())
        out_tensors = [out_struct[k] for k in out_names]
    else:
        out_tensors = list(symbolic)
        out_names = _output_names(model, out_tensors)
    outputs = tuple(TensorSpec(n, np_dtype(t.dtype), shape_of(t.shape)) for n, t in zip(out_names, out_tensors))

    def call(feed: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if isinstance(struct, dict):
            x: Any = {k: feed[v.name] for k, v in struct.items()}
        elif len(names) == 1:
            x = feed[names[0]]
        else:
            x = [feed[n] for n in names]
        y = model(x, training=False)
        if isinstance(y, dict):
            return {n: y[n] for n in out_names}
        if isinstance(y, (list, tuple)):
            return dict(zip(out_names, y))
        return {out_names[0]: y}

    return ModelFunction(inputs, outputs, call, keras_model=model)
