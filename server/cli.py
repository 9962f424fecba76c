"""The ``gradserve`` command line."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

_EPILOG_SERVE = """examples:
  gradserve serve                                   # demo models on 127.0.0.1:50051
  gradserve serve --model price=/models/price.keras --port 9000
"""


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradserve", description="gRPC model-sensitivity server and client.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve models over gRPC", epilog=_EPILOG_SERVE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--model", action="append", type=_model_arg, default=[], metavar="NAME=PATH",
                       help="serve a .keras file or SavedModel folder as NAME (repeatable)")
    serve.add_argument("--model-dir", help="serve DIR/<name>/<version>/ and DIR/<name>.keras")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one (default 50051)")
    serve.add_argument("--device", default="", help="TensorFlow device, e.g. /GPU:0 (default: TF's choice)")
    serve.add_argument("--xla", choices=["auto", "on", "off"], default="off", help="XLA compilation (default off)")
    serve.add_argument("--max-bucket", type=int, default=64, help="largest padded batch (default 64)")
    serve.add_argument("--trust-model-code", action="store_true",
                       help="allow models that run code when loaded (Lambda layers, .h5)")
    serve.add_argument("--grace-seconds", type=float, default=10.0, help="drain time on SIGTERM (default 10)")
    serve.add_argument("--log-level", default="INFO")
    from gradserve.server import cli_client  # client subcommands: models, gradient (no TensorFlow)

    cli_client.register(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from gradserve.server.app import GradServer
    from gradserve.server.config import EngineConfig, ModelSource, ServerConfig

    config = ServerConfig(
        host=args.host, port=args.port,
        models=tuple(ModelSource(n, p) for n, p in args.model), model_dir=args.model_dir,
        demo_models=not args.model and not args.model_dir,
        trust_model_code=args.trust_model_code, grace_seconds=args.grace_seconds,
        engine=EngineConfig(device=args.device, xla=args.xla, max_bucket=args.max_bucket),
    )

    async def run() -> None:
        server = GradServer(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        loader = asyncio.ensure_future(server.load_models())
        await stop.wait()
        logging.getLogger("gradserve.server").info("shutting down (grace %.1fs)", config.grace_seconds)
        loader.cancel()
        await server.stop()

    asyncio.run(run())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    if args.command == "serve":
        return _serve(args)
    if hasattr(args, "run"):
        return int(args.run(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
