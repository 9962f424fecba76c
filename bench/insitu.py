"""Our Compute handler's CPU where it runs, inside the server, against plain Python work there.

    python bench/insitu.py                   # 1 and 64 clients, 4 rounds, about 3 minutes
    python bench/insitu.py --rounds 6 --clients 1

Why the server's CPU per request stays further above the echo's than our handler costs in a
tight in-process loop (``bench/hotpath.py``'s "whole handler"): this times the handler in the
running server. Two servers, each in its own process, called in turns by one load-generator
process (``bench/_clients.py``) with pre-encoded batch-1 ``dense2`` gradient requests:

- gradserve (``bench/_server.py gradserve --only dense2 --time-handler``): the native Compute
  handler timed by the event loop thread's CPU clock ("first run"), then the same request handled
  once more at once and timed apart ("run again": what the first run brought into the CPU's
  caches is still there); its answer is discarded;
- the echo (``bench/_server.py echo --work N``): N entries put in a dict in the handler, plain
  Python work, timed the same way; the same work timed here in a tight loop for comparison.

Reported per level: medians over rounds [min-max], µs of CPU per request. The server's own CPU
per request is not reported: the second run doubles the handler's share of it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _server import work  # noqa: E402
from run import COMPUTE, ECHO, LoadProcess, ServerProcess, gradient_request  # noqa: E402


def _handler(server: ServerProcess) -> dict[str, int]:
    """The server's handler counters (``bench/_server.py``'s ``handler`` command)."""
    import json

    server.proc.stdin.write("handler\n")  # type: ignore[union-attr]
    server.proc.stdin.flush()  # type: ignore[union-attr]
    counters: dict[str, int] = json.loads(server.proc.stdout.readline())  # type: ignore[union-attr]
    return counters


def _tight_loop_us(n: int, repeats: int = 2000) -> float:
    """``work(n)``'s CPU in a tight loop here, µs per call (best of 5)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(repeats):
            work(n)
        best = min(best, (time.thread_time() - t0) / repeats * 1e6)
    return best


def _cell(values: list[float]) -> str:
    return f"{np.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,64", help="client counts (comma-separated)")
    parser.add_argument("--work", type=int, default=200, help="entries the echo's handler puts in a dict")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    payload = gradient_request("dense2", 1).hex()
    servers = {"gradserve": ServerProcess("gradserve", "--only", "dense2", "--time-handler"),
               "echo": ServerProcess("echo", "--work", str(args.work))}
    load = LoadProcess(sys.executable)
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for server in servers.values():
            server.wait_ready()
        for _ in range(args.rounds):
            for clients in levels:
                for name, server in servers.items():
                    before = _handler(server)
                    answer: dict[str, Any] = load.run(kind="raw", address=f"127.0.0.1:{server.port}",
                                                      method=COMPUTE if name == "gradserve" else ECHO,
                                                      payload=payload, clients=clients, seconds=args.seconds,
                                                      warmup=0.5)
                    after = _handler(server)
                    n = after["n"] - before["n"]
                    if "error" in answer or not n:
                        print(f"{name} at {clients} clients: {answer.get('error', 'no request handled')}")
                        continue
                    rows.setdefault((name, clients), []).append(
                        ((after["first_ns"] - before["first_ns"]) / n / 1e3,
                         (after["second_ns"] - before["second_ns"]) / n / 1e3))
    finally:
        load.stop()
        for server in servers.values():
            server.stop()
    tight = _tight_loop_us(args.work)
    print(f"handler CPU, µs per request, median [min-max] of {args.rounds} rounds")
    for clients in levels:
        ours = rows.get(("gradserve", clients), [])
        echo = rows.get(("echo", clients), [])
        if ours:
            print(f"  {clients:3d} clients  gradserve Compute: first run {_cell([r[0] for r in ours])}, "
                  f"run again at once {_cell([r[1] for r in ours])}")
        if echo:
            print(f"  {clients:3d} clients  echo + work({args.work}): {_cell([r[0] for r in echo])} "
                  f"(the same work in a tight loop here: {tight:.1f})")
    print("  (the whole Compute handler in a tight in-process loop: `python bench/hotpath.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
