r"""How inputs become batches of samples, and where each sample's latent comes from.

A :class:`Sampling` draws :math:`K` samples per input at temperature
:math:`\tau`. Rows of a sampled batch are **input-major**: row :math:`r` is
sample :math:`r \bmod K` of input :math:`\lfloor r / K \rfloor`;
:meth:`Sampling.repeat` builds that layout from the conditions and
:meth:`Sampling.per_input` reads it back as (inputs, K, …).

Latents come from one generator per input, seeded by (seed, set, input index),

.. math:: \text{seed}_i = 1\,000\,003 \cdot \text{seed} + 10^9 \cdot \text{set} + i,

so a sample does not depend on the batch size or on which other inputs share
its batch, and any input's samples can be drawn again on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..adapters import Adapter
from ..adapters.base import plain_latent_shapes

__all__ = ["Sampling", "batches", "progress_bar", "Phase", "BAR_FACTORY"]


@dataclass(frozen=True)
class Sampling:
    """K samples per input at temperature τ, latents seeded per (set, input)."""

    samples: int
    temperature: float
    seed: int

    def seed_of(self, set_index: int, i: int) -> int:
        """The generator seed of input ``i`` of set ``set_index``."""
        return (self.seed * 1_000_003 + set_index * 10**9 + i) % 2**64  # the generator takes 0 … 2**64 - 1

    def latents(self, adapter: Adapter, y: Tensor, set_index: int, first: int, device: torch.device) -> list[Tensor]:
        """K latents for each row of ``y`` (inputs ``first``, ``first + 1``, …), input-major, on ``device``.

        Where the adapter's latents are plain ``τ·ε`` of stated shapes (every bundled adapter's:
        :func:`~flowaudit.adapters.base.plain_latent_shapes`), each input's ε is drawn from its generator straight
        into one buffer a latent, with no call, product or copy an input (a small flow's pass holds a thousand
        inputs); else the adapter draws each input's.
        """
        g, k = torch.Generator(), self.samples
        shapes = plain_latent_shapes(adapter, y[:1].cpu()) if len(y) else None
        if shapes is not None:
            out = [torch.empty((len(y) * k, *s), dtype=y.dtype) for s in shapes]
            for j in range(len(y)):
                g.manual_seed(self.seed_of(set_index, first + j))
                for z in out:
                    z[j * k : (j + 1) * k].normal_(generator=g)  # what draw_latents' torch.randn draws
            return [z.mul_(self.temperature).to(device) for z in out]
        # input j's rows are a view of the input-major layout (the same values as its own repeat), one split for all
        per_input = []
        for j, rows in enumerate(self.repeat(y.cpu()).split(k)):
            g.manual_seed(self.seed_of(set_index, first + j))
            per_input.append(adapter.sample_latents(rows, self.temperature, g))
        return [torch.cat(parts).to(device) for parts in zip(*per_input)]

    def repeat(self, y: Tensor) -> Tensor:
        """Each condition K times in a row: the input-major layout."""
        return y.repeat_interleave(self.samples, 0)

    def per_input(self, t: Tensor) -> Tensor:
        """An input-major batch as (inputs, K, …)."""
        return t.reshape(-1, self.samples, *t.shape[1:])


def batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` out of ``n``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "input"):
    """A tqdm bar over ``total`` items, silent unless ``enabled`` (made by :data:`BAR_FACTORY`)."""
    return BAR_FACTORY(total=total, desc=desc, disable=not enabled, leave=False, mininterval=0.5, unit=unit)


def _tqdm(**kw: Any):
    from tqdm.auto import tqdm

    return tqdm(**kw)


#: what makes every bar (tqdm); a test may replace it to read the totals
BAR_FACTORY: Callable[..., Any] = _tqdm


class Phase:
    """One bar for one phase of a run (fit, probe, sample, attack) over its true total.

    The phase is made of parts (shards, sets); a part is counted as it runs (:meth:`advance`) and
    settled when its result arrives (:meth:`settle`), whether it was computed here, loaded from the
    work folder of an interrupted run or computed by another rank, so the bar never counts a part
    twice and never restarts between parts.
    """

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "input"):
        self.total = int(total)
        self.bar = progress_bar(self.total, desc, enabled, unit)
        self._done: dict[Any, int] = {}

    def advance(self, part: Any, n: int = 1) -> None:
        """``n`` more items of ``part`` done."""
        self._done[part] = self._done.get(part, 0) + n
        self.bar.update(n)

    def settle(self, part: Any, n: int) -> None:
        """``part`` complete, ``n`` items in all."""
        more = n - self._done.get(part, 0)
        if more > 0:
            self.advance(part, more)

    def finish(self) -> None:
        """The phase is done (parts restored from an interrupted run included): the bar at its total."""
        more = self.total - sum(self._done.values())
        if more > 0:
            self.advance(None, more)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
