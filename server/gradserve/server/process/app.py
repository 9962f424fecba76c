"""Server assembly: gRPC server, servicers, health, reflection, model loading and shutdown.

``GradServer`` is the asyncio server; ``BackgroundServer`` runs one on its own thread and event
loop, for tests, benchmarks and notebooks (``with BackgroundServer(config) as srv: srv.port``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradserve import _codec
from gradserve.server.compute.compiler import Compiler
from gradserve.server.compute.runner import ComputeRunner
from gradserve.server.config import ServerConfig
from gradserve.server.dataplane import DataPlane
from gradserve.server.frontends import oip
from gradserve.server.frontends.gsa import GlobalSensitivityServicer
from gradserve.server.frontends.native.service import ModelServicer, SensitivityServicer, add_to_server
from gradserve.server.models import background
from gradserve.server.models.repository import ModelRepository, ModelVersion
from gradserve.server.ops import auth, tracing
from gradserve.server.ops.admission import Admission
from gradserve.server.ops.calls import CallEnvelope
from gradserve.server.ops.metrics import ServerMetrics
from gradserve.server.process import reflection
from gradserve.v1 import global_sensitivity_service_pb2 as _gsa_pb2
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["GradServer", "BackgroundServer", "server_options"]

_log = logging.getLogger("gradserve.server")

SERVICE_NAMES = (
    _pb2.DESCRIPTOR.services_by_name["SensitivityService"].full_name,
    _model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    _gsa_pb2.DESCRIPTOR.services_by_name["GlobalSensitivityService"].full_name,
)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


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
        self.metrics = ServerMetrics(self.repository)
        self.runner.observer = self.metrics.observe_engine_call
        self.dataplane = DataPlane(self.repository, self.runner, config.limits)
        #: Limits of computing calls, analyses and ComputeStreams (health and the rest are never counted).
        self.admission = Admission(config.limits)
        #: The call envelope every protocol's requests are served in.
        self.envelope = CallEnvelope(config.limits, self.admission, self.metrics,
                                     lambda name: name in self.repository.names())
        # The Open Inference Protocol: on the gRPC port always, over HTTP with --http-port.
        self.oip = oip.InferenceFrontEnd(self.dataplane, self.envelope, lambda: self._loaded)
        self.rest: oip.RestServer | None = None

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
        add_to_server(server, SensitivityServicer(self.dataplane, self.envelope), ModelServicer(self.dataplane),
                      self.admission.guard_stream)
        server.add_generic_rpc_handlers((GlobalSensitivityServicer(self.dataplane, self.envelope).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable(SERVICE_NAMES + (health.SERVICE_NAME,), server)  # v1 and v1alpha
        server.add_generic_rpc_handlers((oip.InferenceServicer(self.oip).handler(),))
        address = f"{self.config.host}:{self.config.port}"
        self.port = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        if not self._loaded:  # a worker loads its models before it binds (``supervisor``)
            await self.health.set("", _NOT_SERVING)
            for name in SERVICE_NAMES:
                await self.health.set(name, _NOT_SERVING)
        await server.start()
        self.server = server
        _log.info("listening on %s:%d%s", self.config.host, self.port, " (TLS)" if credentials else "")
        if self.config.metrics_port:
            port = self.metrics.serve(self.config.host, self.config.metrics_port)
            _log.info("metrics on http://%s:%d/metrics", self.config.host, port)
        if self.config.http_port:
            tokens = auth.read_tokens(self.config.auth_token_file) if self.config.auth_token_file else None
            self.rest = oip.RestServer(tracing.asgi(oip.create_app(self.oip, tokens,
                                                                   self.config.limits.max_message_bytes)),
                                       self.config.host, self.config.http_port, self.config.tls_cert,
                                       self.config.tls_key, self.config.tls_client_ca, self.config.reuse_port)
            port = await self.rest.start()
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
        # executor: the models already READY keep their latency while the others load.
        await asyncio.wrap_future(background.start(self.repository.load_configured))
        for name in self.repository.names():  # every model's own status before the server's
            await self.health.set(name, _SERVING if self.repository.ready(name) else _NOT_SERVING)
        self._loaded = True
        await self.health.set("", _SERVING)
        for name in SERVICE_NAMES:
            await self.health.set(name, _SERVING)
        self.repository.start_polling()  # no-op unless --model-dir and --poll-seconds

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within ``grace`` seconds, stop."""
        await self.health.enter_graceful_shutdown()
        self.repository.stop_polling(timeout=0)  # a daemon thread; a load in progress is abandoned
        grace = self.config.grace_seconds if grace is None else grace
        rest_stopped = asyncio.ensure_future(self.rest.stop(grace)) if self.rest is not None else None
        if self.server is not None:
            await self.server.stop(grace)
        if rest_stopped is not None:
            await rest_stopped
        self.runner.close()
        self.metrics.close()
        tracing.flush()

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
