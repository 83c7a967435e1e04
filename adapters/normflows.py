r"""Adapter for normflows' ``ConditionalNormalizingFlow`` (context = the condition ``y``).

normflows names the directions the other way round: a flow's ``forward`` maps
latent to data (sampling, :math:`x = f^{-1}(z; y)` in flowaudit's words) and
``inverse`` maps data to latent (encoding, :math:`z = f(x; y)`). A site's map
:math:`c` is always taken in the encode direction, so its inverse gain
:math:`1/c'` is the slope of the sampling step normflows runs in ``forward``.

Sites, in encode order (``flows[-1]`` … ``flows[0]``, then the base):

* ``MaskedAffineAutoregressive`` — given the elements before it, each element
  is sampled as :math:`x_i = \sigma_i z_i + \mu_i`, :math:`\sigma_i =
  \mathrm{sigmoid}(u_i + 2) + 10^{-3}`; encode :math:`c(x) = (x - \mu)/\sigma`,
  :math:`c' = 1/\sigma \in (1/1.001, 1000)`: ``affine-bounded`` (tail slopes
  that never meet: Remark 2 violated). The map is evaluated through the
  block's own ``_elementwise_inverse``; the bounds are read by evaluating it at
  extreme raw parameters, not from a formula.
* ``CoupledRationalQuadraticSpline`` / ``AutoregressiveRationalQuadraticSpline``
  — rational-quadratic splines on :math:`[-B, B]` with linear (identity) tails:
  ``rq-spline``, ``tail_start`` = the object's ``tail_bound`` :math:`B`.
  Evaluated through the block's own ``_piecewise_cdf`` / ``_elementwise``
  (bin count, minimum widths and derivatives, the hidden-width scaling of the
  raw parameters all come with it). The coupling's *unconditional* spline on
  the identity half (``apply_unconditional_transform``) is reported as a site
  too: its parameters are constants, but its gain varies with the input, and
  nothing elementwise passes unseen.
* ``ConditionalDiagGaussian`` base — :math:`z = \mu(y) + e^{\log\sigma(y)}\varepsilon`:
  ``prior``, inverse gain :math:`\sigma`. A ``DiagGaussian`` base is a fixed
  affine map (a layer, not a site).

Any other flow whose ``forward`` takes a ``context`` becomes a site of kind
``unknown``. normflows' ``AffineCouplingBlock`` and ``MaskedAffineFlow`` take
no context in normflows ≤ 1.7.3 (``ConditionalNormalizingFlow`` cannot call
them); unconditional flows (permutations, LU linear layers) are layers.

The sampling pass is driven here, flow by flow, exactly as
``ConditionalNormalizingFlow.forward`` does (``flow(z, context=y)``), with the
base draw taken from given latents :math:`\varepsilon` instead of
``torch.randn``; forward hooks on the parameter networks (called through
``__call__``) read their outputs and are removed on exit.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import HookedAdapter, Observer, Site, affine_kind
from .hooks import first_tensor, hooked

__all__ = [
    "AutoregressiveAffineSite",
    "CouplingSplineSite",
    "AutoregressiveSplineSite",
    "ConstantSplineSite",
    "PriorSite",
    "UnknownSite",
    "NormflowsAdapter",
    "matches",
    "make",
]

_LOG2PI = math.log(2 * math.pi)


def _per_value(values: Tensor, params: Tensor, fn) -> Tensor:
    """``fn(x, p)`` with every element of ``x`` (shaped like the site's elements) set to each probe value: (V, M)."""
    return torch.stack([fn(v, params).flatten() for v in values])


class _NetSite(Site):
    """A site whose parameters are the output of one network the library calls through ``__call__``."""

    net: str  # module name of the parameter network (hooked while sampling)

    def start(self) -> None:
        self._last: Tensor | None = None

    def on_net(self, output: Tensor) -> None:
        # clone: normflows scales the raw spline widths/heights in place after the call;
        # autoregressive inverses call the net D times, the last call holds the final parameters
        self._last = output.detach().clone()

    def tail_start(self) -> float | None:
        return 0.0


class AutoregressiveAffineSite(_NetSite):
    r"""``MaskedAffineAutoregressive``: :math:`c(x) = (x - \mu)/\sigma` per element; params = raw MADE output (B, D·2)."""

    def __init__(self, name: str, flow: nn.Module):
        self.name, self.flow, self.net = name, flow, f"{name}.autoregressive_net"
        self._bounds = self._read_bounds()
        # bounded c' (normflows: 1/σ with σ ∈ (10⁻³, 1.001]) is affine-bounded by the shared floor rule
        self.kind = affine_kind(self._bounds[0]) if self._bounds is not None else "affine"

    def _c(self, x: Tensor, raw: Tensor) -> Tensor:
        return self.flow._elementwise_inverse(x, raw)[0]

    def _slope(self, raw: Tensor) -> Tensor:
        # the map is affine in x: c' = c(1) − c(0), in float64 so the difference is exact to ~1e-16
        raw = raw.to(torch.float64)
        zeros = raw.new_zeros(raw.shape[0], self.flow.features)
        return self._c(zeros + 1, raw) - self._c(zeros, raw)

    def _read_bounds(self) -> tuple[float, float] | None:
        """c' at raw scale parameters ±10³⁰, through the live block: its scale activation's range."""
        d = self.flow.features
        raw = torch.zeros(2, d, 2, dtype=torch.float64)
        raw[0, :, 0], raw[1, :, 0] = -1e30, 1e30
        with torch.no_grad():
            slope = self._slope(raw.reshape(2, -1))
        lo, hi = float(slope.min()), float(slope.max())
        return (lo, hi) if math.isfinite(hi) and lo > 0 else None

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        return self._slope(params).to(values.dtype).flatten()[None].expand(values.shape[0], -1)

    def map_at(self, values: Tensor, params: Tensor) -> Tensor:
        raw = params.to(values.dtype)
        ones = raw.new_ones(raw.shape[0], self.flow.features)
        return _per_value(values, raw, lambda v, p: self._c(ones * v, p))

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def read(self, z_in: Tensor, x_out: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._last
        return 1.0 / self._slope(raw).to(x_out.dtype), raw


class _SplineSite(_NetSite):
    """Common to the rational-quadratic sites: kind, bounds and tail start from the live object."""

    def _init_spline(self, owner: nn.Module) -> None:
        self.owner = owner
        self.kind = "rq-spline" if owner.tails == "linear" else "unknown"

    def tail_bounds(self) -> tuple[float, float] | None:
        return (1.0, 1.0) if self.kind == "rq-spline" else None  # linear tails are the identity

    def tail_start(self) -> float | None:
        b = self.owner.tail_bound
        return float(torch.as_tensor(b).max()) if self.kind == "rq-spline" else None

    def _c_and_log_slope(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        p = params.to(values.dtype)
        ones = p.new_ones(p.shape[0], self._n)
        return torch.stack([self._c_and_log_slope(ones * v, p)[1].exp().flatten() for v in values])

    def map_at(self, values: Tensor, params: Tensor) -> Tensor:
        p = params.to(values.dtype)
        ones = p.new_ones(p.shape[0], self._n)
        return torch.stack([self._c_and_log_slope(ones * v, p)[0].flatten() for v in values])


class CouplingSplineSite(_SplineSite):
    """The transformed half of ``CoupledRationalQuadraticSpline``; params = raw transform-net output (B, d·(3K−1))."""

    def __init__(self, name: str, flow: nn.Module):
        self.name, self.flow = name, flow
        self.net = f"{name}.prqct.transform_net"
        self._init_spline(flow.prqct)
        self._n = flow.prqct.num_transform_features

    def _c_and_log_slope(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        p = params.reshape(x.shape[0], x.shape[1], -1).clone()  # _piecewise_cdf scales in place
        return self.owner._piecewise_cdf(x, p, inverse=False)

    def read(self, z_in: Tensor, x_out: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._last
        _, log_slope = self._c_and_log_slope(x_out[:, self.owner.transform_features], raw)
        return torch.exp(-log_slope), raw


class AutoregressiveSplineSite(_SplineSite):
    """``AutoregressiveRationalQuadraticSpline``; params = the final raw MADE output (B, D·(3K−1))."""

    def __init__(self, name: str, flow: nn.Module):
        self.name, self.flow = name, flow
        self.net = f"{name}.mprqat.autoregressive_net"
        self._init_spline(flow.mprqat)
        self._n = 0  # elements per row: read from the params at evaluation time
        if torch.is_tensor(flow.mprqat.tail_bound) and flow.mprqat.tail_bound.numel() > 1:
            self.kind = "unknown"  # per-feature bounds (circular variants): not evaluated element by element

    def _c_and_log_slope(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        # the block's own _elementwise, one element per row: its logabsdet sum is then per element
        b, d = x.shape
        out, logabs = self.owner._elementwise(x.reshape(b * d, 1), params.reshape(b * d, -1).clone(), inverse=False)
        return out.reshape(b, d), logabs.reshape(b, d)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        self._n = params.shape[1] // self.owner._output_dim_multiplier()
        return super().derivative_at(values, params)

    def map_at(self, values: Tensor, params: Tensor) -> Tensor:
        self._n = params.shape[1] // self.owner._output_dim_multiplier()
        return super().map_at(values, params)

    def read(self, z_in: Tensor, x_out: Tensor) -> tuple[Tensor, Tensor]:
        raw = self._last
        _, log_slope = self._c_and_log_slope(x_out, raw)
        return torch.exp(-log_slope), raw


class ConstantSplineSite(_SplineSite):
    """The unconditional spline a coupling applies to its identity half (learned constants, input-dependent gain).

    params = ``[widths, heights, derivatives]`` (unnormalised) broadcast to the batch, (B, d, 3K−1).
    """

    def __init__(self, name: str, flow: nn.Module):
        self.name, self.flow, self.net = name, flow, ""
        self.cdf = flow.prqct.unconditional_transform
        self._init_spline(self.cdf)
        self._n = flow.prqct.num_identity_features
        self._k = self.cdf.unnormalized_widths.shape[-1]

    def _params(self, batch: int) -> Tensor:
        c = self.cdf
        p = torch.cat([c.unnormalized_widths, c.unnormalized_heights, c.unnormalized_derivatives], -1).detach()
        return p[None].expand(batch, *p.shape)

    def _c_and_log_slope(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        from normflows.utils import splines

        c, k = self.cdf, self._k
        kwargs = {"tails": c.tails, "tail_bound": c.tail_bound} if c.tails is not None else {}
        fn = (
            splines.unconstrained_rational_quadratic_spline
            if c.tails is not None
            else splines.rational_quadratic_spline
        )
        return fn(
            inputs=x,
            unnormalized_widths=params[..., :k],
            unnormalized_heights=params[..., k : 2 * k],
            unnormalized_derivatives=params[..., 2 * k :],
            inverse=False,
            min_bin_width=c.min_bin_width,
            min_bin_height=c.min_bin_height,
            min_derivative=c.min_derivative,
            **kwargs,
        )

    def read(self, z_in: Tensor, x_out: Tensor) -> tuple[Tensor, Tensor]:
        params = self._params(x_out.shape[0])
        _, log_slope = self._c_and_log_slope(x_out[:, self.flow.prqct.identity_features], params)
        return torch.exp(-log_slope), params


class PriorSite(Site):
    r"""``ConditionalDiagGaussian``: :math:`c(z) = (z - \mu(y))\,e^{-\log\sigma(y)}`; params = [μ, log σ] (B, 2, *shape)."""

    kind = "prior"

    def __init__(self, name: str, q0: nn.Module):
        self.name, self.q0 = name, q0

    def params(self, y: Tensor) -> Tensor:
        out = self.q0.context_encoder(y)
        half = out.shape[-1] // 2  # mean first, log σ second (the class's documented layout)
        return torch.stack([out[..., :half], out[..., half:]], 1)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        p = params.to(values.dtype)
        return torch.exp(-p[:, 1]).flatten()[None].expand(values.shape[0], -1)

    def map_at(self, values: Tensor, params: Tensor) -> Tensor:
        p = params.to(values.dtype)
        return (values[:, None] - p[:, 0].flatten()[None]) * torch.exp(-p[:, 1]).flatten()[None]

    def tail_start(self) -> float | None:
        return 0.0


class UnknownSite(Site):
    """A conditional flow of a class this adapter does not know: reported, never probed."""

    kind = "unknown"

    def __init__(self, name: str, cls: str):
        self.name, self.cls = name, cls

    def derivative_at(self, values: Tensor, params: Any) -> Tensor:
        raise NotImplementedError(f"{self.cls} is not a known normflows flow: its derivative is unknown")


def _flow_sites(name: str, flow: nn.Module) -> list[Site]:
    """Sites of one flow, in encode order (the flow's ``inverse``)."""
    import normflows as nf

    if isinstance(flow, nf.flows.MaskedAffineAutoregressive):
        return [AutoregressiveAffineSite(name, flow)]
    if isinstance(flow, nf.flows.CoupledRationalQuadraticSpline):
        sites: list[Site] = [CouplingSplineSite(name, flow)]
        if flow.prqct.unconditional_transform is not None:  # encode applies it after the conditional half
            sites.append(ConstantSplineSite(f"{name}.prqct.unconditional_transform", flow))
        return sites
    if isinstance(flow, nf.flows.AutoregressiveRationalQuadraticSpline):
        return [AutoregressiveSplineSite(name, flow)]
    if type(flow).__module__ in _UNCONDITIONAL:
        return []  # permutations, LU / 1×1 mixing, ActNorm, reshapes: accept a context, never read it
    try:
        takes_context = "context" in inspect.signature(flow.forward).parameters
    except (TypeError, ValueError):
        takes_context = False
    return [UnknownSite(name, type(flow).__name__)] if takes_context else []


# normflows modules whose flows take ``context`` only to fit ConditionalNormalizingFlow's call
_UNCONDITIONAL = ("normflows.flows.mixing", "normflows.flows.normalization", "normflows.flows.reshape")


def _condition_shape(model: nn.Module) -> tuple[int, ...]:
    """Read from the first context layer of the flows' networks (MADE, ResidualNet), else the base's encoder."""
    shape = getattr(model, "condition_shape", None)
    if shape is not None:
        return tuple(shape)
    for _, m in model.flows.named_modules():
        layer = getattr(m, "context_layer", None)
        if isinstance(layer, nn.Linear):
            return (layer.in_features,)
    enc = getattr(model.q0, "context_encoder", None)
    first = next((m for m in enc.modules() if isinstance(m, nn.Linear)), None) if enc is not None else None
    if first is not None:
        return (first.in_features,)
    raise TypeError("cannot tell the condition shape of this ConditionalNormalizingFlow: set model.condition_shape")


class NormflowsAdapter(HookedAdapter):
    """Adapter of a normflows ``ConditionalNormalizingFlow`` with a ``DiagGaussian`` or ``ConditionalDiagGaussian`` base."""

    family = "normflows"

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__(model, name)
        from normflows.distributions import base as nf_base

        q0 = model.q0
        # ConditionalDiagGaussian is not re-exported by normflows.distributions in 1.7.3
        cond_gauss = getattr(nf_base, "ConditionalDiagGaussian", ())
        if isinstance(q0, cond_gauss):
            self._prior: PriorSite | None = PriorSite("q0", q0)
        elif isinstance(q0, nf_base.DiagGaussian):
            self._prior = None
        else:
            raise TypeError(
                f"normflows base {type(q0).__name__} is not supported (DiagGaussian, ConditionalDiagGaussian)"
            )
        self._shape = tuple(q0.shape)
        self._flow_names = [f"flows.{i}" for i in range(len(model.flows))]
        self._by_flow = {n: _flow_sites(n, f) for n, f in zip(self._flow_names, model.flows)}
        self._sites = [s for n in reversed(self._flow_names) for s in self._by_flow[n]]
        if self._prior is not None:
            self._sites.append(self._prior)
        # flows no site reads whose Jacobian may vary with the input (unknown code, planar/radial/residual
        # flows): the view is partial, and coverage() says so
        self._unseen = [
            n
            for n, f in zip(self._flow_names, model.flows)
            if any(isinstance(s, UnknownSite) for s in self._by_flow[n])
            or (not self._by_flow[n] and type(f).__module__ not in _UNCONDITIONAL)
        ]
        self._condition_shape = _condition_shape(model)

    @property
    def condition_shape(self) -> tuple[int, ...]:
        return self._condition_shape

    def sites(self) -> list[Site]:
        return list(self._sites)

    def unread(self) -> list[str]:
        """Flows no site reads whose Jacobian may depend on the input (unknown or non-elementwise)."""
        return list(self._unseen)

    def layer_names(self) -> list[str]:
        return ["q0", *self._flow_names]

    def sample_latents(self, y: Tensor, temperature: float, generator: torch.Generator | None) -> list[Tensor]:
        return [temperature * torch.randn((y.shape[0], *self._shape), generator=generator).to(y)]

    # -- the base distribution as an affine map ε ↔ z ---------------------------
    def _base(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ) of the base at conditions ``y``, as the base class computes them."""
        q0 = self.model.q0
        if self._prior is not None:
            p = self._prior.params(y)
            return p[:, 0], p[:, 1]
        log_scale = q0.log_scale if q0.temperature is None else q0.log_scale + math.log(q0.temperature)
        return q0.loc, log_scale

    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        (eps,) = latents
        if observer is None:
            mu, log_sigma = self._base(y)
            return self.model.forward(mu + torch.exp(log_sigma) * eps, context=y)
        return self._observed(observer, lambda: self._observed_pass(y, eps, observer))

    def _hooks(self, observer: Observer, live: list[bool]) -> contextlib.AbstractContextManager:
        """Hooks on the sites' parameter networks, keeping their last output while ``live[0]``."""
        net_sites = self._net_sites()

        def on_net(name: str, args: tuple, kwargs: dict, output: Any) -> None:
            if live[0]:
                net_sites[name].on_net(first_tensor(output))

        return hooked(self.model, list(net_sites), on_net)

    def _net_sites(self) -> dict[str, _NetSite]:
        return {s.net: s for s in self._sites if isinstance(s, _NetSite) and s.net}

    def _observed_pass(self, y: Tensor, eps: Tensor, observer: Observer) -> Tensor:
        """The sampling pass reporting to ``observer``, under the hooks of :meth:`_hooks`."""
        for s in self._net_sites().values():
            s.start()
        mu, log_sigma = self._base(y)
        z = mu + torch.exp(log_sigma) * eps
        if self._prior is not None:
            observer.site(
                self._prior.name, torch.exp(log_sigma).detach().expand_as(z), torch.stack([mu, log_sigma], 1).detach()
            )
        observer.layer("q0", z.detach())
        for name, flow in zip(self._flow_names, self.model.flows):
            z_in = z
            z, _ = flow(z, context=y)  # normflows' forward: the sampling direction
            for site in reversed(self._by_flow[name]):  # sampling visits a flow's sites in reverse
                if isinstance(site, _NetSite):
                    gain, params = site.read(z_in, z)
                    observer.site(site.name, gain.detach(), params.detach())
            observer.layer(name, z.detach())
        return z

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Encode x → ε: the flows' ``inverse`` (normflows' encode direction), then the base's affine map."""
        z, logdet = x, torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for flow in reversed(self.model.flows):
            z, ld = flow.inverse(z, context=y)
            logdet = logdet + ld
        mu, log_sigma = self._base(y)
        eps = (z - mu) * torch.exp(-log_sigma)
        logdet = logdet - log_sigma.expand_as(z).flatten(1).sum(1)
        return [eps], logdet

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        (eps,), logdet = self.forward(x, y)
        return -0.5 * (eps.flatten(1) ** 2 + _LOG2PI).sum(1) + logdet


def matches(model: Any) -> bool:
    # cheap and import-free: the class (or a base, for user subclasses) is normflows' ConditionalNormalizingFlow
    return any(
        c.__module__.split(".")[0] == "normflows" and c.__name__ == "ConditionalNormalizingFlow"
        for c in type(model).__mro__
    )


def make(model: nn.Module, name: str | None = None) -> NormflowsAdapter:
    return NormflowsAdapter(model, name)
