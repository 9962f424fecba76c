"""Limits of computing calls, analyses and ComputeStreams against a live server (``ops/admission.py``),
on every protocol: native Compute, the Open Inference Protocol over gRPC and REST, and Analyze.

The attack they answer: one client held 1030 idle ComputeStreams, gRPC's limit on RPCs in
flight (shared by every service) was full, and health checks were refused, so a liveness probe
would have restarted a healthy server. Now the compute RPCs have limits of their own, health
and the model queries are never counted, idle streams are ended, and no stream outlives
``--max-deadline``. Small limits keep the tests short; nothing here asserts how fast anything is
(only that a stream ended by the server lived at least as long as the limit it was ended by).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradserve
from gated_model import MARK, Gate
from gradserve import _codec
from gradserve.v1 import model_service_pb2 as mpb
from gradserve.v1 import model_service_pb2_grpc as mpb_grpc
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc
from subprocess_server import free_port

STREAMS = 4
PER_CONNECTION = 2
CALLS = 2
ANALYSES = 1
IDLE_S = 3.0
LIFETIME_S = 10.0
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
SERVICE = "gradserve.v1.SensitivityService"


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any]) -> Iterator[tuple[Any, Gate]]:
    from gradserve.server.config import BatchingConfig, EngineConfig, Limits, ServerConfig
    from gradserve.server.models import demo

    limits = Limits(max_streams=STREAMS, max_streams_per_connection=PER_CONNECTION, max_concurrent_calls=CALLS,
                    max_concurrent_analyses=ANALYSES, stream_idle_s=IDLE_S, max_deadline_s=LIFETIME_S)
    config = ServerConfig(limits=limits, compute_threads=3, batching=BatchingConfig(enabled=False),
                          engine=EngineConfig(xla="off", warmup=False), http_port=free_port())
    gate = Gate()
    yield start_server(config, models={"dense2": demo.build_dense2, "gate": gate.model}), gate
    gate.release.set()


def _gradient_request(request_id: str = "") -> pb.ComputeRequest:
    req = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT, request_id=request_id)
    _codec.encode(np.arange(8, dtype=np.float32).reshape(2, 4), out=req.inputs["input"])
    return req


def _assert_gradient(resp: pb.ComputeResponse) -> None:
    # dense2 is linear: 10 units of weight 0.5, then weight 0.1 each: d y / dx = 10 * 0.5 * 0.1 = 0.5.
    np.testing.assert_allclose(_codec.decode(resp.attributions["input"]), np.full((2, 4), 0.5), rtol=1e-6)


def _gate_request(x0: float) -> pb.ComputeRequest:
    req = pb.ComputeRequest(model="gate", method=pb.METHOD_PREDICT)
    x = np.ones((1, 4), np.float32)
    x[0, 0] = x0
    _codec.encode(x, out=req.inputs["x"])
    return req


def _connection(address: str) -> grpc.Channel:
    """A channel with a connection of its own (channels to one address share one by default)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _wait_for(what: Callable[[], bool], message: Callable[[], str]) -> None:
    """Wait for a state of the server (polled; not a timing check)."""
    end = time.monotonic() + 120
    while not what():
        assert time.monotonic() < end, message()
        time.sleep(0.01)


class IdleStream:
    """A ComputeStream that sends nothing until ``close()``: it only holds its slot."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.done = threading.Event()
        self.opened = time.monotonic()

        def nothing() -> Iterator[pb.ComputeStreamRequest]:
            self.done.wait(120)
            return
            yield  # a generator that yields nothing

        self.call = pb_grpc.SensitivityServiceStub(channel).ComputeStream(nothing(), timeout=120)

    def ended(self) -> grpc.RpcError:
        """The status the server ended the stream with."""
        with pytest.raises(grpc.RpcError) as info:
            next(self.call)
        return info.value

    def close(self) -> None:
        self.done.set()
        self.call.cancel()


def _refused(channel: grpc.Channel) -> str:
    """Open one more (idle) stream; it must be refused with RESOURCE_EXHAUSTED. Returns the details."""
    stream = IdleStream(channel)
    try:
        err = stream.ended()
    finally:
        stream.close()
    assert err.code() == RE, err.details()
    return err.details() or ""


def test_idle_streams_in_every_slot_starve_nobody_and_are_ended(server: tuple[Any, Gate]) -> None:
    srv, _ = server
    admission = srv.server.admission
    channels = [_connection(srv.address) for _ in range(3)]
    held: list[IdleStream] = []
    try:
        # Every stream slot held by idle streams, two on each of two connections.
        held = [IdleStream(channels[i // PER_CONNECTION]) for i in range(STREAMS)]
        _wait_for(lambda: admission.streams == STREAMS, lambda: f"{admission.streams} streams open")
        other = channels[2]
        assert "(--max-streams)" in _refused(other)
        # Health (overall and per service), model queries and Compute from another client are served.
        health = health_pb2_grpc.HealthStub(other)
        for service in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        listed = mpb_grpc.ModelServiceStub(other).ListModels(mpb.ListModelsRequest(), timeout=30)
        names = [m.name for m in listed.models]
        assert sorted(names) == ["dense2", "gate"]
        _assert_gradient(pb_grpc.SensitivityServiceStub(other).Compute(_gradient_request(), timeout=30))
        assert admission.streams == STREAMS  # still held: what was served above was not refused by chance
        # The idle streams are ended by the server (UNAVAILABLE, so that clients reopen when they
        # have more to send), not by their own 120 s deadline, and not before they were idle that long.
        for stream in held:
            err = stream.ended()
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "idle" in (err.details() or "") and "--stream-idle-seconds" in (err.details() or "")
            assert time.monotonic() - stream.opened >= IDLE_S
        _wait_for(lambda: admission.streams == 0, lambda: f"{admission.streams} streams still open")
        assert admission.streams_by_peer == {}
        # The slots are free again.
        (answer,) = pb_grpc.SensitivityServiceStub(channels[0]).ComputeStream(
            iter([pb.ComputeStreamRequest(request=_gradient_request("again"))]), timeout=30)
        _assert_gradient(answer.response)
    finally:
        for stream in held:
            stream.close()
        for ch in channels:
            ch.close()


def test_streams_per_connection_at_the_edge(server: tuple[Any, Gate]) -> None:
    srv, _ = server
    admission = srv.server.admission
    _wait_for(lambda: admission.streams == 0, lambda: f"{admission.streams} streams left open")
    with _connection(srv.address) as first, _connection(srv.address) as second:
        held = [IdleStream(first) for _ in range(PER_CONNECTION)]  # exactly the limit: admitted
        try:
            _wait_for(lambda: admission.streams == PER_CONNECTION, lambda: f"{admission.streams} streams open")
            assert "(--max-streams-per-connection)" in _refused(first)
            # Another connection is not limited by this one's streams.
            (answer,) = pb_grpc.SensitivityServiceStub(second).ComputeStream(
                iter([pb.ComputeStreamRequest(request=_gradient_request())]), timeout=30)
            _assert_gradient(answer.response)
        finally:
            for stream in held:
                stream.close()
    _wait_for(lambda: admission.streams == 0, lambda: f"{admission.streams} streams left open")


def test_a_stream_with_a_request_in_flight_is_not_idle(server: tuple[Any, Gate]) -> None:
    srv, gate = server
    gate.release.clear()
    with grpc.insecure_channel(srv.address) as ch:
        stream = pb_grpc.SensitivityServiceStub(ch).ComputeStream(
            iter([pb.ComputeStreamRequest(request=_gate_request(MARK))]), timeout=60)
        _wait_for(lambda: srv.server.admission.streams == 1, lambda: "the stream did not open")
        time.sleep(IDLE_S * 1.5)  # held in the model for longer than the idle limit
        gate.release.set()
        (answer,) = list(stream)
    assert answer.WhichOneof("result") == "response", answer.error.message
    assert _codec.decode(answer.response.outputs["y"])[0, 0] == MARK


def test_no_stream_outlives_max_deadline(server: tuple[Any, Gate]) -> None:
    srv, _ = server
    answered: dict[str, int] = {}

    def busy(timeout: float | None) -> grpc.RpcError:
        # A request every 0.2 s: never idle. Without a deadline, and with one longer than the limit.
        stop = threading.Event()

        def requests() -> Iterator[pb.ComputeStreamRequest]:
            while not stop.wait(0.2):
                yield pb.ComputeStreamRequest(request=_gradient_request())

        opened = time.monotonic()
        call = pb_grpc.SensitivityServiceStub(ch).ComputeStream(requests(), timeout=timeout)
        try:
            with pytest.raises(grpc.RpcError) as info:
                for answer in call:
                    _assert_gradient(answer.response)
                    answered[str(timeout)] = answered.get(str(timeout), 0) + 1
        finally:
            stop.set()
        assert time.monotonic() - opened >= LIFETIME_S
        return info.value

    with grpc.insecure_channel(srv.address) as ch:
        results: dict[float | None, grpc.RpcError] = {}
        threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, busy(t))) for t in (None, 120.0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    assert set(results) == {None, 120.0}
    for err in results.values():
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
        assert "--max-deadline" in (err.details() or "")
    assert set(answered) == {"None", "120.0"}  # both streams were served until the end


def test_a_stream_whose_caller_stops_reading_still_ends_at_max_deadline(server: tuple[Any, Gate]) -> None:
    """A caller that sends and never reads: the handler is then held writing answers (HTTP/2 flow
    control), not waiting for the next one, and the stream must still end at its lifetime."""
    srv, _ = server
    admission = srv.server.admission
    _wait_for(lambda: admission.streams == 0, lambda: f"{admission.streams} streams left open")
    big = pb.ComputeRequest(model="dense2", method=pb.METHOD_GRADIENT)
    _codec.encode(np.ones((65536, 4), np.float32), out=big.inputs["input"])  # 1 MiB in, 1 MiB back
    done = threading.Event()

    def requests() -> Iterator[pb.ComputeStreamRequest]:
        for _ in range(48):  # far more answers than the connection's flow-control windows hold
            yield pb.ComputeStreamRequest(request=big)
        done.wait(120)

    with grpc.insecure_channel(srv.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        opened = time.monotonic()
        call = pb_grpc.SensitivityServiceStub(ch).ComputeStream(requests(), timeout=120)
        try:
            _wait_for(lambda: admission.streams == 1, lambda: "the stream did not open")
            _wait_for(lambda: admission.streams == 0, lambda: "the stream outlived --max-deadline")
            assert time.monotonic() - opened >= LIFETIME_S
        finally:
            done.set()
            call.cancel()
        # Ended, the server goes on serving.
        _assert_gradient(pb_grpc.SensitivityServiceStub(ch).Compute(_gradient_request(), timeout=30))


def test_compute_calls_at_the_edge(server: tuple[Any, Gate]) -> None:
    srv, gate = server
    admission = srv.server.admission
    gate.release.clear()
    results: list[Any] = []
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.SensitivityServiceStub(ch)
        held = [threading.Thread(target=lambda: results.append(stub.Compute(_gate_request(MARK), timeout=60)))
                for _ in range(CALLS)]
        try:
            for t in held:
                t.start()
            _wait_for(lambda: admission.calls == CALLS, lambda: f"{admission.calls} calls in flight")  # the limit
            with pytest.raises(grpc.RpcError) as info:
                stub.Compute(_gradient_request(), timeout=30)
            assert info.value.code() == RE and "(--max-concurrent-calls)" in (info.value.details() or "")
            # Streams, health and model queries are not Compute calls.
            (answer,) = stub.ComputeStream(iter([pb.ComputeStreamRequest(request=_gradient_request())]), timeout=30)
            _assert_gradient(answer.response)
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert mpb_grpc.ModelServiceStub(ch).GetModel(mpb.GetModelRequest(name="dense2"), timeout=30).model.name
        finally:
            gate.release.set()
            for t in held:
                t.join(60)
        assert len(results) == CALLS
        for r in results:
            assert _codec.decode(r.outputs["y"])[0, 0] == MARK
        _wait_for(lambda: admission.calls == 0, lambda: f"{admission.calls} calls in flight")
        _assert_gradient(stub.Compute(_gradient_request(), timeout=30))


def test_the_sdk_goes_on_after_its_idle_stream_was_ended(server: tuple[Any, Gate]) -> None:
    import gradserve

    srv, _ = server
    ended: list[int] = []
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    def batches() -> Iterator[np.ndarray]:
        yield x
        # Nothing in flight meanwhile: the server ends the stream, and the client reopens it.
        _wait_for(lambda: srv.server.admission.streams == 0, lambda: "the idle stream was not ended")
        ended.append(1)
        yield 2 * x

    with gradserve.Client(srv.address, timeout=60) as client:
        results = list(client.stream("dense2", batches(), method="gradient"))
    assert ended == [1] and len(results) == 2
    for r in results:
        np.testing.assert_allclose(r, np.full((2, 4), 0.5), rtol=1e-6)


# -- every protocol against --max-concurrent-calls and --max-concurrent-analyses ------------------------
def _oip_grpc(srv: Any) -> Any:
    import tritonclient.grpc as triton

    with triton.InferenceServerClient(srv.address) as client:
        inp = triton.InferInput("input", [2, 4], "FP32")
        inp.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4))
        out = client.infer("dense2", [inp], parameters={"method": "gradient"})
        return out.as_numpy("attributions/input")


def _oip_rest(srv: Any) -> Any:
    import httpx

    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}],
            "parameters": {"method": "gradient"}}
    response = httpx.post(f"http://127.0.0.1:{srv.config.http_port}/v2/models/dense2/infer", json=body, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.json()['error']}")
    out = {o["name"]: o for o in response.json()["outputs"]}["attributions/input"]
    return np.reshape(out["data"], out["shape"])


def _analyze(srv: Any) -> Any:
    with gradserve.Client(srv.address, timeout=60) as c:
        result = c.sobol("dense2", bounds=[(0.0, 1.0)] * 4, samples=8, seed=1)
        return np.asarray(result["S1"])


def _native(srv: Any) -> Any:
    with grpc.insecure_channel(srv.address) as ch:
        resp = pb_grpc.SensitivityServiceStub(ch).Compute(_gradient_request(), timeout=60)
        return _codec.decode(resp.attributions["input"])


PROTOCOLS = {"native": _native, "oip-grpc": _oip_grpc, "oip-rest": _oip_rest, "analyze": _analyze}


def _refusal(error: BaseException) -> str:
    """Status and text of a refused call, whichever client raised it."""
    from tritonclient.utils import InferenceServerException

    if isinstance(error, gradserve.GradserveError):
        return f"{error.code.name} {error.details}"
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name} {error.details()}"  # type: ignore[attr-defined]
    if isinstance(error, InferenceServerException):
        return f"{error.status()} {error.message()}"
    return str(error)  # the REST helper's "HTTP <status>: <error>"


def _hold(srv: Any, count: int, results: list[Any]) -> list[threading.Thread]:
    """``count`` native calls held inside the gate model (they stay in flight until released)."""
    def call() -> None:
        with grpc.insecure_channel(srv.address) as ch:
            results.append(pb_grpc.SensitivityServiceStub(ch).Compute(_gate_request(MARK), timeout=60))

    threads = [threading.Thread(target=call) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_every_protocol_counts_against_max_concurrent_calls(server: tuple[Any, Gate], protocol: str) -> None:
    srv, gate = server
    admission, request = srv.server.admission, PROTOCOLS[protocol]
    gate.release.clear()
    results: list[Any] = []
    held = _hold(srv, CALLS - 1, results)
    try:
        _wait_for(lambda: admission.calls == CALLS - 1, lambda: f"{admission.calls} calls in flight")
        assert np.all(np.isfinite(request(srv)))  # one below the limit: admitted
        held += _hold(srv, 1, results)
        _wait_for(lambda: admission.calls == CALLS, lambda: f"{admission.calls} calls in flight")
        with pytest.raises(Exception) as info:  # at the limit: refused
            request(srv)
        text = _refusal(info.value)
        assert "--max-concurrent-calls" in text and ("RESOURCE_EXHAUSTED" in text or "429" in text), text
    finally:
        gate.release.set()
        for t in held:
            t.join(60)
    assert len(results) == CALLS
    _wait_for(lambda: admission.calls == 0, lambda: f"{admission.calls} calls in flight")
    assert np.all(np.isfinite(request(srv)))


def test_analyses_at_their_own_limit(server: tuple[Any, Gate]) -> None:
    srv, gate = server
    admission = srv.server.admission
    gate.release.clear()
    outcome: list[Any] = []

    def held_analysis() -> None:
        # Every sample's first element rounds to MARK in float32: its first evaluation waits in the gate.
        with gradserve.Client(srv.address, timeout=60) as c:
            outcome.append(c.sobol("gate", bounds=[(MARK, MARK + 1e-6)] + [(0.0, 1.0)] * 3, samples=4, seed=1))

    thread = threading.Thread(target=held_analysis)
    thread.start()
    try:
        _wait_for(lambda: admission.analyses == ANALYSES, lambda: f"{admission.analyses} analyses in flight")
        with pytest.raises(gradserve.ResourceExhausted, match="--max-concurrent-analyses"):
            _analyze(srv)
        np.testing.assert_allclose(_native(srv), 0.5, rtol=1e-6)  # calls are below their own limit
    finally:
        gate.release.set()
        thread.join(60)
    assert outcome and outcome[0]["evaluations"] == 4 * (4 + 2)
    _wait_for(lambda: admission.analyses == 0, lambda: f"{admission.analyses} analyses in flight")
    assert np.all(np.isfinite(_analyze(srv)))


def test_requests_of_every_protocol_are_counted_with_their_protocol(server: tuple[Any, Gate]) -> None:
    srv, _ = server
    registry = srv.server.metrics.registry

    def count(protocol: str, method: str) -> float:
        labels = {"protocol": protocol, "model": "dense2", "method": method, "code": "OK"}
        return registry.get_sample_value("gradserve_requests_total", labels) or 0.0

    cases = {"native": ("native", "gradient"), "oip-grpc": ("oip-grpc", "gradient"),
             "oip-rest": ("oip-rest", "gradient"), "analyze": ("native", "sobol")}
    for name, (protocol, method) in cases.items():
        before = count(protocol, method)
        PROTOCOLS[name](srv)
        _wait_for(lambda p=protocol, m=method, b=before: count(p, m) == b + 1,
                  lambda p=protocol, m=method: f"{p} {m} counted {count(p, m)}")
