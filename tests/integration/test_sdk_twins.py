"""Client and AsyncClient behave the same: every test here runs once with each, against the demo
server (behind the fault-injecting proxy where a failure is needed). Streams: order, errors at
their position (the SDK's, the server's in-band ones, the caller's iterator's), restarts after a
broken stream; metadata errors; options refused before anything is sent."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from flaky_proxy import FlakyProxy

import gradserve

KINDS = ["sync", "async"]


def run_with(kind: str, address: str, body: Callable[[Any], Awaitable[Any]], **client_options: Any) -> Any:
    """``body(client)`` with a ``Client`` (kind "sync") or an ``AsyncClient`` ("async") on ``address``."""
    async def main() -> Any:
        if kind == "sync":
            with gradserve.Client(address, **client_options) as c:
                return await body(c)
        async with gradserve.AsyncClient(address, **client_options) as c:
            return await body(c)
    return asyncio.run(main())


async def call(result: Any) -> Any:
    """The value of a sync client's call or of an async client's coroutine."""
    return await result if inspect.isawaitable(result) else result


async def drain(results: Any, got: list[Any]) -> list[Any]:
    """Collect a stream (an iterator or an async iterator) into ``got``, which keeps what came before an error."""
    if hasattr(results, "__aiter__"):
        async for r in results:
            got.append(r)
    else:
        for r in results:
            got.append(r)
    return got


@pytest.fixture()
def proxy(demo_server: Any) -> Any:
    made: list[FlakyProxy] = []

    def make(**options: Any) -> FlakyProxy:
        made.append(FlakyProxy(demo_server.address, **options))
        return made[-1]
    yield make
    for p in made:
        p.close()


def predicted(results: list[Any]) -> list[float]:
    return [float(r[0, 0]) for r in results]


# -- streams ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_stream_answers_come_in_request_order(kind, demo_server):
    batches = [np.full((2, 4), i, np.float32) for i in range(200)]
    got = run_with(kind, demo_server.address,
                   lambda c: drain(c.stream("dense2", batches, method="gradient", return_outputs=True, window=16), []))
    assert len(got) == 200
    np.testing.assert_allclose([y[0, 0] for y, _ in got], 2.0 * np.arange(200) + 0.1, rtol=1e-5)
    np.testing.assert_allclose(np.stack([g for _, g in got]), 0.5, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad, error, match", [
    (np.ones((1, 5), np.float32), gradserve.InvalidArgument, "dimension 1 is 5"),     # refused by the SDK
    (np.ones((65537, 4), np.float32), gradserve.InvalidArgument, "batch size 65537"),  # by the server, in-band
])
def test_a_failing_batch_raises_at_its_position_after_the_ones_before_it(kind, demo_server, bad, error, match):
    batches = [np.full((1, 4), 0, np.float32), np.full((1, 4), 1, np.float32), bad, np.full((1, 4), 3, np.float32)]
    got: list[Any] = []
    with pytest.raises(error, match=match):
        run_with(kind, demo_server.address, lambda c: drain(c.stream("dense2", batches, method="predict"), got))
    assert predicted(got) == pytest.approx([0.1, 2.1], rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_an_error_in_the_callers_batches_is_raised_after_the_batches_before_it(kind, demo_server):
    def batches() -> Any:
        yield np.ones((1, 4), np.float32)
        yield np.ones((1, 4), np.float32)
        raise KeyError("no more data")

    got: list[Any] = []
    with pytest.raises(KeyError, match="no more data"):
        run_with(kind, demo_server.address, lambda c: drain(c.stream("dense2", batches(), method="predict"), got))
    assert len(got) == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_a_broken_stream_restarts_from_the_first_unanswered_request(kind, proxy, code):
    p = proxy(break_code=code, break_after=5)
    batches = [np.full((1, 4), i, np.float32) for i in range(40)]
    got = run_with(kind, f"127.0.0.1:{p.port}", lambda c: drain(c.stream("dense2", batches, method="predict",
                                                                          window=8), []))
    np.testing.assert_allclose(predicted(got), 2.0 * np.arange(40) + 0.1, rtol=1e-5)
    assert len(p.streams) == 2
    first, second = p.streams
    assert first[:5] == ["0", "1", "2", "3", "4"]
    assert second == [str(i) for i in range(5, 40)]   # the unanswered ones in order, then the rest


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_broken_by_another_error_is_not_restarted(kind, proxy):
    p = proxy(break_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    got: list[Any] = []
    with pytest.raises(gradserve.ResourceExhausted, match="injected stream break"):
        run_with(kind, f"127.0.0.1:{p.port}",
                 lambda c: drain(c.stream("dense2", [np.ones((1, 4), np.float32)] * 10, method="predict"), got))
    assert len(p.streams) == 1 and len(got) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_that_keeps_breaking_raises_after_the_retries(kind):
    # Nothing listens on the port: every stream fails UNAVAILABLE; one retry, then the error.
    from subprocess_server import free_port

    with pytest.raises(gradserve.Unavailable):
        run_with(kind, f"127.0.0.1:{free_port()}",
                 lambda c: drain(c.stream("dense2", [np.ones((1, 4), np.float32)], method="predict"), []),
                 retries=1, timeout=20)


# -- metadata --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("code, error", [(grpc.StatusCode.UNAUTHENTICATED, gradserve.Unauthenticated),
                                         (grpc.StatusCode.PERMISSION_DENIED, gradserve.PermissionDenied)])
def test_metadata_errors_other_than_not_found_and_unavailable_are_raised(kind, proxy, code, error):
    p = proxy(always={"GetModel": code})
    with pytest.raises(error, match="injected"):
        run_with(kind, f"127.0.0.1:{p.port}", lambda c: call(c.gradient("dense2", np.ones((1, 4), np.float32))))
    assert [m.rsplit("/", 1)[1] for m, _ in p.attempts] == ["GetModel"]   # and nothing else is sent


@pytest.mark.parametrize("kind", KINDS)
def test_unavailable_metadata_is_not_fetched_again_on_every_call(kind, proxy):
    p = proxy(always={"GetModel": grpc.StatusCode.UNAVAILABLE})
    x = np.full((1, 4), 2.0, np.float32)

    async def body(c: Any) -> list[Any]:
        return [await call(c.predict("dense2", x)) for _ in range(4)]

    got = run_with(kind, f"127.0.0.1:{p.port}", body)
    np.testing.assert_allclose(np.concatenate(got), 4.1, rtol=1e-6)   # answered without metadata
    fetches = [prev for m, prev in p.attempts if m.endswith("/GetModel") and prev is None]
    assert len(fetches) == 1   # then backed off (0.5 s doubling), not asked again per call
    assert len([prev for m, prev in p.attempts if m.endswith("/Compute") and prev is None]) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_an_unknown_model_is_the_servers_not_found_and_its_metadata_is_not_asked_on_every_call(kind, proxy):
    p = proxy()

    async def body(c: Any) -> None:
        for _ in range(3):
            with pytest.raises(gradserve.NotFound, match="nope"):
                await call(c.predict("nope", np.ones((1, 4), np.float32)))

    run_with(kind, f"127.0.0.1:{p.port}", body)
    assert len([m for m, prev in p.attempts if m.endswith("/GetModel") and prev is None]) == 1
    assert len([m for m, prev in p.attempts if m.endswith("/Compute") and prev is None]) == 3


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_quadrature_replaces_the_deprecated_method_argument(kind, demo_server):
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4)).astype(np.float32)

    async def body(c: Any) -> tuple[Any, Any]:
        new = await call(c.integrated_gradients("dense2", x, steps=4, quadrature="riemann_left", return_delta=True))
        with pytest.warns(DeprecationWarning, match=r"method=\.\.\.\) is deprecated"):
            old = await call(c.integrated_gradients("dense2", x, steps=4, method="riemann_left", return_delta=True))
        return new, old

    (ig, delta), (ig_old, delta_old) = run_with(kind, demo_server.address, body)
    np.testing.assert_allclose(ig, 0.5 * x, rtol=1e-5, atol=1e-7)   # dense2 is linear: IG = grad * (x - 0)
    np.testing.assert_array_equal(ig_old, ig)
    np.testing.assert_array_equal(delta_old, delta)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method, options, field", [
    ("integrated_gradients", {"steps": 0}, "steps"),
    ("integrated_gradients", {"steps": -1}, "steps"),
    ("smoothgrad", {"samples": 0}, "samples"),
    ("smoothgrad", {"samples": -5}, "samples"),
])
def test_explicit_steps_or_samples_below_one_raise_before_anything_is_sent(kind, proxy, method, options, field):
    p = proxy()

    async def body(c: Any) -> None:
        with pytest.raises(gradserve.InvalidArgument, match=f"{field}: must be a positive int"):
            await call(getattr(c, method)("dense2", np.ones((1, 4), np.float32), **options))
        with pytest.raises(gradserve.InvalidArgument, match=f"{field}: must be a positive int"):
            await drain(c.stream("dense2", [np.ones((1, 4), np.float32)], method=method, **options), [])
        # None is the server's default (50), as an omitted argument
        await call(getattr(c, method)("dense2", np.ones((1, 4), np.float32), **{field: None}))

    run_with(kind, f"127.0.0.1:{p.port}", body)
    assert [m.rsplit("/", 1)[1] for m, prev in p.attempts if prev is None] == ["GetModel", "Compute"]
