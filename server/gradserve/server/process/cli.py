"""The ``gradserve`` command line."""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from gradserve.server.config import Limits, LoadingConfig

__all__ = ["main", "build_parser"]

#: What `serve` imports that the [server] extra installs (the client subcommands need none).
_SERVER_MODULES = ("tensorflow", "grpc_health", "grpc_reflection")

_EPILOG_SERVE = """examples:
  gradserve serve                                   # demo models on 127.0.0.1:50051
  gradserve serve --model price=/models/price.keras --port 9000
"""


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    from gradserve.server.core.errors import InvalidArgumentError
    from gradserve.server.core.models import validate_model_name  # light: TensorFlow loads lazily

    try:
        validate_model_name(name, "NAME")
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return name, path


def _dir_arg(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def _buckets_arg(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(p) for p in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 1,8,64, got {text!r}")
    return tuple(sorted(set(sizes)))


def _workers_arg(text: str) -> int:
    from gradserve.server.process.supervisor import worker_count

    try:
        return worker_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradserve", description="gRPC model-sensitivity server and client.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve models over gRPC", epilog=_EPILOG_SERVE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--model", action="append", type=_model_arg, default=[], metavar="NAME=PATH",
                       help="serve a .keras file or SavedModel folder as NAME (repeatable)")
    serve.add_argument("--model-dir", type=_dir_arg, help="serve DIR/<name>/<version>/ and DIR/<name>.keras")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (default 50051)")
    serve.add_argument("--device", default="", help="TensorFlow device, e.g. /GPU:0 (default: TF's choice)")
    serve.add_argument("--xla", choices=["auto", "on", "off"], default="auto",
                       help="XLA compilation; auto times the gradient both ways at warm-up and keeps "
                            "the faster (default auto)")
    serve.add_argument("--backend", choices=["auto", "tensorflow", "litert"], default="auto",
                       help="runtime of predict and gradient functions on the CPU: auto keeps LiteRT per "
                            "function and batch size where it gives TensorFlow's answers and is faster "
                            "(default auto)")
    serve.add_argument("--max-bucket", type=int, default=64, help="largest padded batch (default 64)")
    serve.add_argument("--buckets", type=_buckets_arg, default=(), metavar="N,N,...",
                       help="batch sizes to pad to, e.g. 1,8,64 (default: powers of two up to --max-bucket)")
    serve.add_argument("--poll-seconds", type=float, default=0.0,
                       help="rescan --model-dir every N seconds for new and removed versions (default 0: never)")
    serve.add_argument("--trust-model-code", action="store_true",
                       help="allow models that run code when loaded (Lambda layers, .h5)")
    serve.add_argument("--follow-symlinks", action="store_true",
                       help="serve --model-dir entries that link outside the directory (refused by default)")
    serve.add_argument("--grace-seconds", type=float, default=10.0, help="drain time on SIGTERM (default 10)")
    serve.add_argument("--max-batch-size", type=int, default=64,
                       help="most examples merged into one compiled call (default 64)")
    serve.add_argument("--batch-delay-us", type=int, default=500,
                       help="longest a request arriving at a busy model waits for others to join, "
                            "in us (default 500)")
    serve.add_argument("--inline-max-us", type=int, default=100,
                       help="run a request on the event loop when its model is idle and its engine calls "
                            "measured at most this many us (0: always hand off to a compute thread; default 100)")
    serve.add_argument("--max-queue", type=int, default=4096,
                       help="most requests queued per model; more get RESOURCE_EXHAUSTED (default 4096)")
    serve.add_argument("--no-batching", action="store_true", help="run every request alone")
    serve.add_argument("--compute-threads", type=int, default=2, help="threads running TensorFlow (default 2)")
    serve.add_argument("--loader-niceness", type=int, default=10,
                       help="nice value added to the model loader's thread once a model serves (Linux; "
                            "0: normal priority, better where other processes keep every core busy; default 10)")
    serve.add_argument("--loading-switch-interval-us", type=int, default=500,
                       help="the interpreter's GIL switch interval while a model loads, in us "
                            "(0: unchanged; default 500)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="text lines or one JSON object per line; both carry request ids (default text)")
    _add_hardening_args(serve)
    _add_worker_args(serve)
    from gradserve import _cli as client_cli  # client subcommands: models, gradient (no TensorFlow)

    client_cli.register(sub)
    return parser


def _add_hardening_args(serve: argparse.ArgumentParser) -> None:
    """Limits, TLS, tokens and metrics (defaults are those of ``Limits`` and ``ServerConfig``)."""
    from gradserve.server.config import Limits

    d = Limits()
    lim = serve.add_argument_group("limits (larger requests are refused before any work)")
    lim.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                     help=f"largest gRPC message in or out; more: RESOURCE_EXHAUSTED (default {d.max_message_bytes})")
    lim.add_argument("--max-batch", type=int, default=d.max_batch,
                     help=f"most examples in one request (default {d.max_batch})")
    lim.add_argument("--max-elements", type=int, default=d.max_elements,
                     help=f"most elements in one tensor of a request (default {d.max_elements})")
    lim.add_argument("--max-rank", type=int, default=d.max_rank, help=f"highest tensor rank (default {d.max_rank})")
    lim.add_argument("--max-steps", type=int, default=d.max_steps,
                     help=f"most integrated-gradients steps (default {d.max_steps})")
    lim.add_argument("--max-samples", type=int, default=d.max_samples,
                     help=f"most SmoothGrad samples (default {d.max_samples})")
    lim.add_argument("--max-jacobian-elements", type=int, default=d.max_jacobian_elements,
                     help=f"most elements of a Jacobian answer (default {d.max_jacobian_elements})")
    lim.add_argument("--max-gsa-evaluations", type=int, default=d.max_gsa_evaluations,
                     help="most model evaluations of one global sensitivity analysis "
                          f"(default {d.max_gsa_evaluations})")
    lim.add_argument("--max-gsa-dimension", type=int, default=d.max_gsa_dimension,
                     help=f"most factors of one global sensitivity analysis (default {d.max_gsa_dimension})")
    lim.add_argument("--max-explain-evaluations", type=int, default=d.max_explain_evaluations,
                     help="most model evaluations of one Shapley-value or partial-dependence request "
                          f"(default {d.max_explain_evaluations})")
    lim.add_argument("--max-exact-shap-evaluations", type=int, default=d.max_exact_shap_evaluations,
                     help="exact Shapley values: most 2^features x background rows "
                          f"(default {d.max_exact_shap_evaluations})")
    lim.add_argument("--max-shap-features", type=int, default=d.max_shap_features,
                     help=f"most features (or groups) of a Shapley-value request (default {d.max_shap_features})")
    lim.add_argument("--max-shm-regions", type=int, default=d.max_shm_regions,
                     help="most shared-memory regions mapped at once; more: RESOURCE_EXHAUSTED "
                          f"(default {d.max_shm_regions}; 0: no limit)")
    lim.add_argument("--max-shm-bytes", type=int, default=d.max_shm_bytes,
                     help="most bytes of shared-memory regions mapped at once; more: RESOURCE_EXHAUSTED "
                          f"(default {d.max_shm_bytes}; 0: no limit)")
    lim.add_argument("--max-inflight-request-bytes", type=int, default=d.max_inflight_request_bytes,
                     help="decompressed request bytes held by the calls in flight; more: RESOURCE_EXHAUSTED "
                          f"(default {d.max_inflight_request_bytes}; 0: no budget)")
    lim.add_argument("--max-concurrent-calls", type=int, default=d.max_concurrent_calls,
                     help="most computing calls in flight, every protocol together (Compute, OIP inferences, "
                          "Analyze); more: RESOURCE_EXHAUSTED; health and model queries are never counted "
                          f"(default {d.max_concurrent_calls}; 0: no limit)")
    lim.add_argument("--max-concurrent-analyses", type=int, default=d.max_concurrent_analyses,
                     help="most global sensitivity analyses in flight; more: RESOURCE_EXHAUSTED "
                          f"(default {d.max_concurrent_analyses}; 0: no limit)")
    lim.add_argument("--max-streams", type=int, default=d.max_streams,
                     help=f"most ComputeStreams open; more: RESOURCE_EXHAUSTED (default {d.max_streams}; 0: no limit)")
    lim.add_argument("--max-streams-per-connection", type=int, default=d.max_streams_per_connection,
                     help="most ComputeStreams open on one connection; more: RESOURCE_EXHAUSTED "
                          f"(default {d.max_streams_per_connection}; 0: no limit)")
    lim.add_argument("--stream-idle-seconds", type=float, default=d.stream_idle_s, metavar="SECONDS",
                     help="end a ComputeStream with no request in flight for this long, with UNAVAILABLE "
                          f"(default {d.stream_idle_s:g}; 0: never)")
    lim.add_argument("--max-concurrent-rpcs", type=int, default=d.max_concurrent_rpcs,
                     help="last-resort cap on RPCs in flight, all services together, health included; keep it "
                          "well above --max-concurrent-calls + --max-streams; more: RESOURCE_EXHAUSTED "
                          f"(default {d.max_concurrent_rpcs}; 0: none)")
    lim.add_argument("--default-deadline", type=float, default=d.default_deadline_s, metavar="SECONDS",
                     help=f"deadline of Compute calls that set none (default {d.default_deadline_s:g})")
    lim.add_argument("--max-deadline", type=float, default=d.max_deadline_s, metavar="SECONDS",
                     help="longer deadlines are cut to this, and no ComputeStream lives longer "
                          f"(default {d.max_deadline_s:g})")
    lim.add_argument("--reject-nonfinite", action="store_true",
                     help="refuse NaN and Inf inputs with INVALID_ARGUMENT (default: served)")
    sec = serve.add_argument_group("authentication")
    sec.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS (with --tls-key)")
    sec.add_argument("--tls-key", metavar="PEM", help="server private key")
    sec.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates from this CA (mutual TLS)")
    sec.add_argument("--auth-token-file", metavar="FILE",
                     help="require 'authorization: Bearer <token>' with a token from FILE (one per line); "
                          "health checks stay open (per-model names need a token)")
    serve.add_argument("--metrics-port", type=int, default=0,
                       help="serve Prometheus metrics on http://HOST:PORT/metrics (default 0: off)")
    serve.add_argument("--http-port", type=int, default=0,
                       help="serve the Open Inference Protocol (KServe v2, Triton's clients) over HTTP on "
                            "http://HOST:PORT/v2 (default 0: off; the gRPC port serves it always)")
    _add_http_args(serve, d)
    serve.add_argument("--shared-memory", choices=["on", "off"], default=None,
                       help="same-host shared memory for tensors: the OIP system shared-memory extension and the "
                            "SDK's shared_memory=True (default: on when --host is a loopback address, else off; "
                            "a caller that may register regions can make the server map this host's shared memory)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_http_args(serve: argparse.ArgumentParser, d: Limits) -> None:
    """What one HTTP connection of ``--http-port`` may cost before its request runs (``Limits.http_*``)."""
    http = serve.add_argument_group("HTTP connections (--http-port)")
    http.add_argument("--http-max-header-bytes", type=_positive_int, default=d.http_max_header_bytes,
                      help="most bytes of a request's line and headers together; more: 431 and the connection "
                           f"closed (default {d.http_max_header_bytes})")
    http.add_argument("--http-max-header-line-bytes", type=_positive_int, default=d.http_max_header_line_bytes,
                      help="most bytes of one header line or the request line; more: 431 and the connection closed "
                           f"(default {d.http_max_header_line_bytes})")
    http.add_argument("--http-max-headers", type=_positive_int, default=d.http_max_headers,
                      help=f"most header lines of a request; more: 431 (default {d.http_max_headers})")
    http.add_argument("--http-max-connections", type=int, default=d.http_max_connections,
                      help="most HTTP connections open at once; more are answered 503 and closed "
                           f"(default {d.http_max_connections}; 0: no limit)")
    http.add_argument("--http-idle-timeout", type=float, default=d.http_idle_timeout_s, metavar="SECONDS",
                      help="close a connection with no request in progress after this long (keep-alive) "
                           f"(default {d.http_idle_timeout_s:g}; 0: never)")
    http.add_argument("--http-header-timeout", type=float, default=d.http_header_timeout_s, metavar="SECONDS",
                      help="a request's line and headers must arrive within this long of their first byte; else "
                           f"408 and the connection closed (default {d.http_header_timeout_s:g}; 0: no limit)")
    http.add_argument("--http-body-timeout", type=float, default=d.http_body_timeout_s, metavar="SECONDS",
                      help="a request's body must arrive within this long of its headers; else 408 and the "
                           f"connection closed (default {d.http_body_timeout_s:g}; 0: no limit)")
    http.add_argument("--http-max-json-outside-data-bytes", type=_positive_int,
                      default=d.http_max_json_outside_data_bytes,
                      help="most bytes of an inference's JSON outside its inputs' data arrays (names, shapes, "
                           f"parameters, outputs); more: 413 (default {d.http_max_json_outside_data_bytes})")


def _http_limits(args: argparse.Namespace) -> dict[str, Any]:
    return {"http_max_header_bytes": args.http_max_header_bytes,
            "http_max_header_line_bytes": args.http_max_header_line_bytes,
            "http_max_headers": args.http_max_headers, "http_max_connections": args.http_max_connections,
            "http_idle_timeout_s": args.http_idle_timeout, "http_header_timeout_s": args.http_header_timeout,
            "http_body_timeout_s": args.http_body_timeout,
            "http_max_json_outside_data_bytes": args.http_max_json_outside_data_bytes}


def _add_worker_args(serve: argparse.ArgumentParser) -> None:
    """Scale-out: ``--workers`` (server processes on one port under a ``supervisor``) and
    ``--max-connection-age`` (clients re-resolve, so replicas added later get traffic)."""
    serve.add_argument("--workers", type=_workers_arg, default=1, metavar="N|auto",
                       help="server processes sharing the port (SO_REUSEPORT) under a supervisor that "
                            "restarts them and aggregates their metrics; auto: one per core (default 1)")
    serve.add_argument("--max-connection-age", type=float, default=0.0, metavar="SECONDS",
                       help="close client connections this old (after their calls finish), so that clients "
                            "re-resolve DNS and reach new replicas (default 0: never)")
    serve.add_argument("--otlp-endpoint", metavar="URL", default=None,
                       help="export OpenTelemetry traces of every call over OTLP/gRPC to URL, e.g. "
                            "http://collector:4317 (default: off, unless the OTEL_* variables ask for it)")
    # Set by the supervisor on the command lines of its workers.
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)


def _loading(args: argparse.Namespace) -> LoadingConfig:
    from gradserve.server.config import LoadingConfig

    return LoadingConfig(niceness=args.loader_niceness, switch_interval_us=args.loading_switch_interval_us)


def _limits(args: argparse.Namespace) -> Limits:
    from gradserve.server.config import Limits

    return Limits(max_message_bytes=args.max_message_bytes, max_batch=args.max_batch, max_elements=args.max_elements,
                  max_rank=args.max_rank, max_steps=args.max_steps, max_samples=args.max_samples,
                  max_jacobian_elements=args.max_jacobian_elements, max_concurrent_rpcs=args.max_concurrent_rpcs,
                  max_inflight_request_bytes=args.max_inflight_request_bytes,
                  max_concurrent_calls=args.max_concurrent_calls,
                  max_concurrent_analyses=args.max_concurrent_analyses, max_streams=args.max_streams,
                  max_streams_per_connection=args.max_streams_per_connection,
                  stream_idle_s=args.stream_idle_seconds,
                  default_deadline_s=args.default_deadline, max_deadline_s=args.max_deadline,
                  reject_nonfinite=args.reject_nonfinite, max_gsa_evaluations=args.max_gsa_evaluations,
                  max_gsa_dimension=args.max_gsa_dimension, max_explain_evaluations=args.max_explain_evaluations,
                  max_exact_shap_evaluations=args.max_exact_shap_evaluations,
                  max_shap_features=args.max_shap_features, max_shm_regions=args.max_shm_regions,
                  max_shm_bytes=args.max_shm_bytes, **_http_limits(args))


def _supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from gradserve.server.process.supervisor import Supervisor

    return Supervisor(argv, workers=args.workers, host=args.host, port=args.port,
                      grace_seconds=args.grace_seconds, metrics_port=args.metrics_port,
                      http_port=args.http_port).run()


def _report_load_failure(task: asyncio.Future[None]) -> None:
    # Loading runs beside the serving server: without this its exception would go unseen.
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("gradserve.server").error("loading the models failed", exc_info=task.exception())


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from gradserve.server.config import BatchingConfig, EngineConfig, ModelSource, ServerConfig
    from gradserve.server.process.app import GradServer

    config = ServerConfig(
        host=args.host, port=args.port,
        models=tuple(ModelSource(n, p) for n, p in args.model), model_dir=args.model_dir,
        demo_models=not args.model and not args.model_dir,
        trust_model_code=args.trust_model_code, follow_symlinks=args.follow_symlinks,
        grace_seconds=args.grace_seconds,
        engine=EngineConfig(device=args.device, xla=args.xla, max_bucket=args.max_bucket, buckets=args.buckets,
                            backend=args.backend),
        poll_seconds=args.poll_seconds,
        batching=BatchingConfig(enabled=not args.no_batching, max_batch_size=args.max_batch_size,
                                max_delay_us=args.batch_delay_us, max_queue=args.max_queue,
                                inline_max_us=args.inline_max_us),
        compute_threads=args.compute_threads,
        loading=_loading(args),
        limits=_limits(args), metrics_port=args.metrics_port, http_port=args.http_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, auth_token_file=args.auth_token_file,
        reuse_port=args.worker_index is not None, max_connection_age_s=args.max_connection_age,
        otlp_endpoint=args.otlp_endpoint,
        shared_memory=None if args.shared_memory is None else args.shared_memory == "on",
    )

    async def run() -> None:
        server = GradServer(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.worker_index is None:
            await server.start()
            loader = asyncio.ensure_future(server.load_models())
            loader.add_done_callback(_report_load_failure)
        else:
            # A worker binds the shared port only once its models are loaded: the kernel hands
            # connections to every listening worker, and a loading one could not answer them.
            from gradserve.server.process.supervisor import watch_parent

            loader = asyncio.ensure_future(server.load_models())
            watcher = asyncio.ensure_future(watch_parent(stop, args.supervisor_pid))  # noqa: F841 - holds the task
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({loader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set():
                loader.result()
                await server.start()
        await stop.wait()
        logging.getLogger("gradserve.server").info("shutting down (grace %.1fs)", config.grace_seconds)
        loader.cancel()
        await server.stop()

    from gradserve.server.ops import tracing
    from gradserve.server.ops.auth import CredentialsError
    from gradserve.server.process.app import BindError

    try:
        asyncio.run(run())
    except (CredentialsError, BindError) as exc:  # configuration errors: a supervisor does not restart them
        logging.getLogger("gradserve.server").error("%s", exc)
        return 2
    finally:
        # Flushed within the grace period by stop(): drop what a collector did not take, at once.
        tracing.disable(timeout_s=0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    supervisor_pid = None
    if os.environ.get("GRADSERVE_SUPERVISOR_PID"):
        # A worker of ``--workers``: die with the supervisor, armed before anything slow.
        from gradserve.server.process.supervisor import follow_supervisor

        supervisor_pid = follow_supervisor()
    args = build_parser().parse_args(argv)
    args.supervisor_pid = supervisor_pid
    from gradserve.server.ops import logs

    logs.configure(args.log_level, getattr(args, "log_format", "text"))
    if args.command == "serve":
        missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
        if missing:  # a client-only install: say which extra, not a traceback
            print(f"gradserve serve needs the server extra (no {', '.join(missing)}): "
                  "pip install 'gradserve[server]'", file=sys.stderr)
            return 2
        if args.workers > 1 and args.worker_index is None:
            return _supervise(args, sys.argv[1:] if argv is None else argv)
        code = _serve(args)
        if args.worker_index is not None or argv is None:
            # Drained (or refused to start): skip the interpreter's teardown of TensorFlow, seconds
            # of garbage collection on a busy machine (16 s measured under load), which would run
            # past the grace period (a supervisor's, or the orchestrator's). Not when called with
            # arguments: a caller in the same process gets the code back.
            if args.worker_index is not None:
                logging.getLogger("gradserve.server").info("worker %d stopped", args.worker_index)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    if hasattr(args, "run"):
        return int(args.run(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
