r"""Traces of the inverse pass, accumulated on the fly (paper Fig. 3b).

:class:`Tracer` is the :class:`~flowaudit.adapters.base.Observer` the scan
hands to an adapter. For every layer it keeps running float64 sums of the
finite values (count, :math:`\sum v`, :math:`\sum v^2`), the largest
:math:`|v|` and the number of non-finite values (:class:`LayerStats`); for
every site the inverse-gain histogram and extremes
(:class:`~flowaudit.gains.GainStats`, one read of the gains per call by
:func:`~flowaudit.gains.summarize`), per input its gain extremes and a coarse
histogram, and for the Remark 2 probe a
:class:`~flowaudit.reservoir.ParamReservoir` of parameter rows within a fixed
budget. Everything stays on the model's device with no host sync until a
batch ends; nothing grows with the number of inputs except a few numbers per
input.

Layer sums are batch-invariant: each input's partial sums (:math:`n` values
:math:`v_j` of one input, summed in fixed chunks by :func:`_row_sums`, the
same bits for any number of rows or threads) are added to the running sums
input after input (:func:`_fold`),

.. math:: S \leftarrow (\cdots((S + s_1) + s_2) + \cdots) + s_n ,

so grouping inputs into passes changes nothing.

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

from .binning import GAIN_EDGES, INPUT_EDGES, histogram_quantile
from .gains import GainStats, settle_inputs, summarize
from .layout import Sampling
from .reservoir import ParamReservoir
from .scratch import Scratch

__all__ = ["GAIN_EDGES", "LayerStats", "GainStats", "ParamReservoir", "Tracer", "histogram_quantile", "layer_table"]

_CHUNK = 4096


def _row_sums(v: Tensor) -> Tensor:
    r"""Sum of each row of ``v`` (n, m), the same bits for any ``n`` and any thread count.

    A reduction with one output and many values may be split over threads (a different
    association per thread count); one with several outputs gives each output to one thread.
    Rows longer than a chunk are therefore summed as zero-padded chunks of 4096 values
    (several outputs per row) and then the chunk sums, recursively; zeros add exactly.
    """
    n, m = v.shape
    if m <= _CHUNK:
        return v.sum(1)
    return _row_sums(_chunked(v).sum(2))


def _chunked(v: Tensor) -> Tensor:
    """``v`` (n, m) as (n, ⌈m/4096⌉, 4096), zero-padded; a view when 4096 divides m."""
    n, m = v.shape
    if m % _CHUNK:
        v = torch.nn.functional.pad(v, (0, (-m) % _CHUNK))
    return v.reshape(n, -1, _CHUNK)


def _count_rows(a: Tensor) -> Tensor:
    """Row sums (float64) of a 0/1 tensor: chunks of 4096 summed in its own dtype are exact integers."""
    n, m = a.shape
    if m > _CHUNK:
        a = _chunked(a).sum(2)
    return _row_sums(a.to(torch.float64))


def _fold(acc: Tensor | None, parts: Tensor) -> Tensor:
    """The running five numbers after adding the rows of ``parts`` (inputs, 5) one after another.

    ``cumsum`` along the rows is a sequential scan on the CPU and, for a scan over a non-last
    dimension, one sequential loop per column on CUDA: the same float64 additions, in the same
    order, as folding row by row, with no Python loop. Column 3 (max |v|) takes the maximum.
    """
    rows = parts if acc is None else torch.cat([acc[None], parts])
    out = rows.cumsum(0)[-1]
    out[3] = rows[:, 3].amax()
    return out


class LayerStats:
    """Running statistics of one layer's output values.

    The five running numbers (count, sum, sum of squares, max |v|, non-finite count)
    stay a float64 tensor on the model's device; reading them is the only host sync.
    """

    def __init__(self) -> None:
        self._acc: Tensor | None = None

    def add(self, x: Tensor, n_inputs: int = 1, work: Scratch | None = None) -> None:
        """Add the values of ``x`` (input-major rows of ``n_inputs`` inputs), folded input by input.

        Each input's partial sums come from :func:`_row_sums` and are added to the running sums in
        input order (:func:`_fold`), so the result does not depend on how inputs were grouped into passes.
        Non-finite values are zeroed by ``nan_to_num`` (one cheap pass, no mask, no ``where``) and
        counted by the NaN that ``x * 0`` gives exactly at them. Temporaries go to ``work``.
        """
        x = x.detach()
        if x.numel() == 0:
            return
        if n_inputs < 1 or x.shape[0] % n_inputs:
            n_inputs = 1
        x = x.reshape(n_inputs, -1)
        work = work or Scratch()
        inf = math.inf
        a = torch.nan_to_num(x, nan=0.0, posinf=inf, neginf=inf, out=work.get("layer", x.shape, x.dtype, x.device))
        top = a.abs_().amax(1).to(torch.float64)  # Inf counts, NaN does not
        torch.mul(x, 0, out=a).nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)  # 1 exactly at the non-finite values
        bad = _count_rows(a)
        torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0, out=a)
        v = work.get("layer64", x.shape, torch.float64, x.device).copy_(a) if x.dtype != torch.float64 else a
        total = _row_sums(v)
        total_sq = _row_sums(v.mul_(v))
        parts = torch.stack([x.shape[1] - bad, total, total_sq, top, bad], 1)
        self._acc = _fold(self._acc, parts)

    def merge(self, other: "LayerStats") -> "LayerStats":
        """Fold ``other``'s sums (a later shard) into these; returns ``self``."""
        if other._acc is not None:
            self._acc = _fold(self._acc, other._acc.to(self._acc.device if self._acc is not None else other._acc.device)[None])
        return self

    def state(self) -> Tensor | None:
        """The five running numbers (float64, CPU), or ``None`` before any value."""
        return None if self._acc is None else self._acc.cpu()

    @classmethod
    def from_state(cls, acc: Tensor | None, device: torch.device | str = "cpu") -> "LayerStats":
        out = cls()
        out._acc = None if acc is None else acc.to(device, torch.float64)
        return out

    def _values(self) -> list[float]:
        return [0.0, 0.0, 0.0, 0.0, 0.0] if self._acc is None else self._acc.tolist()

    @property
    def n_nonfinite(self) -> int:
        return int(self._values()[4])

    @property
    def max_abs(self) -> float:
        return self._values()[3]

    @property
    def variance(self) -> float:
        """Variance of all finite values seen (population form)."""
        n, total, total_sq, _, _ = self._values()
        if n == 0:
            return math.nan
        mean = total / n
        return max(total_sq / n - mean * mean, 0.0)

    def to_dict(self) -> dict:
        n, _, _, top, bad = self._values()
        return {"variance": self.variance, "max_abs": top, "n_nonfinite": int(bad), "n_values": int(n)}


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
            self.layers[k] = self.layers[k].merge(v) if k in self.layers else LayerStats.from_state(v.state(), _device(v))
        for k, v in other.gains.items():
            self.gains[k] = self.gains[k].merge(v) if k in self.gains else v
        for k, v in other.reservoirs.items():
            self.reservoirs[k] = self.reservoirs[k].merge(v) if k in self.reservoirs else v
        self.input_gain += other.input_gain
        return self


def _device(stats: LayerStats) -> torch.device:
    return stats._acc.device if stats._acc is not None else torch.device("cpu")


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
