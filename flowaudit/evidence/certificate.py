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

**The model** (:func:`model_certificate`) composes a bound over **every layer of the inverse pass**, in
the order sampling runs it (the adapter lists them, ``Adapter.inverse_layers``, with
:mod:`flowaudit.adapters.bounds`). Each layer :math:`L` satisfies
:math:`\|v_{out}\|_\infty \le g_L \|v_{in}\|_\infty + d_L`: a certified site has :math:`g = 1`,
:math:`d = B` (:math:`|c^{-1}(y)| \le \max(|y|, B)`), ActNorm, 1×1 convolutions, LU and linear layers
the operator norm of their inverse, permutations and squeezes 1, split priors their σ bound. With
:math:`\tilde g_L = \max(g_L, 1)` (so that the running bound always covers the latents a split draws in),

.. math:: \|x\|_\infty \le G\,\|z\|_\infty + D, \qquad G = \prod_L \tilde g_L, \qquad
          D = \sum_L \Big(\prod_{L' \text{ after } L} \tilde g_{L'}\Big)\, d_L,

where :math:`\|z\|_\infty` is the largest latent element (all latents together). Where the adapter cannot
say the order (a custom flow's recognised modules), :math:`D = G \sum_L d_L`, an upper bound in any order.
It is issued only when every layer is bounded, every site is certified by its structure (and not voided
by the evidence), no layer's gain exceeds :data:`LAYER_HUGE_GAIN` and every site was reached while
sampling; otherwise ``blocking`` names, in inverse
order, each layer or site that prevents it. ``bound`` is :math:`G \cdot 6 + D`: the bound for latents with
:math:`\|z\|_\infty \le 6` (``latent_abs``); ``gain`` and ``offset`` give it for any latent. A model with no
site is never certified.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["site_certificate", "model_certificate", "BIASED"]

#: kinds whose identity tails carry a condition-dependent bias t (c(x) = x + t past the interval)
BIASED = ("additive", "modified-rq-spline")
#: A layer whose gain exceeds this multiplies a value by more than 100 in one step (``remark2.HUGE_GAIN`` for
#: sites): it blocks the certificate and is named, whatever the finite bound composed through it would read.
LAYER_HUGE_GAIN = 100.0
#: the latent size at which ``bound`` is stated (a standard-normal element exceeds it with probability 2·10⁻⁹)
LATENT_ABS = 6.0
SCOPE = (
    "the whole inverse pass, every layer the adapter lists (sites, ActNorm, 1×1 convolutions, LU and linear "
    "layers, permutations, squeezes, splits and priors), for every condition; stated for latents with "
    "|z|∞ ≤ 6 (gain and offset give it for any |z|)"
)
FORMULA = "|x|∞ ≤ G·|z|∞ + D,  G = Π_L max(g_L, 1),  D = Σ_L (Π_{L′ after L} max(g_L′, 1))·d_L"


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


def _site_bound(cert: dict, start: float | None, scanned: bool) -> tuple[float, float] | None:
    """``(g, d)`` of one site from its certificate: certified identity tails past ``B``: ``(1, B)``; with
    ``scanned``, a biased site at the scanned conditions: ``(1, displacement + max|t|)``."""
    if cert.get("certified") and start is not None:
        return 1.0, float(start)
    if scanned and cert.get("bound_scanned") is not None:
        return 1.0, float(cert["bound_scanned"])
    return None


def _compose(steps: list[tuple[float, float]], ordered: bool) -> tuple[float, float]:
    """``(G, D)`` of the module docstring for ``(g_L, d_L)`` in inverse order."""
    gain, offset = 1.0, 0.0
    for g, d in steps:
        g = max(g, 1.0)
        gain, offset = gain * g, offset * g + d
    if not ordered:
        offset = gain * sum(d for _, d in steps)
    return gain, offset


def _sites_bound(names: Any, by_name: dict) -> tuple[float, float, float | None, float, str | None]:
    """The composed (gain, offset) of the sites one layer applies, in their order, by structure and as scanned
    (``None`` when one has no scanned bound), and why no bound holds (``None`` when it does)."""
    g, d, gs, ds, why = 1.0, 0.0, 1.0, 0.0, None
    for name in names:
        e = by_name.get(name)
        if e is None:
            why = why or f"site {name} is not in the report"
            gs = None
            continue
        st = e["remark2"]["structural"]
        b = _site_bound(st["certificate"], st.get("tail_start"), False)
        sb = _site_bound(st["certificate"], st.get("tail_start"), True)
        if b is None:
            why = why or f"{name}: {st['certificate'].get('why')}"
        else:
            g, d = g * b[0], d * b[0] + b[1]
        if sb is None or gs is None:
            gs = None
        else:
            gs, ds = gs * sb[0], ds * sb[0] + sb[1]
    return g, d, gs, ds, why


def _contradicted(names: Any, by_name: dict) -> list[dict]:
    """A bounded layer that applies a site (a split's prior): its own bound, read from the live layer, replaces the
    site's class-level structure, but no evidence may contradict it."""
    out = []
    for name in names:
        e = by_name.get(name)
        r2 = (e or {}).get("remark2") or {}
        if r2.get("verdict") == "violates" and set(r2.get("rests_on") or []) - {"structural"}:
            out.append({"site": name, "why": f"{e['remark2']['verdict']} on {'+'.join(e['remark2']['rests_on'])}"})
    return out


def _unplaced(by_name: dict, covered: set[str], listed: bool, entries: list[dict], cov: dict) -> list[dict]:
    """Sites the layer list does not place, and sites never reached while sampling."""
    out = []
    if listed:
        missing = [n for n in by_name if n not in covered]
        out += [{"site": n, "why": "a site the adapter's layer list does not place"} for n in missing]
    if entries and not cov.get("complete", True):
        unvisited = cov.get("unvisited") or []
        out += [{"site": n, "why": "never reached while sampling"} for n in unvisited]
        if not unvisited:
            out.append({"site": None, "why": f"coverage incomplete: {cov.get('reason')}"})
    return out


def model_certificate(
    entries: list[dict], coverage: dict | None = None, layers: list[Any] | None = None, ordered: bool = True
) -> dict:
    """``model.certificate`` over the whole inverse pass (module docstring); JSON-ready.

    ``entries``: the report's site entries; ``layers``: the adapter's ``inverse_layers()`` (``None``: it
    cannot list them, and no certificate is issued); ``ordered``: whether they are in sampling order.
    """
    by_name = {e["name"]: e for e in entries}
    cov = coverage or {}
    blocking: list[dict] = []
    steps: list[tuple[float, float]] = []
    scanned: list[tuple[float, float]] | None = []
    table: list[dict] = []
    if layers is None:
        blocking.append({"site": None, "why": "the adapter does not list the layers of its inverse pass"})
        scanned = None
    covered: set[str] = set()
    for layer in layers or []:
        row = layer.to_dict()
        covered.update(layer.sites)
        if layer.kind == "site" or (layer.gain is None and layer.sites and layer.why is None):
            g, d, gs, ds, why = _sites_bound(layer.sites, by_name)
            row.update(gain=None if why else g, offset=None if why else d, why=why)
            if why:
                blocking.append({"site": layer.sites[0] if len(layer.sites) == 1 else layer.name, "why": why})
            else:
                steps.append((g, d))
            if scanned is not None:
                scanned = None if gs is None else [*scanned, (gs, ds)]
        elif layer.gain is None:
            blocking.append({"site": layer.name, "why": f"{layer.kind} layer: {layer.why}"})
            scanned = None
        elif layer.gain > LAYER_HUGE_GAIN:
            blocking.append(
                {
                    "site": layer.name,
                    "why": f"{layer.kind} layer: its inverse multiplies values by up to {layer.gain:.3g} "
                    f"(> {LAYER_HUGE_GAIN:.3g})",
                }
            )
            scanned = None
        else:
            blocking += _contradicted(layer.sites, by_name)
            steps.append((layer.gain, layer.offset or 0.0))
            if scanned is not None:
                scanned.append((layer.gain, layer.offset or 0.0))
        table.append(row)
    blocking += _unplaced(by_name, covered, layers is not None, entries, cov)
    if not entries:
        blocking.insert(0, {"site": None, "why": "no sites found"})
    ok = not blocking
    gain, offset = _compose(steps, ordered) if ok else (None, None)
    out = {
        "certified": ok,
        "bound": gain * LATENT_ABS + offset if ok else None,
        "gain": gain,
        "offset": offset,
        "latent_abs": LATENT_ABS,
        "scope": SCOPE if ordered else SCOPE + "; layers composed without their order",
        "formula": FORMULA,
        "blocking": [{**b, "site": b["site"] or "model"} for b in blocking],
        "layers": table,
        "largest_layer_gain": max((r["gain"] for r in table if r.get("gain") is not None), default=None),
    }
    if not entries:
        out["why"] = "no sites found"
    if entries and scanned is not None and len(scanned) == len(layers or []):
        g, d = _compose(scanned, ordered)
        out["bound_scanned"] = g * LATENT_ABS + d
    else:
        out["bound_scanned"] = None
    return out
