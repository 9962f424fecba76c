"""Our own CPU per request, by stage: the native Compute handler driven without a transport.

    python bench/hotpath.py                 # dense2 batch-1 gradient, about 30 s
    python bench/hotpath.py --model cnn --repeats 80
    python bench/hotpath.py --profile       # also cProfile of the whole handler, top 25

The server's parts are assembled as ``GradServer`` assembles them (repository, runner, data
plane, call envelope with metrics, the native servicer) but nothing is bound: the handler
(``SensitivityServicer.Compute``) is awaited on an event loop with the request bytes and a
stand-in for grpc.aio's context, and its answer is serialized as gRPC would. The stages:

  parse -> envelope -> neutral request -> check -> plan -> run inline -> encode -> metrics

Each stage is timed in place: the whole handler's thread CPU time per call, less the same with
that stage replaced by its cached result (a stage timed alone in a tight loop looked 30-50%
cheaper than amid the rest of a request's work). ``envelope``: opening, describing, admitting
and closing the call, without metrics; ``metrics``: what the server's Prometheus metrics add;
``check`` and ``plan``: what a request of a kind already seen goes through (``checked_batch``,
``rebind``; the full check and plan run once per kind, in the warm-up); ``run inline``:
``ComputeRunner.run_inline`` less the engine call, which is reported apart (the compute floor,
not ours). The variants take turns, ``--repeats`` rounds, best of each, so that other
processes on the machine cost wall-clock time but not the figures; the stages do not add up to
the whole exactly (a stage's cost depends a little on what runs around it). "ours" is the whole
handler less the engine call: the target of issue 19 is ours <= 60 µs for a batch-1 request.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPES = {"dense2": (4,), "cnn": (16, 16, 1)}
INPUT_NAMES = {"dense2": "input", "cnn": "image"}
#: Target of issue 19: our own CPU per batch-1 request, in µs.
TARGET_US = 60.0


class _Context:
    """What the native handler reads of a grpc.aio ServicerContext."""

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout

    def time_remaining(self) -> float | None:
        return self._timeout

    async def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(f"aborted: {code} {message}")


def build(model: str) -> Any:
    """The server's parts around one loaded demo model, as ``GradServer`` wires them."""
    from gradserve.server.config import ServerConfig
    from gradserve.server.models.demo import DEMO_MODELS
    from gradserve.server.process.app import GradServer

    server = GradServer(ServerConfig(port=0))
    server.repository.load(model, 1, f"demo:{model}", DEMO_MODELS[model])
    server._loaded = True
    return server


def request_bytes(model: str, batch: int) -> bytes:
    from gradserve import _codec
    from gradserve.v1 import sensitivity_service_pb2 as pb2

    x = np.random.default_rng(0).random((batch,) + SHAPES[model], dtype=np.float32)
    req = pb2.ComputeRequest(model=model, method=pb2.METHOD_GRADIENT)
    _codec.encode(x, out=req.inputs[INPUT_NAMES[model]])
    return req.SerializeToString()


def _cpu_per_call(loop: asyncio.AbstractEventLoop, make: Callable[[], Any], calls: int) -> float:
    """Thread CPU µs per awaited ``make()``, over ``calls`` calls in one task."""
    async def many() -> None:
        for _ in range(calls):
            await make()

    t0 = time.thread_time()
    loop.run_until_complete(many())
    return (time.thread_time() - t0) / calls * 1e6


class _Patch:
    """Sets attributes for the length of a ``with`` block (a stage replaced by its cached result)."""

    def __init__(self, *changes: tuple[Any, str, Any]) -> None:
        self._changes = changes
        self._saved: list[tuple[Any, str, Any, bool]] = []

    def __enter__(self) -> None:
        for obj, name, value in self._changes:
            own = name in getattr(obj, "__dict__", {})
            self._saved.append((obj, name, getattr(obj, name), own))
            setattr(obj, name, value)

    def __exit__(self, *exc: Any) -> None:
        for obj, name, value, own in reversed(self._saved):
            if own or isinstance(obj, type(sys)):
                setattr(obj, name, value)
            else:
                delattr(obj, name)
        self._saved.clear()


class _NoCall:
    """The call envelope reduced to nothing: what the handler reads of a ``Call``."""

    def __init__(self) -> None:
        from gradserve.server.core.control import CallControl

        self.control = CallControl()
        self.rpc = "Compute"
        self.code = self.message = None

    def describe(self, *args: Any) -> None:
        pass

    def admit(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def run(self, work: Any) -> Any:
        return await work

    def __enter__(self) -> "_NoCall":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _NoEnvelope:
    def __init__(self) -> None:
        self._call = _NoCall()

    def open(self, *args: Any, **kwargs: Any) -> _NoCall:
        return self._call


def measure(model: str = "dense2", batch: int = 1, calls: int = 300, repeats: int = 40,
            profile: bool = False) -> dict[str, Any]:
    """Stage costs measured in place: the whole handler's CPU per call, less the same with one
    stage replaced by its cached result (so each stage is timed amid the rest of the request's
    work, with the caches as a real request finds them; a stage timed alone in a tight loop
    looked 30-50% cheaper). The variants take turns in short loops of ``calls`` calls, ``repeats``
    rounds, and each keeps its best loop: a busy spell of the machine costs a variant a loop, not
    its figure."""
    import dataclasses

    from gradserve.server.dataplane import plane as plane_module
    from gradserve.server.dataplane.validation import check
    from gradserve.server.frontends.native import service as service_module
    from gradserve.server.frontends.native.encoding import compute_response
    from gradserve.server.frontends.native.requests import compute_request
    from gradserve.server.frontends.native.service import SensitivityServicer
    from gradserve.server.ops.calls import CallEnvelope
    from gradserve.v1 import sensitivity_service_pb2 as pb2

    server = build(model)
    plane, limits, runner = server.dataplane, server.config.limits, server.runner
    servicer = SensitivityServicer(plane, server.envelope)
    data = request_bytes(model, batch)
    mv = server.repository.get(model)
    engine = mv.engine
    assert engine is not None
    ctx = _Context(30.0)  # the caller's deadline binds, as the SDK's and the bench's do
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def handler() -> bytes:
        response = await servicer.Compute(data, ctx)  # type: ignore[arg-type]
        return response.SerializeToString()  # grpc's response serializer

    # Warm: every function traced, the call's backend chosen and its cost measured, the inline
    # path taken (the runner learns an engine call's cost on the compute threads first).
    for _ in range(200):
        loop.run_until_complete(handler())
    message = pb2.ComputeRequest.FromString(data)
    request = compute_request(message, limits, len(data))
    method, spec = check(request, mv.model, limits)
    call = method.plan(spec, mv.model, limits)
    flat = engine.run(call)
    result = loop.run_until_complete(plane.compute(request))
    response = compute_response(result, "")
    planned = dataclasses.replace(call)
    batch_size = call.batch_size

    def ran(*args: Any) -> Any:
        return flat

    async def computed(*args: Any) -> Any:
        return result

    metrics_off = CallEnvelope(limits, server.admission, None, server.envelope._hosted)
    variants: dict[str, _Patch] = {
        "whole": _Patch(),
        "parse": _Patch((service_module, "parse", lambda cls, b: message)),
        "envelope": _Patch((servicer, "_envelope", _NoEnvelope())),
        "envelope without metrics": _Patch((servicer, "_envelope", metrics_off)),
        "neutral request": _Patch((service_module, "compute_request", lambda *a, **k: request)),
        "check": _Patch((plane_module, "checked_batch", lambda *a: batch_size)),
        "check and plan": _Patch((plane_module, "checked_batch", lambda *a: batch_size),
                                 (method, "rebind", lambda *a: planned)),
        "runner": _Patch((runner, "run_inline", ran)),
        "engine": _Patch((engine, "run", lambda c: flat)),
        "data plane": _Patch((plane, "compute", computed)),
        "encode": _Patch((service_module, "compute_response", lambda *a: response)),
    }
    inline_before = runner.batcher(mv).stats.submitted
    best = {name: float("inf") for name in variants}
    gc.collect()
    for _ in range(repeats):
        for name, patch in variants.items():
            with patch:
                best[name] = min(best[name], _cpu_per_call(loop, handler, calls))
    inline = runner.batcher(mv).stats.submitted == inline_before
    whole = best["whole"]
    engine_us = whole - best["engine"]
    stages = {
        "parse": whole - best["parse"],
        "envelope": best["envelope without metrics"] - best["envelope"],
        "neutral request": whole - best["neutral request"],
        "check": whole - best["check"],
        "plan": best["check"] - best["check and plan"],
        "run inline": best["engine"] - best["runner"],
        "encode": whole - best["encode"],
        "metrics": whole - best["envelope without metrics"],
    }
    # The rest of the data plane (model lookup, holding the version, splitting the result).
    stages["data plane, other"] = (whole - best["data plane"]) - stages["check"] - stages["plan"] - (
        whole - best["runner"])
    # The rest (coroutines, ids, serializing the answer); negative when the stages, each timed in
    # place, overlap (replacing one stage by its result also spares some work of the next).
    stages["other (coroutines, ids, serialize)"] = whole - engine_us - sum(stages.values())
    out: dict[str, Any] = {"model": model, "batch": batch, "calls": calls, "stages_us": stages,
                           "engine_us": engine_us, "handler_us": whole, "ours_us": whole - engine_us,
                           "inline": inline, "backend": engine.backend_summary()}
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        _cpu_per_call(loop, handler, calls)
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime")
        out["profile"] = stats
    loop.close()
    runner.close()
    return out


def report(r: dict[str, Any]) -> list[str]:
    lines = [f"hot path: {r['model']} batch-{r['batch']} gradient, native Compute handler without a transport "
             f"(thread CPU µs per request, each stage in place; best of {r['calls']}-call loops)"]
    for name, us in r["stages_us"].items():
        note = "   (< 0: the stages overlap; see the docstring)" if us < 0 else ""
        lines.append(f"  {name:<36} {us:8.1f}{note}")
    backends = ", ".join(sorted(set(r["backend"].values())))
    lines.append(f"  {'engine call (not ours)':<36} {r['engine_us']:8.1f}   ({backends})")
    lines.append(f"  {'whole handler':<36} {r['handler_us']:8.1f}   "
                 f"({'inline' if r['inline'] else 'some calls went to the compute threads'})")
    ok = r["ours_us"] <= TARGET_US
    lines.append(f"  [{'ok' if ok else 'MISS'}] ours (handler - engine): {r['ours_us']:.1f} µs "
                 f"(target <= {TARGET_US:.0f})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dense2", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=300, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=40, help="rounds of loops (each variant keeps its best)")
    parser.add_argument("--profile", action="store_true", help="cProfile the whole handler too")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (bench/run.py reads them)")
    args = parser.parse_args()
    r = measure(args.model, args.batch, args.calls, args.repeats, args.profile)
    print("\n".join(report(r)))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in r.items() if k != "profile"}, indent=1))
    if args.profile:
        r["profile"].print_stats(25)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
