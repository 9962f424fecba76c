"""Observability against a live server: Prometheus metrics over HTTP, the in-flight gauge, and
structured request logs carrying request ids. Also the default deadline."""
from __future__ import annotations

import io
import json
import logging
import threading
import time
import urllib.request
from typing import Any, Callable

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve import _codec
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc
from subprocess_server import free_port


def _dense2_server(start_server: Callable[..., Any], **config: Any) -> Any:
    from gradserve.server.config import ServerConfig
    from gradserve.server.models import demo

    return start_server(ServerConfig(**config), models={"dense2": demo.build_dense2})


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any]) -> Any:
    return _dense2_server(start_server, metrics_port=free_port())


@pytest.fixture(scope="module")
def stub(server: Any) -> Any:
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.SensitivityServiceStub(ch)


def scrape(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics endpoint, keyed by (name, sorted labels)."""
    port = server.server.metrics.port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def gradient_request(batch: int, request_id: str = "") -> pb.ComputeRequest:
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT, request_id=request_id)
    _codec.encode(np.ones((batch, 4), np.float32), out=req.inputs["input"])
    return req


def test_requests_latency_batch_and_traces_are_exported(server: Any, stub: Any) -> None:
    before = scrape(server)
    for batch in (1, 3, 5):
        stub.Compute(gradient_request(batch), timeout=60)
    bad = gradient_request(2)
    bad.inputs["input"].shape[1] = 5
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            stub.Compute(bad, timeout=60)
    with pytest.raises(grpc.RpcError):
        stub.Compute(pb.ComputeRequest(model="no_such_model"), timeout=60)
    responses = list(stub.ComputeStream(iter([pb.ComputeStreamRequest(request=gradient_request(2)),
                                              pb.ComputeStreamRequest(request=bad)]), timeout=60))
    assert len(responses) == 2
    # A refused call is counted just after its status was sent: wait until all 7 are in.
    after = scrape(server)
    end = time.monotonic() + 30
    count, native = "gradserve_request_latency_seconds_count", {"protocol": "native"}
    while time.monotonic() < end and (sample(after, count, **native, model="dense2", method="gradient")
                                      - sample(before, count, **native, model="dense2", method="gradient")) < 7:
        time.sleep(0.05)
        after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("gradserve_requests_total", protocol="native", model="dense2", method="gradient", code="OK") == 4
    assert delta("gradserve_requests_total", **native, model="dense2", method="gradient",
                 code="INVALID_ARGUMENT") == 3
    # Names that are not hosted share one label value, so callers cannot grow the label set.
    assert delta("gradserve_requests_total", **native, model="unknown", method="gradient", code="NOT_FOUND") == 1
    assert delta("gradserve_request_latency_seconds_count", protocol="native", model="dense2", method="gradient") == 7
    assert delta("gradserve_request_latency_seconds_sum", protocol="native", model="dense2", method="gradient") > 0
    assert delta("gradserve_request_batch_size_count", model="dense2") == 7
    assert delta("gradserve_request_batch_size_sum", model="dense2") == 1 + 3 + 5 + 2 * 2 + 2 + 2
    # Engine calls (through the batcher): the four valid requests, their rows and queue waits.
    assert delta("gradserve_engine_batch_size_sum", model="dense2") == 1 + 3 + 5 + 2
    assert 1 <= delta("gradserve_engine_batch_size_count", model="dense2") <= 4
    assert delta("gradserve_queue_time_seconds_count", model="dense2") == \
        delta("gradserve_engine_batch_size_count", model="dense2")
    traces = {k: v for k, v in after.items() if k[0] == "gradserve_traces_total" and ("model", "dense2") in k[1]}
    assert traces and all(v >= 1 for v in traces.values())
    assert sample(after, "gradserve_inflight_rpcs", protocol="native", rpc="Compute") == 0
    assert sample(after, "gradserve_inflight_rpcs", protocol="native", rpc="ComputeStream") == 0


def test_inflight_gauge_counts_open_streams(server: Any, stub: Any) -> None:
    release = threading.Event()

    def held() -> Any:
        yield pb.ComputeStreamRequest(request=gradient_request(1))
        release.wait(60)

    stream = stub.ComputeStream(held(), timeout=60)
    try:
        next(stream)
        assert sample(scrape(server), "gradserve_inflight_rpcs", protocol="native", rpc="ComputeStream") == 1
    finally:
        release.set()
        assert list(stream) == []
    # The handler has finished once the caller saw the end of the stream.
    assert sample(scrape(server), "gradserve_inflight_rpcs", protocol="native", rpc="ComputeStream") == 0


def test_request_logs_carry_request_ids(server: Any, stub: Any) -> None:
    from gradserve.server.ops import logs

    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(logs.RequestIdFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("gradserve.server.requests")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        stub.Compute(gradient_request(2, request_id="req-ok-1"), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.Compute(pb.ComputeRequest(model="dense2", request_id="req-bad-2"), timeout=60)
        # A refused call is logged just after its status was sent.
        end = time.monotonic() + 30
        while "req-bad-2" not in buffer.getvalue() and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    by_id = {r["request_id"]: r for r in records}
    assert by_id["req-ok-1"]["code"] == "OK" and by_id["req-ok-1"]["model"] == "dense2"
    assert by_id["req-bad-2"]["code"] == "INVALID_ARGUMENT"
    assert all(r["ms"] >= 0 and r["logger"] == "gradserve.server.requests" for r in records)


def test_default_deadline_applies_to_calls_without_one(start_server: Callable[..., Any]) -> None:
    from gradserve.server.config import Limits

    srv = _dense2_server(start_server, limits=Limits(default_deadline_s=1e-6))
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SensitivityServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Compute(gradient_request(2))  # no deadline: the server's default (1 us) applies
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in (info.value.details() or "")
        resp = stub.Compute(gradient_request(2), timeout=60)  # the caller's own deadline is honoured
        np.testing.assert_allclose(_codec.decode(resp.attributions["input"]), 0.5, rtol=1e-6)
