r"""Exploding-inverse risk: per-sample checks and the aggregate figures of Table 1 / Fig. 4b.

Per input (K samples each):

* ``n_inf`` — samples with a non-finite value (%Inf counts inputs with ≥ 1);
* ``n_pixel_err`` — samples with a value outside the error band, the valid
  range widened as in S1.1 ([0, 1] → [-0.5, 1.5]); a NaN is outside;
* ``max_abs`` — the largest :math:`|x|` over the samples (inf if any Inf/NaN);
* LR-PSNR (SR only) — PSNR between the bicubic-downscaled sample (clamped to
  [0, 1], non-finite → saturated, as a saved image would be) and the LR input;
  its minimum and standard deviation over the K samples.

Aggregates: %Inf, %PixelErr, mean LR-PSNR min/σ, the logistic fit
:math:`P(\text{pixel error} \mid s_{OOD})` (scikit-learn), the AUROC of
``s_OOD`` for "has a pixel error" and Spearman's ρ between ``s_OOD`` and the
pixel-error rate (SciPy).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..config.sampling import Sampling

__all__ = ["sample_checks", "lr_psnr", "aggregate", "logistic_fit"]


def sample_checks(x: Tensor, sampling: Sampling, band: tuple[float, float]) -> dict[str, Tensor]:
    """Per-input counts for a batch of samples ``x`` (input-major rows)."""
    flat = x.detach().flatten(1)
    finite = torch.isfinite(flat)
    bad_sample = ~finite.all(1)
    inside = (flat >= band[0]) & (flat <= band[1])  # NaN compares False: outside
    err_sample = ~inside.all(1)
    a = flat.abs().to(torch.float64)
    a = torch.where(torch.isnan(a), torch.full_like(a, math.inf), a)
    return {
        "n_inf": sampling.per_input(bad_sample).sum(1),
        "n_pixel_err": sampling.per_input(err_sample).sum(1),
        "max_abs": sampling.per_input(a.amax(1)).amax(1),
    }


def lr_psnr(sr: Tensor, lr: Tensor, scale: int, sampling: Sampling) -> Tensor:
    """LR-PSNR of each sample (dB), shape (inputs, K): bicubic ↓``scale`` of the sample vs its LR input."""
    s = torch.nan_to_num(sr.detach(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    down = torch.nn.functional.interpolate(
        s, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)
    ref = sampling.repeat(lr.detach())
    mse = ((down - ref) ** 2).flatten(1).mean(1).to(torch.float64)
    return sampling.per_input(10 * torch.log10(1.0 / mse.clamp_min(1e-12)))


def logistic_fit(s_ood: np.ndarray, has_error: np.ndarray) -> dict | None:
    r"""Logistic regression of "has a pixel error" on ``s_OOD`` (paper Fig. 4b).

    Returns the coefficients in the original units
    (:math:`P = \sigma(\text{intercept} + \text{coef}\cdot s_{OOD})`) or ``None``
    when one class is missing or no score is finite.
    """
    from sklearn.linear_model import LogisticRegression

    ok = np.isfinite(s_ood)
    s, e = s_ood[ok], has_error[ok].astype(int)
    if len(np.unique(e)) < 2:
        return None
    mu, sd = s.mean(), s.std() or 1.0
    clf = LogisticRegression(C=1e6).fit(((s - mu) / sd)[:, None], e)
    coef = float(clf.coef_[0, 0]) / sd
    return {"intercept": float(clf.intercept_[0]) - coef * mu, "coef": coef}


def predict(fit: dict | None, s_ood: np.ndarray) -> np.ndarray:
    """Risk: the fitted probability of a pixel error for each ``s_OOD`` (NaN without a fit)."""
    if fit is None:
        return np.full(len(s_ood), np.nan)
    z = fit["intercept"] + fit["coef"] * np.where(
        np.isfinite(s_ood), s_ood, np.nanmax(s_ood[np.isfinite(s_ood)], initial=0)
    )
    return 1.0 / (1.0 + np.exp(-z))


def aggregate(records: list[dict], samples: int, temperature: float) -> dict:
    """The ``risk`` section of the report from per-input records (adds each record's ``risk``)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    n = len(records)
    n_inf = np.array([r["n_inf"] for r in records])
    n_err = np.array([r["n_pixel_err"] for r in records])
    s = np.array([r["s_ood"] if r["s_ood"] is not None else np.nan for r in records], dtype=float)
    has_err = n_err > 0
    out = {
        "n_inputs": n,
        "samples_per_input": samples,
        "temperature": temperature,
        "pct_inf": 100.0 * float((n_inf > 0).mean()) if n else math.nan,
        "pct_pixel_err": 100.0 * float(has_err.mean()) if n else math.nan,
    }
    psnr_min = [r["lr_psnr_min"] for r in records if r.get("lr_psnr_min") is not None]
    if psnr_min:
        out["lr_psnr_min"] = float(np.mean(psnr_min))
        out["lr_psnr_std"] = float(np.mean([r["lr_psnr_std"] for r in records if r.get("lr_psnr_std") is not None]))
    scored = np.isfinite(s)
    both = scored.any() and len(np.unique(has_err[scored])) == 2
    out["auroc"] = float(roc_auc_score(has_err[scored], s[scored])) if both else None
    rate = n_err / samples
    out["spearman"] = (
        float(spearmanr(s[scored], rate[scored]).statistic) if scored.sum() > 2 and np.ptp(rate[scored]) > 0 else None
    )
    fit = logistic_fit(s, has_err) if scored.any() else None
    out["logistic"] = fit
    for r, p in zip(records, predict(fit, s)):
        r["risk"] = None if np.isnan(p) else float(p)
    ranked = sorted(
        range(n), key=lambda i: (-(records[i]["risk"] or 0.0), -rate[i], -(s[i] if np.isfinite(s[i]) else 1e300))
    )
    out["ranked"] = [records[i]["id"] for i in ranked[:20]]
    return out
