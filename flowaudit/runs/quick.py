"""The quick answer: %Inf, %PixelErr and the inverse-gain range, and nothing else (``scan --quick``).

The loop a user would write by hand: K samples per input at τ (the scan's latents, seeded per input),
count the inputs with a non-finite sample and those with a value outside the error band, and keep the
smallest and largest inverse gain ``1/c'`` any site saw. Several inputs share a pass (as ``--batched``);
a site's gains are reduced to two numbers on the device, with no histogram, reservoir or layer trace.

What it skips, and says so (:data:`SKIPPED`): the encoder features and ``s_OOD`` (no fit), the Remark 2
tail probe, the certificate, the layer trace and explosion layer, per-input records, the riskiest-inputs
panel, plots and the HTML page, and the attack. The figures it gives are the scan's on the same
inputs, seed and band, up to the last bits of batched passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..adapters import Adapter, observing
from ..config.sampling import Phase
from ..config.settings import Settings
from ..io.datasets import ConditionSet
from ..stats.risk import sample_checks

__all__ = ["SKIPPED", "GainRange", "quick_answer"]

SKIPPED = (
    "s_OOD (no encoder features, no fit)",
    "Remark 2 tail probe and verdicts",
    "certificate",
    "layer trace and explosion layer",
    "per-input records and the riskiest-inputs panel",
    "plots and the HTML page",
    "attack",
)


class GainRange:
    """An observer keeping only the smallest and largest finite inverse gain and the non-finite count."""

    def __init__(self) -> None:
        self.low: Tensor | None = None
        self.high: Tensor | None = None
        self.nonfinite: Tensor | None = None

    def layer(self, name: str, x: Tensor) -> None:
        pass

    def site(self, name: str, gain: Tensor, params: Any) -> None:
        g = gain.detach().abs()
        finite = torch.isfinite(g)
        low = torch.where(finite, g, torch.full_like(g, math.inf)).amin()
        high = torch.where(finite, g, torch.zeros_like(g)).amax()
        bad = (~finite).sum()
        if self.low is None:
            self.low, self.high, self.nonfinite = low, high, bad
        else:
            self.low, self.high = torch.minimum(self.low, low), torch.maximum(self.high, high)
            self.nonfinite = self.nonfinite + bad

    def to_dict(self) -> dict:
        if self.low is None:
            return {"min": None, "max": None, "n_nonfinite": 0}
        low, high = float(self.low), float(self.high)
        return {"min": low if math.isfinite(low) else None, "max": high, "n_nonfinite": int(self.nonfinite)}


def quick_answer(adapter: Adapter, sets: Sequence[tuple[str, ConditionSet]], run: Settings) -> dict:
    """Per set (``in``, ``ood``): ``n_inputs``, ``pct_inf``, ``pct_pixel_err``, ``inverse_gain`` {min, max}."""
    band = run.band or adapter.error_band
    per = run.inputs_per_batch
    out: dict[str, Any] = {}
    with Phase(sum(len(cs.y) for _, cs in sets), "sample", run.progress) as phase:
        for index, (name, cs) in enumerate(sets):
            gains, n_inf, n_err = GainRange(), 0, 0
            with observing(adapter, gains):
                for start in range(0, len(cs.y), per):
                    y = cs.y[start : start + per].to(run.device)
                    latents = run.sampling.latents(adapter, y, index, start, run.device)
                    x = adapter.sample(run.sampling.repeat(y), latents, observer=gains)
                    checks = sample_checks(x, run.sampling, band)
                    n_inf += int((checks["n_inf"] > 0).sum())
                    n_err += int((checks["n_pixel_err"] > 0).sum())
                    phase.advance(name, len(y))
            n = len(cs.y)
            out[name] = {
                "n_inputs": n,
                "pct_inf": 100.0 * n_inf / n if n else math.nan,
                "pct_pixel_err": 100.0 * n_err / n if n else math.nan,
                "inverse_gain": gains.to_dict(),
            }
    return out
