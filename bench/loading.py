"""Loading does not hurt serving: the latency of a model that serves while the others load.

    python bench/loading.py                      # gradserve (default flags), then the KServe peer
    python bench/loading.py --rounds 3 --kserve-python ''
    python bench/loading.py --flags="--backend tensorflow"

``gradserve serve`` starts on the demo models in a process of its own. The benchmark polls the
per-model health of ``dense2`` (every 10 ms) and, the moment it says SERVING (while ``cnn`` and
``multi`` still load, trace, convert to LiteRT and warm up), tells a load-generator process,
already started and connected, to send sequential batch-1 ``dense2`` gradients through the SDK.
It keeps polling the overall health (``service=""``) until it says SERVING. Each request is
stamped with its start (``time.monotonic``, one clock for every process of the machine); the
report gives p50/p99/p99.9/max per phase:

- ``while loading``: requests sent before the overall health said SERVING;
- ``first 10 s``: requests sent in the first ``--window`` seconds after ``dense2`` said SERVING
  (the issue's "first 10 s after the server reports SERVING");
- ``after all READY``: requests sent from 1 s after the overall SERVING, for ``--steady`` s: the
  same server with nothing loading, the baseline.

The first 5 requests of each run (the channel's connection, the SDK's model metadata) are left
out, for every server alike. Also reported: when ``dense2`` and the whole server said SERVING
(seconds after the process started), and the server's CPU by thread between the two (Linux
/proc; threads by kernel name, the process's main thread apart).

The KServe peer (``bench/kserve_peer.py``, one model, loaded before it serves) is measured the
same way through ``tritonclient`` over its first ``--window`` seconds.

``bench/run.py`` runs this as its "Loading" section (``measure`` and ``report``), alone on the
machine after the other servers stopped. ``python bench/loading.py --client KIND`` is the load
generator (it imports only its client library, so it runs under the KServe Python as well).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Requests of each run left out: the connection's set-up and the SDK's metadata fetch.
SKIP = 5


# -- the load generator (its own process) ---------------------------------------------------------
def _client(kind: str) -> None:
    """Read the address from stdin, send sequential batch-1 dense2 gradients until ``stop``,
    then print {"t": starts, "lat": seconds} (monotonic clock) as one JSON line."""
    x = np.random.default_rng(0).random((1, 4), dtype=np.float32)
    if kind == "sdk":  # imported before "ready": not in the measured time
        import gradserve
    else:
        import tritonclient.grpc as tc  # type: ignore[import-untyped]
    print("ready", flush=True)
    address = sys.stdin.readline().strip()
    stop = threading.Event()

    def wait_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_stop, daemon=True).start()
    if kind == "sdk":
        client = gradserve.Client(address, timeout=30)

        def call() -> Any:
            return client.gradient("dense2", x)
    else:
        client = tc.InferenceServerClient(address)
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)

        def call() -> Any:
            return client.infer("dense2", [inp], client_timeout=30).as_numpy("gradient")

    starts: list[float] = []
    lat: list[float] = []
    errors = 0
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            call()
        except Exception:  # noqa: BLE001 - counted; the server may still be starting
            errors += 1
            if errors > 10000:
                break
            continue
        starts.append(t0)
        lat.append(time.monotonic() - t0)
    client.close()
    print(json.dumps({"t": starts, "lat": lat, "errors": errors}), flush=True)


class _Load:
    def __init__(self, python: str, kind: str) -> None:
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--client", kind], cwd=str(ROOT),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=_env())
        if self.proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise RuntimeError(f"load generator ({kind}) did not start")

    def go(self, address: str) -> None:
        self.proc.stdin.write(address + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def finish(self) -> dict[str, Any]:
        self.proc.stdin.write("stop\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        out = self.proc.communicate(timeout=120)[0]
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


def _env() -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the server's threads --------------------------------------------------------------------------
_DIGITS = re.compile(r"[-_.:#]?\d+$")


def _threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (kernel name, user + system clock ticks, minor page faults) of every thread of ``pid``."""
    out: dict[int, tuple[str, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        f = text.rsplit(")", 1)[1].split()
        out[int(tid)] = ("main thread" if int(tid) == pid else name, int(f[11]) + int(f[12]), int(f[7]))
    return out


def _by_thread(before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]],
               field: int, scale: float = 1.0) -> dict[str, float]:
    """Growth of ``field`` (1: CPU ticks, 2: minor faults) between two samples by thread name
    (pools collapsed), most first."""
    groups: dict[str, float] = {}
    for tid, row in after.items():
        key = _DIGITS.sub("", row[0]) or row[0]
        then = before.get(tid)
        grown = int(row[field]) - (int(then[field]) if then else 0)
        groups[key] = groups.get(key, 0.0) + grown * scale
    return dict(sorted(((k, v) for k, v in groups.items() if v > 0), key=lambda kv: -kv[1]))


# -- one run ---------------------------------------------------------------------------------------
def _health(channel: Any, service: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=1).status)
    except grpc.RpcError:
        return -1


def _phase(t: np.ndarray, lat: np.ndarray, start: float, end: float) -> dict[str, Any]:
    sel = lat[(t >= start) & (t < end)] * 1e3
    if not sel.size:
        return {"n": 0}
    return {"n": int(sel.size), "p50_ms": float(np.percentile(sel, 50)), "p99_ms": float(np.percentile(sel, 99)),
            "p999_ms": float(np.percentile(sel, 99.9)), "max_ms": float(sel.max()),
            "over_5ms": int((sel > 5.0).sum())}


def run_gradserve(flags: list[str], window: float, steady: float, log: Path) -> dict[str, Any]:
    """One start of ``gradserve serve`` on the demo models with load from dense2's SERVING on."""
    import grpc
    from grpc_health.v1 import health_pb2

    serving = health_pb2.HealthCheckResponse.SERVING
    load = _Load(sys.executable, "sdk")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    with open(log, "w") as log_file:
        t_spawn = time.monotonic()
        server = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--host", "127.0.0.1", "--port",
                                   str(port), *flags], stdout=log_file, stderr=subprocess.STDOUT, env=_env(),
                                  cwd=str(ROOT))
        try:
            # Reconnect at once: the default backoff (1 s, growing) would see dense2 late.
            options = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
                       ("grpc.max_reconnect_backoff_ms", 100)]
            with grpc.insecure_channel(address, options=options) as channel:
                while _health(channel, "dense2") != serving:
                    if server.poll() is not None or time.monotonic() - t_spawn > 300:
                        raise RuntimeError(f"gradserve did not serve dense2 (see {log})")
                    time.sleep(0.01)
                t_dense2 = time.monotonic()
                load.go(address)
                threads0 = _threads(server.pid)
                others_loading = _health(channel, "") != serving
                while _health(channel, "") != serving:
                    if server.poll() is not None or time.monotonic() - t_spawn > 600:
                        raise RuntimeError(f"gradserve did not report SERVING (see {log})")
                    time.sleep(0.05)
                t_all = time.monotonic()
                threads1 = _threads(server.pid)
                time.sleep(max(0.0, max(t_dense2 + window, t_all + 1.0 + steady) - time.monotonic()))
                result = load.finish()
        finally:
            if load.proc.poll() is None:
                load.proc.kill()
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    t = np.asarray(result["t"][SKIP:])
    lat = np.asarray(result["lat"][SKIP:])
    return {
        "dense2_serving_s": t_dense2 - t_spawn, "all_serving_s": t_all - t_spawn,
        "others_were_loading": others_loading, "errors": result["errors"],
        "while_loading": _phase(t, lat, t_dense2, t_all),
        "first_window": _phase(t, lat, t_dense2, t_dense2 + window),
        "after_ready": _phase(t, lat, t_all + 1.0, t_all + 1.0 + steady),
        "cpu_by_thread_while_loading": _by_thread(threads0, threads1, 1, 1.0 / os.sysconf("SC_CLK_TCK")),
        "faults_by_thread_while_loading": _by_thread(threads0, threads1, 2),
    }


def run_kserve(python: str, window: float) -> dict[str, Any]:
    """The KServe peer's first ``window`` seconds from the moment it answers."""
    load = _Load(python, "triton")
    t_spawn = time.monotonic()
    peer = subprocess.Popen([python, str(HERE / "kserve_peer.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=str(ROOT))
    try:
        line = peer.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("PORT "):
            raise RuntimeError("the KServe peer did not start")
        t_ready = time.monotonic()
        load.go(f"127.0.0.1:{int(line.split()[1])}")
        time.sleep(window)
        result = load.finish()
    finally:
        if load.proc.poll() is None:
            load.proc.kill()
        peer.stdin.close()  # type: ignore[union-attr]
        try:
            peer.wait(30)
        except subprocess.TimeoutExpired:
            peer.kill()
    t = np.asarray(result["t"][SKIP:])
    lat = np.asarray(result["lat"][SKIP:])
    return {"serving_s": t_ready - t_spawn, "errors": result["errors"],
            "first_window": _phase(t, lat, t_ready, t_ready + window)}


def measure(rounds: int = 2, window: float = 10.0, steady: float = 10.0, flags: list[str] | None = None,
            kserve_python: str = "", out_dir: Path = HERE / "out") -> dict[str, Any]:
    """Rounds of gradserve and the KServe peer taking turns; every round is kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {"window_s": window, "steady_s": steady, "flags": flags or [], "gradserve": [],
                         "kserve": []}
    for i in range(rounds):
        r["gradserve"].append(run_gradserve(flags or [], window, steady, out_dir / f"loading-server-{i}.log"))
        if kserve_python:
            try:
                r["kserve"].append(run_kserve(kserve_python, window))
            except Exception as exc:  # noqa: BLE001 - reported; the gradserve rounds stand alone
                r["kserve_error"] = f"{type(exc).__name__}: {exc}"
    return r


def _cell(phase: dict[str, Any]) -> str:
    if not phase.get("n"):
        return "— | — | — | — | 0"
    return (f"{phase['p50_ms']:.2f} | {phase['p99_ms']:.2f} | {phase['p999_ms']:.2f} | {phase['max_ms']:.1f} | "
            f"{phase['n']}")


def report(r: dict[str, Any]) -> list[str]:
    """Markdown lines: one row per round and phase, then the loading window's CPU by thread."""
    lines = [f"dense2 batch-1 gradient, one sequential client, from the moment dense2 says SERVING "
             f"(flags: {' '.join(r['flags']) or 'default'})", "",
             "| server, phase | p50 ms | p99 ms | p99.9 ms | max ms | requests |", "|---|---|---|---|---|---|"]
    for i, g in enumerate(r["gradserve"]):
        lines += [f"| gradserve #{i + 1}, while cnn/multi load ({g['all_serving_s'] - g['dense2_serving_s']:.1f} s) | "
                  f"{_cell(g['while_loading'])} |",
                  f"| gradserve #{i + 1}, first {r['window_s']:.0f} s | {_cell(g['first_window'])} |",
                  f"| gradserve #{i + 1}, after all READY | {_cell(g['after_ready'])} |"]
    for i, k in enumerate(r["kserve"]):
        lines.append(f"| KServe #{i + 1}, first {r['window_s']:.0f} s | {_cell(k['first_window'])} |")
    if "kserve_error" in r:
        lines.append(f"KServe peer: {r['kserve_error']}")
    ks = [k["first_window"]["p99_ms"] for k in r["kserve"] if k["first_window"].get("n")]
    gs = [g["first_window"]["p99_ms"] for g in r["gradserve"] if g["first_window"].get("n")]
    if ks and gs:
        lines += ["", f"first {r['window_s']:.0f} s p99, gradserve / KServe: {np.median(gs) / np.median(ks):.2f} "
                  f"(median of rounds; target <= 1.5)"]
    for i, g in enumerate(r["gradserve"]):
        cpu = g["cpu_by_thread_while_loading"]
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(cpu.items())[:8])
        faults = ", ".join(f"{k} {v:.0f}" for k, v in list(g["faults_by_thread_while_loading"].items())[:4])
        lines.append(f"round {i + 1}: dense2 SERVING at {g['dense2_serving_s']:.1f} s, all at "
                     f"{g['all_serving_s']:.1f} s; server CPU s while loading by thread: {top}; "
                     f"minor page faults: {faults}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=["sdk", "triton"], help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=10.0, help="seconds from dense2's SERVING (default 10)")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds measured after all are READY")
    parser.add_argument("--flags", default="", help="extra `gradserve serve` flags, one string")
    parser.add_argument("--kserve-python", default=os.environ.get("KSERVE_PYTHON", _python_with_kserve()),
                        metavar="PYTHON", help="a Python with kserve and tritonclient ('': no KServe peer)")
    parser.add_argument("--out", default=str(HERE / "out"))
    args = parser.parse_args()
    if args.client:
        _client(args.client)
        return 0
    r = measure(args.rounds, args.window, args.steady, shlex.split(args.flags), args.kserve_python, Path(args.out))
    print("\n".join(report(r)))
    Path(args.out, "loading.json").write_text(json.dumps(r, indent=1))
    return 0


def _python_with_kserve() -> str:
    import importlib.util

    return sys.executable if importlib.util.find_spec("kserve") is not None else ""


if __name__ == "__main__":
    sys.exit(main())
