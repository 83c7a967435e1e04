"""The worst-input panel of an image scan: the riskiest inputs, a few of their samples, their s_OOD map.

Inputs are ranked by non-finite samples, then pixel errors, then ``s_OOD``,
then the largest value (:func:`~flowaudit.runs.passes.risk_key`). Their first samples are the scan's own:
kept while sampling (:class:`~flowaudit.runs.passes.Keeper`), or, for inputs sampled elsewhere (a resumed
shard, another rank), drawn again from the same per-input seeds
(:meth:`~flowaudit.config.sampling.Sampling.latents`); the map is the spatial ``s_OOD`` of
the encoder features when a spatial Gaussian was fitted. For the HTML only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ..adapters import Adapter
from ..config.device import auditing
from ..config.settings import Settings
from ..io.datasets import ConditionSet
from ..runs.passes import PANEL_INPUTS, PANEL_SHOWN, Keeper, risk_key
from ..stats.features import spatial_map

if TYPE_CHECKING:  # scikit-learn is imported when a Gaussian is fitted or read, not by inspect
    from ..stats.gaussian import GaussianOOD

__all__ = ["PanelItem", "worst_inputs"]


@dataclass
class PanelItem:
    """One row of the worst-input panel (image models, HTML only): condition, samples, s_OOD map."""

    id: str
    set: str
    y: Tensor
    samples: Tensor
    record: dict
    map: np.ndarray | None = None


def worst_inputs(
    adapter: Adapter,
    sets: Sequence[tuple[str, ConditionSet]],
    records: list[dict],
    spatial: GaussianOOD | None,
    layers: Sequence[str],
    run: Settings,
    n: int = PANEL_INPUTS,
    shown: int = PANEL_SHOWN,
    kept: Keeper | None = None,
) -> list[PanelItem]:
    """The ``n`` riskiest inputs with ``shown`` samples each (see module docstring); ``kept`` holds samples the
    scan kept (only the others are drawn again)."""
    order = sorted(range(len(records)), key=lambda i: risk_key(records[i]))[:n]
    by_set = dict(sets)
    index = {name: k for k, (name, _) in enumerate(sets)}
    start = {name: next(i for i, r in enumerate(records) if r["set"] == name) for name, _ in sets}
    out = []
    shown = min(shown, run.sampling.samples)
    with auditing(adapter, run.device, run.threads):
        for i in order:
            rec = records[i]
            j = i - start[rec["set"]]
            y = by_set[rec["set"]].y[j : j + 1].to(run.device)
            x = kept.samples(index[rec["set"]], j) if kept is not None else None
            if x is None or len(x) != shown:
                lat = [z[:shown] for z in run.sampling.latents(adapter, y, index[rec["set"]], j, run.device)]
                x = adapter.sample(y.repeat_interleave(shown, 0), lat).cpu()  # the first samples of the scan, again
            item = PanelItem(id=rec["id"], set=rec["set"], y=y[0].cpu(), samples=x, record=rec)
            if spatial is not None:
                item.map = spatial_map(adapter, spatial, y, layers)[0]
            out.append(item)
    return out
