"""Running a Keras model with hooks on its layers: layer outputs, layer replacement, logits.

Layer attribution, Grad-CAM and ``use_logits`` need more than ``ModelFunction.call``: the
output of one inner layer (to differentiate it), a replacement for it (integrated gradients
along a path in that layer's output space), or the pre-activation of the final softmax/sigmoid
layer. Rather than cloning the model or building sub-models, ``forward`` walks the functional
graph the same way ``keras.Model.call`` does and calls a hook instead of the hooked layers.
Nothing is mutated, so concurrent traces of other functions are unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import tensorflow as tf

from gradserve.server.core.errors import FailedPreconditionError, NotFoundError
from gradserve.server.core.spec import TargetKey
from gradserve.server.models.modelfn import ModelFunction

__all__ = ["Forward", "forward", "find_layer", "logits_layer", "default_cam_layer", "check_model_options"]

#: Final activations that ``use_logits`` can strip.
_LOGIT_ACTIVATIONS = ("softmax", "sigmoid")


def _graph(model: ModelFunction) -> Any | None:
    """The functional graph of the model (Sequential models keep one inside), or None."""
    keras_model = model.keras_model
    if keras_model is None:
        return None
    for candidate in (keras_model, getattr(keras_model, "_functional", None)):
        if candidate is not None and hasattr(candidate, "_run_through_graph") and \
                hasattr(candidate, "_nodes_by_depth"):
            return candidate
    return None


def _nodes_of(graph: Any, layer: Any) -> int:
    """How many nodes of ``graph`` call ``layer`` (a shared layer has several outputs)."""
    return sum(1 for nodes in graph._nodes_by_depth.values() for node in nodes if node.operation is layer)


def find_layer(model: ModelFunction, name: str, field_name: str = "layer") -> Any:
    """The top-level layer called ``name``, checked to be hookable.

    Raises
    ------
    NotFoundError
        No such layer.
    FailedPreconditionError
        The model has no functional graph, or the layer is called more than once.
    """
    graph = _graph(model)
    if graph is None:
        raise FailedPreconditionError(f"{field_name}: layer attribution needs a functional or Sequential "
                                      "Keras model; this model has no layer graph")
    layer = next((lay for lay in model.keras_model.layers if lay.name == name), None)
    if layer is None or layer.__class__.__name__ == "InputLayer":
        names = model.layer_names()
        shown = ", ".join(repr(n) for n in names[:30]) + (", ..." if len(names) > 30 else "")
        raise NotFoundError(f"{field_name}: unknown layer {name!r}; the model's layers are [{shown}]")
    if _nodes_of(graph, layer) != 1:
        raise FailedPreconditionError(f"{field_name}: layer {name!r} is called {_nodes_of(graph, layer)} "
                                      "times in the model; its output is ambiguous")
    return layer


def _output_tensor(model: ModelFunction, output: str) -> Any:
    keras_model = model.keras_model
    struct = getattr(keras_model, "_outputs_struct", None)
    if isinstance(struct, dict):
        return struct[output]
    names = [o.name for o in model.outputs]
    return keras_model.outputs[names.index(output)]


def _activation_name(layer: Any) -> str:
    cls = layer.__class__.__name__
    if cls == "Softmax":
        return "softmax"
    activation = getattr(layer, "activation", None)
    if cls in ("Dense", "Activation") and activation is not None:
        name = getattr(activation, "__name__", "")
        if name in _LOGIT_ACTIVATIONS:
            return name
    return ""


def logits_layer(model: ModelFunction, output: str) -> Any:
    """The final softmax/sigmoid layer producing ``output`` (for ``use_logits``).

    Raises
    ------
    FailedPreconditionError
        When ``output`` is not produced by a Softmax layer, nor by a Dense or Activation layer
        with a softmax or sigmoid activation.
    """
    graph = _graph(model)
    reason = "the model has no Keras layer graph"
    if graph is not None:
        history = getattr(_output_tensor(model, output), "_keras_history", None)
        layer = history.operation if history is not None else None
        if layer is not None and _activation_name(layer) and _nodes_of(graph, layer) == 1:
            return layer
        reason = (f"its last layer {getattr(layer, 'name', '?')!r} ({type(layer).__name__}) does not apply a "
                  "softmax or sigmoid")
    raise FailedPreconditionError(f"target.use_logits: output {output!r} has no final softmax/sigmoid to "
                                  f"strip: {reason}")


def default_cam_layer(model: ModelFunction) -> str:
    """Name of the last layer with a 4-D output (batch, h, w, channels), for Grad-CAM."""
    if _graph(model) is None:
        raise FailedPreconditionError("layer: Grad-CAM needs a functional or Sequential Keras model")
    for layer in reversed(model.keras_model.layers):
        try:
            rank = len(layer.output.shape)
        except (AttributeError, ValueError):  # shared layers have no single output
            continue
        if rank == 4 and layer.__class__.__name__ != "InputLayer":
            return str(layer.name)
    raise FailedPreconditionError("layer: the model has no layer with a 4-D output for Grad-CAM; name one")


def check_model_options(spec: Any, model: ModelFunction) -> None:
    """Plan-time checks of ``spec.layer`` and ``target.use_logits`` (NOT_FOUND / FAILED_PRECONDITION)."""
    if spec.layer:
        find_layer(model, spec.layer)
    if spec.target is not None and spec.target.use_logits:
        logits_layer(model, spec.target.output)


def _linear_part(layer: Any, args: tuple[Any, ...]) -> Any:
    """The pre-activation of a final softmax/sigmoid layer."""
    cls = layer.__class__.__name__
    if cls in ("Softmax", "Activation"):
        return args[0]
    # Dense: inputs @ kernel + bias, the layer's own computation without its activation.
    y = tf.matmul(args[0], tf.convert_to_tensor(layer.kernel)) if len(args[0].shape) == 2 else \
        tf.tensordot(args[0], tf.convert_to_tensor(layer.kernel), axes=1)
    if getattr(layer, "bias", None) is not None:
        y = y + tf.convert_to_tensor(layer.bias)
    return y


def _call_op(op: Any) -> Callable[..., Any]:
    """Call an operation of the graph in inference mode, as ``Model.call(training=False)`` does."""
    def call(*args: Any, **kwargs: Any) -> Any:
        if "training" in getattr(op, "_call_context_args", {}):
            kwargs["training"] = False
        return op(*args, **kwargs)
    return call


@dataclass
class Forward:
    """What one forward pass produced."""

    #: Model outputs by name.
    outputs: dict[str, tf.Tensor]
    #: The tensor the target is taken from: the selected output, or its logits.
    head: tf.Tensor
    #: The hooked layer's output as used downstream (after ``replace``), when a layer was hooked.
    layer: tf.Tensor | None = None
    #: The hooked layer's own output (before ``replace``).
    layer_original: tf.Tensor | None = None


def forward(model: ModelFunction, feed: Mapping[str, tf.Tensor], target: TargetKey, *,
            layer: str = "", replace: Callable[[tf.Tensor], tf.Tensor] | None = None,
            watch: Callable[[tf.Tensor], None] | None = None) -> Forward:
    """One forward pass with optional hooks.

    Parameters
    ----------
    model, feed
        The model and its inputs by name.
    target
        Selects the head; with ``use_logits`` the head is the final layer's pre-activation.
    layer
        Name of a layer to capture (checked by ``find_layer`` at plan time).
    replace
        Maps the layer's output to the tensor used downstream instead of it.
    watch
        Called on the tensor used downstream (e.g. ``tape.watch``), so that it can be
        differentiated even when nothing upstream is watched.
    """
    if not layer and not target.use_logits:
        outputs = model.call(feed)
        return Forward(outputs, outputs[target.output])
    graph = _graph(model)
    assert graph is not None  # plan() checked
    hooked = find_layer(model, layer) if layer else None
    final = logits_layer(model, target.output) if target.use_logits else None
    seen: dict[str, Any] = {}

    def operation(op: Any) -> Callable[..., Any]:
        call = _call_op(op)
        if op is not hooked and op is not final:
            return call

        def hook(*args: Any, **kwargs: Any) -> Any:
            if op is final:
                logits = _linear_part(op, args)
                seen["logits"] = logits
                dense: Any = op  # narrowed to "Any | None" by ``op is final``
                out = dense.activation(logits) if op.__class__.__name__ == "Dense" else call(*args, **kwargs)
            else:
                out = call(*args, **kwargs)
            if op is hooked:
                seen["layer_original"] = out
                if replace is not None:
                    out = replace(out)
                if watch is not None:
                    watch(out)
                seen["layer"] = out
            return out
        return hook

    flat = [feed[s.name] for s in model.inputs]
    y = graph._run_through_graph(flat, operation_fn=operation)
    names = [o.name for o in model.outputs]
    if isinstance(y, dict):
        outputs = {n: y[n] for n in names}
    elif isinstance(y, (list, tuple)):
        outputs = dict(zip(names, y))
    else:
        outputs = {names[0]: y}
    head = seen["logits"] if final is not None else outputs[target.output]
    return Forward(outputs, head, seen.get("layer"), seen.get("layer_original"))
