"""Explained features: which elements of which model inputs each feature holds.

By default every element of every input is a feature of its own, numbered input by input in the
model's input order (C order within an input). With groups, each element carries the label of
its group (an image's superpixel, a whole input of a multi-input model, a set of columns), and
a coalition switches whole groups between the explained row and a background row.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from gradserve.server.core.errors import InvalidArgumentError

__all__ = ["Features"]


@dataclass(frozen=True, eq=False)
class Features:
    """The explained features of a model's inputs.

    ``labels[name]`` holds, for each element of one example of input ``name`` (flattened in C
    order), the feature it belongs to: ``0 <= label < count``, every feature holding at least
    one element.
    """

    labels: Mapping[str, np.ndarray]
    count: int
    #: Whether the features are groups given by the caller (else one per element).
    grouped: bool

    @classmethod
    def per_element(cls, sizes: Mapping[str, int]) -> Features:
        """One feature per element of each input (``sizes``: elements per example, in input order)."""
        labels, start = {}, 0
        for name, size in sizes.items():
            labels[name] = np.arange(start, start + size, dtype=np.int64)
            start += size
        return cls(labels, start, False)

    @classmethod
    def from_labels(cls, labels: Mapping[str, np.ndarray], sizes: Mapping[str, int],
                    field: str = "feature_groups") -> Features:
        """Groups from a label per element of every input; refuses labels out of range, inputs
        without labels and groups without elements."""
        flat: dict[str, np.ndarray] = {}
        for name, size in sizes.items():
            if name not in labels:
                raise InvalidArgumentError(f"{field}: input {name!r} has no labels; label the elements of every "
                                           "input (give a whole input one group of its own)")
            values = np.asarray(labels[name])
            if values.dtype.kind not in "iu":
                raise InvalidArgumentError(f"{field}[{name!r}]: labels must be integers, got {values.dtype.name}")
            values = values.reshape(-1).astype(np.int64)
            if values.size != size:
                raise InvalidArgumentError(f"{field}[{name!r}]: {values.size} labels for {size} elements per example")
            if values.size and values.min() < 0:
                raise InvalidArgumentError(f"{field}[{name!r}]: label {int(values.min())} is negative")
            flat[name] = values
        unknown = [n for n in labels if n not in sizes]
        if unknown:
            raise InvalidArgumentError(f"{field}: unknown input {unknown[0][:128]!r}; the model's inputs are "
                                       f"{list(sizes)}")
        everything = np.concatenate(list(flat.values())) if flat else np.zeros(0, np.int64)
        count = int(everything.max()) + 1 if everything.size else 0
        used = np.bincount(everything, minlength=count) if count else np.zeros(0, np.int64)
        empty = np.flatnonzero(used == 0)
        if empty.size:
            raise InvalidArgumentError(f"{field}: group {int(empty[0])} has no elements; number the groups "
                                       f"0 to {count - 1 if count else 0} without gaps")
        return cls(flat, count, True)

    def element_masks(self, masks: np.ndarray) -> dict[str, np.ndarray]:
        """Coalitions over features ``(K, count)`` as coalitions over each input's elements ``(K, elements)``."""
        return {name: masks[:, labels] for name, labels in self.labels.items()}

    def group_sums(self, per_element: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per-element values ``(n, elements)`` of each input summed per feature: ``(n, count)``."""
        n = len(next(iter(per_element.values())))
        out = np.zeros((n, self.count), np.float64)
        for name, labels in self.labels.items():
            np.add.at(out.T, labels, np.asarray(per_element[name], np.float64).reshape(n, -1).T)
        return out

    def split(self, phi: np.ndarray) -> dict[str, np.ndarray]:
        """Per-feature values ``(n, count)`` back to each input's elements ``(n, elements)``
        (one feature per element: a reordering)."""
        return {name: phi[:, labels] for name, labels in self.labels.items()}
