r"""Traces of the inverse pass, accumulated on the fly (paper Fig. 3b).

:class:`Tracer` is the :class:`~flowaudit.adapters.base.Observer` the scan
hands to an adapter. For every layer it keeps running float64 sums of the
finite values (count, :math:`\sum v`, :math:`\sum v^2`), the largest
:math:`|v|` and the number of non-finite values; for every site a fixed
log-spaced histogram of the inverse gain :math:`1/c'`, its extremes, and the
largest gain seen by each input. For the Remark 2 probe it keeps, per site,
a :class:`ParamReservoir` of parameter rows drawn from every batch: a fixed
budget of parameter numbers, half of it the rows with the largest inverse
gains seen so far, half a uniform random sample of all rows (bottom-k of
seeded uniform keys, so the same seed keeps the same rows). Both halves are
merged on the device by ``topk``, with no host sync. Nothing grows with the
number of inputs except one float per input and site.

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

from .layout import Sampling

__all__ = ["GAIN_EDGES", "LayerStats", "GainStats", "ParamReservoir", "Tracer", "histogram_quantile", "layer_table"]

# log10(1/c') from 1e-4 to 1e8 in 0.025 decades (6 % steps); values beyond land in the end bins
GAIN_EDGES = np.round(np.arange(-4.0, 8.0 + 1e-9, 0.025), 10)
# per input a coarser histogram (0.1 decade) keeps memory at 120 counts an input
INPUT_EDGES = np.round(np.arange(-4.0, 8.0 + 1e-9, 0.1), 10)


def _bin_index(g: Tensor, edges: np.ndarray) -> Tensor:
    """Index of the [a, b) bin of ``log10 g`` among equally spaced ``edges`` (ends clamp), in O(1) per value."""
    step = float(edges[1] - edges[0])
    pos = (torch.log10(g.to(torch.float64)) - float(edges[0])) / step
    return pos.floor().clamp(0, len(edges) - 2).long()


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
    v = torch.nn.functional.pad(v, (0, (-m) % _CHUNK)).reshape(n, -1, _CHUNK)
    return _row_sums(v.sum(2))


class LayerStats:
    """Running statistics of one layer's output values.

    The five running numbers (count, sum, sum of squares, max |v|, non-finite count)
    stay a float64 tensor on the model's device; reading them is the only host sync.
    """

    def __init__(self) -> None:
        self._acc: Tensor | None = None

    def add(self, x: Tensor, n_inputs: int = 1) -> None:
        """Add the values of ``x`` (input-major rows of ``n_inputs`` inputs), folded input by input.

        Each input's partial sums come from :func:`_row_sums` and are added to the running sums in
        input order, so the result does not depend on how inputs were grouped into passes.
        """
        x = x.detach()
        if x.numel() == 0:
            return
        if n_inputs < 1 or x.shape[0] % n_inputs:
            n_inputs = 1
        x = x.reshape(n_inputs, -1)
        finite = torch.isfinite(x)
        v = torch.where(finite, x, torch.zeros_like(x)).to(torch.float64)
        top = torch.where(torch.isinf(x), torch.full_like(v, math.inf), v.abs()).amax(1)
        parts = torch.stack([finite.sum(1).to(torch.float64), _row_sums(v), _row_sums(v * v), top,
                             (~finite).sum(1).to(torch.float64)], 1)
        for row in parts:  # input order: a fixed sequence of float64 additions
            self._fold(row)

    def _fold(self, row: Tensor) -> None:
        if self._acc is None:
            self._acc = row.clone()
        else:
            a = self._acc
            self._acc = torch.stack([a[0] + row[0], a[1] + row[1], a[2] + row[2], torch.maximum(a[3], row[3]), a[4] + row[4]])

    def merge(self, other: "LayerStats") -> "LayerStats":
        """Fold ``other``'s sums (a later shard) into these; returns ``self``."""
        if other._acc is not None:
            self._fold(other._acc.to(self._acc.device) if self._acc is not None else other._acc)
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


class GainStats:
    """Distribution of a site's inverse gain over the visited points (accumulated on the device)."""

    def __init__(self) -> None:
        self._counts: Tensor | None = None
        self._ext: Tensor | None = None  # n, n_nonfinite, min, max (float64)

    def add(self, gain: Tensor) -> None:
        g = gain.detach().flatten()
        ok = torch.isfinite(g) & (g > 0)
        idx = _bin_index(torch.where(ok, g, torch.ones_like(g)), GAIN_EDGES)
        counts = torch.zeros(len(GAIN_EDGES) - 1, dtype=torch.int64, device=g.device).scatter_add_(0, idx, ok.to(torch.int64))
        g = g.to(torch.float64)
        inf = torch.full_like(g, math.inf)
        ext = torch.stack([ok.sum().to(torch.float64), (~ok).sum().to(torch.float64),
                           torch.where(ok, g, inf).min() if g.numel() else g.new_tensor(math.inf),
                           torch.where(ok, g, -inf).max() if g.numel() else g.new_tensor(-math.inf)])
        self._merge(counts, ext)

    def _merge(self, counts: Tensor, ext: Tensor) -> None:
        if self._counts is None:
            self._counts, self._ext = counts, ext
            return
        a = self._ext
        self._counts = self._counts + counts.to(self._counts.device)
        ext = ext.to(a.device)
        self._ext = torch.stack([a[0] + ext[0], a[1] + ext[1], torch.minimum(a[2], ext[2]), torch.maximum(a[3], ext[3])])

    def merge(self, other: "GainStats") -> "GainStats":
        """A new GainStats over the points of both."""
        out = GainStats()
        for part in (self, other):
            if part._counts is not None:
                out._merge(part._counts, part._ext)
        return out

    def state(self) -> dict | None:
        """Histogram counts and extremes (CPU), or ``None`` before any point; exact to merge in any order."""
        return None if self._counts is None else {"counts": self._counts.cpu(), "ext": self._ext.cpu()}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device | str = "cpu") -> "GainStats":
        out = cls()
        if state is not None:
            out._counts, out._ext = state["counts"].to(device), state["ext"].to(device)
        return out

    @property
    def counts(self) -> np.ndarray:
        return np.zeros(len(GAIN_EDGES) - 1, dtype=np.int64) if self._counts is None else self._counts.cpu().numpy()

    def _ext_values(self) -> list[float]:
        return [0.0, 0.0, math.inf, -math.inf] if self._ext is None else self._ext.tolist()

    @property
    def n(self) -> int:
        return int(self._ext_values()[0])

    @property
    def n_nonfinite(self) -> int:
        return int(self._ext_values()[1])

    @property
    def min(self) -> float:
        return self._ext_values()[2]

    @property
    def max(self) -> float:
        return self._ext_values()[3]

    def quantile(self, q: float) -> float:
        """Quantile from the histogram, clipped to the exact extremes."""
        n, _, lo, hi = self._ext_values()
        if not n:
            return math.nan
        return min(max(histogram_quantile(self.counts, GAIN_EDGES, q), lo), hi)

    def to_dict(self) -> dict:
        n, bad, lo, hi = self._ext_values()
        if n == 0:
            return {"min": math.nan, "p50": math.nan, "p99": math.nan, "max": math.nan, "n": 0, "n_nonfinite": int(bad)}
        return {
            "min": lo, "p50": self.quantile(0.5), "p99": self.quantile(0.99), "max": hi,
            "n": int(n), "n_nonfinite": int(bad),
            "histogram": {"log10_edges": GAIN_EDGES.tolist(), "counts": self.counts.tolist()},
        }


def histogram_quantile(counts: np.ndarray, log_edges: np.ndarray, q: float) -> float:
    """Quantile ``q`` from a histogram over log10 values (linear within a bin), back in linear units."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cum[i - 1] if i else 0
    frac = (target - before) / counts[i] if counts[i] else 0.0
    return float(10 ** (log_edges[i] + frac * (log_edges[i + 1] - log_edges[i])))


def _uniform_keys(row: Tensor, salt: int) -> Tensor:
    """A uniform number in [0, 1) per row id: SplitMix64 of (salt, row), on the rows' device."""
    mask = (1 << 64) - 1
    golden, m1, m2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

    def signed(c: int) -> int:
        return c - (1 << 64) if c >= 1 << 63 else c

    def shr(z: Tensor, k: int) -> Tensor:  # logical shift of int64 bits
        return (z >> k) & ((1 << (64 - k)) - 1)

    z = row.to(torch.int64) * signed(golden) + signed((salt * golden) & mask)  # int64 arithmetic wraps
    z = (z ^ shr(z, 30)) * signed(m1)
    z = (z ^ shr(z, 27)) * signed(m2)
    z = z ^ shr(z, 31)
    return shr(z, 11).to(torch.float64) * 2.0**-53


class ParamReservoir:
    """Parameter rows of one site kept for the Remark 2 probe, drawn from every batch (module docstring).

    Args:
        budget: parameter numbers kept (rows × numbers per row; at least 2 rows).
        generator: the seeded generator of the random keys, on the parameters' device.

    Row ids (global row, input, batch) travel with the rows so the report can say how many
    inputs and batches the kept points come from.
    """

    def __init__(self, budget: int, generator: torch.Generator | None = None, salt: int = 0):
        self.budget, self.generator, self.salt = budget, generator, salt
        self.rows_seen = self.skipped = 0
        self._top: tuple[Tensor, Tensor, Tensor] | None = None  # rows, gain, ids
        self._rand: tuple[Tensor, Tensor, Tensor] | None = None  # rows, key, ids

    def capacity(self, per_row: int) -> tuple[int, int]:
        """(rows kept by gain, rows kept at random) for rows of ``per_row`` numbers."""
        rows = max(2, self.budget // max(per_row, 1))
        return rows // 2, rows - rows // 2

    @staticmethod
    def _merge(old: tuple[Tensor, Tensor, Tensor] | None, new: tuple[Tensor, Tensor, Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keep the ``k`` rows with the largest score (rows, score, ids), ties to the smaller row id.

        A strict total order, so the kept rows are the same however the rows arrived
        (batch sizes, shards, ranks): top-k of a union is top-k of the parts' top-k.
        """
        if old is not None:
            new = tuple(torch.cat([a, b.to(a.device)]) for a, b in zip(old, new))
        if new[1].shape[0] <= k:
            return new
        by_id = torch.argsort(new[2][:, 0], stable=True)
        idx = by_id.index_select(0, torch.argsort(new[1].index_select(0, by_id), descending=True, stable=True)[:k])
        return tuple(t.index_select(0, idx) for t in new)

    def add(self, params: Tensor, row_gain: Tensor, first_input: int, samples: int, batch: int) -> None:
        rows = params.detach()
        n = rows.shape[0]
        if self._top is not None and tuple(self._top[0].shape[1:]) != tuple(rows.shape[1:]):
            self.skipped += n  # a different parameter shape in the same set: not mixed into one probe tensor
            return
        dev = rows.device
        r = torch.arange(n, device=dev)
        ids = torch.stack([r + first_input * max(samples, 1), r // max(samples, 1) + first_input, torch.full_like(r, batch)], 1)
        self.rows_seen += n
        gain = row_gain.to(dev, torch.float64) if row_gain.shape[0] == n else torch.zeros(n, dtype=torch.float64, device=dev)
        k_top, k_rand = self.capacity(rows[0].numel() if n else 1)
        self._top = self._merge(self._top, (rows, gain, ids), k_top)
        key = _uniform_keys(ids[:, 0], self.salt)  # a function of the row, not of the batch it came in
        self._rand = self._merge(self._rand, (rows, -key, ids), k_rand)  # smallest keys: a uniform sample

    # -- mergeable state (shards, resume, ranks) ----------------------------------------------
    def state(self) -> dict:
        cpu = (lambda t: None if t is None else tuple(x.cpu() for x in t))
        return {"budget": self.budget, "salt": self.salt, "rows_seen": self.rows_seen, "skipped": self.skipped,
                "top": cpu(self._top), "rand": cpu(self._rand)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "ParamReservoir":
        out = cls(state["budget"], salt=state["salt"])
        out.rows_seen, out.skipped = state["rows_seen"], state["skipped"]
        out._top, out._rand = (None if state[k] is None else tuple(x.to(device) for x in state[k]) for k in ("top", "rand"))
        return out

    def merge(self, other: "ParamReservoir") -> "ParamReservoir":
        """The reservoir over the rows of both (``other`` from later inputs); returns ``self``."""
        self.rows_seen += other.rows_seen
        self.skipped += other.skipped
        if other._top is None:
            return self
        if self._top is None:
            self._top, self._rand = other._top, other._rand
            return self
        if tuple(self._top[0].shape[1:]) != tuple(other._top[0].shape[1:]):
            self.skipped += other.rows_seen
            return self
        k_top, k_rand = self.capacity(self._top[0][0].numel() if len(self._top[0]) else 1)
        self._top = self._merge(self._top, other._top, k_top)
        self._rand = self._merge(self._rand, other._rand, k_rand)
        return self

    def kept(self) -> tuple[Tensor, Tensor] | None:
        """(rows, ids) of the union of both halves, each row once, in row order."""
        if self._top is None:
            return None
        rows = torch.cat([self._top[0], self._rand[0]])
        ids = torch.cat([self._top[2], self._rand[2]])
        uniq, inv = torch.unique(ids[:, 0], return_inverse=True)
        first = torch.full((len(uniq),), len(inv), dtype=torch.long, device=inv.device).scatter_reduce(
            0, inv, torch.arange(len(inv), device=inv.device), reduce="amin")
        return rows.index_select(0, first), ids.index_select(0, first)

    def info(self) -> dict:
        """What the reservoir holds, for the report."""
        kept = self.kept()
        per_row = int(self._top[0][0].numel()) if self._top is not None and len(self._top[0]) else 0
        k_top, k_rand = self.capacity(per_row) if per_row else (0, 0)
        ids = kept[1].cpu() if kept is not None else torch.zeros(0, 3, dtype=torch.long)
        return {"budget": self.budget, "rows_capacity": k_top + k_rand, "rows": int(len(ids)),
                "rows_by_gain": int(len(self._top[0])) if self._top is not None else 0,
                "points": int(len(ids)) * per_row, "inputs": int(ids[:, 1].unique().numel()),
                "batches": int(ids[:, 2].unique().numel()), "rows_seen": self.rows_seen, "rows_skipped": self.skipped,
                "largest_gain_kept": float(self._top[1].max()) if self._top is not None and len(self._top[1]) else None}


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
        self.layers.setdefault(name, LayerStats()).add(x, max(1, x.shape[0] // self.sampling.samples) if x.dim() else 1)

    def site(self, name: str, gain: Tensor, params: Any) -> None:
        self.gains.setdefault(name, GainStats()).add(gain)
        g = gain.detach().flatten(1).to(torch.float64)
        g = torch.where(torch.isnan(g), torch.full_like(g, math.inf), g)  # NaN gain: as bad as it gets
        self._keep_params(name, params, g.amax(1) if g.shape[1] else g.new_zeros(g.shape[0]))
        g = self.sampling.per_input(g).flatten(1)  # one row per input
        b = self._batch
        b["max"] = g.amax(1) if "max" not in b else torch.maximum(b["max"], g.amax(1))
        b["min"] = g.amin(1) if "min" not in b else torch.minimum(b["min"], g.amin(1))
        idx = _bin_index(g.clamp_min(1e-300), INPUT_EDGES)
        counts = torch.zeros(g.shape[0], len(INPUT_EDGES) - 1, dtype=torch.float64, device=g.device).scatter_add_(1, idx, torch.ones_like(g))
        b["hist"] = counts if "hist" not in b else b["hist"] + counts

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
        hist = b["hist"].cpu().numpy()
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
