"""Servers under test for bench/run.py, each started as its own process (own GIL).

``python bench/_server.py KIND [options]`` binds 127.0.0.1:0, prints ``PORT <n>`` on stdout once
it is ready to serve, and runs until its stdin closes (the benchmark exits) or it is killed.

Kinds:

- ``gradserve``: the real server on the demo models (``--no-batching``, ``--delay-us``,
  ``--compute-threads``, ``--xla``, ``--backend`` as the CLI has them; ``--max-inflight``: merged
  calls per model; ``--only dense2``: that demo model only, for a faster start; ``--time-handler``:
  the native Compute handler timed by the event loop thread's CPU clock, and each request handled a
  second time at once and timed apart, its answer discarded: ``bench/insitu.py``).
- ``transfer``: the real server hosting only ``identity`` (1 MiB float32 rows in, the same out),
  for large-tensor transfer.
- ``echo``: a bare grpcio asyncio server answering every message with its own bytes, with the
  same channel options as gradserve: the transport floor (``--work N``: the handler first fills a
  dict of N entries, plain Python work, timed like ``--time-handler``: ``bench/insitu.py``).
- ``socket``: a raw TCP socket echo (length-prefixed), the floor of large transfers.
- ``naive``: what the original question does, as a service: a plain grpcio sync server whose
  handler decodes the tensor, runs the Keras model eagerly under ``tf.GradientTape`` and encodes
  the gradient (and outputs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from concurrent import futures
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

#: Width of one row of the ``identity`` model: 1 MiB of float32.
IDENTITY_WIDTH = 256 * 1024
ECHO_METHOD = "/bench.Echo/Echo"


def _ready(port: int, metrics_port: int = 0) -> None:
    print(f"PORT {port} {metrics_port}", flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _GcPauses:
    """Python's cyclic GC runs in this process, by generation: count, total and longest pause
    (``gc.callbacks``), for the benchmark's ``gc`` command."""

    def __init__(self) -> None:
        import gc
        import time

        self._clock = time.perf_counter
        self._start = 0.0
        self.counts = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = self._clock()
            return
        gen, took = info["generation"], self._clock() - self._start
        self.counts[gen] += 1
        self.total_s[gen] += took
        self.max_s[gen] = max(self.max_s[gen], took)

    def snapshot(self) -> dict[str, Any]:
        import gc

        return {"counts": list(self.counts), "total_s": list(self.total_s), "max_s": list(self.max_s),
                "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}


_GC = _GcPauses()

#: Handled requests and the handler's CPU (ns) on them: first and (``--time-handler``) second run.
_HANDLER = {"n": 0, "first_ns": 0, "second_ns": 0}


def _timed(handler: Any, again: bool) -> Any:
    """``handler`` (an async gRPC handler) timed by this thread's CPU clock into ``_HANDLER``;
    ``again``: each request is then handled a second time and timed apart (answer discarded).
    Both run on the event loop without a wait when the call is cheap enough to run inline."""
    import time

    clock = time.thread_time_ns

    async def timed(*args: Any) -> Any:
        t0 = clock()
        answer = await handler(*args)
        t1 = clock()
        _HANDLER["first_ns"] += t1 - t0
        if again:
            await handler(*args)
            _HANDLER["second_ns"] += clock() - t1
        _HANDLER["n"] += 1
        return answer

    return timed


def work(n: int) -> int:
    """Plain Python work: a dict of ``n`` small entries (the echo's ``--work``)."""
    filled = {}
    for i in range(n):
        filled[i] = (i, str(i))
    return len(filled)


def _exit_when_stdin_closes(stop: Any) -> None:
    """Stop when stdin closes; a ``threads`` line on stdin is answered with one JSON line on
    stdout: {native thread id: Python thread name} of the live Python threads (the benchmark's
    per-thread CPU breakdown names the others by their kernel name); ``gc``: the cyclic GC's
    pauses; ``handler``: the handler's timed CPU (``--time-handler``, ``--work``)."""
    def watch() -> None:
        for line in sys.stdin:
            if line.strip() == "threads":
                names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
                print(json.dumps(names), flush=True)
            elif line.strip() == "gc":
                print(json.dumps(_GC.snapshot()), flush=True)
            elif line.strip() == "handler":
                print(json.dumps(_HANDLER), flush=True)
        stop()
    threading.Thread(target=watch, daemon=True, name="bench-stdin").start()


def _options() -> list[tuple[str, Any]]:
    from gradserve.server.config import ServerConfig
    from gradserve.server.process.app import server_options

    return server_options(ServerConfig())


def build_identity() -> Any:
    import keras

    x = keras.Input((IDENTITY_WIDTH,), name="x")
    return keras.Model(x, keras.layers.Identity(name="y")(x), name="identity")


def serve_gradserve(args: argparse.Namespace) -> None:
    from gradserve.server.config import BatchingConfig, EngineConfig, ServerConfig
    from gradserve.server.process.app import GradServer

    if args.time_handler:
        from gradserve.server.frontends.native import service

        compute = service.SensitivityServicer.Compute
        service.SensitivityServicer.Compute = _timed(compute, again=True)  # type: ignore[method-assign]
    transfer = args.kind == "transfer"
    only = [m for m in args.only.split(",") if m] if args.only else []
    config = ServerConfig(
        port=0, demo_models=not transfer and not only, compute_threads=args.compute_threads,
        metrics_port=0 if transfer else _free_port(),  # the benchmark reads rows per engine call
        http_port=args.http_port,  # the Open Inference Protocol over REST (bench/oip.py)
        batching=BatchingConfig(enabled=not args.no_batching, max_delay_us=args.delay_us,
                                max_batch_size=args.max_batch_size, max_inflight=args.max_inflight),
        # identity: requests of 48 one-MiB rows run as one padded call; the demo models keep
        # the default buckets.
        engine=(EngineConfig(xla="off", buckets=(1, 16, 48, 64)) if transfer
                else EngineConfig(xla=args.xla, backend=args.backend)))

    async def main() -> None:
        server = GradServer(config)
        await server.start()
        await server.load_models()
        if transfer:
            await asyncio.get_running_loop().run_in_executor(
                None, server.repository.load, "identity", 1, "bench:identity", build_identity)
        if only:
            from gradserve.server.models.demo import DEMO_MODELS

            for name in only:
                await asyncio.get_running_loop().run_in_executor(
                    None, server.repository.load, name, 1, f"builtin:{name}", DEMO_MODELS[name])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        _exit_when_stdin_closes(lambda: loop.call_soon_threadsafe(stop.set))
        _ready(server.port, server.metrics.port if config.metrics_port else 0)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())


def serve_echo(args: argparse.Namespace) -> None:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def echo_after_work(request: bytes, context: Any) -> bytes:
        work(args.work)
        return request

    async def main() -> None:
        server = grpc.aio.server(options=_options())
        answer = _timed(echo_after_work, again=False) if args.work else echo
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(answer)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        _exit_when_stdin_closes(lambda: loop.call_soon_threadsafe(stop.set))
        _ready(port)
        await stop.wait()
        await server.stop(0)

    asyncio.run(main())


def serve_naive(args: argparse.Namespace) -> None:
    import grpc
    import tensorflow as tf

    from gradserve import _codec
    from gradserve.server.models.demo import DEMO_MODELS
    from gradserve.v1 import sensitivity_service_pb2 as pb2
    from gradserve.v1 import sensitivity_service_pb2_grpc as pb2_grpc

    models = {name: build() for name, build in DEMO_MODELS.items() if name in ("dense2", "cnn")}

    class Naive(pb2_grpc.SensitivityServiceServicer):
        def Compute(self, request: Any, context: Any) -> Any:
            model = models[request.model]
            name = model.inputs[0].name.split(":")[0]
            x = tf.convert_to_tensor(_codec.decode(request.inputs[name]), dtype=tf.float32)
            with tf.GradientTape() as t:  # the question's answer, once per request
                t.watch(x)
                y = model(x)
            g = t.gradient(y, x)
            resp = pb2.ComputeResponse(request_id=request.request_id, model=request.model, version=1)
            _codec.encode(g.numpy(), out=resp.attributions[name])
            if request.include_outputs:
                _codec.encode(y.numpy(), out=resp.outputs[model.output_names[0]])
            return resp

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10), options=_options())
    pb2_grpc.add_SensitivityServiceServicer_to_server(Naive(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    done = threading.Event()
    _exit_when_stdin_closes(done.set)
    _ready(port)
    done.wait()
    server.stop(0)


def serve_socket(args: argparse.Namespace) -> None:
    """Raw TCP on loopback: read an 8-byte length and that many bytes, send them back."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    _exit_when_stdin_closes(lambda: os._exit(0))
    _ready(listener.getsockname()[1])
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    break
                n = int.from_bytes(head, "little")
                buf = bytearray(n)
                view, got = memoryview(buf), 0
                while got < n:
                    k = conn.recv_into(view[got:])
                    if not k:
                        break
                    got += k
                conn.sendall(buf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["gradserve", "transfer", "echo", "naive", "socket"])
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--delay-us", type=int, default=500)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--compute-threads", type=int, default=2)
    parser.add_argument("--max-inflight", type=int, default=1)
    parser.add_argument("--xla", default="auto")
    parser.add_argument("--backend", default="auto", choices=["auto", "tensorflow", "litert"])
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--time-handler", action="store_true", help="gradserve: time the Compute handler, "
                        "and handle each request a second time, timed apart (bench/insitu.py)")
    parser.add_argument("--work", type=int, default=0, help="echo: fill a dict of this many entries per "
                        "request first, timed (bench/insitu.py)")
    parser.add_argument("--only", default="", help="gradserve: these demo models only (comma-separated; "
                        "a faster start for A/B runs)")
    args = parser.parse_args()
    {"gradserve": serve_gradserve, "transfer": serve_gradserve, "echo": serve_echo,
     "naive": serve_naive, "socket": serve_socket}[args.kind](args)


if __name__ == "__main__":
    main()
