"""Tensor limits every front-end applies while it decodes, before any array is built.

Each wire format has its own tensor encoding (the native ``Tensor``, OIP raw bytes or typed
values); each decoder checks the shape here first, so that a claimed shape is refused by rank,
dimension and element count before anything is allocated for it. What depends on the model
(names, dtypes, shapes, batch sizes, NaN and Inf) is the data plane's check.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gradserve import _codec
from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError

__all__ = ["check_shape", "from_bytes", "shared_array"]


def check_shape(shape: Sequence[int], field: str, limits: Limits) -> int:
    """The element count of ``shape`` once its rank, every dimension and the count are within the
    limits; InvalidArgumentError otherwise."""
    if len(shape) > limits.max_rank:
        raise InvalidArgumentError(f"{field}.shape: rank {len(shape)} exceeds the limit of {limits.max_rank}")
    for i, d in enumerate(shape):
        # Each dimension on its own: with a zero elsewhere the element count passes any limit,
        # and NumPy cannot even describe a dimension near 2**63.
        if d > limits.max_elements:
            raise InvalidArgumentError(f"{field}.shape: dimension {i} is {d}, above the limit of "
                                       f"{limits.max_elements} elements")
    try:
        count = _codec.element_count(shape, field)
    except _codec.TensorError as exc:
        raise InvalidArgumentError(str(exc)) from None
    if count > limits.max_elements:
        raise InvalidArgumentError(f"{field}.shape: {count} elements exceed the limit of {limits.max_elements}")
    return count


def from_bytes(data: bytes | memoryview, dtype: np.dtype[Any], shape: Sequence[int], field: str,
               limits: Limits) -> np.ndarray:
    """A zero-copy array over ``data`` once its shape passes ``check_shape`` and its length matches."""
    check_shape(shape, field, limits)
    try:
        return _codec.from_buffer(data, dtype, shape, field)
    except _codec.TensorError as exc:
        raise InvalidArgumentError(str(exc)) from None


def shared_array(regions: Any, region: str, offset: int, byte_size: int, dtype: np.dtype[Any],
                 shape: Sequence[int], field: str, limits: Limits) -> np.ndarray:
    """An array over ``byte_size`` bytes at ``offset`` of a shared-memory region held by ``regions``
    (a ``shared_memory.Borrowed``), once its shape passes ``check_shape`` and the byte size is
    exactly what the shape and dtype need.

    Left writable, although nothing on the server writes into an input: the engine hands large
    writable arrays to TensorFlow without a copy (``compute.engine.ZERO_COPY_BYTES``).
    """
    count = check_shape(shape, field, limits)
    expected = count * np.dtype(dtype).itemsize
    if byte_size != expected:
        raise InvalidArgumentError(f"{field}.byte_size: {byte_size} bytes, but shape {list(shape)} of "
                                   f"{np.dtype(dtype).name} needs {expected}")
    return np.frombuffer(regions.view(region, offset, byte_size, field), dtype=dtype, count=count).reshape(shape)
