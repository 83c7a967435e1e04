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
budget. On a GPU everything stays on the model's device with no host sync until a
batch ends. On the CPU, where the cost is the number of operations, a call is only
copied and a few passes are summarized together (:class:`~flowaudit.pass_buffer.PassBuffer`);
every reading sees all passes ended so far, and the figures are the same. Nothing
grows with the number of inputs except a few numbers per input.

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

import numpy as np
import torch
from torch import Tensor

from .binning import INPUT_EDGES, histogram_quantiles
from .layer_stats import LayerStats, layer_device
from .gains import GainStats, settle_inputs, summarize
from .layout import Sampling
from .pass_buffer import PassBuffer
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
        self._layers: dict[str, LayerStats] = {}
        self._gains: dict[str, GainStats] = {}
        self.reservoirs: dict[str, ParamReservoir] = {}
        self._input_gain: list[dict] = []  # per input, over all sites: min, p50, p99, max
        self._batch: dict[str, Any] = {}  # the pass in progress: per-input extremes and counts
        self._ended: list[tuple[int, int, int, dict]] = []  # passes ended with calls still in the pass buffer: first input, pass, inputs, figures so far
        self._generators: dict[torch.device, torch.Generator] = {}
        self._work = Scratch()
        self._pass = PassBuffer()  # the CPU's calls of the last few passes (:mod:`flowaudit.pass_buffer`)
        self._inputs_seen = self._batches_seen = 0

    @property
    def layers(self) -> dict[str, LayerStats]:
        """Per layer, its running statistics (the pass in progress included)."""
        self._flush()
        return self._layers

    @property
    def gains(self) -> dict[str, GainStats]:
        """Per site, its inverse-gain statistics (the pass in progress included)."""
        self._flush()
        return self._gains

    @property
    def input_gain(self) -> list[dict]:
        """Per input, its inverse-gain min, p50, p99 and max over all sites (inputs whose pass has ended)."""
        self._flush()
        return self._input_gain

    @property
    def params(self) -> dict[str, list[Any]]:
        """The kept parameter rows per site (one tensor each), for :meth:`Site.derivative_at`."""
        self._flush()
        out = {}
        for name, r in self.reservoirs.items():
            kept = r.kept()
            if kept is not None:
                out[name] = [kept[0]]
        return out

    def reservoir_info(self, name: str) -> dict | None:
        """What the reservoir of site ``name`` holds (``None``: the site was never visited)."""
        self._flush()
        r = self.reservoirs.get(name)
        return None if r is None else r.info()

    # -- Observer -------------------------------------------------------------
    def layer(self, name: str, x: Tensor) -> None:
        n = max(1, x.shape[0] // self.sampling.samples) if x.dim() else 1
        if x.dim() and x.shape[0] % n:
            n = 1
        if PassBuffer.takes(x) and x.dtype == torch.float32:  # float64 values would lose bits in the buffer's float32
            if self._pass.layer(name, x.detach(), n):
                self._flush()
        else:  # another device, an integer dtype or no values (LayerStats.add skips those)
            self._layers.setdefault(name, LayerStats()).add(x, n, self._work)

    def site(self, name: str, gain: Tensor, params: Any) -> None:
        rows = params if _param_rows(params) else None
        if PassBuffer.takes(gain) and gain.dtype == torch.float32 and (rows is None or rows.device.type == "cpu"):
            if self._pass.site(name, gain.detach(), None if rows is None else rows.detach()):  # summarized with a few passes
                self._flush()
            return
        p = summarize(gain, self.sampling.samples, self._work)  # one read of the gains for every statistic
        self._gains.setdefault(name, GainStats()).add_pass(p)
        self._keep_params(name, params, p.row_max, self._inputs_seen, self._batches_seen)
        self._add_inputs(self._batch, p.input_max, p.input_min, p.input_counts)

    @staticmethod
    def _add_inputs(b: dict, input_max: Any, input_min: Any, counts: Tensor) -> None:
        """Fold per-input extremes and counts into a pass's ``b``: numpy on the CPU (where the pass buffer's
        come from, and a call by call summary of the same pass may join them), tensors on a device."""
        input_max, input_min = (t.numpy() if isinstance(t, Tensor) and t.device.type == "cpu" else t for t in (input_max, input_min))
        if "max" in b:
            lib = np if isinstance(input_max, np.ndarray) else torch
            b["max"], b["min"] = lib.maximum(b["max"], input_max), lib.minimum(b["min"], input_min)
        else:
            b["max"], b["min"] = input_max, input_min
        h = ("counts", counts.shape[1])  # raw (site bins or coarse bins with their two junk columns) or settled: settled once a batch
        b[h] = counts if h not in b else b[h] + counts

    def _flush(self) -> None:
        """Summarize the CPU calls held (:class:`~flowaudit.pass_buffer.PassBuffer`) and close the passes ended since."""
        sites, inputs, layers = self._pass.flush(self.sampling.samples)  # nothing held: only forgets the ends of passes
        ended, k = self._ended, self.sampling.samples

        def of_pass(p: int) -> tuple[int, int, int, dict]:  # the open pass (index len(ended)) is the one in progress
            return ended[p] if p < len(ended) else (self._inputs_seen, self._batches_seen, 0, self._batch)

        for s in sites:
            self._gains.setdefault(s.name, GainStats()).add_counts(s.every, s.low, s.top)
            calls = [(of_pass(p), g, rows) for p, g, rows in s.calls if _param_rows(rows)]
            if calls:  # a site's calls of a few passes offered to its reservoir at once
                self._reservoir(s.name).add_calls([rows for _, _, rows in calls], [g for _, g, _ in calls],
                                                  [where[0] * k for where, _, _ in calls], [where[1] for where, _, _ in calls], k)
        for i in inputs:
            self._add_inputs(of_pass(i.pass_index)[3], i.max, i.min, i.counts)
        for l in layers:
            self._layers.setdefault(l.name, LayerStats()).add_parts(l.parts)
        for _, _, n, b in ended:
            self._input_gain += _input_figures(b, n)
        self._ended = []

    # -- bookkeeping ----------------------------------------------------------
    def _keep_params(self, name: str, params: Any, row_gain: Tensor | np.ndarray, first_input: int, batch: int) -> None:
        if _param_rows(params):
            self._reservoir(name).add(params, row_gain, first_input, self.sampling.samples, batch)

    def _reservoir(self, name: str) -> ParamReservoir:
        r = self.reservoirs.get(name)
        if r is None:  # keys drawn from (seed, site, row): the same rows whatever the batches, shards or ranks
            r = self.reservoirs[name] = ParamReservoir(self.param_budget, salt=self.sampling.seed * 1_000_003 + zlib.crc32(name.encode()))
        return r

    def end_batch(self, n_inputs: int) -> None:
        """Close a pass of ``n_inputs`` inputs; their inverse-gain min, p50, p99 and max over all sites
        join :attr:`input_gain` once its calls are summarized (now, or with the next few passes on the CPU)."""
        self._ended.append((self._inputs_seen, self._batches_seen, n_inputs, self._batch))
        self._batch = {}
        self._inputs_seen += n_inputs
        self._batches_seen += 1
        if self._pass.end_pass() or not self._pass:
            self._flush()

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
        out._layers = {k: LayerStats.from_state(v, device) for k, v in state["layers"].items()}
        out._gains = {k: GainStats.from_state(v, device) for k, v in state["gains"].items()}
        out.reservoirs = {k: ParamReservoir.from_state(v, device) for k, v in state["reservoirs"].items()}
        out._input_gain = list(state["input_gain"])
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
        self.input_gain.extend(other.input_gain)
        return self


def _input_figures(b: dict, n_inputs: int) -> list[dict]:
    """Per input of a closed pass, from its folded figures ``b``: min, p50, p99, max (NaN: no site)."""
    if not b:
        return [{"min": math.nan, "p50": math.nan, "p99": math.nan, "max": math.nan}] * n_inputs
    hist = sum(settle_inputs(v) for h, v in b.items() if h[0] == "counts").cpu().numpy()
    lo, hi = (np.asarray(b[k] if isinstance(b[k], np.ndarray) else b[k].cpu().numpy(), dtype=np.float64) for k in ("min", "max"))
    p50, p99 = (np.minimum(np.maximum(histogram_quantiles(hist, INPUT_EDGES, p), lo), hi) for p in (0.5, 0.99))
    return [{"min": a, "p50": b_, "p99": c, "max": d} for a, b_, c, d in zip(lo.tolist(), p50.tolist(), p99.tolist(), hi.tolist())]


def _param_rows(params: Any) -> bool:
    """Whether a site call handed parameter rows the reservoir can keep (a tensor, one row per sample)."""
    return isinstance(params, Tensor) and params.dim() > 0 and params.shape[0] > 0


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
