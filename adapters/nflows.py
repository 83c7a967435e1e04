r"""Adapter for `nflows <https://github.com/bayesiains/nflows>`_ conditional flows (``nflows.flows.Flow``).

An nflows ``Flow`` maps data to noise, :math:`z = T(x; e(y))`, through a
``CompositeTransform`` of transforms, with the embedded context
:math:`e(y)` (``embedding_net``, the conditioning encoder when it is not the
identity) passed to every transform and to the base distribution.

Sites (conditional elementwise maps :math:`c(x; \theta)` whose parameters
:math:`\theta` a conditioner produced):

* **couplings** (``CouplingTransform`` subclasses): :math:`\theta = h(x_a, e(y))`
  from ``transform_net`` on the identity split, :math:`c` acts on the
  transform split. ``AffineCouplingTransform``: :math:`c(x) = s x + t`,
  :math:`c' = s` with :math:`s` from the live ``_scale_and_shift`` (nflows
  0.14: :math:`\sigma(u + 2) + 10^{-3}`); its bounds are read by sweeping
  :math:`u` through that method, so ``AdditiveCouplingTransform``
  (:math:`s \equiv 1`) reads as ``additive``. The piecewise
  rational-quadratic coupling with ``tails="linear"`` is the identity beyond
  ``tail_bound`` (``rq-spline``). Other couplings are ``unknown``.
* **autoregressive transforms** (``AutoregressiveTransform`` subclasses): given
  the inputs before it, each element's map is elementwise with
  :math:`\theta_i = h(x_{<i}, e(y))` from ``autoregressive_net``. The inverse
  is the library's fixed-point iteration (one pass per feature); the
  parameters reported are those of the final iterate.
* transforms inside ``InverseTransform`` (an IAF): the flow's map is the wrapped
  transform's inverse, :math:`c' = 1/c_t'` with inverted bounds; sampling runs the
  wrapped transform's forward.
* the **conditional prior** ``ConditionalDiagonalNormal``: forward
  :math:`c(x) = (x - \mu(y)) / \sigma(y)`, :math:`c' = 1/\sigma`, inverse gain
  :math:`\sigma` (kind ``prior``).

Every site's :math:`c'` is taken from the library's own code evaluated at the
captured :math:`\theta`: the affine scale from ``_scale_and_shift``, other maps
by a forward-mode JVP of the library's forward elementwise map (the Jacobian
of an elementwise map is diagonal). Nothing is re-implemented.

nflows' ``inverse`` calls ``inverse`` methods directly, so module hooks never
fire: :meth:`NflowsAdapter.sample` drives the inverse pass itself, transform
by transform, mirroring the library's own ``inverse`` code (the conformance
test checks it equals the library's sampling for the same latents). It
installs nothing on the model.

Latents are standard-normal :math:`\varepsilon` (times the temperature); the
base maps them to :math:`z` (``StandardNormal``: :math:`z = \varepsilon`;
``DiagonalNormal``/``ConditionalDiagonalNormal``: :math:`\mu + \sigma\varepsilon`).
``forward`` returns :math:`\varepsilon` and the log-det including the base's
:math:`-\sum\log\sigma`, so ``log N(ε; 0, I) + logdet = log q(x | y)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Adapter, Observer, Site, affine_kind, elementwise_derivative, sweep_bounds

__all__ = ["NflowsAdapter", "CouplingSite", "AutoregressiveSite", "InvertedSite", "PriorSite", "matches", "make"]


# nflows modules whose transforms never read the context (permutations, linear maps, normalisation, reshapes, …).
_UNCONDITIONAL = tuple(
    f"nflows.transforms.{m}"
    for m in (
        "permutations",
        "linear",
        "lu",
        "qr",
        "svd",
        "orthogonal",
        "normalization",
        "reshape",
        "conv",
        "nonlinearities",
        "standard",
    )
)


def _repeat_rows(t: Tensor, v: int) -> Tensor:
    """``t`` (B, ...) stacked ``v`` times along the batch: (v·B, ...)."""
    return t.unsqueeze(0).expand(v, *t.shape).reshape(v * t.shape[0], *t.shape[1:])


def _fill(values: Tensor, shape: tuple[int, ...]) -> Tensor:
    """(V·B, ...) inputs, block ``k`` filled with ``values[k]``; ``shape`` is (B, ...)."""
    v = values.reshape(-1, *([1] * len(shape)))
    return v.expand(len(values), *shape).reshape(len(values) * shape[0], *shape[1:])


Reading = tuple[str, tuple[float, float] | None, float | None]  # kind, tail bounds of c', tail start


def _affine_reading(forward, width: int, mult: int) -> Reading:
    """Kind and bounds of an affine-type transform whose ``forward(x, params) -> (y, logdet)`` is the live
    object's own: c' = s over a sweep of raw parameters, whatever the version's scale function."""

    def scale(u: Tensor) -> Tensor:
        params = u[:, None].expand(len(u), width * mult).contiguous()
        return elementwise_derivative(
            lambda x: forward(x, params.clone())[0], torch.zeros(len(u), width, dtype=u.dtype)
        )

    lo, hi = sweep_bounds(scale)
    return ("additive" if lo == hi == 1.0 else affine_kind(lo)), (lo, hi), None


def _spline_reading(t: nn.Module, is_rq_spline: bool) -> Reading:
    """An RQ spline with linear tails is the identity beyond ±tail_bound (nflows pins the boundary
    derivatives to 1); anything else is of unknown kind, with its tail bound when it has one."""
    tails, bound = getattr(t, "tails", None), getattr(t, "tail_bound", None)
    if is_rq_spline and tails == "linear":
        return "rq-spline", (1.0, 1.0), float(bound)
    return "unknown", None, (float(bound) if tails is not None and bound is not None else None)


class _NflowsSite(Site):
    """Common part: probe evaluation at (V, M) from an elementwise ``derivative(x, params)``/``map(x, params)``."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    # subclasses: the shape of the site's inputs for params (B, ...), and the elementwise map / derivative
    def _input_shape(self, params: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        raise NotImplementedError

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        return elementwise_derivative(lambda u: self.map(u, params), x)

    def _probe(self, values: Tensor, params: Tensor, fn) -> Tensor:
        p = params.to(values.dtype)
        shape = self._input_shape(p)
        out = fn(_fill(values, shape), _repeat_rows(p, len(values)))
        return out.reshape(len(values), -1)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        return self._probe(values, params, self.derivative)

    def map_at(self, values: Tensor, params: Tensor) -> Tensor:
        return self._probe(values, params, self.map)


class CouplingSite(_NflowsSite):
    """An nflows ``CouplingTransform``; params are ``transform_net``'s raw output (B, n·P[, H, W])."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.kind, self._bounds, self._tail_start = self._read_kind(module)

    @staticmethod
    def _read_kind(t: nn.Module) -> tuple[str, tuple[float, float] | None, float | None]:
        from nflows.transforms.coupling import AffineCouplingTransform, PiecewiseRationalQuadraticCouplingTransform

        if isinstance(t, AffineCouplingTransform):
            # whatever this nflows version's scale function is: sigmoid(u + 2) + 1e-3 in 0.14
            return _affine_reading(
                t._coupling_transform_forward, t.num_transform_features, t._transform_dim_multiplier()
            )
        return _spline_reading(t, isinstance(t, PiecewiseRationalQuadraticCouplingTransform))

    def _input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], self.module.num_transform_features, *params.shape[2:])

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        # clone: nflows' spline code rescales its slice of the parameters in place
        return self.module._coupling_transform_forward(x, params.clone())[0]

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        if self.kind in ("affine", "affine-bounded", "additive") and hasattr(self.module, "_scale_and_shift"):
            scale, _ = self.module._scale_and_shift(params)  # c' = s, the library's own scale
            return scale.expand_as(x)
        return super().derivative(x, params)

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def tail_start(self) -> float | None:
        return self._tail_start

    def inverse(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The library's ``CouplingTransform.inverse``, step by step: ``(outputs, inverse gain, params)``."""
        t = self.module
        identity_split = inputs[:, t.identity_features, ...]
        transform_split = inputs[:, t.transform_features, ...]
        if t.unconditional_transform is not None:  # unconditional map of the identity split (not a site)
            identity_split, _ = t.unconditional_transform.inverse(identity_split, context)
        params = t.transform_net(identity_split, context)
        x_b, _ = t._coupling_transform_inverse(inputs=transform_split, transform_params=params.clone())
        outputs = torch.empty_like(inputs)
        outputs[:, t.identity_features] = identity_split
        outputs[:, t.transform_features] = x_b
        return outputs, 1.0 / self.derivative(x_b, params), params

    def forward_step(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The library's ``CouplingTransform.forward``: ``(outputs, transformed split's input, params)``."""
        t = self.module
        identity_split = inputs[:, t.identity_features, ...]
        transform_split = inputs[:, t.transform_features, ...]
        params = t.transform_net(identity_split, context)
        y_b, _ = t._coupling_transform_forward(inputs=transform_split, transform_params=params.clone())
        if t.unconditional_transform is not None:
            identity_split, _ = t.unconditional_transform(identity_split, context)
        outputs = torch.empty_like(inputs)
        outputs[:, t.identity_features, ...] = identity_split
        outputs[:, t.transform_features, ...] = y_b
        return outputs, y_b, params

    def inverse_map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module._coupling_transform_inverse(x, params.clone())[0]


class AutoregressiveSite(_NflowsSite):
    """An nflows ``AutoregressiveTransform``; params are ``autoregressive_net``'s raw output (B, F·P)."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.kind, self._bounds, self._tail_start = self._read_kind(module)

    @staticmethod
    def _read_kind(t: nn.Module) -> tuple[str, tuple[float, float] | None, float | None]:
        from nflows.transforms.autoregressive import (
            MaskedAffineAutoregressiveTransform,
            MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        )

        if isinstance(t, MaskedAffineAutoregressiveTransform):
            # the scale function is inline in _elementwise_forward (softplus(u) + 1e-3 in 0.14)
            return _affine_reading(t._elementwise_forward, t.features, t._output_dim_multiplier())
        return _spline_reading(t, isinstance(t, MaskedPiecewiseRationalQuadraticAutoregressiveTransform))

    def _input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], params.shape[1] // self.module._output_dim_multiplier())

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module._elementwise_forward(x, params.clone())[0]

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def tail_start(self) -> float | None:
        return self._tail_start

    def inverse(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The library's fixed-point inverse (one pass per feature); params of the final iterate."""
        t = self.module
        outputs = torch.zeros_like(inputs)
        params = None
        for _ in range(math.prod(inputs.shape[1:])):
            params = t.autoregressive_net(outputs, context)
            outputs, _ = t._elementwise_inverse(inputs, params.clone())
        return outputs, 1.0 / self.derivative(outputs, params), params

    def forward_step(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The library's ``AutoregressiveTransform.forward`` (one pass): ``(outputs, outputs, params)``."""
        params = self.module.autoregressive_net(inputs, context)
        outputs, _ = self.module._elementwise_forward(inputs, params.clone())
        return outputs, outputs, params

    def inverse_map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.module._elementwise_inverse(x, params.clone())[0]


class InvertedSite(_NflowsSite):
    r"""A coupling or autoregressive transform inside ``InverseTransform`` (e.g. an IAF).

    The flow's forward map is the wrapped transform's inverse, :math:`c = c_t^{-1}`, so
    :math:`c' = 1 / c_t'`; sampling runs the wrapped transform's forward. Affine bounds invert
    (nflows' sigmoid scale :math:`(10^{-3}, 1.001)` becomes :math:`(0.999, 1000)`); identity tails
    stay identity tails from the same bound.
    """

    def __init__(self, name: str, inner: CouplingSite | AutoregressiveSite):
        super().__init__(name, inner.module)
        self.inner = inner
        b = inner.tail_bounds()
        self._bounds = (
            None if b is None else (1.0 / b[1] if b[1] > 0 else math.inf, 1.0 / b[0] if b[0] > 0 else math.inf)
        )
        self.kind = affine_kind(self._bounds[0]) if inner.kind in ("affine", "affine-bounded") else inner.kind

    def _input_shape(self, params: Tensor) -> tuple[int, ...]:
        return self.inner._input_shape(params)

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self.inner.inverse_map(x, params)

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def tail_start(self) -> float | None:
        return self.inner.tail_start()

    def inverse(self, inputs: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        outputs, visited, params = self.inner.forward_step(inputs, context)
        return outputs, 1.0 / self.derivative(visited, params), params


class PriorSite(_NflowsSite):
    r"""``ConditionalDiagonalNormal``: :math:`c(x) = (x - \mu)/\sigma`; params = cat(μ, log σ) along dim 1."""

    kind = "prior"

    def _input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], params.shape[1] // 2, *params.shape[2:])

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        mean, log_std = params.chunk(2, dim=1)
        return (x - mean) * torch.exp(-log_std)

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        return torch.exp(-params.chunk(2, dim=1)[1]).expand_as(x)

    def params(self, context: Tensor) -> Tensor:
        means, log_stds = self.module._compute_params(context)
        return torch.cat([means, log_stds], dim=1)


class NflowsAdapter(Adapter):
    """Adapter of an ``nflows.flows.Flow`` used with a ``context`` (see the module docstring)."""

    family = "nflows"

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__(model, name)
        from nflows.distributions.normal import ConditionalDiagonalNormal, DiagonalNormal, StandardNormal
        from nflows.transforms.autoregressive import AutoregressiveTransform
        from nflows.transforms.base import CompositeTransform, InverseTransform
        from nflows.transforms.coupling import CouplingTransform

        names = {id(m): n for n, m in model.named_modules()}
        self._steps: list[tuple[str, nn.Module, _NflowsSite | None, bool]] = []  # forward order; inverted?
        self._unseen: list[str] = []

        def walk(t: nn.Module, inverted: bool = False) -> None:
            """Leaves in forward order; inside an ``InverseTransform`` the order and direction flip."""
            if isinstance(t, CompositeTransform):
                for sub in reversed(t._transforms) if inverted else t._transforms:
                    walk(sub, inverted)
                return
            if isinstance(t, InverseTransform):
                walk(t._transform, not inverted)
                return
            name = names[id(t)]
            if not isinstance(t, (CouplingTransform, AutoregressiveTransform)) and not type(t).__module__.startswith(
                _UNCONDITIONAL
            ):
                self._unseen.append(name)  # a transform of unknown code: it may read the context
            site = (
                CouplingSite(name, t)
                if isinstance(t, CouplingTransform)
                else AutoregressiveSite(name, t)
                if isinstance(t, AutoregressiveTransform)
                else None
            )
            if site is not None and inverted:
                site = InvertedSite(name, site)
            self._steps.append((name, t, site, inverted))

        walk(model._transform)
        base = model._distribution
        if not isinstance(base, (StandardNormal, DiagonalNormal, ConditionalDiagonalNormal)):
            raise TypeError(
                f"nflows base distribution {type(base).__name__} is not supported (StandardNormal, DiagonalNormal, ConditionalDiagonalNormal)"
            )
        self._base_name = names[id(base)]
        self._prior = PriorSite(self._base_name, base) if isinstance(base, ConditionalDiagonalNormal) else None
        self._event_shape = tuple(base._shape)

    # -- what the model is ------------------------------------------------------
    @property
    def condition_shape(self) -> tuple[int, ...]:
        shape = getattr(self.model, "condition_shape", None)
        if shape is not None:
            return tuple(shape)
        emb = self.model._embedding_net
        if not isinstance(emb, nn.Identity):  # the encoder's first linear layer reads the condition
            first = next((m for m in emb.modules() if isinstance(m, nn.Linear)), None)
            if first is not None:
                return (first.in_features,)
        for m in self.model.modules():  # nflows' nets store the context width (ResidualNet, MADE)
            width = getattr(m, "context_features", None)
            if isinstance(width, int):
                return (width,)
        for n, m in self.model.named_modules():
            if n.endswith("context_layer") and isinstance(m, nn.Linear):
                return (m.in_features,)
        raise ValueError("cannot tell this nflows flow's condition shape: set `model.condition_shape = (C,)`")

    def sites(self) -> list[Site]:
        found: list[Site] = [s for _, _, s, _ in self._steps if s is not None]
        return found + ([self._prior] if self._prior is not None else [])

    def unread(self) -> list[str]:
        """Transforms of unknown code (not nflows' unconditional ones): they might be conditional."""
        return list(self._unseen)

    def encoder(self) -> nn.Module | None:
        emb = self.model._embedding_net
        return None if isinstance(emb, nn.Identity) else emb

    def feature_layers(self) -> list[str]:
        return [] if self.encoder() is None else ["_embedding_net"]

    def encode(self, y: Tensor) -> None:
        self.model._embedding_net(y)

    def layer_names(self) -> list[str]:
        return [self._base_name] + [n for n, _, _, _ in reversed(self._steps)]

    # -- what the model does ----------------------------------------------------
    def sample_latents(self, y: Tensor, temperature: float, generator: torch.Generator | None) -> list[Tensor]:
        eps = torch.randn(
            (y.shape[0], *self._event_shape),
            generator=generator,
            dtype=y.dtype,
            device=y.device if generator is None else "cpu",
        )
        return [temperature * eps.to(y.device)]

    def _base_params(self, context: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """(mean, log σ) of the base, batch first where conditional; None for a standard normal."""
        from nflows.distributions.normal import DiagonalNormal

        base = self.model._distribution
        if self._prior is not None:
            return base._compute_params(context)
        if isinstance(base, DiagonalNormal):
            return base.mean_.reshape(1, *self._event_shape), base.log_std_.reshape(1, *self._event_shape)
        return None

    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        context = self.model._embedding_net(y)
        x = latents[0]
        base = self._base_params(context)
        if base is not None:
            mean, log_std = base
            x = mean + torch.exp(log_std) * x
            if observer is not None:
                if self._prior is not None:
                    observer.site(
                        self._prior.name,
                        torch.exp(log_std).expand_as(x).detach(),
                        torch.cat([mean, log_std], dim=1).detach(),
                    )
        if observer is not None:
            observer.layer(self._base_name, x.detach())
        for name, t, site, inverted in reversed(self._steps):
            if site is None:
                x, _ = t(x, context) if inverted else t.inverse(x, context)
            else:
                x, gain, params = site.inverse(x, context)
                if observer is not None:
                    observer.site(name, gain.detach(), params.detach())
            if observer is not None:
                observer.layer(name, x.detach())
        return x

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        context = self.model._embedding_net(y)
        z, logdet = self.model._transform(x, context=context)
        base = self._base_params(context)
        if base is not None:
            mean, log_std = base
            z = (z - mean) * torch.exp(-log_std)
            logdet = logdet - log_std.expand_as(z).flatten(1).sum(1)
        return [z], logdet

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        (eps,), logdet = self.forward(x, y)
        flat = eps.flatten(1)
        return -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi) + logdet


def matches(model: Any) -> bool:
    """An ``nflows.flows.*`` flow (checked by module name: nflows is not imported here)."""
    return (
        isinstance(model, nn.Module)
        and any(c.__module__.startswith("nflows.flows") for c in type(model).__mro__)
        and hasattr(model, "_transform")
    )


def make(model: nn.Module, name: str | None = None) -> NflowsAdapter:
    return NflowsAdapter(model, name)
