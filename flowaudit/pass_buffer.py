r"""The CPU tracer's pass buffer: a pass's gains and layer values copied as they come, summarized once it ends.

On the CPU much of the tracer's cost is the number of operations it issues: a site or a
layer read on its own takes some twenty small tensor operations, several microseconds each,
and an exact pass (one input's K samples) has few values per call. The pass buffer therefore
takes copies only — a site's float32 gains into one flat buffer and its parameter rows into
another, a layer's values into a float64 buffer laid out in chunks of 4096 per input (zero
padded, :mod:`flowaudit.layer_stats`) — and summarizes the whole pass at its end in a few
operations over the buffers:

* gains: bins from the bit tables (:class:`~flowaudit.binning.GainBins`), shifted by
  :math:`(c \cdot n + i)(B + 2)` for call :math:`c` and input :math:`i` and counted by one
  ``bincount`` (when a pass has more bins than gains — many inputs with few gains each — the
  calls' counts and the inputs' coarse counts are two); row extremes by ``reduceat``. The figures equal :func:`~flowaudit.gains.summarize`'s
  call by call; a pass with a gain that is not finite and positive is summarized call by call
  by it. Each call's rows and their largest gains then go to the parameter reservoir, as they
  would have during the pass.
* layers: chunk sums of the values and of their squares and the chunks' largest square, each
  one operation over the buffer; per input, the sum of its chunk sums (numpy) and
  :math:`\max|v| = \sqrt{\max v^2}` (exact: the square of a float32 is exact in float64).
  The sums of a chunk and of a row do not depend on the other inputs of the pass, so the
  figures are batch-invariant as the device path's are (the row's last association may differ
  from it in the last bit). A call with a non-finite value goes the general way
  (:func:`~flowaudit.layer_stats.layer_parts`).

The buffers are reused from pass to pass (their layout repeats) and emptied by
:meth:`PassBuffer.flush`, at the end of a pass or once they hold :data:`CAPACITY` bytes (a large
pass is summarized in parts, with the same figures: every statistic folds call after call), so
what they add to a pass's memory is bounded whatever the image size. Nothing is read from the model's tensors
after the call that handed them over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .binning import GAIN_EDGES, INPUT_EDGES, GainBins
from .gains import summarize, settle
from .layer_stats import CHUNK, layer_parts
from .scratch import Scratch

__all__ = ["PassBuffer", "SiteSummary", "InputFigures", "LayerSummary"]

_NB, _NI = len(GAIN_EDGES) - 1, len(INPUT_EDGES) - 1
CAPACITY = 32 << 20  # bytes of pending calls after which the pass is summarized so far: memory stays bounded


@dataclass
class SiteSummary:
    """One site call's figures (as :class:`~flowaudit.gains.GainPass`, the site's extremes settled)."""

    name: str
    every: Tensor  # (B + 2,) counts: g ≤ 0, the B bins, +inf
    low: float  # smallest finite positive gain (inf: none)
    top: float  # largest finite positive gain (−inf: none)
    row_max: np.ndarray  # per row (sample), its largest gain (float64, NaN as +inf)
    params: Tensor | None  # the call's parameter rows (a view of the buffer: valid until the next pass)


@dataclass
class InputFigures:
    """Per input, over the site calls summarized together: largest and smallest gain and the raw counts."""

    max: np.ndarray  # (inputs,) float64
    min: np.ndarray
    counts: Tensor  # (inputs, B + 2) over the site bins, or (inputs, 122) over the coarse bins (:func:`~flowaudit.gains.settle_inputs`)


@dataclass
class LayerSummary:
    """One layer call's per-input parts: count, Σv, Σv², max |v|, non-finite count (float64, inputs × 5)."""

    name: str
    parts: np.ndarray


class _Grow:
    """A flat buffer handed out in consecutive pieces, grown (zero-filled, contents kept) when a pass needs more."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.used = dtype, 0
        self.buf = torch.zeros(0, dtype=dtype)

    def take(self, m: int) -> int:
        if self.used + m > self.buf.numel():
            grown = torch.zeros(max(self.buf.numel() * 5 // 4, self.used + m), dtype=self.dtype)  # sized by the first passes
            grown[: self.used] = self.buf[: self.used]
            self.buf = grown
        off, self.used = self.used, self.used + m
        return off


class PassBuffer:
    """The pending site and layer calls of one pass on the CPU (module docstring)."""

    def __init__(self) -> None:
        self._gains = _Grow(torch.float32)
        self._values = _Grow(torch.float64)
        self._short = _Grow(torch.float64)
        self._sites: list[tuple[str, int, int, int]] = []  # name, offset, rows, values per row
        self._params: dict[torch.dtype, _Grow] = {}
        self._param_calls: list[tuple[torch.dtype, int, tuple[int, ...]] | None] = []  # per site call
        self._layers: list[tuple[str, bool, int, int, int, int]] = []  # name, chunked, offset, inputs, values per input, chunks
        self._offset_cache: dict[tuple, Tensor] = {}  # per site layout: each gain's shift into the counts
        self._work = Scratch()

    def __bool__(self) -> bool:
        return bool(self._sites or self._layers)

    @property
    def full(self) -> bool:
        """Whether the pending calls hold :data:`CAPACITY` bytes or more (the tracer then flushes mid-pass)."""
        held = self._gains.used * 4 + (self._values.used + self._short.used) * 8
        return held + sum(g.used * g.buf.element_size() for g in self._params.values()) >= CAPACITY

    @staticmethod
    def takes(t: Tensor) -> bool:
        """Whether the buffer takes this call's tensor (CPU, a non-empty float tensor)."""
        return t.device.type == "cpu" and t.is_floating_point() and t.numel() > 0

    def site(self, name: str, gain: Tensor, params: Tensor | None) -> None:
        """Copy a call's gains (rows = samples) and its parameter rows (``None``: none to keep)."""
        g = gain.detach()
        m, rows = g.numel(), (g.shape[0] if g.dim() else 1)
        off = self._gains.take(m)
        self._gains.buf[off : off + m].view(g.shape).copy_(g)
        self._sites.append((name, off, rows, m // rows))
        if params is None:
            self._param_calls.append(None)
            return
        grow = self._params.setdefault(params.dtype, _Grow(params.dtype))
        p_off = grow.take(params.numel())
        grow.buf[p_off : p_off + params.numel()].view(params.shape).copy_(params.detach())
        self._param_calls.append((params.dtype, p_off, tuple(params.shape)))

    def layer(self, name: str, x: Tensor, n_inputs: int) -> None:
        """Copy a layer's values, ``n_inputs`` input-major rows, into chunks of 4096 (float64); rows of
        at most 4096 values (a chunk already) go unpadded to a second buffer."""
        x = x.detach()
        if x.dim() == 0:
            x = x.reshape(1)
        m = x.numel() // n_inputs
        if m <= CHUNK:  # the rows back to back, in x's element order
            off = self._short.take(n_inputs * m)
            self._short.buf[off : off + n_inputs * m].view(x.shape).copy_(x)
            self._layers.append((name, False, off, n_inputs, m, 1))
            return
        values = x.unflatten(0, (n_inputs, -1))
        chunks = -(-m // CHUNK)
        off = self._values.take(n_inputs * chunks * CHUNK)
        rows = self._values.buf[off : off + n_inputs * chunks * CHUNK].view(n_inputs, chunks * CHUNK)
        if m % CHUNK:  # the padding of the last chunk: whatever an earlier call or part left there
            rows[:, m:].zero_()
        rows[:, :m].view(values.shape).copy_(values)
        self._layers.append((name, True, off, n_inputs, m, chunks))

    # -- the end of a pass -------------------------------------------------------------------
    def flush(self, samples: int) -> tuple[list[SiteSummary], list[InputFigures], list[LayerSummary]]:
        """Summarize and forget the pending calls: ``(sites, inputs, layers)``.

        ``inputs`` are per-input figures to fold into the batch's (one entry for the whole pass,
        or one per call where the pass went call by call; none without site calls).
        """
        sites, inputs = self._flush_sites(samples) if self._sites else ([], [])
        layers = self._flush_layers() if self._layers else []
        self._sites, self._param_calls, self._layers = [], [], []
        self._gains.used = self._values.used = self._short.used = 0
        for grow in self._params.values():
            grow.used = 0
        return sites, inputs, layers

    def _flush_sites(self, samples: int) -> tuple[list[SiteSummary], list[InputFigures]]:
        used = self._gains.used
        gains = self._gains.buf[:used]
        flat = gains.numpy()
        starts = np.concatenate([off + per * np.arange(rows) for _, off, rows, per in self._sites])
        row_min = np.minimum.reduceat(flat, starts).astype(np.float64)
        row_max = np.maximum.reduceat(flat, starts).astype(np.float64)
        row_max[np.isnan(row_max)] = math.inf  # a NaN gain: as bad as it gets
        params = [None if c is None else self._params[c[0]].buf[c[1] : c[1] + math.prod(c[2])].view(c[2]) for c in self._param_calls]
        n = self._sites[0][2] // samples
        if not (row_min.min() > 0 and row_max.max() < math.inf) or any(rows != n * samples for _, _, rows, _ in self._sites):
            return self._sites_one_by_one(gains, samples, params)
        calls = len(self._sites)
        idx = self._bin_indices(gains)
        if calls * n * (_NB + 2) <= used:  # one count for every call and input
            counts = torch.bincount(idx.add_(self._offsets(n, _NB + 2, True)), minlength=calls * n * (_NB + 2)).view(calls, n, _NB + 2)
            every, per_input = (counts.sum(1) if n > 1 else counts[:, 0]), counts.sum(0)
        else:  # more bins than gains (many inputs, few gains each): the calls' counts, then the inputs' coarse ones
            every = torch.bincount(torch.add(idx, self._offsets(n, _NB + 2, False), out=self._work.get("site", idx.shape, torch.int32, idx.device)),
                                   minlength=calls * (_NB + 2)).view(calls, _NB + 2)
            coarse = idx.add_(_NB // _NI - 1).div_(_NB // _NI, rounding_mode="floor")  # 0 → 0, site bin j ≥ 1 → 1 + (j − 1) // 4, +inf → 121
            per_input = torch.bincount(coarse.add_(self._offsets(n, _NI + 2, None)), minlength=n * (_NI + 2)).view(n, _NI + 2)
        first = np.cumsum([0] + [rows for _, _, rows, _ in self._sites[:-1]])
        low, top = np.minimum.reduceat(row_min, first), np.maximum.reduceat(row_max, first)
        out = [SiteSummary(name, every[c], float(low[c]), float(top[c]), row_max[first[c] : first[c] + rows], params[c])
               for c, (name, _, rows, _) in enumerate(self._sites)]
        input_max = row_max.reshape(calls, n, samples).max(axis=(0, 2))  # every call: n inputs × K rows
        input_min = row_min.reshape(calls, n, samples).min(axis=(0, 2))
        return out, [InputFigures(input_max, input_min, per_input)]

    def _bin_indices(self, gains: Tensor) -> Tensor:
        """Per gain, its bin: 0 for g ≤ 0, 1…B, B + 1 for +inf (:class:`~flowaudit.binning.GainBins`)."""
        bits, work = gains.view(torch.int32), self._work
        hi = torch.bitwise_right_shift(bits, 16, out=work.get("hi", bits.shape, torch.int32, bits.device))  # positive: no sign bit
        return GainBins(GAIN_EDGES, bits.device).index(bits, hi, out=work.get("idx", bits.shape, torch.int32, bits.device))

    def _offsets(self, n: int, width: int, by_call: bool | None) -> Tensor:
        """Per gain, the shift of its index into a count of ``width`` bins per segment, a segment being
        (call, input) (``by_call`` True), a call (False) or an input (None); cached per layout."""
        key = (n, width, by_call, tuple(self._sites_layout()))
        if key not in self._offset_cache:
            parts = []
            for c, (_, _, rows, per) in enumerate(self._sites):
                inputs = np.arange(n, dtype=np.int64)
                seg = c * n + inputs if by_call else (np.full(n, c) if by_call is False else inputs)
                parts.append(np.repeat(seg * width, rows * per // n))
            if len(self._offset_cache) >= 4:  # a pass in a few parts, repeated pass after pass
                self._offset_cache.clear()
            self._offset_cache[key] = torch.from_numpy(np.concatenate(parts).astype(np.int32))
        return self._offset_cache[key]

    def _sites_layout(self):
        return ((off, rows, per) for _, off, rows, per in self._sites)

    def _sites_one_by_one(self, gains: Tensor, samples: int, params: list) -> tuple[list[SiteSummary], list[InputFigures]]:
        """The general path (:func:`~flowaudit.gains.summarize`), call by call, for a pass with junk gains."""
        out, inputs = [], []
        for (name, off, rows, per), par in zip(self._sites, params):
            p = summarize(gains[off : off + rows * per].view(rows, per), samples, self._work)
            _, ext = settle(*p.raw)
            lo, hi = ext[2:].tolist()
            out.append(SiteSummary(name, p.raw[0], lo, hi, p.row_max.numpy(), par))
            inputs.append(InputFigures(p.input_max.numpy(), p.input_min.numpy(), p.input_counts))
        return out, inputs

    def _flush_layers(self) -> list[LayerSummary]:
        """Layer parts: the chunked buffer in a few whole-buffer operations, short rows call by call."""
        buf = self._values.buf
        values = buf[: self._values.used].view(-1, CHUNK)
        total = values.sum(1).numpy()
        ok = np.isfinite(total)  # a non-finite value makes its chunk's sum non-finite (finite float32s cannot overflow it)
        out: list[LayerSummary | None] = [None] * len(self._layers)
        for c, (name, chunked, off, n, m, chunks) in enumerate(self._layers):
            if not chunked:
                out[c] = LayerSummary(name, self._short_parts(self._short.buf[off : off + n * m].view(n, m)))
            elif not ok[off // CHUNK : off // CHUNK + n * chunks].all():  # before the squares overwrite the values
                out[c] = LayerSummary(name, layer_parts(buf[off : off + n * chunks * CHUNK].view(n, -1)[:, :m], self._work).numpy())
        squares = values.mul_(values)
        total_sq = squares.sum(1).numpy()
        top_sq = squares.amax(1).numpy()  # max |v| = √(max v²) exactly: v² of a float32 is exact in float64
        for c, (name, chunked, off, n, m, chunks) in enumerate(self._layers):
            if out[c] is None:
                a, b = off // CHUNK, off // CHUNK + n * chunks
                top = np.sqrt(top_sq[a:b].reshape(n, chunks).max(1))  # zero padding: |v| ≥ 0 anyway
                out[c] = LayerSummary(name, np.stack([np.full(n, float(m)), total[a:b].reshape(n, chunks).sum(1),
                                                      total_sq[a:b].reshape(n, chunks).sum(1), top, np.zeros(n)], 1))
        return out

    def _short_parts(self, v: Tensor) -> np.ndarray:
        """Parts of rows of at most one chunk (float64 ``v``, overwritten), as the device path sums them."""
        total = v.sum(1)
        if not bool(torch.isfinite(total).all()):
            return layer_parts(v, self._work).numpy()
        squares = v.mul_(v)
        n, m = v.shape
        return np.stack([np.full(n, float(m)), total.numpy(), squares.sum(1).numpy(), np.sqrt(squares.amax(1).numpy()), np.zeros(n)], 1)
