r"""Remark 2 (Hong et al. 2023 §3.4): is a site's inverse safe for large :math:`|x|`?

A site is safe when its derivative's lower and upper bounds meet for large
:math:`|x|`. Two views, combined into one verdict:

* **structural**, from the kind: ``additive``, ``rq-spline`` and
  ``modified-rq-spline`` have identity tails (``compliant``); ``affine`` has
  :math:`c' = s \in (10^{-4}, 1]` and ``affine-bounded``
  :math:`c' \in (0.1, 1.1)`, bounds that do not meet (``violates``); a
  ``prior`` is affine in :math:`x` with a condition-dependent σ and an
  ``unknown`` map has no structure to read (``inconclusive``).
* **measured**: :math:`c'` at probe points :math:`\pm|x|` log-spaced from 1 to
  10⁴, under the parameters met while sampling the scanned conditions;

  .. math:: \text{tail ratio} = \frac{\min c'}{\max c'}

  over all probe points and conditions (1 = identity tails). The report also
  gives ``bound_ratio``, the same ratio over every parameter the kind allows
  (affine: :math:`10^{-4}`), which no measurement can raise.

A site is ``compliant`` only if both agree; a measured ratio below the
threshold makes any site ``violates`` — so a spline whose identity tails
start beyond a condition-dependent bound cannot pass by construction.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["STRUCTURAL", "probe_values", "tail_ratio", "verdict", "probe_site"]

STRUCTURAL = {
    "affine": "violates",
    "affine-bounded": "violates",
    "additive": "compliant",
    "rq-spline": "compliant",
    "modified-rq-spline": "compliant",
    "prior": "inconclusive",
    "unknown": "inconclusive",
}


def probe_values(low: float = 1.0, high: float = 1e4, n: int = 17) -> Tensor:
    """Probe points ±logspace(low, high): both signs, float64."""
    v = torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64)
    return torch.cat([-v.flip(0), v])


def tail_ratio(derivatives: Tensor) -> float:
    """``min c' / max c'`` over the finite probe results; NaN when there are none."""
    d = derivatives[torch.isfinite(derivatives)]
    if d.numel() == 0:
        return math.nan
    top = float(d.max())
    return float(d.min()) / top if top > 0 else 0.0


def verdict(kind: str, ratio: float, threshold: float = 0.5) -> str:
    """Combine the structural view of ``kind`` with a measured tail ratio (see module docstring)."""
    structural = STRUCTURAL.get(kind, "inconclusive")
    if structural == "violates" or (not math.isnan(ratio) and ratio < threshold):
        return "violates"
    if math.isnan(ratio):
        return "inconclusive"
    if structural == "compliant" or kind == "prior":  # a prior's c' does not depend on x: the measurement is the tail
        return "compliant"
    return "inconclusive"


def probe_site(site: Any, params: list[Any], threshold: float = 0.5, values: Tensor | None = None) -> dict:
    """Probe one site under the kept parameter samples; the ``remark2`` report entry."""
    values = probe_values() if values is None else values
    results = [site.derivative_at(values.to(p.device) if isinstance(p, Tensor) else values, p) for p in params]
    d = torch.cat([r.flatten() for r in results]) if results else torch.empty(0)
    ratio = tail_ratio(d.to(torch.float64))
    finite = d[torch.isfinite(d)]
    bounds = site.tail_bounds()
    return {
        "verdict": verdict(site.kind, ratio, threshold),
        "structural": STRUCTURAL.get(site.kind, "inconclusive"),
        "tail_ratio": ratio,
        # what the kind allows at all, whatever the conditions: affine s in (1e-4, 1] gives 1e-4
        "bound_ratio": None if bounds is None else (bounds[0] / bounds[1] if bounds[1] > 0 else 0.0),
        "threshold": threshold,
        "derivative_min": float(finite.min()) if finite.numel() else math.nan,
        "derivative_max": float(finite.max()) if finite.numel() else math.nan,
        "probe": {"abs_x_min": float(values.abs().min()), "abs_x_max": float(values.abs().max()), "n_values": int(values.numel()), "n_points": int(d.numel() // max(values.numel(), 1))},
    }
