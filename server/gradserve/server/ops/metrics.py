"""Prometheus metrics of one server: requests, latency, batch sizes, queue time, traces, in-flight.

Each ``ServerMetrics`` owns a private ``CollectorRegistry`` (several servers may live in one
process, e.g. in tests), served by prometheus-client's HTTP server on ``--metrics-port``.
Request counts, latency and the in-flight gauge are recorded by the call envelope (``calls``)
for every protocol, labelled by protocol (native, oip-grpc, oip-rest), model and method;
compile and trace counts are read from the engines when scraped, so they are never stale.

In a worker of ``--workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor before
prometheus-client is imported) every value goes to a file of that directory and the supervisor
serves the sum over workers; the in-flight gauge is summed over live workers, and trace and
compile counts, which the supervisor cannot read from engines, are copied into counters every
``ENGINE_COUNTS_REFRESH_S``.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ServerMetrics", "ENGINE_COUNTS_REFRESH_S"]

#: Seconds between copies of trace and compile counts into a worker's multiprocess counters.
ENGINE_COUNTS_REFRESH_S = 1.0

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536)


class _EngineCounts(Collector):
    """Trace and XLA compile counts of every loaded engine, read at scrape time."""

    def __init__(self, repository: Any) -> None:
        self._repo = repository

    def collect(self) -> Iterator[CounterMetricFamily]:
        traces = CounterMetricFamily("gradserve_traces", "tf.function traces per model version and function",
                                     labels=["model", "version", "function"])
        compiles = CounterMetricFamily("gradserve_xla_compiles", "XLA compilations per model version and function",
                                       labels=["model", "version", "function"])
        if self._repo is not None:
            for name in self._repo.names():
                for mv in self._repo.versions(name):
                    engine = mv.engine
                    if engine is None:
                        continue
                    for fn, n in list(engine.trace_counts.items()):
                        traces.add_metric([name, str(mv.version), fn], n)
                    for fn, n in list(engine.compile_counts.items()):
                        compiles.add_metric([name, str(mv.version), fn], n)
        yield traces
        yield compiles


class _EngineCountsCopier:
    """Multiprocess mode: the engines' trace and compile counts copied into counters (by
    their increase since the last copy), every ``ENGINE_COUNTS_REFRESH_S`` on a daemon thread."""

    def __init__(self, repository: Any, registry: CollectorRegistry) -> None:
        self._repo = repository
        labels = ["model", "version", "function"]
        self._counters = {
            "trace_counts": Counter("gradserve_traces", "tf.function traces per model version and function",
                                    labels, registry=registry),
            "compile_counts": Counter("gradserve_xla_compiles", "XLA compilations per model version and function",
                                      labels, registry=registry),
        }
        self._seen: dict[tuple[str, str, str, str], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradserve-engine-counts", daemon=True)
        self._thread.start()

    def copy(self) -> None:
        for name in self._repo.names():
            for mv in self._repo.versions(name):
                engine = mv.engine
                if engine is None:
                    continue
                for attr, counter in self._counters.items():
                    for fn, n in list(getattr(engine, attr).items()):
                        key = (attr, name, str(mv.version), fn)
                        if n > self._seen.get(key, 0):
                            counter.labels(name, str(mv.version), fn).inc(n - self._seen.get(key, 0))
                            self._seen[key] = n

    def _run(self) -> None:
        while not self._stop.wait(ENGINE_COUNTS_REFRESH_S):
            self.copy()

    def close(self) -> None:
        self._stop.set()
        self.copy()


class ServerMetrics:
    """The metrics of one server and, once ``serve`` is called, their HTTP endpoint.

    Parameters
    ----------
    repository
        The model repository whose engines' trace/compile counts are exported (optional).
    """

    def __init__(self, repository: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gradserve_requests", "Requests by protocol, model, method and status code",
                                ["protocol", "model", "method", "code"], registry=r)
        self.latency = Histogram("gradserve_request_latency_seconds", "Request latency in seconds",
                                 ["protocol", "model", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("gradserve_request_batch_size", "Examples per request",
                                    ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.engine_batch = Histogram("gradserve_engine_batch_size", "Rows per (merged) engine call",
                                      ["model"], buckets=_BATCH_BUCKETS, registry=r)
        self.queue_time = Histogram("gradserve_queue_time_seconds", "Time a request waited before its engine call",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("gradserve_inflight_rpcs", "Calls being served and streams open, by protocol and RPC",
                              ["protocol", "rpc"], registry=r, multiprocess_mode="livesum")
        self._copier: _EngineCountsCopier | None = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and repository is not None:
            self._copier = _EngineCountsCopier(repository, r)
        else:
            r.register(_EngineCounts(repository))
        # Label children by label values: ``labels()`` takes a lock and builds its key on every
        # call, per request. The label sets are bounded (callers pool unknown models/methods).
        self._request_children: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}
        self._inflight_children: dict[tuple[str, str], Any] = {}
        self._engine_children: dict[str, tuple[Any, Any]] = {}
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def observe_request(self, protocol: str, model: str, method: str, code: str, seconds: float,
                        batch: int | None) -> None:
        """Record one finished request (a call, or one request of a stream)."""
        key = (protocol, model, method, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(protocol, model, method, code), self.latency.labels(protocol, model, method),
                self.batch_size.labels(model))
        children[0].inc()
        children[1].observe(seconds)
        if batch is not None and batch > 0:
            children[2].observe(batch)

    def inflight_child(self, protocol: str, rpc: str) -> Any:
        """The in-flight gauge of one protocol's RPC."""
        child = self._inflight_children.get((protocol, rpc))
        if child is None:
            child = self._inflight_children[(protocol, rpc)] = self.inflight.labels(protocol, rpc)
        return child

    def observe_engine_call(self, model: str, rows: int, queue_seconds: float) -> None:
        """Hook for the batcher: one engine call of ``rows`` rows whose oldest request waited
        ``queue_seconds``."""
        children = self._engine_children.get(model)
        if children is None:
            children = self._engine_children[model] = (self.engine_batch.labels(model), self.queue_time.labels(model))
        children[0].observe(rows)
        children[1].observe(queue_seconds)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (a daemon thread); returns the port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_port)
        return self.port

    def close(self) -> None:
        """Stop the HTTP endpoint, if one was started (and the copier of engine counts)."""
        if self._copier is not None:
            self._copier.close()
            self._copier = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
