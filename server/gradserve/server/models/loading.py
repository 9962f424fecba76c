"""Model loaders: .keras files, TF SavedModels and legacy .h5 files, safe by default.

Every loader returns a ``ModelFunction``. What can execute arbitrary code while it loads is
refused unless the operator trusts the model (``--trust-model-code``): a ``.keras`` file is
loaded with Keras' ``safe_mode=True`` (which refuses ``Lambda`` layers holding Python bytecode),
and a legacy ``.h5`` file is refused outright because Keras ignores ``safe_mode`` for it. A
SavedModel holds only TensorFlow graphs (no Python) and is served through its serving signature.
A file that is not what its name says (a corrupt or truncated ``.keras`` archive, a link to a
text file) is refused with a message saying so, and ``confine_to`` refuses files that resolve
outside the model directory (links to elsewhere).

TensorFlow is imported lazily, so the CLI can validate names without paying for it.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from typing import Any, ContextManager, Mapping

__all__ = ["ModelLoadError", "UnsafeModelError", "device_scope", "is_saved_model",
           "find_model_file", "is_within", "outside_entry", "load_model", "load_keras", "load_saved_model",
           "SERVING_SIGNATURE"]

#: The SavedModel signature that is served.
SERVING_SIGNATURE = "serving_default"
#: File endings of the Keras formats.
KERAS_SUFFIX = ".keras"
H5_SUFFIXES = (".h5", ".hdf5")

_TRUST_HINT = "if you trust this file, start the server with --trust-model-code"


class ModelLoadError(Exception):
    """A model cannot be loaded; the message says why (it becomes the FAILED state's message)."""


class UnsafeModelError(ModelLoadError):
    """Loading the model would run code from the file, and the operator has not allowed it."""


def device_scope(device: str) -> ContextManager[Any]:
    """``tf.device(device)``, or no scope when ``device`` is empty (TensorFlow chooses)."""
    if not device:
        return contextlib.nullcontext()
    import tensorflow as tf

    scope: ContextManager[Any] = tf.device(device)
    return scope


def is_saved_model(path: str) -> bool:
    """Whether ``path`` is a SavedModel folder."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt"))


def find_model_file(folder: str) -> str:
    """The one ``.keras`` (or ``.h5``) file in a version folder; ModelLoadError when none or several."""
    names = sorted(f for f in os.listdir(folder)
                   if not f.startswith(".") and f.endswith((KERAS_SUFFIX,) + H5_SUFFIXES))
    if len(names) != 1:
        what = "no .keras file" if not names else f"{len(names)} model files ({', '.join(names[:4])})"
        raise ModelLoadError(f"{folder} holds {what}; a version folder holds one .keras file or a SavedModel")
    return os.path.join(folder, names[0])


def is_within(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or below it (both already ``realpath``-ed)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def outside_entry(path: str, root: str) -> tuple[str, str] | None:
    """The first entry at or below ``path`` that resolves outside ``root``: (entry, target).

    Links are followed (each resolved folder is listed once, so a link loop ends), so a link
    to a folder inside ``root`` that itself links out is found too. None when all is inside.
    """
    top = os.path.realpath(root)
    seen: set[str] = set()
    stack = [path]
    while stack:
        entry = stack.pop()
        real = os.path.realpath(entry)
        if not is_within(real, top):
            return entry, real
        if real in seen or not os.path.isdir(real):
            continue
        seen.add(real)
        try:
            names = os.listdir(real)
        except OSError:  # unreadable: loading it fails with its own message
            continue
        stack.extend(os.path.join(entry, name) for name in sorted(names, reverse=True))
    return None


def load_model(path: str, *, trust_model_code: bool = False, device: str = "",
               confine_to: str | None = None) -> Any:
    """Load a .keras file, a SavedModel folder or a version folder holding one of them.

    Returns a ``ModelFunction``. Raises ``UnsafeModelError`` for content that runs code at load
    time unless ``trust_model_code``, ``ModelLoadError`` for anything else that is not a model,
    and for a file or folder that resolves outside ``confine_to`` (the model directory).
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"{path} does not exist")
    if confine_to is not None:
        found = outside_entry(path, confine_to)
        if found is not None:
            entry = os.path.relpath(found[0], confine_to)
            raise ModelLoadError(f"{entry} resolves outside the model directory (to {found[1]}); links out of "
                                 "it are refused unless the server runs with --follow-symlinks")
    if os.path.isdir(path):
        if is_saved_model(path):
            return load_saved_model(path, device=device)
        path = find_model_file(path)
    if path.endswith(KERAS_SUFFIX) or path.endswith(H5_SUFFIXES):
        return load_keras(path, trust_model_code=trust_model_code, device=device)
    raise ModelLoadError(f"{path}: not a model; expected a .keras file or a SavedModel folder")


def load_keras(path: str, *, trust_model_code: bool = False, device: str = "") -> Any:
    """Load a Keras model (``.keras``, or legacy ``.h5`` when trusted) and wrap it."""
    import keras

    from gradserve.server.models.modelfn import from_keras

    if path.endswith(H5_SUFFIXES) and not trust_model_code:
        raise UnsafeModelError(
            f"{os.path.basename(path)}: legacy HDF5 (.h5) models are refused by default because Keras "
            "ignores safe_mode for them, so code stored in the file (e.g. a Lambda layer) would run "
            f"while it loads; re-save it as .keras, or {_TRUST_HINT}")
    name = os.path.basename(path)
    if path.endswith(KERAS_SUFFIX) and not zipfile.is_zipfile(path):
        # Keras says "File not found" for any .keras file that is not a zip archive.
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise ModelLoadError(f"{name}: not a Keras archive: a .keras file is a zip archive (config.json and the "
                             f"weights), this one ({size} bytes) is not; it is corrupt, truncated or another "
                             "kind of file")
    try:
        with device_scope(device):
            model = keras.saving.load_model(path, compile=False, safe_mode=not trust_model_code)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message saying what is wrong
        # Keras' safe mode refuses deserialising Python code (Lambda layers, lambdas in configs)
        # with a ValueError that advises safe_mode=False; say what that means for this server.
        if isinstance(exc, ValueError) and ("safe_mode" in str(exc) or "unsafe_deserialization" in str(exc)):
            kind = "a Lambda layer" if "Lambda" in str(exc) else "Python code"
            raise UnsafeModelError(
                f"{name}: refused by safe mode: the model contains {kind}, which "
                f"executes arbitrary code when the file is loaded; {_TRUST_HINT}") from exc
        raise ModelLoadError(f"{name}: cannot be loaded as a Keras model, the file may be corrupt "
                             f"({type(exc).__name__}: {exc})") from exc
    return from_keras(model)


def load_saved_model(path: str, *, device: str = "", signature: str = SERVING_SIGNATURE) -> Any:
    """Serve a SavedModel through ``signature``; gradients flow through the restored function.

    Input and output names, dtypes and shapes come from the signature's
    ``structured_input_signature`` and ``structured_outputs``.
    """
    import tensorflow as tf

    from gradserve.server.core.models import TensorSpec
    from gradserve.server.models.modelfn import ModelFunction, np_dtype, shape_of

    with device_scope(device):
        loaded = tf.saved_model.load(path)
    signatures = getattr(loaded, "signatures", {})
    if signature not in signatures:
        raise ModelLoadError(f"{path}: the SavedModel has no {signature!r} signature "
                             f"(it has {sorted(signatures)})")
    fn = signatures[signature]
    args, kwargs = fn.structured_input_signature
    specs = {**{s.name: s for s in args}, **dict(kwargs)}
    outputs = fn.structured_outputs
    if not isinstance(outputs, Mapping):
        raise ModelLoadError(f"{path}: signature {signature!r} does not return a dict of named outputs")
    ins = tuple(TensorSpec(n, np_dtype(s.dtype), shape_of(s.shape)) for n, s in specs.items())
    outs = tuple(TensorSpec(n, np_dtype(s.dtype), shape_of(s.shape)) for n, s in outputs.items())
    if not ins or any(len(s.shape) == 0 for s in ins):
        raise ModelLoadError(f"{path}: signature {signature!r} needs batch-first tensor inputs")

    def call(feed: Mapping[str, Any]) -> dict[str, Any]:
        # ``loaded`` stays referenced by this closure: dropping it would free the variables.
        result = fn(**{s.name: feed[s.name] for s in ins})
        _ = loaded
        return {s.name: result[s.name] for s in outs}

    return ModelFunction(ins, outs, call, keras_model=None)
