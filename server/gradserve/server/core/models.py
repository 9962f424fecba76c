"""Plain facts about hosted models: their states, tensor signatures and names (no TensorFlow, no gRPC)."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from gradserve.server.core.errors import InvalidArgumentError

__all__ = ["ModelState", "TensorSpec", "validate_model_name", "check_model_ref"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class ModelState(enum.Enum):
    """Where a model version is in its life: LOADING -> READY (or FAILED) -> UNLOADING -> gone."""

    LOADING = 1
    READY = 2
    FAILED = 3
    UNLOADING = 4


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, NumPy dtype, shape with None for free dimensions."""

    name: str
    dtype: Any  # np.dtype
    shape: tuple[int | None, ...]

    @property
    def differentiable(self) -> bool:
        return bool(self.dtype.kind == "f" or self.dtype.name == "bfloat16")


def validate_model_name(name: str, field: str = "model") -> str:
    """Return ``name`` if it is a valid model name, else raise ``InvalidArgumentError``.

    A name is 1-128 letters, digits, ``-``, ``_`` or ``.``, and not ``.`` or ``..``: names become
    folder names in the model directory, so path separators and parent references are refused.
    """
    if not _NAME.fullmatch(name) or name in (".", ".."):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise InvalidArgumentError(f"{field}: invalid model name {shown!r}; use 1-128 letters, digits, "
                                   "'-', '_' or '.' (no path separators, not '..')")
    return name


def check_model_ref(name: str, version: int = 0) -> None:
    """Refuse malformed model names (path separators, ``..``, overlong; the repository's naming
    rule) and negative versions with INVALID_ARGUMENT, before any lookup: such a name can never
    be hosted, and it must never reach the file system."""
    validate_model_name(name, "model")
    if version < 0:
        raise InvalidArgumentError(f"version: {version} is negative; use 0 for the latest READY version")
