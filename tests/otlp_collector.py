"""An OTLP/gRPC trace receiver on 127.0.0.1 for the tracing tests (OpenTelemetry's own
TraceService messages), importable from every test module (tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import grpc

__all__ = ["Collector"]


class Collector:
    """An OTLP/gRPC trace receiver: keeps the names of the spans exported to it."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.names: list[str] = []
        self.resources: list[dict[str, str]] = []
        self.received = threading.Condition()
        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                with collector.received:
                    for rs in request.resource_spans:
                        collector.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
                        collector.names += [s.name for ss in rs.scope_spans for s in ss.spans]
                    collector.received.notify_all()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def wait_for(self, name: str, timeout: float = 60.0) -> bool:
        """Whether a span called ``name`` arrived within ``timeout`` seconds."""
        with self.received:
            return self.received.wait_for(lambda: name in self.names, timeout)

    def stop(self) -> None:
        self.server.stop(0)
