"""gradserve benchmark: latency, throughput and transfer against their floors, side by side in one run.

    python bench/run.py            # about 2-3 minutes
    python bench/run.py --quick    # under a minute, fewer samples

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
  ``predict`` on an identity model, against a raw TCP socket on loopback.

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
COMPUTE = "/gradserve.v1.SensitivityService/Compute"
ECHO = "/bench.Echo/Echo"
MiB = 1024 * 1024
SHAPES = {"dense2": (4,), "cnn": (16, 16, 1)}
INPUT_NAMES = {"dense2": "input", "cnn": "image"}


# -- servers ---------------------------------------------------------------------------------------
class ServerProcess:
    """One ``bench/_server.py`` process; ``port`` once it printed it."""

    def __init__(self, kind: str, *args: str) -> None:
        self.kind = " ".join((kind,) + args)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_server.py"), kind, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.port = 0

    def wait_ready(self, timeout: float = 240.0) -> "ServerProcess":
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not result or not result[0].startswith("PORT "):
            self.stop()
            raise RuntimeError(f"server {self.kind!r} did not start")
        self.port = int(result[0].split()[1])
        return self

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


def time_calls(fn: Callable[[], Any], n: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def raw_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=channel_options(64 * MiB, False))


# -- measurements ----------------------------------------------------------------------------------
def compute_floor(grad_addr: str, n: int) -> dict[str, Any]:
    """The server's compiled gradient, called in-process (same model, same XLA choice)."""
    from gradserve.server import methods
    from gradserve.server.config import EngineConfig, Limits
    from gradserve.server.demo import DEMO_MODELS
    from gradserve.server.engine import CompiledModel
    from gradserve.server.modelfn import from_keras
    from gradserve.server.spec import ComputeSpec, TargetSpec

    out: dict[str, Any] = {}
    with raw_channel(grad_addr) as ch:
        stub = _model_grpc.ModelServiceStub(ch)
        xla = {m: stub.GetModel(_model_pb2.GetModelRequest(name=m)).model.versions[0].xla for m in SHAPES}
    for model, shape in SHAPES.items():
        mf = from_keras(DEMO_MODELS[model]())
        engine = CompiledModel(mf, EngineConfig(), xla=xla[model])
        name = INPUT_NAMES[model]
        out_name = mf.outputs[0].name
        for batch in (1, 64):
            x = np.random.default_rng(0).random((batch,) + shape, dtype=np.float32)

            def run() -> None:
                spec = ComputeSpec(model, 1, "gradient", {name: x}, batch, TargetSpec(out_name), (name,))
                engine.run(methods.get("gradient").plan(spec, mf, Limits()))

            out[f"{model}/b{batch}"] = stats(time_calls(run, n))
        out[f"{model}/xla"] = bool(xla[model])
    return out


def unary_latency(address: str, method: str, n: int) -> dict[str, Any]:
    """Latency of pre-encoded requests (bytes in, bytes out: no SDK work on either side)."""
    out: dict[str, Any] = {}
    with raw_channel(address) as ch:
        call = ch.unary_unary(method)
        for model in SHAPES:
            for batch in (1, 64):
                payload = gradient_request(model, batch)
                out[f"{model}/b{batch}"] = stats(time_calls(lambda: call(payload, timeout=30), n))
    return out


def sdk_latency(address: str, n: int) -> dict[str, Any]:
    """Latency through the SDK: encode, call, decode (what an application sees)."""
    out: dict[str, Any] = {}
    with gradserve.Client(address, timeout=30) as c:
        for model, shape in SHAPES.items():
            c.model_info(model)
            for batch in (1, 64):
                x = np.random.default_rng(0).random((batch,) + shape, dtype=np.float32)
                out[f"{model}/b{batch}"] = stats(time_calls(lambda: c.gradient(model, x), n))
    return out


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


def throughput(address: str, method: str, payload: bytes, levels: list[int], seconds: float) -> list[dict[str, Any]]:
    return [asyncio.run(_closed_loop(address, method, payload, n, seconds, min(0.5, seconds / 3))) for n in levels]


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
    add("latency, ms (p50 / p99)            compute floor   transport floor   gradserve bytes   gradserve SDK    SDK / floors")
    for key in ("dense2/b1", "dense2/b64", "cnn/b1", "cnn/b64"):
        cf, tf_, gb, gs = (r["compute_floor"][key], r["transport_floor"][key], r["gradserve_raw"][key],
                           r["gradserve_sdk"][key])
        ratio = gs["p50_ms"] / (cf["p50_ms"] + tf_["p50_ms"])
        add(f"  {key:<12} {cf['p50_ms']:>14.3f} / {cf['p99_ms']:<6.3f} {tf_['p50_ms']:>8.3f} / {tf_['p99_ms']:<6.3f} "
            f"{gb['p50_ms']:>8.3f} / {gb['p99_ms']:<6.3f} {gs['p50_ms']:>8.3f} / {gs['p99_ms']:<6.3f} {ratio:>8.2f}x")
    add("")
    add("throughput, requests/s (p50 ms) of batch-1 dense2 gradients")
    servers = list(r["throughput"])
    add("  clients " + "".join(f"{s:>24}" for s in servers))
    for i, n in enumerate(r["levels"]):
        cells = []
        for s in servers:
            row = r["throughput"][s][i]
            cells.append(f"{row['rps']:>14.0f} ({row.get('p50_ms', float('nan')):>6.2f})")
        add(f"  {n:>7} " + "".join(f"{c:>24}" for c in cells))
    add("")
    add("transfer (predict on identity, SDK; there and back), MiB/s of payload each way")
    for t in r["transfer"]:
        add(f"  {t['mib']:>4} MiB: gradserve {t['grpc_mib_s']:8.0f}   raw socket {t['socket_mib_s']:8.0f}   "
            f"ratio {t['ratio']:.2f}{'' if t['ok'] else '  (WRONG RESULT)'}")
    add("")
    add("targets")
    for name, value, goal, ok in r["targets"]:
        add(f"  [{'ok' if ok else 'MISS'}] {name}: {value:.2f} (target {goal})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description="gradserve benchmark (see the module docstring)")
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter runs (under a minute)")
    parser.add_argument("--out", default=str(HERE / "out"), help="folder for results.json and bench.png")
    args = parser.parse_args()
    t_begin = time.perf_counter()
    n_lat = 100 if args.quick else 300
    seconds = 1.0 if args.quick else 3.0
    levels = [1, 8, 64]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    servers = {
        "echo": ServerProcess("echo"),
        "batching on": ServerProcess("gradserve"),
        "batching off": ServerProcess("gradserve", "--no-batching"),
        "batching, no hold": ServerProcess("gradserve", "--delay-us", "0"),
        "naive": ServerProcess("naive"),
        "transfer": ServerProcess("transfer"),
        "socket": ServerProcess("socket"),
    }
    try:
        for s in servers.values():
            s.wait_ready()
        print(f"servers ready in {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)
        grad = servers["batching on"].address
        r: dict[str, Any] = {"quick": args.quick, "levels": levels,
                             "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load "
                                        f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}, "
                                        f"grpcio {grpc.__version__}"}
        r["compute_floor"] = compute_floor(grad, n_lat)
        r["transport_floor"] = unary_latency(servers["echo"].address, ECHO, n_lat)
        r["gradserve_raw"] = unary_latency(grad, COMPUTE, n_lat)
        r["gradserve_sdk"] = sdk_latency(grad, n_lat)
        print(f"latency done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)

        payload = gradient_request("dense2", 1)
        r["throughput"] = {
            "echo": throughput(servers["echo"].address, ECHO, payload, levels, seconds),
            "batching on": throughput(grad, COMPUTE, payload, levels, seconds),
            "batching off": throughput(servers["batching off"].address, COMPUTE, payload, levels, seconds),
            "batching, no hold": throughput(servers["batching, no hold"].address, COMPUTE, payload, levels,
                                            seconds),
            "naive": throughput(servers["naive"].address, COMPUTE, payload, levels[:2], seconds),
        }
        r["throughput"]["naive"].append({"clients": 64, "rps": float("nan")})  # not run: minutes at best
        print(f"throughput done at {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)

        r["transfer"] = []
        for mib, reps in ((48, 2 if args.quick else 3), (256, 1 if args.quick else 2)):
            g, ok = grpc_transfer(servers["transfer"].address, mib, reps)
            s = socket_transfer(servers["socket"].port, mib * MiB, reps)
            r["transfer"].append({"mib": mib, "grpc_s": g, "socket_s": s, "grpc_mib_s": mib / g,
                                  "socket_mib_s": mib / s, "ratio": s / g, "ok": ok})
    finally:
        for s in servers.values():
            s.stop()

    cf, tfl, sdk = r["compute_floor"], r["transport_floor"], r["gradserve_sdk"]
    tp = {k: {row["clients"]: row["rps"] for row in v} for k, v in r["throughput"].items()}
    r["targets"] = [
        ("dense2 batch-1 p50 / (compute floor + transport floor)",
         sdk["dense2/b1"]["p50_ms"] / (cf["dense2/b1"]["p50_ms"] + tfl["dense2/b1"]["p50_ms"]), "<= 1.3", None),
        ("cnn batch-1 p50 / (compute floor + transport floor)",
         sdk["cnn/b1"]["p50_ms"] / (cf["cnn/b1"]["p50_ms"] + tfl["cnn/b1"]["p50_ms"]), "<= 1.3", None),
        ("64 clients: batching on / batching off", tp["batching on"][64] / tp["batching off"][64], ">= 4", None),
        ("64 clients: batching on / bare echo", tp["batching on"][64] / tp["echo"][64], ">= 0.8", None),
        ("8 clients: gradserve / naive server", tp["batching on"][8] / tp["naive"][8], ">= 10", None),
        ("256 MiB transfer: gradserve / raw socket", r["transfer"][-1]["ratio"], ">= 0.5", None),
    ]
    r["targets"] = [(n, v, g, (v <= float(g.split()[1])) if g.startswith("<=") else (v >= float(g.split()[1])))
                    for n, v, g, _ in r["targets"]]
    r["seconds"] = time.perf_counter() - t_begin
    lines = report(r)
    print("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps(r, indent=1, default=str))
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    plot(r, out_dir / "bench.png")
    print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'report.txt'} and {out_dir / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
