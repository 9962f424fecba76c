"""What the Open Inference Protocol costs: dense2 batch-1 predict and gradient through tritonclient
(gRPC, and HTTP with binary tensors) against the native SDK, on one ``gradserve serve`` process.

    python bench/oip.py            # about half a minute after the server is up
    python bench/oip.py --quick

The server runs as its own process (``gradserve serve --xla off --http-port``), so that the
client here never shares a GIL with it. One client, calls in sequence: p50/p99 latency and
requests per second. The contenders take turns in warm blocks (a few unmeasured calls first),
several rounds, so that drift of a busy machine is spread over all of them.
``run(address, http_port, n)`` is the part ``bench/run.py`` calls on a server it started.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

import gradserve  # noqa: E402

#: Calls before each measured block (connections, caches, the server's per-shape state).
WARMUP = 20


def _stats(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "rps": float(len(a) / (a.sum() / 1e3))}


def _contenders(address: str, http_port: int | None) -> tuple[dict[str, Callable[[], Any]], list[Any]]:
    """name -> one call, and the clients to close afterwards."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    x = np.random.default_rng(0).random((1, 4), dtype=np.float32)
    sdk = gradserve.Client(address)
    tg = tgrpc.InferenceServerClient(address)
    g_in = tgrpc.InferInput("input", [1, 4], "FP32")
    g_in.set_data_from_numpy(x)
    calls: dict[str, Callable[[], Any]] = {
        "predict / SDK": lambda: sdk.predict("dense2", x),
        "predict / tritonclient gRPC": lambda: tg.infer("dense2", [g_in]).as_numpy("alpha"),
        "gradient / SDK": lambda: sdk.gradient("dense2", x),
        "gradient / tritonclient gRPC": lambda: tg.infer("dense2", [g_in], parameters={"method": "gradient"})
        .as_numpy("attributions/input"),
    }
    closers: list[Any] = [sdk, tg]
    if http_port:
        th = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
        h_in = thttp.InferInput("input", [1, 4], "FP32")
        h_in.set_data_from_numpy(x)
        calls["predict / tritonclient HTTP"] = lambda: th.infer("dense2", [h_in]).as_numpy("alpha")
        calls["gradient / tritonclient HTTP"] = lambda: th.infer(
            "dense2", [h_in], parameters={"method": "gradient"}).as_numpy("attributions/input")
        closers.append(th)
    # Same answers before anything is timed.
    np.testing.assert_allclose(calls["predict / tritonclient gRPC"](), calls["predict / SDK"](), rtol=1e-6)
    np.testing.assert_allclose(calls["gradient / tritonclient gRPC"](), calls["gradient / SDK"](), rtol=1e-6)
    return calls, closers


def run(address: str, http_port: int | None, n: int = 600, rounds: int = 3) -> dict[str, dict[str, float]]:
    """p50/p99 and requests/s of each contender, ``n`` calls each over ``rounds`` warm blocks."""
    calls, closers = _contenders(address, http_port)
    times: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for _ in range(rounds):
            for name, call in calls.items():
                for _ in range(WARMUP):
                    call()
                block = times[name]
                for _ in range(n // rounds):
                    t0 = time.perf_counter()
                    call()
                    block.append(time.perf_counter() - t0)
    finally:
        for c in closers:
            c.close()
    return {name: _stats(t) for name, t in times.items()}


def report(results: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"{'dense2 batch 1, one client':34s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} {'p50 vs SDK':>11s}"]
    for name, s in results.items():
        sdk = results[name.split(" / ")[0] + " / SDK"]["p50_ms"]
        lines.append(f"{name:34s} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['rps']:8.0f} {s['p50_ms'] / sdk:10.2f}x")
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(address: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited while starting")
        try:
            with gradserve.Client(address, timeout=2) as c:
                c.predict("dense2", np.zeros((1, 4), np.float32))
            return
        except gradserve.GradserveError:
            time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    port, http_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(port),
                             "--http-port", str(http_port), "--xla", "off", "--log-level", "WARNING"],
                            stdin=subprocess.DEVNULL)
    try:
        _wait_ready(f"127.0.0.1:{port}", proc)
        results = run(f"127.0.0.1:{port}", http_port, 300 if args.quick else 900)
    finally:
        proc.terminate()
        proc.wait(30)
    print("\n".join(report(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
