"""Encoder features behind ``s_OOD`` (paper §3.3): hooked, pooled per channel, concatenated.

The output of each named module of the conditioning network is pooled per
channel (float64) and the pooled vectors are concatenated in the order the
names are given. A model with no separate encoder uses the condition itself.
Hooks come from :func:`flowaudit.adapters.hooks.hooked` and are removed when
the capture ends; they keep pooled numbers, never the model's tensors.

A float32 encoder's output for one input can change in its last bits with the
size of the pass it runs in (the kernels pick their blocking by shape). An exact
fit therefore runs passes of :data:`EXACT_PASS_INPUTS` inputs counted from each
shard's start: which inputs share a pass depends on the data alone, never on
``--batch-size`` or the number of ranks, so the features, and the float64 sums
formed from them, are the same bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters import Adapter
from ..adapters.hooks import HookError, first_tensor, hooked
from ..config.device import auditing
from ..config.sampling import batches, progress_bar
from ..errors import AuditError

if TYPE_CHECKING:  # scikit-learn is imported when a Gaussian is fitted or read, not by inspect
    from .gaussian import GaussianOOD

__all__ = [
    "EXACT_PASS_INPUTS",
    "POOLINGS",
    "pool",
    "FeatureCapture",
    "capture_features",
    "features",
    "fit_spatial",
    "spatial_map",
]

POOLINGS = ("avg", "avgstd", "spatial")

#: Inputs per encoder pass of an exact fit: fixed, so that no feature depends on the batch size. Small
#: enough to cost less memory than the default batch, large enough to cost little time over larger passes.
EXACT_PASS_INPUTS = 16


def pool(t: Tensor, pooling: str) -> Tensor:
    """Per-channel pooling of a (B, C, *S) feature map, in float64.

    ``avg`` → (B, C) means; ``avgstd`` → (B, 2C) means then standard deviations;
    ``spatial`` → (B, *S, C), one vector per location (vectors have no ``S``).
    """
    t = t.detach().to(torch.float64, copy=True)  # the model may edit its output in place later
    if t.dim() == 2:
        return torch.cat([t, torch.zeros_like(t)], 1) if pooling == "avgstd" else t
    flat = t.flatten(2)
    if pooling == "avg":
        return flat.mean(2)
    if pooling == "avgstd":
        return torch.cat([flat.mean(2), flat.std(2, unbiased=False)], 1)
    if pooling == "spatial":
        return t.movedim(1, -1).clone()
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


class FeatureCapture:
    """Collects the pooled features of one forward pass; see :func:`capture_features`."""

    def __init__(self, names: Sequence[str], pooling: str):
        self.names, self.pooling = list(names), pooling
        self._seen: dict[str, Tensor] = {}

    def _record(self, name: str, args: tuple, kwargs: dict, output: Any) -> None:
        # a module called twice in one pass (shared weights) keeps its last call
        self._seen[name] = pool(first_tensor(output), self.pooling)

    def take(self) -> Tensor:
        """Concatenate the pooled vectors of the last pass in ``names`` order, and forget them."""
        missing = [n for n in self.names if n not in self._seen]
        if missing:
            raise HookError(f"feature layer {missing[0]!r} was not called by the encoder")
        parts = [self._seen[n] for n in self.names]
        self._seen.clear()
        if self.pooling == "spatial":
            size = parts[0].shape[1:-1]
            parts = [_resize_spatial(p, size) for p in parts]
        return torch.cat(parts, -1)


def _resize_spatial(p: Tensor, size: torch.Size) -> Tensor:
    """Nearest-resize a (B, *S, C) map to spatial ``size`` so layers can be concatenated."""
    if p.shape[1:-1] == size:
        return p
    moved = p.movedim(-1, 1)
    return torch.nn.functional.interpolate(moved, size=tuple(size), mode="nearest").movedim(1, -1)


@contextlib.contextmanager
def capture_features(model: nn.Module, names: Sequence[str], pooling: str = "avg") -> Iterator[FeatureCapture]:
    """Hook ``names`` of ``model``; after each encoder pass ``capture.take()`` gives (B, D) features.

    Example:
        >>> with capture_features(flow, ["encoder"]) as cap:   # doctest: +SKIP
        ...     flow.encode(y)
        ...     v = cap.take()
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    cap = FeatureCapture(names, pooling)
    with hooked(model, names, cap._record):
        yield cap


def features(
    adapter: Adapter,
    y: Tensor,
    layers: Sequence[str],
    pooling: str,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> Tensor:
    """Encoder features (N, D) in float64: hooked ``layers`` pooled, or the condition itself."""
    out = []
    with progress_bar(len(y), "features", progress) as bar:
        if not layers:
            for sl in batches(len(y), batch_size):
                out.append(pool(y[sl], pooling).flatten(1).cpu())
                bar.update(sl.stop - sl.start)
            return torch.cat(out)
        with contextlib.ExitStack() as stack:
            try:  # only an unknown layer name is the user's mistake; a KeyError inside the encoder is not
                cap = stack.enter_context(capture_features(adapter.model, layers, pooling))
            except KeyError as exc:
                raise AuditError(str(exc.args[0])) from None
            for sl in batches(len(y), batch_size):
                adapter.encode(y[sl].to(device))
                out.append(cap.take().cpu())
                bar.update(sl.stop - sl.start)
    return torch.cat(out)


def fit_spatial(
    adapter: Adapter,
    y: Tensor,
    layers: Sequence[str],
    estimator: str,
    batch_size: int,
    device: torch.device,
    threads: int | None = None,
) -> GaussianOOD:
    """Gaussian of per-location feature vectors (every location of every fit input), streamed."""
    from .gaussian import GaussianOOD

    gauss = GaussianOOD(estimator=estimator, device=device)
    with auditing(adapter, device, threads), capture_features(adapter.model, layers, "spatial") as cap:
        for sl in batches(len(y), max(1, batch_size // 10)):
            adapter.encode(y[sl].to(device))
            v = cap.take()
            gauss.partial_fit(v.reshape(-1, v.shape[-1]))
    return gauss.finalize()


def spatial_map(adapter: Adapter, gauss: GaussianOOD, y: Tensor, layers: Sequence[str]) -> np.ndarray:
    """Per-location ``s_OOD`` (B, H', W') at the resolution of the first hooked layer: where will the artifact be?"""
    with capture_features(adapter.model, layers, "spatial") as cap:
        adapter.encode(y)
        v = cap.take()
    return gauss.score(v.reshape(-1, v.shape[-1])).reshape(v.shape[:-1])
