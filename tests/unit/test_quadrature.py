"""Quadrature rules for integrated gradients: weights, nodes, exactness and chunk layout."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from gradserve.server.compute.methods import quadrature as q


def test_importing_quadrature_does_not_import_tensorflow() -> None:
    # The unit tier runs without TF; the methods package loads its TF modules lazily.
    assert "gradserve.server.compute.methods.quadrature" in sys.modules
    import subprocess

    code = ("import sys; import gradserve.server.compute.methods.quadrature; "
            "sys.exit(1 if 'tensorflow' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("rule", q.RULES)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 301])
def test_weights_sum_to_one_and_nodes_in_unit_interval(rule: str, n: int) -> None:
    alphas, weights = q.nodes_and_weights(rule, n)
    assert alphas.shape == weights.shape == (n,)
    assert alphas.dtype == weights.dtype == np.float64
    assert math.fsum(weights.tolist()) == pytest.approx(1.0, abs=2e-16)
    assert (weights >= 0).all()
    assert (alphas >= 0).all() and (alphas <= 1).all()


def test_riemann_nodes() -> None:
    assert q.nodes_and_weights("riemann_left", 4)[0].tolist() == [0, 0.25, 0.5, 0.75]
    assert q.nodes_and_weights("riemann_right", 4)[0].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert q.nodes_and_weights("riemann_middle", 4)[0].tolist() == [0.125, 0.375, 0.625, 0.875]
    a, w = q.nodes_and_weights("riemann_trapezoid", 5)
    assert a.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(w, [0.125, 0.25, 0.25, 0.25, 0.125], rtol=1e-15)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_gauss_legendre_exact_for_degree_2n_minus_1(n: int) -> None:
    alphas, weights = q.nodes_and_weights("gausslegendre", n)
    for degree in range(2 * n):
        assert float(np.dot(weights, alphas ** degree)) == pytest.approx(1.0 / (degree + 1), rel=1e-12)


def test_trapezoid_exact_for_linear_and_converges_quadratically() -> None:
    a, w = q.nodes_and_weights("riemann_trapezoid", 9)
    assert float(np.dot(w, 3 * a + 2)) == pytest.approx(3.5, rel=1e-14)
    def error(n: int) -> float:
        a, w = q.nodes_and_weights("riemann_trapezoid", n)
        return abs(float(np.dot(w, np.sin(a))) - (1 - math.cos(1)))

    errors = [error(n) for n in (5, 9, 17)]
    assert errors[1] < errors[0] / 3.5 and errors[2] < errors[1] / 3.5


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        q.nodes_and_weights("gausslegendre", 0)
    with pytest.raises(ValueError, match="quadrature"):
        q.nodes_and_weights("simpson", 4)


@pytest.mark.parametrize("per_chunk", [1, 3, 4, 7, 100])
def test_chunked_layout_keeps_points_and_pads_with_zero_weight(per_chunk: int) -> None:
    alphas, weights = q.nodes_and_weights("gausslegendre", 7)
    a, w = q.chunked(alphas, weights, per_chunk)
    k = min(per_chunk, 7)
    assert a.shape == w.shape == (-(-7 // k), k)
    flat_a, flat_w = a.reshape(-1), w.reshape(-1)
    np.testing.assert_array_equal(flat_a[:7], alphas)
    np.testing.assert_array_equal(flat_w[:7], weights)
    assert (flat_w[7:] == 0).all() and (flat_a[7:] == alphas[-1]).all()
