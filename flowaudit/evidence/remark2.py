r"""Remark 2 (Hong et al. 2023 §3.4): is a site's inverse safe for large :math:`|x|`?

A site is safe when the lower and upper bounds of its derivative :math:`c'`
meet for large :math:`|x|`, whatever the condition. Each site gets three kinds
of evidence, labelled as such in the report:

* ``structural`` — what the parametrisation allows, whatever the condition:
  the kind (``additive`` and identity-tail splines comply, ``affine`` with
  :math:`c' = s \in (10^{-4}, 1]` and ``affine-bounded`` with
  :math:`c' \in (0.1, 1.1)` violate, a ``prior`` and an ``unknown`` map have no
  structure to read), the tail bounds :math:`(s_l, s_u)` the live object allows
  and their ratio ``bound_ratio``, where the tails start (``tail_start``), and
  the certificate (:mod:`flowaudit.evidence.certificate`).
* ``measured`` — the tail ratio under the parameters met while sampling the
  scanned conditions (a reservoir of them, :class:`~flowaudit.tracing.trace.Tracer`):

  .. math:: \text{tail ratio} = \frac{\min c'}{\max c'}

  over probe points :math:`\pm|x|` and conditions, **where the tails are**:
  from :math:`10\,B` to :math:`10^4 B` when the site says its tails start at
  :math:`B` (``Site.tail_start()``), over :math:`[1, 10^4]` when every
  :math:`|x|` is a tail (:math:`B = 0`, affine maps), and for an unknown
  start decade by decade from :math:`|x| = 1` until :math:`\min c'` and
  :math:`\max c'` each move by less than ``tol`` (in log) between successive
  decades; the ratio is then taken over those last two decades and
  ``settled`` says whether they agreed (at most ``max_decades`` decades).
* ``worst_case`` — what an attack on the condition reached (``None`` until one
  ran; :mod:`flowaudit.evidence.attack` passes one dict per site, see :func:`probe_site`).

**Verdict rule** (``threshold`` τ, default 0.5; ``rests_on`` names the evidence):

1. the attack found conditions whose tail ratio is below τ
   (``worst_case["tail_ratio"]``) → ``violates``, on ``worst_case``;
2. the structure violates → ``violates``, on ``structural`` (the measured
   figures are still reported: they say whether the scanned data reach it;
   ``worst_case`` is added when the attack blew the inverse up through the site);
3. the measured tail ratio is below τ → ``violates``, on ``measured`` (so a
   spline whose identity tails start beyond a condition-dependent bound cannot
   pass on its kind's name);
4. the structure complies → ``compliant``, on ``structural`` (and ``measured``
   when a settled measurement agrees). An attack that broke a sample with a
   large gain at such a site (``worst_case["reached"]``) is reported beside it
   but does not flip it: the tails are the identity by construction, so the
   gain came from the bounded interval or the bias (see the certificate);
5. no structure to read: the attack reached a blow-up through the site →
   ``violates``, on ``worst_case``; a ``prior`` (its :math:`c'` does not depend
   on :math:`x`, so the measurement is its tail) with a measured ratio ≥ τ →
   ``compliant``, on ``measured``; anything else → ``inconclusive``.

The model's verdict (:func:`model_verdict`) is ``no sites found`` when the
adapter saw no site — an audit that saw nothing must not look clean —, else
``violates`` if any site does, ``compliant`` if all do, ``inconclusive``
otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .certificate import site_certificate

__all__ = [
    "STRUCTURAL",
    "EVIDENCE",
    "probe_values",
    "tail_ratio",
    "verdict",
    "combine",
    "structural_evidence",
    "measured_evidence",
    "probe_site",
    "evidence_words",
    "model_verdict",
]

STRUCTURAL = {
    "affine": "violates",
    "affine-bounded": "violates",
    "additive": "compliant",
    "rq-spline": "compliant",
    "modified-rq-spline": "compliant",
    "prior": "inconclusive",
    "unknown": "inconclusive",
}
EVIDENCE = ("structural", "measured", "worst_case")
PER_DECADE = 4


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


def _ratio(lo: float, hi: float) -> float:
    if math.isnan(lo) or math.isnan(hi):
        return math.nan
    return lo / hi if hi > 0 else 0.0


# -- the evidence ---------------------------------------------------------------------------------


def structural_evidence(site: Any, threshold: float = 0.5) -> dict:
    """What the live site's parametrisation allows, whatever the condition (no sampling needed)."""
    bounds = site.tail_bounds()
    ratio = None if bounds is None else _ratio(float(bounds[0]), float(bounds[1]))
    v = STRUCTURAL.get(site.kind, "inconclusive")
    if site.kind not in STRUCTURAL or site.kind == "unknown":  # a kind of its own: the bounds it reports
        v = "inconclusive" if ratio is None else ("compliant" if ratio >= threshold else "violates")
    start = site.tail_start()
    return {
        "verdict": v,
        "tail_bounds": None if bounds is None else [float(bounds[0]), float(bounds[1])],
        "bound_ratio": ratio,
        "tail_start": None if start is None else float(start),
    }


def _decade_stats(site: Any, params: list[Any], low: float, closed: bool = False) -> tuple[float, float, int]:
    """(min c', max c', number of points) over ±|x| in [low, 10·low) (``closed``: up to 10·low) under every kept parameter."""
    v = low * 10 ** (torch.arange(PER_DECADE + int(closed), dtype=torch.float64) / PER_DECADE)
    v = torch.cat([-v.flip(0), v])
    lo, hi, n = math.inf, -math.inf, 0
    for p in params:
        d = site.derivative_at(v.to(p.device) if isinstance(p, Tensor) else v, p).detach().to(torch.float64)
        d = d[torch.isfinite(d)]
        if d.numel():
            lo, hi, n = min(lo, float(d.min())), max(hi, float(d.max())), n + int(d.numel())
    return (lo, hi, n) if n else (math.nan, math.nan, 0)


def _agree(a: tuple[float, float, int], b: tuple[float, float, int], tol: float) -> bool:
    """Two decades' (min, max) within ``tol`` of each other in log (both exactly 0 counts as agreeing)."""
    for x, y in ((a[0], b[0]), (a[1], b[1])):
        if math.isnan(x) or math.isnan(y) or min(x, y) < 0:
            return False
        if x == y:
            continue
        if min(x, y) == 0 or abs(math.log(x / y)) > tol:
            return False
    return True


def measured_evidence(
    site: Any, params: list[Any], threshold: float = 0.5, tol: float = 1e-3, max_decades: int = 8
) -> dict:
    """The tail ratio under the kept parameters, probed where the tails are (module docstring)."""
    start = site.tail_start()
    known = start is not None
    low = 10.0 * start if known and start > 0 else 1.0
    n_decades = (3 if start > 0 else 4) if known else max_decades
    stats: list[tuple[float, float, int]] = []
    settled = False
    if params:
        for k in range(n_decades):
            stats.append(_decade_stats(site, params, low * 10**k, closed=known and k == n_decades - 1))
            settled = len(stats) > 1 and _agree(stats[-2], stats[-1], tol)
            if settled and not known:
                break
    used = stats if known else stats[-2:]
    lo = min((s[0] for s in used if not math.isnan(s[0])), default=math.nan)
    hi = max((s[1] for s in used if not math.isnan(s[1])), default=math.nan)
    ratio = _ratio(lo, hi)
    first = len(stats) - len(used)
    top = low * 10**n_decades if known else low * 10 ** (len(stats) - 1 + (PER_DECADE - 1) / PER_DECADE)
    if math.isnan(ratio):
        v = "inconclusive"
    elif ratio < threshold:
        v = "violates"
    else:
        v = "compliant" if (known or settled) else "inconclusive"
    return {
        "verdict": v,
        "tail_ratio": ratio,
        "derivative_min": lo,
        "derivative_max": hi,
        "settled": settled if len(stats) > 1 else None,
        "probe": {
            "abs_x_min": low * 10**first if stats else math.nan,
            "abs_x_max": top if stats else math.nan,
            "start": "tail_start" if known else "settling",
            "tail_start": start,
            "decades": len(stats),
            "tolerance": tol,
            "n_values": 2 * (PER_DECADE * len(stats) + int(known and bool(stats))),
            "n_points": sum(s[2] for s in stats),
        },
    }


# -- the verdict ----------------------------------------------------------------------------------


def combine(
    structural: str, measured: dict, worst_case: dict | None, kind: str, threshold: float = 0.5
) -> tuple[str, list[str]]:
    """The verdict and the evidence it rests on, by the rule in the module docstring."""
    wc_ratio = (worst_case or {}).get("tail_ratio")
    if wc_ratio is not None and not math.isnan(wc_ratio) and wc_ratio < threshold:
        return "violates", ["worst_case"]
    reached = bool((worst_case or {}).get("reached"))
    if structural == "violates":
        return "violates", ["structural", "worst_case"] if reached else ["structural"]
    m = measured.get("verdict", "inconclusive")
    if m == "violates":
        return "violates", ["measured", "worst_case"] if reached else ["measured"]
    if structural == "compliant":
        return "compliant", ["structural", "measured"] if m == "compliant" else ["structural"]
    if reached:  # no structure to read, and the attack blew the inverse up through this site
        return "violates", ["worst_case"]
    if kind == "prior" and m == "compliant":  # c' does not depend on x: the measurement is the tail
        return "compliant", ["measured"]
    return "inconclusive", ["measured"] if m == "compliant" else []


def verdict(kind: str, ratio: float, threshold: float = 0.5) -> str:
    """The verdict of a site of ``kind`` with a measured (settled) tail ``ratio`` and no attack."""
    m = "inconclusive" if math.isnan(ratio) else ("violates" if ratio < threshold else "compliant")
    return combine(STRUCTURAL.get(kind, "inconclusive"), {"verdict": m}, None, kind, threshold)[0]


def probe_site(
    site: Any, params: list[Any], threshold: float = 0.5, worst_case: dict | None = None, reservoir: dict | None = None
) -> dict:
    """The ``remark2`` report entry of one site: verdict, ``rests_on``, the three kinds of evidence.

    ``params`` are the kept parameter points (what :meth:`Site.derivative_at` takes);
    ``worst_case`` is the attack's evidence for this site: a dict with at least ``reached``
    (bool: the attack drove this site to a violation or a blow-up) and, when known,
    ``distance`` (size of the perturbation that did it), ``max_inverse_gain``, ``tail_ratio``
    and ``budget``; ``None`` (no attack ran) keeps ``worst_case: null``. ``reservoir``
    describes what ``params`` hold (:meth:`Tracer.reservoir_info`).
    """
    structural = structural_evidence(site, threshold)
    structural["certificate"] = site_certificate(site, params)
    measured = measured_evidence(site, params, threshold)
    if reservoir is not None:
        measured["probe"]["reservoir"] = reservoir
    v, rests_on = combine(structural["verdict"], measured, worst_case, site.kind, threshold)
    entry = {
        "verdict": v,
        "rests_on": rests_on,
        "tail_ratio": measured["tail_ratio"],
        "threshold": threshold,
        # flat copies kept for readers of earlier reports
        "bound_ratio": structural["bound_ratio"],
        "derivative_min": measured["derivative_min"],
        "derivative_max": measured["derivative_max"],
        "probe": measured["probe"],
        "structural": structural,
        "measured": measured,
        "worst_case": worst_case,
    }
    entry["words"] = evidence_words(entry)
    return entry


def evidence_words(r2: dict) -> str:
    """One line in words: "violates by structure; not reached on your data; reached by the attack at distance 15"."""
    from ..utils.format import fmt

    s, m, w = r2["structural"], r2["measured"], r2.get("worst_case")
    parts = [
        {"violates": "violates by structure", "compliant": "complies by structure"}.get(
            s["verdict"], "no structure to read"
        )
    ]
    ratio = m.get("tail_ratio")
    if ratio is None or math.isnan(ratio):
        parts.append("not measured (site not visited)")
    else:
        word = "reached" if ratio < r2["threshold"] else "not reached"
        parts.append(f"{word} on your data (tail ratio {fmt(ratio)})")
        if m.get("settled") is False and m["probe"].get("start") == "settling":
            parts.append(f"c' not settled by |x| = {fmt(m['probe']['abs_x_max'])}")
    if w:
        dist = f" at distance {fmt(w['distance'])}" if w.get("distance") is not None else ""
        parts.append(f"reached by the attack{dist}" if w.get("reached") else "not reached by the attack")
    return "; ".join(parts)


def model_verdict(entries: list[dict], coverage: dict) -> dict:
    """The model-level ``remark2`` entry (module docstring): verdict, counts and what it rests on."""
    verdicts = [e["remark2"]["verdict"] for e in entries]
    n_bad = verdicts.count("violates")
    if not entries:
        v = "no sites found"
    elif n_bad:
        v = "violates"
    elif all(x == "compliant" for x in verdicts) and coverage.get("complete", True):
        v = "compliant"
    else:
        v = "inconclusive"
    rests = sorted({r for e in entries for r in e["remark2"].get("rests_on", [])}, key=EVIDENCE.index)
    return {
        "verdict": v,
        "rests_on": rests,
        "n_sites": len(entries),
        "n_violates": n_bad,
        "n_compliant": verdicts.count("compliant"),
        "n_inconclusive": verdicts.count("inconclusive"),
        "reason": coverage.get("reason"),
    }
