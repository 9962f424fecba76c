"""SDK side of Shapley values and partial dependence: options, feature groups, request planning and
result shaping (no server)."""
from __future__ import annotations

import numpy as np
import pytest

import gradserve
from gradserve import InvalidArgument, ResourceExhausted
from gradserve._codec import decode
from gradserve._explain import (
    PartialDependenceOptions,
    PartialDependenceResult,
    ShapOptions,
    feature_labels,
    feature_refs,
    plan_partial_dependence,
    plan_shap,
)
from gradserve._models import ModelInfo, TensorInfo, VersionInfo, prepare_inputs
from gradserve._options import Selection
from gradserve._requests import ComputeResult
from gradserve.v1 import sensitivity_service_pb2 as pb

F32 = np.dtype(np.float32)


def info(inputs: dict[str, tuple[int, ...]]) -> ModelInfo:
    version = VersionInfo(1, "READY", "", tuple(TensorInfo(n, F32, s, True) for n, s in inputs.items()),
                          (TensorInfo("y", F32, (-1, 1)),))
    return ModelInfo("m", (version,))


TABULAR = info({"x": (-1, 4)})
IMAGE = info({"image": (-1, 4, 4, 2)})
MULTI = info({"a": (-1, 3), "b": (-1, 2)})


def test_shap_request_carries_rows_background_target_and_options() -> None:
    x, bg = np.ones((3, 4)), np.zeros((5, 4))
    call = plan_shap(TABULAR, "m", x, bg, ShapOptions("exact", None, 7, True), Selection([0, 0, 0], "y", "softmax"))
    (req,) = list(call.requests())
    assert req.method == pb.METHOD_SHAP and req.shap.algorithm == pb.SHAP_ALGORITHM_EXACT
    assert req.shap.HasField("seed") and req.shap.seed == 7 and req.shap.return_base
    assert req.shap.samples == 0 and not req.shap.feature_groups
    assert decode(req.inputs["x"]).dtype == F32 and decode(req.background["x"]).shape == (5, 4)
    assert list(req.target.indices) == [0, 0, 0] and req.target.output_name == "y"
    assert req.target.transform == pb.TRANSFORM_SOFTMAX


def test_shap_rows_go_in_chunks_that_share_the_background_and_come_back_in_order() -> None:
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    call = plan_shap(TABULAR, "m", x, np.zeros((2, 4)), ShapOptions("kernel", 64, 1, True), Selection([0, 1, 0, 1, 0]),
                     batch_size=2)
    requests = list(call.requests())
    assert call.bounds == [(0, 2), (2, 4), (4, 5)]
    assert [list(r.target.indices) for r in requests] == [[0, 1], [0, 1], [0]]
    assert all(decode(r.background["x"]).shape == (2, 4) and r.shap.samples == 64 for r in requests)
    results = [ComputeResult("m", 1, "", attributions={"x": decode(r.inputs["x"]).astype(np.float64)},
                             extras={"base": np.full(len(decode(r.inputs["x"])), 0.5)}) for r in requests]
    phi, base = call.finish(results)
    np.testing.assert_array_equal(phi, x)
    np.testing.assert_array_equal(base, np.full(5, 0.5))


def test_shap_chunks_fit_the_message_limit_and_a_background_too_large_is_refused() -> None:
    x, bg = np.ones((1000, 4), np.float32), np.zeros((100, 4), np.float32)
    call = plan_shap(TABULAR, "m", x, bg, ShapOptions(), Selection(), max_message_bytes=64 * 1024 + 1600 + 48 * 100)
    assert all(stop - start == 100 for start, stop in call.bounds) and call.rows == 1000
    with pytest.raises(ResourceExhausted, match="send fewer background rows"):
        plan_shap(TABULAR, "m", x, np.zeros((10000, 4)), ShapOptions(), Selection(), max_message_bytes=100_000)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "lime"}, "unknown Shapley method 'lime'"),
    ({"samples": 0}, "samples: must be an int of at least 1"),
    ({"samples": -3}, "samples"),
    ({"method": "exact", "samples": 10}, "leave samples None"),
    ({"seed": -1}, "seed"),
])
def test_bad_shap_options_are_refused_before_sending(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        ShapOptions(**kwargs)  # type: ignore[arg-type]


def test_background_is_checked_like_the_inputs() -> None:
    with pytest.raises(InvalidArgument, match="background: dimension 1 is 3"):
        plan_shap(TABULAR, "m", np.ones((2, 4)), np.ones((2, 3)), ShapOptions(), Selection())
    with pytest.raises(InvalidArgument, match="background: dtype complex128 cannot be converted"):
        plan_shap(TABULAR, "m", np.ones((2, 4)), np.ones((2, 4), complex), ShapOptions(), Selection())
    with pytest.raises(InvalidArgument, match="background: no rows"):
        plan_shap(TABULAR, "m", np.ones((2, 4)), np.ones((0, 4)), ShapOptions(), Selection())


def test_feature_groups_as_index_lists_names_inputs_and_label_maps() -> None:
    tabular = prepare_inputs(np.ones((2, 4)), TABULAR.inputs)
    labels, names = feature_labels({"size": [0, 3], "colour": [1], "rest": [2]}, tabular)
    np.testing.assert_array_equal(labels["x"], [0, 1, 2, 0])
    assert names == ["size", "colour", "rest"] and labels["x"].dtype == np.int32
    multi = prepare_inputs({"a": np.ones((1, 3)), "b": np.ones((1, 2))}, MULTI.inputs)
    labels, names = feature_labels(["a", ("b", [1]), ("b", [0])], multi)
    assert names == ["a", "group 1", "group 2"]
    np.testing.assert_array_equal(labels["a"], [0, 0, 0])
    np.testing.assert_array_equal(labels["b"], [2, 1])
    image = prepare_inputs(np.ones((1, 4, 4, 2)), IMAGE.inputs)
    superpixels = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 2, axis=0), 2, axis=1)   # (4, 4): four 2x2 blocks
    labels, names = feature_labels(superpixels, image)
    assert labels["image"].shape == (4, 4, 2) and len(names) == 4
    np.testing.assert_array_equal(labels["image"][..., 0], superpixels)
    np.testing.assert_array_equal(labels["image"][..., 1], superpixels)


@pytest.mark.parametrize("features, match", [
    ([[0, 1], [1, 2, 3]], "element 1 of input 'x' is in groups 0 and 1"),
    ([[0, 1], [2]], r"elements \[3\] of input 'x' are in no group"),
    ([[0, 4], [1, 2, 3]], "index 4 is out of range for input 'x' with 4 elements"),
    ([["a"]], "expected element indices"),
    (["nope"], "unknown input 'nope'"),
    ([], "no groups"),
    (np.zeros((3,), np.int64), "does not fit one example"),
    (np.zeros((4,), np.float32), "holds integers"),
    ("x", "expected a list or dict"),
])
def test_bad_feature_groups_are_refused(features: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        feature_labels(features, prepare_inputs(np.ones((2, 4)), TABULAR.inputs))


def test_groups_ask_for_one_value_per_group() -> None:
    call = plan_shap(TABULAR, "m", np.ones((2, 4)), np.zeros((3, 4)), ShapOptions(), Selection(),
                     features=[[0, 1], [2, 3]])
    (req,) = list(call.requests())
    np.testing.assert_array_equal(decode(req.shap.feature_groups["x"]), [0, 0, 1, 1])
    result = ComputeResult("m", 1, "", attributions={"groups": np.ones((2, 2))})
    assert call.finish([result]).shape == (2, 2)


def test_multi_input_values_mirror_the_inputs() -> None:
    x = [np.ones((2, 3)), np.ones((2, 2))]
    call = plan_shap(MULTI, "m", x, [np.zeros((1, 3)), np.zeros((1, 2))], ShapOptions(), Selection())
    out = call.finish([ComputeResult("m", 1, "", attributions={"a": np.ones((2, 3)), "b": np.zeros((2, 2))})])
    assert isinstance(out, list) and [a.shape for a in out] == [(2, 3), (2, 2)]


def test_partial_dependence_request_and_result() -> None:
    x = np.random.default_rng(0).normal(size=(6, 4))
    options = PartialDependenceOptions(feature_refs((1, 3)), (np.linspace(0, 1, 3), None), 11, (0.1, 0.9), "average")
    call = plan_partial_dependence(TABULAR, "m", x, options, Selection())
    (req,) = list(call.requests())
    pd = req.partial_dependence
    assert req.method == pb.METHOD_PARTIAL_DEPENDENCE and decode(req.inputs["x"]).shape == (6, 4)
    assert [(f.input, f.index) for f in pd.features] == [("", 1), ("", 3)]
    assert [decode(g).size for g in pd.grid] == [3, 0] and pd.grid_resolution == 11
    assert (pd.lower_percentile, pd.upper_percentile, pd.kind) == (0.1, 0.9, pb.PARTIAL_DEPENDENCE_KIND_AVERAGE)
    extras = {"grid_values/0": np.linspace(0, 1, 3), "grid_values/1": np.arange(4.0), "average": np.ones((3, 4))}
    result = call.finish([ComputeResult("m", 1, "", extras=extras)])
    assert isinstance(result, gradserve.PartialDependenceResult)
    assert set(result) == {"grid_values", "grid", "average"} and result.average.shape == (3, 4)
    assert len(result.grid_values) == 2 and result.grid is result["grid_values"]
    one = PartialDependenceResult([np.arange(3.0)], np.ones(3), np.ones((6, 3)))
    np.testing.assert_array_equal(one.grid, np.arange(3.0))
    assert "individual" in one and one.individual.shape == (6, 3)


@pytest.mark.parametrize("feature, expected", [
    (2, (("", 2),)), (("b", 1), (("b", 1),)), ((0, 3), (("", 0), ("", 3))),
    ([("a", 0), ("b", 1)], (("a", 0), ("b", 1))),
])
def test_feature_references(feature: object, expected: object) -> None:
    assert feature_refs(feature) == expected


@pytest.mark.parametrize("make, match", [
    (lambda: feature_refs(-1), "feature: must be an int of at least 0"),
    (lambda: feature_refs((0, 1, 2)), "one feature or a pair"),
    (lambda: feature_refs("x"), "feature"),
    (lambda: PartialDependenceOptions((("", 0),), (), 1), "grid_resolution: must be an int of at least 2"),
    (lambda: PartialDependenceOptions((("", 0),), (), 20, (0.9, 0.1)), "percentiles"),
    (lambda: PartialDependenceOptions((("", 0),), (), 20, (0.05, 1.5)), "percentiles"),
    (lambda: PartialDependenceOptions((("", 0),), kind="mean"), "kind: expected one of"),
])
def test_bad_partial_dependence_options_are_refused(make: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        make()  # type: ignore[operator]
