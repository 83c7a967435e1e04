"""The feature Gaussian where the shrinkage formulas meet their edges, checked against scikit-learn.

Exactly isotropic features make the Ledoit–Wolf target distance δ and the OAS denominator exactly 0 (the
``beta <= 0`` and ``den <= 0`` branches); one feature is the ``D = 1`` branch; the tolerances of a loaded
file are tested at half and one and a half times their value; inputs may be nested lists.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf

from flowaudit.stats.gaussian import GaussianOOD

SKLEARN = {"empirical": EmpiricalCovariance, "ledoit-wolf": LedoitWolf, "oas": OAS}


def _isotropic(reps: int = 3) -> np.ndarray:
    """Rows (±1, ±1) around (5, -2): mean (5, -2), covariance exactly I, so S - mI = 0."""
    return np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]] * reps, dtype=float) + np.array([5.0, -2.0])


@pytest.mark.parametrize("estimator, shrinkage", [("ledoit-wolf", 0.0), ("oas", 1.0)])
def test_isotropic_features_take_the_edge_branch_as_sklearn(estimator: str, shrinkage: float) -> None:
    V = _isotropic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the edge is a branch, not a division by zero that NumPy warns about
        g = GaussianOOD(estimator=estimator).fit(V)
    ref = SKLEARN[estimator]().fit(V)
    assert g.shrinkage_ == ref.shrinkage_ == shrinkage
    assert np.array_equal(g.covariance_, np.eye(2)) and np.array_equal(ref.covariance_, np.eye(2))
    assert np.array_equal(g.location_, [5.0, -2.0])
    assert np.allclose(g.score([[6.0, -2.0], [5.0, 1.0]]), [1.0, 3.0], rtol=1e-15)


@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas", "empirical"])
def test_one_feature_has_no_shrinkage(estimator: str) -> None:
    V = np.random.default_rng(0).normal(3.0, 2.0, size=(50, 1))
    g, ref = GaussianOOD(estimator=estimator).fit(V), SKLEARN[estimator]().fit(V)
    assert g.shrinkage_ == 0.0 == getattr(ref, "shrinkage_", 0.0)
    assert g.covariance_[0, 0] == pytest.approx(V.var(), rel=1e-13)
    assert np.allclose(g.covariance_, ref.covariance_, rtol=1e-13)


@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas"])
@pytest.mark.parametrize("spread", [1e-3, 1.0, 30.0])
def test_shrinkage_matches_sklearn_at_every_scale(estimator: str, spread: float) -> None:
    rng = np.random.default_rng(7)
    V = spread * (rng.normal(size=(40, 6)) @ np.diag([1.0, 2.0, 0.5, 1.0, 3.0, 1.5]))
    g, ref = GaussianOOD(estimator=estimator).fit(V), SKLEARN[estimator]().fit(V)
    assert 0.0 < g.shrinkage_ < 1.0
    assert g.shrinkage_ == pytest.approx(ref.shrinkage_, rel=1e-9)
    assert np.allclose(g.covariance_, ref.covariance_, rtol=1e-9, atol=0)


def test_fit_and_score_from_nested_lists() -> None:
    V = np.random.default_rng(1).normal(size=(30, 3))
    a, b = GaussianOOD().fit(V.tolist()), GaussianOOD().fit(V)
    assert np.array_equal(a.covariance_, b.covariance_)
    assert np.array_equal(a.score(V[:3].tolist()), b.score(V[:3]))


@pytest.mark.parametrize("shape", [(6,), (2, 3, 2)])
def test_input_that_is_not_a_matrix_is_one_line(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError) as e:
        GaussianOOD().fit(np.zeros(shape))
    assert str(e.value) == f"expected a 2-D array of shape (n_inputs, n_features), got shape {shape}"


def test_empirical_needs_more_inputs_than_features() -> None:
    V = np.random.default_rng(2).normal(size=(4, 3))
    with pytest.raises(ValueError) as e:
        GaussianOOD(estimator="empirical").fit(V[:3])
    assert str(e.value) == (
        "the empirical covariance of 3 inputs with 3 features is singular: use a shrinkage estimator "
        "(estimator='ledoit-wolf' or 'oas') or more inputs than features"
    )
    g = GaussianOOD(estimator="empirical").fit(V)  # n = D + 1
    assert np.allclose(g.covariance_, EmpiricalCovariance().fit(V).covariance_, rtol=1e-12)
    assert g.shrinkage_ == 0.0


@pytest.mark.parametrize("estimator, shrinkage", [("oas", 1.0), ("empirical", 0.0)])
def test_a_shrinkage_at_either_end_of_0_1_loads(tmp_path, estimator: str, shrinkage: float) -> None:
    g = GaussianOOD(estimator=estimator).fit(_isotropic(5))
    assert g.shrinkage_ == shrinkage
    g.save(tmp_path / "s.h5")
    back = GaussianOOD.load(tmp_path / "s.h5")
    assert back.shrinkage_ == shrinkage and back.estimator == estimator and back.n_ == 20
    assert np.array_equal(back.score([[6.0, -2.0]]), g.score([[6.0, -2.0]]))


def _saved(tmp_path, name: str, shift: float, edit, scale: float = 1.0) -> str:
    g = GaussianOOD().fit(shift + scale * np.random.default_rng(0).normal(size=(200, 4)))
    edit(g)
    path = tmp_path / f"{name}.h5"
    g.save(path)
    return str(path)


@pytest.mark.parametrize("shift", [0.0, 50.0])  # |μ| below 1 and above: the tolerance is relative to max(1, |μ|)
def test_location_tolerance_is_1e_9_relative(tmp_path, shift: float) -> None:
    def moved(by: float):
        def edit(g):
            g.location_ = g.location_ + by * max(1.0, float(np.abs(g.location_).max()))

        return edit

    GaussianOOD.load(_saved(tmp_path, "near", shift, moved(0.5e-9)))
    path = _saved(tmp_path, "far", shift, moved(1.5e-9))
    with pytest.raises(ValueError) as e:
        GaussianOOD.load(path)
    assert str(e.value) == f"{path} is not a valid flowaudit stats file (location does not match reference + sum / n)"


@pytest.mark.parametrize("scale", [0.1, 100.0])  # relative to the largest entry, at any size
def test_symmetry_tolerance_is_1e_9_of_the_largest_entry(tmp_path, scale: float) -> None:
    def skew(by: float):
        def edit(g):
            c = g.covariance_.copy()
            c[0, 3] += by * np.abs(c).max()  # the upper triangle: the factor (of the lower one) still matches
            g.covariance_ = c

        return edit

    GaussianOOD.load(_saved(tmp_path, "near", 0.0, skew(0.5e-9), scale))
    with pytest.raises(ValueError, match="the covariance is not symmetric"):
        GaussianOOD.load(_saved(tmp_path, "far", 0.0, skew(1.5e-9), scale))


@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas"])
def test_shrinkage_fits_fewer_inputs_than_features(estimator: str) -> None:
    """Only the empirical covariance needs n > D: a shrunk one is positive definite for any n ≥ 2."""
    V = np.random.default_rng(4).normal(size=(5, 8))
    g, ref = GaussianOOD(estimator=estimator).fit(V), SKLEARN[estimator]().fit(V)
    assert g.shrinkage_ == pytest.approx(ref.shrinkage_, rel=1e-9)
    assert np.allclose(g.covariance_, ref.covariance_, rtol=1e-9, atol=0)


@pytest.mark.parametrize("field, value", [("shrinkage_", 1.5), ("shrinkage_", -0.25), ("sum_quartic_", np.inf)])
def test_a_shrinkage_outside_0_1_or_an_infinite_quartic_sum_is_refused(tmp_path, field: str, value: float) -> None:
    kept = {}

    def edit(g):
        setattr(g, field, value)
        kept.update(q=float(g.sum_quartic_), rho=float(g.shrinkage_))

    path = _saved(tmp_path, "bad", 0.0, edit)
    with pytest.raises(ValueError) as e:
        GaussianOOD.load(path)
    assert str(e.value) == (
        f"{path} is not a valid flowaudit stats file (sum_quartic {kept['q']!r} or shrinkage {kept['rho']!r} "
        "out of range)"
    )


def test_oas_shrinkage_is_capped_at_one_as_sklearn() -> None:
    """Nearly isotropic features: the OAS ratio is about 5e5, and the shrinkage is its cap, 1."""
    V = _isotropic() + 1e-3 * np.random.default_rng(0).normal(size=(12, 2))
    g, ref = GaussianOOD(estimator="oas").fit(V), OAS().fit(V)
    assert g.shrinkage_ == ref.shrinkage_ == 1.0
    assert np.allclose(g.covariance_, ref.covariance_, rtol=1e-12)


@pytest.mark.parametrize("seed", [109, 147, 162])
def test_empirical_refuses_n_equal_to_d_even_where_round_off_hides_the_singularity(seed: int) -> None:
    """``n ≤ D`` is refused up front, not left to the Cholesky checks: 3 rows in 3 features, two nearly
    collinear (std 1e-3 apart), have a centred covariance of rank 2, yet round-off leaves every squared pivot
    fraction near 1e-8, above the 1e-10 collinearity floor, so only the count catches it."""
    rng = np.random.default_rng(seed)
    x, z = rng.normal(size=(2, 3))
    V = np.c_[x, x + 1e-3 * rng.normal(size=3), z]
    assert np.linalg.matrix_rank(V - V.mean(0)) == 2
    with pytest.raises(ValueError) as e:
        GaussianOOD(estimator="empirical").fit(V)
    assert str(e.value) == (
        "the empirical covariance of 3 inputs with 3 features is singular: use a shrinkage estimator "
        "(estimator='ledoit-wolf' or 'oas') or more inputs than features"
    )


def test_a_constant_feature_is_refused_without_a_numpy_warning() -> None:
    """The empirical covariance of a constant feature has a zero variance: the pivot fraction is not formed
    by dividing by it (no 0/0), and the fit ends in the one singular-covariance message."""
    V = np.random.default_rng(3).normal(size=(10, 3))
    V[:, 1] = 7.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as e:
            GaussianOOD(estimator="empirical").fit(V)
    assert str(e.value) == (
        "the empirical covariance of 10 inputs with 3 features is singular: use a shrinkage estimator "
        "(estimator='ledoit-wolf' or 'oas') or more inputs than features"
    )
