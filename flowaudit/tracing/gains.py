r"""Statistics of a site's inverse gain :math:`g = 1/c'`, one pass over the gains of a call.

:func:`summarize` reads one site call's gains (rows = samples, input-major) once, on their device with no host
sync: the site histogram over :data:`~flowaudit.tracing.binning.GAIN_EDGES` of the finite positive gains with
their count, the count of the others (:math:`g \le 0`, ±inf, NaN) and the exact extremes; per row the largest and
smallest gain (NaN as +inf); per input a coarser histogram over :data:`~flowaudit.tracing.binning.INPUT_EDGES`.
:class:`GainStats` accumulates these and gives the report's min / p50 / p99 / max. On the CPU the compiled
:func:`~flowaudit.tracing.host_kernels.site_counts` fills the same counts; every path gives the bins of
:func:`~flowaudit.tracing.binning.bin_index`. Details: ``docs/tracer.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .binning import GAIN_EDGES, KEY_START, NB, NI, GainBins, bin_index, histogram_quantile
from .scratch import Scratch

__all__ = ["GainPass", "GainStats", "summarize", "settle", "settle_inputs"]

_SIGN = -(2**31)
_KEY_INF = (0x7F800000 - 1) ^ _SIGN  # the key of +inf: keys below it are finite positive gains


@dataclass
class GainPass:
    """What one site call contributes (see module docstring).

    The site figures come either settled (``counts``, ``ext``: the reference path) or raw
    (``raw``: the fast path's counts with the two junk bins, the smallest order key and the
    largest finite value), settled by :class:`GainStats` only when read: a few small
    operations per read instead of per call. ``input_counts`` is (inputs, 120), or raw
    (inputs, B + 2) over the site bins with g ≤ 0 and +inf in the end columns (:func:`settle_inputs`).
    """

    counts: Tensor | None  # (B,) site histogram of the finite positive gains
    ext: Tensor | None  # n finite positive, n others, their min, their max (float64)
    row_max: Tensor  # (rows,) float64
    raw: tuple[Tensor, Tensor, Tensor] | None = None  # (B + 2,) counts, min key, max finite value
    input_max: Tensor | None = None  # (inputs,)
    input_min: Tensor | None = None
    input_counts: Tensor | None = None


def settle(every: Tensor, key: Tensor, top: Tensor) -> tuple[Tensor, Tensor]:
    """(counts, ext) of a raw pass (:class:`GainPass`)."""
    inf = math.inf
    counts = every[1 : NB + 1]
    low = ((key.long() ^ _SIGN) + 1).to(torch.int32).view(torch.float32)
    low = torch.where(key < _KEY_INF, low, torch.full_like(low, inf))
    top = torch.where(top > 0, top, torch.full_like(top, -inf))
    return counts, torch.stack([counts.sum().double(), (every[0] + every[NB + 1]).double(), low.double(), top.double()])


def settle_inputs(c: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Per-input counts over the 120 coarse bins from raw counts: (inputs, B + 2) over the site bins
    (four site bins a coarse bin) or (inputs, 122) over the coarse bins, with g ≤ 0 and +inf in the
    end columns (into the first and last bin); settled (inputs, 120) counts are returned as they are.
    A tensor or a numpy array, the same kind back."""
    if c.shape[1] == NI:
        return c
    if c.shape[1] == NI + 2:
        hist = c[:, 1 : NI + 1] + 0  # a copy, in either library
    else:
        hist = c[:, 1 : NB + 1].reshape(c.shape[0], NI, NB // NI).sum(2)
    hist[:, 0] += c[:, 0]
    hist[:, -1] += c[:, -1]
    return hist


def _float32(bits: int) -> float:
    """The float32 of int32 ``bits``."""
    return float(np.array(bits, dtype=np.int32).view(np.float32))


def _count(idx: Tensor, n: int) -> Tensor:
    """Occurrences of 0…n−1 in the flat int tensor ``idx`` (int64), without a host sync."""
    if idx.device.type == "cpu":
        return torch.bincount(idx, minlength=n)
    return torch.zeros(n, dtype=torch.int64, device=idx.device).index_add_(
        0, idx, torch.ones_like(idx, dtype=torch.int64)
    )


def summarize(gain: Tensor, samples: int | None = None, work: Scratch | None = None) -> GainPass:
    """The statistics of one call's gains (batch first); per input too when ``samples`` (K) is given.

    Temporaries go to ``work`` (:class:`~flowaudit.tracing.scratch.Scratch`), reused from call to call.
    """
    g = gain.detach()
    g = g.reshape(g.shape[0], -1) if g.dim() else g.reshape(1, 1)
    if g.dtype in (torch.float16, torch.bfloat16):
        g = g.float()
    if g.dtype != torch.float32 or g.numel() == 0:
        return _summarize_reference(g, samples)
    dev = g.device
    inf = math.inf
    work = work or Scratch()
    m = g.numel()
    gs = torch.nan_to_num(g, nan=inf, posinf=inf, neginf=-inf, out=work.get("gain", g.shape, torch.float32, dev))
    row_max, row_min = gs.amax(1), gs.amin(1)
    bits = gs.view(torch.int32).reshape(-1)
    hi = torch.bitwise_right_shift(bits, 16, out=work.get("hi", (m,), torch.int32, dev)).bitwise_and_(0xFFFF)
    idx = GainBins(GAIN_EDGES, dev).index(
        bits, hi, out=work.get("idx", (m,), torch.int32, dev)
    )  # 0: g ≤ 0, 1…B: bins, B+1: +inf
    n = gs.shape[0] // samples if samples else 1
    if n > 1:  # one count for the site and its inputs: input i's indices shifted by i (B + 2)
        idx.view(n, -1).add_((torch.arange(n, device=dev, dtype=torch.int32) * (NB + 2))[:, None])
    per_input = _count(idx, n * (NB + 2)).view(n, NB + 2)
    every = per_input.sum(0) if n > 1 else per_input[0]
    out = GainPass(None, None, row_max.double())
    if samples:
        out.input_max, out.input_min = out.row_max.view(n, -1).amax(1), row_min.double().view(n, -1).amin(1)
        out.input_counts = per_input
    key = (
        torch.sub(bits, 1, out=hi).bitwise_xor_(_SIGN).amin()
    )  # int32 wraps (−0 → 2^31 − 1): two's complement everywhere
    top = torch.nan_to_num(
        g, nan=0.0, posinf=0.0, neginf=0.0, out=work.get("finite", g.shape, torch.float32, dev)
    ).amax()
    out.raw = (every, key, top)
    return out


def _summarize_reference(g: Tensor, samples: int | None) -> GainPass:
    """:func:`summarize` by the float64 definition (any dtype, empty tensors)."""
    flat = g.reshape(-1)
    ok = torch.isfinite(flat) & (flat > 0)
    idx = bin_index(torch.where(ok, flat, torch.ones_like(flat)), GAIN_EDGES)
    counts = torch.zeros(NB, dtype=torch.int64, device=g.device).scatter_add_(0, idx, ok.to(torch.int64))
    f = flat.to(torch.float64)
    inf = torch.full_like(f, math.inf)
    ext = torch.stack(
        [
            ok.sum().to(torch.float64),
            (~ok).sum().to(torch.float64),
            torch.where(ok, f, inf).min() if f.numel() else f.new_tensor(math.inf),
            torch.where(ok, f, -inf).max() if f.numel() else f.new_tensor(-math.inf),
        ]
    )
    g64 = g.to(torch.float64)
    g64 = torch.where(torch.isnan(g64), torch.full_like(g64, math.inf), g64)  # NaN gain: as bad as it gets
    out = GainPass(counts, ext, g64.amax(1) if g64.shape[1] else g64.new_zeros(g64.shape[0]))
    if samples:
        rows = g64.reshape(-1, samples * g64.shape[1])
        idx = bin_index(rows.clamp_min(1e-300), GAIN_EDGES) // (NB // NI)  # four site bins a coarse bin
        out.input_counts = torch.zeros(rows.shape[0], NI, dtype=torch.int64, device=g.device).scatter_add_(
            1, idx, torch.ones_like(idx)
        )
        out.input_max, out.input_min = rows.amax(1), rows.amin(1)
    return out


class GainStats:
    """Distribution of a site's inverse gain over the visited points (accumulated on the device)."""

    def __init__(self) -> None:
        self._counts: Tensor | None = None
        self._ext: Tensor | None = None  # n, n_nonfinite, min, max (float64)
        self._raw: tuple[Tensor, Tensor, Tensor] | None = None  # raw passes not yet settled
        self._host: tuple[np.ndarray, np.ndarray] | None = None  # the CPU's calls not yet settled (:meth:`host_arrays`)

    def add(self, gain: Tensor) -> None:
        self.add_pass(summarize(gain))

    def add_pass(self, p: GainPass) -> None:
        """Add a call's :class:`GainPass` (the tracer summarizes once for all its statistics)."""
        if p.raw is None:
            self._merge(p.counts, p.ext)
        elif self._raw is None:
            self._raw = p.raw
        else:
            (e, k, t), (e2, k2, t2) = self._raw, p.raw
            self._raw = (e + e2, torch.minimum(k, k2), torch.maximum(t, t2))

    def host_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The CPU's running figures that :func:`~flowaudit.tracing.host_kernels.site_counts` adds to in place:
        the (B + 2) counts (g ≤ 0, the bins, +inf and NaN) and [smallest order key, largest finite positive bits]."""
        if self._host is None:
            self._host = (np.zeros(NB + 2, dtype=np.int64), np.array([KEY_START, 0], dtype=np.int64))
        return self._host

    def _settle(self) -> "GainStats":
        if self._raw is not None:
            raw, self._raw = self._raw, None
            self._merge(*settle(*raw))
        if self._host is not None:
            (every, (key, top)), self._host = self._host, None
            low = _float32((int(key) ^ _SIGN) + 1) if key < _KEY_INF else math.inf  # the key's bits, back
            top = _float32(int(top)) if top > 0 else -math.inf
            counts = torch.from_numpy(every[1 : NB + 1].copy())
            self._merge(
                counts,
                torch.tensor([float(counts.sum()), float(every[0] + every[NB + 1]), low, top], dtype=torch.float64),
            )
        return self

    def _merge(self, counts: Tensor, ext: Tensor) -> None:
        if self._counts is None:
            self._counts, self._ext = counts, ext
            return
        a = self._ext
        self._counts = self._counts + counts.to(self._counts.device)
        ext = ext.to(a.device)
        self._ext = torch.stack(
            [a[0] + ext[0], a[1] + ext[1], torch.minimum(a[2], ext[2]), torch.maximum(a[3], ext[3])]
        )

    def merge(self, other: "GainStats") -> "GainStats":
        """A new GainStats over the points of both."""
        out = GainStats()
        for part in (self._settle(), other._settle()):
            if part._counts is not None:
                out._merge(part._counts, part._ext)
        return out

    def state(self) -> dict | None:
        """Histogram counts and extremes (CPU), or ``None`` before any point; exact to merge in any order."""
        self._settle()
        return None if self._counts is None else {"counts": self._counts.cpu(), "ext": self._ext.cpu()}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device | str = "cpu") -> "GainStats":
        out = cls()
        if state is not None:
            out._counts, out._ext = state["counts"].to(device), state["ext"].to(device)
        return out

    @property
    def counts(self) -> np.ndarray:
        self._settle()
        return np.zeros(NB, dtype=np.int64) if self._counts is None else self._counts.cpu().numpy()

    def _ext_values(self) -> list[float]:
        self._settle()
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
            "min": lo,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
            "max": hi,
            "n": int(n),
            "n_nonfinite": int(bad),
            "histogram": {"log10_edges": GAIN_EDGES.tolist(), "counts": self.counts.tolist()},
        }
