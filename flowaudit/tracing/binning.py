r"""Log-spaced bins of the inverse gain, looked up from a float32's bits.

A gain :math:`g = 1/c'` falls in bin

.. math:: i(g) = \min\Big(\max\Big(\Big\lfloor \frac{\log_{10} g - e_0}{\Delta} \Big\rfloor, 0\Big), B - 1\Big)

of :data:`GAIN_EDGES` (:math:`e_0 = -4`, :math:`\Delta = 0.025`, :math:`B = 480`; :func:`bin_index` is the
definition, in float64); per input the coarser bin :math:`\lfloor i(g) / 4 \rfloor` of :data:`INPUT_EDGES`.
Because :math:`i` is non-decreasing in a float32's bits, :class:`GainBins` finds it with one gather from a
65 536-entry table of the top 16 bits and three integer operations — the same bin, bit for bit, as the float64
``log10`` at a fraction of its cost. :math:`g \le 0` goes to index 0, bins to 1…B, +inf to B + 1 (callers map NaN
to +inf). The table's construction: ``docs/tracer.md``.

A model that has :math:`\ell = \ln g` (its log-determinant terms) need not form :math:`g`: ℓ ↦ float32(e^ℓ) ↦ index
is non-decreasing in ℓ, so :func:`log_first_keys` gives, per index, the smallest ℓ there as an order key
(:func:`order_keys`), and ℓ's index is the number of those at or below its key.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GAIN_EDGES",
    "INPUT_EDGES",
    "NB",
    "NI",
    "KEY_START",
    "bin_index",
    "GainBins",
    "order_keys",
    "log_first_keys",
    "histogram_quantile",
    "histogram_quantiles",
]

# log10(1/c') from 1e-4 to 1e8 in 0.025 decades (6 % steps); values beyond land in the end bins
GAIN_EDGES = np.round(np.arange(-4.0, 8.0 + 1e-9, 0.025), 10)
# per input a coarser histogram (0.1 decade, four bins of GAIN_EDGES: coarse bin = site bin // 4),
# 120 counts an input
INPUT_EDGES = np.round(np.arange(-4.0, 8.0 + 1e-9, 0.1), 10)
NB, NI = len(GAIN_EDGES) - 1, len(INPUT_EDGES) - 1  # bins a site, coarse bins an input
KEY_START = 2**31 - 1  # a site's smallest order key before any gain: above every key

_INF_BITS = 0x7F800000


def bin_index(g: Tensor, edges: np.ndarray) -> Tensor:
    """Index of the [a, b) bin of ``log10 g`` among equally spaced ``edges`` (ends clamp): the definition."""
    step = float(edges[1] - edges[0])
    pos = (torch.log10(g.to(torch.float64)) - float(edges[0])) / step
    return pos.floor().clamp(0, len(edges) - 2).long()


def _thresholds(edges: np.ndarray) -> np.ndarray:
    """Bits of the smallest float32 in each bin 1…B−1 under :func:`bin_index` (bisection, 31 steps)."""
    want = torch.arange(1, len(edges) - 1, dtype=torch.int64)
    lo, hi = torch.ones_like(want), torch.full_like(want, _INF_BITS)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        above = bin_index(mid.to(torch.int32).view(torch.float32), edges) >= want
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid + 1)
    return lo.numpy()


def _table(edges: np.ndarray, low: int, high: int) -> np.ndarray:
    """The 65 536 entries ``P`` (module docstring), ``g ≤ 0`` → index ``low``, +inf/NaN → ``high``."""
    t = _thresholds(edges)
    cells = t >> 16
    if len(np.unique(cells)) != len(cells):
        raise AssertionError("two bin edges in one cell of 2^16 float32 bit patterns")
    start = np.arange(0x8000, dtype=np.int64) << 16
    table = np.zeros(0x10000, dtype=np.int64)
    table[:0x8000] = (np.searchsorted(t, start, side="right") + 1 + low) << 16  # bin + 1: index 0 is g ≤ 0 below
    inside = (t & 0xFFFF) != 0  # an edge at a cell's first pattern is already in the cell's bin
    table[cells[inside]] += 0x10000 - (t[inside] & 0xFFFF)
    table[0] = (low << 16) + 0xFFFF  # +0.0 → low, every positive denormal → bin 0 (index low + 1)
    table[_INF_BITS >> 16 : 0x8000] = high << 16  # +inf (and positive NaN bits)
    table[0x8000:] = low << 16  # the sign bit: −0, negatives, −inf
    # minus the cell's own top bits, so that table[hi] + bits = P[hi] + lo; stored modulo 2^32 (int32 addition wraps)
    cell = np.arange(0x10000, dtype=np.int64)
    table -= np.where(cell < 0x8000, cell, cell - 0x10000) << 16
    return ((table + 2**31) % 2**32 - 2**31).astype(np.int32)


class GainBins:
    """Bin lookup of float32 gains (module docstring); one instance per device, tables built once."""

    _tables: dict[tuple, tuple[Tensor, np.ndarray]] = {}

    def __init__(self, edges: np.ndarray, device: torch.device):
        key = (len(edges), float(edges[0]), float(edges[1]))
        if key not in GainBins._tables:
            n = len(edges) - 1  # B bins: index 0 ≤ 0, 1…B bins, B + 1 +inf
            first = np.concatenate([[-(2**31), 1], _thresholds(edges), [_INF_BITS]]).astype(np.int32)
            GainBins._tables[key] = torch.from_numpy(_table(edges, 0, n + 1)), first
        self.n_bins = len(edges) - 1
        table, self.first_bits = GainBins._tables[key]
        self.table = table.to(device)

    #: Per index 1…B + 1, the bits of the smallest float32 at it or above (a positive denormal's 1 for bin 0, then
    #: the bins' lower edges, +inf's for B + 1); index 0's entry is the smallest int32.
    first_bits: np.ndarray

    def index(self, bits: Tensor, hi: Tensor, out: Tensor | None = None) -> Tensor:
        """0 for g ≤ 0, 1 + bin for positive finite g, B + 1 for +inf.

        ``bits`` are the gains as int32, ``hi`` their top 16 bits.
        """
        return torch.index_select(self.table, 0, hi, out=out).add_(bits).bitwise_right_shift_(16)


def order_keys(bits: Tensor) -> Tensor:
    """Float32 bits (int32 or int64) as keys that sort like the values: a negative value's lower 31 bits flipped.

    The map is its own inverse; −0.0 sits just below +0.0 and NaNs beyond ±inf.
    """
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _log_index(keys: Tensor, edges: np.ndarray) -> Tensor:
    """Index (as :meth:`GainBins.index`) of the gain float32(e^ℓ) of each log-gain ℓ given by its order key."""
    ell = order_keys(keys).to(torch.int32).view(torch.float32)
    g = torch.exp(ell.double()).float()  # e^ℓ rounded once to float32 (from float64, the correctly rounded value)
    inside = 1 + bin_index(g.clamp_min(np.finfo(np.float32).tiny / 2**23), edges)
    return torch.where(g <= 0, 0, torch.where(torch.isinf(g), len(edges), inside))


def log_first_keys(edges: np.ndarray) -> np.ndarray:
    """Per index 0…B + 1 of :meth:`GainBins.index`, the smallest order key of a float32 ℓ whose gain
    float32(e^ℓ) lies at that index or above (bisection over the keys of −inf … +inf; index 0's entry is the
    smallest int32). NaN keys lie outside −inf … +inf, so they count at 0 or B + 1: the caller maps them."""
    key = _LOG_KEYS.get((len(edges), float(edges[0]), float(edges[1])))
    if key is not None:
        return key
    want = torch.arange(1, len(edges) + 1, dtype=torch.int64)
    ends = order_keys(torch.tensor([0xFF800000 - 2**32, _INF_BITS], dtype=torch.int64))  # −inf, +inf
    lo, hi = torch.full_like(want, int(ends[0])), torch.full_like(want, int(ends[1]))
    while bool((lo < hi).any()):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        above = _log_index(mid, edges) >= want
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid + 1)
    key = np.concatenate([[-(2**31)], lo.numpy()]).astype(np.int32)
    _LOG_KEYS[(len(edges), float(edges[0]), float(edges[1]))] = key
    return key


_LOG_KEYS: dict[tuple, np.ndarray] = {}


def histogram_quantile(counts: np.ndarray, log_edges: np.ndarray, q: float) -> float:
    """Quantile ``q`` from a histogram over log10 values (linear within a bin), back in linear units."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cum[i - 1] if i else 0
    frac = (target - before) / counts[i] if counts[i] else 0.0
    return float(10 ** (log_edges[i] + frac * (log_edges[i + 1] - log_edges[i])))


def histogram_quantiles(counts: np.ndarray, log_edges: np.ndarray, q: float) -> np.ndarray:
    """:func:`histogram_quantile` of every row of ``counts`` (rows, bins) at once: the same arithmetic, row by row."""
    cum = np.cumsum(counts, axis=1)
    target = q * cum[:, -1]
    i = np.minimum((cum < target[:, None]).sum(1), counts.shape[1] - 1)  # searchsorted(cum, target, "left") per row
    rows = np.arange(len(counts))
    before = np.where(i > 0, cum[rows, np.maximum(i - 1, 0)], 0)
    c = counts[rows, i]
    frac = np.divide(target - before, c, out=np.zeros(len(counts)), where=c != 0)
    return np.array([10**e for e in (log_edges[i] + frac * (log_edges[i + 1] - log_edges[i])).tolist()])
