"""Client-side health checking over several servers: a server that reports NOT_SERVING (loading
its models, or draining) gets no calls from ``gradserve.Client([...])`` while another serves,
and gets them again once it reports SERVING."""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import numpy as np
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
