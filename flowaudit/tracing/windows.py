r"""Windows over the positions of spatial parameter rows, the units a parameter reservoir keeps of rows too large
for its budget (:mod:`flowaudit.tracing.reservoir`).

A site whose parameters are laid out (…, C, H, W) and whose map is elementwise over the positions (H, W) takes
any window over H, W of a row as a parameter tensor of its own. :class:`Tiling` cuts rows of one shape into
windows of one shape (h, w), keeping all channels of their positions, and scores each window by the largest
inverse gain of its positions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["TILE_UNITS", "Tiling"]

TILE_UNITS = 16  # windows of a cut row that fit a budget at least: 8 a half


class Tiling:
    """Windows over the trailing two dims (H, W) of parameter rows of shape ``row``, each ``tile`` = (h, w).

    The window starts are multiples of h (of w) but the last, which ends at H (at W): every window has
    the same shape (a reservoir keeps them in one tensor) and covers its positions whole; the last window
    of a side overlaps its neighbour where h does not divide H. Window ``t`` of a row is the ``t``-th in
    row-major order over (start in H, start in W).
    """

    def __init__(self, row: tuple[int, ...], tile: tuple[int, int]):
        self.row, self.tile = tuple(int(d) for d in row), (int(tile[0]), int(tile[1]))
        (h, w), (big_h, big_w) = self.tile, self.row[-2:]
        self.starts = tuple(
            [min(i * size, whole - size) for i in range(-(-whole // size))] for size, whole in ((h, big_h), (w, big_w))
        )
        self.per_row = len(self.starts[0]) * len(self.starts[1])
        self.unit = (*self.row[:-2], h, w)

    @classmethod
    def of(cls, row: tuple[int, ...], budget: int) -> "Tiling | None":
        """The windows for rows of shape ``row`` under ``budget`` numbers: ``None`` where two rows a half fit
        (kept whole) or the row has no (C, H, W); else the most positions a window such that :data:`TILE_UNITS`
        windows fit the budget (one position at least), as square as H and W allow."""
        m = math.prod(row)
        if len(row) < 3 or m <= max(budget, 0) // 2 or row[-1] * row[-2] <= 1:
            return None
        big_h, big_w = row[-2:]
        per = m // (big_h * big_w)  # numbers a position
        positions = max(1, max(budget, 0) // TILE_UNITS // max(per, 1))
        h = min(big_h, max(1, math.isqrt(positions)))
        w = min(big_w, max(1, positions // h))
        h = min(big_h, max(1, positions // w))
        return cls(row, (h, w))

    def state(self) -> dict:
        return {"row": list(self.row), "tile": list(self.tile)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tiling) and (self.row, self.tile) == (other.row, other.tile)

    def cut(self, a: Tensor) -> Tensor:
        """Rows ``a`` (n, *row) as their windows (n·T, *unit), row by row, each row's in window order."""
        (h, w), (big_h, big_w) = self.tile, self.row[-2:]
        n, lead, (ny, nx) = a.shape[0], a.shape[1:-2], (len(s) for s in self.starts)
        if big_h % h or big_w % w:  # a last window that overlaps: gather the windows' positions side by side
            iy = (torch.tensor(self.starts[0])[:, None] + torch.arange(h)).reshape(-1).to(a.device)
            ix = (torch.tensor(self.starts[1])[:, None] + torch.arange(w)).reshape(-1).to(a.device)
            a = a.index_select(a.dim() - 2, iy).index_select(a.dim() - 1, ix)
        k = len(lead)
        a = a.reshape(n, *lead, ny, h, nx, w).permute(0, k + 1, k + 3, *range(1, k + 1), k + 2, k + 4)
        return a.reshape(n * ny * nx, *lead, h, w)

    def window(self, a: np.ndarray | Tensor, u: int) -> np.ndarray | Tensor:
        """Window ``u`` of rows ``a`` (n, *row), in :meth:`cut`'s order (row ``u // per_row``): a view, (*unit)."""
        (h, w), nx = self.tile, len(self.starts[1])
        r, t = divmod(u, self.per_row)
        y, x = self.starts[0][t // nx], self.starts[1][t % nx]
        return a[r, ..., y : y + h, x : x + w]

    def scores(
        self, gain: Tensor | np.ndarray | None, row_gain: Tensor | np.ndarray, n: int, log: bool = False
    ) -> Tensor:
        """Each window's largest inverse gain (NaN counts as +inf, as in a row's), float64, (n·T,).

        ``gain`` holds the call's gains with the rows' (H, W) as trailing dims; where it has not (or is
        missing), every window of a row is scored by the row's largest gain ``row_gain``. With ``log`` it holds
        their logs: the largest log of a window is found first and only it goes through ``exp`` (in float64,
        rounded to the gains' dtype: the largest of the gains as a tracer rounds them, ``exp`` being monotone).
        """
        if isinstance(gain, np.ndarray):
            gain = torch.from_numpy(gain)
        if gain is not None and gain.dim() >= 3 and gain.shape[0] == n and tuple(gain.shape[-2:]) == self.row[-2:]:
            g = gain.detach().reshape(n, -1, *self.row[-2:]).amax(1, keepdim=True)  # amax keeps a NaN
            top = self.cut(g).reshape(n * self.per_row, -1).amax(1)
            if log:
                top = top.double().exp().to(top.dtype)
            return torch.nan_to_num(top.double(), nan=math.inf)
        rg = torch.as_tensor(row_gain)
        rg = rg.double() if len(rg) == n else torch.zeros(n, dtype=torch.float64, device=rg.device)
        return rg.repeat_interleave(self.per_row)
