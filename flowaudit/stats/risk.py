r"""Exploding-inverse risk: per-sample checks and the aggregate figures of Table 1 / Fig. 4b.

Per input (K samples each):

* ``n_inf`` — samples with a non-finite value (%Inf counts inputs with ≥ 1);
* ``n_pixel_err`` — samples with a value outside the error band; a NaN is outside.
  The band (:func:`error_band`) is the user's (``--output-range``), else the valid range the
  adapter states (images: [0, 1]) widened as in S1.1 ([0, 1] → [-0.5, 1.5]), else the range of the
  data's targets widened the same way, else [-0.5, 1.5] with a warning; the report says which;
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
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..adapters import Adapter, widen
from ..config.sampling import Sampling
from ..errors import AuditError

__all__ = [
    "sample_checks",
    "lr_psnr",
    "aggregate",
    "logistic_fit",
    "ErrorBand",
    "error_band",
    "parse_range",
    "band_misfit",
]

#: In-distribution %PixelErr above which the band probably does not fit the model.
MISFIT_PCT = 50.0


@dataclass(frozen=True)
class ErrorBand:
    """Values outside ``[lo, hi]`` count as pixel errors; ``source`` says where the band came from.

    ``source`` is ``flag`` (``--output-range`` / ``output_range=``), ``adapter`` (the valid range the
    model or adapter states, or the image range, widened by half its width), ``targets`` (the data's
    target range widened by half its width) or ``default``; ``detail`` says how in words, and
    ``warning`` is one line when the band is a guess.
    """

    lo: float
    hi: float
    source: str
    detail: str
    warning: str | None = None

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def entry(self) -> dict:
        """The report's ``risk.error_band``."""
        return {"lo": self.lo, "hi": self.hi, "source": self.source, "detail": self.detail, "warning": self.warning}


def _span(lo: float, hi: float) -> str:
    return f"[{lo:.6g}, {hi:.6g}]"


def _states_range(adapter: Adapter) -> bool:
    """Whether the model or its adapter states its valid output range (rather than taking [0, 1] by default)."""
    declared = getattr(adapter, "output_range_declared", None)
    if declared is not None:
        return bool(declared)
    return hasattr(adapter.model, "output_range") or type(adapter).output_range is not Adapter.output_range


def error_band(
    adapter: Adapter, given: tuple[float, float] | None = None, targets: Tensor | None = None
) -> ErrorBand:
    """The band of a scan: ``given``, else the adapter's stated or image range, else the targets', else a default.

    Images (conditions C×H×W, or an SR / low-light task) have outputs in the adapter's range, [0, 1]
    unless stated. Targets widen like S1.1: their range ``[a, b]`` becomes ``[a - w/2, b + w/2]`` with
    ``w = b - a`` (``w = max(|a|, 1)`` when every target is equal).
    """
    if given is not None:
        lo, hi = (float(v) for v in given)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise AuditError(f"--output-range {lo:g},{hi:g}: expected finite LO < HI")
        return ErrorBand(lo, hi, "flag", f"{_span(lo, hi)} given with --output-range")
    valid = tuple(float(v) for v in adapter.output_range)
    image = len(adapter.condition_shape) == 3 or adapter.task in ("sr", "lowlight")
    if _states_range(adapter) or image:
        what = "the valid range the model states" if _states_range(adapter) else "the image range"
        lo, hi = widen(valid)
        return ErrorBand(lo, hi, "adapter", f"{what} {_span(*valid)}, widened by half its width")
    if targets is not None and len(targets):
        a, b = float(targets.min()), float(targets.max())
        w = (b - a) or max(abs(a), 1.0)
        return ErrorBand(
            a - w / 2, b + w / 2, "targets", f"the targets' range {_span(a, b)}, widened by half its width"
        )
    lo, hi = widen(valid)
    return ErrorBand(
        lo,
        hi,
        "default",
        f"the default range {_span(*valid)}, widened by half its width",
        f"error band {_span(lo, hi)} is a default: the outputs are not images, the model states no output range "
        "and the data has no targets; give --output-range LO,HI",
    )


def parse_range(text: str) -> tuple[float, float]:
    """``"LO,HI"`` as two finite floats with LO < HI; ``ValueError`` (one line) otherwise."""
    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise ValueError(f"{text!r}: expected LO,HI, two numbers, e.g. -0.5,1.5") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{text!r}: expected finite LO < HI")
    return lo, hi


def band_misfit(band: dict, pct_pixel_err_in: float | None) -> str | None:
    """One line when in-distribution %PixelErr passes :data:`MISFIT_PCT`: the band probably does not fit."""
    if pct_pixel_err_in is None or not pct_pixel_err_in > MISFIT_PCT:
        return None
    return (
        f"{pct_pixel_err_in:.0f}% of in-distribution inputs leave the error band {_span(band['lo'], band['hi'])} "
        f"({band['source']}): the band probably does not fit the model's outputs; give --output-range LO,HI"
    )


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


def aggregate(records: list[dict], samples: int, temperature: float, *, ranked: bool = True) -> dict:
    """The ``risk`` section of the report from per-input records (adds each record's ``risk``).

    ``ranked``: also name the 20 riskiest inputs (``ranked``): by risk, then pixel-error rate, then ``s_OOD``
    (a missing one last), ties in record order.
    """
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
    risk = predict(fit, s)
    missing = np.isnan(risk)
    for r, p, m in zip(records, risk.tolist(), missing.tolist()):
        r["risk"] = None if m else p
    if ranked:  # np.lexsort: the last key first, the row index settles ties (record order)
        order = np.lexsort((np.arange(n), -np.where(scored, s, 1e300), -rate, -np.where(missing, 0.0, risk)))
        out["ranked"] = [records[i]["id"] for i in order[:20].tolist()]
    return out
