"""Global sensitivity analysis: gradserve against SALib driving the same model in-process.

``python bench/gsa.py [--samples 16384] [--repeats 3]`` (about a minute on 2 cores):

1. A Sobol' analysis of the Ishigami function (first and total indices, ``N * (D + 2)`` model
   evaluations): model evaluations per second end to end (sampling, evaluations, analysis) and
   of the evaluations alone, for ``Client.sobol`` against a ``gradserve serve`` process (its
   evaluations timed by the progress reports) and for SALib in this process with the same model
   called through Keras ``model.predict`` and through a compiled ``tf.function`` (the
   SavedModel's serving signature, on batches of 4096 rows).
2. DGSM: our ``vi`` from exact gradients against SALib's finite-difference DGSM
   (``finite_diff.sample`` with its default relative step of 1% + ``dgsm.analyze``, the model
   through the compiled function) at equal model evaluations: the largest relative error of
   ``vi`` against the closed form, and the wall time. SALib's finite-difference points are an
   unscrambled Sobol' sequence (its seed changes nothing); ours are averaged over seeds.

The server runs in its own process (its own GIL) with ``--xla off``, as the in-process runs do.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np

A, B = 7.0, 0.1
BOUNDS = [(-math.pi, math.pi)] * 3
PROBLEM = {"num_vars": 3, "names": ["x1", "x2", "x3"], "bounds": [list(b) for b in BOUNDS]}
EXACT_VI = np.array([0.5 * (1 + 2 * B * math.pi**4 / 5 + B**2 * math.pi**8 / 9), A**2 / 2,
                     8 * B**2 * math.pi**6 / 7])
#: Rows per in-process model call (the server's engine runs up to 1024 rows per call).
BATCH = 4096


def ishigami_tf(x: Any) -> Any:
    import tensorflow as tf

    return tf.sin(x[:, 0:1]) + A * tf.sin(x[:, 1:2]) ** 2 + B * x[:, 2:3] ** 4 * tf.sin(x[:, 0:1])


def save_model(root: str) -> str:
    """The Ishigami function as a SavedModel (what the server loads); returns its path."""
    import tensorflow as tf

    module = tf.Module()
    module.f = tf.function(lambda x: {"y": ishigami_tf(x)},
                           input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    path = os.path.join(root, "ishigami")
    tf.saved_model.save(module, path, signatures={"serving_default": module.f})
    return path


def keras_model() -> Any:
    """The same function as a Keras model, for ``model.predict``."""
    import keras

    class Ishigami(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return ishigami_tf(x)

    x = keras.Input((3,), name="x")
    return keras.Model(x, Ishigami()(x))


def start_server(path: str) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    import socket

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--model", f"ishigami={path}",
                             "--port", str(port), "--xla", "off", "--log-level", "WARNING"],
                            stderr=subprocess.DEVNULL)  # TensorFlow's C++ logs
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(900):
            if proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return proc, address
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def best(fn: Callable[[], tuple[Any, float]], repeats: int) -> tuple[float, float, Any]:
    """Best wall time of ``repeats`` runs (after one warm-up run), the best time of the model
    evaluations alone, and the last result; ``fn`` returns (result, evaluation seconds)."""
    fn()
    times, evaluation = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out, seconds = fn()
        times.append(time.perf_counter() - start)
        evaluation.append(seconds)
    return min(times), min(evaluation), out


def salib_sobol(evaluate: Callable[[np.ndarray], np.ndarray], n: int, seed: int) -> tuple[Any, float]:
    from SALib.analyze import sobol as analyze
    from SALib.sample import sobol as sample

    x = sample.sample(PROBLEM, n, calc_second_order=False, seed=seed)
    start = time.perf_counter()
    y = evaluate(x)
    seconds = time.perf_counter() - start
    return analyze.analyze(PROBLEM, y, calc_second_order=False, seed=seed + 1), seconds


def gradserve_sobol(c: Any, n: int, seed: int) -> tuple[Any, float]:
    """``Client.sobol``; the evaluations are timed from the progress reports: the first comes
    before the first chunk, the last after the last one."""
    seen: list[float] = []
    result = c.sobol("ishigami", BOUNDS, samples=n, seed=seed, progress=lambda done, total: seen.append(
        time.perf_counter()))
    return result, seen[-1] - seen[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=16384, help="Sobol' base samples N (default 16384)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--seeds", type=int, default=5, help="DGSM seeds (default 5)")
    args = parser.parse_args()

    import tensorflow as tf

    import gradserve

    root = tempfile.mkdtemp()
    path = save_model(root)
    proc, address = start_server(path)
    try:
        serving = tf.saved_model.load(path).signatures["serving_default"]
        model = keras_model()

        def compiled(x: np.ndarray) -> np.ndarray:
            return np.concatenate([serving(x=tf.constant(x[i:i + BATCH], tf.float32))["y"].numpy()[:, 0]
                                   for i in range(0, len(x), BATCH)])

        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict(x.astype(np.float32), batch_size=BATCH, verbose=0))[:, 0]

        n = args.samples
        evals = n * (3 + 2)
        print(f"Sobol' analysis of Ishigami, N={n}: {evals} model evaluations (best of {args.repeats})")
        with gradserve.Client(address, timeout=600) as c:
            rows = {
                "gradserve (Client.sobol)": best(lambda: gradserve_sobol(c, n, 1), args.repeats),
                "SALib + model.predict": best(lambda: salib_sobol(predict, n, 1), args.repeats),
                "SALib + compiled tf.function": best(lambda: salib_sobol(compiled, n, 1), args.repeats),
            }
            print(f"  {'':30s} {'analysis':>9s} {'evaluations/s':>14s} {'evaluations only':>17s}")
            for name, (seconds, evaluating, result) in rows.items():
                print(f"  {name:30s} {seconds:8.3f}s {evals / seconds:14,.0f} {evals / evaluating:17,.0f}  "
                      f"S1 {np.round(result['S1'], 3)}  ST {np.round(result['ST'], 3)}")

            print(f"\nDGSM vi at equal model evaluations, {args.seeds} seeds (exact vi {np.round(EXACT_VI, 3)}):")
            from SALib.analyze import dgsm as fd_analyze
            from SALib.sample import finite_diff

            for total in (4096, 32768):
                ours_err, ours_t = [], []
                c.dgsm("ishigami", BOUNDS, samples=total, seed=99)   # warm-up: first calls of these sizes
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    r = c.dgsm("ishigami", BOUNDS, samples=total, seed=seed)
                    ours_t.append(time.perf_counter() - start)
                    ours_err.append(np.max(np.abs(r["vi"] - EXACT_VI) / EXACT_VI))
                start = time.perf_counter()
                x = finite_diff.sample(PROBLEM, total // 4)
                s = fd_analyze.analyze(PROBLEM, x, compiled(x), seed=1)
                fd_t = time.perf_counter() - start
                fd_err = np.max(np.abs(np.asarray(s["vi"]) - EXACT_VI) / EXACT_VI)
                print(f"  {total:6d} evaluations: gradserve, exact gradients at {total} points: max rel. error "
                      f"{statistics.mean(ours_err):.4f} (mean of {args.seeds} seeds), "
                      f"{statistics.median(ours_t) * 1e3:.0f} ms; SALib, finite differences at {total // 4} "
                      f"points: {fd_err:.4f}, {fd_t * 1e3:.0f} ms")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
