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
from bisect import bisect_left
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


_REQUESTS = ("gradserve_requests", "Requests by protocol, model, method and status code",
             ["protocol", "model", "method", "code"])
_LATENCY = ("gradserve_request_latency_seconds", "Request latency in seconds", ["protocol", "model", "method"])
_REQUEST_BATCH = ("gradserve_request_batch_size", "Examples per request", ["model"])
_ENGINE_BATCH = ("gradserve_engine_batch_size", "Rows per (merged) engine call", ["model"])
_QUEUE_TIME = ("gradserve_queue_time_seconds", "Time a request waited before its engine call", ["model"])
_INFLIGHT = ("gradserve_inflight_rpcs", "Calls being served and streams open, by protocol and RPC",
             ["protocol", "rpc"])


class _Buckets:
    """One histogram's counts per bucket (``counts[i]``: observations in (bounds[i-1], bounds[i]],
    the last one above every bound) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def sample(self, bounds: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets as the exposition format has them, and the sum."""
        counts, total = list(self.counts), self.sum  # one copy: a scrape runs beside the loop
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(bounds, counts):
            running += n
            out.append((floatToGoString(bound), running))
        out.append(("+Inf", running + counts[-1]))
        return out, total


class _RequestRecord:
    """What one (protocol, model, method, code) records: its count, and the latency and batch-size
    histograms it shares with the other codes of its (protocol, model, method) and model."""

    __slots__ = ("count", "latency", "batches")

    def __init__(self, latency: _Buckets, batches: _Buckets) -> None:
        self.count = 0
        self.latency = latency
        self.batches = batches


class _Level:
    """One in-flight gauge value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class _Recorded(Collector):
    """The request metrics of a single-process server as plain counters, written on the event
    loop (every recorder runs there: the call envelope, the batcher's observer) and turned into
    metric families when scraped. prometheus-client's ``inc``/``observe`` take a lock and walk
    the buckets per call: ~6 µs of a batch-1 request's handler, against ~1 µs here."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], _RequestRecord] = {}
        self.latency: dict[tuple[str, str, str], _Buckets] = {}
        self.batches: dict[str, _Buckets] = {}
        self.engine: dict[str, tuple[_Buckets, _Buckets]] = {}
        self.inflight: dict[tuple[str, str], _Level] = {}

    def request(self, key: tuple[str, str, str, str]) -> _RequestRecord:
        latency = self.latency.get(key[:3]) or self.latency.setdefault(key[:3], _Buckets(_LATENCY_BUCKETS))
        batches = self.batches.get(key[1]) or self.batches.setdefault(key[1], _Buckets(_BATCH_BUCKETS))
        return self.requests.setdefault(key, _RequestRecord(latency, batches))

    def level(self, protocol: str, rpc: str) -> _Level:
        return self.inflight.setdefault((protocol, rpc), _Level())

    def engine_model(self, model: str) -> tuple[_Buckets, _Buckets]:
        return self.engine.setdefault(model, (_Buckets(_BATCH_BUCKETS), _Buckets(_LATENCY_BUCKETS)))

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(_REQUESTS[0], _REQUESTS[1], labels=_REQUESTS[2])
        for labels, record in list(self.requests.items()):
            requests.add_metric(list(labels), record.count)
        yield requests
        yield self._histograms(_LATENCY, list(self.latency.items()), _LATENCY_BUCKETS)
        yield self._histograms(_REQUEST_BATCH, [((m,), h) for m, h in list(self.batches.items())], _BATCH_BUCKETS)
        engine = list(self.engine.items())
        yield self._histograms(_ENGINE_BATCH, [((m,), h[0]) for m, h in engine], _BATCH_BUCKETS)
        yield self._histograms(_QUEUE_TIME, [((m,), h[1]) for m, h in engine], _LATENCY_BUCKETS)
        inflight = GaugeMetricFamily(_INFLIGHT[0], _INFLIGHT[1], labels=_INFLIGHT[2])
        for (protocol, rpc), level in list(self.inflight.items()):
            inflight.add_metric([protocol, rpc], level.value)
        yield inflight

    @staticmethod
    def _histograms(spec: tuple[str, str, list[str]], items: list[tuple[tuple[str, ...], _Buckets]],
                    bounds: tuple[float, ...]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(spec[0], spec[1], labels=spec[2])
        for labels, hist in items:
            buckets, total = hist.sample(bounds)
            family.add_metric(list(labels), buckets, total)
        return family


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
        #: Several worker processes (``--workers``): every value lives in prometheus-client's
        #: per-process files, which the supervisor sums. One process: plain counters on the
        #: event loop, read when scraped (``_Recorded``), at a fraction of the cost per request.
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._recorded: _Recorded | None = None
        if self.multiprocess:
            self.requests = Counter(*_REQUESTS, registry=r)
            self.latency = Histogram(*_LATENCY, buckets=_LATENCY_BUCKETS, registry=r)
            self.batch_size = Histogram(*_REQUEST_BATCH, buckets=_BATCH_BUCKETS, registry=r)
            self.engine_batch = Histogram(*_ENGINE_BATCH, buckets=_BATCH_BUCKETS, registry=r)
            self.queue_time = Histogram(*_QUEUE_TIME, buckets=_LATENCY_BUCKETS, registry=r)
            self.inflight = Gauge(*_INFLIGHT, registry=r, multiprocess_mode="livesum")
        else:
            self._recorded = _Recorded()
            r.register(self._recorded)
        self.shm_regions = Gauge("gradserve_shm_regions", "Shared-memory regions mapped (registered, or still used "
                                 "by a call)", registry=r, multiprocess_mode="livesum")
        self.shm_bytes = Gauge("gradserve_shm_bytes_mapped", "Bytes of shared-memory regions mapped",
                               registry=r, multiprocess_mode="livesum")
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
        if self._recorded is not None:
            record = self._recorded.requests.get(key) or self._recorded.request(key)
            record.count += 1
            latency = record.latency
            latency.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
            latency.sum += seconds
            if batch is not None and batch > 0:
                batches = record.batches
                batches.counts[bisect_left(_BATCH_BUCKETS, batch)] += 1
                batches.sum += batch
            return
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(protocol, model, method, code), self.latency.labels(protocol, model, method),
                self.batch_size.labels(model))
        children[0].inc()
        children[1].observe(seconds)
        if batch is not None and batch > 0:
            children[2].observe(batch)

    def observe_shared_memory(self, regions: int, nbytes: int) -> None:
        """Hook for the shared-memory registry: regions and bytes mapped now."""
        self.shm_regions.set(regions)
        self.shm_bytes.set(nbytes)

    def inflight_child(self, protocol: str, rpc: str) -> Any:
        """The in-flight gauge of one protocol's RPC (``inc()`` and ``dec()``)."""
        if self._recorded is not None:
            return self._recorded.inflight.get((protocol, rpc)) or self._recorded.level(protocol, rpc)
        child = self._inflight_children.get((protocol, rpc))
        if child is None:
            child = self._inflight_children[(protocol, rpc)] = self.inflight.labels(protocol, rpc)
        return child

    def observe_engine_call(self, model: str, rows: int, queue_seconds: float) -> None:
        """Hook for the batcher: one engine call of ``rows`` rows whose oldest request waited
        ``queue_seconds``."""
        if self._recorded is not None:
            rows_hist, wait_hist = self._recorded.engine.get(model) or self._recorded.engine_model(model)
            rows_hist.counts[bisect_left(_BATCH_BUCKETS, rows)] += 1
            rows_hist.sum += rows
            wait_hist.counts[bisect_left(_LATENCY_BUCKETS, queue_seconds)] += 1
            wait_hist.sum += queue_seconds
            return
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
