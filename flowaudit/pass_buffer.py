r"""The CPU tracer's pass buffer: the calls of a few passes copied as they come, summarized together.

On the CPU much of the tracer's cost is the number of operations it issues: a site or a
layer read on its own takes some twenty small tensor operations, several microseconds each,
and an exact pass (one input's K samples) has few values per call. The pass buffer therefore
takes copies only — a site's float32 gains into one flat buffer and its parameter rows into
another, a layer's float32 values into a third laid out in chunks of 4096 per input (zero
padded, :mod:`flowaudit.layer_stats`) — one operation each, into views made once and reused
while the calls repeat their layout (a *plan*). It holds several passes (:meth:`PassBuffer.end_pass`
marks where one ends) until one more would not fit in :data:`CAPACITY` bytes, and then
summarizes them in a few operations over the buffers, so the fixed cost of a summary is paid
once for a few passes:

* gains: bins from the bit tables (:class:`~flowaudit.binning.GainBins`), shifted by
  :math:`(B + 2)` times the call's and input's segment and counted by one ``bincount`` (when the
  buffer has more bins than gains — many inputs with few gains each — the calls' counts and the
  inputs' coarse counts are two); row extremes by ``reduceat``. The figures equal
  :func:`~flowaudit.gains.summarize`'s call by call; a buffer with a gain that is not finite
  and positive is summarized call by call by it. A site's calls then go to its parameter
  reservoir together, which keeps the rows one call at a time would (a strict total order).
* layers: per chunk, the sum of the values and of their squares and the largest square, in
  float64, a block of chunks widened at a time in a scratch buffer that stays in the core's
  cache; per input, the sum of its chunk sums (one ``reduceat`` over every input's chunks)
  and :math:`\max|v| = \sqrt{\max v^2}` (exact: the square of a float32 is exact in float64).
  The sums of a chunk and of an input do not depend on the other inputs, so the figures are
  batch-invariant as the device path's are (an input's last association may differ from it in
  the last bit). A call with a non-finite value goes the general way
  (:func:`~flowaudit.layer_stats.layer_parts`); layers of another dtype do not come here.

A pass larger than the capacity is summarized in parts, with the same figures (every statistic
folds call after call), so what the buffer adds to memory is bounded whatever the image size.
Nothing is read from the model's tensors after the call that handed them over. A scan makes a
tracer per shard; fresh memory costs a page fault a page on first touch (some 13 ms for 32 MiB
on one CPU thread), so a pass buffer that is gone leaves its buffers to the next one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .binning import GAIN_EDGES, INPUT_EDGES, GainBins
from .gains import settle, summarize
from .layer_stats import CHUNK, layer_parts
from .scratch import Scratch

__all__ = ["PassBuffer", "SiteSummary", "InputFigures", "LayerSummary"]

_NB, _NI = len(GAIN_EDGES) - 1, len(INPUT_EDGES) - 1
CAPACITY = 32 << 20  # bytes of pending calls after which they are summarized: memory stays bounded
_BLOCK = 64  # chunks of layer values widened to float64 at a time (2 MiB)


@dataclass
class SiteSummary:
    """A site's figures over its calls in the buffer (as :class:`~flowaudit.gains.GainPass`, the extremes settled)."""

    name: str
    every: Tensor  # (B + 2,) counts: g ≤ 0, the B bins, +inf
    low: float  # smallest finite positive gain (inf: none)
    top: float  # largest finite positive gain (−inf: none)
    calls: list[tuple[int, np.ndarray, Tensor | None]]  # per call, in order: its pass (among those in the buffer; the
    # last may still be open), per row its largest gain (float64, NaN as +inf), its parameter rows (a view of the buffer:
    # valid until the next summary)


@dataclass
class InputFigures:
    """Per input of one pass, over its site calls summarized together: largest and smallest gain and the raw counts."""

    pass_index: int
    max: np.ndarray  # (inputs,) float64
    min: np.ndarray
    counts: Tensor  # (inputs, B + 2) over the site bins, or (inputs, 122) over the coarse bins (:func:`~flowaudit.gains.settle_inputs`)


@dataclass
class LayerSummary:
    """A layer's per-input parts over its calls in the buffer: count, Σv, Σv², max |v|, non-finite count (float64, rows × 5)."""

    name: str
    parts: np.ndarray


_SPARE: dict[tuple[str, torch.dtype], Tensor] = {}  # per role, the largest buffer of a pass buffer gone (module docstring)


class _Grow:
    """A flat buffer handed out in consecutive pieces, grown (contents kept) when the calls need more.

    ``gen`` counts the growths: a view made before one points into the old buffer. The memory is
    taken over from a pass buffer gone, if any (:data:`_SPARE`), and left to the next one."""

    def __init__(self, role: str, dtype: torch.dtype):
        self.key, self.used, self.gen = (role, dtype), 0, 0
        spare = _SPARE.pop(self.key, None)
        self.buf = spare if spare is not None else torch.empty(0, dtype=dtype)

    def take(self, m: int) -> int:
        if self.used + m > self.buf.numel():
            grown = torch.empty(max(self.buf.numel() * 2, self.used + m), dtype=self.buf.dtype)  # doubled: a few growths in all
            grown[: self.used] = self.buf[: self.used]
            self.buf, self.gen = grown, self.gen + 1
        off, self.used = self.used, self.used + m
        return off

    def __del__(self) -> None:
        try:
            kept = _SPARE.get(self.key)
            if kept is None or kept.numel() < self.buf.numel():
                _SPARE[self.key] = self.buf
        except Exception:  # interpreter shutdown: nothing to keep
            pass


@dataclass
class _Site:
    """A site call: where its copies went (``dest``, ``p_dest``: views reused by later calls of the same layout)."""

    name: str
    shape: torch.Size
    p_key: tuple[torch.Size, torch.dtype] | None  # its parameter rows' shape and dtype (``None``: none)
    off: int
    rows: int
    per: int
    dest: Tensor
    p_dest: Tensor | None
    p_off: int
    gens: tuple[int, int]  # the buffers' growths when the views were made
    pass_index: int = 0


@dataclass
class _Layer:
    """A layer call: where its values went (chunked: ``n`` rows of ``chunks`` × 4096, else back to back)."""

    name: str
    shape: torch.Size
    n: int
    chunked: bool
    off: int
    m: int
    chunks: int
    size: int  # values it takes in its buffer
    dest: Tensor
    gen: int
    pass_index: int = 0


class PassBuffer:
    """The pending site and layer calls of a few passes on the CPU (module docstring)."""

    def __init__(self) -> None:
        self._gains = _Grow("gains", torch.float32)
        self._values = _Grow("values", torch.float32)
        self._short = _Grow("short", torch.float64)
        self._params: dict[torch.dtype, _Grow] = {}
        self._calls: list[_Site | _Layer] = []
        self._plan: list[_Site | _Layer] = []  # the calls of the last summary: a call of the same layout reuses its views
        self._passes = 0  # passes ended since the last summary (the calls after the last end belong to an open pass)
        self._held = self._held_at_end = 0  # bytes taken; at the last end of a pass
        self._cache: dict[tuple, tuple] = {}  # per layout of the site calls: rows' starts and each gain's segment
        self._work = Scratch()

    def __bool__(self) -> bool:
        return bool(self._calls)

    @staticmethod
    def takes(t: Tensor) -> bool:
        """Whether the buffer takes this call's tensor (CPU, a non-empty float tensor)."""
        return t.device.type == "cpu" and t.is_floating_point() and t.numel() > 0

    def _planned(self, cls: type, name: str, shape: torch.Size):
        """The plan's entry for the next call if it has this layout (views still valid), else ``None``."""
        i = len(self._calls)
        if i < len(self._plan):
            e = self._plan[i]
            if type(e) is cls and e.name == name and e.shape == shape:
                return e
            del self._plan[i:]
        return None

    def site(self, name: str, gain: Tensor, params: Tensor | None) -> bool:
        """Copy a call's gains (rows = samples) and its parameter rows (``None``: none to keep); true when full."""
        e = self._planned(_Site, name, gain.shape)
        p_key = None if params is None else (params.shape, params.dtype)
        if e is None or e.p_key != p_key or e.gens != self._site_gens(p_key):
            e = self._new_site(name, gain, params)
        e.dest.copy_(gain)
        self._gains.used = e.off + e.dest.numel()  # a planned call takes the buffers where it took them before
        nbytes = e.dest.numel() * 4
        if params is not None:
            e.p_dest.copy_(params)
            self._params[params.dtype].used = e.p_off + e.p_dest.numel()
            nbytes += e.p_dest.numel() * e.p_dest.element_size()
        return self._record(e, nbytes)

    def _site_gens(self, p_key: tuple | None) -> tuple[int, int]:
        return self._gains.gen, (0 if p_key is None else self._params[p_key[1]].gen)

    def _new_site(self, name: str, gain: Tensor, params: Tensor | None) -> _Site:
        """A site call of a layout the plan does not have here: its places in the buffers, made anew."""
        del self._plan[len(self._calls) :]  # this call's entry and the rest no longer fit
        m, rows = gain.numel(), (gain.shape[0] if gain.dim() else 1)
        off = self._gains.take(m)
        p_dest, p_off, p_key = None, 0, None
        if params is not None:
            grow = self._params.get(params.dtype)
            if grow is None:
                grow = self._params[params.dtype] = _Grow("params", params.dtype)
            p_off = grow.take(params.numel())
            p_dest = grow.buf[p_off : p_off + params.numel()].view(params.shape)
            p_key = (params.shape, params.dtype)
        e = _Site(name, gain.shape, p_key, off, rows, m // rows, self._gains.buf[off : off + m].view(gain.shape), p_dest, p_off,
                  self._site_gens(p_key))
        self._plan.append(e)
        return e

    def layer(self, name: str, x: Tensor, n_inputs: int) -> bool:
        """Copy a layer's float32 values, ``n_inputs`` input-major rows, into chunks of 4096; rows of
        at most 4096 values (a chunk already) go unpadded to a second buffer (float64). True when full."""
        if x.dim() == 0:
            x = x.reshape(1)
        e = self._planned(_Layer, name, x.shape)
        if e is None or e.n != n_inputs or e.gen != (self._values if e.chunked else self._short).gen:
            e = self._new_layer(name, x, n_inputs)
        grow = self._values if e.chunked else self._short
        e.dest.copy_(x.reshape(n_inputs, e.m) if e.chunked else x)
        grow.used = e.off + e.size
        return self._record(e, e.size * grow.buf.element_size())

    def _new_layer(self, name: str, x: Tensor, n_inputs: int) -> _Layer:
        """A layer call of a layout the plan does not have here: its place in a buffer, made anew."""
        del self._plan[len(self._calls) :]
        m = x.numel() // n_inputs
        if m <= CHUNK:  # the rows back to back, in x's element order
            off = self._short.take(n_inputs * m)
            e = _Layer(name, x.shape, n_inputs, False, off, m, 1, n_inputs * m, self._short.buf[off : off + n_inputs * m].view(x.shape), self._short.gen)
        else:
            chunks = -(-m // CHUNK)
            off = self._values.take(n_inputs * chunks * CHUNK)
            rows = self._values.buf[off : off + n_inputs * chunks * CHUNK].view(n_inputs, chunks * CHUNK)
            rows[:, m:].zero_()  # the padding: zero while this entry of the plan is reused (only it writes there)
            e = _Layer(name, x.shape, n_inputs, True, off, m, chunks, n_inputs * chunks * CHUNK, rows[:, :m], self._values.gen)
        self._plan.append(e)
        return e

    def _record(self, e: _Site | _Layer, nbytes: int) -> bool:
        e.pass_index = self._passes
        self._calls.append(e)
        self._held += nbytes
        return self._held >= CAPACITY

    def end_pass(self) -> bool:
        """Mark the end of a pass; true when the calls held should be summarized now (one more pass like it may not fit)."""
        self._passes += 1
        last, self._held_at_end = self._held - self._held_at_end, self._held
        return self._held + last > CAPACITY

    # -- the summary -----------------------------------------------------------------------
    def flush(self, samples: int) -> tuple[list[SiteSummary], list[InputFigures], list[LayerSummary]]:
        """Summarize and forget the pending calls: ``(sites, inputs, layers)``.

        ``sites`` one per site name, ``layers`` one per layer name (each in first-call order, its calls in
        order); ``inputs`` per pass with site calls (one entry per pass, or one per call where the buffer
        went call by call). With nothing held it only forgets the ends of passes.
        """
        sites = [c for c in self._calls if type(c) is _Site]
        layers = [c for c in self._calls if type(c) is _Layer]
        site_out, inputs = self._flush_sites(sites, samples) if sites else ([], [])
        layer_out = self._flush_layers(layers) if layers else []
        self._calls, self._passes, self._held, self._held_at_end = [], 0, 0, 0
        self._gains.used = self._values.used = self._short.used = 0
        for grow in self._params.values():
            grow.used = 0
        return site_out, inputs, layer_out

    def _flush_sites(self, sites: list[_Site], samples: int) -> tuple[list[SiteSummary], list[InputFigures]]:
        used = self._gains.used
        gains = self._gains.buf[:used]
        layout = tuple((s.off, s.rows, s.per, s.pass_index) for s in sites)
        cached = self._layout(layout, samples)
        starts = cached[0]
        flat = gains.numpy()
        row_min = np.minimum.reduceat(flat, starts).astype(np.float64)
        row_max = np.maximum.reduceat(flat, starts).astype(np.float64)
        row_max[np.isnan(row_max)] = math.inf  # a NaN gain: as bad as it gets
        if not (row_min.min() > 0 and row_max.max() < math.inf) or cached[1] is None:
            return self._sites_one_by_one(sites, gains, samples)
        _, n_of_pass, seg, first, target, n_inputs = cached
        calls = len(sites)
        segs = len(target)  # a segment: one input of one call
        idx = self._bin_indices(gains)
        if segs * (_NB + 2) <= used:  # one count for every call and input
            counts = torch.bincount(idx.add_(self._segments(layout, samples, "both")), minlength=segs * (_NB + 2)).view(segs, _NB + 2)
            c_np = counts.numpy()
            every = torch.from_numpy(np.add.reduceat(c_np, seg, axis=0))
            per_input = torch.zeros(n_inputs, _NB + 2, dtype=counts.dtype).index_add_(0, torch.from_numpy(target), counts)
        else:  # more bins than gains (many inputs, few gains each): the calls' counts, then the inputs' coarse ones
            every = torch.bincount(torch.add(idx, self._segments(layout, samples, "call"), out=self._work.get("site", idx.shape, torch.int32, idx.device)),
                                   minlength=calls * (_NB + 2)).view(calls, _NB + 2)
            coarse = idx.add_(_NB // _NI - 1).div_(_NB // _NI, rounding_mode="floor")  # 0 → 0, site bin j ≥ 1 → 1 + (j − 1) // 4, +inf → 121
            per_input = torch.bincount(coarse.add_(self._segments(layout, samples, "input")), minlength=n_inputs * (_NI + 2)).view(n_inputs, _NI + 2)
        low, top = np.minimum.reduceat(row_min, first), np.maximum.reduceat(row_max, first)
        out = _by_site(sites, every.numpy(), low, top, [row_max[a : a + s.rows] for a, s in zip(first.tolist(), sites)])
        input_max, input_min = np.full(n_inputs, -math.inf), np.full(n_inputs, math.inf)
        np.maximum.at(input_max, target, row_max.reshape(segs, samples).max(1))  # every call: n inputs × K rows
        np.minimum.at(input_min, target, row_min.reshape(segs, samples).min(1))
        figures, a = [], 0
        for p, n in n_of_pass:
            figures.append(InputFigures(p, input_max[a : a + n], input_min[a : a + n], per_input[a : a + n]))
            a += n
        return out, figures

    def _layout(self, layout: tuple, samples: int) -> tuple:
        """Per layout of the site calls (cached): rows' starts; the passes and their inputs; per call its first
        segment and first row; per segment its input (in the buffer); the number of inputs. ``None`` in the
        second place when a call's rows are not its pass's inputs × K (the buffer then goes call by call)."""
        key = (layout, samples)
        got = self._cache.get(key)
        if got is None:
            starts = np.concatenate([off + per * np.arange(rows) for off, rows, per, _ in layout])
            n_pass: dict[int, int] = {}
            ok = True
            for _, rows, _, p in layout:
                n = n_pass.setdefault(p, rows // samples)
                ok = ok and n >= 1 and rows == n * samples
            if not ok:
                got = (starts, None)
            else:
                first_input, a = {}, 0
                for p, n in n_pass.items():
                    first_input[p], a = a, a + n
                per_call = [n_pass[p] for _, _, _, p in layout]
                seg = np.concatenate([[0], np.cumsum(per_call)[:-1]]).astype(np.int64)
                first = np.concatenate([[0], np.cumsum([rows for _, rows, _, _ in layout])[:-1]]).astype(np.int64)
                target = np.concatenate([first_input[p] + np.arange(n_pass[p]) for _, _, _, p in layout]).astype(np.int64)
                got = (starts, list(n_pass.items()), seg, first, target, a)
            if len(self._cache) >= 8:  # a few layouts (parts, the last smaller pass), repeated
                self._cache.clear()
            self._cache[key] = got
        return got

    def _segments(self, layout: tuple, samples: int, by: str) -> Tensor:
        """Per gain, the shift of its bin into a count of one segment per (call, input) (``by`` "both",
        B + 2 bins), per call ("call", B + 2 bins) or per input of the buffer ("input", 122 coarse bins); cached."""
        key = (layout, samples, by)
        got = self._cache.get(key)
        if got is None:
            _, n_of_pass, seg, first, target, _ = self._layout(layout, samples)
            n_pass = dict(n_of_pass)
            parts = []
            for c, (_, rows, per, p) in enumerate(layout):
                n = n_pass[p]
                if by == "both":
                    parts.append(np.repeat((seg[c] + np.arange(n)) * (_NB + 2), rows * per // n))
                elif by == "call":
                    parts.append(np.full(rows * per, c * (_NB + 2)))
                else:
                    parts.append(np.repeat(target[seg[c] : seg[c] + n] * (_NI + 2), rows * per // n))
            got = self._cache[key] = torch.from_numpy(np.concatenate(parts).astype(np.int32))
        return got

    def _bin_indices(self, gains: Tensor) -> Tensor:
        """Per gain, its bin: 0 for g ≤ 0, 1…B, B + 1 for +inf (:class:`~flowaudit.binning.GainBins`)."""
        bits, work = gains.view(torch.int32), self._work
        hi = torch.bitwise_right_shift(bits, 16, out=work.get("hi", bits.shape, torch.int32, bits.device))  # positive: no sign bit
        return GainBins(GAIN_EDGES, bits.device).index(bits, hi, out=work.get("idx", bits.shape, torch.int32, bits.device))

    def _sites_one_by_one(self, sites: list[_Site], gains: Tensor, samples: int) -> tuple[list[SiteSummary], list[InputFigures]]:
        """The general path (:func:`~flowaudit.gains.summarize`), call by call, for a buffer with junk gains."""
        every, low, top, row_max, inputs = [], [], [], [], []
        for s in sites:
            p = summarize(gains[s.off : s.off + s.rows * s.per].view(s.rows, s.per), samples, self._work)
            _, ext = settle(*p.raw)
            every.append(p.raw[0].numpy())
            low.append(float(ext[2]))
            top.append(float(ext[3]))
            row_max.append(p.row_max.numpy())
            inputs.append(InputFigures(s.pass_index, p.input_max.numpy(), p.input_min.numpy(), p.input_counts))
        return _by_site(sites, np.stack(every), np.array(low), np.array(top), row_max), inputs

    def _flush_layers(self, layers: list[_Layer]) -> list[LayerSummary]:
        """Layer parts: the chunked buffer in a few whole-buffer operations, short rows call by call; per name in call order."""
        parts: list[np.ndarray] = [None] * len(layers)  # type: ignore[list-item]
        chunked = [c for c, e in enumerate(layers) if e.chunked]
        if chunked:
            buf = self._values.buf
            total, total_sq, top_sq = self._chunk_sums(buf[: self._values.used].view(-1, CHUNK))
            ok = np.isfinite(total)  # a non-finite value makes its chunk's sum non-finite (finite float32s cannot overflow it)
            if not ok.all():
                for c in chunked:  # the calls with a non-finite value
                    e = layers[c]
                    if not ok[e.off // CHUNK : e.off // CHUNK + e.n * e.chunks].all():
                        parts[c] = layer_parts(buf[e.off : e.off + e.n * e.chunks * CHUNK].view(e.n, -1)[:, : e.m], self._work).numpy()
            # every input's chunks lie back to back (the buffer holds the chunked calls in order): its sums by one reduceat
            n = [layers[c].n for c in chunked]
            starts = np.concatenate([layers[c].off // CHUNK + layers[c].chunks * np.arange(layers[c].n) for c in chunked])
            every = np.empty((len(starts), 5))
            every[:, 0] = np.repeat([float(layers[c].m) for c in chunked], n)
            every[:, 1], every[:, 2] = np.add.reduceat(total, starts), np.add.reduceat(total_sq, starts)
            every[:, 3] = np.sqrt(np.maximum.reduceat(top_sq, starts))  # zero padding: |v| ≥ 0 anyway
            every[:, 4] = 0.0
            a = 0
            for c, k in zip(chunked, n):
                if parts[c] is None:
                    parts[c] = every[a : a + k]
                a += k
        for c, e in enumerate(layers):
            if not e.chunked:
                parts[c] = self._short_parts(self._short.buf[e.off : e.off + e.n * e.m].view(e.n, e.m))
        by_name: dict[str, list[np.ndarray]] = {}
        for e, p in zip(layers, parts):
            by_name.setdefault(e.name, []).append(p)
        return [LayerSummary(name, ps[0] if len(ps) == 1 else np.concatenate(ps)) for name, ps in by_name.items()]

    def _chunk_sums(self, values: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per chunk (row of float32 ``values``): Σv, Σv² and max v², in float64, a block of chunks at a time.

        A block is widened into a scratch buffer small enough to stay in the core's cache and
        reduced there (each chunk by one reduction, the same bits as over the whole buffer), so
        the values are read from memory once.
        """
        chunks = values.shape[0]
        total, total_sq, top_sq = (torch.empty(chunks, dtype=torch.float64) for _ in range(3))
        for a in range(0, chunks, _BLOCK):
            b = min(a + _BLOCK, chunks)
            v = self._work.get("block", (b - a, CHUNK), torch.float64, values.device).copy_(values[a:b])
            torch.sum(v, 1, out=total[a:b])
            v.mul_(v)
            torch.sum(v, 1, out=total_sq[a:b])
            torch.amax(v, 1, out=top_sq[a:b])  # max |v| = √(max v²) exactly: v² of a float32 is exact in float64
        return total.numpy(), total_sq.numpy(), top_sq.numpy()

    def _short_parts(self, v: Tensor) -> np.ndarray:
        """Parts of rows of at most one chunk (float64 ``v``, overwritten), as the device path sums them."""
        total = v.sum(1)
        if not bool(torch.isfinite(total).all()):
            return layer_parts(v, self._work).numpy()
        squares = v.mul_(v)
        n, m = v.shape
        return np.stack([np.full(n, float(m)), total.numpy(), squares.sum(1).numpy(), np.sqrt(squares.amax(1).numpy()), np.zeros(n)], 1)


def _by_site(sites: list[_Site], every: np.ndarray, low: np.ndarray, top: np.ndarray, row_max: list[np.ndarray]) -> list[SiteSummary]:
    """Per site name (in first-call order), its calls' figures together: counts summed, extremes of extremes."""
    calls: dict[str, list[int]] = {}
    for c, s in enumerate(sites):
        calls.setdefault(s.name, []).append(c)
    order = np.fromiter((c for cs in calls.values() for c in cs), dtype=np.int64, count=len(sites))
    starts = np.cumsum([0] + [len(cs) for cs in calls.values()][:-1])
    every = np.add.reduceat(every[order], starts, axis=0)
    low, top = np.minimum.reduceat(low[order], starts), np.maximum.reduceat(top[order], starts)
    return [SiteSummary(name, torch.from_numpy(every[g]), float(low[g]), float(top[g]),
                        [(sites[c].pass_index, row_max[c], sites[c].p_dest) for c in cs])
            for g, (name, cs) in enumerate(calls.items())]
