"""The native protocol's ShapOptions and PartialDependenceOptions as the neutral request's options.

Only syntax is checked here (wire enums that name nothing, the tensors' encoding and size
limits); the data plane checks the values against the model and the limits for every protocol.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from gradserve import _names
from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.core.explain import FeatureIndex, PartialDependenceOptions, ShapOptions
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import tensor_pb2 as _tensor_pb2

__all__ = ["shap_options", "partial_dependence_options", "Decode"]

#: Decodes one tensor of the request (after the size limits), naming its field in errors.
Decode = Callable[[_tensor_pb2.Tensor, str], np.ndarray]


def _name(table: _names.Names, value: int, field: str) -> str:
    name = table.name(value)
    if name is None:
        raise InvalidArgumentError(f"{field}: unknown value {int(value)}")
    return name


def shap_options(message: _pb2.ShapOptions, decode: Decode) -> ShapOptions:
    """``ComputeRequest.shap``."""
    groups = {name: decode(tensor, f"shap.feature_groups[{name[:128]!r}]")
              for name, tensor in message.feature_groups.items()}
    return ShapOptions(algorithm=_name(_names.SHAP_ALGORITHMS, message.algorithm, "shap.algorithm"),
                       samples=message.samples, seed=message.seed if message.HasField("seed") else None,
                       feature_groups=groups, return_base=message.return_base)


def partial_dependence_options(message: _pb2.PartialDependenceOptions, decode: Decode) -> PartialDependenceOptions:
    """``ComputeRequest.partial_dependence``."""
    grids = tuple(decode(tensor, f"partial_dependence.grid[{i}]")
                  for i, tensor in enumerate(message.grid))
    return PartialDependenceOptions(
        features=tuple(FeatureIndex(f.input, f.index) for f in message.features),
        grids=tuple(g if g.size else None for g in grids), grid_resolution=message.grid_resolution,
        lower_percentile=message.lower_percentile if message.HasField("lower_percentile") else None,
        upper_percentile=message.upper_percentile if message.HasField("upper_percentile") else None,
        kind=_name(_names.PDP_KINDS, message.kind, "partial_dependence.kind"))
