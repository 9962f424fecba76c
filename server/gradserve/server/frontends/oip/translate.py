"""OIP requests as the data plane's neutral request, and results back as OIP tensors (both transports).

An inference request of the Open Inference Protocol becomes one ``core.requests.ComputeRequest``:
the request parameter ``method`` picks the sensitivity method by the SDK's names (``predict``
when absent) and its options are parameters with the SDK's names (one table of names,
``gradserve._names``). Parameters are type-checked here; the data plane checks everything else
the same way for every protocol, so a bad value gets exactly the native API's status and
message. The answer's tensors are named ``<output>`` (model outputs), ``attributions/<input>``,
``extras/<name>`` and ``target_indices``.

Shapley values (``method`` "shap") take ``algorithm`` ("exact", "kernel", "gradient"),
``samples``, ``seed`` and ``return_base``, their background rows as inputs named
``background/<input>`` and feature groups (labels) as ``feature_groups/<input>``; partial
dependence (``method`` "partial_dependence") takes ``feature`` (an element index, or a string
"N", "INPUT:N" or "N,M" for two), ``grid_resolution``, ``lower_percentile``, ``upper_percentile``
and ``kind`` ("average", "individual", "both"), and custom grids as inputs ``grid/0`` and ``grid/1``.

The gRPC and REST front-ends decode their wire format into ``InferRequest`` and encode the
``(name, array)`` pairs of ``response_tensors``; nothing here knows either transport.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import ml_dtypes
import numpy as np

from gradserve import _names
from gradserve.server.config import Limits
from gradserve.server.core.errors import InvalidArgumentError, NotFoundError, UnavailableError
from gradserve.server.core.explain import EXPLAIN_METHODS, FeatureIndex, PartialDependenceOptions, ShapOptions
from gradserve.server.core.models import ModelState
from gradserve.server.core.requests import ComputeRequest, Selection
from gradserve.server.core.results import ComputeResult, ModelInfo, VersionInfo
from gradserve.server.core.spec import (
    DEFAULT_NOISE,
    GradCamOptions,
    IntegratedGradientsOptions,
    MethodOptions,
    SmoothGradOptions,
)
from gradserve.server.frontends.shared_memory import Borrowed
from gradserve.server.frontends.tensors import check_shape, from_bytes, shared_array

__all__ = ["InferInput", "InferRequest", "SharedMemoryRef", "DATATYPES", "datatype_of", "parse_version", "dims",
           "compute_request", "shared_memory_ref", "SHARED_MEMORY_PARAMETERS",
           "response_tensors", "deadline_seconds", "model_metadata", "TensorMetadata", "ModelMetadata",
           "ATTRIBUTIONS", "EXTRAS",
           "TARGET_INDICES", "TANGENTS", "COTANGENTS", "BACKGROUND", "FEATURE_GROUPS", "GRID", "PARAMETERS",
           "TRANSPORT_PARAMETERS"]

#: Output name prefixes and names of what a method adds to the model's own outputs.
ATTRIBUTIONS = "attributions/"
EXTRAS = "extras/"
TARGET_INDICES = "target_indices"
#: Input names that carry jvp/hvp tangents (``tangents/<input>``) and the vjp cotangent.
TANGENTS = "tangents/"
COTANGENTS = "cotangents"
#: Input names that carry shap's background rows and feature groups (``<prefix><input>``), and
#: partial dependence's custom grids (``grid/0``, ``grid/1``).
BACKGROUND = "background/"
FEATURE_GROUPS = "feature_groups/"
GRID = "grid/"

#: OIP datatype -> NumPy dtype, for those a gradserve tensor can hold.
DATATYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"), "BF16": np.dtype(ml_dtypes.bfloat16),
}
_NAMES = {dt: name for name, dt in DATATYPES.items()}
_KNOWN_DATATYPES = ("UINT16", "UINT32", "UINT64", "BYTES")   # in the protocol, not in gradserve's tensors

#: The request parameters gradserve reads, by the SDK's names, and the type each takes.
PARAMETERS: Mapping[str, str] = {
    "method": "str", "target": "int or 'argmax'", "output": "str or int", "transform": "str", "logits": "bool",
    "wrt": "str", "layer": "str", "steps": "int", "quadrature": "str", "baseline": "float",
    "return_delta": "bool", "samples": "int", "noise": "float", "stdev": "float", "kind": "str", "seed": "int",
    "base_method": "str", "upsample": "bool", "timeout": "int",
    "algorithm": "str", "return_base": "bool", "feature": "int or str", "grid_resolution": "int",
    "lower_percentile": "float", "upper_percentile": "float",
}
#: Parameters of Triton's and KServe's clients that concern the transport or features gradserve
#: does not have; accepted and left alone (``timeout``, in microseconds, is a deadline).
TRANSPORT_PARAMETERS = frozenset({"binary_data_output", "binary_data", "binary_data_size", "sequence_id",
                                  "sequence_start", "sequence_end", "priority", "headers"})
#: The parameters of an input or requested output in shared memory (Triton's system shared-memory
#: extension): the region's name, and the tensor's byte size and offset in it.
SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class SharedMemoryRef:
    """Where a tensor is in a registered system shared-memory region: its name, offset and byte size."""

    region: str
    offset: int
    byte_size: int


@dataclass
class InferInput:
    """One input tensor of an OIP request: raw little-endian bytes, typed values, or a range of a
    shared-memory region."""

    name: str
    datatype: str
    shape: Sequence[int]
    #: Raw bytes (gRPC ``raw_input_contents``, REST binary data), else None.
    raw: bytes | memoryview | None = None
    #: Typed values (gRPC ``contents``, REST ``data``: flat or nested), else None.
    values: Any = None
    #: The ``shared_memory_*`` parameters, else None.
    shared_memory: SharedMemoryRef | None = None


@dataclass
class InferRequest:
    """An OIP inference request, whichever transport it came by."""

    model: str
    version: str = ""
    id: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[InferInput] = ()
    #: Names of the requested outputs, in order; empty: the method's default outputs.
    outputs: Sequence[str] = ()
    #: Requested outputs to be written into shared memory, by name.
    output_shared_memory: Mapping[str, SharedMemoryRef] = field(default_factory=dict)


def datatype_of(dtype: np.dtype[Any]) -> str:
    """OIP datatype of a NumPy dtype gradserve answers in."""
    return _NAMES[np.dtype(dtype).newbyteorder("=")]


def parse_version(text: str, field: str = "model_version") -> int:
    """An OIP version string as gradserve's version number (empty: 0, the latest READY)."""
    if text == "":
        return 0
    if not text.isascii() or not text.isdigit() or len(text) > 19 or (len(text) > 1 and text[0] == "0"):
        raise InvalidArgumentError(f"{field}: {text[:64]!r} is not a version number (a positive integer)")
    version = int(text)
    if version == 0 or version > _INT64[1]:
        raise InvalidArgumentError(f"{field}: {text!r} is not a version number (a positive integer)")
    return version


# -- parameters --------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(type(value), type(value).__name__)


def _param(params: Mapping[str, Any], name: str, want: type[Any], default: Any = None) -> Any:
    """``params[name]`` checked to be of type ``want`` (an int is a float too; a bool is not an int)."""
    if name not in params:
        return default
    value = given = params[name]
    if want is float and type(value) is int:
        value = float(value) if abs(value) < 1 << 1023 else math.inf  # JSON ints have no bound
    if type(value) is not want or (want is float and not math.isfinite(value)):
        kind = {bool: "a bool", int: "an int", float: "a finite float", str: "a string"}[want]
        raise InvalidArgumentError(f"{name}: expected {kind}, got {_kind(given)} {given!r:.64}")
    if want is int and not _INT64[0] <= value <= _INT64[1]:
        raise InvalidArgumentError(f"{name}: {value} does not fit in 64 bits")
    return value


def _int32(params: Mapping[str, Any], name: str) -> int | None:
    value = _param(params, name, int)
    if value is not None and not _INT32[0] <= value <= _INT32[1]:
        raise InvalidArgumentError(f"{name}: {value} does not fit in 32 bits")
    return value  # type: ignore[no-any-return]


def _choice(params: Mapping[str, Any], name: str, table: Collection[str], default: str) -> str:
    value = _param(params, name, str, default)
    if value not in table:
        raise InvalidArgumentError(f"{name}: expected one of {sorted(table)}, got {value[:64]!r}")
    return str(value)


def _selection(params: Mapping[str, Any]) -> Selection:
    target = params.get("target")
    kind, indices = "sum", None
    if target == "argmax":
        kind = "argmax"
    elif type(target) is int and _INT64[0] <= target <= _INT64[1]:
        kind, indices = "index", np.array([target], np.int64)
    elif target is not None:
        raise InvalidArgumentError(f"target: expected an int or 'argmax', got {_kind(target)} {target!r:.64}")
    output = params.get("output", 0)
    if not (type(output) is str or (type(output) is int and _INT32[0] <= output <= _INT32[1])):
        raise InvalidArgumentError(f"output: expected a name or an index, got {_kind(output)} {output!r:.64}")
    return Selection(output=output, kind=kind, indices=indices,
                     transform=_choice(params, "transform", _names.TRANSFORMS, "identity"),
                     logits=_param(params, "logits", bool, False))


def _method_options(params: Mapping[str, Any], method: str, input_names: Sequence[str]
                    ) -> tuple[MethodOptions | None, dict[str, np.ndarray]]:
    """The method's options and integrated gradients' baselines from the request parameters."""
    # Every known parameter is type-checked, whether or not this method reads it.
    steps = _int32(params, "steps")
    samples = _int32(params, "samples")
    baseline = _param(params, "baseline", float)
    noise, stdev = _param(params, "noise", float), _param(params, "stdev", float)
    seed = _param(params, "seed", int)
    return_delta = _param(params, "return_delta", bool, False)
    upsample = _param(params, "upsample", bool, False)
    base_method = _param(params, "base_method", str, "gradient")
    ig = IntegratedGradientsOptions(steps=steps or 0,
                                    quadrature=_choice(params, "quadrature", _names.QUADRATURES, "gausslegendre"),
                                    return_delta=return_delta)
    # ``kind`` is partial dependence's curves there (``_explain_options``), SmoothGrad's aggregation elsewhere.
    aggregation = "mean" if method == "partial_dependence" else _choice(params, "kind", _names.AGGREGATIONS, "mean")
    uses_ig = method == "integrated_gradients" or (method == "smoothgrad" and base_method == "integrated_gradients")
    # A scalar for every input, as the SDK's baseline=.
    baselines = {name: np.asarray(baseline or 0.0, np.float64) for name in input_names} if uses_ig else {}
    if method == "integrated_gradients":
        return ig, baselines
    if method == "smoothgrad":
        if base_method not in _names.SMOOTHGRAD_BASES:
            raise InvalidArgumentError(f"base_method: expected one of {list(_names.SMOOTHGRAD_BASES)}, "
                                       f"got {base_method[:64]!r}")
        return SmoothGradOptions(samples=samples or 0, noise=DEFAULT_NOISE if noise is None else noise,
                                 stdev=stdev, aggregation=aggregation, seed=seed, base_method=base_method,
                                 integrated=ig), baselines
    if method == "grad_cam":
        return GradCamOptions(upsample=upsample), baselines
    return None, baselines


def _feature(text: str) -> FeatureIndex:
    name, colon, index = text.strip().rpartition(":")
    if not index.strip().isdigit():
        raise InvalidArgumentError(f"feature: expected N, INPUT:N or N,M, got {text[:64]!r}")
    return FeatureIndex(name if colon else "", int(index))


def _explain_options(params: Mapping[str, Any], method: str, groups: Mapping[str, np.ndarray],
                     grids: Mapping[int, np.ndarray]) -> MethodOptions:
    """Options of ``shap`` and ``partial_dependence`` (see the module docstring)."""
    samples, seed = _param(params, "samples", int, 0), _param(params, "seed", int)
    algorithm = _choice(params, "algorithm", _names.SHAP_ALGORITHMS, "kernel")
    return_base = _param(params, "return_base", bool, False)
    resolution = _int32(params, "grid_resolution") or 0
    low, high = _param(params, "lower_percentile", float), _param(params, "upper_percentile", float)
    kind = _choice(params, "kind", _names.PDP_KINDS, "both") if method == "partial_dependence" else "both"
    feature = params.get("feature")
    if method == "shap":
        if seed is not None and seed < 0:
            raise InvalidArgumentError(f"seed: {seed} must be non-negative")
        return ShapOptions(algorithm=algorithm, samples=samples, seed=seed, feature_groups=dict(groups),
                           return_base=return_base)
    if type(feature) is int and 0 <= feature <= _INT64[1]:
        features: tuple[FeatureIndex, ...] = (FeatureIndex("", feature),)
    elif type(feature) is str:
        features = tuple(_feature(part) for part in feature.split(","))
    else:
        raise InvalidArgumentError(f"feature: expected an element index or a string N, INPUT:N or N,M, got "
                                   f"{_kind(feature)} {feature!r:.64}")
    unknown = [i for i in grids if i >= len(features)]
    if unknown:
        raise InvalidArgumentError(f"inputs: {GRID}{unknown[0]} names no feature; there are {len(features)}")
    return PartialDependenceOptions(features=features,
                                    grids=tuple(grids.get(i) for i in range(len(features))) if grids else (),
                                    grid_resolution=resolution, lower_percentile=low, upper_percentile=high,
                                    kind=kind)


def deadline_seconds(params: Mapping[str, Any]) -> float | None:
    """Triton's ``timeout`` request parameter (microseconds) in seconds, if given."""
    value = _param(params, "timeout", int)
    if value is not None and value <= 0:
        raise InvalidArgumentError(f"timeout: {value} is not a positive number of microseconds")
    return None if value is None else value / 1e6


# -- tensors -----------------------------------------------------------------------------------------
def shared_memory_ref(params: Mapping[str, Any], field: str) -> SharedMemoryRef | None:
    """The ``shared_memory_*`` parameters of an input or requested output (None: not in shared
    memory); a region and a byte size go together, and the offset defaults to 0."""
    region = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    offset = params.get("shared_memory_offset", 0)
    if region is None and size is None:
        if "shared_memory_offset" in params:
            raise InvalidArgumentError(f"{field}.parameters: shared_memory_offset without shared_memory_region")
        return None
    if region is None or size is None:
        raise InvalidArgumentError(f"{field}.parameters: shared_memory_region and shared_memory_byte_size go "
                                   "together")
    if type(region) is not str or not region:
        raise InvalidArgumentError(f"{field}.parameters.shared_memory_region: expected a region name, got "
                                   f"{_kind(region)} {region!r:.64}")
    for name, value in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
        if type(value) is not int or value < 0:
            raise InvalidArgumentError(f"{field}.parameters.{name}: expected a byte count, got "
                                       f"{_kind(value)} {value!r:.64}")
    return SharedMemoryRef(region, offset, size)


def dims(shape: Sequence[Any], field: str) -> list[int]:
    """``shape`` as a list of its dimensions, each an integer within 64 bits (not a float, bool
    or string: JSON does not say which); InvalidArgumentError otherwise. ``check_shape`` checks
    the limits."""
    for i, d in enumerate(shape):
        if type(d) is not int:
            raise InvalidArgumentError(f"{field}.shape: dimension {i} is {_kind(d)} {d!r:.32}, not an integer")
        if not _INT64[0] <= d <= _INT64[1]:
            raise InvalidArgumentError(f"{field}.shape: dimension {i} does not fit in 64 bits")
    return list(shape)


def _array(inp: InferInput, field: str, limits: Limits, regions: Borrowed | None = None) -> np.ndarray:
    """The array of one input tensor, after the size limits (raw bytes and shared memory are not copied)."""
    dtype = DATATYPES.get(inp.datatype)
    if dtype is None:
        what = "is not supported by gradserve" if inp.datatype in _KNOWN_DATATYPES else "is not an OIP datatype"
        raise InvalidArgumentError(f"{field}.datatype: {inp.datatype[:32]!r} {what}; expected one of "
                                   f"{list(DATATYPES)}")
    shape = dims(inp.shape, field)
    count = check_shape(shape, field, limits)
    if inp.shared_memory is not None:
        if inp.raw is not None or inp.values is not None:
            raise InvalidArgumentError(f"{field}: has data although it is in shared memory; send one")
        if regions is None:
            raise InvalidArgumentError(f"{field}: shared memory is not served over this path")
        ref = inp.shared_memory
        return shared_array(regions, ref.region, ref.offset, ref.byte_size, dtype, shape,
                            f"{field}.parameters.shared_memory", limits)
    if inp.raw is not None:
        if inp.values is not None:
            raise InvalidArgumentError(f"{field}: has both raw and typed contents; send one")
        return from_bytes(inp.raw, dtype, shape, field, limits)
    if inp.values is None:
        raise InvalidArgumentError(f"{field}: has no data")
    try:
        # REST's JSON data come as flat arrays of the datatype already (``jsonbody``, strictly
        # typed); gRPC's typed contents are typed by the message.
        arr = np.asarray(inp.values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"{field}.data: not {inp.datatype} values ({str(exc)[:128]})") from None
    if arr.size != count:
        raise InvalidArgumentError(f"{field}.data: {arr.size} values but shape {shape} needs {count}")
    return arr.reshape(shape)


def compute_request(req: InferRequest, limits: Limits, nbytes: int = 0,
                    regions: Borrowed | None = None) -> ComputeRequest:
    """The neutral request of an OIP inference request (``nbytes``: its size on the wire;
    ``regions``: the call's hold on the system shared-memory regions its inputs may name)."""
    params = req.parameters
    for name in params:
        if name not in PARAMETERS and name not in TRANSPORT_PARAMETERS:
            raise InvalidArgumentError(f"parameters: unknown parameter {name[:64]!r}; gradserve reads "
                                       f"{sorted(PARAMETERS)}")
    method = _param(params, "method", str, "predict")
    if method not in _names.METHODS:
        raise InvalidArgumentError(f"method: unknown method {method[:64]!r}; expected one of {sorted(_names.METHODS)}")
    seen: set[str] = set()
    inputs: dict[str, np.ndarray] = {}
    tangents: dict[str, np.ndarray] = {}
    background: dict[str, np.ndarray] = {}
    groups: dict[str, np.ndarray] = {}
    grids: dict[int, np.ndarray] = {}
    cotangent = None
    for inp in req.inputs:
        name = inp.name
        field = f"inputs[{name[:128]!r}]"
        if name in seen:
            raise InvalidArgumentError(f"{field}: given twice")
        seen.add(name)
        if name.startswith(TANGENTS):
            tangents[name[len(TANGENTS):]] = _array(inp, f"tangents[{name[len(TANGENTS):][:128]!r}]", limits,
                                                    regions)
        elif name == COTANGENTS:
            cotangent = _array(inp, "cotangent", limits, regions)
        elif name.startswith(BACKGROUND):
            background[name[len(BACKGROUND):]] = _array(inp, f"background[{name[len(BACKGROUND):][:128]!r}]",
                                                        limits, regions)
        elif name.startswith(FEATURE_GROUPS):
            label = name[len(FEATURE_GROUPS):]
            groups[label] = _array(inp, f"shap.feature_groups[{label[:128]!r}]", limits, regions)
        elif name.startswith(GRID) and name[len(GRID):].isdigit() and len(name) <= len(GRID) + 2:
            grids[int(name[len(GRID):])] = _array(inp, f"partial_dependence.grid[{name[len(GRID):]}]", limits,
                                                  regions)
        else:
            inputs[name] = _array(inp, field, limits, regions)
    options, baselines = _method_options(params, method, list(inputs))
    if method in EXPLAIN_METHODS:
        options = _explain_options(params, method, groups, grids)
    selection = _selection(params) if method != "predict" else Selection()
    wrt = _param(params, "wrt", str, "")
    # Model outputs come along when the method is predict or one of them is asked for by name.
    include_outputs = method != "predict" and any(
        not (n.startswith((ATTRIBUTIONS, EXTRAS)) or n == TARGET_INDICES) for n in req.outputs)
    return ComputeRequest(model=req.model, inputs=inputs, method=method, version=parse_version(req.version),
                          target=selection, wrt=tuple(n.strip() for n in wrt.split(",")) if wrt else (),
                          include_outputs=include_outputs, layer=_param(params, "layer", str, ""),
                          options=options, baselines=baselines, tangents=tangents, cotangent=cotangent,
                          background=background, request_id=req.id, nbytes=nbytes)


def response_tensors(result: ComputeResult, requested: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """The answer's tensors by OIP name: those ``requested`` in that order, else everything computed."""
    named: dict[str, np.ndarray] = dict(result.outputs)
    named.update((ATTRIBUTIONS + k, v) for k, v in result.attributions.items())
    named.update((EXTRAS + k, v) for k, v in result.extras.items())
    if result.target_indices is not None:
        named[TARGET_INDICES] = np.asarray(result.target_indices, dtype=np.int64)
    if not requested:
        return list(named.items())
    missing = [n for n in requested if n not in named]
    if missing:
        raise NotFoundError(f"outputs: {missing[0][:128]!r} is not produced by this request; it produces "
                            f"{list(named)[:32]}")
    return [(n, named[n]) for n in dict.fromkeys(requested)]


# -- metadata ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What OIP ModelMetadata says of a model: its inputs, and the outputs any request can get."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


def _meta(spec: Any, name: str | None = None) -> TensorMetadata:
    return TensorMetadata(name or spec.name, datatype_of(spec.dtype), tuple(-1 if d is None else d for d in spec.shape))


def model_metadata(info: ModelInfo, version: str = "") -> ModelMetadata:
    """OIP metadata of ``info`` at ``version`` (empty: the latest READY one).

    The outputs are the model's own, then ``attributions/<input>`` for every differentiable input
    (shaped like it; a Jacobian's are larger), ``extras/*`` of integrated gradients and
    ``target_indices``.
    """
    wanted = parse_version(version, "version")
    ready = [v for v in info.versions if v.state is ModelState.READY]
    chosen: VersionInfo | None
    if wanted:
        chosen = next((v for v in info.versions if v.version == wanted), None)
        if chosen is None:
            raise NotFoundError(f"version: model {info.name!r} has no version {wanted}")
    else:
        chosen = ready[-1] if ready else None
    if chosen is None or not chosen.inputs:
        raise UnavailableError(f"model: {info.name!r} has no loaded version yet")
    outputs = [_meta(s) for s in chosen.outputs]
    outputs += [_meta(s, ATTRIBUTIONS + s.name) for s in chosen.inputs if s.differentiable]
    extra_type = outputs[0].datatype if outputs else "FP32"
    outputs += [TensorMetadata(EXTRAS + n, extra_type, (-1,)) for n in ("delta", "f_input", "f_baseline")]
    outputs.append(TensorMetadata(TARGET_INDICES, "INT64", (-1,)))
    return ModelMetadata(info.name, tuple(str(v.version) for v in ready), "tensorflow_keras",
                         tuple(_meta(s) for s in chosen.inputs), tuple(outputs))
