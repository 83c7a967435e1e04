"""The report's per-site entries: kind, Remark 2 evidence and the inverse-gain distribution.

Each site of the adapter gets its Remark 2 probe (:func:`~flowaudit.remark2.probe_site`)
under the parameters the tracers kept while sampling, and its inverse gain
``1/c'`` over all scanned sets together and per set (``in``, ``ood``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .adapters import Adapter
from .remark2 import probe_site
from .trace import Tracer

__all__ = ["site_entries"]

SET_NAMES = ("in", "ood")


def site_entries(adapter: Adapter, tracers: Sequence[Tracer], threshold: float) -> list[dict]:
    """One entry per site, in the adapter's order (see module docstring)."""
    entries = []
    for site in adapter.sites():
        params = [p for t in tracers for p in t.params.get(site.name, [])]
        gains = [t.gains[site.name] for t in tracers if site.name in t.gains]
        entry = {"name": site.name, "kind": site.kind, "remark2": probe_site(site, params, threshold)}
        if gains:
            total = gains[0]
            for gs in gains[1:]:
                total = total.merge(gs)
            entry["inverse_gain"] = total.to_dict()
            entry["inverse_gain_by_set"] = {name: gs.to_dict() for name, gs in zip(SET_NAMES, gains)}
        entries.append(entry)
    return entries
