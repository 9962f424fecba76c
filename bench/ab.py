"""Server CPU per request of gradserve against the bare echo, and against another source tree.

    python bench/ab.py                        # this tree and the echo, 1 and 64 clients, 6 rounds
    python bench/ab.py --base /tmp/base       # also the tree copied to /tmp/base (A/B of a change)
    python bench/ab.py --stream               # also one ComputeStream (32 in flight), per message

A quicker, narrower companion of ``bench/run.py``'s side-by-side section for judging one change:
every server serves ``dense2`` only (``bench/_server.py gradserve --only dense2``) in its own
process, one load-generator process (``bench/_clients.py``, pre-encoded batch-1 gradient
requests over a grpcio channel) calls them in turns, level by level and round by round, and the
server's CPU time per request is read from ``/proc`` over its whole process tree and by thread
(``bench/_proc.py``). Reported: the median over rounds with [min–max], and the ratio to the echo
taken within each round (paired, so a busy spell of the machine hits both sides of a ratio).

``--base DIR``: a copy of the repository's ``client`` and ``server`` folders (for instance
``git archive HEAD client server | tar -x -C DIR``) whose server runs with ``PYTHONPATH=DIR/client``;
a link ``DIR/client/gradserve/server`` -> ``DIR/server/gradserve/server`` is made if missing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import COMPUTE, ECHO, LoadProcess, ServerProcess, gradient_request  # noqa: E402


def _base_env(base: Path) -> dict[str, str]:
    link = base / "client" / "gradserve" / "server"
    if not link.exists():
        link.symlink_to(base / "server" / "gradserve" / "server")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(base / "client")
    return env


def _cell(values: list[float], fmt: str = ".0f") -> str:
    if not values:
        return "—"
    return f"{np.median(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="another tree's copy to compare with (see the docstring)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--clients", default="1,64", help="client counts (comma-separated)")
    parser.add_argument("--stream", action="store_true", help="also one ComputeStream, 32 requests in flight")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    raw = gradient_request("dense2", 1).hex()
    servers: dict[str, ServerProcess] = {"echo": ServerProcess("echo"),
                                         "gradserve": ServerProcess("gradserve", "--only", "dense2")}
    if args.base is not None:
        servers["base"] = ServerProcess("gradserve", "--only", "dense2", env=_base_env(args.base.resolve()))
    load = None
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        for s in servers.values():
            s.wait_ready()
        load = LoadProcess(sys.executable)
        contenders: list[tuple[str, ServerProcess, dict[str, Any], list[int]]] = [
            ("echo", servers["echo"], {"kind": "raw", "method": ECHO, "payload": raw}, levels)]
        for name in ("gradserve", "base"):
            if name in servers:
                contenders.append((name, servers[name], {"kind": "raw", "method": COMPUTE, "payload": raw}, levels))
                if args.stream:
                    contenders.append((f"{name} stream", servers[name],
                                       {"kind": "stream", "payload": raw, "window": 32}, [1]))
        warmup = min(0.5, args.seconds / 3)
        for _ in range(args.rounds):
            for n in levels:
                for name, server, command, ns in contenders:
                    if n not in ns:
                        continue
                    ticks0 = server.thread_ticks()
                    cpu0 = server.cpu_seconds()
                    row = load.run(address=server.address, clients=n, seconds=args.seconds, warmup=warmup,
                                   **command)
                    cpu1 = server.cpu_seconds()
                    if "error" in row:
                        print(f"{name}, {n} clients: {row['error']}", file=sys.stderr)
                        continue
                    done = row["rps"] * (args.seconds + warmup)
                    row["cpu_us"] = (cpu1 - cpu0) / max(done, 1.0) * 1e6
                    row["threads"] = server.by_thread(ticks0, done)
                    rows.setdefault((name, n), []).append(row)
    finally:
        if load is not None:
            load.stop()
        for s in servers.values():
            s.stop()

    print(f"server CPU µs per batch-1 dense2 request (raw bytes), median [min–max] of {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.1f} at the end")
    for (name, n), rs in rows.items():
        cpu = [r["cpu_us"] for r in rs]
        line = (f"  {name:<18} {n:>3} clients: CPU {_cell(cpu)}  p50 ms {_cell([r['p50_ms'] for r in rs], '.3f')}"
                if "p50_ms" in rs[0] else f"  {name:<18} {n:>3} clients: CPU {_cell(cpu)}")
        line += f"  req/s {_cell([r['rps'] for r in rs])}"
        echo = rows.get(("echo", n))
        if name != "echo" and echo and len(echo) == len(rs) and "stream" not in name:
            line += f"  / echo {_cell([a['cpu_us'] / b['cpu_us'] for a, b in zip(rs, echo)], '.2f')}"
        print(line)
        groups = {g for r in rs for g in r["threads"]}
        med = {g: float(np.median([r["threads"].get(g, {}).get("us", 0.0) for r in rs])) for g in groups}
        print("      " + ", ".join(f"{g} {us:.0f}" for g, us in sorted(med.items(), key=lambda kv: -kv[1])
                                   if us >= 0.5))
    if "base" in servers:
        for n in levels:
            new, old = rows.get(("gradserve", n)), rows.get(("base", n))
            if new and old and len(new) == len(old):
                ratios = [a["cpu_us"] / b["cpu_us"] for a, b in zip(new, old)]
                print(f"  gradserve / base, {n} clients: CPU {_cell(ratios, '.3f')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
