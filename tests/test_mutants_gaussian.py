"""The feature Gaussian at its edges: the collinearity threshold, parameters, messages, devices, loaded files.

Each test pins a value or a boundary of :mod:`flowaudit.stats.gaussian` that the estimator tests do not
reach, so that a changed constant, comparison or message fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from flowaudit.stats import gaussian
from flowaudit.stats.gaussian import ESTIMATORS, GaussianOOD


def _collinear(unexplained: float, n: int = 4000, scale: float = 1.0) -> np.ndarray:
    """Two features with unit variance apart from a part of feature 2 that feature 1 leaves unexplained.

    Columns a, b are centred and orthonormal (times √n), so the covariance is exactly
    [[1, 1], [1, 1 + e²]] (times ``scale²``) and 1 - R² of feature 2 is e² / (1 + e²) at any scale.
    """
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(np.c_[np.ones(n), rng.normal(size=(n, 2))])
    a, b = q[:, 1] * np.sqrt(n), q[:, 2] * np.sqrt(n)
    e = np.sqrt(unexplained / (1 - unexplained))
    return scale * np.c_[a, a + e * b]


def test_collinearity_threshold_is_1e_10() -> None:
    assert gaussian._COLLINEAR == 1e-10
    GaussianOOD(estimator="empirical").fit(_collinear(1.5e-10))  # above the threshold: kept
    with pytest.raises(ValueError, match="singular: use a shrinkage estimator"):
        GaussianOOD(estimator="empirical").fit(_collinear(0.5e-10))
    for scale in (1e-3, 10.0):  # the fraction left unexplained counts, not the features' size
        GaussianOOD(estimator="empirical").fit(_collinear(1e-6, scale=scale))
        with pytest.raises(ValueError, match="singular"):
            GaussianOOD(estimator="empirical").fit(_collinear(0.5e-10, scale=scale))


def test_a_residual_exactly_at_the_threshold_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    V = _collinear(3e-10)
    g = GaussianOOD(estimator="empirical").fit(V)
    residual = float((np.diag(g.cholesky_) ** 2 / np.diag(g.covariance_)).min())
    monkeypatch.setattr(gaussian, "_COLLINEAR", residual)
    GaussianOOD(estimator="empirical").fit(V)  # not below the threshold: kept
    monkeypatch.setattr(gaussian, "_COLLINEAR", np.nextafter(residual, 1.0))
    with pytest.raises(ValueError, match="singular"):
        GaussianOOD(estimator="empirical").fit(V)


def test_estimators_and_parameters() -> None:
    assert ESTIMATORS == ("empirical", "ledoit-wolf", "oas")
    g = GaussianOOD(estimator="oas", device="cpu", block_size=7)
    assert g.get_params() == {"estimator": "oas", "device": "cpu", "block_size": 7}
    assert clone(g).get_params() == g.get_params()
    assert GaussianOOD().get_params() == {"estimator": "ledoit-wolf", "device": None, "block_size": 4096}
    with pytest.raises(ValueError) as e:
        GaussianOOD(estimator="mcd").fit(np.zeros((3, 2)))
    assert str(e.value) == "estimator must be one of ('empirical', 'ledoit-wolf', 'oas'), got 'mcd'"
    for bad in (0, -1, 2.0, "8"):
        with pytest.raises(ValueError, match=f"block_size must be a positive int, got {bad!r}"):
            GaussianOOD(block_size=bad).fit(np.ones((3, 2)))


def test_feature_count_is_checked_when_rows_are_added() -> None:
    g = GaussianOOD().partial_fit(np.random.default_rng(0).normal(size=(20, 3)))
    with pytest.raises(ValueError) as e:
        g.partial_fit(np.zeros((4, 2)))
    assert str(e.value) == "V has 2 features, but GaussianOOD was fitted with 3 features"


def test_the_estimator_uses_its_device_not_the_global_default() -> None:
    V = np.random.default_rng(0).normal(size=(60, 3))
    want = GaussianOOD(estimator="oas").fit(V).score(V[:4])
    with torch.device("meta"):  # every tensor the estimator makes must name its device
        g = GaussianOOD(estimator="oas", device="cpu").fit(V)
        assert np.array_equal(g.score(V[:4]), want)


def test_messages_of_an_empty_or_mismatched_state() -> None:
    with pytest.raises(ValueError) as e:
        GaussianOOD().fit(np.full((3, 2), np.nan))
    assert str(e.value) == "no finite rows to fit (3 rows had non-finite values)"
    empty = GaussianOOD()
    with pytest.raises(NotFittedError) as e:
        GaussianOOD().merge(empty)
    assert str(e.value) == "cannot merge a GaussianOOD that has seen no rows"
    with pytest.raises(NotFittedError) as e:
        GaussianOOD().finalize()
    assert str(e.value) == "This GaussianOOD has seen no rows; call fit(V) or partial_fit(V) first."
    a = GaussianOOD().partial_fit(np.random.default_rng(0).normal(size=(20, 3)))
    with pytest.raises(ValueError) as e:
        a.merge(GaussianOOD().partial_fit(np.zeros((4, 2))))
    assert str(e.value) == "other has 2 features, but GaussianOOD was fitted with 3 features"


def test_a_merge_is_scored_without_an_explicit_finalize() -> None:
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(300, 4)), rng.normal(2.0, 3.0, size=(200, 4))
    g = GaussianOOD().fit(A)
    g.merge(GaussianOOD().partial_fit(B))
    want = GaussianOOD().fit(np.r_[A, B])
    assert np.allclose(g.score(B[:5]), want.score(B[:5]), rtol=1e-10)


def test_a_block_of_non_finite_rows_does_not_end_the_fit() -> None:
    rng = np.random.default_rng(2)
    V = rng.normal(size=(40, 3))
    V[:4] = np.nan  # the first two blocks of two rows hold nothing finite
    g = GaussianOOD(block_size=2).fit(V)
    assert (g.n_, g.n_nonfinite_) == (36, 4)
    assert np.allclose(g.location_, V[4:].mean(0), rtol=1e-12)


def _saved(tmp_path, **attrs) -> str:
    import h5py

    path = tmp_path / "stats.h5"
    GaussianOOD().fit(np.random.default_rng(0).normal(size=(200, 5))).save(path)
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
    return str(path)


def test_a_loaded_file_is_checked_field_by_field(tmp_path) -> None:
    path = _saved(tmp_path, estimator="mcd")
    with pytest.raises(ValueError) as e:
        GaussianOOD.load(path)
    assert str(e.value) == f"{path} is not a valid flowaudit stats file (inconsistent shapes or estimator)"
    path = _saved(tmp_path, n_inputs=199)
    with pytest.raises(ValueError) as e:
        GaussianOOD.load(path)
    assert str(e.value) == f"{path} is not a valid flowaudit stats file (n = 200 inputs, header n_inputs = 199)"


def test_a_loaded_estimate_scores_as_stored(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = GaussianOOD.load(_saved(tmp_path))
    monkeypatch.setattr(GaussianOOD, "finalize", lambda self: pytest.fail("a loaded estimate was refitted"))
    assert g.score(np.zeros((2, 5))).shape == (2,)


def test_fit_forgets_the_earlier_rows_and_takes_blocks_of_one() -> None:
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(50, 3)), rng.normal(5.0, 2.0, size=(60, 3))
    g = GaussianOOD(block_size=1).fit(A)
    g.fit(B)
    want = GaussianOOD().fit(B)
    assert g.n_ == 60 and np.allclose(g.covariance_, want.covariance_, rtol=1e-12)


def test_more_messages() -> None:
    with pytest.raises(NotFittedError) as e:
        GaussianOOD().score(np.zeros((1, 2)))
    assert str(e.value) == "This GaussianOOD is not fitted yet; call fit(V) first."
    with pytest.raises(ValueError) as e:
        GaussianOOD().fit(np.ones((30, 3)))  # features that never vary
    assert str(e.value) == (
        "the ledoit-wolf covariance of 30 inputs with 3 features is singular: fit on more inputs, or on features "
        "that vary"
    )
    with pytest.raises(ValueError) as e:
        GaussianOOD(block_size=0).fit(np.ones((3, 2)))
    assert str(e.value) == "block_size must be a positive int, got 0"


def _edited(tmp_path, name: str, scale: float = 1.0, **change) -> str:
    g = GaussianOOD().fit(scale * np.random.default_rng(0).normal(size=(200, 4)))
    for key, f in change.items():
        setattr(g, key, f(getattr(g, key).copy()))
    path = tmp_path / f"{name}.h5"
    g.save(path)
    return str(path)


def _upper(L):
    L[0, 1] = 1e-3
    return L


def _flat(L):
    L[2, 2] = 0.0
    return L


@pytest.mark.parametrize(
    "name, change, reason",
    [
        ("zero", {"covariance_": np.zeros_like, "cholesky_": np.zeros_like}, "the covariance is zero"),
        ("asymmetric", {"covariance_": lambda c: c + np.triu(np.ones_like(c), 1)}, "the covariance is not symmetric"),
        ("upper", {"cholesky_": _upper}, "cholesky is not a lower triangular factor with a positive diagonal"),
        ("flat", {"cholesky_": _flat}, "cholesky is not a lower triangular factor with a positive diagonal"),
        ("indefinite", {"covariance_": lambda c: c - 10 * np.eye(len(c))}, "the covariance is not positive definite"),
        ("nan", {"location_": lambda v: v * np.nan}, "location holds NaN or Inf values"),
        ("inf", {"sum_sq_": lambda S: S + np.inf}, "sum_sq holds NaN or Inf values"),
    ],
)
def test_why_a_loaded_estimate_is_refused(tmp_path, name: str, change: dict, reason: str) -> None:
    path = _edited(tmp_path, name, **change)
    with pytest.raises(ValueError) as e:
        GaussianOOD.load(path)
    assert str(e.value) == f"{path} is not a valid flowaudit stats file ({reason})"


@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e2])
def test_a_factor_off_by_more_than_1e_8_is_refused_at_any_scale(tmp_path, scale: float) -> None:
    GaussianOOD.load(_edited(tmp_path, "close", scale, cholesky_=lambda L: L * (1 + 0.25e-8)))  # 0.5e-8 of Σ: kept
    path = _edited(tmp_path, "off", scale, cholesky_=lambda L: L * (1 + 0.75e-8))  # 1.5e-8 of Σ: refused
    with pytest.raises(ValueError) as e:
        GaussianOOD.load(path)
    assert str(e.value) == f"{path} is not a valid flowaudit stats file (cholesky is not the covariance's factor)"


def _eye_with(i: int, j: int, value: float):
    def edit(_):
        a = np.eye(4)
        a[i, j] = value
        return a

    return edit


def test_each_tolerance_of_a_loaded_file_includes_its_bound(tmp_path) -> None:
    """The checks allow a deviation of exactly their bound (``≤``): Σ = I with one entry 1e-9 off its mirror,
    a factor whose product is 1e-8 off Σ, a location 1e-9 off ``reference + sum / n``, each exact in floats."""
    eye = _eye_with(0, 0, 1.0)
    cases = {
        "symmetric": {"covariance_": _eye_with(0, 1, 1e-9), "cholesky_": eye},
        "factor": {"covariance_": eye, "cholesky_": _eye_with(1, 0, 1e-8)},
        "location": {
            "reference_": np.zeros_like,
            "sum_": np.zeros_like,
            "location_": lambda v: np.array([1e-9, 0.0, 0.0, 0.0]),
        },
    }
    for name, change in cases.items():
        back = GaussianOOD.load(_edited(tmp_path, name, **change))
        if "covariance_" in change:
            assert np.array_equal(back.covariance_, change["covariance_"](None))
    assert back.location_.tolist() == [1e-9, 0, 0, 0] and back.score([[1e-9, 0, 0, 0]]) == 0.0
