"""gradserve benchmark: latency, throughput and transfer against their floors, side by side in one run.

    python bench/run.py            # about 4-5 minutes
    python bench/run.py --quick    # about 2 minutes, fewer samples

Every server under test runs in its own process (``bench/_server.py``) so that the load generator
here never shares a GIL with it. Measured in one run:

- compute floor: the same compiled gradient called in-process through the engine;
- transport floor: a bare grpcio echo server answering the same request bytes;
- gradserve unary latency p50/p99 (through the SDK, and with pre-encoded bytes) at batch 1 and
  64 on ``dense2`` and ``cnn``;
- throughput of 1, 8 and 64 concurrent closed-loop clients sending batch-1 requests, against the
  echo server, gradserve with batching on and off, and a naive server (eager GradientTape per
  request behind a plain grpcio sync server);
- transfer of a 48 MiB and a 256 MiB tensor (the SDK splits the latter into row chunks) through
  ``predict`` on an identity model, against a raw TCP socket on loopback;
- the Open Inference Protocol (``bench/oip.py``): dense2 batch-1 predict and gradient through
  tritonclient gRPC and HTTP against the SDK, on the default gradserve server;
- worker processes (``bench/workers.py``): requests/s of 16 and 64 batch-1 clients against
  ``serve --workers 1`` and ``--workers 2``, and the memory of each process (after the other
  servers are stopped, so that they do not share the cores);
- global sensitivity (``bench/gsa.py``, its own process): Sobol' evaluations per second through
  the server against SALib driving the same model in-process, and DGSM from exact gradients
  against SALib's finite differences at equal evaluations;
- side by side with a KServe peer (``bench/kserve_peer.py``: KServe's Python ModelServer, v2
  gRPC, a custom model calling the same compiled XLA gradient inline), each server called by its
  own client library from a load-generator process (``bench/_clients.py``): gradserve (default
  flags) through the SDK, KServe through ``tritonclient``, the echo and naive servers with raw
  bytes; batch-1 p50/p99 of one client, requests/s of 16 and 64, server CPU per request; the
  contenders take turns, several rounds, and the spread over rounds is reported. The peer runs
  in its own process, on this Python when it has ``kserve`` (the ``test`` extra installs it), or
  on ``--kserve-python`` (``$KSERVE_PYTHON``); ``--kserve-python ''`` skips it. Beside them, gradserve
  with raw bytes (the same client as the echo's), its Open Inference Protocol front-end through
  tritonclient over gRPC and REST, and one ComputeStream: server CPU per request (per message)
  over the server's whole process tree, with a breakdown by thread (``bench/_proc.py``);
- the first 10 s after SERVING: gradserve and the KServe peer each started afresh and called by
  one client as soon as it serves (p50/p99/p99.9/max);
- our own CPU per request by stage (``bench/hotpath.py``, the handler without a transport).

Prints the table and the target ratios, writes ``bench/out/results.json`` and
``bench/out/bench.png`` (latency and throughput against concurrency).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import grpc  # noqa: E402
import numpy as np  # noqa: E402

import gradserve  # noqa: E402
from gradserve import _codec  # noqa: E402
from gradserve._channel import channel_options  # noqa: E402
from gradserve.v1 import model_service_pb2 as _model_pb2  # noqa: E402
from gradserve.v1 import model_service_pb2_grpc as _model_grpc  # noqa: E402
from gradserve.v1 import sensitivity_service_pb2 as _pb2  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _proc  # noqa: E402  (bench/_proc.py)
import loading  # noqa: E402  (bench/loading.py)
import oip  # noqa: E402  (bench/oip.py)
import shared_memory  # noqa: E402  (bench/shared_memory.py)
import workers  # noqa: E402  (bench/workers.py)

COMPUTE = "/gradserve.v1.SensitivityService/Compute"
ECHO = "/bench.Echo/Echo"
MiB = 1024 * 1024
SHAPES = {"dense2": (4,), "cnn": (16, 16, 1)}
INPUT_NAMES = {"dense2": "input", "cnn": "image"}


# -- servers ---------------------------------------------------------------------------------------
class ServerProcess:
    """One ``bench/_server.py`` process; ``port`` once it printed it."""

    def __init__(self, kind: str, *args: str, command: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.kind = " ".join((kind,) + args)
        self.proc = subprocess.Popen(command or [sys.executable, str(HERE / "_server.py"), kind, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        self.port = 0
        self.metrics_port = 0
        #: Whether the process answers ``threads`` (``bench/_server.py`` does; the peer does not).
        self.named_threads = command is None

    def wait_ready(self, timeout: float = 240.0) -> "ServerProcess":
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not result or not result[0].startswith("PORT "):
            self.stop()
            raise RuntimeError(f"server {self.kind!r} did not start")
        fields = result[0].split()
        self.port = int(fields[1])
        self.metrics_port = int(fields[2]) if len(fields) > 2 else 0
        return self

    def engine_rows(self) -> tuple[float, float]:
        """(rows, engine calls) so far, summed over models, from the server's Prometheus
        histogram ``gradserve_engine_batch_size``; (nan, nan) without metrics."""
        if not self.metrics_port:
            return float("nan"), float("nan")
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        rows = calls = 0.0
        for line in text.splitlines():
            if line.startswith("gradserve_engine_batch_size_sum"):
                rows += float(line.rsplit(" ", 1)[1])
            elif line.startswith("gradserve_engine_batch_size_count"):
                calls += float(line.rsplit(" ", 1)[1])
        return rows, calls

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process and its live child processes so far
        (Linux /proc; NaN elsewhere)."""
        return _proc.tree_cpu_seconds(self.proc.pid)

    def thread_ticks(self) -> dict[tuple[int, int], tuple[str, int]]:
        """CPU ticks of every thread of the server's process tree (``_proc.thread_ticks``)."""
        return _proc.thread_ticks(self.proc.pid)

    def thread_names(self) -> dict[int, str]:
        """Native id -> Python name of the server's live Python threads ({} for servers that
        do not answer ``threads``: the KServe peer's threads are named by the kernel's names)."""
        if not self.named_threads or self.proc.poll() is not None:
            return {}
        self.proc.stdin.write("threads\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        return {int(k): v for k, v in json.loads(line).items()}

    def gc_stats(self) -> dict[str, Any]:
        """The server's cyclic-GC runs so far by generation (count, total and longest pause,
        ``bench/_server.py``'s ``gc`` command); {} for servers that do not answer it."""
        if not self.named_threads or self.proc.poll() is not None:
            return {}
        self.proc.stdin.write("gc\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        return answer

    def by_thread(self, before: dict[tuple[int, int], tuple[str, int]], requests: float) -> dict[str, Any]:
        """µs of CPU per request by thread group since ``before`` (``_proc.by_thread``)."""
        return _proc.by_thread(before, self.thread_ticks(), self.thread_names(), self.proc.pid, requests)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(10)
            except Exception:  # noqa: BLE001
                self.proc.kill()


class LoadProcess:
    """One ``bench/_clients.py`` process (closed-loop clients) under ``python``."""

    def __init__(self, python: str) -> None:
        self.proc = subprocess.Popen([python, str(HERE / "_clients.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     cwd=str(HERE.parent))
        ready = self.proc.stdout.readline()  # type: ignore[union-attr]
        if '"ready"' not in ready:
            raise RuntimeError(f"load generator under {python} did not start")

    def run(self, **command: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        answer: dict[str, Any] = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# -- requests --------------------------------------------------------------------------------------
def gradient_request(model: str, batch: int, seed: int = 0) -> bytes:
    x = np.random.default_rng(seed).random((batch,) + SHAPES[model], dtype=np.float32)
    req = _pb2.ComputeRequest(model=model, method=_pb2.METHOD_GRADIENT, request_id="")
    _codec.encode(x, out=req.inputs[INPUT_NAMES[model]])
    return req.SerializeToString()


def stats(seconds: list[float] | np.ndarray) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": int(a.size)}


def raw_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=channel_options(64 * MiB, False))


# -- measurements ----------------------------------------------------------------------------------
def latency(echo_addr: str, grad_addr: str, n: int) -> dict[str, dict[str, Any]]:
    """Unary latency of one caller, the four ways taking turns in blocks of 25 warm calls (so that
    a busy spell of the machine hits them alike, while each is measured warm: interleaving call
    by call would make every call start cold and flatter the short floors):

    - ``compute_floor``: the server's compiled gradient (same model, same XLA choice) called
      in-process through the engine;
    - ``transport_floor``: the same request bytes echoed by the bare grpcio server;
    - ``gradserve_raw``: the same request bytes to gradserve (no SDK work on either side);
    - ``gradserve_sdk``: ``Client.gradient`` (encode, call, decode: what an application sees).
    """
    from gradserve.server.compute import methods
    from gradserve.server.compute.engine import CompiledModel
    from gradserve.server.config import EngineConfig, Limits
    from gradserve.server.core.spec import ComputeSpec, TargetSpec
    from gradserve.server.models.demo import DEMO_MODELS
    from gradserve.server.models.modelfn import from_keras

    out: dict[str, dict[str, Any]] = {k: {} for k in ("compute_floor", "compute_floor_tf", "transport_floor",
                                                       "gradserve_raw", "gradserve_sdk")}
    with raw_channel(echo_addr) as echo_ch, raw_channel(grad_addr) as grad_ch, \
            gradserve.Client(grad_addr, timeout=30) as client:
        stub = _model_grpc.ModelServiceStub(grad_ch)
        echo = echo_ch.unary_unary(ECHO)
        compute = grad_ch.unary_unary(COMPUTE)
        for model, shape in SHAPES.items():
            xla = stub.GetModel(_model_pb2.GetModelRequest(name=model)).model.versions[0].xla
            out["compute_floor"][f"{model}/xla"] = bool(xla)
            mf = from_keras(DEMO_MODELS[model]())
            engine = CompiledModel(mf, EngineConfig(), xla=xla)  # the server's backend choice (auto)
            engine_tf = CompiledModel(mf, EngineConfig(backend="tensorflow"), xla=xla)
            name, out_name = INPUT_NAMES[model], mf.outputs[0].name
            client.model_info(model)
            for batch in (1, 64):
                x = np.random.default_rng(0).random((batch,) + shape, dtype=np.float32)
                payload = gradient_request(model, batch)

                spec = ComputeSpec(model, 1, "gradient", {name: x}, batch, TargetSpec(out_name), (name,))

                def floor(engine: CompiledModel = engine, spec: ComputeSpec = spec, mf: Any = mf) -> None:
                    engine.run(methods.get("gradient").plan(spec, mf, Limits()))

                ways: dict[str, Callable[[], Any]] = {
                    "compute_floor": floor,
                    "compute_floor_tf": lambda e=engine_tf: floor(e),
                    "transport_floor": lambda p=payload: echo(p, timeout=30),
                    "gradserve_raw": lambda p=payload: compute(p, timeout=30),
                    "gradserve_sdk": lambda m=model, x=x: client.gradient(m, x),
                }
                times: dict[str, list[float]] = {k: [] for k in ways}
                for _ in range(max(1, n // 25)):
                    for k, fn in ways.items():
                        for i in range(30):  # a warm block: the first 5 calls warm the path up
                            t0 = time.perf_counter()
                            fn()
                            if i >= 5:
                                times[k].append(time.perf_counter() - t0)
                for k, v in times.items():
                    out[k][f"{model}/b{batch}"] = stats(v)
            out["compute_floor"][f"{model}/backend"] = engine.backend_summary()
    return out


def side_by_side(contenders: dict[str, tuple[ServerProcess, LoadProcess, dict[str, Any], list[int]]],
                 seconds: float, rounds: int) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Closed-loop runs of each contender (server, load generator, client command, client counts),
    taking turns level by level, ``rounds`` times; every round is kept (the report gives the
    median and the spread). One client measures batch-1 latency; server CPU per request is the
    server's CPU time (with its child processes) over the requests answered, warm-up included."""
    warmup = min(0.5, seconds / 3)
    out: dict[str, dict[int, list[dict[str, Any]]]] = {name: {} for name in contenders}
    levels = sorted({n for *_, ns in contenders.values() for n in ns})
    for _ in range(rounds):
        for n in levels:
            for name, (server, load, command, ns) in contenders.items():
                if n not in ns:
                    continue
                ticks0 = server.thread_ticks()
                cpu0 = server.cpu_seconds()
                row = load.run(address=server.address, clients=n, seconds=seconds, warmup=warmup, **command)
                cpu1 = server.cpu_seconds()
                if "error" in row:
                    print(f"{name}, {n} clients: {row['error']}", file=sys.stderr)
                    continue
                done = row["rps"] * (seconds + warmup)
                row["server_cpu_us"] = (cpu1 - cpu0) / max(done, 1.0) * 1e6
                row["threads"] = server.by_thread(ticks0, done)  # µs per request by thread group
                out[name].setdefault(n, []).append(row)
    return out


def startup_tail(servers: dict[str, tuple[Callable[[], ServerProcess], LoadProcess, dict[str, Any]]],
                 seconds: float = 10.0) -> dict[str, dict[str, Any]]:
    """Batch-1 latency of one client during the first ``seconds`` after each server, started
    afresh, reports that it serves (gradserve: SERVING, once every model is loaded; the KServe
    peer: its model answers), one server at a time while the others idle."""
    out: dict[str, dict[str, Any]] = {}
    for name, (start, load, command) in servers.items():
        server = start()
        try:
            server.wait_ready()
            row = load.run(address=server.address, clients=1, seconds=seconds, warmup=0.0, **command)
            if "error" in row:
                print(f"start-up tail of {name}: {row['error']}", file=sys.stderr)
            out[name] = row
        finally:
            server.stop()
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return float(np.median(values)) if values else float("nan")


def _spread(rows: list[dict[str, Any]], key: str, fmt: str = ".2f") -> str:
    values = [r[key] for r in rows if key in r]
    if not values:
        return "—"
    return f"{np.median(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


async def _closed_loop(address: str, method: str, payload: bytes, clients: int, seconds: float,
                       warmup: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address, options=channel_options(64 * MiB, False)) as ch:
        call = ch.unary_unary(method)
        latencies: list[float] = []
        measuring = False
        errors = 0

        async def client(stop_at: float) -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await call(payload, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        stop_at = t_start + warmup + seconds
        tasks = [asyncio.ensure_future(client(stop_at)) for _ in range(clients)]
        await asyncio.sleep(warmup)
        measuring = True
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    result = {"clients": clients, "rps": len(latencies) / elapsed, "errors": errors}
    result.update(stats(latencies) if latencies else {})
    return result


def throughput(targets: dict[str, tuple[ServerProcess, str, list[int]]], payload: bytes, seconds: float,
               repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Closed-loop runs of every server at each of its concurrency levels.

    The servers take turns, ``repeats`` rounds, and each keeps its best round: other processes
    on the machine then cost a server a round, not its result. Also the server's CPU time per
    request, which such contention distorts less than wall-clock rates.
    """
    best: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in targets}
    warmup = min(0.5, seconds / 3)
    for _ in range(repeats):
        for name, (server, method, levels) in targets.items():
            for n in levels:
                cpu0 = server.cpu_seconds()
                rows0, calls0 = server.engine_rows()
                row = asyncio.run(_closed_loop(server.address, method, payload, n, seconds, warmup))
                done = row["rps"] * (seconds + warmup)  # the warm-up's requests use CPU too
                row["server_cpu_us"] = (server.cpu_seconds() - cpu0) / max(done, 1.0) * 1e6
                rows1, calls1 = server.engine_rows()
                row["rows_per_engine_call"] = ((rows1 - rows0) / (calls1 - calls0) if calls1 > calls0
                                               else float("nan"))
                if n not in best[name] or row["rps"] > best[name][n]["rps"]:
                    best[name][n] = row
    return {name: [rows[n] for n in targets[name][2]] for name, rows in best.items()}


def stream_rate(address: str, payload: bytes, count: int) -> dict[str, Any]:
    """Requests per second over one ComputeStream carrying ``count`` pre-encoded requests."""
    with raw_channel(address) as ch:
        call = ch.stream_stream("/gradserve.v1.SensitivityService/ComputeStream")
        list(call(iter([payload] * 50), timeout=60))  # warm
        t0 = time.perf_counter()
        answers = sum(1 for _ in call(iter([payload] * count), timeout=120))
        elapsed = time.perf_counter() - t0
    return {"requests": count, "answers": answers, "rps": count / elapsed}


def socket_transfer(port: int, nbytes: int, reps: int) -> float:
    """Seconds for ``nbytes`` there and back over a raw loopback TCP socket (best of ``reps``)."""
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    back = bytearray(nbytes)
    best = float("inf")
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(reps):
            t0 = time.perf_counter()
            s.sendall(nbytes.to_bytes(8, "little"))
            s.sendall(data)
            view = memoryview(back)
            got = 0
            while got < nbytes:
                k = s.recv_into(view[got:])
                if not k:
                    raise ConnectionError("socket closed")
                got += k
            best = min(best, time.perf_counter() - t0)
    return best


def grpc_transfer(address: str, rows: int, reps: int) -> tuple[float, bool]:
    """Seconds for predict on the identity model with ``rows`` 1-MiB rows (best of ``reps``)."""
    from bench._server import IDENTITY_WIDTH

    x = np.random.default_rng(0).random((rows, IDENTITY_WIDTH), dtype=np.float32)
    best = float("inf")
    with gradserve.Client(address, timeout=300) as c:
        c.model_info("identity")
        ok = True
        for _ in range(reps):
            t0 = time.perf_counter()
            y = c.predict("identity", x)
            best = min(best, time.perf_counter() - t0)
            ok = ok and y.shape == x.shape and bool(np.array_equal(y[-1], x[-1]))
    return best, ok


# -- report ----------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in results["throughput"].items():
        xs = [r["clients"] for r in rows]
        ax_t.plot(xs, [r["rps"] for r in rows], marker="o", label=name)
        ax_l.plot(xs, [r.get("p50_ms", float("nan")) for r in rows], marker="o", label=f"{name} p50")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (batch-1 dense2 gradient)")
        ax.grid(True, alpha=0.3)
    ax_t.set_ylabel("requests / s")
    ax_t.set_yscale("log")
    ax_t.set_title("throughput")
    ax_l.set_ylabel("latency p50 (ms)")
    ax_l.set_yscale("log")
    ax_l.set_title("latency")
    ax_t.legend(fontsize=8)
    fig.suptitle(f"gradserve bench ({results['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(r: dict[str, Any]) -> list[str]:
    lines = []
    add = lines.append
    add(f"gradserve bench — {r['machine']} — {r['seconds']:.0f} s{' (quick)' if r['quick'] else ''}")
    add("")
    add("latency, ms (p50 / p99)            compute floor   transport floor   gradserve bytes   gradserve SDK"
        "    SDK / floors")
    for key in ("dense2/b1", "dense2/b64", "cnn/b1", "cnn/b64"):
        cf, tf_, gb, gs = (r["compute_floor"][key], r["transport_floor"][key], r["gradserve_raw"][key],
                           r["gradserve_sdk"][key])
        ratio = gs["p50_ms"] / (cf["p50_ms"] + tf_["p50_ms"])
        add(f"  {key:<12} {cf['p50_ms']:>14.3f} / {cf['p99_ms']:<6.3f} {tf_['p50_ms']:>8.3f} / {tf_['p99_ms']:<6.3f} "
            f"{gb['p50_ms']:>8.3f} / {gb['p99_ms']:<6.3f} {gs['p50_ms']:>8.3f} / {gs['p99_ms']:<6.3f} {ratio:>8.2f}x")
    cft = r["compute_floor_tf"]
    add("  compute floor with the TensorFlow backend (before LiteRT), p50 ms: " + ", ".join(
        f"{key} {cft[key]['p50_ms']:.3f}" for key in ("dense2/b1", "dense2/b64", "cnn/b1", "cnn/b64")))
    for model in SHAPES:
        add(f"  {model} backends (compute floor engine): " + "; ".join(
            f"{k.split('(')[0]}{'' if k == 'predict' else '[' + str(i) + ']'}: {v}"
            for i, (k, v) in enumerate(sorted(r["compute_floor"][f"{model}/backend"].items()))))
    if r.get("side_by_side"):
        lines += _side_by_side_report(r)
    add("")
    add("throughput, requests/s (p50 ms) [server CPU us per request] of batch-1 dense2 gradients")
    servers = list(r["throughput"])
    add("  clients " + "".join(f"{s:>24}" for s in servers))
    for i, n in enumerate(r["levels"]):
        cells = []
        for s in servers:
            row = r["throughput"][s][i]
            cells.append(f"{row['rps']:>6.0f} ({row.get('p50_ms', float('nan')):>6.2f}) "
                         f"[{row.get('server_cpu_us', float('nan')):>5.0f}]")
        add(f"  {n:>7} " + "".join(f"{c:>24}" for c in cells))
    merged = [s for s in servers if any(row.get("rows_per_engine_call", float("nan")) > 0
                                        for row in r["throughput"][s])]
    add("  requests merged per engine call: " + "; ".join(
        f"{s} " + " / ".join(f"{row['rows_per_engine_call']:.1f}" for row in r["throughput"][s]) for s in merged)
        + " (at " + " / ".join(str(n) for n in r["levels"]) + " clients)")
    add("  cnn, 64 clients: " + ", ".join(
        f"{name} {rows[0]['rps']:.0f}/s [{rows[0]['server_cpu_us']:.0f} us, "
        f"{rows[0]['rows_per_engine_call']:.1f} per call]" for name, rows in r["throughput_cnn"].items()))
    add("  one ComputeStream of batch-1 requests: " + ", ".join(
        f"{name} {v['rps']:.0f}/s" for name, v in r["stream"].items()))
    add("")
    add("transfer (predict on identity, SDK; there and back), MiB/s of payload each way")
    for t in r["transfer"]:
        add(f"  {t['mib']:>4} MiB: gradserve {t['grpc_mib_s']:8.0f}   raw socket {t['socket_mib_s']:8.0f}   "
            f"ratio {t['ratio']:.2f}{'' if t['ok'] else '  (WRONG RESULT)'}")
    add("")
    add("targets (the request path at the transport floor, issue 19; then same-host shared memory)")
    for name, value, goal, ok in r["targets"]:
        add(f"  [{'ok' if ok else 'MISS'}] {name}: {value:.2f} (target {goal})")
    add("earlier issues' targets")
    for name, value, goal, ok in r.get("earlier_targets", []):
        add(f"  [{'ok' if ok else 'MISS'}] {name}: {value:.2f} (target {goal})")
    return lines


def _levels(sbs: dict[str, Any], name: str, n: int) -> list[dict[str, Any]]:
    levels = sbs.get(name, {})
    rows: list[dict[str, Any]] = levels.get(n, levels.get(str(n), []))
    return rows


def _threads(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median over rounds of each thread group's µs per request."""
    groups = {g for row in rows for g in row.get("threads", {})}
    med = {g: float(np.median([row.get("threads", {}).get(g, {}).get("us", 0.0) for row in rows])) for g in groups}
    return dict(sorted(med.items(), key=lambda kv: -kv[1]))


def _side_by_side_report(r: dict[str, Any]) -> list[str]:
    sbs = r["side_by_side"]
    lines = ["", f"side by side, batch-1 dense2 gradient, median [min–max] of {r['rounds']} rounds taking turns; "
             "own client each (SDK, tritonclient, raw bytes: pre-encoded requests over a grpcio channel)"]
    add = lines.append
    add(f"  {'server (client)':<36} {'p50 ms, 1':>20} {'p99 ms, 1':>20} {'p99.9 ms, 1':>13} {'req/s, 16':>18} "
        f"{'req/s, 64':>18} {'CPU µs/req, 1':>18} {'CPU µs/req, 64':>18}")
    for name in sbs:
        one, c16, c64 = (_levels(sbs, name, n) for n in (1, 16, 64))
        add(f"  {name:<36} {_spread(one, 'p50_ms', '.3f'):>20} {_spread(one, 'p99_ms', '.3f'):>20} "
            f"{_median(one, 'p999_ms'):>13.3f} {_spread(c16, 'rps', '.0f'):>18} {_spread(c64, 'rps', '.0f'):>18} "
            f"{_spread(one, 'server_cpu_us', '.0f'):>18} {_spread(c64, 'server_cpu_us', '.0f'):>18}")
    add("  (ComputeStream: one stream, 32 requests in flight; its req/s and CPU are per message, in the 1 column)")
    add("")
    add("server CPU per request by thread (µs, median of rounds; Python threads by name, others by the kernel's)")
    for name in ("gradserve (raw)", "echo (raw)", "KServe (tritonclient)"):
        for n in (1, 64):
            rows = _levels(sbs, name, n)
            if rows:
                parts = [f"{g} {us:.0f}" for g, us in _threads(rows).items() if us >= 0.5]
                add(f"  {name}, {n} client{'s' if n > 1 else ''}: total {_median(rows, 'server_cpu_us'):.0f} = "
                    + ", ".join(parts))
    if r.get("startup"):
        add("")
        add("first 10 s after the server reports it serves (started afresh, one client, batch-1 dense2 gradient)")
        for name, row in r["startup"].items():
            add(f"  {name:<24} p50 {row.get('p50_ms', float('nan')):.3f}  p99 {row.get('p99_ms', float('nan')):.3f}  "
                f"p99.9 {row.get('p999_ms', float('nan')):.3f}  max {row.get('max_ms', float('nan')):.3f} ms  "
                f"({row.get('n', 0)} calls, {row.get('errors', 0)} errors)")
    if r.get("hotpath_lines"):
        add("")
        lines.extend(r["hotpath_lines"])
    return lines


def _side_by_side_targets(r: dict[str, Any]) -> list[tuple[str, float, str, None]]:
    """Issue 19's targets from the side-by-side runs (medians over rounds); those needing the
    KServe peer are left out without it."""
    sbs = r.get("side_by_side") or {}
    if "gradserve (raw)" not in sbs:
        return []

    def med(name: str, n: int, key: str) -> float:
        return _median(_levels(sbs, name, n), key)

    g, raw, k, e = "gradserve (SDK)", "gradserve (raw)", "KServe (tritonclient)", "echo (raw)"
    cpu = "server_cpu_us"
    out: list[tuple[str, float, str, None]] = [
        ("server CPU per request, gradserve / bare echo, 1 client (raw bytes)", med(raw, 1, cpu) / med(e, 1, cpu),
         "<= 1.3", None),
        ("server CPU per request, gradserve / bare echo, 64 clients (raw bytes)", med(raw, 64, cpu) / med(e, 64, cpu),
         "<= 1.3", None),
        ("batch-1 p50, gradserve / bare echo (raw bytes)", med(raw, 1, "p50_ms") / med(e, 1, "p50_ms"), "<= 1.2", None),
        ("64 clients req/s, gradserve / bare echo (raw bytes)", med(raw, 64, "rps") / med(e, 64, "rps"), ">= 0.8",
         None),
    ]
    if k in sbs:
        out += [("batch-1 p50, gradserve (SDK) / KServe (tritonclient)", med(g, 1, "p50_ms") / med(k, 1, "p50_ms"),
                 "<= 0.6", None),
                ("batch-1 p99, gradserve (SDK) / KServe (tritonclient)", med(g, 1, "p99_ms") / med(k, 1, "p99_ms"),
                 "<= 1.5", None),
                ("64 clients req/s, gradserve (SDK) / KServe (tritonclient)", med(g, 64, "rps") / med(k, 64, "rps"),
                 ">= 2", None)]
        start = r.get("startup") or {}
        if g in start and k in start:
            out.append(("batch-1 p99 in the first 10 s after SERVING, gradserve / KServe",
                        start[g]["p99_ms"] / start[k]["p99_ms"], "<= 1.5", None))
    oip_g, oip_r = "gradserve OIP gRPC (tritonclient)", "gradserve OIP REST (tritonclient)"
    for n in (1, 64):
        if oip_g in sbs:
            out.append((f"server CPU per request, OIP gRPC / native (SDK), {n} client{'s' if n > 1 else ''}",
                        med(oip_g, n, cpu) / med(g, n, cpu), "<= 1.3", None))
        if oip_r in sbs:
            out.append((f"server CPU per request, OIP REST / native (SDK), {n} client{'s' if n > 1 else ''}",
                        med(oip_r, n, cpu) / med(g, n, cpu), "<= 1.5", None))
    stream = "gradserve ComputeStream (raw)"
    if stream in sbs:
        unary = min(med(raw, n, cpu) for n in (1, 16, 64))
        out.append(("server CPU per ComputeStream message / per unary call (raw bytes; the cheapest level)",
                    med(stream, 1, cpu) / unary, "<= 0.5", None))
    hot = r.get("hotpath")
    if hot:
        out.append(("our own CPU per batch-1 request in-process (bench/hotpath.py), µs", hot["ours_us"], "<= 60",
                    None))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="gradserve benchmark (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter runs (under a minute)")
    parser.add_argument("--out", default=str(HERE / "out"), help="folder for results.json and bench.png")
    parser.add_argument("--kserve-python", default=os.environ.get("KSERVE_PYTHON", _python_with_kserve()),
                        metavar="PYTHON", help="a Python with kserve, tensorflow and tritonclient[grpc] for the "
                        "KServe peer (default $KSERVE_PYTHON, else this one if it has kserve; '': skipped)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="rounds of the side-by-side runs (default 3; 2 with --quick)")
    parser.add_argument("--no-workers", action="store_true", help="skip the --workers 1 vs 2 section")
    parser.add_argument("--no-gsa", action="store_true", help="skip the global sensitivity section")
    parser.add_argument("--no-loading", action="store_true", help="skip the loading-beside-serving section")
    args = parser.parse_args()
    t_begin = time.perf_counter()
    n_lat = 100 if args.quick else 300
    seconds = 1.0 if args.quick else 2.0
    levels = [1, 8, 64]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # XLA off: the same compiled function every run (auto decides by timing at start-up) and a
    # faster start; the compute floor uses whatever the server reports.
    servers = {
        "echo": ServerProcess("echo"),
        "batching on": ServerProcess("gradserve", "--xla", "off"),
        "batching off": ServerProcess("gradserve", "--xla", "off", "--no-batching"),
        "naive": ServerProcess("naive"),
        "transfer": ServerProcess("transfer"),
        "socket": ServerProcess("socket"),
    }
    if not args.quick:  # two merged calls per model at once, a partial batch held 500 us
        servers["batching, 2 calls"] = ServerProcess("gradserve", "--xla", "off", "--max-inflight", "2")
    oip_http_port = _free_port()
    # default flags (XLA and backend auto), plus the Open Inference Protocol's REST port
    servers["gradserve"] = ServerProcess("gradserve", "--http-port", str(oip_http_port))
    if args.kserve_python:
        servers["kserve"] = ServerProcess("kserve", command=[args.kserve_python, str(HERE / "kserve_peer.py")])
    loads: dict[str, LoadProcess] = {}
    try:
        for s in servers.values():
            s.wait_ready()
        print(f"servers ready in {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)
        grad = servers["batching on"].address
        r: dict[str, Any] = {"quick": args.quick, "levels": levels,
                             "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load "
                                        f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}, "
                                        f"grpcio {grpc.__version__}"}
        r.update(latency(servers["echo"].address, grad, n_lat))
        print(f"latency done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)

        loads["sdk"] = LoadProcess(sys.executable)
        raw = gradient_request("dense2", 1).hex()
        gs = servers["gradserve"]
        contenders: dict[str, tuple[ServerProcess, LoadProcess, dict[str, Any], list[int]]] = {
            "gradserve (SDK)": (gs, loads["sdk"], {"kind": "sdk"}, [1, 16, 64]),
            "gradserve (raw)": (gs, loads["sdk"], {"kind": "raw", "method": COMPUTE, "payload": raw}, [1, 16, 64]),
        }
        if "kserve" in servers:
            loads["triton"] = LoadProcess(args.kserve_python)
            contenders["KServe (tritonclient)"] = (servers["kserve"], loads["triton"], {"kind": "triton"},
                                                   [1, 16, 64])
        contenders["echo (raw)"] = (servers["echo"], loads["sdk"], {"kind": "raw", "method": ECHO, "payload": raw},
                                    [1, 16, 64])
        contenders["naive (raw)"] = (servers["naive"], loads["sdk"],
                                     {"kind": "raw", "method": COMPUTE, "payload": raw}, [1, 16])
        # The same server through the Open Inference Protocol, and one ComputeStream (32 in flight).
        contenders["gradserve OIP gRPC (tritonclient)"] = (gs, loads["sdk"], {"kind": "oip-grpc"}, [1, 64])
        contenders["gradserve OIP REST (tritonclient)"] = (gs, loads["sdk"],
                                                           {"kind": "oip-rest", "http_port": oip_http_port}, [1, 64])
        contenders["gradserve ComputeStream (raw)"] = (gs, loads["sdk"],
                                                       {"kind": "stream", "payload": raw, "window": 32}, [1])
        r["rounds"] = args.rounds or (2 if args.quick else 3)
        r["side_by_side"] = side_by_side(contenders, 1.0 if args.quick else 2.0, r["rounds"])
        print(f"side by side done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)

        # The first 10 s after SERVING, each server started afresh (the others idle meanwhile).
        starts: dict[str, tuple[Callable[[], ServerProcess], LoadProcess, dict[str, Any]]] = {
            "gradserve (SDK)": (lambda: ServerProcess("gradserve"), loads["sdk"], {"kind": "sdk"})}
        if "kserve" in servers:
            starts["KServe (tritonclient)"] = (
                lambda: ServerProcess("kserve", command=[args.kserve_python, str(HERE / "kserve_peer.py")]),
                loads["triton"], {"kind": "triton"})
        r["startup"] = startup_tail(starts, 5.0 if args.quick else 10.0)
        print(f"start-up tails done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)

        payload = gradient_request("dense2", 1)
        targets = {
            "echo": (servers["echo"], ECHO, levels),
            "batching on": (servers["batching on"], COMPUTE, levels),
            "batching off": (servers["batching off"], COMPUTE, levels),
            "naive": (servers["naive"], COMPUTE, levels[:2]),
        }
        if "batching, 2 calls" in servers:
            targets["batching, 2 calls"] = (servers["batching, 2 calls"], COMPUTE, levels)
        r["throughput"] = throughput(targets, payload, seconds, 1 if args.quick else 2)
        # skipped: the naive server's 10 worker threads only queue more
        r["throughput"]["naive"].append({"clients": 64, "rps": float("nan")})
        # A model whose compute outweighs the per-request RPC work: where batching pays most.
        r["throughput_cnn"] = throughput({
            "batching on": (servers["batching on"], COMPUTE, [64]),
            "batching off": (servers["batching off"], COMPUTE, [64]),
        }, gradient_request("cnn", 1), seconds, 1 if args.quick else 2)
        r["stream"] = {name: stream_rate(servers[name].address, payload, 500 if args.quick else 2000)
                       for name in ("batching on", "batching off")}
        print(f"throughput done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)

        r["oip"] = oip.run(servers["gradserve"].address, oip_http_port, 300 if args.quick else 900,
                           2 if args.quick else 3)
        print(f"open inference protocol done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)

        r["transfer"] = []
        for mib, reps in ((48, 2 if args.quick else 3), (256, 1 if args.quick else 2)):
            g, ok = grpc_transfer(servers["transfer"].address, mib, reps)
            s = socket_transfer(servers["socket"].port, mib * MiB, reps)
            r["transfer"].append({"mib": mib, "grpc_s": g, "socket_s": s, "grpc_mib_s": mib / g,
                                  "socket_mib_s": mib / s, "ratio": s / g, "ok": ok})
        r["shared_memory"] = shared_memory.run(servers["transfer"].address, servers["socket"].port,
                                               servers["gradserve"].address, rounds=2 if args.quick else 4,
                                               small_calls=200 if args.quick else 600)
        print(f"shared memory done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)
    finally:
        for load in loads.values():
            load.stop()
        for s in servers.values():
            s.stop()

    if not args.no_workers:  # alone on the machine: the servers above are stopped
        r["workers"] = workers.measure_workers(seconds=3.0 if args.quick else 6.0, rounds=1 if args.quick else 2)
        print(f"workers done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)
    if not args.no_loading:  # alone too: dense2's latency while cnn and multi load (bench/loading.py)
        r["loading"] = loading.measure(1 if args.quick else 2, kserve_python=args.kserve_python, out_dir=out_dir)
    hot = subprocess.run([sys.executable, str(HERE / "hotpath.py"), "--json", str(out_dir / "hotpath.json")]
                         + (["--repeats", "15"] if args.quick else []), capture_output=True, text=True, timeout=900)
    if hot.returncode == 0:
        r["hotpath"] = json.loads((out_dir / "hotpath.json").read_text())
        r["hotpath_lines"] = [line for line in hot.stdout.splitlines() if line.strip()]
    else:
        r["hotpath_lines"] = [f"bench/hotpath.py failed: {hot.stderr[-2000:]}"]
    print(f"hot path done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)
    if not args.no_gsa:
        gsa = subprocess.run([sys.executable, str(HERE / "gsa.py"), "--samples", "4096" if args.quick else "16384",
                              "--repeats", "2" if args.quick else "3", "--seeds", "2" if args.quick else "5"],
                             capture_output=True, text=True, timeout=1800)
        r["gsa"] = gsa.stdout.splitlines() if gsa.returncode == 0 else [f"bench/gsa.py failed: {gsa.stderr[-2000:]}"]
        print(f"global sensitivity done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)

    cf, tfl, sdk = r["compute_floor"], r["transport_floor"], r["gradserve_sdk"]
    tp = {k: {row["clients"]: row["rps"] for row in v} for k, v in r["throughput"].items()}
    r["earlier_targets"] = [
        ("dense2 batch-1 p50 / (compute floor + transport floor)",
         sdk["dense2/b1"]["p50_ms"] / (cf["dense2/b1"]["p50_ms"] + tfl["dense2/b1"]["p50_ms"]), "<= 1.3", None),
        ("cnn batch-1 p50 / (compute floor + transport floor)",
         sdk["cnn/b1"]["p50_ms"] / (cf["cnn/b1"]["p50_ms"] + tfl["cnn/b1"]["p50_ms"]), "<= 1.3", None),
        ("64 clients: batching on / batching off", tp["batching on"][64] / tp["batching off"][64], ">= 4", None),
        ("cnn, 64 clients: batching on / batching off",
         r["throughput_cnn"]["batching on"][0]["rps"] / r["throughput_cnn"]["batching off"][0]["rps"], ">= 4", None),
        ("64 clients: batching on / bare echo", tp["batching on"][64] / tp["echo"][64], ">= 0.8", None),
        ("8 clients: gradserve / naive server", tp["batching on"][8] / tp["naive"][8], ">= 10", None),
        ("256 MiB transfer: gradserve / raw socket", r["transfer"][-1]["ratio"], ">= 0.5", None),
    ]
    for key, goals in (("targets", _side_by_side_targets(r) + shared_memory.targets(r["shared_memory"])),
                       ("earlier_targets", r["earlier_targets"])):
        r[key] = [(n, v, g, (v <= float(g.split()[1])) if g.startswith("<=") else (v >= float(g.split()[1])))
                  for n, v, g, _ in goals]
    r["seconds"] = time.perf_counter() - t_begin
    lines = report(r)
    lines += ["", "## Open Inference Protocol (bench/oip.py)", *oip.report(r["oip"])]
    lines += ["", "## Same-host shared memory (bench/shared_memory.py)", *shared_memory.report(r["shared_memory"])]
    if "workers" in r:
        lines += ["", "## Worker processes (bench/workers.py)", *workers.report(r["workers"])]
    if "loading" in r:
        lines += ["", "## Loading beside serving (bench/loading.py)", *loading.report(r["loading"])]
    if "gsa" in r:
        lines += ["", "## Global sensitivity (bench/gsa.py)", *r["gsa"]]
    print("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps(r, indent=1, default=str))
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    plot(r, out_dir / "bench.png")
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'report.txt'} and {out_dir / 'bench.png'}")
    return 0


def _python_with_kserve() -> str:
    import importlib.util

    return sys.executable if importlib.util.find_spec("kserve") is not None else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
