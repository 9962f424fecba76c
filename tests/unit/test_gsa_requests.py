"""SDK side of global sensitivity analysis: request building and result decoding (no server)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradserve import InvalidArgument
from gradserve._gsa import SensitivityResult, build_request, decode_result
from gradserve.v1 import global_sensitivity_service_pb2 as pb


def test_bounds_of_one_input_and_of_several() -> None:
    req = build_request("m", "sobol", bounds=[(0, 1), (-2, 2)], samples=64, seed=3, second_order=True)
    assert [(f.input, f.index, list(f.params)) for f in req.factors] == [("", 0, [0, 1]), ("", 1, [-2, 2])]
    assert req.method == pb.ANALYSIS_METHOD_SOBOL and req.seed == 3 and req.sobol.second_order
    assert not req.HasField("output_element") and req.output_name == "" and req.output_index == 0
    req = build_request("m", "dgsm", bounds={"a": [(0, 1)], "b": [(1, 2), (3, 4)]}, samples=8, output="y", target=-1)
    assert [(f.input, f.index) for f in req.factors] == [("a", 0), ("b", 0), ("b", 1)]
    assert req.output_name == "y" and req.output_element == -1 and not req.HasField("seed")


def test_problem_dict_with_inputs_and_distributions() -> None:
    problem = {"names": ["s", "k", "v"], "bounds": [[80, 120], [0, 0.3], [0, 1, 0.5]],
               "dists": ["unif", "lognorm", "triang"], "inputs": ["a", "b", "a"]}
    req = build_request("m", "sobol", problem=problem, samples=16)
    assert [(f.name, f.input, f.index, f.distribution) for f in req.factors] == [
        ("s", "a", 0, pb.DISTRIBUTION_UNIFORM), ("k", "b", 0, pb.DISTRIBUTION_LOGNORMAL),
        ("v", "a", 1, pb.DISTRIBUTION_TRIANGULAR)]


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"bounds": [(0, 1)], "problem": {"bounds": [[0, 1]]}}, "exactly one"),
    ({"bounds": [(0, 1, 2)]}, "expected \\(low, high\\)"),
    ({"bounds": ["ab"]}, "pairs of numbers"),
    ({"problem": {"bounds": [[0, 1]], "dists": ["cauchy"]}}, "'cauchy' is not one of"),
    ({"problem": {"bounds": [[0, 1]], "names": ["a", "b"]}}, "one entry per factor"),
    ({"bounds": [(0, 1)], "target": "argmax"}, "target"),
    ({"bounds": [(0, 1)], "seed": -1}, "seed"),
])
def test_bad_arguments_raise_before_a_call(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        build_request("m", "sobol", samples=8, **kwargs)


def test_result_mapping_frame_and_table() -> None:
    msg = pb.AnalyzeResult(model="m", version=2, names=["a", "b"], evaluations=40, output_mean=1.0,
                           output_variance=2.0)
    msg.sobol.s1.extend([0.25, 0.5])
    msg.sobol.s1_conf.extend([0.01, 0.02])
    msg.sobol.st.extend([0.5, 0.75])
    msg.sobol.st_conf.extend([0.03, 0.04])
    msg.sobol.s2.extend([math.nan, 0.25, math.nan, math.nan])
    msg.sobol.s2_conf.extend([math.nan, 0.05, math.nan, math.nan])
    r = decode_result(msg)
    assert isinstance(r, SensitivityResult) and r.method == "sobol" and r.version == 2
    assert set(r) == {"names", "evaluations", "S1", "S1_conf", "ST", "ST_conf", "S2", "S2_conf"}
    np.testing.assert_array_equal(r["S1"], [0.25, 0.5])
    assert r["S2"].shape == (2, 2) and r["S2"][0, 1] == 0.25 and r.evaluations == 40 and r.names == ["a", "b"]
    lines = r.table().splitlines()
    assert lines[0].split() == ["factor", "S1", "ST"] and "± 0.01" in lines[1]
    assert lines[1].split() == ["a", "0.25", "±", "0.01", "0.5", "±", "0.03"] and str(r) == r.table()
    frame = r.to_frame()
    assert frame.loc["b", "ST_conf"] == 0.04 and list(frame.columns) == ["S1", "S1_conf", "ST", "ST_conf"]
