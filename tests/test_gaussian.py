"""Tests for flowaudit.stats.gaussian (Mahalanobis s_OOD) and the atomic writer."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from sklearn.base import clone
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf, ledoit_wolf
from sklearn.exceptions import NotFittedError

from flowaudit.stats.gaussian import ESTIMATORS, GaussianOOD
from flowaudit.utils.atomic import atomic_dir, atomic_path

SKLEARN = {"empirical": EmpiricalCovariance, "ledoit-wolf": LedoitWolf, "oas": OAS}
TOL = 1e-8


def correlated(n: int, D: int, seed: int, offset: float = 3.0) -> np.ndarray:
    """Gaussian rows with a random non-isotropic covariance and a non-zero mean."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(D, D)) / np.sqrt(D) + np.diag(rng.uniform(0.5, 2.0, D))
    return rng.normal(size=(n, D)) @ A.T + offset * rng.normal(size=D)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs difference relative to the largest reference entry."""
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def assert_same_fit(a: GaussianOOD, b: GaussianOOD, X: np.ndarray, tol: float = 1e-11) -> None:
    assert a.n_ == b.n_ and a.n_nonfinite_ == b.n_nonfinite_
    assert rel(a.location_, b.location_) < tol
    assert rel(a.covariance_, b.covariance_) < tol
    assert a.shrinkage_ == pytest.approx(b.shrinkage_, rel=tol, abs=1e-300)
    np.testing.assert_allclose(a.score(X), b.score(X), rtol=tol)


CASES = [(e, n, D) for e in ESTIMATORS for n, D in [(500, 16), (40, 64), (300, 1)] if e != "empirical" or n > D]


@pytest.mark.parametrize(("estimator", "n", "D"), CASES)  # empirical with n <= D: see test_few_inputs
def test_matches_sklearn(estimator: str, n: int, D: int) -> None:
    X = correlated(n, D, seed=n + D)
    Y = correlated(200, D, seed=1) * 1.5  # fresh rows, partly far out
    ours = GaussianOOD(estimator=estimator, block_size=64).fit(X)
    ref = SKLEARN[estimator]().fit(X)

    assert ours.n_features_in_ == D and ours.n_ == n
    assert rel(ours.location_, ref.location_) < TOL
    assert rel(ours.covariance_, ref.covariance_) < TOL
    assert ours.shrinkage_ == pytest.approx(getattr(ref, "shrinkage_", 0.0), rel=TOL, abs=1e-300)
    if estimator != "empirical" and D > 1:
        assert 0 < ours.shrinkage_ < 1  # the comparison is not vacuous
    np.testing.assert_allclose(ours.score(Y), np.sqrt(ref.mahalanobis(Y)), rtol=TOL)
    L = ours.cholesky_
    assert ours.cholesky_.dtype == np.float64 and np.allclose(L, np.tril(L))
    assert rel(L @ L.T, ours.covariance_) < 1e-12


def test_partial_fit_equals_fit() -> None:
    X = correlated(600, 12, seed=2)
    whole = GaussianOOD().fit(X)
    parts = GaussianOOD(block_size=50)
    for batch in np.split(X, [0, 1, 37, 237, 400]):  # includes an empty and a one-row batch
        parts.partial_fit(batch)
    parts.finalize()
    assert_same_fit(parts, whole, X)
    np.testing.assert_array_equal(parts.reference_, X[0])


def test_merge_equals_fit() -> None:
    X = correlated(500, 10, seed=3)
    X[300] = 50.0  # shard B's reference row is an outlier, far from A's
    X[[10, 400], 1] = np.nan
    a = GaussianOOD().partial_fit(X[:300])
    b = GaussianOOD().partial_fit(X[300:])
    assert not np.allclose(a.reference_, b.reference_)
    merged = GaussianOOD().merge(a).merge(b).merge(GaussianOOD().partial_fit(X[:0]))
    assert merged.n_ == 498 and merged.n_nonfinite_ == 2
    assert_same_fit(merged.finalize(), GaussianOOD().fit(X), X, tol=1e-10)
    # the merged sums are those of one pass with A's reference
    one_pass = GaussianOOD().partial_fit(X)
    for name in ("sum_", "sum_sq_", "sum_cubic_"):
        assert rel(getattr(merged, name), getattr(one_pass, name)) < 1e-12
    assert merged.sum_quartic_ == pytest.approx(one_pass.sum_quartic_, rel=1e-12)


@pytest.mark.parametrize("estimator", ["empirical", "ledoit-wolf"])
def test_squared_distances_are_chi2(estimator: str) -> None:
    D, n, m = 8, 20_000, 20_000
    rng = np.random.default_rng(4)
    A = rng.normal(size=(D, D)) + 2 * np.eye(D)
    mean = rng.normal(scale=10, size=D)
    X = rng.normal(size=(n + m, D)) @ A.T + mean
    d2 = GaussianOOD(estimator=estimator).fit(X[:n]).score(X[n:]) ** 2

    # Sample p-quantile of m draws: standard error sqrt(p(1-p)/m) / pdf(q_p) (≈ 0.035 at
    # the median, 0.06 at 0.9); 5 standard errors. Estimating μ, Σ from n rows shifts
    # the quantiles by O(D/n) ≈ 4e-4 relative, far below that.
    for p in (0.5, 0.9):
        q = scipy.stats.chi2.ppf(p, D)
        se = np.sqrt(p * (1 - p) / m) / scipy.stats.chi2.pdf(q, D)
        assert abs(np.quantile(d2, p) - q) < 5 * se
    assert np.mean(d2) == pytest.approx(D, rel=0.03)


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("estimator", ["empirical", "ledoit-wolf"])
def test_badly_scaled_features_keep_accuracy(estimator: str, offset: float) -> None:
    rng = np.random.default_rng(5)
    std = rng.uniform(0.5, 2.0, size=6)
    X = correlated(2000, 6, seed=6, offset=0.0) * std + offset * std  # mean = offset × std
    ours = GaussianOOD(estimator=estimator, block_size=256).fit(X)

    # float64 reference that centres first (two-pass)
    mu = X.mean(axis=0)
    Xc = X - mu
    cov = Xc.T @ Xc / len(X) if estimator == "empirical" else ledoit_wolf(Xc, assume_centered=True)[0]
    Y = X[:100] + rng.normal(size=(100, 6))
    d = np.linalg.norm(scipy.linalg.solve_triangular(np.linalg.cholesky(cov), (Y - mu).T, lower=True), axis=0)
    assert rel(ours.covariance_, cov) < TOL
    np.testing.assert_allclose(ours.score(Y), d, rtol=TOL)

    if offset == 1e6:  # the raw-moment formula the shift avoids loses ~1e-4 here
        naive = X.T @ X / len(X) - np.outer(mu, mu)
        assert rel(naive, Xc.T @ Xc / len(X)) > 1e-6


def test_few_inputs() -> None:
    X = correlated(30, 50, seed=7)
    for estimator in ("ledoit-wolf", "oas"):
        assert np.isfinite(GaussianOOD(estimator=estimator).fit(X).score(X)).all()
    for n in (30, 50):  # n < D and n = D
        with pytest.raises(
            ValueError, match=r"singular: use a shrinkage estimator \(estimator='ledoit-wolf' or 'oas'\)"
        ):
            GaussianOOD(estimator="empirical").fit(correlated(n, 50, seed=7))
    for seed in range(6):  # n > D, rank D - 1: round-off makes Cholesky fail or pass with a ~1e-15 pivot
        collinear = correlated(200, 5, seed=seed)
        collinear[:, 4] = 2 * collinear[:, 0] - collinear[:, 1] if seed % 2 else 0.3 * collinear[:, 0]
        with pytest.raises(ValueError, match="singular"):
            GaussianOOD(estimator="empirical").fit(collinear)
    with pytest.raises(ValueError, match="singular"):
        GaussianOOD().fit(np.ones((10, 3)))  # no spread at all


def test_nonfinite_rows() -> None:
    X = correlated(300, 6, seed=9)
    bad = X.copy()
    bad[[0, 5, 299], 2] = [np.nan, np.inf, -np.inf]
    est = GaussianOOD(block_size=64).fit(bad)
    assert est.n_nonfinite_ == 3 and est.n_ == 297
    clean = GaussianOOD().fit(np.delete(X, [0, 5, 299], axis=0))
    assert rel(est.covariance_, clean.covariance_) < 1e-12
    np.testing.assert_array_equal(est.reference_, X[1])  # first finite row

    s = est.score(bad)
    assert np.isinf(s[[0, 5, 299]]).all() and np.isfinite(np.delete(s, [0, 5, 299])).all()
    np.testing.assert_allclose(np.delete(s, [0, 5, 299]), clean.score(np.delete(X, [0, 5, 299], axis=0)), rtol=1e-12)
    assert np.isinf(est.score(np.full((2, 6), 1e300))).all()  # overflow is inf too, no crash
    with pytest.raises(ValueError, match="no finite rows"):
        GaussianOOD().fit(np.full((4, 6), np.nan))


def test_feature_mismatch() -> None:
    est = GaussianOOD().fit(correlated(100, 5, seed=10))
    with pytest.raises(ValueError, match=r"V has 4 features, but GaussianOOD was fitted with 5 features"):
        est.score(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"has 7 features.*with 5 features"):
        est.partial_fit(np.zeros((3, 7)))
    with pytest.raises(ValueError, match="2-D"):
        est.score(np.zeros(5))


def test_torch_input_and_api() -> None:
    X = correlated(200, 4, seed=11).astype(np.float32)
    est = GaussianOOD().fit(torch.from_numpy(X))
    out = est.score(torch.from_numpy(X))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out, GaussianOOD().fit(X).score(X.astype(np.float64)))
    assert clone(est).get_params() == {"estimator": "ledoit-wolf", "device": None, "block_size": 4096}
    assert not hasattr(clone(est), "location_")
    with pytest.raises(NotFittedError):
        GaussianOOD().score(X)
    with pytest.raises(ValueError, match="estimator must be one of"):
        GaussianOOD(estimator="mcd").fit(X)
    lazy = GaussianOOD().partial_fit(X)  # score finalizes pending sums
    np.testing.assert_array_equal(lazy.score(X), GaussianOOD().fit(X).score(X))


def test_save_load_roundtrip(tmp_path) -> None:
    X = correlated(400, 9, seed=12)
    X[3] = np.nan
    est = GaussianOOD(estimator="oas").fit(X)
    meta = dict(
        layers=["rrdb.1", "rrdb.8"], pooling="avg", fingerprint="ab12", data="train/", model="toy", seed=3, tau=0.9
    )
    path = tmp_path / "stats.h5"
    est.save(path, **meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.h5"]

    back = GaussianOOD.load(path)
    assert back.metadata_ == meta
    assert back.estimator == "oas" and back.n_ == 399 and back.n_nonfinite_ == 1
    assert back.shrinkage_ == est.shrinkage_
    for name in ("location_", "covariance_", "cholesky_", "reference_", "sum_", "sum_sq_", "sum_cubic_"):
        np.testing.assert_array_equal(getattr(back, name), getattr(est, name))
    np.testing.assert_array_equal(back.score(X), est.score(X))

    with h5py.File(path) as f:
        assert {"n", "reference", "sum", "sum_sq", "location", "covariance", "cholesky"} <= set(f)
        assert f.attrs["dim"] == 9 and f.attrs["n_inputs"] == 399 and f.attrs["estimator"] == "oas"
        assert f.attrs["flowaudit_version"] and f.attrs["layers"] == '["rrdb.1", "rrdb.8"]'

    back.partial_fit(X[:10])  # a loaded model keeps streaming; metadata survives a re-save
    back.save(path, note="more")
    assert GaussianOOD.load(path).metadata_ == {**meta, "note": "more"}
    with pytest.raises(ValueError, match="reserved"):
        est.save(tmp_path / "x.h5", dim=3)


def test_load_rejects_other_files(tmp_path) -> None:
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(ValueError, match="is not a flowaudit stats file"):
        GaussianOOD.load(garbage)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["y"] = np.zeros(3)
    with pytest.raises(ValueError, match="is not a flowaudit stats file"):
        GaussianOOD.load(other)
    with pytest.raises(FileNotFoundError):
        GaussianOOD.load(tmp_path / "missing.h5")


def test_atomic_path(tmp_path) -> None:
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        tmp.write_text("one")
    assert target.read_text() == "one" and list(tmp_path.iterdir()) == [target]

    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "one" and list(tmp_path.iterdir()) == [target]

    fresh = tmp_path / "new.txt"
    with pytest.raises(RuntimeError), atomic_path(fresh) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert not fresh.exists() and list(tmp_path.iterdir()) == [target]

    est = GaussianOOD().fit(correlated(50, 3, seed=13))  # a failing save leaves nothing either
    with pytest.raises(TypeError, match="metadata 'bad'"):
        est.save(tmp_path / "stats.h5", bad={"a": 1})
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_dir(tmp_path) -> None:
    target = tmp_path / "report"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        (tmp / "a.txt").write_text("one")
    assert [p.name for p in tmp_path.iterdir()] == ["report"] and (target / "a.txt").read_text() == "one"

    with pytest.raises(FileExistsError, match="exists"), atomic_dir(target):
        pass
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["report"] and [p.name for p in target.iterdir()] == ["a.txt"]

    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert [p.name for p in tmp_path.iterdir()] == ["report"] and [p.name for p in target.iterdir()] == ["b.txt"]
