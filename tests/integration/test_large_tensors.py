"""Large tensors: pipelined row chunks below the message limit, chunk planning, allocator tuning."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import gradserve
from gradserve import _codec
from gradserve._requests import build_call, plan_rows

KIB = 1024


def dense2_expected(x: np.ndarray) -> np.ndarray:
    return 0.5 * x.sum(axis=1) + 0.1


# -- planning (no server) --------------------------------------------------------------------------
def test_a_batch_above_chunk_bytes_is_split_even_when_it_fits_one_message():
    # 1000 rows of 1 KiB: one 64 MiB message would do, 64 KiB chunks are asked for.
    bounds = plan_rows(1000, KIB, KIB, 0, 64 << 20, 65536, chunk_bytes=64 * KIB)
    assert bounds[0] == (0, 64) and bounds[-1] == (960, 1000) and len(bounds) == 16
    assert all(b[0] == a[1] for a, b in zip(bounds, bounds[1:]))   # contiguous, in order
    # Without chunk_bytes (or below it) the batch is one message, as before.
    assert plan_rows(1000, KIB, KIB, 0, 64 << 20, 65536) == [(0, 1000)]
    assert plan_rows(60, KIB, KIB, 0, 64 << 20, 65536, chunk_bytes=64 * KIB) == [(0, 60)]


@pytest.mark.parametrize(("fit", "rows"), [(63, 32), (64, 64), (100, 64), (130, 128), (5, 4), (1, 1)])
def test_full_chunks_have_bucket_friendly_row_counts(fit, rows):
    # ``fit`` rows fit a chunk: full chunks take a power of two below 64, a multiple of 64 above,
    # so the server's default buckets never pad (copy) them.
    bounds = plan_rows(1000, KIB, KIB, 0, 64 << 20, 65536, chunk_bytes=fit * KIB)
    assert bounds[0] == (0, rows)


def test_the_message_limit_still_bounds_chunks_larger_than_chunk_bytes():
    bounds = plan_rows(1000, KIB, KIB, 0, 64 * KIB + 16 * KIB, 65536, chunk_bytes=1 << 30)
    assert bounds[0] == (0, 16)


def only(request):
    (tensor,) = request.inputs.values()
    return tensor


def test_the_first_chunk_is_encoded_once_and_sent_as_it_is():
    x = np.arange(4000 * 4, dtype=np.float32).reshape(4000, 4)
    call = build_call(None, "dense2", "predict", x, max_message_bytes=64 << 20, chunk_bytes=16 * KIB)
    assert len(call.bounds) > 2
    requests = list(call.requests())
    got = np.concatenate([_codec.decode(only(r)) for r in requests])
    np.testing.assert_array_equal(got, x)
    again = call.encode(*call.bounds[0])   # a second pass encodes it afresh
    np.testing.assert_array_equal(_codec.decode(only(again)), x[:call.bounds[0][1]])


def test_chunk_bytes_must_be_positive():
    with pytest.raises(ValueError, match="chunk_bytes"):
        gradserve.Client("127.0.0.1:1", chunk_bytes=0)


def test_tune_allocator_is_idempotent():
    first = _codec.tune_allocator()
    assert _codec.tune_allocator() is first
    assert isinstance(first, bool)


# -- through a server ------------------------------------------------------------------------------
def test_sync_chunks_below_the_message_limit_reassemble_in_order(demo_server):
    x = np.random.default_rng(0).uniform(-1, 1, (5000, 4)).astype(np.float32)   # 80 KB in
    with gradserve.Client(demo_server.address, chunk_bytes=8 * KIB) as c:
        from gradserve._options import ComputeOptions, Operands

        options = ComputeOptions.of("gradient", return_outputs=True)
        assert len(c._plan(None, "dense2", options, x, Operands()).bounds) > 8
        y, g = c.gradient("dense2", x, return_outputs=True)
        p = c.predict("dense2", x)
    np.testing.assert_allclose(g, 0.5, rtol=1e-6)
    np.testing.assert_allclose(y[:, 0], dense2_expected(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(p, y)


def test_async_chunks_below_the_message_limit_reassemble_in_order(demo_server):
    images = np.random.default_rng(1).uniform(0, 1, (300, 16, 16, 1)).astype(np.float32)
    target = np.arange(300) % 10

    async def run() -> np.ndarray:
        async with gradserve.AsyncClient(demo_server.address, chunk_bytes=16 * KIB) as c:
            return await c.gradient("cnn", images, target=target)

    chunked = asyncio.run(run())
    with gradserve.Client(demo_server.address, chunk_bytes=None) as whole:
        expected = whole.gradient("cnn", images, target=target)
    np.testing.assert_allclose(chunked, expected, rtol=1e-5, atol=1e-7)


# -- responses decoded as views of the received bytes ----------------------------------------------
def _response():
    from gradserve.v1 import sensitivity_service_pb2 as pb2

    r = pb2.ComputeResponse(request_id="7", model="m", version=3)
    r.target_indices.extend([1, -2, 3])
    _codec.encode(np.arange(12, dtype=np.float32).reshape(3, 4), out=r.outputs["y"])
    _codec.encode(np.arange(3, dtype=np.float64) - 1.5, out=r.attributions["x"])
    _codec.encode(np.zeros((0, 5), np.int8), out=r.extras["empty"])
    _codec.encode(np.float32(2.5), out=r.extras["scalar"])
    _codec.encode(np.array([[True, False]]), out=r.extras["flags"])
    _codec.encode(np.arange(1000, dtype=np.uint8).reshape(10, 100), out=r.outputs["bytes"])
    return r


def test_response_bytes_decode_like_the_protobuf_path():
    from gradserve._requests import decode_response

    r = _response()
    buf = r.SerializeToString()
    fast = decode_response(buf)
    slow = {name: _codec.decode_map(getattr(r, name), name) for name in ("outputs", "attributions", "extras")}
    assert (fast.model, fast.version, fast.request_id) == ("m", 3, "7")
    np.testing.assert_array_equal(fast.target_indices, [1, -2, 3])
    for name in ("outputs", "attributions", "extras"):
        a, b = getattr(fast, name), slow[name]
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])
    # Tensors share the received bytes instead of being copied (those whose data sits
    # misaligned for their dtype are copied: one byte is always aligned).
    assert np.shares_memory(fast.outputs["bytes"], np.frombuffer(buf, np.uint8))
    assert all(a.flags.aligned for a in (*fast.outputs.values(), *fast.attributions.values()))


def test_response_bytes_accept_unpacked_shapes_and_repeated_map_keys():
    from gradserve._requests import decode_response

    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    data = np.arange(6, dtype="<i4").tobytes()
    # dtype INT32 (7), shape 2 and 3 as unpacked varints, then the data
    from gradserve.v1 import tensor_pb2
    tensor = varint(1 << 3) + varint(tensor_pb2.DATA_TYPE_INT32) + varint(2 << 3) + varint(2) \
        + varint(2 << 3) + varint(3) + field(3, data)
    stale = field(1, b"y") + field(2, varint(1 << 3) + varint(tensor_pb2.DATA_TYPE_INT8))
    buf = field(4, stale) + field(4, field(1, b"y") + field(2, tensor)) + field(2, b"m")
    got = decode_response(buf)
    assert got.model == "m"
    np.testing.assert_array_equal(got.outputs["y"], np.arange(6).reshape(2, 3))   # the last entry wins


def test_response_bytes_refuse_bad_tensors():
    from gradserve._requests import decode_response

    bad = _response()
    bad.outputs["y"].shape[:] = [5, 4]   # 20 elements, 12 sent
    with pytest.raises(gradserve.Internal, match=r"outputs\['y'\].data: has 48 bytes"):
        decode_response(bad.SerializeToString())
    with pytest.raises(gradserve.Internal, match="runs past the end"):
        decode_response(_response().SerializeToString()[:-3])


def test_misaligned_tensor_data_is_copied_unless_the_caller_copies_it_anyway():
    from gradserve._requests import decode_response
    from gradserve.v1 import sensitivity_service_pb2 as pb2

    x = np.arange(64, dtype=np.float64).reshape(8, 8)
    seen = set()
    for pad in range(8):   # the model name shifts where the data lands in the message
        r = pb2.ComputeResponse(model="m" * pad)
        _codec.encode(x, out=r.outputs["y"])
        buf = r.SerializeToString()
        kept = decode_response(buf).outputs["y"]
        view = decode_response(buf, aligned=False).outputs["y"]
        np.testing.assert_array_equal(kept, x)
        np.testing.assert_array_equal(view, x)
        assert kept.flags.aligned and np.shares_memory(view, np.frombuffer(buf, np.uint8))
        seen.add(view.flags.aligned)
    assert seen == {True, False}


# -- requests serialized with one copy of the inputs ------------------------------------------------
def test_append_tensor_map_matches_protobuf_serialization():
    import ml_dtypes

    from gradserve.v1 import sensitivity_service_pb2 as pb2

    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "flags": np.array([True, False]),
              "scalar": np.float64(3.5), "empty": np.zeros((0, 3), np.int16),
              "bf": np.ones((2, 2), ml_dtypes.bfloat16), "strided": np.arange(6, dtype=">i4").reshape(2, 3)[:, ::2],
              "ü": np.int64(-5)}
    head = pb2.ComputeRequest(model="m", version=2, request_id="9")
    expected = pb2.ComputeRequest()
    expected.CopyFrom(head)
    _codec.encode_map(arrays, expected.inputs, "inputs")
    got = pb2.ComputeRequest.FromString(_codec.append_tensor_map(head.SerializeToString(), 3, arrays, "inputs"))
    assert got == expected
    with pytest.raises(_codec.TensorError, match=r"inputs\['c'\]"):
        _codec.append_tensor_map(b"", 3, {"c": np.ones(2, np.complex64)}, "inputs")


def test_chunk_payloads_parse_to_the_chunk_requests():
    from gradserve.v1 import sensitivity_service_pb2 as pb2

    x = np.random.default_rng(2).uniform(0, 1, (300, 16, 16, 1)).astype(np.float32)
    target = np.arange(300) % 10
    call = build_call(None, "cnn", "integrated_gradients", x, target=target, baseline=np.zeros((16, 16, 1)),
                      steps=8, return_outputs=True, max_message_bytes=64 << 20, chunk_bytes=64 * KIB)
    assert len(call.bounds) > 3
    payloads = list(call.payloads())
    assert isinstance(payloads[0], pb2.ComputeRequest)   # the first chunk, encoded up front
    assert all(isinstance(p, bytes) for p in payloads[1:])
    for (start, stop), payload in zip(call.bounds, payloads):
        got = payload if isinstance(payload, pb2.ComputeRequest) else pb2.ComputeRequest.FromString(payload)
        assert got == call.encode(start, stop)


def test_smoothgrad_is_split_only_where_a_message_requires_it():
    x = np.ones((5000, 4), np.float32)   # 80 KB: above chunk_bytes, well within a message
    kw = dict(max_message_bytes=64 << 20, chunk_bytes=8 * KIB)
    assert len(build_call(None, "dense2", "smoothgrad", x, seed=1, **kw).bounds) == 1
    assert len(build_call(None, "dense2", "gradient", x, **kw).bounds) > 1


# -- the engine: predict in chunks of several buckets ----------------------------------------------
def test_plain_predict_runs_several_buckets_per_call_without_retracing():
    import keras

    from gradserve.server.compute import engine as engine_mod
    from gradserve.server.config import EngineConfig
    from gradserve.server.core.spec import INPUT, OUTPUT, PreparedCall
    from gradserve.server.models.modelfn import from_keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((3,), name="x")
    model = from_keras(keras.Model(inputs, keras.layers.Dense(2, name="y")(inputs)))
    engine = engine_mod.CompiledModel(model, EngineConfig(xla="off", buckets=(1, 2, 4, 8)))
    seen: list[int] = []
    run_chunk = engine._function

    def spy(call):
        fn = run_chunk(call)

        def counted(chunk, shared):
            seen.append(len(next(iter(chunk.values()))))
            return fn(chunk, shared)
        return counted

    engine._function = spy
    x = np.random.default_rng(4).uniform(-1, 1, (8 * engine_mod.LARGE_STEP_BUCKETS * 2 + 13, 3)).astype(np.float32)
    got = engine.run(PreparedCall(("predict",), {INPUT + "x": x}))[OUTPUT + "y"]
    # Two full calls of 16 buckets, then 8 rows unpadded, then 5 rows padded to the bucket 8.
    assert seen == [128, 128, 8, 8]
    expected = engine.run(PreparedCall(("predict",), {INPUT + "x": x[:8]}))[OUTPUT + "y"]
    np.testing.assert_allclose(got[:8], expected, rtol=1e-6, atol=1e-7)
    ref = model.call({"x": tf_constant(x)})
    np.testing.assert_allclose(got, next(iter(ref.values())).numpy(), rtol=1e-5, atol=1e-6)
    assert dict(engine.trace_counts) == {"predict": 1}
    # Methods whose memory grows with more than one pass per row keep the bucket size.
    assert engine._step(PreparedCall(("jacobian",), {INPUT + "x": x}), 8) == 8


def tf_constant(x):
    import tensorflow as tf

    return tf.constant(x)
