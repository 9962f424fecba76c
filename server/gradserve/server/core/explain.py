"""The options of Shapley values and partial dependence as a request gives them (no TF, no gRPC).

Front-ends fill these from their wire format (0 and None stand for the defaults); the data plane
checks them against the model and the limits (``dataplane.explain.problem``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

__all__ = ["ShapOptions", "FeatureIndex", "PartialDependenceOptions", "EXPLAIN_METHODS"]

#: The methods the data plane serves with many engine calls of its own (``dataplane.explain``).
EXPLAIN_METHODS = ("shap", "partial_dependence")


@dataclass(frozen=True, eq=False)
class ShapOptions:
    """Shapley values: the algorithm, its budget, the seed, the feature groups, whether to return
    E[f(background)]."""

    algorithm: str = "kernel"              # "exact" | "kernel" | "gradient"
    #: Kernel: coalitions per explained row; gradient: path points per row; 0: the default.
    samples: int = 0
    seed: int | None = None
    #: Per input name, a group label for each element of one example; empty: one feature per element.
    feature_groups: Mapping[str, np.ndarray] = field(default_factory=dict)
    return_base: bool = False


@dataclass(frozen=True)
class FeatureIndex:
    """One element of a model input ("" : the model's only input), C order within an example."""

    input: str
    index: int


@dataclass(frozen=True, eq=False)
class PartialDependenceOptions:
    """Partial dependence: one or two features, their grids (None: built from the rows), the grid's
    resolution and percentiles (0 and None: the defaults), and which curves come back."""

    features: tuple[FeatureIndex, ...] = ()
    grids: tuple[np.ndarray | None, ...] = ()
    grid_resolution: int = 0
    lower_percentile: float | None = None
    upper_percentile: float | None = None
    kind: str = "both"                     # "average" | "individual" | "both"
