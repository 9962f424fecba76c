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
        assert len(c._build(None, "dense2", "gradient", x, {"return_outputs": True}).bounds) > 8
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
