"""Built-in demo models, served when ``gradserve serve`` gets no model arguments.

- ``dense2``: the model of the question that started the project (the README's "Calling it"):
  output = 0.5·Σx + 0.1, gradient 0.5 everywhere.
- ``cnn``: a small 16x16x1 image classifier (conv -> conv -> global average pool -> softmax over
  10 classes) with fixed pseudo-random weights, for attribution maps and Grad-CAM.
- ``multi``: two named inputs and two named outputs (y1 = a·W1 + b·W2, y2 = tanh(a)·W3), for
  multi-input/output selection.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["DEMO_MODELS", "build_dense2", "build_cnn", "build_multi"]


def build_dense2() -> Any:
    import keras

    inputs = keras.Input((4,), name="input")
    h = keras.layers.Dense(10, name="layer_1", kernel_initializer=keras.initializers.Constant(0.5),
                           bias_initializer=keras.initializers.Constant(0.1))(inputs)
    outputs = keras.layers.Dense(1, name="alpha", kernel_initializer=keras.initializers.Constant(0.1),
                                 bias_initializer=keras.initializers.Constant(0.0))(h)
    return keras.Model(inputs=inputs, outputs=outputs, name="dense2")


def _seeded(model: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0.0, 0.3, w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def build_cnn() -> Any:
    import keras

    inputs = keras.Input((16, 16, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    probs = keras.layers.Softmax(name="probs")(logits)
    return _seeded(keras.Model(inputs, probs, name="cnn"), 7)


def build_multi() -> Any:
    import keras

    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    y1 = keras.layers.Add(name="y1")([keras.layers.Dense(2, name="wa")(a), keras.layers.Dense(2, name="wb")(b)])
    y2 = keras.layers.Dense(3, name="y2")(keras.layers.Activation("tanh", name="tanh")(a))
    return _seeded(keras.Model({"a": a, "b": b}, {"y1": y1, "y2": y2}, name="multi"), 11)


#: Demo model name -> builder.
DEMO_MODELS: dict[str, Callable[[], Any]] = {"dense2": build_dense2, "cnn": build_cnn, "multi": build_multi}
