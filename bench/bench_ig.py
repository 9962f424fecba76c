"""Cost of integrated gradients per path point, relative to one gradient call at the same effective batch.

Integrated gradients with ``steps`` points on a batch of ``B`` examples differentiates the model
at ``B * steps`` points. The fair yardstick is one compiled gradient call on a batch of
``B * steps`` examples: the ratio ``time(IG) / time(gradient of B * steps rows)`` is the overhead of
IG's path construction, chunk loop, forward pass at the input and final product. Both are timed
side by side in one run (interleaved repetitions, median), on the compiled engine, no sockets.

Run: ``python bench/bench_ig.py`` (``--help`` for sizes). Prints one line per case and the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _models() -> dict[str, Callable[[], Any]]:
    import keras

    from gradserve.server.models.demo import build_cnn

    def mlp() -> Any:
        keras.utils.set_random_seed(0)
        x = keras.Input((64,), name="x")
        h = keras.layers.Dense(256, activation="tanh")(x)
        h = keras.layers.Dense(256, activation="tanh")(h)
        return keras.Model(x, keras.layers.Dense(10, name="y")(h))

    return {"cnn": build_cnn, "mlp": mlp}


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, build: Callable[[], Any], batch: int, steps: int, repeats: int,
          chunk_elements: int | None, kind: str) -> float:
    """Time ratio IG(batch, steps) / gradient(batch * steps) for one model (best of ``repeats``)."""
    from gradserve.server.compute import methods
    from gradserve.server.compute.engine import CompiledModel
    from gradserve.server.config import EngineConfig, Limits
    from gradserve.server.core.spec import ComputeSpec, IntegratedGradientsOptions, TargetSpec
    from gradserve.server.models.modelfn import from_keras

    model = from_keras(build())
    rows = batch * steps
    engine = CompiledModel(model, EngineConfig(buckets=(batch, rows), warmup=False, xla="off"))
    spec_in = model.inputs[0]
    shape = tuple(d or 1 for d in spec_in.shape[1:])
    rng = np.random.default_rng(0)
    x_ig = rng.standard_normal((batch,) + shape).astype(spec_in.dtype)
    x_grad = rng.standard_normal((rows,) + shape).astype(spec_in.dtype)
    target = TargetSpec(model.outputs[0].name, kind)
    limits = Limits() if chunk_elements is None else Limits(chunk_elements=chunk_elements)
    grad_call = methods.get("gradient").plan(
        ComputeSpec(name, 1, "gradient", {spec_in.name: x_grad}, rows, target, (spec_in.name,)), model, limits)
    ig_call = methods.get("integrated_gradients").plan(
        ComputeSpec(name, 1, "integrated_gradients", {spec_in.name: x_ig}, batch, target, (spec_in.name,),
                    options=IntegratedGradientsOptions(steps=steps)), model, limits)
    for _ in range(3):  # trace, then let the allocator and thread pools settle
        engine.run(grad_call)
        engine.run(ig_call)
    t_grad, t_ig = [], []
    for _ in range(repeats):  # interleaved, so that machine noise hits both alike
        t_grad.append(_time(lambda: engine.run(grad_call)))
        t_ig.append(_time(lambda: engine.run(ig_call)))
    # Best of the repeats: on a shared machine the minimum is the least disturbed measurement;
    # the median ratio is printed as well.
    g, i = min(t_grad), min(t_ig)
    median = statistics.median(t_ig) / statistics.median(t_grad)
    chunks = ig_call.shared["alphas"].shape[0]
    print(f"{name:4s} target={kind:6s} batch={batch:3d} steps={steps:3d} chunks={chunks:2d}  "
          f"gradient({rows} rows) {g * 1e3:7.2f} ms  IG {i * 1e3:7.2f} ms  per path point {i / rows * 1e6:6.2f} us"
          f"  ratio {i / g:5.3f} (median {median:5.3f})")
    return i / g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--target", default="argmax", choices=["argmax", "sum"],
                        help="argmax costs IG one extra forward pass at the input, to fix the class")
    args = parser.parse_args()
    builders = _models()
    ratios = []
    for name in args.models.split(","):
        ratios.append(bench(name, builders[name], args.batch, args.steps, args.repeats, None, args.target))
    # Chunked: about a fifth of the path per chunk, as with a small --chunk-elements.
    name = args.models.split(",")[0]
    per_row = int(np.prod([d or 1 for d in _shape_of(builders[name])]))
    bench(name, builders[name], args.batch, args.steps, args.repeats, per_row * args.batch * (args.steps // 5),
          args.target)
    print(f"IG cost per path point / gradient cost per row (unchunked, worst model): {max(ratios):.3f}x")


def _shape_of(build: Callable[[], Any]) -> tuple[int, ...]:
    return tuple(build().inputs[0].shape[1:])


if __name__ == "__main__":
    main()
