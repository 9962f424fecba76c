"""Closed-loop load generator for bench/run.py's side-by-side runs, in a process of its own.

    python bench/_clients.py        # reads one JSON command per stdin line, answers one per line

A command is ``{"kind": K, "address": "127.0.0.1:N", "clients": C, "seconds": S, "warmup": W}``
plus, for ``raw``, ``"method"`` and ``"payload"`` (the request bytes, hex). Each client sends
its next batch-1 ``dense2`` gradient request as soon as its last one is answered; the answer is
``{"rps", "p50_ms", "p99_ms", "n", "errors"}`` over the measured ``S`` seconds. Kinds:

- ``sdk``: gradserve's SDK (``Client.gradient`` for one client, ``AsyncClient.gradient`` for more);
- ``triton``: ``tritonclient.grpc`` (sync for one client, ``.aio`` for more) against a KServe v2
  server (model ``dense2``, input ``input``);
- ``raw``: pre-encoded bytes over a grpcio channel (the echo and naive servers).

Only the kind's client library is imported, so the process runs in the KServe environment
(``tritonclient``, no gradserve) as well as in gradserve's.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, Awaitable, Callable

import numpy as np

MiB = 1024 * 1024


def _stats(latencies: list[float], elapsed: float, errors: int) -> dict[str, Any]:
    a = np.asarray(latencies) * 1e3
    out: dict[str, Any] = {"rps": len(latencies) / elapsed, "n": int(a.size), "errors": errors}
    if a.size:
        out.update(p50_ms=float(np.percentile(a, 50)), p99_ms=float(np.percentile(a, 99)))
    return out


def _sync_loop(call: Callable[[], Any], seconds: float, warmup: float) -> dict[str, Any]:
    end_warm = time.perf_counter() + warmup
    while time.perf_counter() < end_warm:
        call()
    latencies: list[float] = []
    errors = 0
    t_begin = time.perf_counter()
    stop_at = t_begin + seconds
    while (t0 := time.perf_counter()) < stop_at:
        try:
            call()
        except Exception:  # noqa: BLE001 - counted, not fatal
            errors += 1
            continue
        latencies.append(time.perf_counter() - t0)
    return _stats(latencies, time.perf_counter() - t_begin, errors)


async def _async_loop(call: Callable[[], Awaitable[Any]], clients: int, seconds: float,
                      warmup: float) -> dict[str, Any]:
    latencies: list[float] = []
    measuring = False
    errors = 0

    async def client(stop_at: float) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await call()
            except Exception:  # noqa: BLE001
                errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - t0)

    stop_at = time.perf_counter() + warmup + seconds
    tasks = [asyncio.ensure_future(client(stop_at)) for _ in range(clients)]
    await asyncio.sleep(warmup)
    measuring = True
    t0 = time.perf_counter()
    await asyncio.gather(*tasks)
    return _stats(latencies, time.perf_counter() - t0, errors)


def _x() -> np.ndarray:
    return np.random.default_rng(0).random((1, 4), dtype=np.float32)


def run_sdk(cmd: dict[str, Any]) -> dict[str, Any]:
    import gradserve

    x = _x()
    if cmd["clients"] == 1:
        with gradserve.Client(cmd["address"], timeout=30) as c:
            c.model_info("dense2")
            return _sync_loop(lambda: c.gradient("dense2", x), cmd["seconds"], cmd["warmup"])

    async def main() -> dict[str, Any]:
        async with gradserve.AsyncClient(cmd["address"], timeout=30) as c:
            await c.model_info("dense2")
            return await _async_loop(lambda: c.gradient("dense2", x), cmd["clients"], cmd["seconds"], cmd["warmup"])

    return asyncio.run(main())


def run_triton(cmd: dict[str, Any]) -> dict[str, Any]:
    x = _x()
    if cmd["clients"] == 1:
        import tritonclient.grpc as tc

        c = tc.InferenceServerClient(cmd["address"])
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)

        def call() -> Any:
            return c.infer("dense2", [inp], client_timeout=30).as_numpy("gradient")

        try:
            return _sync_loop(call, cmd["seconds"], cmd["warmup"])
        finally:
            c.close()

    import tritonclient.grpc.aio as tca

    async def main() -> dict[str, Any]:
        c = tca.InferenceServerClient(cmd["address"])
        inp = tca.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)

        async def call() -> Any:
            return (await c.infer("dense2", [inp], client_timeout=30)).as_numpy("gradient")

        try:
            return await _async_loop(call, cmd["clients"], cmd["seconds"], cmd["warmup"])
        finally:
            await c.close()

    return asyncio.run(main())


def run_raw(cmd: dict[str, Any]) -> dict[str, Any]:
    import grpc

    payload = bytes.fromhex(cmd["payload"])
    options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    if cmd["clients"] == 1:
        with grpc.insecure_channel(cmd["address"], options=options) as ch:
            call = ch.unary_unary(cmd["method"])
            return _sync_loop(lambda: call(payload, timeout=30), cmd["seconds"], cmd["warmup"])

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(cmd["address"], options=options) as ch:
            call = ch.unary_unary(cmd["method"])
            return await _async_loop(lambda: call(payload, timeout=30), cmd["clients"], cmd["seconds"],
                                     cmd["warmup"])

    return asyncio.run(main())


def main() -> None:
    kinds = {"sdk": run_sdk, "triton": run_triton, "raw": run_raw}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            result = kinds[cmd["kind"]](cmd)
        except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which goes on
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
