"""OpenTelemetry tracing (``server/tracing.py``): the server span joins the caller's trace from the
call's metadata, the queue / engine / encode spans are its children with the model's attributes,
failures are recorded, OTLP export reaches a collector, and nothing is installed when it is off.

The caller's trace context travels as OpenTelemetry's own propagator writes it (W3C
``traceparent``) into the gRPC metadata; the spans are read from an ``InMemorySpanExporter``, or
from a real OTLP/gRPC TraceService on 127.0.0.1 for the export test.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gated_model import MARK, Gate
from gradserve import _codec
from gradserve.server.ops import tracing
from gradserve.v1 import sensitivity_service_pb2 as pb
from gradserve.v1 import sensitivity_service_pb2_grpc as pb_grpc
from otlp_collector import Collector

COMPUTE = "/gradserve.v1.SensitivityService/Compute"
STATUS = "rpc.grpc.status_code"


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for one test (off again afterwards)."""
    exporter = InMemorySpanExporter()
    tracing.configure(processor=SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.disable()


@pytest.fixture()
def caller() -> trace.Tracer:
    """The calling service's tracer (its own provider: its spans are not the server's)."""
    return TracerProvider().get_tracer("test-caller")


def _server(start_server: Callable[..., Any], model: Any = None, **config: Any) -> Any:
    from gradserve.server.config import BatchingConfig, EngineConfig, ServerConfig
    from gradserve.server.models import demo

    # inline_max_us=0: every request goes through the batcher, so it has a queue span.
    cfg = ServerConfig(batching=BatchingConfig(inline_max_us=0), **config)
    if model is not None:  # a numpy function: no XLA, and no warm-up calls
        cfg = dataclasses.replace(cfg, engine=EngineConfig(xla="off", warmup=False, backend="tensorflow"))
    return start_server(cfg, models={"dense2": demo.build_dense2} if model is None else {"gate": model})


def _request(model: str, batch: int, first: float = 1.0) -> pb.ComputeRequest:
    # The gate model's numpy function has no gradient: it is asked for predictions.
    req = pb.ComputeRequest(model=model, method=pb.METHOD_PREDICT if model == "gate" else pb.METHOD_GRADIENT)
    x = np.ones((batch, 4), np.float32)
    x.flat[0] = first
    _codec.encode(x, out=req.inputs["x" if model == "gate" else "input"])
    return req


def _traced_call(stub: pb_grpc.SensitivityServiceStub, caller: trace.Tracer, request: pb.ComputeRequest,
                 timeout: float | None = 60) -> tuple[trace.SpanContext, Any]:
    """Call Compute inside a caller's span, its context in the metadata; returns (span context,
    response or the RpcError)."""
    with caller.start_as_current_span("caller") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        assert "traceparent" in carrier
        try:
            answer: Any = stub.Compute(request, metadata=tuple(carrier.items()), timeout=timeout)
        except grpc.RpcError as exc:
            answer = exc
    return span.get_span_context(), answer


def _of_trace(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in exporter.get_finished_spans():
        assert s.context is not None
        if s.context.trace_id == trace_id:
            out.setdefault(s.name, []).append(s)
    return out


def _parent_id(s: ReadableSpan) -> int | None:
    return None if s.parent is None else s.parent.span_id


def test_spans_join_the_callers_trace_with_model_attributes(start_server: Callable[..., Any],
                                                             spans: InMemorySpanExporter,
                                                             caller: trace.Tracer) -> None:
    srv = _server(start_server)
    assert any(type(i).__name__ == "OpenTelemetryAioServerInterceptor" for i in srv.server.interceptors)
    with grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.SensitivityServiceStub(channel)
        ctx, answer = _traced_call(stub, caller, _request("dense2", 3))
    assert isinstance(answer, pb.ComputeResponse) and answer.model == "dense2"
    got = _of_trace(spans, ctx.trace_id)
    (server,) = got[COMPUTE]
    assert server.kind is trace.SpanKind.SERVER
    assert server.context is not None and server.context.trace_id == ctx.trace_id
    assert _parent_id(server) == ctx.span_id and server.parent is not None and server.parent.is_remote
    assert server.attributes is not None and server.attributes[STATUS] == grpc.StatusCode.OK.value[0]
    assert server.attributes["rpc.method"] == "Compute"
    (queue,), (engine,), (encode,) = got["queue"], got["engine"], got["encode"]
    for child in (queue, engine, encode):
        assert _parent_id(child) == server.context.span_id
        assert child.status.status_code is trace.StatusCode.UNSET
    assert engine.attributes is not None
    assert dict(engine.attributes) | {tracing.BACKEND: ""} == {
        tracing.MODEL: "dense2", tracing.VERSION: 1, tracing.METHOD: "gradient", tracing.ROWS: 3,
        tracing.BATCH_ROWS: 3, tracing.DEVICE: "default", tracing.BACKEND: ""}
    assert engine.attributes[tracing.BACKEND] in ("litert", "tensorflow")
    # In the order they happened: queued, computed, encoded, all within the server span.
    assert queue.start_time is not None and queue.end_time is not None
    assert engine.start_time is not None and engine.end_time is not None
    assert encode.start_time is not None and server.start_time is not None and server.end_time is not None
    assert server.start_time <= queue.start_time <= queue.end_time <= engine.start_time <= engine.end_time
    assert engine.end_time <= encode.start_time <= server.end_time


def test_stream_and_model_queries_are_traced(start_server: Callable[..., Any], spans: InMemorySpanExporter,
                                             caller: trace.Tracer) -> None:
    from gradserve.v1 import model_service_pb2 as model_pb
    from gradserve.v1 import model_service_pb2_grpc as model_grpc

    srv = _server(start_server)
    with grpc.insecure_channel(srv.address) as channel, caller.start_as_current_span("caller") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        stream = pb_grpc.SensitivityServiceStub(channel).ComputeStream(
            iter([pb.ComputeStreamRequest(request=_request("dense2", n)) for n in (1, 2)]),
            metadata=tuple(carrier.items()), timeout=60)
        assert [r.response.model for r in stream] == ["dense2", "dense2"]
        model_grpc.ModelServiceStub(channel).GetModel(model_pb.GetModelRequest(name="dense2"),
                                                      metadata=tuple(carrier.items()), timeout=60)
    ctx = span.get_span_context()
    got = _of_trace(spans, ctx.trace_id)
    (stream_span,) = got["/gradserve.v1.SensitivityService/ComputeStream"]
    (get_model,) = got["/gradserve.v1.ModelService/GetModel"]
    assert _parent_id(stream_span) == ctx.span_id and _parent_id(get_model) == ctx.span_id
    assert stream_span.context is not None
    engines = got["engine"]
    assert sorted(e.attributes[tracing.ROWS] for e in engines if e.attributes is not None) == [1, 2]
    for name in ("queue", "engine", "encode"):
        assert len(got[name]) == 2
        assert all(_parent_id(s) == stream_span.context.span_id for s in got[name])


def test_failed_calls_record_their_status(start_server: Callable[..., Any], spans: InMemorySpanExporter,
                                          caller: trace.Tracer) -> None:
    from gradserve.server.config import Limits

    gate = Gate()
    # A request that waits behind a held engine call past the server's default deadline (the
    # caller sets none) is answered DEADLINE_EXCEEDED by the server: an error, while queued.
    srv = _server(start_server, gate.model, limits=Limits(default_deadline_s=2.0))
    try:
        with grpc.insecure_channel(srv.address) as channel, concurrent.futures.ThreadPoolExecutor(1) as pool:
            stub = pb_grpc.SensitivityServiceStub(channel)
            held = pool.submit(stub.Compute, _request("gate", 1, MARK), timeout=120)
            runner, waiting = srv.server.runner, threading.Event()

            def running() -> bool:  # the batcher is the request's own: the test creates none
                stats = runner.batcher_stats().get(("gate", 1))
                return stats is not None and stats.engine_calls >= 1

            for _ in range(12000):  # polled, not timed: until the held call runs on a compute thread
                if running() or held.done():
                    break
                waiting.wait(0.01)
            assert running() and not held.done(), "the held call never reached the engine"
            late_ctx, late = _traced_call(stub, caller, _request("gate", 1), timeout=None)
            missing_ctx, missing = _traced_call(stub, caller, _request("no_such_model", 1))
            gate.release.set()
            assert held.result(60).model == "gate"
    finally:
        gate.release.set()
    assert isinstance(late, grpc.RpcError) and late.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    got = _of_trace(spans, late_ctx.trace_id)
    (server,) = got[COMPUTE]
    assert server.attributes is not None and server.attributes[STATUS] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert server.status.status_code is trace.StatusCode.ERROR
    (queue,) = got["queue"]
    assert server.context is not None and _parent_id(queue) == server.context.span_id
    assert queue.status.status_code is trace.StatusCode.ERROR and "engine" not in got and "encode" not in got
    # NOT_FOUND: the server span has the status code; the caller's error, not the server's
    # (OpenTelemetry's rule for server spans), and nothing was queued or computed.
    assert isinstance(missing, grpc.RpcError) and missing.code() is grpc.StatusCode.NOT_FOUND
    got = _of_trace(spans, missing_ctx.trace_id)
    (server,) = got[COMPUTE]
    assert server.attributes is not None and server.attributes[STATUS] == grpc.StatusCode.NOT_FOUND.value[0]
    assert server.status.status_code is trace.StatusCode.UNSET
    assert set(got) == {COMPUTE}


def test_off_unless_asked_for(start_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                              caller: trace.Tracer) -> None:
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.ACTIVE and not tracing.wanted()
    srv = _server(start_server)
    assert srv.server.interceptors == ()
    assert not tracing.ACTIVE
    with grpc.insecure_channel(srv.address) as channel:
        _, answer = _traced_call(pb_grpc.SensitivityServiceStub(channel), caller, _request("dense2", 2))
    assert isinstance(answer, pb.ComputeResponse)
    assert tracing.span("encode") is tracing.span("queue")  # the shared no-op context
    # What turns it on, and what keeps it off.
    assert tracing.wanted("http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.wanted()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.wanted()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted() and not tracing.wanted("http://collector:4317")


def test_otlp_endpoint_exports_to_a_collector(start_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                              caller: trace.Tracer) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sensitivity-eu")
    collector = Collector()
    try:
        srv = _server(start_server, otlp_endpoint=f"http://127.0.0.1:{collector.port}")
        assert tracing.ACTIVE and srv.server.interceptors
        with grpc.insecure_channel(srv.address) as channel:
            _, answer = _traced_call(pb_grpc.SensitivityServiceStub(channel), caller, _request("dense2", 2))
        assert isinstance(answer, pb.ComputeResponse)
        tracing.flush(30)  # what the server's stop does
        with collector.received:
            assert collector.received.wait_for(lambda: "encode" in collector.names, 30)
        assert {COMPUTE, "queue", "engine", "encode"} <= set(collector.names)
        assert all(r.get("service.name") == "sensitivity-eu" for r in collector.resources)
    finally:
        tracing.disable()
        collector.server.stop(0)


def test_open_inference_protocol_is_traced_and_health_is_not(start_server: Callable[..., Any],
                                                             spans: InMemorySpanExporter,
                                                             caller: trace.Tracer) -> None:
    import httpx
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from subprocess_server import free_port

    srv = _server(start_server, http_port=free_port())
    body = {"parameters": {"method": "gradient"},
            "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4, 1, 1, 1, 1]}]}
    with caller.start_as_current_span("caller") as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.server.rest.port}", timeout=60) as http:
            assert http.post("/v2/models/dense2/infer", json=body, headers=carrier).status_code == 200
            assert http.get("/v2/health/ready", headers=carrier).status_code == 200
        with grpc.insecure_channel(srv.address) as channel:
            # The OIP gRPC service (a generic handler on the same server) and the health service.
            from gradserve.server.frontends.oip import _messages

            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=_messages.ModelInferRequest.SerializeToString,
                                        response_deserializer=_messages.ModelInferResponse.FromString)
            request = _messages.ModelInferRequest(model_name="dense2")
            request.parameters["method"].string_param = "gradient"
            tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
            tensor.contents.fp32_contents.extend([1, 2, 3, 4])
            assert infer(request, metadata=tuple(carrier.items()), timeout=60).model_name == "dense2"
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               metadata=tuple(carrier.items()), timeout=60)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    ctx = span.get_span_context()
    got = _of_trace(spans, ctx.trace_id)
    servers = [s for group in got.values() for s in group if s.kind is trace.SpanKind.SERVER]
    # Two server spans, both children of the caller's: the health checks are not traced.
    names = sorted(s.name for s in servers)
    assert len(names) == 2 and names[0] == "/inference.GRPCInferenceService/ModelInfer", names
    assert names[1].startswith("POST"), names
    assert all(_parent_id(s) == ctx.span_id for s in servers)
    engines = got["engine"]
    assert sorted(e.attributes[tracing.ROWS] for e in engines if e.attributes is not None) == [1, 2]
    server_ids = {s.context.span_id for s in servers if s.context is not None}
    assert all(_parent_id(s) in server_ids for s in got["engine"] + got["queue"])
