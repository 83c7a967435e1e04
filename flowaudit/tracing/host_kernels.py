r"""The CPU tracer's statistics: compiled loops that read a call's values once, in place, at the call.

On the CPU a tensor operation costs mostly its fixed few microseconds, and an exact pass hands the tracer some
fifty small tensors, so a statistic built from tensor operations costs more than reading the values. These numba
loops give the same figures as the device path:

* :func:`site_counts` — a site call's gains binned (the bit table of
  :class:`~flowaudit.tracing.binning.GainBins`) and counted per site and per input, with every row's extremes;
  given log-gains :math:`\ell = \ln g`, from their order keys (:func:`~flowaudit.tracing.binning.log_first_keys`),
  with no :math:`e^\ell` but a row's two extremes;
* :func:`layer_sums` — per input, the count of finite values, :math:`\sum v`, :math:`\sum v^2` (float64) and
  :math:`\max |v|`, in chunks of 4096 read in memory order, so an input's sums are the same bits in any batch;
* :func:`offer` — a call's parameter rows offered to the two heaps of a reservoir, copying only those that enter.

How each loop reads its rows (order keys, repeated rows, selects for Inf and NaN): ``docs/tracer.md``.
The loops are compiled once and cached beside this file (or in numba's user cache).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from .binning import GAIN_EDGES, KEY_START, NB, NI

__all__ = [
    "host_array",
    "site_counts",
    "layer_sums",
    "memory_rows",
    "offer",
    "heapify",
    "split_mix",
    "salt_mix",
    "NB",
    "NI",
    "KEY_START",
]

_PER_COARSE = NB // NI
_SIGN = np.int64(-(2**31))
_INF_BITS = 0x7F800000
_CHUNK = 4096
# a row spanning at most this many bins is counted by compares (_count_narrow), a wider one by a table and a scatter
_NARROW = 24
_GOLDEN = 0x9E3779B97F4A7C15
# a log-gain's bin estimated from its value, off by at most one: ℓ / (ln 10 · Δ) − e₀ / Δ
_PER_LN = 1.0 / (math.log(10.0) * float(GAIN_EDGES[1] - GAIN_EDGES[0]))
_BIN_AT_1 = -float(GAIN_EDGES[0]) / float(GAIN_EDGES[1] - GAIN_EDGES[0])

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


def host_array(t: torch.Tensor) -> np.ndarray | None:
    """A CPU tensor's values as numpy for these loops: its memory where numpy has its dtype (one call, the
    usual case), bfloat16 widened to float32 (exactly); ``None`` for a tensor off the CPU or of a dtype numpy
    cannot hold (tensor operations read those)."""
    if not t.is_cpu:
        return None
    try:
        return t.numpy()
    except (RuntimeError, TypeError):  # it requires grad, or has no numpy dtype
        t = t.detach()
        try:
            return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        except TypeError:
            return None


# -- gains -------------------------------------------------------------------------------------------
@_jit
def _index(table, b):  # pragma: no cover - compiled
    """The bin index of a gain's float32 bits ``b`` (as int32) from the table of ``binning.GainBins``."""
    return np.int32(table[(b >> 16) & 0xFFFF] + b) >> 16  # int32 addition wraps (binning.py)


@_jit
def _bins(bits, table, idx):  # pragma: no cover - compiled
    """Bin indices of one row's gains into ``idx`` (a NaN with the sign bit set lands at 0: see :func:`site_counts`)."""
    for j in range(len(bits)):
        idx[j] = _index(table, bits[j])


@_jit
def _count(idx, n, hist):  # pragma: no cover - compiled
    j = 0
    while j + 4 <= n:
        hist[0, idx[j]] += 1
        hist[1, idx[j + 1]] += 1
        hist[2, idx[j + 2]] += 1
        hist[3, idx[j + 3]] += 1
        j += 4
    while j < n:
        hist[0, idx[j]] += 1
        j += 1


@_jit
def _extremes(bits):  # pragma: no cover - compiled
    """A row's largest and smallest bits (on vector registers)."""
    top, low = bits[0], bits[0]
    for j in range(len(bits)):
        top, low = max(top, bits[j]), min(low, bits[j])
    return top, low


@_jit
def _count_narrow(bits, thr, lo, hi, hist):  # pragma: no cover - compiled
    """Count a row whose gains are finite, positive and span bin indices ``lo … hi`` only: per index c above ``lo``
    the gains at or above its first bits ``thr[c]``, a compare a value on vector registers (no table, no scatter)."""
    above = len(bits)
    for c in range(lo + 1, hi + 1):
        t, n = thr[c], 0
        for j in range(len(bits)):
            n += np.int32(1) if bits[j] >= t else np.int32(0)
        hist[0, c - 1] += above - n
        above = n
    hist[0, hi] += above


@_jit
def _same(bits, a, b, n):  # pragma: no cover - compiled
    """Whether ``bits[a : a + n]`` and ``bits[b : b + n]`` are the same bits (in blocks that run on vector
    registers: slices indexed from 0, which the compiler knows are in range)."""
    x, y = bits[a : a + n], bits[b : b + n]
    for j0 in range(0, n, 256):
        xs, ys = x[j0 : j0 + 256], y[j0 : j0 + 256]
        d = 0
        for j in range(len(xs)):
            d |= xs[j] ^ ys[j]
        if d:
            return False
    return True


@_jit
def _order_key(b):  # pragma: no cover - compiled
    """The order key of float32 bits ``b`` (binning.order_keys): a negative value's lower 31 bits flipped."""
    return np.int32(b ^ ((b >> 31) & 0x7FFFFFFF))


@_jit
def _log_bin(ell, o, first):  # pragma: no cover - compiled
    """The index of a log-gain ``ell`` (key ``o``) whose gain is finite and positive: the estimate from its value
    (off by at most one), corrected by the first keys of its index and the next."""
    c = min(max(np.int64(np.float64(ell) * _PER_LN + _BIN_AT_1), 0), NB - 1) + 1
    return c + (1 if o >= first[c + 1] else 0) - (1 if o < first[c] else 0)


@_jit
def _keys(bits, keys):  # pragma: no cover - compiled
    """A row's order keys into ``keys`` (binning.order_keys) and their largest and smallest."""
    top, low = np.int32(-(2**31)), np.int32(2**31 - 1)
    for j in range(len(bits)):
        o = _order_key(bits[j])
        keys[j] = o
        top, low = max(top, o), min(low, o)
    return top, low


@_jit
def _key_index(first, o):  # pragma: no cover - compiled
    """The index of the log-gain with order key ``o``: the last entry of ``first`` (log_first_keys) at or below it."""
    lo, hi = 0, len(first) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if first[mid] <= o:
            lo = mid
        else:
            hi = mid - 1
    return lo


@_jit
def _bins_log(keys, ell, first, idx):  # pragma: no cover - compiled
    """Bin indices of one row of log-gains whose gains are all finite and positive, in place of their keys:
    the estimate from the value, corrected by the two edges around it (the estimate is off by at most one)."""
    for j in range(len(keys)):
        idx[j] = _log_bin(ell[j], keys[j], first)


@_jit
def _gain_bits(key, conv, convf):  # pragma: no cover - compiled
    """The float32 bits of the gain e^ℓ of the log-gain with order key ``key`` (rounded once, from float64)."""
    conv[0] = _order_key(key)
    convf[0] = np.float32(math.exp(np.float64(convf[0])))
    return conv[0]


@_jit
def _junk_log(bits, ell, first, idx):  # pragma: no cover - compiled
    """Bin indices of a row of log-gains whose gains are not all finite and positive, value by value from
    their keys (NaN at B + 1, e^ℓ = 0 at 0, +inf at B + 1), and the row's figures: its lowest and highest
    index, the largest and smallest key of the gains in a bin, how many are, and how many are NaN."""
    lo, hi, n, nan = NB + 1, 0, 0, 0
    ktop, klow = np.int32(-(2**31)), np.int32(2**31 - 1)
    for j in range(len(bits)):
        b = bits[j]
        o = _order_key(b)
        if (b & 0x7FFFFFFF) > _INF_BITS:
            c = NB + 1
            nan += 1
        elif o < first[1]:
            c = 0
        elif o >= first[NB + 1]:
            c = NB + 1
        else:
            c = _log_bin(ell[j], o, first)
            ktop, klow = max(ktop, o), min(klow, o)
            n += 1
        idx[j] = c
        lo, hi = min(lo, c), max(hi, c)
    return lo, hi, ktop, klow, n, nan


@_jit
def _junk_row(bits, kmin, tmax):  # pragma: no cover - compiled
    """A row's figures where not every gain is finite and positive: the NaNs with the sign bit set, the site's
    smallest order key and largest finite positive bits so far, and the row's largest and smallest gain as
    order keys :math:`o` (a NaN at +inf in the largest, left out of the smallest)."""
    neg_nan = 0
    k32, t32 = np.int32(2**31 - 1), np.int32(0)
    omax, omin = np.int32(-(2**31)), np.int32(2**31 - 1)
    for j in range(len(bits)):
        b = bits[j]
        nan = (b & 0x7FFFFFFF) > _INF_BITS
        neg_nan += 1 if nan and b < 0 else 0
        k32 = min(k32, np.int32(b - 1) ^ np.int32(-(2**31)))  # (b − 1) ⊕ 2^31, in int32
        t32 = max(t32, b if b < _INF_BITS else np.int32(0))
        o = _order_key(b)
        omax = max(omax, np.int32(_INF_BITS) if nan else o)
        omin = min(omin, np.int32(2**31 - 1) if nan else o)
    return neg_nan, min(kmin, np.int64(k32)), max(tmax, np.int64(t32)), omax, omin


@_jit
def site_counts(
    bits,
    ell,
    log,
    k,
    table,
    thr,
    log_thr,
    every,
    ext,
    in_counts,
    in_max,
    in_min,
    row_max,
    hist,
    idx,
    first_counts,
    conv,
    convf,
):  # pragma: no cover - compiled
    """Bin and count one call's gains (how: docs/tracer.md).

    ``bits``: the gains' float32 bits, flat, as int32, ``len(row_max)`` rows of
    which ``k`` an input; with ``log``, those of the log-gains ℓ = ln g, and ``ell`` the same memory as float32.
    ``table`` and ``thr``: :class:`~flowaudit.tracing.binning.GainBins`' table and first
    bits of each index; ``log_thr``: :func:`~flowaudit.tracing.binning.log_first_keys`. Adds to ``every``
    (B + 2) and ``in_counts`` (inputs, NI + 2), takes the extremes into ``ext`` ([smallest order
    key, largest finite positive bits], int64), ``in_max`` and ``in_min`` (inputs), writes
    ``row_max``. Scratch: ``hist`` (4, B + 2; zeros, left zeros), ``idx`` (a row), ``first_counts`` (B + 2), ``conv`` /
    ``convf`` (two int32 and their float32 view).

    An input whose rows repeat its first row bit for bit (a site whose parameters come from the
    condition alone, the same for its K samples: SRFlow's affine injector) counts them as the first
    row again, without binning them: the same counts, extremes and row maxima.
    """
    rows = len(row_max)
    per = len(bits) // rows
    kmin, tmax = ext[0], ext[1]
    for i in range(rows // k):
        imax, imin = in_max[i], in_min[i]
        first, repeats = i * k, 0
        cmin, cmax = NB + 1, 0  # the indices hist holds counts at
        fmin, fmax = NB + 1, 0  # those of the first row's counts (a repeated first row)
        for r in range(first, (i + 1) * k):
            if r > first and (repeats or r == first + 1) and _same(bits, first * per, r * per, per):
                if not repeats:  # the input's first row is all hist holds: its counts (at fmin … fmax), once
                    fmin, fmax = cmin, cmax
                    for c in range(fmin, fmax + 1):
                        first_counts[c] = hist[0, c] + hist[1, c] + hist[2, c] + hist[3, c]
                repeats += 1
                row_max[r] = row_max[first]
                continue
            row = bits[r * per : (r + 1) * per]
            junk, n_in, n_nan = False, 0, 0  # a row of log-gains not all finite and positive: counted below
            if log:  # the gains' counts and figures from the keys of ℓ; only extremes are raised to gains
                ktop, klow = _keys(row, idx)
                lo, hi = _key_index(log_thr, klow), _key_index(log_thr, ktop)
                plain = lo >= 1 and hi <= NB
                if plain and hi - lo <= _NARROW:
                    _count_narrow(idx[:per], log_thr, lo, hi, hist)
                elif plain:
                    _bins_log(idx[:per], ell[r * per : (r + 1) * per], log_thr, idx)
                    _count(idx, per, hist)
                else:
                    lo, hi, ktop, klow, n_in, n_nan = _junk_log(row, ell[r * per : (r + 1) * per], log_thr, idx)
                    _count(idx, per, hist)
                    junk = True
                top = _gain_bits(ktop, conv, convf) if plain or n_in else np.int32(0)
                low = _gain_bits(klow, conv, convf) if plain or n_in else np.int32(0)
            else:
                top, low = _extremes(row)
                lo, hi = (
                    _index(table, low),
                    _index(table, top),
                )  # the index is non-decreasing in the int32 bits: the row's lie in lo … hi
                plain = low > 0 and top < _INF_BITS  # every gain finite and positive: their bits order like the values
                if plain and hi - lo <= _NARROW:
                    _count_narrow(row, thr, lo, hi, hist)
                else:
                    _bins(row, table, idx)
                    _count(idx, per, hist)
            cmin, cmax = min(cmin, lo), max(cmax, hi)
            if junk:  # +inf or NaN: as bad as it gets; the smallest gain is 0 if one is, none if all are NaN
                conv[0], conv[1] = top, low
                if n_in:
                    kmin = min(kmin, np.int64(np.int32(low - 1)) ^ _SIGN)
                    tmax = max(tmax, np.int64(top))
                rmax = np.inf if hi == NB + 1 else (np.float64(convf[0]) if n_in else 0.0)
                rmin = np.inf if n_nan == per else (0.0 if lo == 0 else (np.float64(convf[1]) if n_in else np.inf))
            elif plain:
                conv[0], conv[1] = top, low
                rmax, rmin = np.float64(convf[0]), np.float64(convf[1])
                kmin = min(kmin, np.int64(np.int32(low - 1)) ^ _SIGN)
                tmax = max(tmax, np.int64(top))
            else:  # the definition, as selects (on vector registers)
                neg_nan, kmin, tmax, omax, omin = _junk_row(row, kmin, tmax)
                if neg_nan:  # a NaN with the sign bit set: at +inf, not at g ≤ 0
                    hist[0, 0] -= neg_nan
                    hist[0, NB + 1] += neg_nan
                    cmax = NB + 1
                conv[0], conv[1] = _order_key(omax), _order_key(omin)  # the map is its own inverse
                rmax = (
                    np.inf if top >= _INF_BITS or neg_nan else np.float64(convf[0])
                )  # +inf or NaN in the row: as bad as it gets
                rmin = np.inf if omin > _INF_BITS else np.float64(convf[1])  # NaN only: no smallest
            row_max[r] = rmax
            imax, imin = max(imax, rmax), min(imin, rmin)
        in_max[i], in_min[i] = imax, imin
        # g ≤ 0 and +inf keep their end columns; bin c − 1 is coarse bin (c − 1) // 4
        for c in range(cmin, cmax + 1):
            h = hist[0, c] + hist[1, c] + hist[2, c] + hist[3, c]
            hist[0, c] = hist[1, c] = hist[2, c] = hist[3, c] = 0  # left zero for the next input
            if repeats and fmin <= c <= fmax:
                h += repeats * first_counts[c]
            every[c] += h
            in_counts[i, 0 if c == 0 else (NI + 1 if c == NB + 1 else 1 + (c - 1) // _PER_COARSE)] += h
    ext[0], ext[1] = kmin, tmax


# -- layers ------------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})
def _chunk(x, xi):  # pragma: no cover - compiled
    """Σv, Σv² (float64, on vector registers) and the largest |v| bits of one chunk."""
    s = q = 0.0
    for j in range(len(x)):
        v = np.float64(x[j])
        s += v
        q += v * v
    top = np.int32(0)
    for j in range(len(xi)):
        top = max(top, xi[j] & 0x7FFFFFFF)
    return s, q, top


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc"})
def _chunk_masked(x, xi):  # pragma: no cover - compiled
    """:func:`_chunk` of a chunk holding Inf or NaN: finite values only (a select, so still on vector
    registers), the non-finite ones counted, +inf in the largest |v| bits and NaN not."""
    s = q = 0.0
    bad = 0
    top = np.int32(0)
    for j in range(len(x)):
        a = xi[j] & 0x7FFFFFFF
        finite = a < _INF_BITS
        v = np.float64(x[j]) if finite else 0.0
        s += v
        q += v * v
        bad += 0 if finite else 1
        top = max(top, a if a <= _INF_BITS else np.int32(0))
    return s, q, top, bad


@_jit
def layer_sums(x, xi, rows, n, acc, conv, convf):  # pragma: no cover - compiled
    """Fold float32 ``x`` (flat; ``xi`` its int32 view) into ``acc``: count of finite values, Σv, Σv²,
    max |v|, non-finite count (float64), input after input. ``x`` is ``rows`` equal rows, each holding
    the ``n`` inputs' values one input after another (``rows`` = 1: the inputs one after another);
    an input's values are its piece of each row in turn, each piece in chunks of 4096.

    Non-finite values come in runs (a sample that exploded stays so to its last value): after a chunk holding
    Inf or NaN the next is read masked first, and read plain only if it holds none, so each chunk is read once
    where the runs are long, and every chunk's sums are those of the one loop that fits it, as always."""
    width = len(x) // rows
    m = width // n
    for i in range(n):
        s = q = top = 0.0
        bad = 0
        masked = False  # whether the last chunk held Inf or NaN
        for r in range(rows):
            a = r * width + i * m
            for c0 in range(a, a + m, _CHUNK):
                end = min(c0 + _CHUNK, a + m)
                if masked:
                    cs, cq, ct, cb = _chunk_masked(x[c0:end], xi[c0:end])
                    masked = cb > 0
                    if not masked:  # finite after all: the plain loop's sums
                        cs, cq, ct = _chunk(x[c0:end], xi[c0:end])
                else:
                    cs, cq, ct = _chunk(x[c0:end], xi[c0:end])
                    masked = cq - cq != 0.0  # Inf or NaN in the chunk
                    cb = 0
                    if masked:
                        cs, cq, ct, cb = _chunk_masked(x[c0:end], xi[c0:end])
                bad += cb
                conv[0] = ct
                top = max(top, np.float64(convf[0]))
                s += cs
                q += cq
        acc[0] += rows * m - bad
        acc[1] += s
        acc[2] += q
        acc[3] = max(acc[3], top)
        acc[4] += bad


def memory_rows(v: np.ndarray, inputs: int) -> tuple[np.ndarray, int]:
    """``v`` (batch first, ``inputs`` inputs) flat in memory order, and the number of rows it is then laid
    out in for :func:`layer_sums`: 1 where ``v`` is contiguous; for a dense view in another order (no copy)
    the product of the dimensions laid out outside the batch. Anything else (an expanded or sliced view,
    or one row an input, whose batch stride says nothing about the layout of a batch) is copied
    and read in its logical order."""
    if v.flags.c_contiguous:  # a 0-d array too
        return v.reshape(-1), 1
    flat = v.ravel("K")  # a view in memory order where v is dense
    if flat.flags.owndata or len(v) // inputs < 2:
        return np.ascontiguousarray(v).reshape(-1), 1
    return flat, v.size // (len(v) * (v.strides[0] // v.itemsize))  # the batch's stride spans what lies inside it


# -- parameter reservoir ---------------------------------------------------------------------------------
def salt_mix(salt: int) -> np.uint64:
    """The salt's term of :func:`split_mix` (salt × golden ratio, modulo 2^64)."""
    return np.uint64((salt * _GOLDEN) & ((1 << 64) - 1))


@_jit
def split_mix(mix, row):  # pragma: no cover - compiled
    """:func:`~flowaudit.tracing.reservoir.uniform_keys` of one row id (``mix``: :func:`salt_mix`)."""
    z = np.uint64(row) * np.uint64(_GOLDEN) + mix
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * 2.0**-53


@_jit
def _worse(score, ids, a, b):  # pragma: no cover - compiled
    """Whether slot ``a`` ranks below slot ``b``: a smaller score, or the same and a larger row id."""
    return score[a] < score[b] or (score[a] == score[b] and ids[a, 0] > ids[b, 0])


@_jit
def _sift_down(heap, n, score, ids, at):  # pragma: no cover - compiled
    while True:
        low, left = at, 2 * at + 1
        if left < n and _worse(score, ids, heap[left], heap[low]):
            low = left
        if left + 1 < n and _worse(score, ids, heap[left + 1], heap[low]):
            low = left + 1
        if low == at:
            return
        heap[at], heap[low] = heap[low], heap[at]
        at = low


@_jit
def _sift_up(heap, score, ids, at):  # pragma: no cover - compiled
    while at:
        up = (at - 1) // 2
        if not _worse(score, ids, heap[at], heap[up]):
            return
        heap[at], heap[up] = heap[up], heap[at]
        at = up


@_jit
def heapify(heap, n, score, ids):  # pragma: no cover - compiled
    """Order ``heap[:n]`` (slot numbers) worst first."""
    for at in range(n // 2 - 1, -1, -1):
        _sift_down(heap, n, score, ids, at)


@_jit
def _offer_half(
    new_score, params, first_row, samples, batch, heap, fill, score, ids, rows
):  # pragma: no cover - compiled
    k, n, took = len(heap), fill[0], 0
    for r in range(len(new_score)):
        row = first_row + r
        s = new_score[r]
        if n < k:
            slot = n
            heap[n] = slot
        else:
            slot = heap[0]
            if s < score[slot] or (s == score[slot] and row > ids[slot, 0]):
                continue
        score[slot] = s
        ids[slot, 0], ids[slot, 1], ids[slot, 2] = row, row // samples, batch
        rows[slot, :] = params[r, :]
        took += 1
        if n < k:
            _sift_up(heap, score, ids, n)
            n += 1
        else:
            _sift_down(heap, n, score, ids, 0)
    fill[0] = n
    return took


@_jit
def offer(
    row_gain,
    params,
    first_row,
    samples,
    batch,
    mix,
    keys,
    t_heap,
    t_fill,
    t_score,
    t_ids,
    t_rows,
    r_heap,
    r_fill,
    r_score,
    r_ids,
    r_rows,
):  # pragma: no cover - compiled
    """Offer one call's rows (``params`` (rows, m), global ids ``first_row …`` of pass ``batch``) to
    both halves: by ``row_gain`` to the first, by minus their uniform keys (into ``keys``) to the
    second. Returns how many rows entered either."""
    for r in range(len(keys)):
        keys[r] = -split_mix(mix, first_row + r)
    took = _offer_half(row_gain, params, first_row, samples, batch, t_heap, t_fill, t_score, t_ids, t_rows)
    return took + _offer_half(keys, params, first_row, samples, batch, r_heap, r_fill, r_score, r_ids, r_rows)
