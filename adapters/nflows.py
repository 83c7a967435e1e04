r"""Adapter for `nflows <https://github.com/bayesiains/nflows>`_ conditional flows (``nflows.flows.Flow``).

A ``Flow`` maps data to noise, :math:`z = T(x; e(y))`, with the embedded context :math:`e(y)`
(``embedding_net``, the encoder) passed to every transform and to the base. Sites, each evaluated
through the library's own code at the captured parameters :math:`\theta`:

* couplings: :math:`\theta = h(x_a, e(y))`; affine :math:`c' = s` from ``_scale_and_shift``
  (bounds swept through it, so an additive coupling reads ``additive``); an RQ spline with linear
  tails is ``rq-spline`` beyond ``tail_bound``; other couplings ``unknown``;
* autoregressive transforms: :math:`\theta_i = h(x_{<i}, e(y))`, inverted by the library's
  fixed-point iteration (the parameters of the final iterate are reported);
* inside ``InverseTransform`` (an IAF): :math:`c' = 1/c_t'`, inverted bounds;
* ``ConditionalDiagonalNormal``: :math:`c(x) = (x - \mu(y))/\sigma(y)` (``prior``).

A transform of any other class is tested by where the condition flows (:mod:`.dataflow`): conditional
and elementwise, a site through its own call; conditional otherwise, a part no site reads.

nflows calls ``inverse`` methods directly, so hooks never fire: :meth:`NflowsAdapter.sample` runs
the inverse pass transform by transform as the library does, and installs nothing on the model.
"""

from __future__ import annotations

import math
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
    fill,
    repeat_rows,
    sweep_bounds,
)
from .bounds import LayerBound, gaussian_base
from .dataflow import FlowLayerSite, found_site, probe_inputs
from .library import LibraryAdapter

__all__ = ["NflowsAdapter", "CouplingSite", "AutoregressiveSite", "InvertedSite", "matches", "make"]

# nflows modules whose transforms never read the context (permutations, linear maps, normalisation, …)
_UNCONDITIONAL = tuple(
    f"nflows.transforms.{m}"
    for m in ("permutations", "linear", "lu", "qr", "svd", "orthogonal", "normalization", "reshape", "conv")
    + ("nonlinearities", "standard")
)
Reading = tuple[str, tuple[float, float] | None, float | None]  # kind, tail bounds of c', tail start


def _affine_reading(forward, width: int, mult: int) -> Reading:
    """Kind and bounds of an affine transform from its own ``forward(x, params)``: c' = s over a sweep."""

    def scale(u: Tensor) -> Tensor:
        params = u[:, None].expand(len(u), width * mult).contiguous()
        x = torch.zeros(len(u), width, dtype=u.dtype)
        return elementwise_derivative(lambda v: forward(v, params.clone())[0], x)

    lo, hi = sweep_bounds(scale)
    return ("additive" if lo == hi == 1.0 else affine_kind(lo)), (lo, hi), None


def _spline_reading(t: nn.Module, is_rq_spline: bool) -> Reading:
    """An RQ spline with linear tails is the identity beyond ±tail_bound; anything else is ``unknown``."""
    tails, bound = getattr(t, "tails", None), getattr(t, "tail_bound", None)
    if is_rq_spline and tails == "linear":
        return "rq-spline", (1.0, 1.0), float(bound)
    return "unknown", None, (float(bound) if tails is not None and bound is not None else None)


class _TransformSite(Site):
    """A coupling or autoregressive transform; params are its conditioner's raw output."""

    batched_probe = True

    def __init__(self, name: str, module: nn.Module, reading: Reading):
        self.name, self.module = name, module
        self.kind, self._bounds, self._tail_start = reading

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def tail_start(self) -> float | None:
        return self._tail_start

    def inverse(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The library's inverse of this transform: ``(outputs, inverse gain, params)``; the gain comes from the
        evaluation that made the outputs where the step gives its log-derivative per element."""
        outputs, visited, params, *ladj = self._inverse_step(inputs, context)
        if ladj and ladj[0] is not None:
            return outputs, torch.exp(ladj[0]), params
        return outputs, 1.0 / self.derivative(visited, params), params


class CouplingSite(_TransformSite):
    """A ``CouplingTransform``; params are ``transform_net``'s output (B, n·P[, H, W])."""

    def __init__(self, name: str, t: nn.Module):
        from nflows.transforms.coupling import AffineCouplingTransform as Affine
        from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform as Spline

        reading = (
            _affine_reading(t._coupling_transform_forward, t.num_transform_features, t._transform_dim_multiplier())
            if isinstance(t, Affine)
            else _spline_reading(t, isinstance(t, Spline))
        )
        super().__init__(name, t, reading)

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], self.module.num_transform_features, *params.shape[2:])

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module._coupling_transform_forward(x, params.clone())[0]  # clone: splines rescale in place

    def inverse_map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module._coupling_transform_inverse(x, params.clone())[0]

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        if self.derivative_constant:
            return self.module._scale_and_shift(params)[0].expand_as(x)  # c' = s, the library's own scale
        if self.elementwise:
            return torch.exp(self.cdf(x, params, inverse=False)[1])  # the library's own log c', per element
        return super().derivative(x, params)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        if self.kind in AFFINE_KINDS or not self.elementwise:
            return super().derivative_at(values, params)
        return _probe_cdf(self, values, params, inverse=False)

    @property
    def derivative_constant(self) -> bool:
        """c' is the library's own scale (:meth:`derivative`), whatever x."""
        return self.kind in AFFINE_KINDS and hasattr(self.module, "_scale_and_shift")

    @property
    def elementwise(self) -> bool:
        """Whether the library's piecewise map gives its log-derivative per element (``_piecewise_cdf``, called
        by the library's own ``_coupling_transform``, which only sums it)."""
        from nflows.transforms.coupling import PiecewiseCouplingTransform as Piecewise

        t = type(self.module)
        return issubclass(t, Piecewise) and t._coupling_transform is Piecewise._coupling_transform

    def cdf(self, x: Tensor, params: Tensor, inverse: bool, own: bool = False) -> tuple[Tensor, Tensor]:
        """``_coupling_transform`` of the library before its sum: ``(outputs, log |d out / d x|)`` per element.
        The library rescales the parameters in place: they are copied first unless ``own`` (the caller's copy)."""
        params = params if own else params.clone()
        if x.dim() == 4:
            b, c, h, w = x.shape
            params = params.reshape(b, c, -1, h, w).permute(0, 1, 3, 4, 2)
        elif x.dim() == 2:
            params = params.reshape(x.shape[0], x.shape[1], -1)
        return self.module._piecewise_cdf(x, params, inverse)

    def _step(
        self, inputs: Tensor, context: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The library's ``CouplingTransform`` in either direction: ``(outputs, mapped split, params, log-derivative
        of the step per element or None)``."""
        t = self.module
        identity, split = inputs[:, t.identity_features, ...], inputs[:, t.transform_features, ...]
        if inverse and t.unconditional_transform is not None:  # not a site: unconditional
            identity, _ = t.unconditional_transform.inverse(identity, context)
        params = t.transform_net(identity, context)
        if self.elementwise:
            mapped, ladj = self.cdf(split, params, inverse)
        else:
            step = t._coupling_transform_inverse if inverse else t._coupling_transform_forward
            (mapped, _), ladj = step(inputs=split, transform_params=params.clone()), None
        if not inverse and t.unconditional_transform is not None:
            identity, _ = t.unconditional_transform(identity, context)
        outputs = torch.empty_like(inputs)
        outputs[:, t.identity_features, ...] = identity
        outputs[:, t.transform_features, ...] = mapped
        return outputs, mapped, params, ladj

    def _inverse_step(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return self._step(inputs, context, inverse=True)

    def forward_step(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return self._step(inputs, context, inverse=False)


class AutoregressiveSite(_TransformSite):
    """An ``AutoregressiveTransform``; params are ``autoregressive_net``'s output (B, F·P)."""

    def __init__(self, name: str, t: nn.Module):
        from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform as Affine
        from nflows.transforms.autoregressive import MaskedPiecewiseRationalQuadraticAutoregressiveTransform as Spline

        reading = (
            _affine_reading(t._elementwise_forward, t.features, t._output_dim_multiplier())
            if isinstance(t, Affine)
            else _spline_reading(t, isinstance(t, Spline))
        )
        super().__init__(name, t, reading)

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], params.shape[1] // self.module._output_dim_multiplier())

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module._elementwise_forward(x, params.clone())[0]

    def inverse_map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module._elementwise_inverse(x, params.clone())[0]

    @property
    def derivative_constant(self) -> bool:
        """The library's masked affine map, ``scale · x + shift``: c' is its scale, whatever x."""
        from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform as Affine

        return self.kind in AFFINE_KINDS and isinstance(self.module, Affine)

    def _inverse_step(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The library's fixed-point inverse, one pass per feature."""
        outputs, params = torch.zeros_like(inputs), None
        for _ in range(math.prod(inputs.shape[1:])):
            params = self.module.autoregressive_net(outputs, context)
            outputs, _ = self.module._elementwise_inverse(inputs, params.clone())
        return outputs, outputs, params

    def forward_step(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        params = self.module.autoregressive_net(inputs, context)
        outputs, _ = self.module._elementwise_forward(inputs, params.clone())
        return outputs, outputs, params


class InvertedSite(_TransformSite):
    r"""A transform inside ``InverseTransform``: :math:`c = c_t^{-1}`, :math:`c' = 1/c_t'`, bounds inverted."""

    def __init__(self, name: str, inner: CouplingSite | AutoregressiveSite):
        b = inner.tail_bounds()
        bounds = None if b is None else tuple(1.0 / v if v > 0 else math.inf for v in (b[1], b[0]))
        kind = affine_kind(bounds[0]) if inner.kind in ("affine", "affine-bounded") else inner.kind
        super().__init__(name, inner.module, (kind, bounds, inner.tail_start()))
        self.inner = inner

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return self.inner.input_shape(params)

    @property
    def derivative_constant(self) -> bool:
        """The inverse of an affine map is affine: c' = 1 / the inner scale, whatever x."""
        return self.inner.derivative_constant

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.inner.inverse_map(x, params)

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        if getattr(self.inner, "elementwise", False):
            return torch.exp(self.inner.cdf(x, params, inverse=True)[1])
        return super().derivative(x, params)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        if getattr(self.inner, "elementwise", False):
            return _probe_cdf(self.inner, values, params, inverse=True)
        return super().derivative_at(values, params)

    def _inverse_step(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return self.inner.forward_step(inputs, context)


def _probe_cdf(site: CouplingSite, values: Tensor, params: Tensor, inverse: bool) -> Tensor:
    """``c'`` of an elementwise coupling at every probe value and point, (V, M), as :meth:`Site.probe` gives it:
    the parameter rows repeated per value are this call's own copy, which the library may rescale in place."""
    dtype, given = site.probe_dtype(values), values.dtype
    p = site.probe_params(params, dtype)
    rows = repeat_rows(p, len(values))
    if rows.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():  # one value: a view of the kept rows
        rows = rows.clone()
    x = fill(values.to(dtype), site.input_shape(params))
    return torch.exp(site.cdf(x, rows, inverse, own=True)[1]).reshape(len(values), -1).to(given)


class NflowsAdapter(LibraryAdapter):
    """Adapter of an ``nflows.flows.Flow`` used with a ``context`` (see the module docstring)."""

    family = "nflows"

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__(model, name)
        from nflows.distributions.normal import ConditionalDiagonalNormal, DiagonalNormal, StandardNormal
        from nflows.transforms.autoregressive import AutoregressiveTransform
        from nflows.transforms.base import CompositeTransform, InverseTransform
        from nflows.transforms.coupling import CouplingTransform

        names = {id(m): n for n, m in model.named_modules()}
        self._steps: list[tuple[str, nn.Module, _TransformSite | None, bool]] = []  # forward order; inverted?
        self._unseen = []

        def walk(t: nn.Module, inverted: bool = False) -> None:
            """Leaves in forward order; inside an ``InverseTransform`` the order and direction flip."""
            if isinstance(t, CompositeTransform):
                for sub in reversed(t._transforms) if inverted else t._transforms:
                    walk(sub, inverted)
            elif isinstance(t, InverseTransform):
                walk(t._transform, not inverted)
            else:
                name, site = names[id(t)], None
                if isinstance(t, CouplingTransform):
                    site = CouplingSite(name, t)
                elif isinstance(t, AutoregressiveTransform):
                    site = AutoregressiveSite(name, t)
                elif not type(t).__module__.startswith(_UNCONDITIONAL):
                    self._unseen.append(name)  # a transform of unknown code: it may read the context
                self._steps.append((name, t, InvertedSite(name, site) if site and inverted else site, inverted))

        walk(model._transform)
        base = model._distribution
        if not isinstance(base, (StandardNormal, DiagonalNormal, ConditionalDiagonalNormal)):
            raise TypeError(
                f"nflows base distribution {type(base).__name__} is not supported "
                "(StandardNormal, DiagonalNormal, ConditionalDiagonalNormal)"
            )
        self._sites = [s for _, _, s, _ in self._steps if s is not None]
        self._prior = PriorSite(names[id(base)]) if isinstance(base, ConditionalDiagonalNormal) else None
        self._layers = [names[id(base)]] + [n for n, _, _, _ in reversed(self._steps)]
        self._latent_shapes = [tuple(base._shape)]
        self._find_from_data_flow()

    def _find_from_data_flow(self) -> None:
        """Every transform no class reading made a site, tested on one seeded inverse pass by where the
        condition flows (:mod:`.dataflow`): conditional and elementwise, a site; unconditional, not a part no
        site reads. Without a readable condition shape the class reading stands."""
        try:
            shape = self.condition_shape
        except ValueError:
            return
        y, x = probe_inputs(self.model, [shape, self._latent_shapes[0]])
        with torch.no_grad():
            context = self.model._embedding_net(y)
            base = self._base(context)
            x = x if base is None else base[0] + torch.exp(base[1]) * x
            for i in reversed(range(len(self._steps))):
                name, t, site, inverted = self._steps[i]
                if site is not None:
                    x = site.inverse(x, context)[0]
                    continue
                fwd = lambda u, c, t=t: t(u, c)[0]  # noqa: E731
                inv = lambda u, c, t=t: t.inverse(u, c)[0]  # noqa: E731
                encode, decode = (inv, fwd) if inverted else (fwd, inv)
                x = decode(x, context)
                got = found_site(name, t, encode, decode, x, context)
                if isinstance(got, FlowLayerSite):
                    self._steps[i] = (name, t, got, inverted)
                if got is not True and name in self._unseen:
                    self._unseen.remove(name)
                elif got is True and name not in self._unseen:
                    self._unseen.append(name)
        self._sites = [s for _, _, s, _ in self._steps if s is not None]

    def _read_condition_shape(self) -> tuple[int, ...]:
        emb = self.encoder()
        first = next((m for m in emb.modules() if isinstance(m, nn.Linear)), None) if emb is not None else None
        if first is not None:  # the encoder's first linear layer reads the condition
            return (first.in_features,)
        for n, m in self.model.named_modules():  # nflows' nets store the context width (ResidualNet, MADE)
            width = getattr(m, "context_features", None)
            if isinstance(width, int):
                return (width,)
        for n, m in self.model.named_modules():
            if n.endswith("context_layer") and isinstance(m, nn.Linear):
                return (m.in_features,)
        return super()._read_condition_shape()

    def encoder(self) -> nn.Module | None:
        emb = self.model._embedding_net
        return None if isinstance(emb, nn.Identity) else emb

    def feature_layers(self) -> list[str]:
        return [] if self.encoder() is None else ["_embedding_net"]

    def encode(self, y: Tensor) -> None:
        self.model._embedding_net(y)

    def _base(self, context: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """(mean, log σ) of the base, batch first where conditional; ``None`` for a standard normal."""
        base, shape = self.model._distribution, self._latent_shapes[0]
        if self._prior is not None:
            return base._compute_params(context)
        if hasattr(base, "log_std_"):  # DiagonalNormal
            return base.mean_.reshape(1, *shape), base.log_std_.reshape(1, *shape)
        return None

    def _base_bound(self, name: str) -> LayerBound:
        base = self._base(None)
        return gaussian_base(name, *(base or (None, None)))

    def _runs_forward(self, name: str) -> bool:
        return any(n == name and inverted for n, _, _, inverted in self._steps)

    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        context = self.model._embedding_net(y)
        x, base = latents[0], self._base(context)
        if base is not None:
            x = base[0] + torch.exp(base[1]) * x
        self._report_base(observer, x, *(base or ()))
        for name, t, site, inverted in reversed(self._steps):
            if site is None:
                x, _ = t(x, context) if inverted else t.inverse(x, context)
                self._report(observer, name, x)
            else:
                x, gain, params = site.inverse(x, context)
                self._report(observer, name, x, gain, params)
        return x

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        context = self.model._embedding_net(y)
        z, logdet = self.model._transform(x, context=context)
        base = self._base(context)
        if base is not None:
            mean, log_std = base
            z = (z - mean) * torch.exp(-log_std)
            logdet = logdet - log_std.expand_as(z).flatten(1).sum(1)
        return [z], logdet


def matches(model: Any) -> bool:
    """An ``nflows.flows.*`` flow (checked by module name: nflows is not imported here)."""
    return (
        isinstance(model, nn.Module)
        and any(c.__module__.startswith("nflows.flows") for c in type(model).__mro__)
        and hasattr(model, "_transform")
    )


def make(model: nn.Module, name: str | None = None) -> NflowsAdapter:
    return NflowsAdapter(model, name)
