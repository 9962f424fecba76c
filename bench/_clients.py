"""Closed-loop load generator for bench/run.py's side-by-side runs, in a process of its own.

    python bench/_clients.py        # reads one JSON command per stdin line, answers one per line

A command is ``{"kind": K, "address": "127.0.0.1:N", "clients": C, "seconds": S, "warmup": W}``
plus, for ``raw``, ``"method"`` and ``"payload"`` (the request bytes, hex). Each client sends
its next batch-1 ``dense2`` gradient request as soon as its last one is answered; the answer is
``{"rps", "p50_ms", "p99_ms", "p999_ms", "max_ms", "n", "errors"}`` over the measured ``S`` seconds. Kinds:

- ``sdk``: gradserve's SDK (``Client.gradient`` for one client, ``AsyncClient.gradient`` for more);
- ``triton``: ``tritonclient.grpc`` (sync for one client, ``.aio`` for more) against a KServe v2
  server (model ``dense2``, input ``input``);
- ``raw``: pre-encoded bytes over a grpcio channel (the echo and naive servers, and gradserve);
- ``oip-grpc`` / ``oip-rest``: ``tritonclient`` against gradserve's own Open Inference Protocol
  front-end (gRPC on its port, REST with binary tensors on ``http_port``);
- ``stream``: ``clients`` ComputeStreams of pre-encoded requests, ``window`` in flight on each.

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
        out.update(p50_ms=float(np.percentile(a, 50)), p99_ms=float(np.percentile(a, 99)),
                   p999_ms=float(np.percentile(a, 99.9)), max_ms=float(a.max()))
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


def run_oip(cmd: dict[str, Any]) -> dict[str, Any]:
    """gradserve's own Open Inference Protocol front-end through tritonclient: gRPC on the server's
    port (``oip-grpc``) or REST with binary tensors on ``http_port`` (``oip-rest``); the gradient
    of ``dense2`` (parameter ``method``), answer ``attributions/input``."""
    x = _x()
    rest = cmd["kind"] == "oip-rest"
    address = f"127.0.0.1:{cmd['http_port']}" if rest else cmd["address"]
    params = {"method": "gradient"}
    if cmd["clients"] == 1:
        if rest:
            import tritonclient.http as tc
        else:
            import tritonclient.grpc as tc  # type: ignore[no-redef]
        c = tc.InferenceServerClient(address)
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)

        def call() -> Any:
            return c.infer("dense2", [inp], parameters=params).as_numpy("attributions/input")

        try:
            return _sync_loop(call, cmd["seconds"], cmd["warmup"])
        finally:
            c.close()

    if rest:
        import tritonclient.http.aio as tca
    else:
        import tritonclient.grpc.aio as tca  # type: ignore[no-redef]

    async def main() -> dict[str, Any]:
        c = tca.InferenceServerClient(address)
        inp = tca.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)

        async def call() -> Any:
            return (await c.infer("dense2", [inp], parameters=params)).as_numpy("attributions/input")

        try:
            return await _async_loop(call, cmd["clients"], cmd["seconds"], cmd["warmup"])
        finally:
            await c.close()

    return asyncio.run(main())


def run_stream(cmd: dict[str, Any]) -> dict[str, Any]:
    """``clients`` ComputeStreams of pre-encoded requests (``payload``), each keeping ``window``
    requests in flight; the answer counts messages (``rps``: messages per second)."""
    import grpc

    payload = bytes.fromhex(cmd["payload"])
    window = int(cmd.get("window", 32))
    options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    # A ComputeStreamRequest whose field 1 is the ComputeRequest: tag 0x0a, varint length, bytes.
    n, head = len(payload), bytearray([0x0A])
    while True:
        head.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    message = bytes(head) + payload

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(cmd["address"], options=options) as ch:
            method = ch.stream_stream("/gradserve.v1.SensitivityService/ComputeStream")
            counts = [0]
            measuring = [False]
            errors = [0]

            async def one(stop_at: float) -> None:
                slots = asyncio.Semaphore(window)

                async def requests() -> Any:
                    while time.perf_counter() < stop_at:
                        await slots.acquire()
                        yield message

                call = method(requests(), timeout=cmd["seconds"] + cmd["warmup"] + 60)
                try:
                    async for _ in call:
                        slots.release()
                        if measuring[0]:
                            counts[0] += 1
                except grpc.aio.AioRpcError:
                    errors[0] += 1

            stop_at = time.perf_counter() + cmd["warmup"] + cmd["seconds"]
            tasks = [asyncio.ensure_future(one(stop_at)) for _ in range(cmd["clients"])]
            await asyncio.sleep(cmd["warmup"])
            measuring[0] = True
            t0 = time.perf_counter()
            await asyncio.gather(*tasks)
            return {"rps": counts[0] / (time.perf_counter() - t0), "n": counts[0], "errors": errors[0]}

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
    kinds = {"sdk": run_sdk, "triton": run_triton, "raw": run_raw, "oip-grpc": run_oip, "oip-rest": run_oip,
             "stream": run_stream}
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
