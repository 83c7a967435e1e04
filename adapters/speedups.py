"""Optional speed-ups an adapter may offer; the engine works without them.

* An **observing block** (:func:`observing`): an adapter whose reporting has a set-up cost per pass
  (hooks to register and remove) pays it once for a block of passes that report to one observer.
* **Held reports** (:attr:`HookedSpeedUps.tensors_stay_intact`): where no in-place write of the model
  reaches a tensor the hooks see, a pass's reports are held by reference and made in bursts of a few MB
  and when it returns (:class:`~flowaudit.adapters.hooks.HeldReports`), so the audit runs between the
  layers a few times a pass, not at every call.
* **Small flows** (:func:`small_flow`): a sample of at most :data:`SMALL_SAMPLE_VALUES` values makes one
  input's K samples a call so small that the cost of the call, not its arithmetic, sets the time; the
  engine then puts many inputs in a pass. Whether that changes a figure in its last bits depends on the
  model's kernels, which :func:`rows_independent` checks.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .base import Observer
from .hooks import HeldReports

__all__ = ["HookedSpeedUps", "observing", "SMALL_SAMPLE_VALUES", "small_flow", "rows_independent"]

#: a flow whose samples hold at most this many values (vectors, not images) is small: see :func:`small_flow`
SMALL_SAMPLE_VALUES = 256


def observing(adapter: Any, observer: Observer) -> contextlib.AbstractContextManager[None]:
    """A block of ``adapter.sample`` calls reporting to ``observer``: the adapter's own block where it offers
    one (:class:`HookedSpeedUps`), else nothing to set up."""
    if isinstance(adapter, HookedSpeedUps):
        return adapter.observing(observer)
    return contextlib.nullcontext()


class HookedSpeedUps:
    """Mixin for an adapter whose observed passes report through hooks that :meth:`_hooks` puts on the model.

    A pass with an observer puts them on for itself (:meth:`_observed`); an :meth:`observing` block puts
    them on once, and they report only the passes that name the block's observer (``live``).
    """

    #: whether every tensor an observed pass's hooks see keeps its values until the pass returns, so that
    #: its reports may be held to then; claimed only where the code of the whole pass is known (tested)
    tensors_stay_intact: bool = False
    _held: tuple[Observer, list[bool], HeldReports | None] | None = None  # block: observer, live flag, reports

    @abstractmethod
    def _hooks(self, observer: Observer, live: list[bool]) -> contextlib.AbstractContextManager[HeldReports | None]:
        """Hooks reporting to ``observer`` while ``live[0]``, removed on exit; the value: reports held for the
        end of each pass, or ``None``."""

    def _observed(self, observer: Observer, run: Callable[[], Tensor]) -> Tensor:
        """``run()``, an inverse pass, reporting to ``observer``: through the block's hooks if it is the block's."""
        held = self._held
        if held is not None and held[0] is observer:
            return _reported(run, held[1], held[2])
        with self._hooks(observer, [True]) as later:
            return _reported(run, [True], later)

    @contextlib.contextmanager
    def observing(self, observer: Observer) -> Iterator[None]:
        """Hooks put on once for the block; they report only passes that name ``observer``."""
        if self._held is not None:  # already holding one: calls with this observer hook themselves
            yield
            return
        live = [False]
        with self._hooks(observer, live) as later:
            self._held = (observer, live, later)
            try:
                yield
            finally:
                self._held = None


def _reported(run: Callable[[], Tensor], live: list[bool], later: HeldReports | None) -> Tensor:
    """``run()`` with the hooks live, then the reports they held (dropped if it raised)."""
    live[0] = True
    try:
        out = run()
    except BaseException:
        if later is not None:
            later.drop()
        raise
    finally:
        live[0] = False
    if later is not None:
        later.flush()
    return out


def small_flow(adapter: Any, condition: Tensor) -> bool:
    """Whether a sample for ``condition`` (one condition, batch first) holds at most :data:`SMALL_SAMPLE_VALUES`
    values over all latents: a tabular or toy flow, whose calls of one input's K rows cost far more than their
    arithmetic. Image flows never are: one input's samples are already a large call."""
    latents = adapter.sample_latents(condition[:1], 1.0, torch.Generator().manual_seed(0))
    return sum(int(z[0].numel()) for z in latents) <= SMALL_SAMPLE_VALUES


def rows_independent(adapter: Any, y: Tensor, latents: list[Tensor], samples: int) -> bool:
    """Whether one pass over ``y`` (input-major, ``samples`` rows an input) gives every input the same bits as a
    pass of that input alone: a check, on this machine and at this batch shape, that the model's kernels are
    batch-invariant (elementwise maps are; a matrix product's blocking may follow the number of rows, as MKL's
    does on the CPU, where a few inputs of a pass then differ in the last bits). One pass per input."""
    whole = adapter.sample(y, latents)
    for i in range(y.shape[0] // samples):
        rows = slice(i * samples, (i + 1) * samples)
        alone, part = adapter.sample(y[rows], [z[rows] for z in latents]), whole[rows]
        if not bool(((alone == part) | (alone.isnan() & part.isnan())).all()):
            return False
    return True
