r"""Remark 2 (Hong et al. 2023 §3.4): is a site's inverse safe for large :math:`|x|`?

A site is safe when the lower and upper bounds of its derivative :math:`c'` meet for large
:math:`|x|`, whatever the condition. A declared kind or bound is a *hypothesis*; the evidence tests it.
Each site gets these readings, labelled as such in the report:

* ``structural`` — the tail bounds :math:`(s_l, s_u)` the site reports (read from the live object or
  declared), else the bounds its kind stands for (:data:`KIND_BOUNDS`: ``affine`` an unconstrained
  scale :math:`(0, \infty)`, ``affine-bounded`` :math:`(0.1, 1.1)`, identity tails :math:`(1, 1)`), and
  their ratio ``bound_ratio``; where the tails start (``tail_start``) and the certificate
  (:mod:`flowaudit.evidence.certificate`). Its verdict is the ratio rule below, never the kind's name.
* ``measured`` — the tail probe (:mod:`flowaudit.evidence.probe`) under the parameters met while
  sampling the scanned conditions: :math:`\text{tail ratio} = \min c' / \max c'` over :math:`\pm|x|` out
  to near the float limit.
* ``swept`` — the same probe under parameters met at conditions swept over decades of magnitude
  (:mod:`flowaudit.evidence.sweep`): what the parametrisation does whatever the data.
* ``worst_case`` — what an attack on the condition reached (``None`` until one ran).
* ``gain`` — the size of the inverse gain :math:`1/c'`: its structural supremum on the tails
  (:math:`1/s_l`), the tail probe's maximum, the largest gain met while sampling, and the attack's;
  non-finite gains count, as blow-up at the site where they first appear.

**One ratio rule** (``threshold`` τ, default 0.5): bounds, measurements and worst cases all comply when
:math:`\min c' / \max c' \ge \tau`. **Verdict** (``rests_on`` names the evidence that decided):

1. the attack found conditions whose tail ratio is below τ, or sent this site non-finite values first
   → ``violates``, on ``worst_case``;
2. the site reports bounds that comply, but a measured, swept or worst-case point lies outside them
   (or is non-finite) → ``violates`` (``contradicted`` says by what), and the certificate is void;
3. the bounds violate the ratio rule → ``violates``, on ``structural``;
4. the measured or swept tail ratio is below τ (or non-finite) → ``violates``, on that evidence;
5. the gain is huge (above ``huge_gain``, :data:`HUGE_GAIN`) on a reading that can blow a value up —
   any reading, unless the structure bounds the site's displacement (identity tails past a known
   start: the gain then sits inside a bounded interval) — → ``violates``, on ``gain``, whatever the ratio;
6. the bounds comply → ``compliant``, on ``structural`` (and the evidence that agrees);
7. no bounds to read: the attack blew the inverse up through the site → ``violates``, on ``worst_case``;
   a ``prior`` (its :math:`c'` does not depend on :math:`x`) whose measured ratio complies, or a map whose
   probe settled over the whole range with a ratio ≥ τ (and no sweep against it) → ``compliant``, on
   ``measured``; anything else → ``inconclusive``.

The model's verdict (:func:`model_verdict`) is ``no sites found`` when the adapter saw no site — an audit
that saw nothing must not look clean —, else ``violates`` if any site does, ``compliant`` if all do and
every site was reached, ``inconclusive`` otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .certificate import site_certificate
from .probe import measured_evidence

__all__ = [
    "KIND_BOUNDS",
    "HUGE_GAIN",
    "EVIDENCE",
    "probe_values",
    "tail_ratio",
    "verdict",
    "combine",
    "structural_evidence",
    "measured_evidence",
    "contradiction",
    "gain_reading",
    "probe_site",
    "evidence_words",
    "model_verdict",
]

#: The tail bounds of c' a kind stands for when the site reports none (a hypothesis, judged by the ratio rule).
KIND_BOUNDS: dict[str, tuple[float, float]] = {
    "affine": (0.0, math.inf),
    "affine-bounded": (0.1, 1.1),
    "additive": (1.0, 1.0),
    "rq-spline": (1.0, 1.0),
    "modified-rq-spline": (1.0, 1.0),
}
#: An inverse gain above this is huge: one pass through the site multiplies a value by more than 100.
#: It matches the floor below which an affine scale is not ``affine-bounded`` (``AFFINE_BOUNDED_FLOOR``).
HUGE_GAIN = 100.0
EVIDENCE = ("structural", "measured", "swept", "worst_case", "gain")
#: Relative slack when testing a point against declared bounds (float rounding of the site's own map).
BOUND_SLACK = 1e-3


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
    if math.isinf(hi):
        return 0.0
    return lo / hi if hi > 0 else 0.0


# -- the evidence ---------------------------------------------------------------------------------


def structural_evidence(site: Any, threshold: float = 0.5) -> dict:
    """The site's tail bounds (reported, else its kind's), judged by the ratio rule (no sampling needed)."""
    bounds, source = site.tail_bounds(), "site"
    if bounds is None and site.kind in KIND_BOUNDS:
        bounds, source = KIND_BOUNDS[site.kind], "kind"
    if bounds is None:
        ratio, source, v = None, None, "inconclusive"
    else:
        ratio = _ratio(float(bounds[0]), float(bounds[1]))
        v = "inconclusive" if math.isnan(ratio) else ("compliant" if ratio >= threshold else "violates")
    start = site.tail_start()
    return {
        "verdict": v,
        "tail_bounds": None if bounds is None else [float(bounds[0]), float(bounds[1])],
        "bounds_from": source,
        "bound_ratio": ratio,
        "tail_start": None if start is None else float(start),
    }


def contradiction(bounds: list[float] | None, evidence: dict | None, label: str) -> str | None:
    """Words for evidence (a probe result) that lies outside the declared tail ``bounds``; ``None`` if it fits."""
    if bounds is None or not evidence:
        return None
    lo, hi = bounds
    bad = evidence.get("nonfinite")
    if bad:
        return f"{label}: c' non-finite at |x| ≥ {bad['first_abs_x']:.3g}"
    m_lo, m_hi = evidence.get("derivative_min", math.nan), evidence.get("derivative_max", math.nan)
    if math.isnan(m_lo) or math.isnan(m_hi):
        return None
    if m_lo < lo * (1 - BOUND_SLACK) or m_hi > hi * (1 + BOUND_SLACK):
        where = evidence.get("probe", {}).get("abs_x_min")
        at = f" at |x| ≥ {where:.3g}" if where is not None and not math.isnan(where) else ""
        return f"{label}: c' ∈ [{m_lo:.3g}, {m_hi:.3g}]{at}"
    return None


def gain_reading(
    structural: dict, measured: dict, worst_case: dict | None, visited: dict | None, huge_gain: float = HUGE_GAIN
) -> dict:
    """The size of the inverse gain ``1/c'`` per reading, and which of them are huge or non-finite.

    ``visited`` carries what sampling met: ``max`` (largest finite gain), ``swept_max`` (the same under
    the condition sweep), ``n_nonfinite`` and ``nonfinite_origin`` (this is the first site, in inverse
    order, where a non-finite value appeared).
    """
    b = structural.get("tail_bounds")
    sup = None if b is None else (math.inf if b[0] <= 0 else 1.0 / b[0])
    d_min = measured.get("derivative_min", math.nan)
    probe = None if d_min is None or math.isnan(d_min) else (math.inf if d_min <= 0 else 1.0 / d_min)
    v = visited or {}
    wc = (worst_case or {}).get("max_inverse_gain")
    readings = {
        "structural_sup": sup,
        "tail_probe_max": probe,
        "measured_max": v.get("max"),
        "swept_max": v.get("swept_max"),
        "worst_case_max": wc,
    }
    huge = [k for k, g in readings.items() if g is not None and (math.isnan(g) or g > huge_gain)]
    nonfinite = bool(v.get("nonfinite_origin")) or bool((worst_case or {}).get("nonfinite_origin"))
    return {
        **readings,
        "measured_nonfinite": int(v.get("n_nonfinite") or 0),
        "nonfinite_here": nonfinite,
        "upstream": v.get("upstream"),
        "huge_gain": huge_gain,
        "huge": huge,
    }


# -- the verdict ----------------------------------------------------------------------------------


def combine(
    structural: str | dict,
    measured: dict,
    worst_case: dict | None,
    kind: str,
    threshold: float = 0.5,
    *,
    swept: dict | None = None,
    gain: dict | None = None,
    bounded: bool = False,
) -> tuple[str, list[str]]:
    """The verdict and the evidence it rests on, by the rule in the module docstring.

    ``structural`` is the structural entry (or just its verdict); ``bounded``: the structure bounds the
    site's displacement (identity tails past a known start), so a huge gain inside the interval cannot
    blow a value up.
    """
    st = structural if isinstance(structural, dict) else {"verdict": structural}
    s = st["verdict"]
    wc = worst_case or {}
    wc_ratio = wc.get("tail_ratio")
    if (wc_ratio is not None and not math.isnan(wc_ratio) and wc_ratio < threshold) or wc.get("nonfinite_origin"):
        return "violates", ["worst_case"]
    if st.get("contradicted"):
        return "violates", [c["by"] for c in st["contradicted"]]
    reached = bool(wc.get("reached"))
    if s == "violates":
        return "violates", ["structural", "worst_case"] if reached else ["structural"]
    m = measured.get("verdict", "inconclusive")
    sw = (swept or {}).get("verdict", "inconclusive")
    against = [k for k, e in (("measured", m), ("swept", sw)) if e == "violates"]
    if against:
        return "violates", against + (["worst_case"] if reached else [])
    g = gain or {}
    if g.get("nonfinite_here"):
        return "violates", ["gain"]
    if g.get("huge") and not bounded:
        return "violates", ["gain"]
    agree = [k for k, e in (("measured", m), ("swept", sw)) if e == "compliant"]
    if s == "compliant":
        return "compliant", ["structural", *agree]
    if reached:  # no structure to read, and the attack blew the inverse up through this site
        return "violates", ["worst_case"]
    if m == "compliant" and (kind == "prior" or measured.get("settled") is True):
        return "compliant", agree
    return "inconclusive", agree


def verdict(kind: str, ratio: float, threshold: float = 0.5) -> str:
    """The verdict of a site of ``kind`` whose tail ratio was measured (not known to be settled), no attack."""
    m = "inconclusive" if math.isnan(ratio) else ("violates" if ratio < threshold else "compliant")
    bounds = KIND_BOUNDS.get(kind)
    s = "inconclusive" if bounds is None else ("compliant" if _ratio(*bounds) >= threshold else "violates")
    return combine(s, {"verdict": m}, None, kind, threshold)[0]


def probe_site(
    site: Any,
    params: list[Any],
    threshold: float = 0.5,
    worst_case: dict | None = None,
    reservoir: dict | None = None,
    *,
    swept: dict | None = None,
    visited: dict | None = None,
    huge_gain: float = HUGE_GAIN,
) -> dict:
    """The ``remark2`` report entry of one site: verdict, ``rests_on``, every reading.

    ``params`` are the kept parameter points (what :meth:`Site.derivative_at` takes); ``worst_case``
    is the attack's evidence for this site: a dict with at least ``reached`` (the attack drove this site
    to a violation or a blow-up) and, when known, ``distance``, ``max_inverse_gain``, ``tail_ratio``,
    ``nonfinite_origin`` and ``budget``; ``None`` (no attack ran) keeps ``worst_case: null``.
    ``reservoir`` describes what ``params`` hold (:meth:`Tracer.reservoir_info`); ``swept`` is the probe
    under swept conditions (:mod:`flowaudit.evidence.sweep`); ``visited`` what sampling met (see
    :func:`gain_reading`).
    """
    structural = structural_evidence(site, threshold)
    structural["certificate"] = site_certificate(site, params, structural["tail_bounds"])
    measured = measured_evidence(site, params, threshold)
    if reservoir is not None:
        measured["probe"]["reservoir"] = reservoir
    gain = gain_reading(structural, measured, worst_case, visited, huge_gain)
    contra = []
    if structural["verdict"] == "compliant":  # only a hypothesis that would pass can be contradicted
        for label, ev in (("measured", measured), ("swept", swept)):
            words = contradiction(structural["tail_bounds"], ev, {"measured": "your data", "swept": "the sweep"}[label])
            if words:
                contra.append({"by": label, "words": words})
        wc = worst_case or {}
        sup = gain["structural_sup"]
        wc_gain = wc.get("max_inverse_gain")
        if (
            wc.get("reached")
            and structural["certificate"].get("displacement") is None
            and wc_gain is not None
            and sup is not None
            and (math.isnan(wc_gain) or wc_gain > sup * (1 + BOUND_SLACK))
        ):
            contra.append({"by": "worst_case", "words": f"the attack: inverse gain {wc_gain:.3g} > 1/s_l = {sup:.3g}"})
    structural["contradicted"] = contra or None
    bounded = structural["certificate"].get("displacement") is not None and not contra
    v, rests_on = combine(
        structural, measured, worst_case, site.kind, threshold, swept=swept, gain=gain, bounded=bounded
    )
    if v == "violates" and structural["certificate"]["certified"]:
        cert = structural["certificate"]
        cert["certified"], cert["void"] = False, f"voided: the site violates on {'+'.join(rests_on)}"
        cert["why"] = cert["void"]
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
        "swept": swept,
        "worst_case": worst_case,
        "gain": gain,
        "kind": site.kind,
    }
    entry["words"] = evidence_words(entry)
    return entry


def evidence_words(r2: dict) -> str:
    """One line in words: "violates by structure; not reached on your data; reached by the attack at distance 15"."""
    from ..utils.format import fmt

    s, m, w, g = r2["structural"], r2["measured"], r2.get("worst_case"), r2.get("gain") or {}
    if s.get("contradicted"):
        first = f"violates (declared {r2.get('kind', 'bounds')}, contradicted by {s['contradicted'][0]['words']})"
    else:
        first = {"violates": "violates by structure", "compliant": "complies by structure"}.get(
            s["verdict"], "no structure to read"
        )
    parts = [first]
    ratio = m.get("tail_ratio")
    if m.get("domain"):
        parts.append(f"no tails: {m['domain']['why']}")
    elif ratio is None or math.isnan(ratio):
        parts.append("not measured (site not visited)")
    else:
        word = "reached" if ratio < r2["threshold"] or m.get("nonfinite") else "not reached"
        parts.append(f"{word} on your data (tail ratio {fmt(ratio)})")
        if m.get("nonfinite"):
            parts.append(f"c' non-finite from |x| = {fmt(m['nonfinite']['first_abs_x'])}")
        if m.get("settled") is False and m["probe"].get("start") == "settling":
            parts.append(f"c' not settled by |x| = {fmt(m['probe']['abs_x_max'])}")
    sw = r2.get("swept")
    if sw and sw.get("verdict") == "violates":
        parts.append(f"reached under swept conditions (tail ratio {fmt(sw['tail_ratio'])})")
    if g.get("nonfinite_here"):
        parts.append("non-finite values first appear at this site")
    if g.get("huge"):
        top = max((g[k] for k in g["huge"]), key=lambda x: math.inf if math.isnan(x) else x)
        names = ", ".join(k.replace("_", " ") for k in g["huge"])
        parts.append(f"inverse gain {fmt(top)} > {fmt(g['huge_gain'])} ({names})")
    if w:
        dist = f" at distance {fmt(w['distance'])}" if w.get("distance") is not None else ""
        parts.append(f"reached by the attack{dist}" if w.get("reached") else "not reached by the attack")
    if r2["verdict"] == "violates" and r2["rests_on"] and r2["rests_on"][0] not in ("structural",):
        parts.append(f"decided by {'+'.join(r2['rests_on'])}")
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
