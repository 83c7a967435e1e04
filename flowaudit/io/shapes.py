"""Whether a model can take the conditions it is given, decided before any sampling.

A condition of the wrong shape or size is the user's mistake, and it must say so in one line
with the shape the model expects, not crash deep inside the flow. The adapter's
``check_condition_shape`` is asked first; an image size it lets through that is not the model's
own (a flow built for one size, a FrEIA graph) is tried with one pass of one condition at
temperature 0, and refused when that pass fails while the model's own size runs. Targets (the
HR of LR/HR pairs, the normal-light of low-light pairs) must have the shape of the model's samples
for their condition (for SR, the LR size times the scale), found by the same one-condition pass (one per
size: the condition check's pass is reused).
"""

from __future__ import annotations

import torch

from ..adapters import Adapter
from ..config.device import auditing
from ..config.sampling import Sampling
from ..errors import DataError
from .datasets import ConditionSet
from .ragged import Ragged

__all__ = ["check_condition_shapes"]


def check_condition_shapes(adapter: Adapter, cs: ConditionSet, what: str) -> None:
    """Raise :class:`DataError` (one line, with the expected shape) when a condition of ``cs`` cannot be sampled."""
    where = f"{what} {cs.description['path']}" if cs.description.get("path") else what
    want = tuple(adapter.condition_shape)
    made: dict[tuple[int, ...], tuple[int, ...] | None] = {}  # sample shape per condition shape, from a trial
    for shape in cs.shapes:
        try:
            adapter.check_condition_shape(shape)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        if shape == want or len(cs) == 0:
            continue
        first = next(i for i in range(len(cs)) if tuple(cs.y[i].shape) == shape)
        made[shape], problem = _trial(adapter, cs.y[first][None])
        if problem is not None and _trial(adapter, torch.zeros((1, *want), dtype=torch.float32))[1] is None:
            raise DataError(
                f"{where}: {cs.ids[first]} has shape {shape}, which the model does not take "
                f"(it expects {want}; {problem})"
            )
    if cs.x is not None and len(cs):
        _check_targets(adapter, cs, where, made)


def _check_targets(
    adapter: Adapter, cs: ConditionSet, where: str, made: dict[tuple[int, ...], tuple[int, ...] | None]
) -> None:
    """Each target must have the shape of the model's samples for its condition; one line naming both if not.
    ``made`` holds the sample shapes the condition trials found (a size is tried once)."""
    for i in range(len(cs)):
        shape, target = tuple(_row(cs.y, i).shape), tuple(_row(cs.x, i).shape)
        if shape not in made:
            made[shape] = _trial(adapter, _row(cs.y, i)[None])[0]
        want = made[shape]
        if want is not None and target != want:
            scale = f" (×{adapter.scale})" if adapter.task == "sr" else ""
            raise DataError(
                f"{where}: target {cs.ids[i]} has shape {target}, but the model{scale} makes samples of shape "
                f"{want} from a condition of shape {shape}"
            )


def _row(t: torch.Tensor | Ragged, i: int) -> torch.Tensor:
    return t.items[i] if isinstance(t, Ragged) else t[i]


def _trial(adapter: Adapter, y: torch.Tensor) -> tuple[tuple[int, ...] | None, str | None]:
    """One sampling pass of one condition at τ = 0 on the model's device: ``(sample shape, None)`` when it runs,
    else ``(None, why not)``."""
    device = adapter.device
    try:
        with auditing(adapter, device):
            y = y.to(device)
            x = adapter.sample(y, Sampling(1, 0.0, 0).latents(adapter, y, 0, 0, device))
    except Exception as exc:  # any failure here is the size's: the model's own size is tried next
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return tuple(x.shape[1:]), None
