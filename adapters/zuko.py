r"""Adapter for `zuko <https://github.com/probabilists/zuko>`_ conditional flows (``zuko.lazy.Flow``).

A zuko flow is lazy: ``flow(c)`` builds the transform :math:`z = T(x; c)` for that condition. The
sites are the lazy transforms with a hyper-network: a coupling (:math:`\phi = h(x_a, c)` maps
:math:`x_b`), a masked autoregressive transform (:math:`\phi_i = h(x_{<i}, c)`) and a conditional
``ElementWiseTransform`` (:math:`\phi = h(c)`); params are the raw :math:`\phi` at the visited
points. The univariate map is built from :math:`\phi` as the library does and :math:`c'` is its
own ``call_and_ladj``:

* ``MonotonicAffineTransform``: :math:`c' \in (s, 1/s)`, bounds read from built objects over a
  sweep of :math:`\phi` (``affine`` or ``affine-bounded``); ``AdditiveTransform``: ``additive``;
* ``MonotonicRQSTransform``: the identity outside its knots' :math:`[-B, B]` (``rq-spline``);
* anything else (NAF, UNAF, SOSPF, BPF): ``unknown``, :math:`c'` by a forward-mode JVP;
* ``SoftclipTransform`` (NAF): :math:`c(x) = x / (1 + |x|/B)`, whose inverse blows up as
  :math:`|y| \to B`: no conditioner, but where a sample explodes, so a site (``unknown``).

A lazy transform of any other class is tested by where the condition flows (:mod:`.dataflow`):
conditional and elementwise, a site through its own call; conditional otherwise, a part no site reads.

:meth:`ZukoAdapter.sample` runs the built inverse transform by transform and reads :math:`\phi`
with a forward hook on each hyper-network, removed on exit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    AFFINE_KINDS,
    Observer,
    PriorSite,
    Site,
    affine_kind,
    elementwise_derivative,
    keeps_graph,
    sweep_bounds,
)
from .bounds import LayerBound, gaussian_base, unbounded
from .dataflow import FlowLayerSite, found_site, probe_inputs
from .hooks import hooked
from .library import LibraryAdapter

__all__ = ["ZukoAdapter", "UnivariateSite", "SoftclipSite", "matches", "make"]


class _ZukoSite(Site):
    """A site whose map is the transform ``build(params)`` returns; params (B, n, P)."""

    batched_probe = True
    lazy: nn.Module

    def build(self, params: Tensor):
        return self.lazy()

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return tuple(params.shape[:2])

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.build(params)(x)

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        return self.derivative_of(self.build(params), x)

    def derivative_of(self, built, x: Tensor) -> Tensor:
        """``c'`` of a built univariate at ``x``: the library's own log |c'|."""
        return built.call_and_ladj(x)[1].exp().expand_as(x)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        """``c'(v)`` for every probe value at every point: the map built once from ``params`` (B, n, P) and
        evaluated at (V, B, n) by broadcasting, as zuko's transforms broadcast their parameters; (V, B·n)."""
        dtype, given = self.probe_dtype(values), values.dtype
        x = values.to(dtype).reshape(-1, 1, 1).expand(len(values), *self.input_shape(params))
        built = self.build(self.probe_params(params, dtype))
        return self.derivative_of(built, x).reshape(len(values), -1).to(given)


class UnivariateSite(_ZukoSite):
    """A coupling, masked autoregressive or conditional element-wise lazy transform (``mode``)."""

    def __init__(self, name: str, lazy: nn.Module, mode: str):
        self.name, self.lazy, self.mode = name, lazy, mode
        self.kind = ""  # until read: reading the kind evaluates the library's derivative
        self.kind, self._bounds, self._tail_start = self._read_kind()

    def build(self, params: Tensor):
        from zuko.utils import unpack

        return self.lazy.univariate(*unpack(params, self.lazy.shapes))

    def probe_dtype(self, values: Tensor) -> torch.dtype:
        """A univariate with weights (NAF's monotonic MLP) runs in its weights' dtype."""
        u = self.lazy.univariate
        p = next(iter(u.parameters()), None) if isinstance(u, nn.Module) else None
        return p.dtype if p is not None else values.dtype

    def _read_kind(self) -> tuple[str, tuple[float, float] | None, float | None]:
        from zuko.transforms import AdditiveTransform, MonotonicAffineTransform, MonotonicRQSTransform

        dtype, total = self.probe_dtype(torch.zeros((), dtype=torch.float64)), self.lazy.total
        u0 = self.build(torch.zeros(1, 1, total, dtype=dtype))
        if isinstance(u0, AdditiveTransform):
            return "additive", (1.0, 1.0), None
        if isinstance(u0, MonotonicAffineTransform):  # c' over built objects for a sweep of raw parameters
            x0 = lambda u: torch.zeros(len(u), 1, dtype=dtype)  # noqa: E731
            lo, hi = sweep_bounds(lambda u: self.derivative(x0(u), u.to(dtype)[:, None, None].expand(len(u), 1, total)))
            return ("additive" if lo == hi == 1.0 else affine_kind(lo)), (lo, hi), None
        if isinstance(u0, MonotonicRQSTransform):  # knots span [-B, B]; outside, the identity
            return "rq-spline", (1.0, 1.0), float(u0.horizontal[..., -1].max())
        return "unknown", None, None

    def derivative_of(self, built, x: Tensor) -> Tensor:
        if self.kind == "unknown":  # no closed form: one forward-mode JVP of the library's map
            try:
                return elementwise_derivative(built, x, forward=True)
            except RuntimeError:  # an autograd.Function without forward-mode support (UNAF's quadrature)
                pass
        return super().derivative_of(built, x)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        if self.kind == "unknown":  # a JVP through a map with weights: one block of values at a time
            return Site.derivative_at(self, values, params)
        return super().derivative_at(values, params)

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def tail_start(self) -> float | None:
        return self._tail_start

    @property
    def derivative_constant(self) -> bool:
        """An affine or additive univariate: c' is the library's own log-scale, whatever x."""
        return self.kind in AFFINE_KINDS

    def own_inputs(self) -> int:
        """How many of the hyper-network's inputs come from x (the rest are the condition)."""
        if self.mode == "coupling":
            return int(self.lazy.mask.sum())
        if self.mode == "autoregressive":  # x as wide as the last layer's output / |φ|
            return int(self.lazy.hyper[-1].weight.shape[0] // self.lazy.total)
        return 0

    def inverse(self, c: Tensor, y: Tensor, keep: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``lazy(c).inv(y)`` (the library's), with φ of the last hyper-network call: ``(x, gain, φ)``; with
        ``keep`` φ, and so the gain, stay attached to the graph (the attack differentiates them)."""
        seen: list[Tensor] = []
        with hooked(self.lazy, ["hyper"], lambda name, args, kwargs, out: seen.append(out if keep else out.detach())):
            transform = self.lazy(c)  # built for these conditions, as flow(c) builds it
            built = _recording(transform)
            x = transform.inv(y)
        params = seen[-1].unflatten(-1, (-1, self.lazy.total))
        x_b = x[..., transform.idx_b] if self.mode == "coupling" else x
        dtype = self.probe_dtype(x_b)
        if dtype != x_b.dtype:  # a univariate with weights of another dtype: built again in theirs
            return x, (1.0 / self.derivative(x_b.to(dtype), params.to(dtype))).to(x.dtype), params
        from zuko.transforms import DependentTransform

        univariate = built[-1] if built else transform  # the map that produced x_b (a coupling's last meta call)
        if isinstance(univariate, DependentTransform):
            univariate = univariate.base
        return x, 1.0 / self.derivative_of(univariate, x_b), params


class SoftclipSite(_ZukoSite):
    r"""``SoftclipTransform``: :math:`c(x) = x / (1 + |x|/B)`; params (B, F, 0) only count the points."""

    kind = "unknown"

    def __init__(self, name: str, lazy: nn.Module):
        self.name, self.lazy = name, lazy
        self.bound = float(lazy().bound)

    def tail_bounds(self) -> tuple[float, float]:
        return (0.0, 1.0)  # c' = (1 + |x|/B)^-2 ∈ (0, 1]: the bounds never meet

    def tail_start(self) -> float:
        return self.bound


class ZukoAdapter(LibraryAdapter):
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
        self._unseen = []

        def walk(t: nn.Module) -> None:
            if isinstance(t, LazyComposedTransform):
                for sub in t.transforms:
                    walk(sub)
                return
            name, site = names[id(t)], None
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
        base_name = names[id(model.base)]
        self._sites = [s for _, _, s in self._steps if s is not None]
        self._prior = None if isinstance(model.base, UnconditionalDistribution) else PriorSite(base_name)
        self._layers = [base_name] + [n for n, _, _ in reversed(self._steps)]
        self._find_from_data_flow()

    def _find_from_data_flow(self) -> None:
        """Every lazy transform without a site read from its class, tested on one seeded inverse pass by where
        the condition flows (:mod:`.dataflow`): conditional and elementwise, a site; unconditional, not a part
        no site reads. Without a readable condition shape the class reading stands."""
        try:
            shape = self.condition_shape
            (y,) = probe_inputs(self.model, [shape])
            with torch.no_grad():
                mean, std = self._base(y)
        except (ValueError, TypeError, RuntimeError):
            return
        (eps,) = probe_inputs(self.model, [tuple(mean.shape[1:])])
        with torch.no_grad():
            x = mean + std * eps
            for i in reversed(range(len(self._steps))):
                name, lazy, site = self._steps[i]
                if isinstance(site, UnivariateSite):
                    x = site.inverse(y, x)[0]
                    continue
                x = lazy(y).inv(x)
                if site is not None:
                    continue
                encode = lambda u, c, t=lazy: t(c)(u)  # noqa: E731
                decode = lambda u, c, t=lazy: t(c).inv(u)  # noqa: E731
                got = found_site(name, lazy, encode, decode, x, y)
                if isinstance(got, FlowLayerSite):
                    self._steps[i] = (name, lazy, got)
                if got is not True and name in self._unseen:
                    self._unseen.remove(name)
                elif got is True and name not in self._unseen:
                    self._unseen.append(name)
        self._sites = [s for _, _, s in self._steps if s is not None]

    def _read_condition_shape(self) -> tuple[int, ...]:
        for _, t, site in self._steps:
            if isinstance(site, UnivariateSite):
                first = next(m for m in t.hyper.modules() if isinstance(getattr(m, "weight", None), Tensor))
                width, own = first.weight.shape[-1], site.own_inputs()  # [x_a, c], [x, c] or c → the hyper-network
                if width > own:
                    return (width - own,)
        return super()._read_condition_shape()

    def _base(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and σ of the (diagonal normal) base for conditions ``y``, batch first."""
        base = self.model.base(y)
        while hasattr(base, "base_dist") and not hasattr(base, "loc"):  # Independent(Normal) → Normal
            base = base.base_dist
        if not isinstance(base, torch.distributions.Normal):
            raise TypeError(f"zuko base distribution {type(base).__name__} is not supported (a diagonal normal is)")
        mean, std = base.mean, base.stddev
        shape = (y.shape[0], *mean.shape[-1:])
        return mean.expand(shape), std.expand(shape)

    def _base_bound(self, name: str) -> LayerBound:
        base = self.model.base()
        while hasattr(base, "base_dist") and not hasattr(base, "loc"):  # Independent(Normal) → Normal
            base = base.base_dist
        if not isinstance(base, torch.distributions.Normal):
            return unbounded(name, "base", f"zuko base {type(base).__name__} is not a diagonal normal")
        return gaussian_base(name, base.mean, base.stddev.log())

    def latent_shapes(self, y: Tensor) -> list[tuple[int, ...]]:
        key = tuple(y.shape[1:])
        if getattr(self, "_latents_for", None) != key:  # the base's event shape, read off one evaluation a shape
            with torch.no_grad():
                self._latent_shapes = [tuple(self._base(y[:1].to(self.device))[0].shape[1:])]
            self._latents_for = key
        return super().latent_shapes(y)

    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        mean, std = self._base(y)
        x = mean + std * latents[0]
        self._report_base(observer, x, mean, std.log())
        for name, lazy, site in reversed(self._steps):
            if isinstance(site, UnivariateSite):
                x, gain, params = site.inverse(y, x, keeps_graph(observer))
                self._report(observer, name, x, gain, params)
            elif isinstance(site, FlowLayerSite):
                x, gain, params = site.inverse(x, y)
                self._report(observer, name, x, gain, params)
            else:
                x = lazy(y).inv(x)  # built for these conditions, as flow(y) builds it
                none = x.new_empty(*x.shape, 0)  # a soft clip has no conditioner: params only count the points
                soft = observer is not None and isinstance(site, SoftclipSite)
                gain = 1.0 / site.derivative(x, none) if soft else None
                self._report(observer, name, x, gain, none)
        return x

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        z, ladj = self.model.transform(y).call_and_ladj(x)
        mean, std = self._base(y)
        return [(z - mean) / std], ladj.reshape(x.shape[0], -1).sum(1) - std.log().sum(1)


def _recording(transform: Any) -> list[Any]:
    """The univariate maps ``transform``'s ``meta`` builds from here on (a coupling's or an autoregressive
    transform's, one per call; an element-wise transform has none and is its own map), so that c' is read
    from the very map that made the sample rather than from a second build of it."""
    built: list[Any] = []
    meta = getattr(transform, "meta", None)
    if callable(meta):

        def record(*args: Any, **kwargs: Any) -> Any:
            out = meta(*args, **kwargs)
            built.append(out)
            return out

        transform.meta = record  # this built transform's own attribute, not the model's
    return built


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
