"""OpenTelemetry tracing of calls: a server span joined to the caller's trace, and spans for the
queue wait, the engine call and the encoding of the answer.

Off unless asked for: ``--otlp-endpoint URL`` (``ServerConfig.otlp_endpoint``) or the standard
variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or
``OTEL_TRACES_EXPORTER=otlp|console``; ``OTEL_SDK_DISABLED=true`` keeps it off). When on
(``setup``), spans go through a batching processor to an OTLP/gRPC exporter (the OTEL_* variables
it reads apply: headers, certificates, timeouts, ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES``; the service name defaults to ``gradserve``), and the gRPC server
gets OpenTelemetry's own aio server interceptor (``server_interceptor``): it reads the caller's
W3C ``traceparent`` from the call's metadata and opens the server span, so the native services,
the Open Inference Protocol's gRPC service and the rest are all covered (health checks are left
out); the Open Inference Protocol's HTTP app gets OpenTelemetry's ASGI middleware (``asgi``).
Inside the call:

- ``queue``: the wait in the model's batcher, until its (merged) engine call starts;
- ``engine``: the engine call (attributes: model, version, method, rows of the request, rows of
  the merged call, backend, device); on the inline path and without batching there is no queue
  span (without batching, the wait for a compute thread is inside ``engine``);
- ``encode``: the answer's message built from the arrays.

The batcher's spans are made when the request's answer is back, with the times the batcher
stamped (``stamp_dispatch``), so that a merged call needs no span per request on the compute
thread. When tracing is off nothing is installed: no interceptor (grpc.aio then skips its
interceptor pipeline), and every hook is one check of a module global.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from gradserve.server.core.spec import PreparedCall
    from gradserve.server.models.repository import ModelVersion

__all__ = ["ACTIVE", "wanted", "setup", "configure", "disable", "flush", "server_interceptor", "asgi", "span",
           "annotate", "engine_span", "ModelTrace", "stamp_dispatch", "SCOPE"]

#: The instrumentation scope of gradserve's own spans.
SCOPE = "gradserve.server"
#: Whether tracing is on (read by the hooks: the only cost when it is off).
ACTIVE = False
_provider: TracerProvider | None = None
_tracer: Tracer | None = None
#: The exporter behind the batching processor ``configure`` made (None for a given processor).
_exporter_in_use: _Stoppable | None = None
_NULL: contextlib.AbstractContextManager[None] = contextlib.nullcontext()

#: Span attribute names (gradserve's own; the server span carries OpenTelemetry's rpc.* ones).
MODEL, VERSION, METHOD = "gradserve.model", "gradserve.model.version", "gradserve.method"
ROWS, BATCH_ROWS = "gradserve.rows", "gradserve.batch.rows"
BACKEND, DEVICE = "gradserve.backend", "gradserve.device"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def wanted(otlp_endpoint: str | None = None) -> bool:
    """Whether tracing is asked for: an endpoint given, or the standard OTEL_* variables set."""
    if _truthy("OTEL_SDK_DISABLED"):
        return False
    if otlp_endpoint:
        return True
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter(otlp_endpoint: str | None) -> SpanExporter:
    """The exporter the configuration asks for (OTLP over gRPC unless OTEL_TRACES_EXPORTER=console)."""
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    if not otlp_endpoint and names == ["console"]:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol != "grpc":
        raise ValueError(f"tracing: OTLP protocol {protocol!r} is not supported; gradserve exports OTLP "
                         "over gRPC (unset OTEL_EXPORTER_OTLP_PROTOCOL or set it to 'grpc')")
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ImportError("tracing needs the tracing extra: pip install 'gradserve[tracing]'") from None
    # No endpoint: the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT itself.
    return OTLPSpanExporter(endpoint=otlp_endpoint) if otlp_endpoint else OTLPSpanExporter()


class _Stoppable:
    """A span exporter whose ``shutdown`` can be called early and more than once.

    Stopping the OTLP exporter is what ends an export in progress (its channel closed) and the
    retries and backoff waits of the ones queued; the provider's own shutdown would wait for them
    first (up to the exporter's timeout, ``OTEL_EXPORTER_OTLP_TIMEOUT``, 10 s per batch, with
    retries), so ``disable`` stops the exporter first and the provider after."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self._stopped = threading.Event()

    def export(self, spans: Any) -> Any:
        return self.inner.export(spans)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.inner.force_flush(timeout_millis))

    def shutdown(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self.inner.shutdown()


def configure(exporter: SpanExporter | None = None, *, otlp_endpoint: str | None = None,
              processor: SpanProcessor | None = None) -> TracerProvider:
    """Turn tracing on in this process, replacing any earlier configuration.

    ``processor`` is used as given (a test passes a ``SimpleSpanProcessor`` over an
    ``InMemorySpanExporter``); else ``exporter`` (default: the one ``otlp_endpoint`` and the
    OTEL_* variables ask for) goes behind a ``BatchSpanProcessor``. The provider is gradserve's
    own: the process-wide OpenTelemetry provider is left alone.
    """
    global ACTIVE, _provider, _tracer, _exporter_in_use
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ImportError("tracing needs the tracing extra: pip install 'gradserve[tracing]'") from None
    stoppable = None
    if processor is None:
        stoppable = _Stoppable(exporter if exporter is not None else _exporter(otlp_endpoint))
        processor = BatchSpanProcessor(stoppable)  # type: ignore[arg-type]  # an exporter by its methods
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "gradserve"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    disable()
    _provider, _tracer, _exporter_in_use = provider, provider.get_tracer(SCOPE), stoppable
    ACTIVE = True
    return provider


def setup(otlp_endpoint: str | None = None) -> bool:
    """Turn tracing on when it is asked for (``wanted``) and not on already; returns whether it is on."""
    if not ACTIVE and wanted(otlp_endpoint):
        configure(otlp_endpoint=otlp_endpoint)
    return ACTIVE


def disable(timeout_s: float = 30.0) -> None:
    """Turn tracing off: export the spans still buffered within ``timeout_s`` seconds, then shut
    the exporter and the provider down without waiting on a collector (what is left is dropped)."""
    global ACTIVE, _provider, _tracer, _exporter_in_use
    provider, exporter = _provider, _exporter_in_use
    _provider, _tracer, _exporter_in_use, ACTIVE = None, None, None, False
    if provider is None:
        return
    if not _flush(provider, timeout_s) and exporter is not None:
        exporter.shutdown()
    provider.shutdown()


def _flush(provider: TracerProvider, timeout_s: float) -> bool:
    if timeout_s <= 0:
        return False
    # The batching processor's force_flush ignores its timeout and exports with the exporter's
    # own (10 s per batch, retried): it runs on a thread of its own, waited for at most timeout_s.
    done = threading.Event()

    def run() -> None:
        try:
            provider.force_flush()
        finally:
            done.set()

    threading.Thread(target=run, name="gradserve-trace-flush", daemon=True).start()
    return done.wait(timeout_s)


def flush(timeout_s: float = 5.0) -> bool:
    """Export the spans still buffered, waiting at most ``timeout_s`` seconds (server shutdown:
    what is left of the grace period; a collector that does not answer must not hold it);
    returns whether they all went out. An export still running then is ended by ``disable``."""
    provider = _provider
    return True if provider is None else _flush(provider, timeout_s)


def server_interceptor() -> grpc.aio.ServerInterceptor:
    """OpenTelemetry's aio server interceptor, on gradserve's provider (tracing must be on).

    Health checks (a probe every few seconds) are not traced, nor the services named in
    ``OTEL_PYTHON_GRPC_EXCLUDED_SERVICES`` (comma-separated, as OpenTelemetry's instrumentor reads it).
    """
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    assert _provider is not None, "tracing is off"
    excluded = [filters.health_check()] + [
        filters.service_name(name.strip())
        for name in os.environ.get("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES", "").split(",") if name.strip()]
    # The instrumentation package ships no type information.
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=_provider, filter_=filters.negate(filters.any_of(*excluded)))
    return interceptor


def asgi(app: Any) -> Any:
    """The Open Inference Protocol's HTTP app, wrapped in OpenTelemetry's ASGI middleware when
    tracing is on (a server span per request, joined to the caller's ``traceparent`` header;
    health checks are not traced); ``app`` itself when it is off."""
    if _provider is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(app, excluded_urls="/v2/health", tracer_provider=_provider,
                                   exclude_spans=["receive", "send"])


def span(name: str) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one (a no-op context when tracing is off)."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name)


#: Attribute naming the protocol of a call on its server span (native, oip-grpc, oip-rest).
PROTOCOL = "gradserve.protocol"


def annotate(protocol: str, model: str, method: str) -> None:
    """Name the current call on its server span: protocol, model and method (the call envelope
    calls this once it knows them; a no-op when tracing is off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes({PROTOCOL: protocol, MODEL: model[:128], METHOD: method})


def _backend(mv: ModelVersion, call: PreparedCall) -> str:
    engine = mv.engine
    if engine is None:
        return ""
    try:
        return "litert" if engine.runs_in_litert(call) else "tensorflow"
    except Exception:  # noqa: BLE001 - an attribute must never fail a call
        return ""


def _engine_attributes(mv: ModelVersion, call: PreparedCall, batch_rows: int) -> dict[str, str | int]:
    engine = mv.engine
    return {MODEL: mv.name, VERSION: mv.version, METHOD: str(call.key[0]) if call.key else "",
            ROWS: call.batch_size, BATCH_ROWS: batch_rows, BACKEND: _backend(mv, call),
            DEVICE: (engine.device if engine is not None else "") or "default"}


@contextlib.contextmanager
def _engine(mv: ModelVersion, call: PreparedCall) -> Iterator[None]:
    assert _tracer is not None
    with _tracer.start_as_current_span("engine") as sp:
        try:
            yield
        finally:  # the backend is known once the call ran
            sp.set_attributes(_engine_attributes(mv, call, call.batch_size))


def engine_span(mv: ModelVersion, call: PreparedCall) -> contextlib.AbstractContextManager[Any]:
    """The ``engine`` span of a call not merged by a batcher (a no-op context when tracing is off)."""
    if _tracer is None:
        return _NULL
    return _engine(mv, call)


class _Stamped(Protocol):
    dispatched_ns: int
    batch_rows: int


def stamp_dispatch(batch: Sequence[_Stamped], rows: int) -> None:
    """Called by the batcher when a merged call starts: the end of its requests' queue wait."""
    now = time.time_ns()
    for item in batch:
        item.dispatched_ns, item.batch_rows = now, rows


def _fail(sp: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    sp.record_exception(exc)
    sp.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class ModelTrace:
    """The spans of one model version's batched requests (``DynamicBatcher.trace``)."""

    def __init__(self, mv: ModelVersion) -> None:
        self._mv = mv

    def record(self, call: PreparedCall, queued_ns: int, item: _Stamped, error: BaseException | None) -> None:
        """The ``queue`` and (once dispatched) ``engine`` spans of a request whose answer is back
        (or that failed: the span where it failed gets the error), children of the current span."""
        tracer = _tracer
        if tracer is None:
            return
        end = time.time_ns()
        dispatched = item.dispatched_ns
        queue = tracer.start_span("queue", start_time=queued_ns)
        if error is not None and not dispatched:
            _fail(queue, error)
        queue.end(end_time=dispatched or end)
        if dispatched:
            engine = tracer.start_span("engine", start_time=dispatched,
                                       attributes=_engine_attributes(self._mv, call, item.batch_rows))
            if error is not None:
                _fail(engine, error)
            engine.end(end_time=end)
