"""Traces of the inverse pass, accumulated on the fly (paper Fig. 3b).

:class:`Tracer` is the :class:`~flowaudit.adapters.base.Observer` the scan hands to an adapter. It keeps, per
layer, running float64 sums of the finite values, the largest :math:`|v|` and the non-finite count
(:class:`~flowaudit.tracing.layer_stats.LayerStats`); per site, the inverse-gain histogram and extremes
(:class:`~flowaudit.tracing.gains.GainStats`), per-input gain figures and a
:class:`~flowaudit.tracing.reservoir.ParamReservoir` for the Remark 2 probe. Each call is read once and only
these figures are kept, so nothing grows with the number of inputs but a few numbers per input. On a GPU the
reads are tensor operations with no host sync until a batch ends; on the CPU, compiled loops
(:mod:`flowaudit.tracing.host_kernels`) with the same results, imported when the first tracer that uses them is
made: numba and the loops cost a process about 0.8 s and 120 MB, which a tracer of a few small passes
(``inspect``) does without (``compiled=False``: tensor operations there too). :func:`layer_table` turns the
in-distribution and OOD traces into the report's ``layers`` rows and names the explosion layer.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Collection, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config.sampling import Sampling
from .binning import GAIN_EDGES, INPUT_EDGES, NB, NI, GainBins, histogram_quantiles, log_first_keys
from .gains import GainStats, settle_inputs, summarize
from .layer_stats import LayerStats, layer_device
from .reservoir import ParamReservoir
from .scratch import Scratch

__all__ = ["Tracer", "layer_table"]

_CLOSE_INPUTS = 32  # inputs of closed passes whose figures are worked out together
_HOST_GAINS = (
    np.dtype(np.float32),
    np.dtype(np.float16),
)  # float32 or widened to it exactly (bfloat16 is, by host_array)
_HOST_COUNTS = (
    "counts",
    NI + 2,
)  # a pass's per-input coarse counts from the compiled loop (g ≤ 0 and +inf at the ends)


def _inputs(shape: tuple[int, ...], samples: int) -> int:
    """Inputs in a call of ``shape`` (rows input-major, K = ``samples`` rows an input); a call that is not
    whole inputs is one. The one rule of layers and sites, on every device."""
    rows = shape[0] if shape else 1
    return rows // samples if samples and rows >= samples and rows % samples == 0 else 1


def _rows_per_input(shape: tuple[int, ...], samples: int) -> int:
    """Rows an input in a call of ``shape`` (:func:`_inputs`: K, or every row of a call that is not whole inputs)."""
    return (shape[0] if shape else 1) // _inputs(shape, samples)


def _compiled_loops() -> ModuleType:
    """:mod:`.host_kernels`, imported on first use (module docstring)."""
    from . import host_kernels

    return host_kernels


class _HostScratch:
    """The compiled loops' temporaries, allocated once a tracer and grown as needed."""

    def __init__(self) -> None:
        bins = GainBins(GAIN_EDGES, torch.device("cpu"))  # built once a process
        self.table, self.first_bits = bins.table.numpy(), bins.first_bits
        self.log_first = log_first_keys(GAIN_EDGES)
        self.hist = np.zeros((4, NB + 2), dtype=np.int32)  # an input's counts (the compiled loop leaves it zeros)
        self.first = np.zeros(NB + 2, dtype=np.int64)  # an input's first row's counts, when its rows repeat it
        self.conv = np.zeros(2, dtype=np.int32)
        self.convf = self.conv.view(np.float32)
        self._idx = np.empty(0, dtype=np.int32)

    def idx(self, n: int) -> np.ndarray:
        if len(self._idx) < n:
            self._idx = np.empty(n, dtype=np.int32)
        return self._idx


class Tracer:
    """Observer of inverse passes of one input set (see module docstring).

    Args:
        sampling: the batch layout (K rows per input, input-major).
        param_budget: points of parameters kept per site for the Remark 2 probe.
        spatial: the sites whose parameters are laid out (…, H, W), elementwise over positions
            (``Site.spatial_params``): their rows too large for the budget are kept as windows.
        compiled: read CPU calls with the compiled loops (module docstring), else with tensor operations.
    """

    def __init__(
        self, sampling: Sampling, param_budget: int = 65536, spatial: Collection[str] = (), compiled: bool = True
    ):
        self.sampling = sampling
        self.param_budget = param_budget
        self.spatial = frozenset(spatial)
        self._layers: dict[str, LayerStats] = {}
        self._gains: dict[str, GainStats] = {}
        self.reservoirs: dict[str, ParamReservoir] = {}
        self._input_gain: list[dict] = []  # per input, over all sites: min, p50, p99, max
        self._closed: list[
            tuple[dict, int]
        ] = []  # passes ended whose inputs' figures are not read yet: (figures so far, inputs)
        self._batch: dict[str, Any] = {}  # the pass in progress: per-input extremes and counts
        self._pass_host: tuple[np.ndarray, ...] | None = None  # those of _batch the compiled loop adds to
        self._work = Scratch()
        self._loops = _compiled_loops() if compiled else None
        self._host = _HostScratch() if compiled else None
        self._plans: dict[str, tuple] = {}  # per site, what its CPU calls of one shape need (:meth:`_plan`)
        self._inputs_seen = self._batches_seen = 0

    @property
    def layers(self) -> dict[str, LayerStats]:
        """Per layer, its running statistics (the pass in progress included)."""
        return self._layers

    @property
    def gains(self) -> dict[str, GainStats]:
        """Per site, its inverse-gain statistics (the pass in progress included)."""
        return self._gains

    @property
    def input_gain(self) -> list[dict]:
        """Per input, its inverse-gain min, p50, p99 and max over all sites (inputs whose pass has ended)."""
        self._figure_closed()
        return self._input_gain

    def _figure_closed(self) -> None:
        """Work out the per-input figures of the passes closed since the last time, all at once."""
        if self._closed:
            self._input_gain += _input_figures(self._closed)
            self._closed = []

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
        stats = self._layers.get(name)
        if stats is None:
            stats = self._layers[name] = LayerStats()
        loops = self._loops
        v = None if loops is None else loops.host_array(x)
        if v is not None and v.dtype == np.float32 and v.size:  # the compiled loop, at the call
            n = _inputs(v.shape, self.sampling.samples)
            flat, rows = loops.memory_rows(v, n)  # read where it lies, no copy
            h = self._host
            loops.layer_sums(flat, flat.view(np.int32), rows, n, stats.host_acc(), h.conv, h.convf)
        else:  # another device or dtype (LayerStats.add skips empty tensors)
            stats.add(x, _inputs(x.shape, self.sampling.samples), self._work)

    def site(self, name: str, gain: Tensor, params: Any) -> None:
        loops = self._loops
        g = None if loops is None else loops.host_array(gain)
        if g is not None and g.dtype in _HOST_GAINS and g.size:
            rows = loops.host_array(params) if isinstance(params, Tensor) else None
            if rows is not None or not isinstance(params, Tensor):  # parameters on the CPU too, or none
                self._site_host(name, g, rows if _param_rows(rows) else None)
                return
        g = gain.detach()
        p = summarize(
            g, _rows_per_input(g.shape, self.sampling.samples), self._work
        )  # one read of the gains for every statistic
        self._gains.setdefault(name, GainStats()).add_pass(p)
        if _param_rows(params):
            self._reservoir(name).add(
                params, p.row_max, self._inputs_seen, self.sampling.samples, self._batches_seen, gain=g
            )
        self._add_inputs(self._batch, p.input_max, p.input_min, p.input_counts)

    def site_log(self, name: str, log_gain: Tensor, params: Any) -> None:
        """:meth:`site` given the log inverse gain ``ln(1/c')`` (a model's log-determinant terms). On the CPU its
        float32 values are binned as they are (the same bins: :func:`~flowaudit.tracing.binning.log_first_keys`),
        so no ``exp`` runs over the call; elsewhere its gains go to :meth:`site`, each rounded once from the float64
        ``exp`` as the bins and the compiled loops take them (a float32 ``exp`` may be an ulp off)."""
        loops = self._loops
        ell = None if loops is None else loops.host_array(log_gain)
        if ell is not None and ell.dtype == np.float32 and ell.size:
            rows = loops.host_array(params) if isinstance(params, Tensor) else None
            if rows is not None or not isinstance(params, Tensor):
                self._site_host(name, ell, rows if _param_rows(rows) else None, log=True)
                return
        self.site(name, log_gain.double().exp().to(log_gain.dtype), params)

    def _site_host(self, name: str, g: np.ndarray, rows: np.ndarray | None, log: bool = False) -> None:
        """A CPU call: binned and counted by the compiled loop (:func:`~flowaudit.tracing.host_kernels.site_counts`),
        its rows offered to the reservoir by another (:meth:`ParamReservoir.add_host`). With ``log``, ``g`` holds
        the log-gains."""
        plan = self._plans.get(name)
        if plan is None or plan[0] != g.shape:
            plan = self._plans[name] = self._plan(name, g.shape)
        _, k, inputs, scratch = plan
        flat = g.reshape(-1)  # a view where contiguous
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)  # float16, widened exactly
        mine = self._pass_host
        if (
            mine is None or len(mine[1]) != inputs or mine[1] is not self._batch.get("max")
        ):  # the pass's first call, or other inputs
            mine = self._start_pass_host(inputs)
        h = self._host
        self._loops.site_counts(
            flat.view(np.int32),
            flat,
            log,
            k,
            h.table,
            h.first_bits,
            h.log_first,
            *self._gains[name].host_arrays(),
            *mine,
            *scratch,
        )
        if mine is not self._pass_host:  # figures of its own, folded in
            self._add_inputs(self._batch, mine[1], mine[2], torch.from_numpy(mine[0]))
        if rows is not None:
            self._reservoir(name).add_host(
                rows, scratch[0], self._inputs_seen, self.sampling.samples, self._batches_seen, gain=g, log=log
            )

    def _plan(self, name: str, shape: tuple[int, ...]) -> tuple:
        """What a CPU call of site ``name`` with gains of ``shape`` needs besides its values, worked out once a
        shape (its :class:`GainStats` made if new): (shape, K, inputs, the compiled loop's row maxima and scratch)."""
        r = shape[0] if shape else 1
        k = _rows_per_input(shape, self.sampling.samples)
        self._gains.setdefault(name, GainStats())
        h = self._host
        return shape, k, r // k, (np.empty(r), h.hist, h.idx(math.prod(shape) // r), h.first, h.conv, h.convf)

    def _start_pass_host(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-input coarse counts and extremes of ``n`` inputs for the compiled loop to add to: the pass's own
        when it has none yet (:attr:`_pass_host`), else a call's own, folded in after it."""
        mine = (np.zeros((n, NI + 2), dtype=np.int64), np.full(n, -math.inf), np.full(n, math.inf))
        b = self._batch
        if "max" not in b and _HOST_COUNTS not in b:
            b[_HOST_COUNTS], b["max"], b["min"] = mine
            self._pass_host = mine
        return mine

    @staticmethod
    def _add_inputs(b: dict, input_max: Any, input_min: Any, counts: Tensor) -> None:
        """Fold per-input extremes and counts into a pass's ``b``: numpy on the CPU (where the compiled loop
        writes them), tensors on a device."""
        input_max, input_min = (
            t.numpy() if isinstance(t, Tensor) and t.device.type == "cpu" else t for t in (input_max, input_min)
        )
        if "max" in b:
            lib = np if isinstance(input_max, np.ndarray) else torch
            b["max"], b["min"] = lib.maximum(b["max"], input_max), lib.minimum(b["min"], input_min)
        else:
            b["max"], b["min"] = input_max, input_min
        h = (
            "counts",
            counts.shape[1],
        )  # raw (site bins or coarse bins with their two junk columns) or settled: settled once a batch
        if h not in b:
            b[h] = counts
        elif isinstance(b[h], np.ndarray):
            b[h] = torch.from_numpy(b[h]) + counts.cpu()
        else:
            b[h] = b[h] + counts

    # -- bookkeeping ----------------------------------------------------------
    def _reservoir(self, name: str) -> ParamReservoir:
        r = self.reservoirs.get(name)
        if r is None:  # keys drawn from (seed, site, row): the same rows whatever the batches, shards or ranks
            r = self.reservoirs[name] = ParamReservoir(
                self.param_budget,
                salt=self.sampling.seed * 1_000_003 + zlib.crc32(name.encode()),
                spatial=name in self.spatial,
                compiled=self._loops is not None,
            )
        return r

    def end_batch(self, n_inputs: int) -> None:
        """Close a pass of ``n_inputs`` inputs; their inverse-gain min, p50, p99 and max over all sites join
        :attr:`input_gain`, worked out for a few passes at once (a few operations for all their inputs)."""
        self._closed.append((self._batch, n_inputs))
        if sum(n for _, n in self._closed) >= _CLOSE_INPUTS:
            self._figure_closed()
        self._batch, self._pass_host = {}, None
        self._inputs_seen += n_inputs
        self._batches_seen += 1

    # -- mergeable state (shards, resume, ranks) -------------------------------------------------
    def start_at(self, first_input: int, first_pass: int) -> "Tracer":
        """Number inputs and passes from ``first_input`` / ``first_pass`` (a shard's place in its set)."""
        self._inputs_seen, self._batches_seen = first_input, first_pass
        return self

    def state(self) -> dict:
        """Everything :meth:`merge` needs, on the CPU (``torch.save``-able with ``weights_only``)."""
        return {
            "layers": {k: v.state() for k, v in self.layers.items()},
            "gains": {k: v.state() for k, v in self.gains.items()},
            "reservoirs": {k: v.state() for k, v in self.reservoirs.items()},
            "input_gain": list(self.input_gain),
        }

    @classmethod
    def from_state(
        cls, sampling: Sampling, state: dict, device: torch.device | str = "cpu", param_budget: int = 65536
    ) -> "Tracer":
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
            self.layers[k] = (
                self.layers[k].merge(v) if k in self.layers else LayerStats.from_state(v.state(), layer_device(v))
            )
        for k, v in other.gains.items():
            self.gains[k] = self.gains[k].merge(v) if k in self.gains else v
        for k, v in other.reservoirs.items():
            self.reservoirs[k] = self.reservoirs[k].merge(v) if k in self.reservoirs else v
        self.input_gain.extend(other.input_gain)
        return self


def _input_figures(closed: list[tuple[dict, int]]) -> list[dict]:
    """Per input of the closed passes ``closed`` (folded figures, inputs): min, p50, p99, max (NaN: no site)."""
    full = [b for b, _ in closed if b]
    if full:
        hist = np.concatenate([sum(settle_inputs(_host(v)) for h, v in b.items() if h[0] == "counts") for b in full])
        lo, hi = (np.concatenate([_host(b[k]) for b in full]).astype(np.float64) for k in ("min", "max"))
        p50, p99 = (np.minimum(np.maximum(histogram_quantiles(hist, INPUT_EDGES, p), lo), hi) for p in (0.5, 0.99))
        rows = iter(zip(lo.tolist(), p50.tolist(), p99.tolist(), hi.tolist()))
    out: list[dict] = []
    for b, n in closed:
        if b:
            out += [{"min": a, "p50": m, "p99": c, "max": d} for a, m, c, d in itertools.islice(rows, n)]
        else:
            out += [{"min": math.nan, "p50": math.nan, "p99": math.nan, "max": math.nan}] * n
    return out


def _host(v: Tensor | np.ndarray) -> np.ndarray:
    return v.cpu().numpy() if isinstance(v, Tensor) else v


def _param_rows(params: Any) -> bool:
    """Whether a site call handed parameter rows the reservoir can keep (a tensor or numpy view, a row a sample)."""
    return isinstance(params, (Tensor, np.ndarray)) and params.ndim > 0 and params.shape[0] > 0


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
