r"""Gaussian model of encoder features and the Mahalanobis OOD score (paper §3.3).

The encoder features :math:`v = g_\theta(y)` of the training inputs are
modelled as one Gaussian :math:`\mathcal{N}(\mu, \Sigma)`; an input's OOD
score is its Mahalanobis distance from it (Hong et al., 2023, eq. 10–11),

.. math:: s_{\text{OOD}}(y') = d_M(v', \mu, \Sigma) = \sqrt{(v' - \mu)^\top \Sigma^{-1} (v' - \mu)} .

The fit streams: :meth:`GaussianOOD.partial_fit` only accumulates float64
sufficient statistics, :meth:`GaussianOOD.merge` combines two such states
exactly (the sums a distributed fit all-reduces), :meth:`GaussianOOD.finalize`
turns them into the estimate. :meth:`GaussianOOD.save` /
:meth:`GaussianOOD.load` persist a fitted model as an HDF5 ``stats.h5``
(:mod:`flowaudit.stats.stats_file`).

References:
    | Robustness of Normalizing Flows for Inverse Problems in Imaging (Hong et al., 2023)
    | https://arxiv.org/abs/2308.01302

    | A well-conditioned estimator for large-dimensional covariance matrices (Ledoit & Wolf, 2004)
    | https://doi.org/10.1016/S0047-259X(03)00096-4

    | Shrinkage Algorithms for MMSE Covariance Estimation (Chen et al., 2010)
    | https://arxiv.org/abs/0907.4698
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import Tensor

from .stats_file import read_stats, write_stats

__all__ = ["ESTIMATORS", "GaussianOOD"]

ESTIMATORS = ("empirical", "ledoit-wolf", "oas")

# Smallest fraction 1 - R² of a feature's variance left unexplained by the features before
# it (the squared Cholesky pivot of the correlation matrix) for the covariance to count as
# non-singular: far above the round-off of exactly collinear features (≈ 1e-13 at n = 1e5),
# far below anything informative (an unexplained std of 1e-5 of the feature's std).
_COLLINEAR = 1e-10

Stats = tuple[int, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float]


class GaussianOOD(BaseEstimator):
    r"""Gaussian fitted on feature vectors; scores rows by their Mahalanobis distance.

    Sufficient statistics are accumulated around a fixed reference :math:`K`
    (the first finite row seen), with :math:`u = v - K`:

    .. math:: n, \quad \textstyle\sum u, \quad \sum u u^\top,
        \quad \sum \lVert u \rVert^2 u, \quad \sum \lVert u \rVert^4 .

    The last two are the contractions of the third and fourth moments that
    the Ledoit–Wolf shrinkage needs. Finalizing re-centres them on the mean
    :math:`\mu = K + \sum u / n` and forms the centred covariance
    :math:`S = \frac{1}{n} \sum (v - \mu)(v - \mu)^\top` (divided by
    :math:`n`, as :class:`sklearn.covariance.EmpiricalCovariance`), then

    .. math:: \Sigma = (1 - \rho) S + \rho \, m I, \qquad m = \operatorname{tr}(S) / D,

    where :math:`\rho = 0` for ``"empirical"`` and the Ledoit–Wolf or OAS
    shrinkage otherwise, with the formulas of
    :class:`sklearn.covariance.LedoitWolf` and :class:`sklearn.covariance.OAS`:

    .. math:: \rho_{\text{LW}} = \min\Big(1, \frac{\sum_k \lVert v_k - \mu \rVert^4 / n
        - \lVert S \rVert_F^2}{n \, \lVert S - m I \rVert_F^2}\Big),
        \qquad \rho_{\text{OAS}} = \min\Big(1, \frac{\lVert S \rVert_F^2 / D^2 + m^2}
        {(n + 1) \lVert S - m I \rVert_F^2 / D^2}\Big) .

    The score is the distance itself (eq. 10, **not squared**), computed with
    the lower Cholesky factor :math:`\Sigma = L L^\top` and a triangular solve,
    :math:`s = \lVert L^{-1} (v - \mu) \rVert_2`; no inverse or pseudo-inverse
    is formed and no ridge is added. A singular :math:`\Sigma` is refused with
    a :class:`ValueError` instead: ``"empirical"`` with :math:`n \le D`, a failed
    Cholesky factorisation, or a feature whose variance the others explain up
    to a fraction below :math:`10^{-10}` (exact collinearity under round-off).

    Numerics: everything in float64 (inputs of other dtypes are cast); the
    shifted sums keep full accuracy when feature means are large compared to
    their spread; rows with a non-finite value are skipped by the fit (counted
    in ``n_nonfinite_``) and score ``inf``.

    ``"ledoit-wolf"`` is the default: encoder features have 256–1024
    dimensions and are often fitted on a few hundred or thousand patches, where
    the empirical covariance is ill-conditioned or singular and its inverse
    amplifies noise. Ledoit–Wolf is well-conditioned for any :math:`n`,
    consistent, and tends to the paper's empirical estimate as :math:`n \to \infty`.

    Unlike :meth:`sklearn.covariance.EmpiricalCovariance.score` (a mean
    log-likelihood), :meth:`score` returns one distance per row.

    Arguments:
        estimator: The covariance estimator, one of ``"empirical"``,
            ``"ledoit-wolf"`` or ``"oas"``.
        device: The torch device the sums and solves run on (default CPU).
        block_size: Rows processed at once by :meth:`partial_fit` and :meth:`score`.

    Attributes:
        n_features_in_ (int): Number of features :math:`D`.
        n_ (int): Number of finite rows accumulated.
        n_nonfinite_ (int): Number of rows skipped because of a non-finite value.
        reference_ (ndarray): The shift :math:`K`, shape :math:`(D,)`.
        sum_, sum_sq_, sum_cubic_, sum_quartic_: The shifted sums above.
        location_ (ndarray): The mean :math:`\mu`, shape :math:`(D,)`.
        covariance_ (ndarray): The final :math:`\Sigma`, shape :math:`(D, D)`.
        shrinkage_ (float): The shrinkage :math:`\rho` (0 for ``"empirical"``).
        cholesky_ (ndarray): Lower factor :math:`L`, shape :math:`(D, D)`.
        metadata_ (dict): Metadata given to :meth:`save` (empty after a fit).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> est = GaussianOOD().fit(rng.normal(size=(500, 8)))
        >>> est.score(np.zeros((2, 8))).shape
        (2,)
    """

    def __init__(
        self,
        *,
        estimator: str = "ledoit-wolf",
        device: str | torch.device | None = None,
        block_size: int = 4096,
    ) -> None:
        self.estimator = estimator
        self.device = device
        self.block_size = block_size

    # fitting

    def fit(self, V: ArrayLike | Tensor, y: Any = None) -> GaussianOOD:
        """Fit on the rows of ``V``, shape :math:`(n, D)`; forgets any earlier state."""
        self._reset()
        return self.partial_fit(V).finalize()

    def partial_fit(self, V: ArrayLike | Tensor, y: Any = None) -> GaussianOOD:
        """Accumulate the rows of ``V`` into the sufficient statistics.

        The estimate itself is computed by :meth:`finalize`, which :meth:`score`
        and :meth:`save` call when new rows have arrived since.
        """
        self._check_params()
        V = _as_2d(V)
        if hasattr(self, "n_"):
            self._check_features(V.shape[1], "V")
        else:
            self._init_state(V.shape[1])

        device = self._device()
        D = self.n_features_in_
        K = None if self.reference_ is None else torch.from_numpy(self.reference_).to(device)
        n = 0
        s = torch.zeros(D, dtype=torch.float64, device=device)
        S = torch.zeros(D, D, dtype=torch.float64, device=device)
        t = torch.zeros(D, dtype=torch.float64, device=device)
        q = torch.zeros((), dtype=torch.float64, device=device)

        for x in _blocks(V, self.block_size, device):
            finite = torch.isfinite(x).all(dim=1)
            if not finite.all():
                self.n_nonfinite_ += int((~finite).sum())
                x = x[finite]
            if len(x) == 0:
                continue
            if K is None:
                K = x[0].clone()
                self.reference_ = K.cpu().numpy()
            u = x - K
            a = u.square().sum(dim=1)
            n += len(u)
            s += u.sum(dim=0)
            S.addmm_(u.mT, u)
            t += a @ u
            q += a.square().sum()

        if n:
            self._add((n, *(z.cpu().numpy() for z in (s, S, t)), float(q)))
        self._stale = True
        return self

    def merge(self, other: GaussianOOD) -> GaussianOOD:
        """Add the sufficient statistics of ``other`` (fitted on other rows) to this one.

        ``other``'s sums are shifted exactly onto this reference :math:`K`, so
        the merged state equals that of one :meth:`partial_fit` over both sets
        of rows, up to rounding. Returns ``self``; call :meth:`finalize` (or
        :meth:`score`) afterwards.
        """
        if not hasattr(other, "n_"):
            raise NotFittedError("cannot merge a GaussianOOD that has seen no rows")
        if hasattr(self, "n_"):
            self._check_features(other.n_features_in_, "other")
        else:
            self._init_state(other.n_features_in_)
        self.n_nonfinite_ += other.n_nonfinite_
        if other.n_:
            if self.reference_ is None:
                self.reference_ = other.reference_.copy()
            delta = self.reference_ - other.reference_
            self._add(_reshift(other._stats(), delta))
        self._stale = True
        return self

    def finalize(self) -> GaussianOOD:
        """Compute ``location_``, ``covariance_``, ``shrinkage_`` and ``cholesky_`` from the sums."""
        self._check_params()
        if not hasattr(self, "n_"):
            raise NotFittedError("This GaussianOOD has seen no rows; call fit(V) or partial_fit(V) first.")
        n, D = self.n_, self.n_features_in_
        if n == 0:
            raise ValueError(f"no finite rows to fit ({self.n_nonfinite_} rows had non-finite values)")
        if self.estimator == "empirical" and n <= D:
            raise ValueError(self._singular_message())

        _, _, S, _, q = _reshift(self._stats(), self.sum_ / n)
        cov = S / n
        cov = (cov + cov.T) / 2
        if D == 1 or self.estimator == "empirical":
            shrinkage = 0.0  # for D = 1 the target is the covariance itself; sklearn reports 0
        elif self.estimator == "ledoit-wolf":
            shrinkage = _ledoit_wolf(cov, q, n)
        else:
            shrinkage = _oas(cov, n)
        if shrinkage:
            mu = np.trace(cov) / D
            cov = (1.0 - shrinkage) * cov
            cov.flat[:: D + 1] += shrinkage * mu

        L, info = torch.linalg.cholesky_ex(torch.from_numpy(cov))
        var = np.diag(cov)
        residual = np.diag(L.numpy()) ** 2 / np.where(var > 0, var, 1.0)  # 1 - R² per feature
        if info.item() != 0 or not (var > 0).all() or residual.min() < _COLLINEAR:
            raise ValueError(self._singular_message())

        self.location_ = self.reference_ + self.sum_ / n
        self.covariance_ = cov
        self.shrinkage_ = float(shrinkage)
        self.cholesky_ = L.numpy()
        if not hasattr(self, "metadata_"):
            self.metadata_ = {}
        self._stale = False
        return self

    # scoring

    def score(self, V: ArrayLike | Tensor) -> NDArray[np.float64]:
        """Mahalanobis distance (not squared) of each row of ``V``, shape :math:`(n, D)`.

        Accepts a NumPy array or a torch tensor (any device); returns a float64
        NumPy array of shape :math:`(n,)`. Rows with a non-finite value score ``inf``.
        """
        self._check_fitted()
        V = _as_2d(V)
        self._check_features(V.shape[1], "V")
        device = self._device()
        L = torch.from_numpy(self.cholesky_).to(device)
        mu = torch.from_numpy(self.location_).to(device)

        out = np.empty(V.shape[0], dtype=np.float64)
        for i, x in enumerate(_blocks(V, self.block_size, device)):
            # rows are solved independently: r = (x - mu) L^-T, so a non-finite row stays in its row
            r = torch.linalg.solve_triangular(L.mT, x - mu, upper=True, left=False)
            d = torch.linalg.vector_norm(r, dim=1).masked_fill(~torch.isfinite(x).all(dim=1), float("inf"))
            out[i * self.block_size : i * self.block_size + len(d)] = d.cpu().numpy()
        return out

    # persistence (the HDF5 layout lives in :mod:`flowaudit.stats.stats_file`)

    def save(self, path: str | os.PathLike[str], **metadata: str | float | list[str]) -> None:
        """Write the fitted model to ``stats.h5``, atomically, with ``metadata`` merged over ``metadata_``.

        Metadata values are strings, numbers or lists (e.g. ``layers``, ``pooling``,
        ``fingerprint``, ``data``, ``model``); the layout is :func:`~flowaudit.stats.stats_file.write_stats`'s.
        """
        self._check_fitted()
        arrays = {
            "n": self.n_,
            "reference": self.reference_,
            "sum": self.sum_,
            "sum_sq": self.sum_sq_,
            "sum_cubic": self.sum_cubic_,
            "sum_quartic": self.sum_quartic_,
            "location": self.location_,
            "covariance": self.covariance_,
            "cholesky": self.cholesky_,
        }
        header = {
            "estimator": self.estimator,
            "shrinkage": self.shrinkage_,
            "dim": self.n_features_in_,
            "n_inputs": self.n_,
            "n_nonfinite": self.n_nonfinite_,
        }
        write_stats(path, arrays, header, {**self.metadata_, **metadata})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device | None = None) -> GaussianOOD:
        """Restore a model written by :meth:`save`; its metadata is in ``metadata_``.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If ``path`` is not a valid flowaudit stats file.
        """
        arrays, header, metadata = read_stats(path)
        D, estimator = int(header["dim"]), str(header["estimator"])
        est = cls(estimator=estimator, device=device)
        est.n_features_in_ = D
        est.n_ = int(arrays["n"])
        est.n_nonfinite_ = int(header["n_nonfinite"])
        for name in ("reference", "sum", "sum_sq", "sum_cubic", "location", "covariance", "cholesky"):
            setattr(est, f"{name}_", np.asarray(arrays[name], dtype=np.float64))
        est.sum_quartic_ = float(arrays["sum_quartic"])
        est.shrinkage_ = float(header["shrinkage"])
        shapes = (
            [est.reference_, est.sum_, est.sum_cubic_, est.location_],
            [est.sum_sq_, est.covariance_, est.cholesky_],
        )
        if (
            estimator not in ESTIMATORS
            or any(a.shape != (D,) for a in shapes[0])
            or any(a.shape != (D, D) for a in shapes[1])
        ):
            raise ValueError(f"{path} is not a valid flowaudit stats file (inconsistent shapes or estimator)")
        if problem := _invalid_estimate(est, int(header["n_inputs"])):
            raise ValueError(f"{path} is not a valid flowaudit stats file ({problem})")
        est.metadata_ = metadata
        est._stale = False
        return est

    # internals

    def _check_params(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not (isinstance(self.block_size, numbers.Integral) and self.block_size > 0):
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_"):
            raise NotFittedError("This GaussianOOD is not fitted yet; call fit(V) first.")
        if self._stale:
            self.finalize()

    def _check_features(self, d: int, name: str) -> None:
        if d != self.n_features_in_:
            raise ValueError(f"{name} has {d} features, but GaussianOOD was fitted with {self.n_features_in_} features")

    def _device(self) -> torch.device:
        return torch.device("cpu" if self.device is None else self.device)

    def _reset(self) -> None:
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("__")]:
            delattr(self, key)
        self.__dict__.pop("_stale", None)

    def _init_state(self, D: int) -> None:
        self.n_features_in_ = D
        self.n_, self.n_nonfinite_, self.reference_ = 0, 0, None
        self.sum_, self.sum_sq_, self.sum_cubic_ = np.zeros(D), np.zeros((D, D)), np.zeros(D)
        self.sum_quartic_ = 0.0

    def _stats(self) -> Stats:
        return self.n_, self.sum_, self.sum_sq_, self.sum_cubic_, self.sum_quartic_

    def _add(self, stats: Stats) -> None:
        n, s, S, t, q = stats
        self.n_ += n
        self.sum_ = self.sum_ + s
        self.sum_sq_ = self.sum_sq_ + S
        self.sum_cubic_ = self.sum_cubic_ + t
        self.sum_quartic_ = self.sum_quartic_ + q

    def _singular_message(self) -> str:
        n, D = self.n_, self.n_features_in_
        fix = (
            "use a shrinkage estimator (estimator='ledoit-wolf' or 'oas') or more inputs than features"
            if self.estimator == "empirical"
            else "fit on more inputs, or on features that vary"
        )
        return f"the {self.estimator} covariance of {n} inputs with {D} features is singular: {fix}"


def _invalid_estimate(est: GaussianOOD, n_inputs: int) -> str:
    r"""Why a loaded estimate cannot score anything ("" when it can).

    A stats file is untrusted: the mean and every sum must be finite, the covariance symmetric
    (to :math:`10^{-9}` of its largest entry) and positive definite, and the stored Cholesky factor
    must be lower triangular with a positive diagonal and reproduce it,
    :math:`\lVert L L^\top - \Sigma \rVert_\infty \le 10^{-8} \max |\Sigma|`. A NaN there would make
    every ``s_OOD`` NaN, and a factor that is not :math:`\Sigma`'s would score against another Gaussian.
    """
    if est.n_ < 1 or est.n_ != n_inputs:
        return f"n = {est.n_} inputs, header n_inputs = {n_inputs}"
    for name in ("reference", "sum", "sum_sq", "sum_cubic", "location", "covariance", "cholesky"):
        if not np.isfinite(getattr(est, f"{name}_")).all():
            return f"{name} holds NaN or Inf values"
    if not (np.isfinite(est.sum_quartic_) and np.isfinite(est.shrinkage_) and 0 <= est.shrinkage_ <= 1):
        return f"sum_quartic {est.sum_quartic_!r} or shrinkage {est.shrinkage_!r} out of range"
    cov, L = est.covariance_, est.cholesky_
    scale = float(np.abs(cov).max())
    if not scale > 0:
        return "the covariance is zero"
    if np.abs(cov - cov.T).max() > 1e-9 * scale:
        return "the covariance is not symmetric"
    if np.triu(L, 1).any() or not (np.diag(L) > 0).all():
        return "cholesky is not a lower triangular factor with a positive diagonal"
    _, info = torch.linalg.cholesky_ex(torch.from_numpy(cov))
    if info.item() != 0:
        return "the covariance is not positive definite"
    if np.abs(L @ L.T - cov).max() > 1e-8 * scale:
        return "cholesky is not the covariance's factor"
    expected = est.reference_ + est.sum_ / est.n_
    if np.abs(expected - est.location_).max() > 1e-9 * max(1.0, float(np.abs(expected).max())):
        return "location does not match reference + sum / n"
    return ""


def _reshift(stats: Stats, delta: NDArray[np.float64]) -> Stats:
    r"""The sums of :math:`u - \delta` from those of :math:`u`."""
    n, s, S, t, q = stats
    c, sd, Sd, tr = delta @ delta, s @ delta, S @ delta, np.trace(S)
    return (
        n,
        s - n * delta,
        S - np.outer(s, delta) - np.outer(delta, s) + n * np.outer(delta, delta),
        t - 2 * Sd + c * s - delta * (tr - 2 * sd + n * c),
        float(q + 4 * delta @ Sd + n * c**2 - 4 * delta @ t + 2 * c * tr - 4 * c * sd),
    )


def _ledoit_wolf(cov: NDArray[np.float64], quartic: float, n: int) -> float:
    """Ledoit–Wolf shrinkage as :func:`sklearn.covariance.ledoit_wolf_shrinkage`, from centred sums."""
    D = len(cov)
    mu = np.trace(cov) / D
    frob2 = np.sum(cov**2)
    beta = (quartic / n - frob2) / (D * n)
    delta = np.sum((cov - mu * np.eye(D)) ** 2) / D
    beta = min(beta, delta)
    return 0.0 if beta <= 0 else float(beta / delta)


def _oas(cov: NDArray[np.float64], n: int) -> float:
    """OAS shrinkage as :func:`sklearn.covariance.oas`."""
    D = len(cov)
    mu = np.trace(cov) / D
    alpha = np.mean(cov**2)
    den = (n + 1) * np.sum((cov - mu * np.eye(D)) ** 2) / D**2  # = (n + 1) (alpha - mu² / D)
    return 1.0 if den <= 0 else float(min((alpha + mu**2) / den, 1.0))


def _as_2d(V: ArrayLike | Tensor) -> np.ndarray | Tensor:
    if not isinstance(V, Tensor):
        V = np.asarray(V)
    if V.ndim != 2:
        raise ValueError(f"expected a 2-D array of shape (n_inputs, n_features), got shape {tuple(V.shape)}")
    return V


def _blocks(V: np.ndarray | Tensor, size: int, device: torch.device) -> Iterator[Tensor]:
    for i in range(0, V.shape[0], size):
        b = V[i : i + size]
        b = b.detach() if isinstance(b, Tensor) else torch.from_numpy(np.ascontiguousarray(b))
        yield b.to(device=device, dtype=torch.float64)
