"""The synchronous SDK client."""
from __future__ import annotations

import threading
from types import TracebackType
from typing import Any, Iterable, Iterator, Sequence

import grpc

from gradserve._channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options, channel_target
from gradserve._exceptions import from_grpc_error
from gradserve._models import Inputs, ModelInfo
from gradserve._requests import Call, ComputeResult, Target, build_call, decode_response
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import model_service_pb2_grpc as _model_grpc
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import sensitivity_service_pb2_grpc as _grpc

__all__ = ["Client"]


class Client:
    """Blocking client for a gradserve server.

    Parameters
    ----------
    target
        ``"host:port"``, a list of them (balanced round robin), or any gRPC target
        (``dns:///name:port``).
    timeout
        Default deadline in seconds for every call; ``None`` waits forever.
    max_message_bytes
        Largest message sent or received.
    channel
        A ready ``grpc.Channel`` to use instead of creating one (custom credentials, tests).
    credentials
        ``grpc.ChannelCredentials`` for TLS; ``None`` connects in plaintext.
    token
        Bearer token sent as ``authorization`` metadata.
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel: grpc.Channel | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> None:
        if channel is None:
            tgt, rr = channel_target(target)
            opts = channel_options(max_message_bytes, rr)
            channel = (grpc.secure_channel(tgt, credentials, options=opts) if credentials is not None
                       else grpc.insecure_channel(tgt, options=opts))
        self._channel = channel
        self._timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._compute = _grpc.SensitivityServiceStub(channel)
        self._models = _model_grpc.ModelServiceStub(channel)
        self._info: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- models ---------------------------------------------------------------------------------
    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server hosts, with its versions."""
        resp = self._unary(self._models.ListModels, _model_pb2.ListModelsRequest(), timeout)
        infos = [ModelInfo.from_proto(m) for m in resp.models]
        with self._lock:
            self._info.update({i.name: i for i in infos})
        return infos

    def model_info(self, name: str, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """Names, dtypes, shapes, versions and states of one model (cached per client)."""
        with self._lock:
            cached = self._info.get(name)
        if cached is not None and not refresh:
            return cached
        resp = self._unary(self._models.GetModel, _model_pb2.GetModelRequest(name=name), timeout)
        info = ModelInfo.from_proto(resp.model)
        with self._lock:
            self._info[name] = info
        return info

    # -- methods --------------------------------------------------------------------------------
    def compute(self, model: str, method: str, inputs: Inputs, *, timeout: float | None = None,
                **options: Any) -> ComputeResult:
        """Low-level call: every field of the response, decoded. ``options`` as in ``gradient``."""
        call = self._build(model, method, inputs, options)
        return decode_response(self._unary(self._compute.Compute, call.request, timeout))

    def predict(self, model: str, inputs: Inputs, *, version: int = 0, timeout: float | None = None) -> Any:
        """Model outputs: an array for a single-output model, else a dict by output name."""
        return self._run(model, "predict", inputs, timeout, version=version)

    def gradient(self, model: str, inputs: Inputs, *, target: Target = None, output: str | int | None = None,
                 wrt: Sequence[str] | None = None, return_outputs: bool = False, layer: str | None = None,
                 transform: str | None = None, logits: bool = False, version: int = 0,
                 timeout: float | None = None) -> Any:
        """d target / d inputs per example, shaped like the inputs (array, list or dict).

        With ``return_outputs=True`` returns ``(outputs, gradients)`` from one forward pass.
        """
        return self._run(model, "gradient", inputs, timeout, target=target, output=output, wrt=wrt,
                         return_outputs=return_outputs, layer=layer, transform=transform,
                         logits=logits, version=version)

    def input_x_gradient(self, model: str, inputs: Inputs, *, target: Target = None,
                         output: str | int | None = None, wrt: Sequence[str] | None = None,
                         return_outputs: bool = False, layer: str | None = None,
                         transform: str | None = None, logits: bool = False, version: int = 0,
                         timeout: float | None = None) -> Any:
        """inputs * gradient, per element."""
        return self._run(model, "input_x_gradient", inputs, timeout, target=target, output=output,
                         wrt=wrt, return_outputs=return_outputs, layer=layer, transform=transform,
                         logits=logits, version=version)

    def integrated_gradients(self, model: str, inputs: Inputs, *, baseline: Any = 0.0, steps: int = 50,
                             method: str = "gausslegendre", target: Target = None,
                             output: str | int | None = None, wrt: Sequence[str] | None = None,
                             return_delta: bool = False, return_outputs: bool = False,
                             layer: str | None = None, transform: str | None = None, logits: bool = False,
                             version: int = 0, timeout: float | None = None) -> Any:
        """Integrated gradients from ``baseline``; with ``return_delta`` also the per-example
        convergence delta (returns ``(attributions, delta)``)."""
        return self._run(model, "integrated_gradients", inputs, timeout, baseline=baseline, steps=steps,
                         quadrature=method, target=target, output=output, wrt=wrt,
                         return_delta=return_delta, return_outputs=return_outputs, layer=layer,
                         transform=transform, logits=logits, version=version)

    def smoothgrad(self, model: str, inputs: Inputs, *, samples: int = 50, noise: float | None = None,
                   stdev: float | None = None, kind: str = "mean", seed: int | None = None,
                   base_method: str = "gradient", target: Target = None, output: str | int | None = None,
                   wrt: Sequence[str] | None = None, baseline: Any = 0.0, steps: int = 50,
                   transform: str | None = None, logits: bool = False, version: int = 0,
                   timeout: float | None = None) -> Any:
        """SmoothGrad: ``base_method`` attributions averaged over noisy copies of the inputs."""
        return self._run(model, "smoothgrad", inputs, timeout, samples=samples, noise=noise, stdev=stdev,
                         kind=kind, seed=seed, base_method=base_method, target=target, output=output,
                         wrt=wrt, baseline=baseline, steps=steps, transform=transform, logits=logits,
                         version=version)

    def jacobian(self, model: str, inputs: Inputs, *, output: str | int | None = None,
                 wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """Per-example Jacobian, shape (batch, *output_shape, *input_shape), per input."""
        return self._run(model, "jacobian", inputs, timeout, output=output, wrt=wrt, version=version)

    def jvp(self, model: str, inputs: Inputs, tangents: Any, *, output: str | int | None = None,
            version: int = 0, timeout: float | None = None) -> Any:
        """Jacobian-vector product J·v of the selected output, shaped like that output."""
        return self._run(model, "jvp", inputs, timeout, tangents=tangents, output=output, version=version)

    def vjp(self, model: str, inputs: Inputs, cotangents: Any, *, output: str | int | None = None,
            wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """Vector-Jacobian product uᵀ·J, shaped like the inputs."""
        return self._run(model, "vjp", inputs, timeout, cotangents=cotangents, output=output, wrt=wrt,
                         version=version)

    def hvp(self, model: str, inputs: Inputs, v: Any, *, target: Target = None,
            output: str | int | None = None, wrt: Sequence[str] | None = None, version: int = 0,
            timeout: float | None = None) -> Any:
        """Hessian-vector product of the target with ``v``, shaped like the inputs."""
        return self._run(model, "hvp", inputs, timeout, tangents=v, target=target, output=output,
                         wrt=wrt, version=version)

    def grad_cam(self, model: str, inputs: Inputs, *, layer: str | None = None, target: Target = None,
                 output: str | int | None = None, upsample: bool = False, version: int = 0,
                 timeout: float | None = None) -> Any:
        """Grad-CAM map of a convolutional layer (default: the last 4-D layer output)."""
        return self._run(model, "grad_cam", inputs, timeout, layer=layer, target=target, output=output,
                         upsample=upsample, version=version)

    def stream(self, model: str, batches: Iterable[Inputs], *, method: str = "gradient",
               timeout: float | None = None, **options: Any) -> Iterator[Any]:
        """Send many batches over one ComputeStream; yields results in order as they arrive."""
        finishers: list[Any] = []
        info = self._info_or_none(model)

        def requests() -> Iterator[_pb2.ComputeRequest]:
            for i, batch in enumerate(batches):
                call = build_call(info, model, method, batch, request_id=str(i), **options)
                finishers.append(call.finish)
                yield call.request

        try:
            responses = self._compute.ComputeStream(requests(), timeout=timeout,
                                                    metadata=self._metadata or None)
            for i, resp in enumerate(responses):
                yield finishers[i](decode_response(resp))
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc

    # -- plumbing -------------------------------------------------------------------------------
    def _info_or_none(self, model: str) -> ModelInfo | None:
        try:
            return self.model_info(model)
        except Exception:  # noqa: BLE001 - metadata is an optimisation; the server validates anyway
            return None

    def _build(self, model: str, method: str, inputs: Inputs, options: dict[str, Any]) -> Call:
        return build_call(self._info_or_none(model), model, method, inputs, **options)

    def _run(self, model: str, method: str, inputs: Inputs, timeout: float | None, **options: Any) -> Any:
        call = self._build(model, method, inputs, options)
        return call.finish(decode_response(self._unary(self._compute.Compute, call.request, timeout)))

    def _unary(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        try:
            return rpc(request, timeout=self._timeout if timeout is None else timeout,
                       metadata=self._metadata or None)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
