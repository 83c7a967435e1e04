"""The report's per-site entries and the model-level evidence built from them.

Each site of the adapter gets its Remark 2 evidence (:func:`~flowaudit.evidence.remark2.probe_site`:
``structural``, ``measured`` under the parameter rows the tracers' reservoirs kept
while sampling, ``worst_case`` from an attack when one ran) and its inverse gain
``1/c'`` over all scanned sets together and per set (``in``, ``ood``).
:func:`model_evidence` adds to the model entry what the sites say together:
``coverage`` (what the adapter saw), ``remark2`` (the model's verdict, ``no sites
found`` when there is nothing to judge) and ``certificate``
(:func:`~flowaudit.evidence.certificate.model_certificate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..adapters import Adapter
from ..tracing.trace import Tracer
from .certificate import model_certificate
from .remark2 import model_verdict, probe_site

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


def site_entries(
    adapter: Adapter,
    tracers: Sequence[Tracer],
    threshold: float,
    worst_case: Mapping[str, dict] | None = None,
    tick: Callable[[], None] | None = None,
) -> list[dict]:
    """One entry per site, in the adapter's order (see module docstring).

    ``worst_case`` maps a site name to the attack's evidence for it (the dict documented in
    :func:`~flowaudit.evidence.remark2.probe_site`: ``reached``, ``distance``, …); sites not in it, or
    ``worst_case=None`` (no attack ran), get ``remark2.worst_case: null``. ``tick()`` after each site (progress).
    """
    entries = []
    kept = [t.params for t in tracers]  # every site's rows, read once
    for site in adapter.sites():
        params = [p for k in kept for p in k.get(site.name, [])]
        gains = [t.gains[site.name] for t in tracers if site.name in t.gains]
        wc = (worst_case or {}).get(site.name)
        r2 = probe_site(site, params, threshold, worst_case=wc, reservoir=_reservoir(tracers, site.name))
        entry = {"name": site.name, "kind": site.kind, "remark2": r2}
        if gains:
            total = gains[0]
            for gs in gains[1:]:
                total = total.merge(gs)
            entry["inverse_gain"] = total.to_dict()
            entry["inverse_gain_by_set"] = {name: gs.to_dict() for name, gs in zip(SET_NAMES, gains)}
        entries.append(entry)
        if tick is not None:
            tick()
    return entries


def model_evidence(adapter: Adapter, entries: list[dict]) -> dict:
    """``coverage``, ``remark2`` (model verdict) and ``certificate`` for the model entry."""
    coverage = adapter.coverage()
    r2 = model_verdict(entries, coverage)
    budgets = [e["remark2"]["probe"].get("reservoir") for e in entries]
    r2["reservoir_budget"] = next((b["budget"] for b in budgets if b), None)  # parameter numbers kept per site
    return {"coverage": coverage, "remark2": r2, "certificate": model_certificate(entries)}
