"""Benchmark :class:`flowaudit.stats.gaussian.GaussianOOD` against :mod:`sklearn.covariance`.

For each feature dimension D and estimator (empirical / Ledoit–Wolf / OAS), fits
both on the same N float64 rows of a synthetic correlated Gaussian, then scores
the same rows with each, and prints fit and score times, their ratios
(ours / sklearn) and the largest relative difference of the distances
(sklearn: ``sqrt(est.mahalanobis(X))``).

sklearn's ``mahalanobis`` goes through scipy's per-pair ``cdist`` and takes
about a second per thousand rows at D = 1024, so only the first ``--n-score``
rows are scored (by both).

Usage::

    python benchmarks/bench_gaussian.py                      # N = 100 000, D = 256 and 1024
    python benchmarks/bench_gaussian.py --n 5000 --dims 64 256 --n-score 2000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf

from flowaudit.stats.gaussian import GaussianOOD

SKLEARN = {"empirical": EmpiricalCovariance, "ledoit-wolf": LedoitWolf, "oas": OAS}


def correlated(n: int, D: int, seed: int = 0) -> np.ndarray:
    """Rows of N(m, U diag(λ) Uᵀ) with λ_k ∝ 1/k (condition number D) and a random mean."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.normal(size=(D, D)))
    A = U * np.sqrt(1.0 / np.arange(1, D + 1))
    X = rng.normal(size=(n, D)) @ A.T
    X += 10.0 * rng.normal(size=D)
    return X


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="rows fitted (default 100000)")
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024], help="feature dimensions")
    parser.add_argument("--n-score", type=int, default=10_000, help="rows scored by both (default 10000)")
    parser.add_argument("--estimators", nargs="+", default=list(SKLEARN), choices=list(SKLEARN))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"N = {args.n}, scored rows = {min(args.n_score, args.n)}, torch threads = {torch.get_num_threads()}")
    header = (
        f"{'D':>5} {'estimator':<12} {'fit ours':>9} {'fit skl':>9} {'ratio':>6} {'score ours':>10} "
        f"{'score skl':>10} {'ratio':>6} {'max rel diff':>12} {'shrinkage':>10}"
    )
    print(header)
    print("-" * len(header))
    for D in args.dims:
        X = correlated(args.n, D)
        Y = X[: args.n_score]
        for name in args.estimators:
            t_fit, ours = timed(lambda: GaussianOOD(estimator=name).fit(X))
            t_fit_sk, ref = timed(lambda: SKLEARN[name]().fit(X))
            t_score, d = timed(lambda: ours.score(Y))
            t_score_sk, d_sk = timed(lambda: np.sqrt(ref.mahalanobis(Y)))
            err = np.max(np.abs(d - d_sk) / d_sk)
            print(
                f"{D:>5} {name:<12} {t_fit:>8.2f}s {t_fit_sk:>8.2f}s {t_fit / t_fit_sk:>6.2f} "
                f"{t_score:>9.3f}s {t_score_sk:>9.2f}s {t_score / t_score_sk:>6.3f} {err:>12.1e} "
                f"{ours.shrinkage_:>10.2e}",
                flush=True,
            )
        X = Y = None  # free this dimension's rows before the next is drawn


if __name__ == "__main__":
    main()
