"""Client-side health checking over several servers: a server that reports NOT_SERVING (loading
its models, or draining) gets no calls from ``gradserve.Client([...])`` while another serves,
and gets them again once it reports SERVING; while none does, calls wait for one within their
deadline (fail-fast to one address, or with ``retries=0``)."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

import gradserve
from gradserve.server.config import EngineConfig, ServerConfig


def _answered(srv: Any) -> float:
    """Compute requests this server answered, from its own metrics registry."""
    return sum(s.value for m in srv.server.metrics.registry.collect() if m.name == "gradserve_requests"
               for s in m.samples if s.name == "gradserve_requests_total")


def _set_health(srv: Any, status: int) -> None:
    asyncio.run_coroutine_threadsafe(srv.server.health.set("", status), srv._loop).result(10)


def test_not_serving_replica_gets_no_calls_until_it_serves(start_server: Callable[..., Any]) -> None:
    config = ServerConfig(demo_models=True, engine=EngineConfig(xla="off"))
    a, b = start_server(config), start_server(config)
    _set_health(a, health_pb2.HealthCheckResponse.NOT_SERVING)
    x = np.ones((2, 4), np.float32)
    try:
        with gradserve.Client([a.address, b.address], timeout=30) as c:
            before_a, before_b = _answered(a), _answered(b)
            for _ in range(20):
                assert np.allclose(c.gradient("dense2", x), 0.5)
            assert _answered(a) == before_a and _answered(b) == before_b + 20
            _set_health(a, health_pb2.HealthCheckResponse.SERVING)
            deadline = time.monotonic() + 30
            while _answered(a) == before_a:     # the client's health watch sees SERVING
                assert time.monotonic() < deadline, "the server back to SERVING got no call"
                assert np.allclose(c.gradient("dense2", x), 0.5)
    finally:
        _set_health(a, health_pb2.HealthCheckResponse.SERVING)


def test_dns_target_resolves_and_serves(demo_server: Any) -> None:
    # localhost resolves to 127.0.0.1 (where the server listens) and often ::1 (where nothing
    # does): round robin uses the address that answers.
    with gradserve.Client(f"dns:///localhost:{demo_server.port}", timeout=30) as c:
        for _ in range(5):
            assert np.allclose(c.gradient("dense2", np.ones((3, 4))), 0.5)


def test_calls_wait_for_a_ready_backend_during_a_rolling_restart(start_server: Callable[..., Any]) -> None:
    # A rolling restart done too fast: the last serving replica leaves while the one that came
    # back still loads its models (NOT_SERVING). Calls wait for a ready backend within their
    # deadline instead of failing at once with UNAVAILABLE "connections to all backends failing".
    from gradserve.server.process.app import BackgroundServer
    from subprocess_server import wait_for

    config = ServerConfig(demo_models=True, engine=EngineConfig(xla="off"), host="127.0.0.1", port=0)
    a = start_server(config)
    b = BackgroundServer(config).start()
    x = np.ones((2, 4), np.float32)
    results: list[str] = []
    stop = threading.Event()
    threads = 4
    started = [0.0] * threads   # when each thread last started a call

    def load(i: int) -> None:
        with gradserve.Client([a.address, b.address], timeout=60) as c:
            while not stop.is_set():
                started[i] = time.monotonic()
                try:
                    results.append("OK" if np.allclose(c.gradient("dense2", x), 0.5) else "wrong answer")
                except gradserve.GradserveError as exc:
                    results.append(f"{type(exc).__name__}: {exc}")

    def calls_after(n: int) -> None:
        target = len(results) + n
        wait_for(lambda: len(results) >= target, f"{n} more calls")

    loaders = [threading.Thread(target=load, args=(i,)) for i in range(threads)]
    for t in loaders:
        t.start()
    try:
        calls_after(100)
        _set_health(a, health_pb2.HealthCheckResponse.NOT_SERVING)   # a is back, still loading
        calls_after(100)
        leaving = time.monotonic()
        b.stop(grace=5)             # the other one leaves (NOT_SERVING, drained): no replica is ready
        answered = len(results)
        wait_for(lambda: min(started) > leaving, "every caller to start a call with no replica ready")
        _set_health(a, health_pb2.HealthCheckResponse.SERVING)       # a has loaded
        calls_after(100)
    finally:
        stop.set()
        for t in loaders:
            t.join(90)
        _set_health(a, health_pb2.HealthCheckResponse.SERVING)
    failed = [r for r in results if r != "OK"]
    assert failed == [], (len(failed), answered, failed[:3])


def test_calls_fail_fast_to_one_address_or_when_asked() -> None:
    # With no server at all: over several addresses a call waits for one within its deadline;
    # to one address, or with retries=0, it fails at once with UNAVAILABLE.
    from subprocess_server import free_port

    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with gradserve.Client(dead, timeout=1) as c, pytest.raises(gradserve.DeadlineExceeded):
        c.models()
    with gradserve.Client(dead, timeout=60, retries=0) as c, pytest.raises(gradserve.Unavailable):
        c.models()
    with gradserve.Client(dead[0], timeout=60) as c, pytest.raises(gradserve.Unavailable):
        c.models()
