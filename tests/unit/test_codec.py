"""The ndarray <-> Tensor codec: every dtype, edge shapes, byte order, and malformed tensors."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from gradserve import _codec
from gradserve.v1 import tensor_pb2

ALL_DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int8, np.int16, np.int32,
              np.int64, np.uint8, np.bool_]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 2, 3, 4)])
def test_roundtrip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal(shape) * 10).astype(dtype)
    out = _codec.decode(_codec.encode(arr))
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out.astype(np.float64), arr.astype(np.float64))


def test_every_wire_dtype_is_in_the_table():
    wire = {v for v in tensor_pb2.DataType.values() if v != tensor_pb2.DATA_TYPE_UNSPECIFIED}
    assert wire == set(_codec.DTYPES)


def test_big_endian_and_non_contiguous_inputs_are_converted():
    base = np.arange(24, dtype=">f8").reshape(4, 6)
    view = base[::2, 1::2]
    t = _codec.encode(view)
    assert t.dtype == tensor_pb2.DATA_TYPE_FLOAT64
    assert t.data == np.ascontiguousarray(view.astype("<f8")).tobytes()
    np.testing.assert_array_equal(_codec.decode(t), view)


def test_decode_is_zero_copy_and_read_only():
    t = _codec.encode(np.arange(8, dtype=np.float32))
    out = _codec.decode(t)
    assert not out.flags.writeable and not out.flags.owndata


@pytest.mark.parametrize("delta", [-1, 1])
def test_byte_length_must_match_shape(delta):
    t = _codec.encode(np.zeros((2, 3), np.float32))
    t.data = t.data + b"\0" * delta if delta > 0 else t.data[:delta]
    with pytest.raises(_codec.TensorError, match=r"x\.data: has \d+ bytes but shape \[2, 3\] of float32 needs 24"):
        _codec.decode(t, "x")


def test_negative_dimension_refused():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2, -1], data=b"")
    with pytest.raises(_codec.TensorError, match="dimension 1 is negative"):
        _codec.decode(t)


def test_overflowing_shape_is_refused_without_allocation():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2**62, 4], data=b"\0" * 16)
    with pytest.raises(_codec.TensorError, match="needs"):
        _codec.decode(t)
    with pytest.raises(_codec.TensorError, match="exceed the limit"):
        _codec.decode(t, max_elements=1000)


@pytest.mark.parametrize("code,match", [(0, "unspecified"), (99, "unknown dtype value 99")])
def test_unspecified_and_unknown_dtype(code, match):
    with pytest.raises(_codec.TensorError, match=match):
        _codec.decode(tensor_pb2.Tensor(dtype=code, shape=[1], data=b"\0" * 4))


def test_unsupported_numpy_dtype():
    with pytest.raises(_codec.TensorError, match="complex128 is not supported"):
        _codec.encode(np.zeros(2, np.complex128))


def test_error_messages_never_echo_payload():
    payload = b"SECRET-PAYLOAD" * 3
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2], data=payload)
    with pytest.raises(_codec.TensorError) as info:
        _codec.decode(t)
    assert "SECRET" not in str(info.value)
