"""The Shapley-value and partial-dependence maths (``dataplane.explain``) against closed forms, the
``shap`` library and scikit-learn, with NumPy functions standing in for the engine (the maths use
no TensorFlow; importing the data plane package loads it)."""
from __future__ import annotations

import asyncio
import itertools
import math
import warnings
from typing import Any

import numpy as np
import pytest

from gradserve.server.core.errors import CancelledError, InvalidArgumentError
from gradserve.server.dataplane.explain import coalitions, grid, paths, shapley, targets
from gradserve.server.dataplane.explain.evaluate import (
    Batch,
    PartialDependenceProblem,
    ShapProblem,
    partial_dependence,
    shap_values,
)
from gradserve.server.dataplane.explain.features import Features

with warnings.catch_warnings():
    # shap imports matplotlib's colormaps, which warn about their own set_bad on import.
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    import shap
    from shap.utils._legacy import DenseData

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(5, 7))
W2 = RNG.normal(size=(7, 3))


def mlp(x: np.ndarray) -> np.ndarray:
    """A small nonlinear model with three outputs."""
    return np.tanh(np.asarray(x, np.float64).reshape(len(x), -1) @ W1) @ W2


def engine(f: Any, calls: list[int] | None = None) -> Any:
    """``predict`` for the explain algorithms: ``f`` on the rows of the single input "x"."""
    async def predict(inputs: dict[str, np.ndarray]) -> np.ndarray:
        if calls is not None:
            calls.append(len(inputs["x"]))
        return np.asarray(f(inputs["x"]), np.float64)
    return predict


def shap_problem(x: np.ndarray, background: np.ndarray, algorithm: str, samples: int = 0, *,
                 features: Features | None = None, target: targets.Target | None = None,
                 seed: int = 1, return_base: bool = False) -> ShapProblem:
    xb, bb = Batch.of({"x": x}), Batch.of({"x": background})
    return ShapProblem(xb, bb, features or Features.per_element(xb.sizes), target or targets.Target(), algorithm,
                       samples, seed, return_base)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def no_check() -> None:
    pass


# -- exact Shapley values and Kernel SHAP's regression ----------------------------------------------
def game_values(v: Any, m: int) -> np.ndarray:
    """Values of every coalition of a game ``v(frozenset)``, column b = the features of b's bits."""
    return np.array([[v(frozenset(i for i in range(m) if b >> i & 1)) for b in range(2 ** m)]])


def test_exact_shapley_of_closed_form_games() -> None:
    # A pure interaction is split equally; a linear game gives each feature its own term; the
    # values always sum to v(all) - v(empty).
    phi = shapley.exact_shapley(game_values(lambda s: float({0, 1} <= s), 3))
    np.testing.assert_allclose(phi, [[0.5, 0.5, 0.0]])
    w = np.array([1.0, -2.0, 3.0, 0.5])
    phi = shapley.exact_shapley(game_values(lambda s: sum(w[i] for i in s), 4))
    np.testing.assert_allclose(phi, [w])
    v = RNG.normal(size=(3, 2 ** 5))
    phi = shapley.exact_shapley(v)
    np.testing.assert_allclose(phi.sum(axis=1), v[:, -1] - v[:, 0], atol=1e-12)


def test_exact_shapley_matches_the_permutation_definition() -> None:
    m = 4
    v = RNG.normal(size=(1, 2 ** m))
    expected = np.zeros(m)
    for order in itertools.permutations(range(m)):
        coalition = 0
        for i in order:
            expected[i] += v[0, coalition | 1 << i] - v[0, coalition]
            coalition |= 1 << i
    np.testing.assert_allclose(shapley.exact_shapley(v)[0], expected / math.factorial(m), atol=1e-12)


@pytest.mark.parametrize("m", [2, 3, 5, 8])
def test_kernel_regression_over_every_coalition_is_exact(m: int) -> None:
    design = coalitions.kernel_coalitions(m, 2 ** m - 2, np.random.default_rng(0))
    assert design.complete and len(design) == 2 ** m - 2
    index = (design.masks * (1 << np.arange(m))).sum(axis=1)
    assert sorted(index.tolist()) == list(range(1, 2 ** m - 1))    # each coalition once
    v = RNG.normal(size=(4, 2 ** m))
    phi = shapley.kernel_shapley(design.masks, design.weights, v[:, index], v[:, -1], v[:, 0])
    np.testing.assert_allclose(phi, shapley.exact_shapley(v), atol=1e-9)


def test_one_feature_takes_the_whole_difference() -> None:
    design = coalitions.kernel_coalitions(1, 100, np.random.default_rng(0))
    assert len(design) == 0 and design.complete
    phi = shapley.kernel_shapley(design.masks.reshape(0, 1), design.weights, np.zeros((2, 0)),
                                 np.array([3.0, 1.0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(phi, [[2.0], [0.0]])


def shap_design(m: int, nsamples: int, seed: int = 0) -> Any:
    """The coalitions, weights and values shap's KernelExplainer used for one row of ``mlp``."""
    background = RNG.normal(size=(6, m))
    x = RNG.normal(size=(1, m))
    f = (lambda z: mlp(np.pad(z, ((0, 0), (0, 5 - m))))[:, 0]) if m <= 5 else (lambda z: np.sin(z).sum(axis=1))
    explainer = shap.KernelExplainer(f, background)
    np.random.seed(seed)
    phi = explainer.shap_values(x, nsamples=nsamples, l1_reg=False, silent=True)
    return explainer, phi, f, x, background


def test_kernel_design_enumerates_the_sizes_shap_enumerates() -> None:
    # 12 features, 500 coalitions: sizes 1 and 11 (24 coalitions) and 2 and 10 (132) are covered
    # whole, in shap's order and with shap's weights; the rest is sampled.
    explainer, *_ = shap_design(12, 500)
    design = coalitions.kernel_coalitions(12, 500, np.random.default_rng(0))
    fixed = 24 + 132
    assert not design.complete
    np.testing.assert_array_equal(design.masks[:fixed], explainer.maskMatrix[:fixed].astype(bool))
    np.testing.assert_allclose(design.weights[:fixed], explainer.kernelWeights[:fixed], rtol=1e-12)
    # The sampled rest: distinct coalitions of the other sizes, in complementary pairs where paired,
    # carrying the weight the enumerated sizes left (as shap's do).
    rest = design.masks[fixed:]
    assert len(rest) == 500 - fixed and len({r.tobytes() for r in rest}) == len(rest)
    assert set(rest.sum(axis=1).tolist()) <= set(range(3, 10))
    np.testing.assert_allclose(design.weights.sum(), explainer.kernelWeights.sum(), rtol=1e-12)


@pytest.mark.parametrize("m, nsamples", [(5, 30), (5, 14), (12, 300)])
def test_kernel_regression_equals_shaps_on_shaps_own_coalitions(m: int, nsamples: int) -> None:
    # Whatever the coalitions (all of them, or shap's partly random ones), the constrained
    # weighted least squares gives shap's answer from shap's coalition values.
    explainer, phi, f, x, background = shap_design(m, nsamples)
    fx, fnull = f(x), np.asarray(explainer.fnull, np.float64).reshape(1)
    ours = shapley.kernel_shapley(explainer.maskMatrix.astype(bool), explainer.kernelWeights,
                                  np.asarray(explainer.ey)[:, 0][None, :], fx, fnull)
    np.testing.assert_allclose(ours, phi, atol=1e-10)


# -- the whole algorithms, with NumPy models ----------------------------------------------------------
def test_kernel_and_exact_equal_shaps_kernel_explainer_where_all_coalitions_are_enumerated() -> None:
    background = RNG.normal(size=(20, 5))
    x = RNG.normal(size=(3, 5))
    f = engine(lambda z: mlp(z)[:, 1])
    explainer = shap.KernelExplainer(lambda z: mlp(z)[:, 1], background)
    expected = explainer.shap_values(x, nsamples=30, silent=True)   # 2**5 - 2: every coalition
    for algorithm in ("exact", "kernel"):
        got = run(shap_values(shap_problem(x, background, algorithm, 30), f, None, chunk_rows=64, check=no_check))
        np.testing.assert_allclose(got.values, expected, atol=1e-9)
        np.testing.assert_allclose(got.base, explainer.expected_value, atol=1e-12)


def test_groups_equal_shaps_grouped_kernel_explainer() -> None:
    groups = [[0, 3], [1], [2, 4]]
    background = RNG.normal(size=(10, 5))
    x = RNG.normal(size=(2, 5))
    explainer = shap.KernelExplainer(lambda z: mlp(z)[:, 2],
                                     DenseData(background, ["a", "b", "c"], [np.array(g) for g in groups]))
    expected = explainer.shap_values(x, nsamples=6, silent=True)
    labels = np.zeros(5, np.int64)
    for g, members in enumerate(groups):
        labels[members] = g
    features = Features.from_labels({"x": labels}, {"x": 5})
    got = run(shap_values(shap_problem(x, background, "kernel", 6, features=features),
                          engine(lambda z: mlp(z)[:, 2]), None, chunk_rows=7, check=no_check))
    np.testing.assert_allclose(got.values, expected, atol=1e-9)


def test_linear_model_gives_w_times_the_distance_to_the_background_mean() -> None:
    w = np.array([1.0, -2.0, 3.0, 0.5])
    background = RNG.normal(size=(8, 4))
    x = RNG.normal(size=(5, 4))
    expected = w * (x - background.mean(axis=0))

    async def gradient(inputs: dict[str, np.ndarray], indices: Any) -> dict[str, np.ndarray]:
        return {"x": np.broadcast_to(w, inputs["x"].shape)}

    predict = engine(lambda z: z @ w + 0.25)
    for algorithm, samples in (("exact", 0), ("kernel", 14), ("kernel", 5000), ("gradient", 24)):
        got = run(shap_values(shap_problem(x, background, algorithm, samples, return_base=True), predict,
                              gradient, chunk_rows=10, check=no_check))
        np.testing.assert_allclose(got.values, expected, atol=1e-9, err_msg=algorithm)
        np.testing.assert_allclose(got.base, background.mean(axis=0) @ w + 0.25, atol=1e-12)


def test_interaction_is_split_equally_and_efficiency_holds() -> None:
    background = RNG.normal(size=(16, 3))
    x = RNG.normal(size=(4, 3))
    product = engine(lambda z: z[:, 0] * z[:, 1])
    for algorithm in ("exact", "kernel"):
        got = run(shap_values(shap_problem(x, np.zeros((1, 3)), algorithm, 6), product, None, chunk_rows=5,
                              check=no_check))
        np.testing.assert_allclose(got.values[:, 0], got.values[:, 1], atol=1e-12)
        np.testing.assert_allclose(got.values[:, 0], x[:, 0] * x[:, 1] / 2, atol=1e-12)
        np.testing.assert_allclose(got.values[:, 2], 0.0, atol=1e-12)
        nonlinear = engine(lambda z: mlp(np.pad(z, ((0, 0), (0, 2))))[:, 0])
        got = run(shap_values(shap_problem(x, background, algorithm, 6), nonlinear, None, chunk_rows=9,
                              check=no_check))
        f_x = mlp(np.pad(x, ((0, 0), (0, 2))))[:, 0]
        np.testing.assert_allclose(got.values.sum(axis=1), f_x - got.base, atol=1e-12)


def test_kernel_with_sampled_coalitions_keeps_efficiency_and_approaches_the_exact_values() -> None:
    background = RNG.normal(size=(10, 5))
    x = RNG.normal(size=(2, 5))
    f = engine(lambda z: mlp(z)[:, 0])
    exact = run(shap_values(shap_problem(x, background, "exact"), f, None, chunk_rows=100, check=no_check))
    sampled = run(shap_values(shap_problem(x, background, "kernel", 20, seed=5), f, None, chunk_rows=100,
                              check=no_check))
    np.testing.assert_allclose(sampled.values.sum(axis=1), exact.values.sum(axis=1), atol=1e-12)
    assert np.abs(sampled.values - exact.values).max() < 0.2 * np.abs(exact.values).max()
    again = run(shap_values(shap_problem(x, background, "kernel", 20, seed=5), f, None, chunk_rows=3,
                            check=no_check))
    np.testing.assert_allclose(again.values, sampled.values, rtol=1e-12)   # same seed, any chunking


def test_argmax_and_index_targets_with_a_softmax_transform() -> None:
    background = RNG.normal(size=(6, 5))
    x = RNG.normal(size=(3, 5))
    f = engine(mlp)
    got = run(shap_values(shap_problem(x, background, "exact", target=targets.Target("argmax", "softmax")), f, None,
                          chunk_rows=50, check=no_check))
    probs = targets.transform(mlp(x), "softmax")
    picked = probs.argmax(axis=1)
    np.testing.assert_array_equal(got.indices, picked)
    np.testing.assert_allclose(got.values.sum(axis=1),
                               probs[np.arange(3), picked] - targets.transform(mlp(background), "softmax")
                               .mean(axis=0)[picked], atol=1e-12)
    index = run(shap_values(shap_problem(x, background, "exact", target=targets.Target("index", "softmax", picked)),
                            f, None, chunk_rows=50, check=no_check))
    np.testing.assert_allclose(index.values, got.values, atol=1e-12)


def test_gradient_points_use_every_background_row_equally_and_stratify_the_path() -> None:
    points = paths.path_points(7, 21, np.random.default_rng(3))
    assert np.bincount(points.background, minlength=7).tolist() == [3] * 7
    for row in range(7):
        t = np.sort(points.alphas[points.background == row])
        assert all(k / 3 <= a < (k + 1) / 3 for k, a in enumerate(t))
    uneven = paths.path_points(7, 9, np.random.default_rng(3))
    assert sorted(np.bincount(uneven.background, minlength=7).tolist()) == [1] * 5 + [2] * 2
    assert paths.default_samples(7) == 203 and paths.default_samples(500) == 500


def test_gradient_shap_of_a_quadratic_converges_to_its_shapley_values() -> None:
    # f = sum of squares: its interventional Shapley values are x_i^2 - E[b_i^2], and expected
    # gradients integrate 2 z along each path: exact with the path points' mean t = 1/2.
    background = RNG.normal(size=(4, 3))
    x = RNG.normal(size=(2, 3))

    async def gradient(inputs: dict[str, np.ndarray], indices: Any) -> dict[str, np.ndarray]:
        return {"x": 2.0 * inputs["x"]}

    got = run(shap_values(shap_problem(x, background, "gradient", 4000), engine(lambda z: (z ** 2).sum(1)), gradient,
                          chunk_rows=333, check=no_check))
    np.testing.assert_allclose(got.values, x ** 2 - (background ** 2).mean(axis=0), atol=0.01)


def test_features_from_labels_are_checked() -> None:
    sizes = {"a": 4, "b": 2}
    f = Features.from_labels({"a": np.array([0, 0, 1, 1]), "b": np.array([[2, 2]])}, sizes)
    assert f.count == 3 and f.grouped
    np.testing.assert_allclose(f.group_sums({"a": np.ones((2, 4)), "b": np.ones((2, 2))}), [[2, 2, 2]] * 2)
    for labels, match in [({"a": np.zeros(4, np.int64)}, "input 'b' has no labels"),
                          ({"a": np.zeros(4), "b": np.zeros(2)}, "must be integers"),
                          ({"a": np.zeros(3, np.int64), "b": np.zeros(2, np.int64)}, "3 labels for 4"),
                          ({"a": np.array([0, 0, 2, 2]), "b": np.zeros(2, np.int64)}, "group 1 has no elements"),
                          ({"a": np.array([0, -1, 0, 0]), "b": np.zeros(2, np.int64)}, "is negative"),
                          ({"a": np.zeros(4, np.int64), "b": np.zeros(2, np.int64), "c": np.zeros(1, np.int64)},
                           "unknown input 'c'")]:
        with pytest.raises(InvalidArgumentError, match=match):
            Features.from_labels(labels, sizes)


def test_a_failed_check_stops_the_work_between_chunks() -> None:
    calls: list[int] = []
    state = {"checks": 0}

    def check() -> None:
        state["checks"] += 1
        if state["checks"] > 4:
            raise CancelledError("the call was cancelled by the caller")

    problem = shap_problem(RNG.normal(size=(2, 5)), RNG.normal(size=(10, 5)), "exact")
    with pytest.raises(CancelledError):
        run(shap_values(problem, engine(mlp, calls), None, chunk_rows=8, check=check))
    assert problem.evaluations == 2 + 10 + 2 * 30 * 10
    assert sum(calls) <= 12 + 2 * 8   # the f(x), f(background) chunk and at most two coalition chunks


# -- partial dependence ---------------------------------------------------------------------------------
class _Estimator:
    """``mlp``'s first output as a scikit-learn regressor (for ``partial_dependence``)."""

    _estimator_type = "regressor"

    def fit(self, x: Any, y: Any = None) -> _Estimator:
        self.fitted_ = True
        return self

    def predict(self, x: Any) -> np.ndarray:
        return mlp(np.asarray(x))[:, 0]

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type="regressor", target_tags=TargetTags(required=True))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {}


def test_grid_axes_match_scikit_learns() -> None:
    from scipy.stats.mstats import mquantiles
    from sklearn.inspection._partial_dependence import _grid_from_X

    x = np.column_stack([RNG.normal(size=50), RNG.integers(0, 4, size=50).astype(float)])
    _, expected = _grid_from_X(x, (0.05, 0.95), (False, False), 20, {})
    ours = [grid.axis_values(x[:, j], (0.05, 0.95), 20) for j in range(2)]
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert len(ours[1]) == 4   # fewer unique values than the resolution: the values themselves
    np.testing.assert_allclose(grid.mquantiles(x[:, 0], [0.1, 0.5, 0.97]), mquantiles(x[:, 0], [0.1, 0.5, 0.97]))
    np.testing.assert_allclose(grid.axis_values(np.arange(40), (0.0, 1.0), 7, integer=True),
                               [0, 6, 13, 20, 26, 32, 39])   # rint: halves to even
    with pytest.raises(InvalidArgumentError, match="too close"):
        grid.axis_values(np.r_[np.zeros(40), np.arange(30)], (0.05, 0.5), 20)


@pytest.mark.parametrize("features", [[2], [0, 3]])
def test_partial_dependence_equals_scikit_learns(features: list[int]) -> None:
    from sklearn.inspection import partial_dependence as sk_partial_dependence

    x = RNG.normal(size=(30, 5))
    expected = sk_partial_dependence(_Estimator().fit(x), x, features, grid_resolution=9, kind="both")
    axes = tuple(grid.axis_values(x[:, j], (0.05, 0.95), 9) for j in features)
    problem = PartialDependenceProblem(Batch.of({"x": x}), tuple(("x", j) for j in features), axes, targets.Target())
    got = run(partial_dependence(problem, engine(lambda z: mlp(z)[:, 0]), chunk_rows=17, check=no_check))
    for a, b in zip(axes, expected["grid_values"]):
        np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(got.average, expected["average"][0], atol=1e-12)
    np.testing.assert_allclose(got.individual, expected["individual"][0], atol=1e-12)
    assert problem.evaluations == 30 * int(np.prod([len(a) for a in axes]))


def test_partial_dependence_of_a_linear_model_is_a_line_through_the_mean() -> None:
    w = np.array([1.0, -2.0, 3.0])
    x = RNG.normal(size=(12, 3)).astype(np.float32)
    axis = np.linspace(-1, 1, 5)
    problem = PartialDependenceProblem(Batch.of({"x": x}), (("x", 1),), (axis,), targets.Target())
    got = run(partial_dependence(problem, engine(lambda z: z @ w), chunk_rows=7, check=no_check))
    others = x.astype(np.float64) @ w - w[1] * x[:, 1]
    np.testing.assert_allclose(got.individual, others[:, None] + w[1] * axis[None, :], atol=1e-5)
    np.testing.assert_allclose(got.average, got.individual.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(np.diff(got.average) / np.diff(axis), w[1], atol=1e-5)
