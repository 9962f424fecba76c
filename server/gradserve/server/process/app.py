"""Server assembly: gRPC server, servicers, health, reflection, model loading and shutdown.

``GradServer`` is the asyncio server; ``BackgroundServer`` runs one on its own thread and event
loop, for tests, benchmarks and notebooks (``with BackgroundServer(config) as srv: srv.port``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradserve import _codec
from gradserve._channel import KEEPALIVE_TIME_MS
from gradserve.server.compute.compiler import Compiler
from gradserve.server.compute.runner import ComputeRunner
from gradserve.server.config import ServerConfig
from gradserve.server.dataplane import DataPlane
from gradserve.server.frontends import oip
from gradserve.server.frontends.gsa import GlobalSensitivityServicer
from gradserve.server.frontends.native.service import ModelServicer, SensitivityServicer, add_to_server
from gradserve.server.frontends.native.shared_memory import SERVICE_NAME as SHM_SERVICE_NAME
from gradserve.server.frontends.native.shared_memory import SharedMemoryServicer
from gradserve.server.frontends.oip.shared_memory import SystemSharedMemoryServicer
from gradserve.server.frontends.shared_memory import SharedMemoryRegistry
from gradserve.server.models import background
from gradserve.server.models.repository import ModelRepository, ModelVersion
from gradserve.server.ops import auth, tracing
from gradserve.server.ops.admission import Admission
from gradserve.server.ops.calls import CallEnvelope
from gradserve.server.ops.metrics import ServerMetrics
from gradserve.server.process import reflection
from gradserve.server.process.heap import HeapKeeper
from gradserve.v1 import global_sensitivity_service_pb2 as _gsa_pb2
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["GradServer", "BackgroundServer", "BindError", "server_options"]

_log = logging.getLogger("gradserve.server")

SERVICE_NAMES = (
    _pb2.DESCRIPTOR.services_by_name["SensitivityService"].full_name,
    _model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    _gsa_pb2.DESCRIPTOR.services_by_name["GlobalSensitivityService"].full_name,
    SHM_SERVICE_NAME,
)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: Callers are quiet once no call arrived for this long (``GradServer.stop``).
QUIET_S = 0.1
_HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"


class _Arrivals(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no types
    """Counts the calls gRPC hands to the server, health checks left out; handles none (it is
    asked first and gRPC goes on to the real handlers). ``stop`` waits for them to cease."""

    def __init__(self) -> None:
        self.count = 0

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        if not handler_call_details.method.startswith(_HEALTH_PREFIX):
            self.count += 1


class BindError(OSError):
    """A port of the server cannot be bound (in use, or not an address of this host): a
    configuration error (``gradserve serve`` exits 2, and a supervisor does not restart it)."""


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Channel arguments of the server: explicit message limits and throughput-friendly HTTP/2.

    Also lets the process reuse freed large blocks (``_codec.tune_allocator``): every large
    message is copied through several fresh buffers, and on glibc each fresh one page-faults.
    """
    size = config.limits.max_message_bytes
    _codec.tune_allocator()
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
        ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
        # The SDK's keepalive pings (every KEEPALIVE_TIME_MS while a call is open) are welcome even
        # when no data flows, as during an analysis' long bootstrap: gRPC's default (one ping per
        # 5 minutes) answered the third one with GOAWAY "too many pings" and ended the call.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        # Off: a second server on a busy port fails to start. On for the workers of one
        # supervisor (``--workers``), which share the port and let the kernel spread connections.
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
    ]
    if config.max_connection_age_s > 0:
        # A connection that old gets GOAWAY: its calls finish within the grace period, and the
        # client reconnects, resolving DNS again, so replicas added meanwhile get traffic.
        options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000))]
    return options


class GradServer:
    """One gradserve server: start(), then load_models(), then wait or stop()."""

    def __init__(self, config: ServerConfig, repository: ModelRepository | None = None) -> None:
        self.config = config
        self.repository = repository or ModelRepository(config, Compiler(config.engine))
        self.runner = ComputeRunner(config.compute_threads, config.batching, config.model_batching)
        self.repository.add_listener(self.runner.forget)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        #: The interceptors the gRPC server runs (none by default; tracing's when it is on).
        self.interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded = False
        self.repository.add_listener(self._on_model_change)
        #: Python's cyclic GC kept off the serving path once models are loaded (``heap``).
        self._heap = HeapKeeper(self.repository)
        self.repository.add_listener(self._heap.on_model_change)
        self.metrics = ServerMetrics(self.repository)
        self.runner.observer = self.metrics.observe_engine_call
        self.dataplane = DataPlane(self.repository, self.runner, config.limits)
        #: Limits of computing calls, analyses and ComputeStreams (health and the rest are never counted).
        self.admission = Admission(config.limits)
        #: The call envelope every protocol's requests are served in.
        self.envelope = CallEnvelope(config.limits, self.admission, self.metrics,
                                     lambda name: name in self.repository.names())
        #: Same-host shared-memory regions, of the OIP extension and of the SDK's sessions.
        self.shared_memory = SharedMemoryRegistry(enabled=config.shared_memory_enabled,
                                                  max_regions=config.limits.max_shm_regions,
                                                  max_bytes=config.limits.max_shm_bytes,
                                                  on_change=self.metrics.observe_shared_memory)
        self._shm_sessions = SharedMemoryServicer(self.shared_memory)
        # The Open Inference Protocol: on the gRPC port always, over HTTP with --http-port.
        self.oip = oip.InferenceFrontEnd(self.dataplane, self.envelope, lambda: self._loaded, self.shared_memory)
        self.rest: oip.RestServer | None = None
        self._arrivals = _Arrivals()

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until models are READY); returns the port."""
        self._loop = asyncio.get_running_loop()
        # Credentials and tokens are read before binding, so a bad path fails the start.
        credentials = auth.server_credentials(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.config.auth_token_file:
            # Per-model health names need a token; "" and the service names stay open to probes.
            interceptors.append(auth.BearerTokenInterceptor(auth.read_tokens(self.config.auth_token_file),
                                                            auth.OPEN_METHOD_PREFIXES + oip.OPEN_METHODS,
                                                            open_health_services=("",) + SERVICE_NAMES))
        if tracing.setup(self.config.otlp_endpoint):
            # First, so that calls refused by the others are traced too. Only when tracing is on.
            interceptors.insert(0, tracing.server_interceptor())
        self.interceptors = tuple(interceptors)
        # Deadlines, admission, metrics and request logs are kept by the call envelope, which the
        # servicers open themselves rather than an interceptor: without interceptors grpc.aio
        # skips its interceptor pipeline, a chain of coroutines per RPC on the event loop.
        server = grpc.aio.server(options=server_options(self.config), interceptors=interceptors or None,
                                 maximum_concurrent_rpcs=self.config.limits.max_concurrent_rpcs or None)
        server.add_generic_rpc_handlers((self._arrivals,))  # first: it sees every call (``stop``)
        add_to_server(server, SensitivityServicer(self.dataplane, self.envelope, shared_memory=self.shared_memory),
                      ModelServicer(self.dataplane), self.admission.guard_stream)
        server.add_generic_rpc_handlers((GlobalSensitivityServicer(self.dataplane, self.envelope).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable(SERVICE_NAMES + (health.SERVICE_NAME,), server)  # v1 and v1alpha
        server.add_generic_rpc_handlers((oip.InferenceServicer(self.oip).handler(),
                                         SystemSharedMemoryServicer(self.shared_memory).handler(),
                                         self._shm_sessions.handler()))
        address = f"{self.config.host}:{self.config.port}"
        try:
            self.port = (server.add_secure_port(address, credentials) if credentials is not None
                         else server.add_insecure_port(address))
        except RuntimeError:  # grpc's word for a port it could not bind
            self.port = 0
        if self.port == 0:
            raise BindError(f"cannot bind the gRPC port {address} (in use, or not an address of this host)")
        if not self._loaded:  # a worker loads its models before it binds (``supervisor``)
            await self.health.set("", _NOT_SERVING)
            for name in SERVICE_NAMES:
                await self.health.set(name, _NOT_SERVING)
        await server.start()
        self.server = server
        _log.info("listening on %s:%d%s", self.config.host, self.port, " (TLS)" if credentials else "")
        _log.info("same-host shared memory %s", "on" if self.shared_memory.enabled else "off")
        if self.config.metrics_port:
            try:
                port = self.metrics.serve(self.config.host, self.config.metrics_port)
            except OSError as exc:
                await server.stop(0)
                raise BindError(f"cannot bind the metrics port {self.config.host}:{self.config.metrics_port} "
                                f"({exc.strerror or exc})") from None
            _log.info("metrics on http://%s:%d/metrics", self.config.host, port)
        if self.config.http_port:
            tokens = auth.read_tokens(self.config.auth_token_file) if self.config.auth_token_file else None
            self.rest = oip.RestServer(tracing.asgi(oip.create_app(self.oip, tokens,
                                                                   self.config.limits.max_message_bytes)),
                                       self.config.host, self.config.http_port, self.config.tls_cert,
                                       self.config.tls_key, self.config.tls_client_ca, self.config.reuse_port)
            try:
                port = await self.rest.start()
            except OSError as exc:
                await server.stop(0)
                raise BindError(f"cannot bind the HTTP port {self.config.host}:{self.config.http_port} "
                                f"({exc.strerror or exc})") from None
            _log.info("Open Inference Protocol on http%s://%s:%d/v2", "s" if self.rest.tls else "",
                      self.config.host, port)
        return self.port

    async def load_models(self) -> None:
        """Load the configured models off the event loop, then report SERVING (before or after start).

        Readiness: each model's own health name (and OIP model-ready) says SERVING as soon as
        that model has a READY version (``_on_model_change``), so it takes calls while the others
        still load; the overall status (``""``), the service names and OIP server-ready say
        SERVING only once every configured model has been loaded (READY, or FAILED: a model
        that cannot load is NOT_SERVING under its own name and does not hold the others back).
        """
        self._loop = asyncio.get_running_loop()
        # On a thread of its own at lower priority (``models.background``), not the loop's
        # executor: the models already READY keep their latency while the others load. (Its
        # settings are the process's: one server per process outside the tests.)
        background.configure(self.config.loading)
        await asyncio.wrap_future(background.start(self.repository.load_configured))
        for name in self.repository.names():  # every model's own status before the server's
            await self.health.set(name, _SERVING if self.repository.ready(name) else _NOT_SERVING)
        self._loaded = True
        await self.health.set("", _SERVING)
        for name in SERVICE_NAMES:
            await self.health.set(name, _SERVING)
        self.repository.start_polling()  # no-op unless --model-dir and --poll-seconds

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, serve on until callers go quiet, then let the calls in flight
        finish within what is left of ``grace`` seconds, and stop.

        gRPC cancels the calls that reached its transport but no handler yet when the server
        stops taking calls (they get CANCELLED, not drained), and a caller that does not watch
        health goes on sending on its connection until the server says GOAWAY, which only
        stopping does. So after NOT_SERVING the server first serves on, as before, until no call
        arrived for ``QUIET_S`` (health-checking clients and balancers have moved away; every
        call sent before the signal has been taken), at most half the grace period. The spans of
        the last calls are exported within what is left of it.
        """
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        self.repository.stop_polling(timeout=0)  # a daemon thread; a load in progress is abandoned
        if self.server is not None:
            await self._serve_until_quiet(grace / 2)
        remaining = max(0.0, deadline - time.monotonic())
        self._shm_sessions.close()  # shared-memory sessions are held streams: end them, not wait for them
        rest_stopped = asyncio.ensure_future(self.rest.stop(remaining)) if self.rest is not None else None
        if self.server is not None:
            await self.server.stop(remaining)
        if rest_stopped is not None:
            await rest_stopped
        self.shared_memory.close()
        self.runner.close()
        self._heap.close()
        self.metrics.close()
        if tracing.ACTIVE:
            await asyncio.get_running_loop().run_in_executor(None, tracing.flush,
                                                             max(0.0, deadline - time.monotonic()))

    async def _serve_until_quiet(self, limit: float) -> None:
        """Return once no call arrived for ``QUIET_S`` (seen over several turns of the event
        loop, which also matches the calls waiting in gRPC), or after ``limit`` seconds."""
        start = time.monotonic()
        seen, since, looks = self._arrivals.count, start, 0
        while time.monotonic() - start < limit:
            await asyncio.sleep(min(QUIET_S / 4, limit))
            now = time.monotonic()
            if self._arrivals.count != seen:
                seen, since, looks = self._arrivals.count, now, 0
                continue
            looks += 1
            if looks >= 3 and now - since >= QUIET_S:
                _log.info("no new call for %.1fs: stopping after %.2fs of serving on", QUIET_S, now - start)
                return
        _log.info("calls still arriving after %.1fs (half the grace period): stopping", limit)

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()

    def _on_model_change(self, mv: ModelVersion) -> None:
        # Called from loader threads: hop onto the event loop to update health.
        status = _SERVING if self.repository.ready(mv.name) else _NOT_SERVING
        if status == _SERVING and self.server is not None:
            background.yield_cpu()  # a model serves: the loads still to come leave it the CPU
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.health.set(mv.name, status), self._loop)


class BackgroundServer:
    """A GradServer on a private thread and event loop. ``start()`` returns once models are loaded."""

    def __init__(self, config: ServerConfig, repository: ModelRepository | None = None) -> None:
        self.config = config
        self._repository = repository
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gradserve-server", daemon=True)
        self.server: GradServer | None = None
        self._models_loaded: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def repository(self) -> ModelRepository:
        assert self.server is not None
        return self.server.repository

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, timeout: float = 600.0, wait_models: bool = True) -> "BackgroundServer":
        """Start serving; return once the configured models are loaded, or with ``wait_models``
        False as soon as the server listens (models load meanwhile; ``wait_models()`` waits)."""
        self._thread.start()

        async def boot() -> GradServer:
            srv = GradServer(self.config, self._repository)
            await srv.start()
            return srv

        self.server = self._call(boot(), timeout)
        self._models_loaded = asyncio.run_coroutine_threadsafe(self.server.load_models(), self._loop)
        if wait_models:
            self.wait_models(timeout)
        return self

    def wait_models(self, timeout: float | None = 600.0) -> None:
        """Wait until the configured models are loaded (the server reports SERVING)."""
        self._models_loaded.result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        self._models_loaded.cancel()  # still loading: the loader thread is abandoned (a daemon)
        if self.server is not None:
            self._call(self.server.stop(grace), 60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
