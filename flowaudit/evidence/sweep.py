r"""The condition sweep: each site's parameters at conditions of every magnitude, whatever the data.

Remark 2 is a claim for *every* condition. The scanned data show the parameters a few conditions give;
a conditioner that is an unbounded function of the condition (a raw linear :math:`\log\sigma(y)`, a
scale that decays only for far conditions) shows only further out. The sweep samples the model at
conditions :math:`y_0\cdot 10^k`, :math:`k = 0 \dots` :data:`DECADES` − 1, from a few seeded base
conditions :math:`y_0` (standard normal for vectors, uniform on [0, 1] for images), and keeps what
every site reports: its parameters (for the tail probe), its largest finite inverse gain and its
count of non-finite gains, and every layer's count of non-finite values — in order to say where a
non-finite value first appears (:func:`nonfinite_origins`).

Vector conditions go through in one inverse pass (rows are independent: a row's sample is its own up to the
float32 rounding of kernels whose blocking follows the batch), images decade by decade (their batch is the
memory).
A model that raises on such conditions is not an error of the audit: the sweep then says so and
carries no evidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DECADES", "sweep", "nonfinite_origins"]

DECADES = 5
N_BASE = 4  # base conditions for vector conditions (images: half, one sample each)
SAMPLES = 2


class _Keeper:
    """An observer that keeps parameters, gain extremes and non-finite counts per site and layer."""

    def __init__(self) -> None:
        self.params: dict[str, list[Any]] = {}
        self.max_gain: dict[str, float] = {}
        self.bad_gain: dict[str, int] = {}
        self.bad_layer: dict[str, int] = {}

    def layer(self, name: str, x: Tensor) -> None:
        if isinstance(x, Tensor) and x.is_floating_point():
            self.bad_layer[name] = self.bad_layer.get(name, 0) + int((~torch.isfinite(x.detach())).sum())

    def site(self, name: str, gain: Tensor, params: Any) -> None:
        g = gain.detach().to(torch.float64)
        ok = torch.isfinite(g)
        self.bad_gain[name] = self.bad_gain.get(name, 0) + int((~ok).sum())
        if ok.any():
            self.max_gain[name] = max(self.max_gain.get(name, -math.inf), float(g[ok].abs().max()))
        p = params.detach() if isinstance(params, Tensor) else params
        self.params.setdefault(name, []).append(p)


def _bases(adapter: Any, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, *adapter.probe_shape)
    return torch.rand(shape, generator=g) if len(shape) == 4 else torch.randn(shape, generator=g)


def sweep(
    adapter: Any,
    decades: int = DECADES,
    n_base: int | None = None,
    samples: int | None = None,
    temperature: float = 0.9,
    seed: int = 0,
) -> dict:
    """Sample ``adapter`` at swept conditions (module docstring).

    Returns ``{"scales": [...], "params": {site: [...]}, "max_gain": {...}, "nonfinite_gain": {...},
    "nonfinite_layer": {...}, "error": str | None}``.
    """
    image = len(adapter.condition_shape) == 3
    n_base = n_base or (N_BASE // 2 if image else N_BASE)
    samples = samples or (1 if image else SAMPLES)
    scales = [10.0**k for k in range(decades)]
    y0 = _bases(adapter, n_base, seed)
    ys = [(y0 * s).repeat_interleave(samples, 0) for s in scales]

    def latents(k: int) -> list[Tensor]:
        return adapter.sample_latents(ys[k], temperature, torch.Generator().manual_seed(seed + k))

    with torch.no_grad():
        keeper, error = (None if image else _one_pass(adapter, ys, latents)), None
        if keeper is None:
            keeper = _Keeper()
            error = _by_decade(adapter, ys, latents, keeper)
    return {
        "scales": scales,
        "n_conditions": n_base,
        "samples": samples,
        "params": keeper.params,
        "max_gain": keeper.max_gain,
        "nonfinite_gain": keeper.bad_gain,
        "nonfinite_layer": keeper.bad_layer,
        "error": error,
    }


def _one_pass(adapter: Any, ys: list[Tensor], latents: Callable[[int], list[Tensor]]) -> _Keeper | None:
    """Every decade in one inverse pass (vector conditions: rows are independent, a row's sample is the same
    in any batch up to float32 rounding): one call's fixed cost instead of :data:`DECADES`. What it kept;
    ``None`` when the model raises — the sweep then goes decade by decade, to keep what the nearer decades give."""
    dev = adapter.device
    keeper = _Keeper()
    try:
        z = [torch.cat(parts).to(dev) for parts in zip(*(latents(k) for k in range(len(ys))))]
        adapter.sample(torch.cat(ys).to(dev), z, keeper)
    except Exception:  # noqa: BLE001 - the model's own failure at far conditions: retried decade by decade
        return None
    return keeper


def _by_decade(adapter: Any, ys: list[Tensor], latents: Callable[[int], list[Tensor]], keeper: _Keeper) -> str | None:
    """One inverse pass a decade, nearest first, up to the first the model refuses; its error, or ``None``."""
    dev = adapter.device
    try:
        for k, y in enumerate(ys):
            adapter.sample(y.to(dev), [z.to(dev) for z in latents(k)], keeper)
    except Exception as exc:  # the model's own failure at far conditions: reported, not raised
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return None


def _site_layer(site: str, layers: Sequence[str]) -> int | None:
    """Index of the layer that is the site, or holds it (the longest name that prefixes the site's)."""
    best = None
    for i, name in enumerate(layers):
        if site == name or site.startswith(name + "."):
            if best is None or len(name) > len(layers[best]):
                best = i
    return best


def nonfinite_origins(
    sites_forward: Sequence[str], layers: Sequence[str], bad_gain: dict[str, int], bad_layer: dict[str, int]
) -> dict[str, str | None]:
    """For each site with non-finite gains: ``None`` when the non-finite values first appear there, else
    the name of the site or layer they came from.

    ``sites_forward`` in forward (encode) order; ``layers`` the inverse pass's layers in the order it meets
    them. A site's input is the layer before its own; when that layer (or, without a layer trace, an
    earlier site in inverse order) already had non-finite values, they came from upstream.
    """
    out: dict[str, str | None] = {}
    seen: str | None = None
    for name in reversed(list(sites_forward)):  # the inverse pass meets the sites last to first
        if not bad_gain.get(name):
            continue
        i = _site_layer(name, layers)
        before = layers[i - 1] if i is not None and i > 0 else None
        if before is not None and bad_layer.get(before):
            out[name] = before
        elif i is None and seen is not None:
            out[name] = seen
        else:
            out[name] = None
        seen = seen or name
    return out
