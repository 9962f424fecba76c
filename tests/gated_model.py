"""A model that holds chosen requests until the test releases them (for tests of limits on work
in flight). Importable from every test module (pyproject.toml puts tests/ on pytest's pythonpath).

``Gate().model`` builds ``y = x`` over one input ``x`` of shape (None, 4), float32; a request whose
first value is ``MARK`` waits inside the model (on a compute thread) until ``release`` is set.
Serve it with batching off, so that each request is its own engine call.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["Gate", "MARK"]

#: A request whose first value is MARK waits in the model until released.
MARK = 42.0


class Gate:
    def __init__(self) -> None:
        self.release = threading.Event()

    def model(self) -> Any:
        import tensorflow as tf

        from gradserve.server.core.models import TensorSpec
        from gradserve.server.models.modelfn import ModelFunction

        def wait(x: np.ndarray) -> np.ndarray:
            if x.size and x.flat[0] == MARK:
                self.release.wait(120)
            return x

        def call(feed: Any) -> dict[str, Any]:
            y = tf.numpy_function(wait, [feed["x"]], tf.float32)
            return {"y": tf.reshape(y, tf.shape(feed["x"]))}

        spec = TensorSpec("x", np.dtype(np.float32), (None, 4))
        return ModelFunction((spec,), (TensorSpec("y", np.dtype(np.float32), (None, 4)),), call)
