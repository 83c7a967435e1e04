r"""Running statistics of one layer's output values, batch-invariant float64 sums.

Per layer five float64 numbers: the count of finite values, :math:`\sum v`, :math:`\sum v^2` (finite values
only), :math:`\max |v|` (+inf counts, NaN does not) and the number of non-finite values; the variance is
:math:`\sum v^2 / n - (\sum v / n)^2`. Each input's partial sums :math:`s_i` (chunks of 4096) are folded in input
order, :math:`S \leftarrow (\cdots((S + s_1) + s_2) + \cdots) + s_n`, so the figures do not depend on how inputs
were grouped into passes nor on the thread count. On the CPU
:func:`~flowaudit.tracing.host_kernels.layer_sums` folds the same way (:meth:`LayerStats.host_acc`).
Details: ``docs/tracer.md``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .scratch import Scratch

__all__ = ["LayerStats", "layer_device", "layer_parts", "CHUNK"]

CHUNK = 4096


def _row_sums(v: Tensor) -> Tensor:
    r"""Sum of each row of ``v`` (n, m), the same bits for any ``n`` and any thread count.

    A reduction with one output and many values may be split over threads (a different
    association per thread count); one with several outputs gives each output to one thread.
    Rows longer than a chunk are therefore summed as zero-padded chunks of 4096 values
    (several outputs per row) and then the chunk sums, recursively; zeros add exactly.
    """
    n, m = v.shape
    if m <= CHUNK:
        return v.sum(1)
    return _row_sums(_chunked(v).sum(2))


def _chunked(v: Tensor) -> Tensor:
    """``v`` (n, m) as (n, ⌈m/4096⌉, 4096), zero-padded; a view when 4096 divides m."""
    n, m = v.shape
    if m % CHUNK:
        v = torch.nn.functional.pad(v, (0, (-m) % CHUNK))
    return v.reshape(n, -1, CHUNK)


def _count_rows(a: Tensor) -> Tensor:
    """Row sums (float64) of a 0/1 tensor: chunks of 4096 summed in its own dtype are exact integers."""
    n, m = a.shape
    if m > CHUNK:
        a = _chunked(a).sum(2)
    return _row_sums(a.to(torch.float64))


def _fold(acc: Tensor | None, parts: Tensor) -> Tensor:
    """The running five numbers after adding the rows of ``parts`` (inputs, 5) one after another.

    ``cumsum`` along the rows is a sequential scan on the CPU and, for a scan over a non-last
    dimension, one sequential loop per column on CUDA: the same float64 additions, in the same
    order, as folding row by row, with no Python loop. Column 3 (max |v|) takes the maximum.
    """
    rows = parts if acc is None else torch.cat([acc[None], parts])
    out = rows.cumsum(0)[-1]
    out[3] = rows[:, 3].amax()
    return out


def layer_parts(x: Tensor, work: Scratch) -> Tensor:
    """Per row of ``x`` (inputs, values): finite count, sum, sum of squares, max |v| and non-finite count."""
    inf = math.inf
    a = torch.nan_to_num(x, nan=0.0, posinf=inf, neginf=inf, out=work.get("layer", x.shape, x.dtype, x.device))
    top = a.abs_().amax(1).to(torch.float64)  # Inf counts, NaN does not
    torch.mul(x, 0, out=a).nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)  # 1 exactly at the non-finite values
    bad = _count_rows(a)
    torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0, out=a)
    v = work.get("layer64", x.shape, torch.float64, x.device).copy_(a) if x.dtype != torch.float64 else a
    total = _row_sums(v)
    total_sq = _row_sums(v.mul_(v))
    return torch.stack([x.shape[1] - bad, total, total_sq, top, bad], 1)


def _fold_host(acc: np.ndarray | None, parts: np.ndarray) -> np.ndarray:
    """:func:`_fold` in numpy: ``cumsum`` along the rows is the same sequential float64 additions."""
    if acc is not None and len(parts) == 1:  # one input (an exact pass): one addition each
        out = acc + parts[0]
        out[3] = max(acc[3], parts[0, 3])
        return out
    rows = parts if acc is None else np.concatenate([acc[None], parts])
    out = rows.cumsum(0)[-1]
    out[3] = rows[:, 3].max()
    return out


class LayerStats:
    """Running statistics of one layer's output values.

    The five running numbers (count, sum, sum of squares, max |v|, non-finite count)
    stay a float64 tensor on the model's device (reading them is the only host sync), or a
    numpy array on the CPU (:meth:`add_parts`, :meth:`host_acc`).
    """

    def __init__(self) -> None:
        self._acc: Tensor | np.ndarray | None = None

    def add(self, x: Tensor, n_inputs: int = 1, work: Scratch | None = None) -> None:
        """Add the values of ``x`` (input-major rows of ``n_inputs`` inputs), folded input by input.

        Each input's partial sums come from :func:`_row_sums` and are added to the running sums in
        input order (:func:`_fold`), so the result does not depend on how inputs were grouped into passes.
        Non-finite values are zeroed by ``nan_to_num`` (one cheap pass, no mask, no ``where``) and
        counted by the NaN that ``x * 0`` gives exactly at them. Temporaries go to ``work``.
        """
        x = x.detach()
        if x.numel() == 0:
            return
        if n_inputs < 1 or x.shape[0] % n_inputs:
            n_inputs = 1
        parts = layer_parts(x.reshape(n_inputs, -1), work or Scratch())
        if x.device.type == "cpu":
            self.add_parts(parts.numpy())
        else:
            self._acc = _fold(self._acc, parts)

    def host_acc(self) -> np.ndarray:
        """The five running numbers as the numpy array the CPU's compiled loop adds to in place
        (:func:`~flowaudit.tracing.host_kernels.layer_sums`; call it only with values to add)."""
        if not isinstance(self._acc, np.ndarray):
            self._acc = np.zeros(5) if self._acc is None else self._acc.cpu().numpy().copy()
        return self._acc

    def add_parts(self, parts: np.ndarray) -> None:
        """Fold per-input partials (inputs × 5, float64): the CPU's tensor path and merges."""
        acc = self._acc.cpu().numpy() if isinstance(self._acc, Tensor) else self._acc
        self._acc = _fold_host(acc, parts)

    def merge(self, other: "LayerStats") -> "LayerStats":
        """Fold ``other``'s sums (a later shard) into these; returns ``self``."""
        if other._acc is None:
            return self
        if isinstance(self._acc, np.ndarray) or (self._acc is None and isinstance(other._acc, np.ndarray)):
            self.add_parts(other.state().numpy()[None])
        else:
            theirs = other.state() if isinstance(other._acc, np.ndarray) else other._acc
            self._acc = _fold(self._acc, theirs.to(self._acc.device if self._acc is not None else theirs.device)[None])
        return self

    def state(self) -> Tensor | None:
        """The five running numbers (float64, CPU), or ``None`` before any value."""
        if isinstance(self._acc, np.ndarray):
            return torch.from_numpy(self._acc.copy())
        return None if self._acc is None else self._acc.cpu()

    @classmethod
    def from_state(cls, acc: Tensor | None, device: torch.device | str = "cpu") -> "LayerStats":
        out = cls()
        if acc is not None and torch.device(device).type == "cpu":
            out._acc = acc.to(torch.float64).numpy().copy()  # the CPU folds in numpy
        else:
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


def layer_device(stats: LayerStats) -> torch.device:
    return stats._acc.device if isinstance(stats._acc, Tensor) else torch.device("cpu")
