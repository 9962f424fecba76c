"""AsyncClient against a live server: the same answers as Client, async streams in order, chunked
large calls. Streams, retries and metadata errors of both clients: test_sdk_twins."""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncIterator

import numpy as np
import pytest

import gradserve

MIB = 1 << 20


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_every_public_method_of_client_is_a_coroutine_of_async_client():
    public = {n for n in dir(gradserve.Client) if not n.startswith("_") and callable(getattr(gradserve.Client, n))}
    public -= {"close"}
    for name in public:
        method = getattr(gradserve.AsyncClient, name)
        if name == "stream":
            assert inspect.isasyncgenfunction(method)
        else:
            assert inspect.iscoroutinefunction(method), name
        sync_params = list(inspect.signature(getattr(gradserve.Client, name)).parameters)
        assert list(inspect.signature(method).parameters) == sync_params, name


def test_async_and_sync_results_agree(client, demo_server):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (5, 4)).astype(np.float32)
    images = rng.uniform(0, 1, (3, 16, 16, 1)).astype(np.float32)
    multi = {"b": rng.normal(size=(2, 2)).astype(np.float32), "a": rng.normal(size=(2, 3)).astype(np.float32)}

    async def main() -> list[Any]:
        async with gradserve.AsyncClient(demo_server.address) as c:
            return [
                await c.gradient("dense2", x, return_outputs=True),
                await c.predict("dense2", x),
                await c.input_x_gradient("dense2", x),
                await c.gradient("cnn", images, target="argmax"),
                await c.integrated_gradients("cnn", images, target=[1, 2, 3], steps=16),
                await c.gradient("multi", multi, output="y1"),
                await c.predict("multi", [multi["a"], multi["b"]]),
                (await c.model_info("dense2")).name,
                sorted(m.name for m in await c.models()),
            ]

    got = run(main())
    want = [
        client.gradient("dense2", x, return_outputs=True),
        client.predict("dense2", x),
        client.input_x_gradient("dense2", x),
        client.gradient("cnn", images, target="argmax"),
        client.integrated_gradients("cnn", images, target=[1, 2, 3], steps=16),
        client.gradient("multi", multi, output="y1"),
        client.predict("multi", [multi["a"], multi["b"]]),
        client.model_info("dense2").name,
        sorted(m.name for m in client.models()),
    ]
    assert list(got[5]) == ["b", "a"]   # mirrors the caller's dict, in the caller's key order
    for g, w in zip(got, want):
        _assert_same(g, w)
    np.testing.assert_allclose(got[0][1], 0.5, rtol=1e-6)


def _assert_same(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_same(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    elif isinstance(want, np.ndarray):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    else:
        assert got == want


def test_async_stream_of_an_async_iterable_returns_in_order(demo_server):
    async def batches() -> AsyncIterator[np.ndarray]:
        for i in range(300):
            yield np.full((2, 4), i, np.float32)

    async def main() -> list[Any]:
        async with gradserve.AsyncClient(demo_server.address) as c:
            return [y async for y in c.stream("dense2", batches(), method="predict", window=16)]

    results = run(main())
    np.testing.assert_allclose([r[0, 0] for r in results], 2.0 * np.arange(300) + 0.1, rtol=1e-5)


def test_async_large_call_is_chunked_and_reassembled(demo_server):
    x = np.random.default_rng(4).uniform(-1, 1, (150_000, 4)).astype(np.float32)   # 2.4 MB

    async def main() -> Any:
        async with gradserve.AsyncClient(demo_server.address, max_message_bytes=MIB) as c:
            return await c.gradient("dense2", x, return_outputs=True)

    y, g = run(main())
    assert g.shape == x.shape
    np.testing.assert_allclose(g, 0.5, rtol=1e-6)
    np.testing.assert_allclose(y[:, 0], 0.5 * x.sum(axis=1) + 0.1, rtol=1e-5, atol=1e-5)


def test_async_errors_and_deadlines(demo_server):
    async def main() -> None:
        async with gradserve.AsyncClient(demo_server.address) as c:
            with pytest.raises(gradserve.NotFound):
                await c.model_info("nope")
            with pytest.raises(gradserve.NotFound, match="unknown input name 'c'"):
                await c.gradient("multi", {"a": np.ones((1, 3)), "c": np.ones((1, 2))})
            with pytest.raises(gradserve.DeadlineExceeded):
                await c.gradient("cnn", np.ones((4096, 16, 16, 1), np.float32), timeout=1e-3)

    run(main())


def test_a_client_made_before_the_event_loop_connects_inside_it(demo_server):
    c = gradserve.AsyncClient(demo_server.address)   # no running loop yet

    async def main() -> Any:
        async with c:
            return await c.gradient("dense2", np.ones((2, 4)))

    np.testing.assert_allclose(run(main()), 0.5, rtol=1e-6)
