"""Images of several sizes as one set of conditions, read in same-size runs.

A folder of images may mix sizes (photos as they come). :class:`Ragged` holds them as a list of
C×H×W tensors, ordered so that images of one size are contiguous (sizes in the order they first
appear, file-name order inside each). Indexing answers what the audit asks of ``ConditionSet.y``:
an index or a range inside one size gives a stacked tensor, exactly what a same-size folder gives;
a range across sizes gives a smaller :class:`Ragged`. The audit passes one input at a time through a
mixed set (exact passes), so a figure never depends on which images share a pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Ragged", "by_size", "same_size_runs", "condition_shapes"]


class Ragged:
    """Conditions of several shapes (no batch axis differs but the trailing ones); see the module docstring."""

    def __init__(self, items: Sequence[Tensor]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The distinct shapes of one condition, in order of first appearance."""
        return list(dict.fromkeys(tuple(t.shape) for t in self.items))

    @property
    def dtype(self) -> torch.dtype:
        return self.items[0].dtype if self.items else torch.float32

    def __getitem__(self, index: Any) -> Tensor | Ragged:
        if isinstance(index, int):
            return self.items[index]
        if isinstance(index, slice):
            picked = self.items[index]
        else:  # a tensor, array or list of row indices
            picked = [self.items[int(i)] for i in torch.as_tensor(index).flatten().tolist()]
        return _pack(picked)

    def nonfinite(self) -> Tensor:
        """Per condition: whether it holds a NaN or ±Inf."""
        return torch.tensor([not bool(torch.isfinite(t).all()) for t in self.items], dtype=torch.bool)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """A flat array for digests: each condition's shape, then its values (so the sizes count too)."""
        parts = [np.concatenate([np.asarray(t.shape, np.float32), t.numpy().ravel()]) for t in self.items]
        a = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"Ragged({len(self)} conditions, shapes {self.shapes})"


def _pack(items: list[Tensor]) -> Tensor | Ragged:
    """Stacked when every item has one shape (also for none), else :class:`Ragged`."""
    if len({tuple(t.shape) for t in items}) <= 1:
        return torch.stack(items) if items else torch.zeros(0)
    return Ragged(items)


def by_size(named: list[tuple[str, Any]], key: Any = lambda a: a.shape) -> list[tuple[str, Any]]:
    """``(stem, image)`` pairs with images of one size (``key``) made contiguous: sizes by first appearance,
    the given order kept inside a size."""
    order = {s: k for k, s in enumerate(dict.fromkeys(key(a) for _, a in named))}
    return sorted(named, key=lambda p: order[key(p[1])])  # sorted() is stable: file-name order inside a size


def condition_shapes(y: Tensor | Ragged) -> list[tuple[int, ...]]:
    """The distinct shapes of one condition in ``y`` (one for a tensor)."""
    return y.shapes if isinstance(y, Ragged) else [tuple(y.shape[1:])]


def same_size_runs(y: Tensor | Ragged, rows: slice, size: int) -> Iterator[slice]:
    """Consecutive slices of ``rows`` with at most ``size`` rows, cut where the condition size changes."""
    start = rows.start
    while start < rows.stop:
        stop = min(start + size, rows.stop)
        if isinstance(y, Ragged):
            shape = y.items[start].shape
            stop = next((i for i in range(start + 1, stop) if y.items[i].shape != shape), stop)
        yield slice(start, stop)
        start = stop
