from gradserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_PREDICT: _ClassVar[Method]
    METHOD_GRADIENT: _ClassVar[Method]
    METHOD_INPUT_X_GRADIENT: _ClassVar[Method]
    METHOD_INTEGRATED_GRADIENTS: _ClassVar[Method]
    METHOD_SMOOTHGRAD: _ClassVar[Method]
    METHOD_JACOBIAN: _ClassVar[Method]
    METHOD_JVP: _ClassVar[Method]
    METHOD_VJP: _ClassVar[Method]
    METHOD_HVP: _ClassVar[Method]
    METHOD_GRAD_CAM: _ClassVar[Method]
    METHOD_SHAP: _ClassVar[Method]
    METHOD_PARTIAL_DEPENDENCE: _ClassVar[Method]

class TargetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_KIND_UNSPECIFIED: _ClassVar[TargetKind]
    TARGET_KIND_SUM: _ClassVar[TargetKind]
    TARGET_KIND_INDEX: _ClassVar[TargetKind]
    TARGET_KIND_ARGMAX: _ClassVar[TargetKind]

class Transform(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFORM_UNSPECIFIED: _ClassVar[Transform]
    TRANSFORM_IDENTITY: _ClassVar[Transform]
    TRANSFORM_SOFTMAX: _ClassVar[Transform]
    TRANSFORM_LOG_SOFTMAX: _ClassVar[Transform]
    TRANSFORM_SIGMOID: _ClassVar[Transform]

class Quadrature(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUADRATURE_UNSPECIFIED: _ClassVar[Quadrature]
    QUADRATURE_GAUSS_LEGENDRE: _ClassVar[Quadrature]
    QUADRATURE_RIEMANN_LEFT: _ClassVar[Quadrature]
    QUADRATURE_RIEMANN_RIGHT: _ClassVar[Quadrature]
    QUADRATURE_RIEMANN_MIDDLE: _ClassVar[Quadrature]
    QUADRATURE_RIEMANN_TRAPEZOID: _ClassVar[Quadrature]

class NoiseAggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOISE_AGGREGATION_UNSPECIFIED: _ClassVar[NoiseAggregation]
    NOISE_AGGREGATION_MEAN: _ClassVar[NoiseAggregation]
    NOISE_AGGREGATION_SQUARE: _ClassVar[NoiseAggregation]
    NOISE_AGGREGATION_VAR: _ClassVar[NoiseAggregation]

class ShapAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHAP_ALGORITHM_UNSPECIFIED: _ClassVar[ShapAlgorithm]
    SHAP_ALGORITHM_EXACT: _ClassVar[ShapAlgorithm]
    SHAP_ALGORITHM_KERNEL: _ClassVar[ShapAlgorithm]
    SHAP_ALGORITHM_GRADIENT: _ClassVar[ShapAlgorithm]

class PartialDependenceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARTIAL_DEPENDENCE_KIND_UNSPECIFIED: _ClassVar[PartialDependenceKind]
    PARTIAL_DEPENDENCE_KIND_AVERAGE: _ClassVar[PartialDependenceKind]
    PARTIAL_DEPENDENCE_KIND_INDIVIDUAL: _ClassVar[PartialDependenceKind]
    PARTIAL_DEPENDENCE_KIND_BOTH: _ClassVar[PartialDependenceKind]
METHOD_UNSPECIFIED: Method
METHOD_PREDICT: Method
METHOD_GRADIENT: Method
METHOD_INPUT_X_GRADIENT: Method
METHOD_INTEGRATED_GRADIENTS: Method
METHOD_SMOOTHGRAD: Method
METHOD_JACOBIAN: Method
METHOD_JVP: Method
METHOD_VJP: Method
METHOD_HVP: Method
METHOD_GRAD_CAM: Method
METHOD_SHAP: Method
METHOD_PARTIAL_DEPENDENCE: Method
TARGET_KIND_UNSPECIFIED: TargetKind
TARGET_KIND_SUM: TargetKind
TARGET_KIND_INDEX: TargetKind
TARGET_KIND_ARGMAX: TargetKind
TRANSFORM_UNSPECIFIED: Transform
TRANSFORM_IDENTITY: Transform
TRANSFORM_SOFTMAX: Transform
TRANSFORM_LOG_SOFTMAX: Transform
TRANSFORM_SIGMOID: Transform
QUADRATURE_UNSPECIFIED: Quadrature
QUADRATURE_GAUSS_LEGENDRE: Quadrature
QUADRATURE_RIEMANN_LEFT: Quadrature
QUADRATURE_RIEMANN_RIGHT: Quadrature
QUADRATURE_RIEMANN_MIDDLE: Quadrature
QUADRATURE_RIEMANN_TRAPEZOID: Quadrature
NOISE_AGGREGATION_UNSPECIFIED: NoiseAggregation
NOISE_AGGREGATION_MEAN: NoiseAggregation
NOISE_AGGREGATION_SQUARE: NoiseAggregation
NOISE_AGGREGATION_VAR: NoiseAggregation
SHAP_ALGORITHM_UNSPECIFIED: ShapAlgorithm
SHAP_ALGORITHM_EXACT: ShapAlgorithm
SHAP_ALGORITHM_KERNEL: ShapAlgorithm
SHAP_ALGORITHM_GRADIENT: ShapAlgorithm
PARTIAL_DEPENDENCE_KIND_UNSPECIFIED: PartialDependenceKind
PARTIAL_DEPENDENCE_KIND_AVERAGE: PartialDependenceKind
PARTIAL_DEPENDENCE_KIND_INDIVIDUAL: PartialDependenceKind
PARTIAL_DEPENDENCE_KIND_BOTH: PartialDependenceKind

class OutputSelector(_message.Message):
    __slots__ = ("output_name", "output_index", "kind", "indices", "transform", "use_logits")
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    USE_LOGITS_FIELD_NUMBER: _ClassVar[int]
    output_name: str
    output_index: int
    kind: TargetKind
    indices: _containers.RepeatedScalarFieldContainer[int]
    transform: Transform
    use_logits: bool
    def __init__(self, output_name: _Optional[str] = ..., output_index: _Optional[int] = ..., kind: _Optional[_Union[TargetKind, str]] = ..., indices: _Optional[_Iterable[int]] = ..., transform: _Optional[_Union[Transform, str]] = ..., use_logits: bool = ...) -> None: ...

class IntegratedGradientsOptions(_message.Message):
    __slots__ = ("baselines", "steps", "quadrature", "return_delta")
    class BaselinesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    BASELINES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    QUADRATURE_FIELD_NUMBER: _ClassVar[int]
    RETURN_DELTA_FIELD_NUMBER: _ClassVar[int]
    baselines: _containers.MessageMap[str, _tensor_pb2.Tensor]
    steps: int
    quadrature: Quadrature
    return_delta: bool
    def __init__(self, baselines: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., steps: _Optional[int] = ..., quadrature: _Optional[_Union[Quadrature, str]] = ..., return_delta: bool = ...) -> None: ...

class SmoothGradOptions(_message.Message):
    __slots__ = ("samples", "noise", "stdev", "kind", "seed", "base_method")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    STDEV_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BASE_METHOD_FIELD_NUMBER: _ClassVar[int]
    samples: int
    noise: float
    stdev: float
    kind: NoiseAggregation
    seed: int
    base_method: Method
    def __init__(self, samples: _Optional[int] = ..., noise: _Optional[float] = ..., stdev: _Optional[float] = ..., kind: _Optional[_Union[NoiseAggregation, str]] = ..., seed: _Optional[int] = ..., base_method: _Optional[_Union[Method, str]] = ...) -> None: ...

class GradCamOptions(_message.Message):
    __slots__ = ("upsample",)
    UPSAMPLE_FIELD_NUMBER: _ClassVar[int]
    upsample: bool
    def __init__(self, upsample: bool = ...) -> None: ...

class ShapOptions(_message.Message):
    __slots__ = ("algorithm", "samples", "seed", "feature_groups", "return_base")
    class FeatureGroupsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FEATURE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_BASE_FIELD_NUMBER: _ClassVar[int]
    algorithm: ShapAlgorithm
    samples: int
    seed: int
    feature_groups: _containers.MessageMap[str, _tensor_pb2.Tensor]
    return_base: bool
    def __init__(self, algorithm: _Optional[_Union[ShapAlgorithm, str]] = ..., samples: _Optional[int] = ..., seed: _Optional[int] = ..., feature_groups: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., return_base: bool = ...) -> None: ...

class FeatureIndex(_message.Message):
    __slots__ = ("input", "index")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    input: str
    index: int
    def __init__(self, input: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class PartialDependenceOptions(_message.Message):
    __slots__ = ("features", "grid", "grid_resolution", "lower_percentile", "upper_percentile", "kind")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    GRID_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    LOWER_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    UPPER_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureIndex]
    grid: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    grid_resolution: int
    lower_percentile: float
    upper_percentile: float
    kind: PartialDependenceKind
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureIndex, _Mapping]]] = ..., grid: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., grid_resolution: _Optional[int] = ..., lower_percentile: _Optional[float] = ..., upper_percentile: _Optional[float] = ..., kind: _Optional[_Union[PartialDependenceKind, str]] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("model", "version", "inputs", "method", "target", "wrt", "include_outputs", "request_id", "layer", "integrated_gradients", "smoothgrad", "tangents", "cotangent", "grad_cam", "response_shared_memory", "background", "shap", "partial_dependence")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class TangentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BackgroundEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHGRAD_FIELD_NUMBER: _ClassVar[int]
    TANGENTS_FIELD_NUMBER: _ClassVar[int]
    COTANGENT_FIELD_NUMBER: _ClassVar[int]
    GRAD_CAM_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    SHAP_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_DEPENDENCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    inputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    method: Method
    target: OutputSelector
    wrt: _containers.RepeatedScalarFieldContainer[str]
    include_outputs: bool
    request_id: str
    layer: str
    integrated_gradients: IntegratedGradientsOptions
    smoothgrad: SmoothGradOptions
    tangents: _containers.MessageMap[str, _tensor_pb2.Tensor]
    cotangent: _tensor_pb2.Tensor
    grad_cam: GradCamOptions
    response_shared_memory: _tensor_pb2.SharedMemoryRange
    background: _containers.MessageMap[str, _tensor_pb2.Tensor]
    shap: ShapOptions
    partial_dependence: PartialDependenceOptions
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., inputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., method: _Optional[_Union[Method, str]] = ..., target: _Optional[_Union[OutputSelector, _Mapping]] = ..., wrt: _Optional[_Iterable[str]] = ..., include_outputs: bool = ..., request_id: _Optional[str] = ..., layer: _Optional[str] = ..., integrated_gradients: _Optional[_Union[IntegratedGradientsOptions, _Mapping]] = ..., smoothgrad: _Optional[_Union[SmoothGradOptions, _Mapping]] = ..., tangents: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., cotangent: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_cam: _Optional[_Union[GradCamOptions, _Mapping]] = ..., response_shared_memory: _Optional[_Union[_tensor_pb2.SharedMemoryRange, _Mapping]] = ..., background: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., shap: _Optional[_Union[ShapOptions, _Mapping]] = ..., partial_dependence: _Optional[_Union[PartialDependenceOptions, _Mapping]] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "outputs", "attributions", "extras", "target_indices")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class AttributionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class ExtrasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_INDICES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    outputs: _containers.MessageMap[str, _tensor_pb2.Tensor]
    attributions: _containers.MessageMap[str, _tensor_pb2.Tensor]
    extras: _containers.MessageMap[str, _tensor_pb2.Tensor]
    target_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., outputs: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., attributions: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., extras: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., target_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class ComputeStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: ComputeRequest
    def __init__(self, request: _Optional[_Union[ComputeRequest, _Mapping]] = ...) -> None: ...

class ComputeStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ComputeResponse
    error: Status
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ComputeResponse, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
