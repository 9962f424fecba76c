"""Shapley values and partial dependence: gradserve against shap and scikit-learn calling the same
Keras model in this process.

``python bench/explain.py [--rows 4] [--background 20] [--superpixels 10] [--repeats 3]``:

1. Kernel SHAP of the demo ``cnn`` (16x16x1 images, 10 classes; its class-3 probability) with the
   image cut into ``--superpixels`` bands, every coalition enumerated (2^M - 2, the same coalitions
   for both): ``Client.shap(method="kernel", features=labels)`` against a ``gradserve serve``
   process, and ``shap.KernelExplainer`` on the same background (``DenseData`` groups, ``l1_reg=False``)
   calling the model in this process through Keras ``model.predict`` and through a compiled
   ``tf.function``. Both answer the same values (the largest difference is printed).
2. Partial dependence of the same output over pixel features on the same grid (scikit-learn's,
   from the same rows): ``Client.partial_dependence`` against ``sklearn.inspection.partial_dependence``
   with the model wrapped as a regressor (``model.predict`` and the compiled function).

The server runs in its own process with its defaults (the engine picks its backend per function);
the in-process model runs on the same 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np

#: The class whose probability is explained.
CLASS = 3
#: Rows per in-process model call.
BATCH = 4096


def bands(count: int) -> np.ndarray:
    """A 16x16 label map of ``count`` superpixels: two rows of ``count // 2`` vertical bands."""
    per_row = count // 2
    rows = np.arange(16)[:, None] // 8
    cols = np.minimum(np.arange(16)[None, :] * per_row // 16, per_row - 1)
    return (rows * per_row + cols).astype(np.int32)


def start_server(flags: list[str]) -> tuple[Any, str]:
    """``gradserve serve`` on the demo models with ``flags``, in its own process; returns it and its address."""
    import socket
    import subprocess

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gradserve", "serve", "--port", str(port), "--log-level",
                             "WARNING", *flags], stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(900):
            if proc.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service="cnn"), timeout=1).status == 1:
                    return proc, address
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` runs after one warm-up run, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


class Regressor:
    """An in-process model function as a scikit-learn regressor."""

    _estimator_type = "regressor"

    def __init__(self, f: Callable[[np.ndarray], np.ndarray]) -> None:
        self.f = f

    def fit(self, x: Any, y: Any = None) -> "Regressor":
        self.fitted_ = True
        return self

    def predict(self, x: Any) -> np.ndarray:
        return self.f(np.asarray(x))

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type="regressor", target_tags=TargetTags(required=True))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4, help="images explained (default 4)")
    parser.add_argument("--background", type=int, default=20, help="background images (default 20)")
    parser.add_argument("--superpixels", type=int, default=10, help="features M, even (default 10)")
    parser.add_argument("--pdp-rows", type=int, default=200, help="rows of the partial dependence (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--only-gradserve", action="store_true", help="time gradserve alone (tuning the server)")
    parser.add_argument("server_flags", nargs="*", help="flags for gradserve serve, after --, e.g. -- --max-bucket 256")
    args = parser.parse_args()

    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import shap
        from shap.utils._legacy import DenseData
    from sklearn.inspection import partial_dependence

    import gradserve
    from gradserve.server.models.demo import build_cnn

    model = build_cnn()
    compiled = tf.function(lambda x: model(x, training=False))

    def by_predict(z: np.ndarray) -> np.ndarray:
        y = model.predict(np.asarray(z, np.float32).reshape(-1, 16, 16, 1), batch_size=BATCH, verbose=0)
        return np.asarray(y[:, CLASS], np.float64)

    def by_function(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float32).reshape(-1, 16, 16, 1)
        return np.concatenate([compiled(tf.constant(z[i:i + BATCH])).numpy()[:, CLASS]
                               for i in range(0, len(z), BATCH)]).astype(np.float64)

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.rows, 16, 16, 1)).astype(np.float32)
    background = rng.uniform(size=(args.background, 16, 16, 1)).astype(np.float32)
    m = args.superpixels
    labels = bands(m)
    coalitions = 2 ** m - 2
    evaluations = args.rows * coalitions * args.background
    proc, address = start_server(args.server_flags)
    try:
        with gradserve.Client(address, timeout=600) as c:
            print(f"Kernel SHAP of cnn (class {CLASS}), {args.rows} images, {m} superpixels, {args.background} "
                  f"background images: {coalitions} coalitions each, {evaluations:,} model evaluations "
                  f"(best of {args.repeats})")

            def ours() -> np.ndarray:
                return np.asarray(c.shap("cnn", x, background=background, features=labels, samples=coalitions,
                                         target=CLASS))

            def theirs(f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
                groups = [np.flatnonzero(labels.reshape(-1) == g) for g in range(m)]
                data = DenseData(background.reshape(len(background), -1).astype(np.float64),
                                 [f"s{g}" for g in range(m)], groups)
                explainer = shap.KernelExplainer(f, data)
                return np.asarray(explainer.shap_values(x.reshape(len(x), -1).astype(np.float64),
                                                        nsamples=coalitions, l1_reg=False, silent=True))

            rows = {"gradserve (Client.shap)": best(ours, args.repeats)}
            if not args.only_gradserve:
                rows.update({"shap + model.predict": best(lambda: theirs(by_predict), args.repeats),
                             "shap + compiled tf.function": best(lambda: theirs(by_function), args.repeats)})
            report(rows, evaluations, "values")

            features = [(0, 100), (1, 119), (2, 136)]
            pdp_x = rng.uniform(size=(args.pdp_rows, 16, 16, 1)).astype(np.float32)
            flat = pdp_x.reshape(len(pdp_x), -1).astype(np.float64)
            pdp_evals = args.pdp_rows * 20 * len(features)
            print(f"\nPartial dependence of cnn (class {CLASS}) over pixels {[f for _, f in features]}, "
                  f"{args.pdp_rows} rows, 20 grid points each: {pdp_evals:,} model evaluations")

            def ours_pdp() -> np.ndarray:
                return np.stack([c.partial_dependence("cnn", pdp_x, feature=f, target=CLASS)["individual"]
                                 for _, f in features])

            def theirs_pdp(f: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
                estimator = Regressor(f).fit(flat)
                return np.stack([partial_dependence(estimator, flat, [j], kind="individual",
                                                    grid_resolution=20)["individual"][0] for _, j in features])

            rows = {"gradserve (Client.partial_dependence)": best(ours_pdp, args.repeats)}
            if not args.only_gradserve:
                rows.update({"scikit-learn + model.predict": best(lambda: theirs_pdp(by_predict), args.repeats),
                             "scikit-learn + compiled tf.function": best(lambda: theirs_pdp(by_function),
                                                                         args.repeats)})
            report(rows, pdp_evals, "ICE curves")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


def report(rows: dict[str, tuple[float, np.ndarray]], evaluations: int, what: str) -> None:
    reference = next(iter(rows.values()))
    print(f"  {'':40s} {'time':>9s} {'evaluations/s':>14s} {'time / gradserve':>17s}  {what}: max |difference|")
    for name, (seconds, values) in rows.items():
        diff = float(np.max(np.abs(values - reference[1])))
        print(f"  {name:40s} {seconds:8.3f}s {evaluations / seconds:14,.0f} {seconds / reference[0]:16.1f}x"
              f"  {diff:.2e}")


if __name__ == "__main__":
    sys.exit(main())
