"""Throughput of ``gradserve serve --workers N`` and what each worker costs in memory.

    python bench/workers.py                          # 1 and 2 workers, 16 and 64 clients, ~3 min
    python bench/workers.py --workers 1,2,4 --seconds 10 --rounds 3

Batch-1 ``dense2`` gradients from closed-loop SDK clients (``AsyncClient``), split over
``--load-processes`` processes so that the load generator is not one GIL. Each client has a
connection of its own (``grpc.use_local_subchannel_pool``): workers share one port and the
kernel spreads connections, not calls, over them, and channels of one process otherwise share
one connection per address. One server per worker count runs for the whole benchmark (default
flags); the configurations take turns for ``--rounds`` rounds and each keeps its best round, so
a busy spell of the machine hits all of them. Memory: resident set (VmRSS) of every worker and
of the supervisor after the run.

``measure_workers`` is the function ``bench/run.py`` calls; ``main`` prints its table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["measure_workers", "main"]

MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


class _Server:
    """``gradserve serve --workers N`` on a free port, started and stopped by this benchmark."""

    def __init__(self, workers: int, extra: list[str]) -> None:
        self.workers = workers
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile(prefix=f"gradserve-workers{workers}-", suffix=".log", delete=False)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                   TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--workers", str(workers),
                                      "--port", str(self.port), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Every worker listens (a worker binds once its models are READY; a lone server logs
        'listening' before loading, so its health must say SERVING too)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server with {self.workers} workers exited: see {self.log.name}")
            if Path(self.log.name).read_text(errors="replace").count("listening on") >= self.workers:
                with grpc.insecure_channel(self.address) as ch:
                    try:
                        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    except grpc.RpcError:
                        status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"server with {self.workers} workers not ready after {timeout:.0f} s")

    def memory(self) -> dict[str, Any]:
        """RSS in MiB: each serving process (the workers, or the lone server) and the supervisor."""
        if self.workers == 1:
            return {"servers_mib": [_rss_mib(self.proc.pid)], "supervisor_mib": None}
        return {"servers_mib": [_rss_mib(p) for p in _children(self.proc.pid)],
                "supervisor_mib": _rss_mib(self.proc.pid)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        os.unlink(self.log.name)


def _load(address: str, clients: int, seconds: float, warmup: float, out: Any) -> None:
    """One load process: ``clients`` closed-loop AsyncClients, each on its own connection."""
    import grpc

    import gradserve
    from gradserve._channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options

    x = np.random.default_rng(0).random((1, 4), dtype=np.float32)
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES, False) + [("grpc.use_local_subchannel_pool", 1)]

    async def run() -> dict[str, Any]:
        latencies: list[float] = []
        errors = 0
        measuring = False
        stop_at = time.perf_counter() + warmup + seconds

        async def client() -> None:
            nonlocal errors
            async with gradserve.AsyncClient(address, timeout=30,
                                             channel=grpc.aio.insecure_channel(address, options=options)) as c:
                await c.model_info("dense2")
                while (t0 := time.perf_counter()) < stop_at:
                    try:
                        await c.gradient("dense2", x)
                    except gradserve.GradserveError:
                        errors += 1
                        continue
                    if measuring:
                        latencies.append(time.perf_counter() - t0)

        tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
        await asyncio.sleep(warmup)
        measuring = True
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
        return {"latencies": latencies, "elapsed": time.perf_counter() - t0, "errors": errors}

    out.put(asyncio.run(run()))


def _throughput(address: str, clients: int, processes: int, seconds: float, warmup: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    procs = [ctx.Process(target=_load, args=(address, n, seconds, warmup, queue)) for n in shares if n]
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + warmup + 300) for _ in procs]
    for p in procs:
        p.join(60)
    latencies = np.concatenate([np.asarray(r["latencies"]) for r in results]) * 1e3
    elapsed = max(r["elapsed"] for r in results)
    return {"rps": latencies.size / elapsed, "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)), "errors": sum(r["errors"] for r in results)}


def measure_workers(workers: tuple[int, ...] = (1, 2), clients: tuple[int, ...] = (16, 64), seconds: float = 8.0,
                    warmup: float = 2.0, rounds: int = 2, load_processes: int = 2,
                    server_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Requests/s of batch-1 dense2 gradients for each worker count and client count (best of
    ``rounds``, configurations taking turns), and the memory of every server process."""
    servers = {n: _Server(n, list(server_args)) for n in workers}
    try:
        for server in servers.values():
            server.wait_ready()
        best: dict[int, dict[int, dict[str, Any]]] = {n: {} for n in workers}
        for _ in range(rounds):
            for c in clients:
                for n, server in servers.items():
                    r = _throughput(server.address, c, load_processes, seconds, warmup)
                    if c not in best[n] or r["rps"] > best[n][c]["rps"]:
                        best[n][c] = r
        memory = {n: server.memory() for n, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    return {"throughput": best, "memory": memory, "cpus": os.cpu_count(), "seconds": seconds, "rounds": rounds,
            "load_processes": load_processes}


def report(r: dict[str, Any]) -> list[str]:
    clients = sorted({c for per in r["throughput"].values() for c in per})
    lines = [f"batch-1 dense2 gradients, SDK clients on connections of their own ({r['cpus']} CPUs, "
             f"best of {r['rounds']} x {r['seconds']:g} s)",
             "| workers | " + " | ".join(f"{c} clients: req/s (p50 ms)" for c in clients)
             + " | RSS per server process, MiB |",
             "|---|" + "---|" * len(clients) + "---|"]
    base = r["throughput"][min(r["throughput"])]
    for n, per in sorted(r["throughput"].items()):
        cells = [f"{per[c]['rps']:.0f} ({per[c]['p50_ms']:.1f}) [{per[c]['rps'] / base[c]['rps']:.2f}x]"
                 for c in clients]
        mem = r["memory"][n]
        rss = ", ".join(f"{m:.0f}" for m in mem["servers_mib"])
        if mem["supervisor_mib"] is not None:
            rss += f"; supervisor {mem['supervisor_mib']:.0f}"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {rss} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2,4 (default 1,2)")
    parser.add_argument("--clients", default="16,64", help="closed-loop client counts (default 16,64)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load-processes", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    r = measure_workers(tuple(int(n) for n in args.workers.split(",")), tuple(int(c) for c in args.clients.split(",")),
                        seconds=args.seconds, rounds=args.rounds, load_processes=args.load_processes)
    print("\n".join(report(r)))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
