r"""Adapter for `zuko <https://github.com/probabilists/zuko>`_ conditional flows (``zuko.lazy.Flow``).

A zuko flow is *lazy*: ``flow(c)`` builds, for that condition, a
``NormalizingFlow`` whose transform :math:`z = T(x; c)` is composed of the
transforms each lazy module returns for ``c``. The conditioning lives in
hyper-networks: ``GeneralCouplingTransform`` (``NICE``, ``RealNVP``) computes
:math:`\phi = h(x_a, c)` and maps :math:`x_b` elementwise by
``univariate(*φ)``; ``MaskedAutoregressiveTransform`` (``MAF``, ``NSF``,
``NAF``) computes :math:`\phi_i = h(x_{<i}, c)` and maps each :math:`x_i`
elementwise; a conditional ``ElementWiseTransform`` (``GF``) computes
:math:`\phi = h(c)` and maps every :math:`x_i`. Those are the sites; their parameters are the hyper-network's
raw output :math:`\phi` at the points visited while sampling (for an
autoregressive transform, at the last of the library's ``passes``).

The univariate map is read by *building* it from :math:`\phi`, as the library
does, and its derivative is the library's own ``call_and_ladj``:

* ``MonotonicAffineTransform``: :math:`c(x) = e^{a'} x + b` with
  :math:`a' = a / (1 + |a / \log s|)`, so :math:`c' \in (s, 1/s)` for the
  slope floor :math:`s` (10⁻³ by default). The bounds are read from built
  objects over a sweep of :math:`\phi`: ``affine`` (or ``affine-bounded``
  when the floor caps the inverse gain at ≤ 100).
* ``AdditiveTransform`` (``NICE(..., univariate=AdditiveTransform, shapes=[()])``;
  zuko's ``NICE`` is affine by default): ``additive``.
* ``MonotonicRQSTransform`` (``NSF``): a spline on :math:`[-B, B]` and the
  identity outside; :math:`B` is read from the built object's knots:
  ``rq-spline`` with ``tail_start() = B``.
* anything else (``NAF``'s ``MonotonicTransform`` of a monotonic MLP, ``UNAF``'s and
  ``SOSPF``'s integrals, ``BPF``'s polynomials): ``unknown``; :math:`c'` is a forward-mode JVP
  of the library's map (or, where the library's code has no forward-mode rule, its own
  ``call_and_ladj``).
* a **soft clip** (``SoftclipTransform``, inserted by ``NAF`` between its
  transforms): :math:`c(x) = x / (1 + |x| / B)`,
  :math:`c' = (1 + |x|/B)^{-2} \to 0` for large :math:`|x|`, inverse
  :math:`y / (1 - |y|/B)` that blows up as :math:`|y| \to B`. It has no
  conditioner but it is where a sample explodes, so it is a site (kind
  ``unknown``: its measured tail ratio is what condemns it).

zuko's ``flow(c).sample()`` draws :math:`x = T^{-1}(z)` inside the built
transform; :meth:`ZukoAdapter.sample` runs the same inverse transform by
transform, reporting each layer, and reads :math:`\phi` with a forward hook
on the hyper-network (removed on exit, also after an exception). Latents are
standard-normal :math:`\varepsilon` times the temperature, mapped through the
base ``DiagNormal`` (:math:`z = \mu + \sigma\varepsilon`); a base that depends
on the condition is a ``prior`` site.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Adapter, Observer, Site, affine_kind, elementwise_derivative, sweep_bounds
from .hooks import hooked

__all__ = ["ZukoAdapter", "UnivariateSite", "SoftclipSite", "PriorSite", "matches", "make"]


def _repeat_rows(t: Tensor, v: int) -> Tensor:
    """``t`` (B, ...) stacked ``v`` times along the batch: (v·B, ...)."""
    return t.unsqueeze(0).expand(v, *t.shape).reshape(v * t.shape[0], *t.shape[1:])


def _fill(values: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(V·B, ...) inputs, block ``k`` filled with ``values[k]``; ``shape`` is (B, ...)."""
    v = values.reshape(-1, *([1] * len(shape)))
    return v.expand(len(values), *shape).reshape(len(values) * shape[0], *shape[1:])


def _module_dtype(m: Any) -> torch.dtype | None:
    """dtype of a univariate that is a module with weights (NAF's MNN): probes must use it."""
    if isinstance(m, nn.Module):
        p = next(iter(m.parameters()), None)
        return p.dtype if p is not None else None
    return None


class _ZukoSite(Site):
    """Probe evaluation at (V, M) from an elementwise ``build(params)`` transform."""

    name: str
    kind: str

    def build(self, params: Tensor):
        raise NotImplementedError

    def _dtype(self) -> torch.dtype | None:
        return None

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.build(params)(x)

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        # the library's own log |c'| (closed form, or autograd for MonotonicTransform)
        return self.build(params).call_and_ladj(x)[1].exp().expand_as(x)

    def _probe(self, values: Tensor, params: Tensor, fn) -> Tensor:
        dtype = self._dtype() or values.dtype
        p = params.to(dtype)
        shape = tuple(p.shape[:2])
        out = fn(_fill(values.to(dtype), shape), _repeat_rows(p, len(values)))
        return out.reshape(len(values), -1).to(values.dtype)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        return self._probe(values, params, self.derivative)

    def map_at(self, values: Tensor, params: Tensor) -> Tensor:
        return self._probe(values, params, self.map)


class UnivariateSite(_ZukoSite):
    """A coupling, masked autoregressive or conditional element-wise lazy transform; params are φ, (B, n, P).

    ``mode``: ``coupling`` (φ = h([x_a, c]) maps x_b), ``autoregressive`` (φ_i = h([x_{<i}, c]) maps
    every x_i) or ``elementwise`` (``ElementWiseTransform``: φ = h(c) maps every x_i).
    """

    def __init__(self, name: str, lazy: nn.Module, mode: str):
        self.name, self.lazy, self.mode = name, lazy, mode
        self.kind = ""  # until read: _read_kind evaluates the library's derivative
        self.kind, self._bounds, self._tail_start = self._read_kind()

    def build(self, params: Tensor):
        from zuko.utils import unpack

        return self.lazy.univariate(*unpack(params, self.lazy.shapes))

    def _dtype(self) -> torch.dtype | None:
        return _module_dtype(self.lazy.univariate)

    def _read_kind(self) -> tuple[str, tuple[float, float] | None, float | None]:
        from zuko.transforms import AdditiveTransform, MonotonicAffineTransform, MonotonicRQSTransform

        dtype = self._dtype() or torch.float64
        u0 = self.build(torch.zeros(1, 1, self.lazy.total, dtype=dtype))
        if isinstance(u0, AdditiveTransform):
            return "additive", (1.0, 1.0), None
        if isinstance(u0, MonotonicAffineTransform):
            # c' over built objects for a sweep of raw parameters: the bounds the object allows
            lo, hi = sweep_bounds(
                lambda u: self.derivative(
                    torch.zeros(len(u), 1, dtype=dtype), u.to(dtype)[:, None, None].expand(len(u), 1, self.lazy.total)
                )
            )
            return ("additive" if lo == hi == 1.0 else affine_kind(lo)), (lo, hi), None
        if isinstance(u0, MonotonicRQSTransform):
            # knots span [-B, B] on both axes; outside, the library returns x itself (identity tails)
            bound = float(u0.horizontal[..., -1].max())
            return "rq-spline", (1.0, 1.0), bound
        return "unknown", None, None

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        if self.kind == "unknown":
            # no closed form (NAF's monotonic MLP runs in its weights' dtype, often float32): one
            # forward-mode JVP of the library's map, the same derivative whatever the precision
            try:
                return elementwise_derivative(lambda u: self.build(params)(u), x)
            except RuntimeError:  # an autograd.Function without forward-mode support (UNAF's quadrature)
                pass
        return super().derivative(x, params)

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def tail_start(self) -> float | None:
        return self._tail_start

    def own_inputs(self) -> int:
        """How many of the hyper-network's inputs come from x (the rest are the condition)."""
        if self.mode == "coupling":
            return int(self.lazy.mask.sum())
        if self.mode == "autoregressive":  # x as wide as the last layer's output / |φ|
            return int(self.lazy.hyper[-1].weight.shape[0] // self.lazy.total)
        return 0

    def inverse(self, c: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``lazy(c).inv(y)`` (the library's), with φ of the last hyper-network call: ``(x, gain, φ)``."""
        seen: list[Tensor] = []
        with hooked(self.lazy, ["hyper"], lambda name, args, kwargs, out: seen.append(out.detach())):
            transform = self.lazy(c)  # built for these conditions, as flow(c) builds it
            x = transform.inv(y)
        params = seen[-1].unflatten(-1, (-1, self.lazy.total))
        x_b = x[..., transform.idx_b] if self.mode == "coupling" else x
        gain = 1.0 / self.derivative(x_b.to(self._dtype() or x_b.dtype), params.to(self._dtype() or params.dtype))
        return x, gain.to(x.dtype), params


class SoftclipSite(_ZukoSite):
    r"""``SoftclipTransform``: :math:`c(x) = x / (1 + |x|/B)`; params (B, F, 0) only say how many points."""

    kind = "unknown"

    def __init__(self, name: str, lazy: nn.Module):
        self.name, self.lazy = name, lazy
        self.bound = float(lazy().bound)

    def build(self, params: Tensor):
        return self.lazy()

    def tail_bounds(self) -> tuple[float, float]:
        return (0.0, 1.0)  # c' = (1 + |x|/B)^-2 ∈ (0, 1]: the bounds never meet

    def tail_start(self) -> float:
        return self.bound


class PriorSite(_ZukoSite):
    r"""A condition-dependent diagonal-normal base: :math:`c(z) = (z - \mu)/\sigma`; params = stack(μ, log σ) (B, D, 2)."""

    kind = "prior"

    def __init__(self, name: str):
        self.name = name

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return (x - params[..., 0]) * torch.exp(-params[..., 1])

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        return torch.exp(-params[..., 1]).expand_as(x)


class ZukoAdapter(Adapter):
    """Adapter of a conditional ``zuko.lazy.Flow`` (see the module docstring)."""

    family = "zuko"

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__(model, name)
        from zuko.flows.autoregressive import MaskedAutoregressiveTransform
        from zuko.flows.coupling import GeneralCouplingTransform
        from zuko.flows.gaussianization import ElementWiseTransform
        from zuko.lazy import LazyComposedTransform, UnconditionalDistribution, UnconditionalTransform
        from zuko.transforms import SoftclipTransform

        names = {id(m): n for n, m in model.named_modules()}
        self._steps: list[tuple[str, nn.Module, _ZukoSite | None]] = []  # forward order
        self._unseen: list[str] = []  # conditional lazy transforms no site reads

        def walk(t: nn.Module) -> None:
            if isinstance(t, LazyComposedTransform):
                for sub in t.transforms:
                    walk(sub)
                return
            name = names[id(t)]
            site: _ZukoSite | None = None
            if isinstance(t, GeneralCouplingTransform):
                site = UnivariateSite(name, t, "coupling")
            elif isinstance(t, MaskedAutoregressiveTransform):
                site = UnivariateSite(name, t, "autoregressive")
            elif isinstance(t, ElementWiseTransform):
                if hasattr(t, "hyper"):  # without a context its φ are plain parameters: not a site
                    site = UnivariateSite(name, t, "elementwise")
            elif isinstance(t, UnconditionalTransform):
                if isinstance(t(), SoftclipTransform):
                    site = SoftclipSite(name, t)
            else:
                self._unseen.append(name)
            self._steps.append((name, t, site))

        walk(model.transform)
        self._base_name = names[id(model.base)]
        self._prior = None if isinstance(model.base, UnconditionalDistribution) else PriorSite(self._base_name)

    # -- what the model is ------------------------------------------------------
    @property
    def condition_shape(self) -> tuple[int, ...]:
        shape = getattr(self.model, "condition_shape", None)
        if shape is not None:
            return tuple(shape)
        for _, t, site in self._steps:
            if isinstance(site, UnivariateSite):
                first = next(m for m in t.hyper.modules() if isinstance(getattr(m, "weight", None), Tensor))
                width = first.weight.shape[-1]  # [x_a, c], [x, c] or c → the hyper-network
                own = site.own_inputs()
                if width > own:
                    return (width - own,)
        raise ValueError("cannot tell this zuko flow's condition shape: set `model.condition_shape = (C,)`")

    def sites(self) -> list[Site]:
        found: list[Site] = [s for _, _, s in self._steps if s is not None]
        return found + ([self._prior] if self._prior is not None else [])

    def unread(self) -> list[str]:
        """Lazy transforms of kinds this adapter does not read (they might be conditional)."""
        return list(self._unseen)

    def layer_names(self) -> list[str]:
        return [self._base_name] + [n for n, _, _ in reversed(self._steps)]

    # -- what the model does ----------------------------------------------------
    def _base(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and σ of the (diagonal normal) base for conditions ``y``, batch first."""
        base = self.model.base(y)
        while hasattr(base, "base_dist") and not hasattr(base, "loc"):  # Independent(Normal) → Normal
            base = base.base_dist
        mean, std = base.mean, base.stddev
        if not isinstance(base, torch.distributions.Normal):
            raise TypeError(f"zuko base distribution {type(base).__name__} is not supported (a diagonal normal is)")
        shape = (y.shape[0], *mean.shape[-1:])
        return mean.expand(shape), std.expand(shape)

    def sample_latents(self, y: Tensor, temperature: float, generator: torch.Generator | None) -> list[Tensor]:
        with torch.no_grad():
            mean, _ = self._base(y.to(self.device))
        eps = torch.randn(
            mean.shape, generator=generator, dtype=y.dtype, device="cpu" if generator is not None else y.device
        )
        return [temperature * eps.to(y.device)]

    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        mean, std = self._base(y)
        x = mean + std * latents[0]
        if observer is not None:
            if self._prior is not None:
                observer.site(self._prior.name, std.detach(), torch.stack([mean, std.log()], -1).detach())
            observer.layer(self._base_name, x.detach())
        for name, lazy, site in reversed(self._steps):
            if isinstance(site, UnivariateSite):
                x, gain, params = site.inverse(y, x)
                if observer is not None:
                    observer.site(name, gain.detach(), params.detach())
            else:
                x = lazy(y).inv(x)  # built for these conditions, as flow(y) builds it
                if observer is not None and isinstance(site, SoftclipSite):
                    none = x.new_empty(*x.shape, 0)  # no conditioner: params only count the points
                    observer.site(name, (1.0 / site.derivative(x, none)).detach(), none)
            if observer is not None:
                observer.layer(name, x.detach())
        return x

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        transform = self.model.transform(y)
        z, ladj = transform.call_and_ladj(x)
        mean, std = self._base(y)
        logdet = ladj.reshape(x.shape[0], -1).sum(1) - std.log().sum(1)
        return [(z - mean) / std], logdet

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        (eps,), logdet = self.forward(x, y)
        return -0.5 * (eps**2).sum(1) - 0.5 * eps.shape[1] * math.log(2 * math.pi) + logdet


def matches(model: Any) -> bool:
    """A ``zuko`` lazy flow (checked by module name: zuko is not imported here)."""
    return (
        isinstance(model, nn.Module)
        and any(c.__module__.startswith("zuko.") for c in type(model).__mro__)
        and hasattr(model, "transform")
        and hasattr(model, "base")
    )


def make(model: nn.Module, name: str | None = None) -> ZukoAdapter:
    return ZukoAdapter(model, name)
