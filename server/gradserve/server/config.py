"""Server configuration: every limit and option, with its documented default.

One frozen dataclass per concern; the CLI fills them from flags, tests construct them directly.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

__all__ = ["Limits", "EngineConfig", "BatchingConfig", "ServerConfig", "ModelSource"]


@dataclass(frozen=True)
class Limits:
    """Static request limits, checked before any TensorFlow or large NumPy allocation."""

    #: Largest gRPC message accepted or sent, in bytes.
    max_message_bytes: int = 64 * 1024 * 1024
    #: Most examples in one request.
    max_batch: int = 65536
    #: Most elements in one tensor of a request.
    max_elements: int = 64 * 1024 * 1024
    #: Highest rank of a tensor in a request.
    max_rank: int = 8
    #: Most integrated-gradients steps.
    max_steps: int = 1024
    #: Most SmoothGrad samples.
    max_samples: int = 1024
    #: Most elements of a Jacobian answer (batch x |output| x |input|).
    max_jacobian_elements: int = 16 * 1024 * 1024
    #: Elements of (path points or samples) x inputs evaluated in one compiled call; larger
    #: IG/SmoothGrad requests are computed in chunks of this size, and the evaluations of Shapley
    #: values and partial dependence go to the engine in chunks of about this many input elements.
    chunk_elements: int = 4 * 1024 * 1024
    #: Refuse NaN and Inf inputs with INVALID_ARGUMENT (served by default).
    reject_nonfinite: bool = False
    #: Decompressed request bytes held by the calls in flight, all together; a request past it
    #: gets RESOURCE_EXHAUSTED (a lone request is always admitted). 0: no budget.
    max_inflight_request_bytes: int = 1024 * 1024 * 1024
    #: Most computing calls in flight at once, every protocol together (native Compute, OIP
    #: inferences over gRPC and REST, Analyze); more get RESOURCE_EXHAUSTED (0: no limit). Health,
    #: reflection, metadata and ModelService calls are never counted (``ops.admission``).
    max_concurrent_calls: int = 1024
    #: Most global sensitivity analyses in flight at once (each also counts as a call; 0: no limit).
    max_concurrent_analyses: int = 4
    #: Most ComputeStreams open at once, all connections together (0: no limit).
    max_streams: int = 1024
    #: Most ComputeStreams open at once on one connection (0: no limit).
    max_streams_per_connection: int = 128
    #: A ComputeStream with no request in flight for this long is ended with UNAVAILABLE, in
    #: seconds (0: never). No stream lives longer than ``max_deadline_s``.
    stream_idle_s: float = 300.0
    #: gRPC's own cap on RPCs in flight, every service together (health included); a last-resort
    #: valve well above max_concurrent_calls + max_streams, so that those refuse compute RPCs
    #: first and health keeps answering (0: none).
    max_concurrent_rpcs: int = 16384
    #: Deadline applied to calls that set none, in seconds.
    default_deadline_s: float = 60.0
    #: Longest deadline honoured; longer ones are cut to this, in seconds.
    max_deadline_s: float = 600.0
    #: Most model evaluations of one global sensitivity analysis (rows of its sample matrix).
    max_gsa_evaluations: int = 4 * 1024 * 1024
    #: Most factors (varied input elements) of one global sensitivity analysis.
    max_gsa_dimension: int = 1024
    #: Most model evaluations (rows through the model, forward or gradient) of one Shapley-value or
    #: partial-dependence request.
    max_explain_evaluations: int = 16 * 1024 * 1024
    #: Exact Shapley values: most 2^features x background rows (the evaluations of each explained row).
    max_exact_shap_evaluations: int = 4 * 1024 * 1024
    #: Most features (or feature groups) of a kernel or exact Shapley-value request.
    max_shap_features: int = 1024
    #: Most shared-memory regions mapped at once, OIP and native together (0: no limit).
    max_shm_regions: int = 256
    #: Most bytes of shared-memory regions mapped at once (0: no limit).
    max_shm_bytes: int = 32 * 1024 * 1024 * 1024
    # The OIP over HTTP (``--http-port``): what one connection may cost before its request runs.
    #: Most bytes of a request's line and headers together; more: 431 and the connection closed.
    http_max_header_bytes: int = 32 * 1024
    #: Most bytes of one header line (or of the request line); more: 431 and the connection closed.
    http_max_header_line_bytes: int = 8 * 1024
    #: Most header lines of one request; more: 431 and the connection closed.
    http_max_headers: int = 100
    #: Most HTTP connections open at once; more are answered 503 and closed (0: no limit).
    http_max_connections: int = 1024
    #: A connection with no request in progress is closed after this many seconds (0: never).
    http_idle_timeout_s: float = 5.0
    #: A request's line and headers must arrive within this many seconds of their first byte;
    #: else 408 and the connection closed (0: no limit).
    http_header_timeout_s: float = 10.0
    #: A request's body must arrive within this many seconds of its headers; else 408 and the
    #: connection closed (0: no limit).
    http_body_timeout_s: float = 60.0
    #: Most bytes of an inference's JSON outside its inputs' ``data`` arrays (names, shapes,
    #: parameters, outputs); more: 413.
    http_max_json_outside_data_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class EngineConfig:
    """How models are compiled and placed."""

    #: TensorFlow device for compiled functions, e.g. "/CPU:0" or "/GPU:0"; "" lets TF choose.
    device: str = ""
    #: XLA: "auto" (measured at warm-up), "on" or "off".
    xla: str = "auto"
    #: Largest batch the engine pads to; larger requests run in chunks of this size.
    max_bucket: int = 64
    #: Explicit bucket sizes; empty: powers of two up to max_bucket.
    buckets: tuple[int, ...] = ()
    #: Trace and run the common methods before a model is READY.
    warmup: bool = True
    #: Where predict and gradient functions run on the CPU: "auto" (LiteRT where it reproduces
    #: TensorFlow's answers and is faster, per function and batch size), "litert" (wherever it
    #: reproduces them) or "tensorflow".
    backend: str = "auto"

    def bucket_sizes(self) -> tuple[int, ...]:
        if self.buckets:
            return tuple(sorted(set(self.buckets)))
        sizes, b = [], 1
        while b < self.max_bucket:
            sizes.append(b)
            b *= 2
        sizes.append(self.max_bucket)
        return tuple(sizes)


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of concurrent compatible requests."""

    #: Merge concurrent requests into one compiled call.
    enabled: bool = True
    #: Most examples in one merged call.
    max_batch_size: int = 64
    #: Longest a request that arrived while its model was busy is held for others to join, in
    #: microseconds from its arrival (a request that finds the model idle is never held).
    max_delay_us: int = 500
    #: Most requests waiting per model version; more get RESOURCE_EXHAUSTED.
    max_queue: int = 4096
    #: Most merged calls of one model version running at once. One (measured best on CPU: what
    #: arrives during a call joins the next one); different models still run in parallel on
    #: the compute threads.
    max_inflight: int = 1
    #: Most requests of one ComputeStream being computed at once (responses stay in order; a
    #: reader slower than that window stops the server reading the stream: back-pressure).
    stream_window: int = 64
    #: A request that finds its model idle runs on the event loop itself, without a hop to a
    #: compute thread, when the engine calls of its kind measured at most this many microseconds
    #: (an exponential average per function and batch size); 0: never.
    inline_max_us: int = 100


@dataclass(frozen=True)
class LoadingConfig:
    """How loading models leaves the CPU to the models already serving (``models.background``)."""

    #: Nice value added to the model loader's thread once a model serves (Linux; 0: the loader
    #: keeps normal priority, better where other processes keep every core busy, since a loader
    #: that holds the GIL while it waits for a core holds up the serving threads too).
    niceness: int = 10
    #: The interpreter's switch interval while a model loads, in microseconds (CPython's default
    #: is 5000; 0: unchanged), so that the loader hands the GIL to the event loop sooner.
    switch_interval_us: int = 500


@dataclass(frozen=True)
class ModelSource:
    """A model given on the command line: NAME=PATH (a .keras file or a SavedModel folder)."""

    name: str
    path: str


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``create_server`` needs."""

    host: str = "127.0.0.1"
    port: int = 50051
    models: tuple[ModelSource, ...] = ()
    model_dir: str | None = None
    #: Serve the built-in demo models (the default when no model is given).
    demo_models: bool = False
    #: Rescan model_dir every N seconds (0: never).
    poll_seconds: float = 0.0
    #: Allow models that run arbitrary code at load time (Lambda layers, legacy .h5).
    trust_model_code: bool = False
    #: Serve model-dir entries (version folders, model files) that resolve outside model_dir
    #: through links; refused by default.
    follow_symlinks: bool = False
    limits: Limits = field(default_factory=Limits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    #: Per-model overrides of ``batching``, by model name.
    model_batching: dict[str, BatchingConfig] = field(default_factory=dict)
    #: Threads running TensorFlow work.
    compute_threads: int = 2
    loading: LoadingConfig = field(default_factory=LoadingConfig)
    #: Seconds in-flight requests get to finish after SIGTERM.
    grace_seconds: float = 10.0
    #: Prometheus metrics port (0: off).
    metrics_port: int = 0
    #: Open Inference Protocol over HTTP/REST on this port (0: off; the gRPC port serves it always).
    http_port: int = 0
    #: TLS server certificate and key (PEM files); client CA for mutual TLS.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    #: File holding the bearer tokens accepted (one per line); None: no token auth.
    auth_token_file: str | None = None
    #: Bind with SO_REUSEPORT, sharing the port with the other workers of one supervisor.
    reuse_port: bool = False
    #: Close each client connection after this many seconds (0: never), so that clients resolve
    #: the server's name again and reach replicas added since they connected.
    max_connection_age_s: float = 0.0
    #: Export OpenTelemetry traces over OTLP/gRPC to this endpoint, e.g. http://collector:4317
    #: (None: only when the standard OTEL_* variables ask for it; see ``tracing``).
    otlp_endpoint: str | None = None
    #: Same-host shared memory (the OIP system shared-memory extension and the SDK's
    #: SharedMemoryService): True, False, or None: on when ``host`` is a loopback address
    #: (``shared_memory_enabled``; docs/shared-memory.md says why).
    shared_memory: bool | None = None

    @property
    def shared_memory_enabled(self) -> bool:
        """Whether shared memory is served: ``shared_memory``, or for None whether ``host`` is loopback."""
        if self.shared_memory is not None:
            return self.shared_memory
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False
