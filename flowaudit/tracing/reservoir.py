r"""The parameter reservoir of one site: a fixed budget of parameter rows for the Remark 2 probe.

Every site call hands the tracer the conditioner's parameters (one row per sample) and each row's largest inverse
gain :math:`g_r`. :class:`ParamReservoir` keeps :math:`k = \max(2, \lfloor \text{budget} / m \rfloor)` rows of
:math:`m` numbers: :math:`\lfloor k/2 \rfloor` with the largest :math:`g_r` (the tails Remark 2 is about) and
:math:`\lceil k/2 \rceil` with the smallest keys :math:`u_r = \text{SplitMix64}(\text{salt}, r) / 2^{64}`,
:math:`r` the row's global index (a uniform sample). Both halves order rows by (score, row id), a strict total
order, so the top k of a union is the top k of the parts' top k: the same rows whatever the batches, shards or
ranks. On the CPU each half is a heap fed by :func:`~flowaudit.tracing.host_kernels.offer` (a reservoir
``compiled=False`` keeps using tensor operations there, as on a device: the same rows, with no numba loaded).
Merged halves are kept in that order, so rows that come later than every kept one (a device's next pass, a
scan's next shard) are placed among them by their scores, sorting only themselves (:meth:`ParamReservoir._append`).

A row too large for two a half (:math:`m > \text{budget}/2`) of a *spatial* site (parameters laid out
(…, H, W), the map elementwise over positions, so a window of a row is itself a parameter tensor) is cut into
windows over H, W (:class:`~flowaudit.tracing.windows.Tiling`): each window keeps all channels of its positions
and is a unit of the reservoir, scored by the largest inverse gain of its positions, keyed by its unit id
:math:`u = r \cdot T + t` (row :math:`r`, window :math:`t` of :math:`T`). The windows are small enough that at
least :data:`~flowaudit.tracing.windows.TILE_UNITS` of them fit the budget, so the budget holds whatever the
image size. Rows that fit are kept whole, as above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .windows import Tiling

__all__ = ["ParamReservoir", "uniform_keys"]


def uniform_keys(row: Tensor, salt: int) -> Tensor:
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


def _host_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU half keeps rows of ``dtype`` in: float32 and float64 as they are, the narrower floats
    widened to float32 and anything else to float64 (exactly either way; the compiled loop copies these two)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else torch.float64


class _Half:
    """One half of a reservoir on the CPU: up to ``k`` rows in a buffer allocated once, a binary heap
    of their slots worst first, their scores and row ids in numpy; the compiled
    :func:`~flowaudit.tracing.host_kernels.offer` adds rows to it, copying only the rows that enter."""

    def __init__(self, k: int, like: Tensor):
        self.k = k
        dtype = _host_dtype(like.dtype)
        self.rows = torch.empty((k, *like.shape[1:]), dtype=dtype)
        self.flat = self.rows.numpy().reshape(k, self.rows[0].numel())  # the same memory, a row a line
        self.heap = np.zeros(k, dtype=np.int64)
        self.fill = np.zeros(1, dtype=np.int64)
        self.score = np.empty(k)
        self.ids = np.empty((k, 3), dtype=np.int64)

    @classmethod
    def of(cls, kept: tuple[Tensor, Tensor, Tensor] | None, k: int, like: Tensor) -> "_Half":
        from .host_kernels import heapify

        out = cls(k, like)
        if kept is not None and len(kept[1]):
            n = len(kept[1])
            out.rows[:n], out.score[:n], out.ids[:n] = kept[0], kept[1].numpy(), kept[2].numpy()
            out.heap[:n] = np.arange(n)
            out.fill[0] = n
            heapify(out.heap, n, out.score, out.ids)
        return out

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        """The kept rows, scores and ids; a full half hands over its memory (it is dropped once read:
        :meth:`ParamReservoir._flush`), one with free slots copies what it holds (a saved view would save them too)."""
        n = int(self.fill[0])
        if n == self.k:
            return self.rows, torch.from_numpy(self.score), torch.from_numpy(self.ids)
        return self.rows[:n].clone(), torch.from_numpy(self.score[:n].copy()), torch.from_numpy(self.ids[:n].copy())


class ParamReservoir:
    """Parameter rows of one site kept for the Remark 2 probe, drawn from every batch (module docstring).

    Args:
        budget: parameter numbers kept (rows × numbers per row; at least 2 rows, or 2 windows a half).
        generator: the seeded generator of the random keys, on the parameters' device.
        spatial: the site's parameters are laid out (…, H, W) and act elementwise over positions, so rows too
            large for the budget may be kept as windows (:class:`~flowaudit.tracing.windows.Tiling`).
        compiled: CPU rows go to the compiled loops (loaded on the first), else to tensor operations.

    Row ids (global row, input, batch) travel with the rows so the report can say how many
    inputs and batches the kept points come from; a window's first id is its unit id (module docstring).
    """

    def __init__(
        self,
        budget: int,
        generator: torch.Generator | None = None,
        salt: int = 0,
        spatial: bool = False,
        compiled: bool = True,
    ) -> None:
        self.budget, self.generator, self.salt, self.spatial, self.compiled = budget, generator, salt, spatial, compiled
        self.tiling: Tiling | None = None  # decided by the first rows offered (:meth:`_cut`)
        self.rows_seen = self.skipped = 0
        self._top: tuple[Tensor, Tensor, Tensor] | None = None  # rows, gain, ids
        self._rand: tuple[Tensor, Tensor, Tensor] | None = None  # rows, key, ids
        self._next_id: int | None = 0  # every kept row id is below it (None: unknown)
        self._ranked = False  # _top and _rand in rank order (:meth:`_order`), as every merge leaves them
        self._kept: tuple[Tensor, Tensor] | None = None  # :meth:`kept`, until rows are offered or merged
        self._host: tuple[_Half, _Half] | None = None  # the CPU's halves (:meth:`_flush` turns them into _top, _rand)
        self._offer_args: tuple = ()  # with the halves: their row shape, dtype and arrays (:meth:`_start_host`)
        self._offer: Any = None  # with the halves: the compiled loop and the salt's term of its keys
        self._mix: Any = None
        self._keys = np.empty(0)  # scratch: the random half's scores of a call's rows

    def capacity(self, per_row: int) -> tuple[int, int]:
        """(rows kept by gain, rows kept at random) for rows of ``per_row`` numbers."""
        rows = max(2, self.budget // max(per_row, 1))
        return rows // 2, rows - rows // 2

    @staticmethod
    def _order(score: Tensor, ids: Tensor) -> Tensor:
        """The permutation that puts rows in rank order: score descending, ties by ascending row id (a row's id
        is unique within a half, so the first sort needs no stability)."""
        by_id = torch.argsort(ids[:, 0])
        return by_id.index_select(0, torch.argsort(score.index_select(0, by_id), descending=True, stable=True))

    @classmethod
    def _rank(cls, part: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``part`` (rows, score, ids) in rank order."""
        order = cls._order(part[1], part[2])
        return tuple(t.index_select(0, order) for t in part)

    @staticmethod
    def _take(old: tuple[Tensor, Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor], idx: Tensor) -> tuple:
        """Rows ``idx`` of the union ``old`` then ``new``: only those rows are copied."""
        n_old = old[0].shape[0]
        score, ids = torch.cat([old[1], new[1]]).index_select(0, idx), torch.cat([old[2], new[2]]).index_select(0, idx)
        if not (n_old and new[0].shape[0]):
            return (old[0] if n_old else new[0]).index_select(0, idx), score, ids
        from_old = (idx < n_old).view(-1, *[1] * (new[0].dim() - 1))
        rows = torch.where(
            from_old,
            old[0].index_select(0, idx.clamp_max(n_old - 1)),
            new[0].index_select(0, (idx - n_old).clamp_min(0)),
        )
        return rows, score, ids

    @classmethod
    def _merge(
        cls, old: tuple[Tensor, Tensor, Tensor] | None, new: tuple[Tensor, Tensor, Tensor], k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The ``k`` rows with the largest score (rows, score, ids), ties to the smaller row id, in that order.

        A strict total order, so the kept rows are the same however the rows arrived
        (batch sizes, shards, ranks): top-k of a union is top-k of the parts' top-k. The order
        is found on the scores and ids alone; only the ``k`` kept rows are copied.
        """
        if old is None:
            old = tuple(t[:0] for t in new)
        new = tuple(b.to(a.device) for a, b in zip(old, new))
        idx = cls._order(torch.cat([old[1], new[1]]), torch.cat([old[2], new[2]]))[:k]
        return cls._take(old, new, idx)

    @classmethod
    def _append(
        cls, old: tuple[Tensor, Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor], k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_merge` where ``old`` is in rank order and every new row id lies above old's: only the new rows
        are sorted, then placed among the old by their scores, an old row first on a tie (its id is smaller).
        Sizes follow the shapes alone: no host sync."""
        new = tuple(b.to(a.device) for a, b in zip(old, new))
        n_old, n_new, dev = old[1].shape[0], new[1].shape[0], old[1].device
        order = cls._order(new[1], new[2])
        above = torch.searchsorted(-old[1], -new[1].index_select(0, order), right=True)  # old rows scoring ≥ each
        at = torch.empty(n_old + n_new, dtype=torch.long, device=dev)  # the union's rows in merged rank order
        at[above + torch.arange(n_new, device=dev)] = order + n_old
        # new rows placed before each old row (a bincount would read its largest value back to the host)
        passed = torch.zeros(n_old + 1, dtype=torch.long, device=dev).index_add_(0, above, torch.ones_like(above))
        at[torch.arange(n_old, device=dev) + passed.cumsum(0)[:n_old]] = torch.arange(n_old, device=dev)
        return cls._take(old, new, at[:k])

    def add(
        self,
        params: Tensor,
        row_gain: Tensor | np.ndarray,
        first_input: int,
        samples: int,
        batch: int,
        gain: Tensor | None = None,
    ) -> None:
        """Offer the rows of one call (``first_input``'s K samples first) with their largest gains; a call
        without one gain a row offers its rows at gain 0. ``gain``: the call's gains at every position, which
        score the windows of rows kept as windows (unused otherwise)."""
        rows = params.detach()
        if rows.device.type == "cpu" and self.compiled:
            from .host_kernels import host_array

            g = None if gain is None else host_array(gain.detach())
            self.add_host(host_array(rows), np.asarray(row_gain, dtype=np.float64), first_input, samples, batch, g)
        else:
            self._add_tensors(rows, row_gain, first_input, samples, batch, gain)

    def _add_tensors(
        self, rows: Tensor, row_gain: Tensor, first_input: int, samples: int, batch: int, gain: Tensor | None
    ) -> None:
        """:meth:`add` by tensor operations on the rows' device (rows kept as windows cut there first)."""
        n = rows.shape[0]
        if self._wrong_shape(tuple(rows.shape[1:]), n):
            return
        if self._cut(tuple(rows.shape[1:])) is not None:
            scores = self.tiling.scores(gain, row_gain, n)
            rows, row_gain, samples = self.tiling.cut(rows), scores, max(samples, 1) * self.tiling.per_row
        self._add_device(rows, row_gain, first_input, samples, batch, n)

    def add_host(
        self,
        rows: np.ndarray,
        row_gain: np.ndarray,
        first_input: int,
        samples: int,
        batch: int,
        gain: np.ndarray | None = None,
        log: bool = False,
    ) -> None:
        """:meth:`add` on the CPU, the rows as numpy (:func:`~flowaudit.tracing.host_kernels.host_array`) and their
        gains as float64: offered by the compiled loop (:func:`~flowaudit.tracing.host_kernels.offer`), which copies
        only the rows that enter. Rows kept as windows are cut first (one copy of the call's rows); ``gain``,
        which scores the windows, holds log-gains with ``log``."""
        self._kept = None
        n = len(rows)
        if not n:
            return
        if self._wrong_shape(rows.shape[1:], n):
            return
        if self._cut(tuple(rows.shape[1:])) is not None:
            t = self.tiling
            row_gain, samples = t.scores(gain, row_gain, n, log=log).numpy(), max(samples, 1) * t.per_row
            if self._host is not None and self._offer_windows(rows, row_gain, first_input * samples, samples, batch):
                self.rows_seen += n
                return
            rows = t.cut(torch.from_numpy(rows)).numpy()
        if self._host is None:
            self._start_host(rows)
        _, dtype, arrays = self._offer_args
        self.rows_seen += n
        n = len(rows)
        if len(self._keys) < n:
            self._keys = np.empty(n)
        samples = max(samples, 1)
        self._offer(
            row_gain if len(row_gain) == n else np.zeros(n),
            rows.astype(dtype, copy=False).reshape(n, -1),  # a view where contiguous, widened exactly where narrow
            first_input * samples,
            samples,
            batch,
            self._mix,
            self._keys[:n],
            *arrays,
        )

    def _offer_windows(self, rows: np.ndarray, scores: np.ndarray, first: int, samples: int, batch: int) -> bool:
        """Offer only the windows of ``rows`` (unit ids ``first …``) that can enter a full half, each cut alone;
        ``False`` (nothing offered) where a half has room or many can enter: then they are all cut and offered.

        A window enters a half only if it ranks above the half's worst kept unit, and that bar only rises while
        a call is offered, so the windows that rank below it at the start are the ones the loop would pass over.
        """
        _, dtype, arrays = self._offer_args
        units = np.arange(first, first + len(scores), dtype=np.int64)
        keys = -uniform_keys(torch.from_numpy(units), self.salt).numpy()
        enter = np.zeros(len(units), dtype=bool)
        for score, (heap, fill, kept, ids) in ((scores, arrays[0:4]), (keys, arrays[5:9])):
            if fill[0] < len(heap):
                return False
            worst = heap[0]
            enter |= (score > kept[worst]) | ((score == kept[worst]) & (units < ids[worst, 0]))
        at = np.flatnonzero(enter)
        if 4 * len(at) > len(units):
            return False
        if not len(self._keys):
            self._keys = np.empty(1)
        for u in at:
            window = np.ascontiguousarray(self.tiling.window(rows, int(u)), dtype=dtype).reshape(1, -1)
            self._offer(scores[u : u + 1], window, first + int(u), samples, batch, self._mix, self._keys[:1], *arrays)
        return True

    def _start_host(self, rows: np.ndarray) -> None:
        """The CPU's halves, holding what the reservoir kept so far (rows of the kept shape, else of ``rows``')."""
        from .host_kernels import offer, salt_mix

        self._offer, self._mix = offer, salt_mix(self.salt)
        like = torch.from_numpy(rows[:1])
        shape = self._row_shape() or tuple(like.shape[1:])
        like = like.new_empty((1, *shape))
        k_top, k_rand = self.capacity(like.numel())
        self._host = top, rand = _Half.of(self._top, k_top, like), _Half.of(self._rand, k_rand, like)
        self._offer_args = (
            shape,
            top.flat.dtype,
            (top.heap, top.fill, top.score, top.ids, top.flat, rand.heap, rand.fill, rand.score, rand.ids, rand.flat),
        )
        self._top = self._rand = None
        self._next_id = None  # stored in slots, not in sorted order: a device path after this sorts by id

    def _cut(self, row_shape: tuple[int, ...]) -> Tiling | None:
        """The windows rows of ``row_shape`` are kept as: decided once, by the first rows of a spatial site."""
        if self.tiling is None and self.spatial and self._row_shape() is None:
            self.tiling = Tiling.of(row_shape, self.budget)
        return self.tiling

    def _source_shape(self) -> tuple[int, ...] | None:
        """The shape of the rows offered so far (whole rows, whatever the units kept)."""
        return self.tiling.row if self.tiling is not None else self._row_shape()

    def _wrong_shape(self, row_shape: tuple[int, ...], n: int) -> bool:
        """Whether ``n`` rows came with another parameter shape than those offered before.

        Such rows are counted as skipped, not mixed into one probe tensor.
        """
        shape = self._source_shape()
        if shape is not None and shape != tuple(row_shape):  # counted, not mixed into one probe tensor
            self.skipped += n
            return True
        return False

    def _row_shape(self) -> tuple[int, ...] | None:
        if self._host is not None:
            return self._offer_args[0]
        return None if self._top is None else tuple(self._top[0].shape[1:])

    def _flush(self) -> None:
        """Turn the CPU's halves into the (rows, score, ids) form every other method reads."""
        if self._host is not None:
            self._top, self._rand = (h.as_tuple() for h in self._host)
            self._host, self._ranked = None, False

    def _add_device(
        self, rows: Tensor, row_gain: Tensor, first_input: int, samples: int, batch: int, seen: int | None = None
    ) -> None:
        """:meth:`add` on the rows' device, with no host sync (kept in rank order: :meth:`_merge`, :meth:`_append`);
        ``rows`` are units (whole rows, or windows with ``samples`` of them an input) of ``seen`` sample rows (all)."""
        self._kept = None
        self._flush()
        n, dev = rows.shape[0], rows.device
        r = torch.arange(n, device=dev)
        ids = torch.stack(
            [r + first_input * max(samples, 1), r // max(samples, 1) + first_input, torch.full_like(r, batch)], 1
        )
        self.rows_seen += n if seen is None else seen
        first = first_input * max(samples, 1)
        later = self._next_id is not None and first >= self._next_id
        self._next_id = first + n if later or self._top is None else None
        gain = (
            row_gain.to(dev, torch.float64)
            if row_gain.shape[0] == n
            else torch.zeros(n, dtype=torch.float64, device=dev)
        )
        k_top, k_rand = self.capacity(rows[0].numel() if n else 1)
        merge = self._append if later and self._top is not None and self._ranked else self._merge
        self._top = merge(self._top, (rows, gain, ids), k_top)
        key = uniform_keys(ids[:, 0], self.salt)  # a function of the row, not of the batch it came in
        self._rand = merge(self._rand, (rows, -key, ids), k_rand)  # smallest keys: a uniform sample
        self._ranked = True

    # -- mergeable state (shards, resume, ranks) ----------------------------------------------
    def state(self) -> dict:
        self._flush()

        def cpu(t):
            return None if t is None else tuple(x.cpu() for x in t)

        return {
            "budget": self.budget,
            "salt": self.salt,
            "rows_seen": self.rows_seen,
            "skipped": self.skipped,
            "top": cpu(self._top),
            "rand": cpu(self._rand),
            "spatial": self.spatial,
            "tiling": None if self.tiling is None else self.tiling.state(),
        }

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> "ParamReservoir":
        out = cls(state["budget"], salt=state["salt"], spatial=bool(state.get("spatial", False)))
        tiling = state.get("tiling")
        out.tiling = None if tiling is None else Tiling(tuple(tiling["row"]), tuple(tiling["tile"]))
        out.rows_seen, out.skipped = state["rows_seen"], state["skipped"]
        out._next_id = None  # the ids' order is not known without reading them: the general merge
        out._top, out._rand = (
            None if state[k] is None else tuple(x.to(device) for x in state[k]) for k in ("top", "rand")
        )
        return out

    def merge(self, other: "ParamReservoir") -> "ParamReservoir":
        """The reservoir over the rows of both (``other`` from later inputs); returns ``self``."""
        self._kept = None
        self._flush()
        other._flush()
        self._next_id = None
        self.rows_seen += other.rows_seen
        self.skipped += other.skipped
        if other._top is None:
            return self
        if self._top is None:
            self._top, self._rand, self.tiling, self._ranked = other._top, other._rand, other.tiling, other._ranked
            return self
        if self._source_shape() != other._source_shape() or self.tiling != other.tiling:
            self.skipped += other.rows_seen
            return self
        k_top, k_rand = self.capacity(self._top[0][0].numel() if len(self._top[0]) else 1)
        if self._below(other):  # the usual fold, shards in input order: sort only the other's rows that enter
            if not self._ranked:
                self._top, self._rand = self._rank(self._top), self._rank(self._rand)
            self._top = self._append(self._top, self._entering(self._top, other._top, k_top), k_top)
            self._rand = self._append(self._rand, self._entering(self._rand, other._rand, k_rand), k_rand)
        else:
            self._top = self._merge(self._top, other._top, k_top)
            self._rand = self._merge(self._rand, other._rand, k_rand)
        self._ranked = True
        return self

    def _below(self, other: "ParamReservoir") -> bool:
        """Whether every row id this reservoir keeps lies below every id ``other`` keeps (one host read)."""
        mine, theirs = ([h[2][:, 0] for h in (r._top, r._rand) if len(h[2])] for r in (self, other))
        if not (mine and theirs):
            return True
        first = torch.stack([t.min() for t in theirs]).min()
        return bool(first.to(mine[0].device) > torch.stack([t.max() for t in mine]).max())

    @staticmethod
    def _entering(kept: tuple[Tensor, Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor], k: int) -> tuple:
        """The rows of ``new`` (ids above ``kept``'s) that can enter ``kept`` (a half of ``k`` in rank order): all
        where it has room, else those scoring above its worst row (a tie keeps the older row)."""
        if kept[1].shape[0] < k:
            return new
        enter = new[1].to(kept[1].device) > kept[1][k - 1]
        return tuple(t[enter.to(t.device)] for t in new)

    def kept(self) -> tuple[Tensor, Tensor] | None:
        """(rows, ids) of the union of both halves, each row once, in row order (read once, then reused until the
        reservoir changes: the probe and the report both ask)."""
        self._flush()
        if self._top is None:
            return None
        if self._kept is None:
            ids = torch.cat([self._top[2], self._rand[2]])
            order = torch.argsort(ids[:, 0])
            row = ids[:, 0].index_select(0, order)
            first = torch.ones_like(row, dtype=torch.bool)
            torch.ne(row[1:], row[:-1], out=first[1:])  # a row in both halves: once
            at = order[first]
            self._kept = torch.cat([self._top[0], self._rand[0]]).index_select(0, at), ids.index_select(0, at)
        return self._kept

    def info(self) -> dict:
        """What the reservoir holds, for the report. Where rows are kept as windows, ``rows`` and ``rows_by_gain``
        count the sample rows the kept windows come from, ``rows_capacity`` the windows it has room for, and
        ``tiles`` says how rows were cut (``shape`` (h, w), ``per_row``) and how many windows it keeps."""
        self._flush()
        kept = self.kept()
        per_row = int(self._top[0][0].numel()) if self._top is not None and len(self._top[0]) else 0
        k_top, k_rand = self.capacity(per_row) if per_row else (0, 0)
        ids = kept[1].cpu() if kept is not None else torch.zeros(0, 3, dtype=torch.long)
        by_gain = self._top[2][:, 0].cpu() if self._top is not None else torch.zeros(0, dtype=torch.long)
        t = self.tiling

        def rows_of(unit: Tensor) -> int:  # the sample rows kept units come from
            return int(len(unit)) if t is None else int((unit // t.per_row).unique().numel())

        extra = {} if t is None else {"tiles": {"shape": list(t.tile), "per_row": t.per_row, "kept": int(len(ids))}}
        return {
            "budget": self.budget,
            "rows_capacity": k_top + k_rand,
            "rows": rows_of(ids[:, 0]),
            "rows_by_gain": rows_of(by_gain),
            "points": int(len(ids)) * per_row,
            "inputs": int(ids[:, 1].unique().numel()),
            "batches": int(ids[:, 2].unique().numel()),
            "rows_seen": self.rows_seen,
            "rows_skipped": self.skipped,
            "largest_gain_kept": float(self._top[1].max()) if self._top is not None and len(self._top[1]) else None,
            **extra,
        }
