"""The feature Gaussian at its edges: the collinearity threshold, parameters, messages, devices, loaded files.

Each test pins a value or a boundary of :mod:`flowaudit.stats.gaussian` that the estimator tests do not
reach, so that a changed constant, comparison or message fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from flowaudit.stats import gaussian
from flowaudit.stats.gaussian import ESTIMATORS, GaussianOOD


def _collinear(unexplained: float, n: int = 4000) -> np.ndarray:
    """Two features with unit variance apart from a part of feature 2 that feature 1 leaves unexplained.

    Columns a, b are centred and orthonormal (times √n), so the covariance is exactly
    [[1, 1], [1, 1 + e²]] and 1 - R² of feature 2 is e² / (1 + e²).
    """
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(np.c_[np.ones(n), rng.normal(size=(n, 2))])
    a, b = q[:, 1] * np.sqrt(n), q[:, 2] * np.sqrt(n)
    e = np.sqrt(unexplained / (1 - unexplained))
    return np.c_[a, a + e * b]


def test_collinearity_threshold_is_1e_10() -> None:
    assert gaussian._COLLINEAR == 1e-10
    GaussianOOD(estimator="empirical").fit(_collinear(1.5e-10))  # above the threshold: kept
    with pytest.raises(ValueError, match="singular: use a shrinkage estimator"):
        GaussianOOD(estimator="empirical").fit(_collinear(0.5e-10))


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
