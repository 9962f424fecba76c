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
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from gradserve.v1 import tensor_pb2 as _tensor_pb2

__all__ = ["DTYPES", "TensorError", "decode", "from_buffer", "encode", "encode_map", "decode_map",
           "dtype_from_wire", "dtype_to_wire", "dtype_name", "element_count", "tune_allocator",
           "fields", "split_tensor_maps", "append_tensor_map"]

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
    code = _WIRE.get(dtype) if isinstance(dtype, np.dtype) else None
    if code is not None:   # a native-order dtype: the common case, without building a dtype
        return code
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
    # each read of a bytes field copies it (upb): read it once
    return from_buffer(tensor.data, dtype_from_wire(tensor.dtype, field), tensor.shape, field,
                       max_elements=max_elements)


def from_buffer(data: bytes | memoryview, dtype: np.dtype[Any], shape: Any, field: str = "tensor", *,
                max_elements: int | None = None) -> np.ndarray:
    """A read-only ndarray over ``data`` (little-endian, C order) once its length matches
    ``shape`` and ``dtype``; ``max_elements`` refuses larger tensors before anything is built."""
    shape = tuple(int(d) for d in shape)
    count = element_count(shape, field)
    if max_elements is not None and count > max_elements:
        raise TensorError(f"{field}.shape", f"{count} elements exceed the limit of {max_elements}")
    expected = count * dtype.itemsize
    got = len(data)
    if got != expected:
        raise TensorError(f"{field}.data", f"has {got} bytes but shape {list(shape)} of "
                          f"{np.dtype(dtype).name} needs {expected}")
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


# -- zero-copy parsing of messages that carry tensors -----------------------------------------------
class _Wire:
    """A cursor over protobuf wire bytes (only what ``split_tensor_maps`` needs)."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def varint(self) -> int:
        buf, pos, shift, value = self.buf, self.pos, 0, 0
        while True:
            if pos >= self.end or shift > 63:
                raise TensorError("message", "truncated or malformed varint")
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                self.pos = pos
                return value
            shift += 7

    def field(self) -> tuple[int, int, int, int]:
        """(field number, wire type, start of value, end of value) of the next field."""
        tag = self.varint()
        number, wire_type = tag >> 3, tag & 7
        start = self.pos
        if wire_type == 0:
            self.varint()
        elif wire_type == 1:
            self.pos += 8
        elif wire_type == 2:
            length = self.varint()
            start = self.pos
            self.pos += length
        elif wire_type == 5:
            self.pos += 4
        else:  # groups (3, 4) are not used by gradserve's messages
            raise TensorError("message", f"unsupported wire type {wire_type} in field {number}")
        if self.pos > self.end:
            raise TensorError("message", f"field {number} runs past the end of its message")
        return number, wire_type, start, self.pos


def _tensor_at(buf: bytes | memoryview, view: memoryview, start: int, end: int, field: str,
               aligned: bool) -> np.ndarray:
    """Decode the Tensor message at ``buf[start:end]`` as a view of ``buf`` (no copy of the data)."""
    code, shape, data = 0, [], (0, 0)
    w = _Wire(view, start, end)
    while w.pos < end:
        number, wire_type, a, b = w.field()
        if number == 1 and wire_type == 0:
            code = _Wire(view, a, b).varint()
        elif number == 2 and wire_type == 0:
            shape.append(_Wire(view, a, b).varint())
        elif number == 2 and wire_type == 2:   # packed
            packed = _Wire(view, a, b)
            while packed.pos < b:
                shape.append(packed.varint())
        elif number == 3 and wire_type == 2:
            data = (a, b)
    dtype = dtype_from_wire(code, field)
    # int64 on the wire: two's complement in 64 bits
    dims = [d - (1 << 64) if d >= 1 << 63 else d for d in shape]
    count = element_count(dims, field)
    expected = count * dtype.itemsize
    got = data[1] - data[0]
    if got != expected:
        raise TensorError(f"{field}.data", f"has {got} bytes but shape {dims} of {dtype_name(code)} needs {expected}")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=data[0]).reshape(dims)
    # The data sits wherever the message put it; an unaligned view is valid but slow to use.
    return arr.copy() if aligned and not arr.flags.aligned else arr


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """The top-level fields of serialized message ``buf``: (number, wire type, start, end of value).

    For messages that wrap others (ComputeStreamResponse): the wrapped message is read from its
    span without a copy. Raises ``TensorError`` on malformed input.
    """
    view = memoryview(buf)
    w = _Wire(view, 0, len(view))
    while w.pos < w.end:
        yield w.field()


def split_tensor_maps(buf: bytes | memoryview, maps: Mapping[int, str],
                      aligned: bool = True) -> tuple[bytes, dict[str, dict[str, np.ndarray]]]:
    """Split serialized message ``buf`` into its ``map<string, Tensor>`` fields, decoded as
    read-only views of ``buf``, and the bytes of every other field.

    Parsing a message with protobuf copies each tensor's bytes into the message, and reading the
    field copies them again; here the arrays share ``buf``. ``maps``: field number -> name of each
    tensor map field. The other fields are returned serialized as they came (parse them with the
    message class). ``aligned``: copy a tensor whose data is misaligned for its dtype (False: leave
    it a misaligned view, for callers that copy it anyway). Raises ``TensorError`` on malformed input.
    """
    view = memoryview(buf)
    rest: list[memoryview] = []
    spans: dict[str, dict[str, tuple[int, int]]] = {name: {} for name in maps.values()}
    w = _Wire(view, 0, len(buf))
    while w.pos < w.end:
        field_start = w.pos
        number, wire_type, a, b = w.field()
        name = maps.get(number)
        if name is None or wire_type != 2:
            rest.append(view[field_start:b])
            continue
        key, value = "", (0, 0)
        entry = _Wire(view, a, b)
        while entry.pos < b:
            n, t, x, y = entry.field()
            if n == 1 and t == 2:
                key = str(view[x:y], "utf-8")
            elif n == 2 and t == 2:
                value = (x, y)
        spans[name][key] = value   # a repeated key replaces the earlier entry, as in protobuf
    tensors = {name: {key: _tensor_at(buf, view, a, b, f"{name}[{key!r}]", aligned) for key, (a, b) in entries.items()}
               for name, entries in spans.items()}
    return b"".join(rest), tensors


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)


def append_tensor_map(head: bytes, number: int, arrays: Mapping[str, Any], field: str) -> bytes:
    """``head`` (a serialized message) followed by ``map<string, Tensor>`` field ``number`` holding
    ``arrays``, serialized in one copy of each array's bytes.

    The same wire bytes as ``encode_map`` into the message and then serializing it, which copies
    each array three times (``tobytes``, into the message, into the serialized bytes). Fields may
    come in any order in protobuf, so the map follows the other fields.
    """
    parts: list[Any] = [head]
    for name, array in arrays.items():
        arr = np.asarray(array)
        code = dtype_to_wire(arr.dtype, f"{field}[{name!r}]")
        wire_dtype = DTYPES[code]
        if arr.dtype != wire_dtype:  # big endian or an equivalent alias: convert
            arr = arr.astype(wire_dtype)
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would make a scalar 1-D)
            arr = arr.copy(order="C")
        dims = b"".join(_varint(int(d)) for d in arr.shape)
        tensor = _varint(1 << 3) + _varint(code) + (_len_field(2, len(dims)) + dims if dims else b"") \
            + _len_field(3, arr.nbytes)
        key = name.encode("utf-8")
        entry = _len_field(1, len(key)) + key + _len_field(2, len(tensor) + arr.nbytes) + tensor
        parts.append(_len_field(number, len(entry) + arr.nbytes) + entry)
        parts.append(arr.reshape(-1).view(np.uint8))
    return b"".join(parts)
