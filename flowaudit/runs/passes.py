"""The sampling loop of a scan: inverse passes under a tracer, per-input records.

For a range of inputs of one condition set, :func:`sample_range` draws K
samples per input (:class:`~flowaudit.config.sampling.Sampling`), hands the adapter a
:class:`~flowaudit.tracing.trace.Tracer` as observer, and turns each pass into one
record per input: ``n_inf``, ``n_pixel_err``, ``max_abs``, LR-PSNR (SR), the
reconstruction error where targets exist, and the input's inverse-gain
distribution over all sites. :func:`sample_set` is the whole set as one range.

Exact passes (:attr:`~flowaudit.config.settings.Settings.exact`, the default): each inverse pass is
one input's K samples, a call of the same shape for every input whatever the batch size,
so the model's own float32 arithmetic (kernels whose blocking depends on the
number of rows) cannot depend on which inputs share a pass. Without it a pass
holds ``batch_size // K`` inputs: faster for small models, the same figures
only on kernels that are batch-invariant.

A :class:`Keeper` retains, while sampling, the first samples of the riskiest inputs seen so far
(:func:`risk_key`), so that the worst-input panel of an image scan shows the scan's own samples without
drawing them again.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..adapters import Adapter, observing
from ..config.sampling import Phase
from ..config.settings import Settings
from ..io.datasets import ConditionSet
from ..io.ragged import same_size_runs
from ..stats.risk import lr_psnr, sample_checks
from ..tracing.trace import Tracer

__all__ = [
    "sample_set",
    "sample_range",
    "spatial_sites",
    "reconstruction_error",
    "risk_key",
    "Keeper",
    "PANEL_INPUTS",
    "PANEL_SHOWN",
]

PANEL_INPUTS = 6  # inputs of the worst-input panel
PANEL_SHOWN = 3  # samples shown per panel input


def risk_key(record: dict) -> tuple[float, ...]:
    """The panel's ranking of an input, riskiest first: non-finite samples, pixel errors, ``s_OOD``, largest value."""
    return (-record["n_inf"], -record["n_pixel_err"], -(record["s_ood"] or 0.0), -record["max_abs"])


class Keeper:
    """The first ``shown`` samples (on the CPU) of the ``n`` riskiest inputs offered so far.

    Inputs rank by :func:`risk_key`, ties by (set index, row): the order of a scan's records, as a stable
    sort of them gives. Memory stays at ``n × shown`` samples; an input it no longer holds is drawn again.
    """

    def __init__(self, n: int = PANEL_INPUTS, shown: int = PANEL_SHOWN) -> None:
        self.n, self.shown = n, shown
        self._kept: dict[tuple[int, int], tuple[tuple, Tensor]] = {}

    def offer(self, set_index: int, first_row: int, records: list[dict], x: Tensor, samples: int) -> None:
        """The inputs of one pass: ``records`` of rows ``first_row, …`` of set ``set_index``, input-major samples
        ``x`` (``samples`` rows each)."""
        for j, rec in enumerate(records):
            key = (risk_key(rec), set_index, first_row + j)
            if len(self._kept) >= self.n:
                worst = max(self._kept, key=lambda k: self._kept[k][0])
                if not key < self._kept[worst][0]:
                    continue
                del self._kept[worst]
            rows = x[j * samples : j * samples + min(self.shown, samples)]
            self._kept[(set_index, first_row + j)] = (key, rows.detach().to("cpu", copy=True))

    def samples(self, set_index: int, row: int) -> Tensor | None:
        """The kept samples of row ``row`` of set ``set_index``, or ``None``."""
        got = self._kept.get((set_index, row))
        return None if got is None else got[1]


def sample_set(
    adapter: Adapter, cs: ConditionSet, set_index: int, set_name: str, s_ood: np.ndarray, settings: Settings
) -> tuple[Tracer, list[dict]]:
    """Sample every input of ``cs`` K times under a tracer; ``(tracer, records)``."""
    with Phase(len(cs.y), f"sample {set_name}", settings.progress) as phase:
        return sample_range(adapter, cs, set_index, set_name, s_ood, settings, slice(0, len(cs.y)), phase=phase)


def sample_range(
    adapter: Adapter,
    cs: ConditionSet,
    set_index: int,
    set_name: str,
    s_ood: np.ndarray,
    settings: Settings,
    rows: slice,
    first_pass: int | None = None,
    phase: Phase | None = None,
    part: object = None,
    keep: Keeper | None = None,
    compiled: bool = True,
) -> tuple[Tracer, list[dict]]:
    """Sample inputs ``rows`` of ``cs`` K times under a fresh tracer; ``(tracer, records)``.

    ``s_ood`` holds the scores of these inputs (``len == rows.stop - rows.start``). ``first_pass``
    numbers the passes for the tracer (default: the pass index the range starts at). Each pass
    advances ``part`` of the run's ``phase`` bar (none: no bar) and is offered to ``keep``. ``compiled=False``:
    the tracer reads with tensor operations (a few passes, not worth loading its compiled loops: :class:`Tracer`).
    """
    per = settings.inputs_per_pass
    tracer = Tracer(settings.sampling, spatial=spatial_sites(adapter), compiled=compiled).start_at(
        rows.start, rows.start // per if first_pass is None else first_pass
    )
    records: list[dict] = []
    with observing(adapter, tracer):
        for sl in same_size_runs(cs.y, rows, per):  # a pass never mixes condition sizes
            y = cs.y[sl].to(settings.device)
            latents = settings.sampling.latents(adapter, y, set_index, sl.start, settings.device)
            x = adapter.sample(settings.sampling.repeat(y), latents, observer=tracer)
            tracer.layer("output", x)
            tracer.end_batch(len(y))
            new = _records(adapter, cs, set_name, sl, s_ood[sl.start - rows.start :], x, y, settings)
            if keep is not None:
                keep.offer(set_index, sl.start, new, x, settings.sampling.samples)
            records += new
            del x, latents
            if phase is not None:
                phase.advance(part, len(y))
    for rec, g in zip(records, tracer.input_gain):
        rec["max_inverse_gain"] = g["max"]
        rec["inverse_gain"] = g
    return tracer, records


def _records(
    adapter: Adapter,
    cs: ConditionSet,
    set_name: str,
    sl: slice,
    s_ood: np.ndarray,
    x: Tensor,
    y: Tensor,
    settings: Settings,
) -> list[dict]:
    """One record per input of pass ``sl`` (samples ``x`` at conditions ``y``; ``s_ood`` from its first input)."""
    band = settings.band or adapter.error_band
    checks = {k: v.cpu().tolist() for k, v in sample_checks(x, settings.sampling, band).items()}
    psnr = lr_psnr(x, y, adapter.scale, settings.sampling).cpu() if adapter.task == "sr" else None
    recon = reconstruction_error(adapter, cs.x[sl].to(settings.device), y) if cs.x is not None else None
    s_list = np.asarray(s_ood[: len(y)], dtype=np.float64).tolist()
    columns = zip(cs.ids[sl], s_list, checks["n_inf"], checks["n_pixel_err"], checks["max_abs"])
    records = [
        {"id": i, "set": set_name, "s_ood": None if math.isnan(s) else s, "n_inf": a, "n_pixel_err": b, "max_abs": c}
        for i, s, a, b, c in columns
    ]
    for j, rec in enumerate(records):
        if psnr is not None:
            rec["lr_psnr_min"], rec["lr_psnr_std"] = float(psnr[j].min()), float(psnr[j].std(unbiased=False))
        if recon is not None:
            rec["reconstruction_error"] = float(recon[j])
    return records


def spatial_sites(adapter: Adapter) -> list[str]:
    """The sites whose large parameter rows the tracer may keep as windows (:mod:`~flowaudit.tracing.windows`)."""
    return [s.name for s in adapter.sites() if getattr(s, "spatial_params", False)]


def reconstruction_error(adapter: Adapter, x: Tensor, y: Tensor) -> Tensor:
    """‖f⁻¹(f(x; y); y) − x‖∞ per input (Behrmann et al. 2021); inf when non-finite."""
    latents, _ = adapter.forward(x, y)
    err = (adapter.sample(y, latents) - x).flatten(1).abs().to(torch.float64)
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    return err.amax(1).cpu()
