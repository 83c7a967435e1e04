r"""Traces of the inverse pass, accumulated on the fly (paper Fig. 3b).

:class:`Tracer` is the :class:`~flowaudit.adapters.base.Observer` the scan
hands to an adapter. For every layer it keeps running float64 sums of the
finite values (count, :math:`\sum v`, :math:`\sum v^2`), the largest
:math:`|v|` and the number of non-finite values
(:class:`~flowaudit.layer_stats.LayerStats`); for
every site the inverse-gain histogram and extremes
(:class:`~flowaudit.gains.GainStats`, one read of the gains per call by
:func:`~flowaudit.gains.summarize`), per input its gain extremes and a coarse
histogram, and for the Remark 2 probe a
:class:`~flowaudit.reservoir.ParamReservoir` of parameter rows within a fixed
budget. Everything stays on the model's device with no host sync until a
batch ends; nothing grows with the number of inputs except a few numbers per
input.

Layer sums are batch-invariant (:mod:`flowaudit.layer_stats`).

Rows of a traced batch are input-major (:class:`~flowaudit.layout.Sampling`).
:func:`layer_table` turns the traces of the in-distribution and OOD sets into
the report's ``layers`` rows and names the explosion layer.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .binning import INPUT_EDGES, histogram_quantile
from .layer_stats import LayerStats, layer_device
from .gains import GainStats, settle_inputs, summarize
from .layout import Sampling
from .reservoir import ParamReservoir
from .scratch import Scratch

__all__ = ["Tracer", "layer_table"]

class Tracer:
    """Observer of inverse passes of one input set (see module docstring).

    Args:
        sampling: the batch layout (K rows per input, input-major).
        param_budget: points of parameters kept per site for the Remark 2 probe.
    """

    def __init__(self, sampling: Sampling, param_budget: int = 65536):
        self.sampling = sampling
        self.param_budget = param_budget
        self.layers: dict[str, LayerStats] = {}
        self.gains: dict[str, GainStats] = {}
        self.reservoirs: dict[str, ParamReservoir] = {}
        self.input_gain: list[dict] = []  # per input, over all sites: min, p50, p99, max
        self._batch: dict[str, Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._work = Scratch()
        self._inputs_seen = self._batches_seen = 0

    @property
    def params(self) -> dict[str, list[Any]]:
        """The kept parameter rows per site (one tensor each), for :meth:`Site.derivative_at`."""
        out = {}
        for name, r in self.reservoirs.items():
            kept = r.kept()
            if kept is not None:
                out[name] = [kept[0]]
        return out

    def reservoir_info(self, name: str) -> dict | None:
        """What the reservoir of site ``name`` holds (``None``: the site was never visited)."""
        r = self.reservoirs.get(name)
        return None if r is None else r.info()

    # -- Observer -------------------------------------------------------------
    def layer(self, name: str, x: Tensor) -> None:
        self.layers.setdefault(name, LayerStats()).add(x, max(1, x.shape[0] // self.sampling.samples) if x.dim() else 1, self._work)

    def site(self, name: str, gain: Tensor, params: Any) -> None:
        p = summarize(gain, self.sampling.samples, self._work)  # one read of the gains for every statistic
        self.gains.setdefault(name, GainStats()).add_pass(p)
        self._keep_params(name, params, p.row_max)
        b = self._batch
        b["max"] = p.input_max if "max" not in b else torch.maximum(b["max"], p.input_max)
        b["min"] = p.input_min if "min" not in b else torch.minimum(b["min"], p.input_min)
        h = "raw" if p.input_counts.shape[1] != len(INPUT_EDGES) - 1 else "hist"  # raw: settled once a batch
        b[h] = p.input_counts if h not in b else b[h] + p.input_counts

    # -- bookkeeping ----------------------------------------------------------
    def _keep_params(self, name: str, params: Any, row_gain: Tensor) -> None:
        if not isinstance(params, Tensor) or params.dim() == 0 or params.shape[0] == 0:
            return
        r = self.reservoirs.get(name)
        if r is None:  # keys drawn from (seed, site, row): the same rows whatever the batches, shards or ranks
            r = self.reservoirs[name] = ParamReservoir(self.param_budget, salt=self.sampling.seed * 1_000_003 + zlib.crc32(name.encode()))
        r.add(params, row_gain, self._inputs_seen, self.sampling.samples, self._batches_seen)

    def end_batch(self, n_inputs: int) -> None:
        """Close a batch of ``n_inputs`` inputs: their inverse-gain min, p50, p99 and max over all sites."""
        b, self._batch = self._batch, {}
        self._inputs_seen += n_inputs
        self._batches_seen += 1
        if not b:
            self.input_gain += [{"min": math.nan, "p50": math.nan, "p99": math.nan, "max": math.nan}] * n_inputs
            return
        hist = sum(settle_inputs(b[h]) for h in ("raw", "hist") if h in b).cpu().numpy()
        for lo, hi, h in zip(b["min"].cpu().tolist(), b["max"].cpu().tolist(), hist):
            q = [min(max(histogram_quantile(h, INPUT_EDGES, p), lo), hi) for p in (0.5, 0.99)]
            self.input_gain.append({"min": lo, "p50": q[0], "p99": q[1], "max": hi})

    # -- mergeable state (shards, resume, ranks) -------------------------------------------------
    def start_at(self, first_input: int, first_pass: int) -> "Tracer":
        """Number inputs and passes from ``first_input`` / ``first_pass`` (a shard's place in its set)."""
        self._inputs_seen, self._batches_seen = first_input, first_pass
        return self

    def state(self) -> dict:
        """Everything :meth:`merge` needs, on the CPU (``torch.save``-able with ``weights_only``)."""
        return {"layers": {k: v.state() for k, v in self.layers.items()}, "gains": {k: v.state() for k, v in self.gains.items()},
                "reservoirs": {k: v.state() for k, v in self.reservoirs.items()}, "input_gain": list(self.input_gain)}

    @classmethod
    def from_state(cls, sampling: Sampling, state: dict, device: torch.device | str = "cpu", param_budget: int = 65536) -> "Tracer":
        out = cls(sampling, param_budget)
        out.layers = {k: LayerStats.from_state(v, device) for k, v in state["layers"].items()}
        out.gains = {k: GainStats.from_state(v, device) for k, v in state["gains"].items()}
        out.reservoirs = {k: ParamReservoir.from_state(v, device) for k, v in state["reservoirs"].items()}
        out.input_gain = list(state["input_gain"])
        return out

    def merge(self, other: "Tracer") -> "Tracer":
        """Add ``other`` (the next inputs of the same set) to this tracer; returns ``self``.

        Layer sums fold in call order (call in shard order), histograms and extremes are exact,
        reservoirs keep the same rows as one pass over all inputs would.
        """
        for k, v in other.layers.items():
            self.layers[k] = self.layers[k].merge(v) if k in self.layers else LayerStats.from_state(v.state(), layer_device(v))
        for k, v in other.gains.items():
            self.gains[k] = self.gains[k].merge(v) if k in self.gains else v
        for k, v in other.reservoirs.items():
            self.reservoirs[k] = self.reservoirs[k].merge(v) if k in self.reservoirs else v
        self.input_gain += other.input_gain
        return self


def layer_table(names: Sequence[str], tracers: Sequence[Tracer], threshold: float) -> tuple[list[dict], str | None]:
    """Rows of the layer trace for the sets (``in``, then ``ood``) and the explosion layer.

    The explosion layer is the first whose OOD/in-distribution variance ratio passes
    ``threshold``; non-finite values met only out of distribution count as an infinite ratio.
    """
    rows, explosion = [], None
    for name in names:
        row: dict[str, Any] = {"name": name}
        for set_name, t in zip(("in", "ood"), tracers):
            if name in t.layers:
                row[set_name] = t.layers[name].to_dict()
        if "in" in row and "ood" in row:
            vi, vo = row["in"]["variance"], row["ood"]["variance"]
            ratio = vo / vi if vi > 0 else (math.inf if vo > 0 else 1.0)
            if row["ood"]["n_nonfinite"] and not row["in"]["n_nonfinite"]:
                ratio = math.inf
            row["variance_ratio"] = ratio
            if explosion is None and ratio > threshold:
                explosion = name
        rows.append(row)
    return rows, explosion
