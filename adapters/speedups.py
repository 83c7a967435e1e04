"""Optional speed-ups an adapter may offer; the engine works without them.

* An **observing block** (:func:`observing`): an adapter whose reporting has a set-up cost per pass
  (hooks to register and remove) pays it once for a block of passes that report to one observer.
* **Held reports** (:attr:`HookedSpeedUps.tensors_stay_intact`): where no in-place write of the model
  reaches a tensor the hooks see, a pass's reports are held by reference and made when it returns
  (:class:`~flowaudit.adapters.hooks.HeldReports`), so nothing of the audit runs between the layers.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

from .base import Observer
from .hooks import HeldReports

__all__ = ["HookedSpeedUps", "observing"]


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
