"""The GlobalSensitivityService servicer: AnalyzeRequest -> neutral request -> data plane -> stream.

An analysis is a call in the envelope like any other (``ops.calls``: deadline, cancellation,
admission under ``--max-concurrent-calls`` and ``--max-concurrent-analyses``, metrics, logs),
whose deadline is the caller's cut to ``max_deadline_s`` (like a stream: an analysis may
legitimately take long). Its memory is not its request's few bytes but what it will hold while
it runs (outputs, Morris's samples, DGSM's squared gradients, the bootstrap), estimated once the
problem is checked and held against the memory budget (``--max-inflight-request-bytes``) until
it ends: an analysis that does not fit beside the others, or alone, is RESOURCE_EXHAUSTED before
anything is drawn. ``DataPlane.analyze`` does the work; this module only parses the request,
streams the progress it reports and encodes the indices.
"""
from __future__ import annotations

import asyncio
import operator
from typing import Any, AsyncIterator, Callable

import grpc
import numpy as np

from gradserve import _names
from gradserve.server.core.errors import InvalidArgumentError, ResourceExhaustedError
from gradserve.server.core.requests import AnalysisRequest, FactorRequest
from gradserve.server.dataplane import DataPlane
from gradserve.server.dataplane.gsa.analysis import output_moments
from gradserve.server.dataplane.plane import AnalysisResult
from gradserve.server.frontends.rawbytes import parse
from gradserve.server.ops.calls import Call, CallEnvelope
from gradserve.v1 import global_sensitivity_service_pb2 as _pb2

__all__ = ["GlobalSensitivityServicer", "analysis_request", "encode_result"]

PROTOCOL = "native"


def analysis_request(req: _pb2.AnalyzeRequest) -> AnalysisRequest:
    """The neutral request of an AnalyzeRequest (wire enums as names; the data plane checks the rest)."""
    method = _names.ANALYSES.name(req.method)
    if method is None:
        raise InvalidArgumentError(f"method: {req.method} is not an analysis; use sobol, dgsm or morris")
    factors = []
    for i, f in enumerate(req.factors):
        dist = _names.DISTRIBUTIONS.name(f.distribution)
        if dist is None:
            raise InvalidArgumentError(f"factors[{i}].distribution: unknown value {f.distribution}")
        factors.append(FactorRequest(f.input, f.index, f.name, dist, tuple(float(p) for p in f.params)))
    return AnalysisRequest(model=req.model, method=method, factors=tuple(factors), samples=req.samples,
                           version=req.version, output=req.output_name or req.output_index,
                           output_element=int(req.output_element) if req.HasField("output_element") else None,
                           seed=int(req.seed) if req.HasField("seed") else None, conf_level=req.conf_level,
                           resamples=req.resamples, second_order=req.sobol.second_order, levels=req.morris.levels,
                           request_id=req.request_id)


def encode_result(result: AnalysisResult, request_id: str) -> _pb2.AnalyzeResult:
    """Pack the indices into an AnalyzeResult."""
    analysis, indices, y = result.analysis, result.indices, result.outputs
    mean, variance = output_moments(y)
    out = _pb2.AnalyzeResult(model=result.model, version=result.version, request_id=request_id, names=analysis.names,
                             evaluations=analysis.evaluations, output_mean=mean, output_variance=variance)

    def values(key: str) -> list[float]:
        return [float(v) for v in np.ravel(indices[key])]

    if analysis.method == "sobol":
        out.sobol.s1.extend(values("S1"))
        out.sobol.s1_conf.extend(values("S1_conf"))
        out.sobol.st.extend(values("ST"))
        out.sobol.st_conf.extend(values("ST_conf"))
        if analysis.second_order:
            out.sobol.s2.extend(values("S2"))
            out.sobol.s2_conf.extend(values("S2_conf"))
    elif analysis.method == "dgsm":
        for key in ("vi", "vi_std", "dgsm", "dgsm_conf"):
            getattr(out.dgsm, key).extend(values(key))
    else:
        for key in ("mu", "mu_star", "sigma", "mu_star_conf"):
            getattr(out.morris, key).extend(values(key))
    return out


class GlobalSensitivityServicer:
    """Analyze (registered with ``handler``; the request arrives as bytes).

    Parameters
    ----------
    dataplane
        Where analyses run.
    envelope
        The server's call envelope.
    """

    def __init__(self, dataplane: DataPlane, envelope: CallEnvelope) -> None:
        self._plane = dataplane
        self._envelope = envelope

    async def Analyze(self, data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[_pb2.AnalyzeResponse]:
        updates: asyncio.Queue[_pb2.AnalyzeResponse | None] = asyncio.Queue()

        async def progress(done: int, total: int) -> None:
            updates.put_nowait(_pb2.AnalyzeResponse(progress=_pb2.Progress(evaluations_done=done,
                                                                           evaluations_total=total)))

        with self._envelope.open(PROTOCOL, "Analyze", context.time_remaining()) as call:
            message = parse(_pb2.AnalyzeRequest, data)
            call.describe(message.model, _names.ANALYSES.name(message.method) or "invalid", None, message.request_id)
            call.admit(0, kind="analysis")  # --max-concurrent-analyses; its memory once it is known
            request = analysis_request(message)

            def reserve(nbytes: int) -> None:
                self._reserve(call, nbytes + len(data))

            async def work() -> _pb2.AnalyzeResponse:
                try:
                    result = await call.run(self._plane.analyze(request, call.control, progress, reserve))
                    return _pb2.AnalyzeResponse(result=encode_result(result, message.request_id))
                finally:
                    updates.put_nowait(None)

            # The work runs as its own task so that this generator can yield its progress meanwhile.
            task = asyncio.ensure_future(work())
            try:
                while (update := await updates.get()) is not None:
                    yield update
                yield await task
            finally:
                if not task.done():
                    call.control.cancelled.set()  # the caller went away: the engine stops at its next chunk
                    task.cancel()
        if call.code is not grpc.StatusCode.OK:
            await context.abort(call.code, call.message)

    def _reserve(self, call: Call, nbytes: int) -> None:
        """Hold an analysis' estimated peak memory against the memory budget
        (``--max-inflight-request-bytes``) for as long as it runs. Unlike a request's bytes,
        which are in memory already when it arrives, an analysis' are not: one that alone needs
        more than the whole budget is refused too (RESOURCE_EXHAUSTED)."""
        budget = self._envelope.memory
        if 0 < budget.limit < nbytes:
            raise ResourceExhaustedError(
                f"memory budget: this analysis needs about {nbytes / 2**20:.0f} MiB (samples, outputs and "
                f"bootstrap), more than --max-inflight-request-bytes {budget.limit / 2**20:.0f} MiB; use fewer "
                "samples, resamples or factors")
        call.admit(nbytes, kind=None)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of the service (the request's bytes are parsed inside its call)."""
        serialize: Callable[[Any], bytes] = operator.methodcaller("SerializeToString")
        return grpc.method_handlers_generic_handler(
            _pb2.DESCRIPTOR.services_by_name["GlobalSensitivityService"].full_name,
            {"Analyze": grpc.unary_stream_rpc_method_handler(self.Analyze, response_serializer=serialize)})
