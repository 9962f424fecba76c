from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnalysisMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANALYSIS_METHOD_UNSPECIFIED: _ClassVar[AnalysisMethod]
    ANALYSIS_METHOD_SOBOL: _ClassVar[AnalysisMethod]
    ANALYSIS_METHOD_DGSM: _ClassVar[AnalysisMethod]
    ANALYSIS_METHOD_MORRIS: _ClassVar[AnalysisMethod]

class Distribution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISTRIBUTION_UNSPECIFIED: _ClassVar[Distribution]
    DISTRIBUTION_UNIFORM: _ClassVar[Distribution]
    DISTRIBUTION_NORMAL: _ClassVar[Distribution]
    DISTRIBUTION_LOGNORMAL: _ClassVar[Distribution]
    DISTRIBUTION_TRIANGULAR: _ClassVar[Distribution]
ANALYSIS_METHOD_UNSPECIFIED: AnalysisMethod
ANALYSIS_METHOD_SOBOL: AnalysisMethod
ANALYSIS_METHOD_DGSM: AnalysisMethod
ANALYSIS_METHOD_MORRIS: AnalysisMethod
DISTRIBUTION_UNSPECIFIED: Distribution
DISTRIBUTION_UNIFORM: Distribution
DISTRIBUTION_NORMAL: Distribution
DISTRIBUTION_LOGNORMAL: Distribution
DISTRIBUTION_TRIANGULAR: Distribution

class Factor(_message.Message):
    __slots__ = ("name", "input", "index", "distribution", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    input: str
    index: int
    distribution: Distribution
    params: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., input: _Optional[str] = ..., index: _Optional[int] = ..., distribution: _Optional[_Union[Distribution, str]] = ..., params: _Optional[_Iterable[float]] = ...) -> None: ...

class SobolOptions(_message.Message):
    __slots__ = ("second_order",)
    SECOND_ORDER_FIELD_NUMBER: _ClassVar[int]
    second_order: bool
    def __init__(self, second_order: bool = ...) -> None: ...

class MorrisOptions(_message.Message):
    __slots__ = ("levels",)
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    levels: int
    def __init__(self, levels: _Optional[int] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("model", "version", "method", "factors", "output_name", "output_index", "output_element", "samples", "seed", "conf_level", "resamples", "sobol", "morris", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FACTORS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ELEMENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CONF_LEVEL_FIELD_NUMBER: _ClassVar[int]
    RESAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOBOL_FIELD_NUMBER: _ClassVar[int]
    MORRIS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    method: AnalysisMethod
    factors: _containers.RepeatedCompositeFieldContainer[Factor]
    output_name: str
    output_index: int
    output_element: int
    samples: int
    seed: int
    conf_level: float
    resamples: int
    sobol: SobolOptions
    morris: MorrisOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., method: _Optional[_Union[AnalysisMethod, str]] = ..., factors: _Optional[_Iterable[_Union[Factor, _Mapping]]] = ..., output_name: _Optional[str] = ..., output_index: _Optional[int] = ..., output_element: _Optional[int] = ..., samples: _Optional[int] = ..., seed: _Optional[int] = ..., conf_level: _Optional[float] = ..., resamples: _Optional[int] = ..., sobol: _Optional[_Union[SobolOptions, _Mapping]] = ..., morris: _Optional[_Union[MorrisOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("evaluations_done", "evaluations_total")
    EVALUATIONS_DONE_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    evaluations_done: int
    evaluations_total: int
    def __init__(self, evaluations_done: _Optional[int] = ..., evaluations_total: _Optional[int] = ...) -> None: ...

class SobolIndices(_message.Message):
    __slots__ = ("s1", "s1_conf", "st", "st_conf", "s2", "s2_conf")
    S1_FIELD_NUMBER: _ClassVar[int]
    S1_CONF_FIELD_NUMBER: _ClassVar[int]
    ST_FIELD_NUMBER: _ClassVar[int]
    ST_CONF_FIELD_NUMBER: _ClassVar[int]
    S2_FIELD_NUMBER: _ClassVar[int]
    S2_CONF_FIELD_NUMBER: _ClassVar[int]
    s1: _containers.RepeatedScalarFieldContainer[float]
    s1_conf: _containers.RepeatedScalarFieldContainer[float]
    st: _containers.RepeatedScalarFieldContainer[float]
    st_conf: _containers.RepeatedScalarFieldContainer[float]
    s2: _containers.RepeatedScalarFieldContainer[float]
    s2_conf: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, s1: _Optional[_Iterable[float]] = ..., s1_conf: _Optional[_Iterable[float]] = ..., st: _Optional[_Iterable[float]] = ..., st_conf: _Optional[_Iterable[float]] = ..., s2: _Optional[_Iterable[float]] = ..., s2_conf: _Optional[_Iterable[float]] = ...) -> None: ...

class DgsmMeasures(_message.Message):
    __slots__ = ("vi", "vi_std", "dgsm", "dgsm_conf")
    VI_FIELD_NUMBER: _ClassVar[int]
    VI_STD_FIELD_NUMBER: _ClassVar[int]
    DGSM_FIELD_NUMBER: _ClassVar[int]
    DGSM_CONF_FIELD_NUMBER: _ClassVar[int]
    vi: _containers.RepeatedScalarFieldContainer[float]
    vi_std: _containers.RepeatedScalarFieldContainer[float]
    dgsm: _containers.RepeatedScalarFieldContainer[float]
    dgsm_conf: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, vi: _Optional[_Iterable[float]] = ..., vi_std: _Optional[_Iterable[float]] = ..., dgsm: _Optional[_Iterable[float]] = ..., dgsm_conf: _Optional[_Iterable[float]] = ...) -> None: ...

class MorrisMeasures(_message.Message):
    __slots__ = ("mu", "mu_star", "sigma", "mu_star_conf")
    MU_FIELD_NUMBER: _ClassVar[int]
    MU_STAR_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    MU_STAR_CONF_FIELD_NUMBER: _ClassVar[int]
    mu: _containers.RepeatedScalarFieldContainer[float]
    mu_star: _containers.RepeatedScalarFieldContainer[float]
    sigma: _containers.RepeatedScalarFieldContainer[float]
    mu_star_conf: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mu: _Optional[_Iterable[float]] = ..., mu_star: _Optional[_Iterable[float]] = ..., sigma: _Optional[_Iterable[float]] = ..., mu_star_conf: _Optional[_Iterable[float]] = ...) -> None: ...

class AnalyzeResult(_message.Message):
    __slots__ = ("model", "version", "request_id", "names", "evaluations", "output_mean", "output_variance", "sobol", "dgsm", "morris")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MEAN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    SOBOL_FIELD_NUMBER: _ClassVar[int]
    DGSM_FIELD_NUMBER: _ClassVar[int]
    MORRIS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    request_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    evaluations: int
    output_mean: float
    output_variance: float
    sobol: SobolIndices
    dgsm: DgsmMeasures
    morris: MorrisMeasures
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., evaluations: _Optional[int] = ..., output_mean: _Optional[float] = ..., output_variance: _Optional[float] = ..., sobol: _Optional[_Union[SobolIndices, _Mapping]] = ..., dgsm: _Optional[_Union[DgsmMeasures, _Mapping]] = ..., morris: _Optional[_Union[MorrisMeasures, _Mapping]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: AnalyzeResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[AnalyzeResult, _Mapping]] = ...) -> None: ...
