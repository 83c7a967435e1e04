r"""Certificates: the bound on blow-up a site's structure guarantees, whatever the condition.

A site certifies when its inverse can only move a value by a bounded amount.
Write :math:`x = c^{-1}(y)` for the inverse a sample runs through.

* **Identity-tail spline on a fixed interval** (``rq-spline``, the interval
  :math:`[-B, B]` read from the live object by ``Site.tail_start()``, not
  from the condition): outside the interval :math:`x = y`; inside, both
  :math:`x` and :math:`y` lie in :math:`[-B, B]`. Hence, for every condition,

  .. math:: |c^{-1}(y) - y| \le 2B \quad\text{and}\quad |c^{-1}(y)| \le \max(|y|, B).

  The large inverse gains of the inner bins stay inside the interval: they
  cannot blow a value up. This site is ``certified`` with ``displacement`` 2B.
* **Modified RQ spline** (Hong et al. 2023, S1.2): :math:`c(x) = \mathrm{RQ}(x) + t`
  on :math:`[B_1, B_2]`, :math:`x + t` outside, so with :math:`z = y - t`,

  .. math:: |c^{-1}(y) - y| \le |t| + (B_2 - B_1) \le |t| + 2\max(|B_1|, |B_2|).

  The tails have gain exactly 1 (no multiplicative blow-up), but the bias
  :math:`t` is a raw output of the conditioner (``reference_models/couplings.py``
  bounds neither it nor the conditioner's input, which in a coupling includes
  the other half of the sample): the structure does not bound it. The site is
  **not** certified; the entry gives the structural part (``displacement``,
  ``plus_bias: true``) and the largest :math:`|t|` met under the scanned
  conditions (``bias_max_scanned``, read as :math:`c(v) - v` past the interval
  through ``Site.map_at``), with ``bound_scanned`` = their sum — a figure for
  the scanned conditions, not for every condition.
* **Additive** (:math:`c(x) = x + t`): :math:`|c^{-1}(y) - y| = |t|`, the
  same story with displacement 0.
* **Anything else** (affine, affine-bounded, prior, unknown): the inverse
  multiplies by :math:`1/c'`, which the structure does not cap at 1 on the
  tails; not certified (the reason is given).

**The model** (:func:`model_certificate`) is certified when every site is, every site was reached
while sampling (``coverage.complete``) and no site violates on the evidence (a violation voids the
site's certificate: the evidence beats the structure it rests on);
its ``bound`` is the sum of the sites' displacements: no sample value ends
further than that from where the sites alone would leave it, i.e. the total
the sites add in the :math:`\infty`-norm along the pass. What it does **not**
cover: the non-elementwise layers between sites (1×1 convolutions, ActNorm,
squeezes, splits) act linearly and multiply values and displacements by
their own operator norms (:math:`\|W^{-1}\|_\infty`, :math:`\max e^{-\ell}`);
the adapter protocol does not expose their weights, so the bound is stated
for the sites and ``scope`` says so. A model with no site is never
certified.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["site_certificate", "model_certificate", "BIASED"]

#: kinds whose identity tails carry a condition-dependent bias t (c(x) = x + t past the interval)
BIASED = ("additive", "modified-rq-spline")
SCOPE = (
    "sum over sites of the displacement |c⁻¹(y) − y| their structure allows; linear layers between "
    "sites (1×1 convolutions, ActNorm) multiply by their own operator norms and are not included"
)


def _bias_max(site: Any, params: list[Any], start: float) -> float | None:
    """Largest ``|c(v) − v|`` past the interval under the kept parameters (the bias ``t``); ``None`` if unreadable."""
    v = torch.tensor([-(2 * start + 1), 2 * start + 1], dtype=torch.float64)
    top = None
    for p in params:
        try:
            c = site.map_at(v.to(p.device) if isinstance(p, Tensor) else v, p).detach().to(torch.float64)
        except NotImplementedError:
            return None
        t = (c - v.to(c.device)[:, None]).abs()
        t = t[torch.isfinite(t)]
        if t.numel():
            top = max(top or 0.0, float(t.max()))
    return top


def site_certificate(site: Any, params: list[Any] | None = None, bounds: Any = None) -> dict:
    """The structural bound on one site's displacement (module docstring); JSON-ready.

    ``bounds``: the tail bounds to certify from (the site's own, else those its kind stands for, as
    the Remark 2 structural reading chose them); default ``site.tail_bounds()``.
    """
    bounds = site.tail_bounds() if bounds is None else bounds
    start, kind = site.tail_start(), site.kind
    identity_tails = bounds is not None and float(bounds[0]) == float(bounds[1]) == 1.0
    out: dict[str, Any] = {"certified": False, "displacement": None, "plus_bias": False, "tail_gain": None, "why": None}
    if not identity_tails:
        low = None if bounds is None else float(bounds[0])
        out["tail_gain"] = None if low is None else (1.0 / low if low > 0 else math.inf)
        if kind == "prior":
            out["why"] = "a prior's σ(y) is not bounded by structure: its inverse scales ε by σ"
        elif bounds is None:
            out["why"] = "no structure to read: tail bounds unknown"
        else:
            out["why"] = (
                f"tails not the identity: c' ∈ [{bounds[0]:.4g}, {bounds[1]:.4g}], "
                f"the inverse multiplies values by up to {out['tail_gain']:.4g} per site"
            )
        return out
    out["tail_gain"] = 1.0
    if kind == "additive":
        start = 0.0
    if start is None:
        out["why"] = (
            "identity tails, but where they start is not known (tail_start unknown, may depend on the condition)"
        )
        return out
    out["displacement"] = 2.0 * float(start)
    if kind in BIASED:
        out["plus_bias"] = True
        out["why"] = "the bias t is an unbounded output of the conditioner: |c⁻¹(y) − y| ≤ displacement + |t|"
        b = _bias_max(site, params or [], float(start))
        out["bias_max_scanned"] = b
        out["bound_scanned"] = None if b is None else out["displacement"] + b
        return out
    out["certified"] = True
    return out


def model_certificate(entries: list[dict], coverage: dict | None = None) -> dict:
    """``model.certificate``: ``certified`` when every site is and every site was reached, ``bound`` the
    sum of displacements; otherwise ``blocking`` names each site (or the coverage) that prevents it."""
    certs = [(e["name"], e["remark2"]["structural"]["certificate"]) for e in entries]
    blocking = [{"site": n, "why": c["why"]} for n, c in certs if not c["certified"]]
    cov = coverage or {}
    if certs and not cov.get("complete", True):
        unvisited = cov.get("unvisited") or []
        blocking += [{"site": n, "why": "never reached while sampling"} for n in unvisited]
        if not unvisited:
            blocking.append({"site": None, "why": f"coverage incomplete: {cov.get('reason')}"})
    ok = bool(certs) and not blocking
    out = {
        "certified": ok,
        "bound": sum(c["displacement"] for _, c in certs) if ok else None,
        "scope": SCOPE,
        "blocking": blocking,
    }
    if not certs:
        out["why"] = "no sites found"
    scanned = [c["displacement"] if c["certified"] else c.get("bound_scanned") for _, c in certs]
    out["bound_scanned"] = sum(scanned) if certs and all(s is not None for s in scanned) else None
    return out
