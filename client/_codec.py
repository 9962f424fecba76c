"""NumPy ndarray <-> gradserve.v1.Tensor codec, shared by the SDK and the server.

One table maps wire dtypes to NumPy dtypes. Encoding converts to C order and little endian;
decoding is zero-copy (``np.frombuffer``) and checks the byte length against the shape, computed
with Python ints so that no product can overflow, before anything is reshaped or allocated.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import threading
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from gradserve.v1 import tensor_pb2 as _tensor_pb2

__all__ = ["DTYPES", "TensorError", "decode", "encode", "encode_map", "decode_map",
           "dtype_from_wire", "dtype_to_wire", "dtype_name", "element_count", "tune_allocator",
           "LARGE_PAYLOAD_BYTES"]

_DT = _tensor_pb2.DataType

#: Wire dtype -> NumPy dtype (little endian). The single source of truth for both directions.
DTYPES: Mapping[int, np.dtype[Any]] = {
    _DT.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    _DT.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    _DT.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    _DT.DATA_TYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    _DT.DATA_TYPE_INT8: np.dtype("i1"),
    _DT.DATA_TYPE_INT16: np.dtype("<i2"),
    _DT.DATA_TYPE_INT32: np.dtype("<i4"),
    _DT.DATA_TYPE_INT64: np.dtype("<i8"),
    _DT.DATA_TYPE_UINT8: np.dtype("u1"),
    _DT.DATA_TYPE_BOOL: np.dtype("?"),
}
_WIRE = {dt.newbyteorder("=") if dt.byteorder != "|" else dt: code for code, dt in DTYPES.items()}


class TensorError(ValueError):
    """A tensor that cannot be encoded or decoded; ``field`` names the offending part."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def dtype_to_wire(dtype: Any, field: str = "tensor") -> int:
    """Wire DataType for a NumPy dtype (any byte order)."""
    dt = np.dtype(dtype)
    native = dt.newbyteorder("=") if dt.byteorder not in ("|", "=") else dt
    try:
        return _WIRE[native]
    except KeyError:
        raise TensorError(field, f"dtype {dt} is not supported") from None


def dtype_from_wire(code: int, field: str = "tensor") -> np.dtype[Any]:
    """NumPy dtype for a wire DataType; TensorError for UNSPECIFIED or unknown values."""
    try:
        return DTYPES[code]
    except KeyError:
        if code == _DT.DATA_TYPE_UNSPECIFIED:
            raise TensorError(f"{field}.dtype", "dtype is unspecified") from None
        raise TensorError(f"{field}.dtype", f"unknown dtype value {int(code)}") from None


def dtype_name(code: int) -> str:
    """Short lower-case name of a wire DataType, e.g. 'float32'."""
    try:
        return str(_DT.Name(code)).removeprefix("DATA_TYPE_").lower()
    except ValueError:
        return f"dtype({int(code)})"


def element_count(shape: Any, field: str = "tensor") -> int:
    """Number of elements of a shape, as an exact Python int; refuses negative dimensions."""
    dims = [int(d) for d in shape]
    for i, d in enumerate(dims):
        if d < 0:
            raise TensorError(f"{field}.shape", f"dimension {i} is negative ({d})")
    return math.prod(dims)


def encode(array: Any, field: str = "tensor", out: _tensor_pb2.Tensor | None = None) -> _tensor_pb2.Tensor:
    """Encode an array-like as a Tensor (C order, little endian).

    ``out`` lets callers fill a map entry in place (``msg.inputs[name]``) without a copy of the message.
    """
    arr = np.asarray(array)
    code = dtype_to_wire(arr.dtype, field)
    wire_dtype = DTYPES[code]
    if arr.dtype != wire_dtype:  # big endian or an equivalent alias: convert
        arr = arr.astype(wire_dtype)
    tensor = out if out is not None else _tensor_pb2.Tensor()
    tensor.dtype = code  # type: ignore[assignment]
    del tensor.shape[:]
    tensor.shape.extend(arr.shape)
    # tobytes(order="C") copies non-contiguous input into C order; contiguous arrays are copied once.
    tensor.data = arr.tobytes(order="C")
    return tensor


def decode(tensor: _tensor_pb2.Tensor, field: str = "tensor", *, max_elements: int | None = None) -> np.ndarray:
    """Decode a Tensor to a read-only ndarray that shares the message's bytes.

    Validates dtype, dimensions and byte length before any reshape. ``max_elements`` refuses
    tensors with more elements than that (checked before any allocation).
    """
    dtype = dtype_from_wire(tensor.dtype, field)
    shape = tuple(int(d) for d in tensor.shape)
    count = element_count(shape, field)
    if max_elements is not None and count > max_elements:
        raise TensorError(f"{field}.shape", f"{count} elements exceed the limit of {max_elements}")
    expected = count * dtype.itemsize
    data = tensor.data  # each read of a bytes field copies it (upb): read it once
    got = len(data)
    if got != expected:
        raise TensorError(f"{field}.data", f"has {got} bytes but shape {list(shape)} of "
                          f"{dtype_name(tensor.dtype)} needs {expected}")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def encode_map(arrays: Mapping[str, Any], target: Any, field: str) -> None:
    """Encode each array into the protobuf map ``target`` (e.g. ``request.inputs``)."""
    for name, arr in arrays.items():
        encode(arr, f"{field}[{name!r}]", out=target[name])


def decode_map(tensors: Mapping[str, _tensor_pb2.Tensor], field: str,
               *, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Decode a protobuf map of Tensors into a dict of arrays."""
    return {name: decode(t, f"{field}[{name!r}]", max_elements=max_elements)
            for name, t in tensors.items()}


#: A payload at least this large makes the SDK tune the allocator (``tune_allocator``).
LARGE_PAYLOAD_BYTES = 8 * 1024 * 1024
#: Largest allocation served from the heap instead of a fresh ``mmap`` (glibc ``M_MMAP_THRESHOLD``).
_MMAP_THRESHOLD = 1024 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse before it is returned (``M_TRIM_THRESHOLD``).
_TRIM_THRESHOLD = 1024 * 1024 * 1024
_tuned: bool | None = None
_tune_lock = threading.Lock()


def tune_allocator() -> bool:
    """Let glibc reuse freed large blocks instead of mapping fresh pages for every one (once per process).

    Every large message crosses several ``bytes`` objects (``tobytes``, the protobuf field, the
    serialized message, gRPC's copy, the parsed field). glibc serves each allocation over 32 MiB
    with a fresh ``mmap`` and unmaps it when freed, so every copy also page-faults and zeroes its
    whole size: measured 30-80 ms per 48 MiB copy against ~6-12 ms into reused memory, which
    made a 48 MiB predict 4x slower end to end. Raising ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` keeps up to ``_TRIM_THRESHOLD`` bytes of freed heap for reuse; the cost
    is that a process keeps that much memory after its largest message. No effect (returns
    False) where the C library is not glibc. Returns whether the settings are in place.
    """
    global _tuned
    with _tune_lock:
        if _tuned is None:
            _tuned = False
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):   # not glibc (musl, macOS, Windows): leave it be
                return False
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            m_trim_threshold, m_mmap_threshold = -1, -3   # from glibc's malloc.h
            _tuned = bool(mallopt(m_mmap_threshold, _MMAP_THRESHOLD)) and \
                bool(mallopt(m_trim_threshold, _TRIM_THRESHOLD))
        return _tuned
