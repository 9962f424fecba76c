"""Global sensitivity analysis in the SDK: request building, the progress stream, result decoding.

The server samples the inputs, evaluates the model and computes the indices; the SDK sends the
problem and reads back ``Progress`` messages and one ``AnalyzeResult``. ``Client`` and
``AsyncClient`` get ``sobol``, ``dgsm`` and ``morris`` from the two mixins at the end, which
differ only in I/O.

A problem is given one of two ways:

- ``bounds``: a list of ``(low, high)`` per element of the model's single input (shaped
  ``(batch, d)``: one pair per feature), or a dict of such lists by input name for a model with
  several inputs. Every factor is uniform.
- ``problem``: a SALib problem dict, ``{"names": [...], "bounds": [...], "dists": [...]}``
  (``dists`` optional, "unif" by default; "norm" and "lognorm" take ``[mean, std]``, "triang"
  ``[low, high, peak]`` with the peak as a fraction of the range). The factors fill the single
  input's elements in order; for several inputs add ``"inputs": [...]``, the input of each
  factor (each input's factors then fill its elements in order).
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import grpc
import numpy as np

from gradserve import _names
from gradserve._exceptions import Internal, InvalidArgument, from_grpc_error
from gradserve.v1 import global_sensitivity_service_pb2 as _pb2

__all__ = ["SensitivityResult", "Bounds", "Metadata", "ProgressCallback", "ANALYZE_PATH", "build_request",
           "decode_result", "GlobalSensitivityMethods", "AsyncGlobalSensitivityMethods"]

#: Bounds of a single input (one ``(low, high)`` per element), or of several by input name.
Bounds = Sequence[Sequence[float]] | Mapping[str, Sequence[Sequence[float]]]
#: Called with (evaluations done, evaluations in all) as the server reports progress.
ProgressCallback = Callable[[int, int], None]
#: Path of the server-streaming Analyze method.
ANALYZE_PATH = "/gradserve.v1.GlobalSensitivityService/Analyze"

_METHODS = _names.ANALYSES
_DISTS = _names.DISTRIBUTIONS
#: Per-factor keys of each method, in display order, and the interval of each value.
_COLUMNS = {"sobol": ("S1", "S1_conf", "ST", "ST_conf"), "dgsm": ("vi", "vi_std", "dgsm", "dgsm_conf"),
            "morris": ("mu", "mu_star", "sigma", "mu_star_conf")}


class SensitivityResult(Mapping[str, Any]):
    """Indices of one analysis, under SALib's key names.

    Sobol': ``S1``, ``S1_conf``, ``ST``, ``ST_conf`` (and ``S2``, ``S2_conf``: D x D, NaN
    outside j < k); DGSM: ``vi``, ``vi_std``, ``dgsm``, ``dgsm_conf``; Morris: ``mu``,
    ``mu_star``, ``sigma``, ``mu_star_conf``. Each is a float64 array with one value per factor;
    ``*_conf`` are half-widths of bootstrap confidence intervals. Also ``names`` (the factors)
    and ``evaluations`` (model evaluations the server made).
    """

    def __init__(self, method: str, values: dict[str, Any], *, model: str = "", version: int = 0,
                 output_mean: float = math.nan, output_variance: float = math.nan) -> None:
        self.method = method
        self._values = values
        self.model = model
        self.version = version
        self.output_mean = output_mean
        self.output_variance = output_variance

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def names(self) -> list[str]:
        return list(self._values["names"])

    @property
    def evaluations(self) -> int:
        return int(self._values["evaluations"])

    def to_frame(self) -> Any:
        """The per-factor values as a pandas DataFrame indexed by factor name (needs pandas)."""
        try:
            pd = importlib.import_module("pandas")  # optional; untyped
        except ImportError:
            raise ImportError("to_frame needs pandas (pip install pandas); table() needs nothing") from None
        return pd.DataFrame({k: self._values[k] for k in _COLUMNS[self.method]}, index=self.names)

    def table(self) -> str:
        """The per-factor values as a plain-text table, each with its interval (``±``)."""
        shown = {"sobol": ("S1", "ST"), "dgsm": ("vi", "dgsm"), "morris": ("mu", "mu_star", "sigma")}[self.method]
        width = max([len(n) for n in self.names] + [6])
        lines = [f"{'factor':<{width}}" + "".join(f"{c:>24}" for c in shown)]
        for i, name in enumerate(self.names):
            cells = []
            for c in shown:
                spread = self._values.get("vi_std" if c == "vi" else c + "_conf")
                cell = f"{float(self._values[c][i]):.4g}"
                if spread is not None:
                    cell += f" ± {float(spread[i]):<8.2g}"
                cells.append(f"{cell:>24}")
            lines.append(f"{name:<{width}}" + "".join(cells))
        spread = "vi ± its standard deviation over the samples; dgsm ± " if self.method == "dgsm" else "± "
        lines.append(f"({self.method}, {self.evaluations} model evaluations; {spread}confidence half-width)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"SensitivityResult(method={self.method!r}, names={self.names!r}, evaluations={self.evaluations})"


def _pairs(rows: Any, field: str) -> list[list[float]]:
    try:
        out = [[float(v) for v in row] for row in rows]
    except (TypeError, ValueError):
        raise InvalidArgument(f"{field}: expected a list of (low, high) pairs of numbers") from None
    if not out:
        raise InvalidArgument(f"{field}: no factors")
    return out


def _factors(bounds: Bounds | None, problem: Mapping[str, Any] | None) -> list[_pb2.Factor]:
    if (bounds is None) == (problem is None):
        raise InvalidArgument("bounds, problem: give exactly one of them")
    factors: list[_pb2.Factor] = []
    if bounds is not None:
        groups = bounds.items() if isinstance(bounds, Mapping) else [("", bounds)]
        for name, rows in groups:
            for i, pair in enumerate(_pairs(rows, f"bounds[{name!r}]" if name else "bounds")):
                if len(pair) != 2:
                    raise InvalidArgument(f"bounds: factor {i} has {len(pair)} values; expected (low, high)")
                factors.append(_pb2.Factor(input=name, index=i, distribution=_pb2.DISTRIBUTION_UNIFORM, params=pair))
        return factors
    assert problem is not None
    params = _pairs(problem.get("bounds", ()), "problem['bounds']")
    d = len(params)
    names = list(problem.get("names") or [""] * d)
    dists = list(problem.get("dists") or ["unif"] * d)
    inputs = list(problem.get("inputs") or [""] * d)
    if not len(names) == len(dists) == len(inputs) == d or problem.get("num_vars", d) != d:
        raise InvalidArgument(f"problem: names, bounds, dists and inputs must have one entry per factor ({d})")
    seen: dict[str, int] = {}
    for name, dist, inp, p in zip(names, dists, inputs, params):
        if dist not in _DISTS:
            raise InvalidArgument(f"problem['dists']: {dist!r} is not one of {sorted(_DISTS)}")
        index = seen.get(inp, 0)
        seen[inp] = index + 1
        factors.append(_pb2.Factor(name=str(name), input=str(inp), index=index, distribution=_DISTS[dist],  # type: ignore[arg-type]
                                   params=p))
    return factors


def build_request(model: str, method: str, *, bounds: Bounds | None = None, problem: Mapping[str, Any] | None = None,
                  samples: int, seed: int | None = None, conf_level: float = 0.95, resamples: int = 100,
                  second_order: bool = False, levels: int = 4, output: str | int | None = None,
                  target: int | None = None, version: int = 0, request_id: str = "") -> _pb2.AnalyzeRequest:
    """The AnalyzeRequest of one analysis (see the module docstring for ``bounds`` and ``problem``)."""
    if method not in _METHODS:
        raise InvalidArgument(f"method: {method!r} is not one of {sorted(_METHODS)}")
    if isinstance(target, (bool, np.bool_)) or (target is not None and not isinstance(target, (int, np.integer))):
        raise InvalidArgument(f"target: {target!r}; global analyses take None (the sum of the output) or one int "
                              "(an element of the output's last axis)")
    req = _pb2.AnalyzeRequest(model=model, version=version, method=_METHODS[method],  # type: ignore[arg-type]
                              factors=_factors(bounds, problem),
                              samples=int(samples), conf_level=conf_level, resamples=resamples,
                              request_id=request_id)
    if isinstance(output, str):
        req.output_name = output
    elif output is not None:
        req.output_index = int(output)
    if target is not None:
        req.output_element = int(target)
    if seed is not None:
        if seed < 0:
            raise InvalidArgument(f"seed: {seed} must be non-negative")
        req.seed = int(seed)
    req.sobol.second_order = second_order
    req.morris.levels = levels
    return req


def decode_result(result: _pb2.AnalyzeResult) -> SensitivityResult:
    """A SensitivityResult from the last message of the Analyze stream."""
    which = result.WhichOneof("indices")
    values: dict[str, Any] = {"names": list(result.names), "evaluations": int(result.evaluations)}
    d = len(result.names)
    if which == "sobol":
        s = result.sobol
        values.update(S1=np.array(s.s1), S1_conf=np.array(s.s1_conf), ST=np.array(s.st), ST_conf=np.array(s.st_conf))
        if len(s.s2):
            values.update(S2=np.array(s.s2).reshape(d, d), S2_conf=np.array(s.s2_conf).reshape(d, d))
    elif which in ("dgsm", "morris"):
        part = getattr(result, which)
        values.update({k: np.array(getattr(part, k)) for k in _COLUMNS[which]})
    else:
        raise Internal("Analyze: the result holds no indices")
    return SensitivityResult(which, values, model=result.model, version=int(result.version),
                             output_mean=result.output_mean, output_variance=result.output_variance)


def _result_of(response: _pb2.AnalyzeResponse, progress: ProgressCallback | None) -> SensitivityResult | None:
    if response.HasField("progress"):
        if progress is not None:
            progress(int(response.progress.evaluations_done), int(response.progress.evaluations_total))
        return None
    return decode_result(response.result) if response.HasField("result") else None


def _no_result() -> Exception:
    return Internal("Analyze: the stream ended without a result")


_SERIALIZE = _pb2.AnalyzeRequest.SerializeToString
_DESERIALIZE = _pb2.AnalyzeResponse.FromString


#: Call metadata (the bearer token), as the clients keep it.
Metadata = Sequence[tuple[str, str]] | None


class _Methods:
    """What the two mixins share; ``_analyze`` (the I/O) is each one's own. The client provides
    ``_timeout_for`` (its default timeout) and ``_gsa_transport`` (its channel and metadata)."""

    def _timeout_for(self, timeout: float | None) -> float | None:
        raise NotImplementedError


class GlobalSensitivityMethods(_Methods):
    """``sobol``, ``dgsm`` and ``morris`` for the blocking ``Client``.

    Common parameters: ``bounds`` or ``problem`` (see ``gradserve._gsa``); ``output`` and
    ``target`` pick the analysed value per example (the head by name or position, and of it the
    sum, ``target=None``, or the element ``target`` of its last axis); the same ``seed`` gives
    the same answer (``None``: fresh samples); ``conf_level`` and ``resamples`` set the bootstrap
    intervals; ``progress(done, total)`` is called as the server reports evaluations.
    """

    def _gsa_transport(self) -> tuple[grpc.Channel, Metadata]:
        raise NotImplementedError

    def _analyze(self, request: _pb2.AnalyzeRequest, timeout: float | None,
                 progress: ProgressCallback | None) -> SensitivityResult:
        channel, metadata = self._gsa_transport()
        rpc = channel.unary_stream(ANALYZE_PATH, request_serializer=_SERIALIZE, response_deserializer=_DESERIALIZE)
        call = rpc(request, timeout=self._timeout_for(timeout), metadata=metadata or None)
        try:
            for response in call:
                result = _result_of(response, progress)
                if result is not None:
                    return result
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            call.cancel()  # a no-op once the stream is done; stops the server's work otherwise
        raise _no_result()

    def sobol(self, model: str, bounds: Bounds | None = None, problem: Mapping[str, Any] | None = None, *,
              samples: int = 1024, second_order: bool = False, seed: int | None = None, conf_level: float = 0.95,
              resamples: int = 100, output: str | int | None = None, target: int | None = None, version: int = 0,
              timeout: float | None = None, progress: ProgressCallback | None = None) -> SensitivityResult:
        """First-order and total Sobol' indices (``S1``, ``ST``; ``S2`` with ``second_order``)
        with bootstrap intervals, from Saltelli's sampling of ``samples`` base points (a power of
        2 is best): ``samples * (D + 2)`` model evaluations, ``samples * (2D + 2)`` with S2."""
        req = build_request(model, "sobol", bounds=bounds, problem=problem, samples=samples, seed=seed,
                            conf_level=conf_level, resamples=resamples, second_order=second_order,
                            output=output, target=target, version=version)
        return self._analyze(req, timeout, progress)

    def dgsm(self, model: str, bounds: Bounds | None = None, problem: Mapping[str, Any] | None = None, *,
             samples: int = 1024, seed: int | None = None, conf_level: float = 0.95, resamples: int = 100,
             output: str | int | None = None, target: int | None = None, version: int = 0,
             timeout: float | None = None, progress: ProgressCallback | None = None) -> SensitivityResult:
        """Derivative-based measures from exact gradients at ``samples`` quasi-random points
        (``samples`` gradient evaluations): ``vi`` = E[(df/dx_i)^2], ``vi_std``, and ``dgsm`` =
        vi (high - low)^2 / (pi^2 Var f), an upper bound of the total index, with its interval."""
        req = build_request(model, "dgsm", bounds=bounds, problem=problem, samples=samples, seed=seed,
                            conf_level=conf_level, resamples=resamples, output=output, target=target,
                            version=version)
        return self._analyze(req, timeout, progress)

    def morris(self, model: str, bounds: Bounds | None = None, problem: Mapping[str, Any] | None = None, *,
               trajectories: int = 16, levels: int = 4, seed: int | None = None, conf_level: float = 0.95,
               resamples: int = 100, output: str | int | None = None, target: int | None = None,
               version: int = 0, timeout: float | None = None,
               progress: ProgressCallback | None = None) -> SensitivityResult:
        """Morris elementary effects along ``trajectories`` trajectories on a ``levels``-level
        grid (``trajectories * (D + 1)`` evaluations): ``mu``, ``mu_star``, ``sigma``, ``mu_star_conf``."""
        req = build_request(model, "morris", bounds=bounds, problem=problem, samples=trajectories, seed=seed,
                            conf_level=conf_level, resamples=resamples, levels=levels, output=output,
                            target=target, version=version)
        return self._analyze(req, timeout, progress)


class AsyncGlobalSensitivityMethods(_Methods):
    """``sobol``, ``dgsm`` and ``morris`` as coroutines, for ``AsyncClient`` (parameters as in
    ``GlobalSensitivityMethods``)."""

    def _gsa_transport(self) -> tuple[grpc.aio.Channel, Metadata]:
        raise NotImplementedError

    async def _analyze(self, request: _pb2.AnalyzeRequest, timeout: float | None,
                       progress: ProgressCallback | None) -> SensitivityResult:
        channel, metadata = self._gsa_transport()
        rpc = channel.unary_stream(ANALYZE_PATH, request_serializer=_SERIALIZE, response_deserializer=_DESERIALIZE)
        call = rpc(request, timeout=self._timeout_for(timeout), metadata=metadata or None)
        try:
            async for response in call:
                result = _result_of(response, progress)
                if result is not None:
                    return result
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            call.cancel()
        raise _no_result()

    async def sobol(self, model: str, bounds: Bounds | None = None, problem: Mapping[str, Any] | None = None, *,
                    samples: int = 1024, second_order: bool = False, seed: int | None = None,
                    conf_level: float = 0.95, resamples: int = 100, output: str | int | None = None,
                    target: int | None = None, version: int = 0, timeout: float | None = None,
                    progress: ProgressCallback | None = None) -> SensitivityResult:
        """Sobol' indices; see ``Client.sobol``."""
        req = build_request(model, "sobol", bounds=bounds, problem=problem, samples=samples, seed=seed,
                            conf_level=conf_level, resamples=resamples, second_order=second_order,
                            output=output, target=target, version=version)
        return await self._analyze(req, timeout, progress)

    async def dgsm(self, model: str, bounds: Bounds | None = None, problem: Mapping[str, Any] | None = None, *,
                   samples: int = 1024, seed: int | None = None, conf_level: float = 0.95, resamples: int = 100,
                   output: str | int | None = None, target: int | None = None, version: int = 0,
                   timeout: float | None = None, progress: ProgressCallback | None = None) -> SensitivityResult:
        """Derivative-based measures from exact gradients; see ``Client.dgsm``."""
        req = build_request(model, "dgsm", bounds=bounds, problem=problem, samples=samples, seed=seed,
                            conf_level=conf_level, resamples=resamples, output=output, target=target,
                            version=version)
        return await self._analyze(req, timeout, progress)

    async def morris(self, model: str, bounds: Bounds | None = None, problem: Mapping[str, Any] | None = None, *,
                     trajectories: int = 16, levels: int = 4, seed: int | None = None, conf_level: float = 0.95,
                     resamples: int = 100, output: str | int | None = None, target: int | None = None,
                     version: int = 0, timeout: float | None = None,
                     progress: ProgressCallback | None = None) -> SensitivityResult:
        """Morris elementary effects; see ``Client.morris``."""
        req = build_request(model, "morris", bounds=bounds, problem=problem, samples=trajectories, seed=seed,
                            conf_level=conf_level, resamples=resamples, levels=levels, output=output,
                            target=target, version=version)
        return await self._analyze(req, timeout, progress)
