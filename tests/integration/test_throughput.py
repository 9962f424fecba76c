"""Batching and ComputeStream through a real server and the SDK: correctness, order, windows.

No timing is asserted: these check that concurrency never changes an answer or its order.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, AsyncIterator

import grpc
import numpy as np
import pytest
import tensorflow as tf

import gradserve
from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import sensitivity_service_pb2_grpc as _grpc


def _gradient_request(x: np.ndarray, request_id: str, model: str = "dense2", name: str = "input",
                      index: int | None = None) -> _pb2.ComputeRequest:
    req = _pb2.ComputeRequest(model=model, method=_pb2.METHOD_GRADIENT, include_outputs=True,
                              request_id=request_id)
    _codec.encode(x, out=req.inputs[name])
    if index is not None:
        req.target.kind = _pb2.TARGET_KIND_INDEX
        req.target.indices.append(index)
    return req


def test_concurrent_clients_get_exact_answers(demo_server: Any) -> None:
    # Many callers at once, of different batch sizes: merged or not, every answer is exact.
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((int(n), 4)).astype(np.float32) for n in rng.integers(1, 9, 48)]

    with gradserve.Client(demo_server.address, timeout=60) as c:
        c.model_info("dense2")

        def call(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return c.gradient("dense2", x, return_outputs=True)

        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            results = list(ex.map(call, xs))
    for x, (y, g) in zip(xs, results):
        np.testing.assert_allclose(g, np.full_like(x, 0.5), atol=1e-6)
        np.testing.assert_allclose(y[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5, atol=1e-5)


def test_concurrent_cnn_targets_match_gradient_tape(demo_server: Any) -> None:
    from gradserve.server.models.demo import build_cnn

    model = build_cnn()
    rng = np.random.default_rng(2)
    xs = [rng.random((int(n), 16, 16, 1), dtype=np.float32) for n in (1, 2, 3, 1, 2, 4, 1, 1)]
    targets = [[int(t) for t in rng.integers(0, 10, len(x))] for x in xs]
    with gradserve.Client(demo_server.address, timeout=60) as c:
        c.model_info("cnn")
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            grads = list(ex.map(lambda a: c.gradient("cnn", a[0], target=a[1]), zip(xs, targets)))
    for x, t, g in zip(xs, targets, grads):
        xt = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            picked = tf.gather(model(xt), np.array(t), axis=1, batch_dims=1)
        np.testing.assert_allclose(g, tape.gradient(picked, xt).numpy(), rtol=1e-4, atol=1e-6)


def test_stream_keeps_order_and_answers_errors_in_band(demo_server: Any) -> None:
    rng = np.random.default_rng(3)
    requests = []
    bad = set()
    for i in range(40):
        if i % 7 == 3:
            bad.add(i)
            requests.append(_gradient_request(np.ones((1, 5), np.float32), str(i)))  # wrong width
        elif i % 11 == 5:
            bad.add(i)
            requests.append(_gradient_request(np.ones((1, 4), np.float32), str(i), model="no-such-model"))
        else:
            requests.append(_gradient_request(rng.standard_normal((1 + i % 3, 4)).astype(np.float32), str(i)))
    with grpc.insecure_channel(demo_server.address) as ch:
        responses = list(_grpc.SensitivityServiceStub(ch).ComputeStream(
            iter(_pb2.ComputeStreamRequest(request=r) for r in requests), timeout=60))
    assert [r.request_id for r in responses] == [str(i) for i in range(40)]
    for i, (req, resp) in enumerate(zip(requests, responses)):
        if i in bad:
            want = grpc.StatusCode.INVALID_ARGUMENT if i % 7 == 3 else grpc.StatusCode.NOT_FOUND
            assert resp.error.code == want.value[0], (i, resp.error)
            assert resp.error.message and not resp.HasField("response")
        else:
            assert not resp.HasField("error")
            resp = resp.response
            x = _codec.decode(req.inputs["input"])
            np.testing.assert_allclose(_codec.decode(resp.attributions["input"]), np.full_like(x, 0.5), atol=1e-6)
            np.testing.assert_allclose(_codec.decode(resp.outputs["alpha"])[:, 0], 0.5 * x.sum(axis=1) + 0.1,
                                       rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def unbatched_server(start_server: Any) -> Any:
    from gradserve.server.config import BatchingConfig, ServerConfig

    return start_server(ServerConfig(demo_models=True, batching=BatchingConfig(enabled=False, stream_window=1)))


def test_batching_off_and_window_of_one_give_the_same_answers(unbatched_server: Any) -> None:
    xs = [np.full((n, 4), float(n), np.float32) for n in (1, 2, 3, 4)]
    with gradserve.Client(unbatched_server.address, timeout=60) as c:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            grads = list(ex.map(lambda x: c.gradient("dense2", x), xs))
        streamed = list(c.stream("dense2", xs, method="gradient"))
    for x, g, s in zip(xs, grads, streamed):
        np.testing.assert_allclose(g, np.full_like(x, 0.5), atol=1e-6)
        np.testing.assert_allclose(s, np.full_like(x, 0.5), atol=1e-6)
    runner = unbatched_server.server.runner
    assert not runner.config_for("dense2").enabled


class _Context:
    """The one ServicerContext method ComputeStream reads."""

    def time_remaining(self) -> float | None:
        return None


def test_stream_window_bounds_requests_read_ahead_of_the_reader(demo_server: Any) -> None:
    # Drive the servicer directly: the requests read from the caller may run ahead of the
    # responses the caller has taken by at most the window.
    from gradserve.server.frontends.native.service import SensitivityServicer

    srv = demo_server.server
    window = 3
    servicer = SensitivityServicer(srv.dataplane, srv.envelope, stream_window=window)
    pulled = 0

    async def requests() -> AsyncIterator[bytes]:  # the servicer parses request bytes itself
        nonlocal pulled
        for i in range(20):
            pulled += 1
            yield _pb2.ComputeStreamRequest(
                request=_gradient_request(np.full((1, 4), float(i), np.float32), str(i))).SerializeToString()

    async def consume() -> list[str]:
        ids = []
        stream = servicer.ComputeStream(requests(), _Context())  # type: ignore[arg-type]
        async for resp in stream:
            ids.append(resp.request_id)
            assert pulled <= len(ids) + window, (pulled, len(ids))
            await asyncio.sleep(0.005)  # a slow reader: the server must not read far ahead
        return ids

    future = asyncio.run_coroutine_threadsafe(consume(), srv._loop)
    assert future.result(60) == [str(i) for i in range(20)]
    assert pulled == 20
