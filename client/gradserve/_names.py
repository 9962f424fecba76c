"""The names of methods and options and their wire enums: one table per mapping.

The SDK takes and sends these names, the native server reads the enums back as names, and the
Open Inference Protocol's front-end takes the names as request parameters; all three use the
tables here, so a name means the same thing on every path.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

from gradserve.v1 import global_sensitivity_service_pb2 as _gsa_pb2
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["Names", "METHODS", "SMOOTHGRAD_BASES", "TARGET_KINDS", "TRANSFORMS", "QUADRATURES", "AGGREGATIONS",
           "SHAP_ALGORITHMS", "PDP_KINDS", "ANALYSES", "DISTRIBUTIONS"]


class Names(Mapping[str, int]):
    """A name -> wire enum table (a read-only mapping), and the way back (``name``).

    ``default`` is what the wire's 0 (``..._UNSPECIFIED``) stands for (None: nothing).
    """

    def __init__(self, table: Mapping[str, int], default: str | None) -> None:
        self._values = dict(table)
        self._names = {value: name for name, value in table.items()}
        if default is not None:
            self._names[0] = default
        self.default = default

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def name(self, value: int) -> str | None:
        """The name of a wire value (0: the default), or None for a value not in the table."""
        return self._names.get(int(value))


#: Sensitivity methods (``Method``); an unspecified method is a gradient.
METHODS = Names({
    "predict": _pb2.METHOD_PREDICT,
    "gradient": _pb2.METHOD_GRADIENT,
    "input_x_gradient": _pb2.METHOD_INPUT_X_GRADIENT,
    "integrated_gradients": _pb2.METHOD_INTEGRATED_GRADIENTS,
    "smoothgrad": _pb2.METHOD_SMOOTHGRAD,
    "jacobian": _pb2.METHOD_JACOBIAN,
    "jvp": _pb2.METHOD_JVP,
    "vjp": _pb2.METHOD_VJP,
    "hvp": _pb2.METHOD_HVP,
    "grad_cam": _pb2.METHOD_GRAD_CAM,
    "shap": _pb2.METHOD_SHAP,
    "partial_dependence": _pb2.METHOD_PARTIAL_DEPENDENCE,
}, default="gradient")
#: How Shapley values are computed (``ShapAlgorithm``; ``shap(method=...)`` in the SDK).
SHAP_ALGORITHMS = Names({"exact": _pb2.SHAP_ALGORITHM_EXACT, "kernel": _pb2.SHAP_ALGORITHM_KERNEL,
                         "gradient": _pb2.SHAP_ALGORITHM_GRADIENT}, default="kernel")
#: Which curves partial dependence returns (``PartialDependenceKind``).
PDP_KINDS = Names({"average": _pb2.PARTIAL_DEPENDENCE_KIND_AVERAGE,
                   "individual": _pb2.PARTIAL_DEPENDENCE_KIND_INDIVIDUAL,
                   "both": _pb2.PARTIAL_DEPENDENCE_KIND_BOTH}, default="both")
#: The methods SmoothGrad can average (its ``base_method``).
SMOOTHGRAD_BASES = ("gradient", "input_x_gradient", "integrated_gradients")
#: What a target selects per example (``TargetKind``).
TARGET_KINDS = Names({"sum": _pb2.TARGET_KIND_SUM, "index": _pb2.TARGET_KIND_INDEX,
                      "argmax": _pb2.TARGET_KIND_ARGMAX}, default="sum")
#: Transform of the output before its target is taken (``Transform``).
TRANSFORMS = Names({"identity": _pb2.TRANSFORM_IDENTITY, "softmax": _pb2.TRANSFORM_SOFTMAX,
                    "log_softmax": _pb2.TRANSFORM_LOG_SOFTMAX, "sigmoid": _pb2.TRANSFORM_SIGMOID},
                   default="identity")
#: Integrated gradients' quadrature rules (``Quadrature``).
QUADRATURES = Names({"gausslegendre": _pb2.QUADRATURE_GAUSS_LEGENDRE,
                     "riemann_left": _pb2.QUADRATURE_RIEMANN_LEFT,
                     "riemann_right": _pb2.QUADRATURE_RIEMANN_RIGHT,
                     "riemann_middle": _pb2.QUADRATURE_RIEMANN_MIDDLE,
                     "riemann_trapezoid": _pb2.QUADRATURE_RIEMANN_TRAPEZOID}, default="gausslegendre")
#: SmoothGrad's aggregation of the noisy samples (``NoiseAggregation``).
AGGREGATIONS = Names({"mean": _pb2.NOISE_AGGREGATION_MEAN, "square": _pb2.NOISE_AGGREGATION_SQUARE,
                      "var": _pb2.NOISE_AGGREGATION_VAR}, default="mean")
#: Global sensitivity analyses (``AnalysisMethod``); there is no default.
ANALYSES = Names({"sobol": _gsa_pb2.ANALYSIS_METHOD_SOBOL, "dgsm": _gsa_pb2.ANALYSIS_METHOD_DGSM,
                  "morris": _gsa_pb2.ANALYSIS_METHOD_MORRIS}, default=None)
#: Distributions of analysis factors, by SALib's names (``Distribution``); unspecified is uniform.
DISTRIBUTIONS = Names({"unif": _gsa_pb2.DISTRIBUTION_UNIFORM, "norm": _gsa_pb2.DISTRIBUTION_NORMAL,
                       "lognorm": _gsa_pb2.DISTRIBUTION_LOGNORMAL, "triang": _gsa_pb2.DISTRIBUTION_TRIANGULAR},
                      default="unif")
