"""Readiness while models load, and loading beside serving (issue 19, item 6).

A server is configured with two models: ``fast`` loads at once, ``slow``'s build waits on an
Event. While ``slow`` loads, ``fast`` is SERVING under its own health name and OIP model-ready,
and answers calls; the overall health (``service=""``), the gRPC service names and OIP
server-ready (gRPC through tritonclient, REST through httpx) say NOT_SERVING / not ready. Once
``slow`` is released, everything says SERVING. The load itself runs on a thread of its own (not
the event loop's, not an executor's), at lower priority where the OS allows it, with a shorter
switch interval while it runs.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tritonclient_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gradserve.server.compute.compiler import Compiler
from gradserve.server.config import EngineConfig, ServerConfig
from gradserve.server.models import background
from gradserve.server.models.repository import ModelRepository
from gradserve.server.process.app import SERVICE_NAMES, BackgroundServer
from subprocess_server import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _scaled(factor: float) -> Any:
    """``y = factor * x`` over ``x`` (None, 4) float32: gradient of sum(y) is ``factor``."""
    import tensorflow as tf

    from gradserve.server.core.models import TensorSpec
    from gradserve.server.models.modelfn import ModelFunction

    spec = TensorSpec("x", np.dtype(np.float32), (None, 4))
    return ModelFunction((spec,), (TensorSpec("y", np.dtype(np.float32), (None, 4)),),
                         lambda feed: {"y": factor * tf.convert_to_tensor(feed["x"])})


class SlowRepository(ModelRepository):
    """Configured models: ``fast`` (ready at once), then ``slow``, whose build waits for ``release``
    and records the thread it ran on."""

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config, Compiler(config.engine))
        self.release = threading.Event()
        self.building = threading.Event()
        self.seen: dict[str, Any] = {}

    def load_configured(self) -> None:
        self.load("fast", 1, "test:fast", lambda: _scaled(2.0))
        self.load("slow", 1, "test:slow", self._slow)

    def _slow(self) -> Any:
        tid = threading.get_native_id()
        self.seen.update(thread=threading.current_thread(), switch_interval=sys.getswitchinterval(),
                         nice=os.getpriority(os.PRIO_PROCESS, tid) if sys.platform.startswith("linux") else None)
        self.building.set()
        assert self.release.wait(120), "the test never released the slow model"
        return _scaled(3.0)


@pytest.fixture()
def slow_server() -> Iterator[tuple[BackgroundServer, SlowRepository]]:
    config = ServerConfig(demo_models=False, host="127.0.0.1", port=0, http_port=free_port(),
                          engine=EngineConfig(xla="off", buckets=(1, 2)))
    repository = SlowRepository(config)
    srv = BackgroundServer(config, repository).start(wait_models=False)
    try:
        yield srv, repository
    finally:
        repository.release.set()
        srv.stop(grace=0.5)


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=30).status)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc  # a name not set yet
            return -1


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_each_model_serves_when_ready_and_the_server_when_all_are(
        slow_server: tuple[BackgroundServer, SlowRepository]) -> None:
    srv, repository = slow_server
    address, http_port = srv.address, srv.config.http_port
    _wait_for(repository.building.is_set, "the slow model's build to start")
    _wait_for(lambda: _health(address, "fast") == SERVING, "fast SERVING")

    # slow is loading: fast serves under its own name and answers; the server is not ready.
    assert _health(address, "slow") == NOT_SERVING
    assert _health(address, "") == NOT_SERVING
    for name in SERVICE_NAMES:
        assert _health(address, name) == NOT_SERVING
    triton = tritonclient_grpc.InferenceServerClient(address)
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
        assert triton.is_server_live() and not triton.is_server_ready()
        assert triton.is_model_ready("fast") and not triton.is_model_ready("slow")
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 503
        assert http.get("/v2/models/fast/ready").status_code == 200
        assert http.get("/v2/models/slow/ready").status_code == 503
        with gradserve.Client(address, timeout=30) as client:
            for _ in range(20):
                np.testing.assert_array_equal(client.gradient("fast", {"x": X})["x"], np.full_like(X, 2.0))
            with pytest.raises(gradserve.Unavailable):
                client.gradient("slow", {"x": X})

            repository.release.set()
            srv.wait_models(120)
            assert _health(address, "") == SERVING
            for name in ("fast", "slow", *SERVICE_NAMES):
                assert _health(address, name) == SERVING
            assert triton.is_server_ready() and triton.is_model_ready("slow")
            assert http.get("/v2/health/ready").status_code == 200
            assert http.get("/v2/models/slow/ready").status_code == 200
            np.testing.assert_array_equal(client.gradient("slow", {"x": X})["x"], np.full_like(X, 3.0))
    triton.close()


def test_loading_runs_on_a_thread_of_its_own_at_lower_priority(
        slow_server: tuple[BackgroundServer, SlowRepository]) -> None:
    srv, repository = slow_server
    _wait_for(repository.building.is_set, "the slow model's build to start")
    thread = repository.seen["thread"]
    # Not the event loop's thread ("gradserve-server"), not an executor's: the loader's own.
    assert thread.name == "gradserve-load" and thread.daemon and thread is not threading.current_thread()
    if repository.seen["nice"] is not None and background.settings().niceness > 0:  # Linux: lower priority
        assert repository.seen["nice"] > os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    repository.release.set()
    srv.wait_models(120)
    # The GIL was handed over sooner while the load ran; the interval is restored after it.
    normal = sys.getswitchinterval()
    assert repository.seen["switch_interval"] == min(normal, background.settings().switch_interval_us / 1e6 or normal)


def test_a_model_that_fails_to_load_does_not_hold_the_server_back(start_server: Callable[..., Any]) -> None:
    """Every configured model loaded: READY ones serve, a FAILED one is NOT_SERVING under its own
    name, and the server reports SERVING (the others are not held out of rotation)."""
    config = ServerConfig(demo_models=False, engine=EngineConfig(xla="off", buckets=(1, 2)))

    class Repository(ModelRepository):
        def load_configured(self) -> None:
            self.load("good", 1, "test:good", lambda: _scaled(2.0))
            self.load("bad", 1, "test:bad", _cannot_build)

    cfg = dataclasses.replace(config, host="127.0.0.1", port=0)
    srv = start_server(cfg, repository=Repository(cfg, Compiler(cfg.engine)))
    assert _health(srv.address, "") == SERVING
    assert _health(srv.address, "good") == SERVING
    assert _health(srv.address, "bad") == NOT_SERVING
    triton = tritonclient_grpc.InferenceServerClient(srv.address)
    try:
        assert triton.is_server_ready() and triton.is_model_ready("good") and not triton.is_model_ready("bad")
    finally:
        triton.close()


def _cannot_build() -> Any:
    raise ValueError("this model cannot be built")
