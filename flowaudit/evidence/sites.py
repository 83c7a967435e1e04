"""The report's per-site entries and the model-level evidence built from them.

Each site of the adapter gets its Remark 2 evidence (:func:`~flowaudit.evidence.remark2.probe_site`:
``structural``, ``measured`` under the parameter rows the tracers' reservoirs kept
while sampling, ``worst_case`` from an attack when one ran) and its inverse gain
``1/c'`` over all scanned sets together and per set (``in``, ``ood``).
:func:`model_evidence` adds to the model entry what the sites say together:
``coverage`` (what the adapter saw), ``remark2`` (the model's verdict, ``no sites
found`` when there is nothing to judge) and ``certificate``
(:func:`~flowaudit.evidence.certificate.model_certificate`, which a site that was never reached blocks).

Non-finite gains are evidence: each site's ``visited`` reading says whether non-finite values first
appeared at it or came from upstream (:func:`~flowaudit.evidence.sweep.nonfinite_origins`, from the layer
trace), and the attack's non-finite gains are attributed the same way, by the inverse order of the sites.
The condition sweep (:mod:`~flowaudit.evidence.sweep`) adds each site's ``swept`` probe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..adapters import Adapter
from ..tracing.trace import Tracer
from .certificate import model_certificate
from .probe import measured_evidence
from .remark2 import HUGE_GAIN, model_verdict, probe_site
from .sweep import nonfinite_origins, sweep

__all__ = ["site_entries", "model_evidence"]

SET_NAMES = ("in", "ood")


def _reservoir(tracers: Sequence[Tracer], name: str) -> dict | None:
    """The reservoirs of ``name`` over all sets, summed (inputs and batches counted per set)."""
    infos = [i for i in (t.reservoir_info(name) for t in tracers) if i is not None]
    if not infos:
        return None
    out = {
        k: sum(i[k] for i in infos)
        for k in ("rows_capacity", "rows", "rows_by_gain", "points", "inputs", "batches", "rows_seen", "rows_skipped")
    }
    gains = [i["largest_gain_kept"] for i in infos if i["largest_gain_kept"] is not None]
    return {"budget": infos[0]["budget"], "sets": len(infos), **out, "largest_gain_kept": max(gains) if gains else None}


def _attack_origins(names: list[str], worst_case: Mapping[str, dict] | None) -> dict[str, dict]:
    """The attack's evidence per site, with ``nonfinite_origin`` on the first site (inverse order) whose
    worst-case gain was non-finite: the later ones were fed its non-finite values."""
    out = {n: dict(worst_case[n]) for n in names if worst_case and n in worst_case}
    bad = {n: int(not math.isfinite(w.get("max_inverse_gain", 0.0) or 0.0)) for n, w in out.items()}
    origins = nonfinite_origins(names, [], bad, {})
    for n, src in origins.items():
        out[n]["nonfinite_origin"] = src is None
        if src is not None:
            out[n]["nonfinite_from"] = src
    return out


def site_entries(
    adapter: Adapter,
    tracers: Sequence[Tracer],
    threshold: float,
    worst_case: Mapping[str, dict] | None = None,
    *,
    swept: bool = True,
    huge_gain: float = HUGE_GAIN,
) -> list[dict]:
    """One entry per site, in the adapter's order (see module docstring).

    ``worst_case`` maps a site name to the attack's evidence for it (the dict documented in
    :func:`~flowaudit.evidence.remark2.probe_site`: ``reached``, ``distance``, …); sites not in it, or
    ``worst_case=None`` (no attack ran), get ``remark2.worst_case: null``. ``swept`` runs the condition
    sweep; ``huge_gain`` is the inverse gain above which a site is flagged whatever its ratio.
    """
    entries = []
    kept = [t.params for t in tracers]  # every site's rows, read once
    sites = adapter.sites()
    names = [s.name for s in sites]
    layers = adapter.layer_names()
    totals = {}
    for site in sites:
        gains = [t.gains[site.name] for t in tracers if site.name in t.gains]
        if gains:
            total = gains[0]
            for gs in gains[1:]:
                total = total.merge(gs)
            totals[site.name] = (total, gains)
    bad_gain = {n: int(t.to_dict().get("n_nonfinite") or 0) for n, (t, _) in totals.items()}
    bad_layer = {
        name: sum(int(t.layers[name].to_dict()["n_nonfinite"]) for t in tracers if name in t.layers) for name in layers
    }
    origins = nonfinite_origins(names, layers, bad_gain, bad_layer)
    wc_all = _attack_origins(names, worst_case) if worst_case is not None else None
    sw = sweep(adapter) if swept and sites else None
    sw_origins = nonfinite_origins(names, layers, sw["nonfinite_gain"], sw["nonfinite_layer"]) if sw else {}
    for site in sites:
        params = [p for k in kept for p in k.get(site.name, [])]
        wc = None if wc_all is None else wc_all.get(site.name)
        total = totals.get(site.name)
        stats = total[0].to_dict() if total else {}
        top = stats.get("max")
        visited = {
            "max": None if top is None or (isinstance(top, float) and math.isnan(top)) else top,
            "n_nonfinite": bad_gain.get(site.name, 0),
            "nonfinite_origin": site.name in origins and origins[site.name] is None,
            "upstream": origins.get(site.name),
        }
        swept_ev = None
        if sw is not None:
            swept_ev = _swept_evidence(site, sw, sw_origins, threshold)
            if swept_ev.get("max_gain") is not None:
                visited["swept_max"] = swept_ev["max_gain"]
            if swept_ev.get("nonfinite_origin"):
                visited["nonfinite_origin"] = True
        r2 = probe_site(
            site,
            params,
            threshold,
            worst_case=wc,
            reservoir=_reservoir(tracers, site.name),
            swept=swept_ev,
            visited=visited,
            huge_gain=huge_gain,
        )
        entry = {"name": site.name, "kind": site.kind, "remark2": r2}
        if total:
            entry["inverse_gain"] = stats
            entry["inverse_gain_by_set"] = {name: gs.to_dict() for name, gs in zip(SET_NAMES, total[1])}
        entries.append(entry)
    return entries


def _swept_evidence(site, sw: dict, origins: dict, threshold: float) -> dict:
    """The tail probe under the swept parameters of ``site``, with the sweep's gain and non-finite readings."""
    params = sw["params"].get(site.name, [])
    ev = measured_evidence(site, params, threshold) if params else {"verdict": "inconclusive", "tail_ratio": math.nan}
    ev["scales"] = sw["scales"]
    ev["n_conditions"] = sw["n_conditions"]
    ev["error"] = sw["error"]
    ev["max_gain"] = sw["max_gain"].get(site.name)
    ev["nonfinite_gain"] = sw["nonfinite_gain"].get(site.name, 0)
    ev["nonfinite_origin"] = site.name in origins and origins[site.name] is None
    ev["reached"] = bool(params)
    return ev


def model_evidence(adapter: Adapter, entries: list[dict]) -> dict:
    """``coverage``, ``remark2`` (model verdict) and ``certificate`` for the model entry."""
    coverage = dict(adapter.coverage())
    unvisited = [e["name"] for e in entries if _unvisited(e)]
    if unvisited and entries:
        coverage["unvisited"] = unvisited
        if coverage.get("complete", True):
            coverage["complete"] = False
            coverage["reason"] = f"sites never reached while sampling: {', '.join(unvisited)}"
    r2 = model_verdict(entries, coverage)
    budgets = [e["remark2"]["probe"].get("reservoir") for e in entries]
    r2["reservoir_budget"] = next((b["budget"] for b in budgets if b), None)  # parameter numbers kept per site
    return {"coverage": coverage, "remark2": r2, "certificate": model_certificate(entries, coverage)}


def _unvisited(entry: dict) -> bool:
    """A site that sampling never reached: no gain recorded and no parameter kept."""
    res = entry["remark2"]["probe"].get("reservoir")
    return "inverse_gain" not in entry and not (res and res.get("rows"))
