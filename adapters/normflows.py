r"""Adapter for normflows' ``ConditionalNormalizingFlow`` (context = the condition ``y``).

normflows names the directions the other way round: a flow's ``forward`` samples (latent to data)
and ``inverse`` encodes. A site's map :math:`c` is taken in the encode direction, so its inverse gain
:math:`1/c'` is the slope of the step normflows runs in ``forward``. Sites, in encode order:

* ``MaskedAffineAutoregressive``: :math:`c(x) = (x - \mu)/\sigma`, :math:`\sigma = \mathrm{sigmoid}(u + 2)
  + 10^{-3}`, so :math:`c' \in (1/1.001, 1000)`: ``affine-bounded``; bounds read through the block's
  own ``_elementwise_inverse`` at extreme raw parameters;
* ``CoupledRationalQuadraticSpline`` / ``AutoregressiveRationalQuadraticSpline``: splines on
  :math:`[-B, B]` with identity tails (``rq-spline``), evaluated through the block's own code; a
  coupling's unconditional spline on its identity half is a site too (its gain varies with the input);
* ``ConditionalDiagGaussian``: :math:`z = \mu(y) + e^{\log\sigma(y)}\varepsilon` (``prior``).

Any other flow is tested by where the condition flows (:mod:`.dataflow`): conditional and elementwise, a
site through its own ``inverse``; conditional otherwise, an ``unknown`` site; neither, no site. Sampling runs
flow by flow as ``ConditionalNormalizingFlow.forward`` does, from given latents; forward hooks on the
parameter networks read their outputs and are removed on exit.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import Observer, PriorSite, Site, UnknownSite, affine_kind, keeps_graph
from .bounds import LayerBound, gaussian_base
from .dataflow import FlowLayerSite, found_site, probe_inputs
from .hooks import first_tensor, hooked
from .library import LibraryAdapter
from .speedups import HookedSpeedUps

__all__ = ["AutoregressiveAffineSite", "CouplingSplineSite", "AutoregressiveSplineSite", "ConstantSplineSite"]
__all__ += ["NormflowsAdapter", "matches", "make"]

# normflows modules whose flows take ``context`` only to fit ConditionalNormalizingFlow's call
_UNCONDITIONAL = ("normflows.flows.mixing", "normflows.flows.normalization", "normflows.flows.reshape")


class _NetSite(Site):
    """A site whose parameters are the output of one network the library calls through ``__call__``."""

    net: str  # module name of the parameter network (hooked while sampling)

    def start(self) -> None:
        self._last: Tensor | None = None

    def on_net(self, output: Tensor, keep: bool = False) -> None:
        """Keep the network's output (attached to the graph with ``keep``: the attack differentiates it)."""
        # clone: normflows scales raw spline widths in place; an autoregressive inverse's last call is final
        self._last = (output if keep else output.detach()).clone()

    def tail_start(self) -> float | None:
        return 0.0


class AutoregressiveAffineSite(_NetSite):
    r"""``MaskedAffineAutoregressive``: :math:`c(x) = (x - \mu)/\sigma` per element; params = raw MADE output."""

    derivative_constant = True  # c' = c(1) − c(0) under each row

    def __init__(self, name: str, flow: nn.Module):
        self.name, self.flow, self.net = name, flow, f"{name}.autoregressive_net"
        self._bounds = self._read_bounds()
        self.kind = affine_kind(self._bounds[0]) if self._bounds is not None else "affine"

    def map(self, x: Tensor, raw: Tensor) -> Tensor:
        return self.flow._elementwise_inverse(x, raw)[0]

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], self.flow.features)

    def _slope(self, raw: Tensor) -> Tensor:
        """c' = c(1) − c(0) (the map is affine in x), in float64 so the difference is exact to ~1e-16."""
        raw = raw.to(torch.float64)
        zeros = raw.new_zeros(raw.shape[0], self.flow.features)
        return self.map(zeros + 1, raw) - self.map(zeros, raw)

    def _read_bounds(self) -> tuple[float, float] | None:
        """c' at raw scale parameters ±10³⁰, through the live block: its scale activation's range."""
        raw = torch.zeros(2, self.flow.features, 2, dtype=torch.float64)
        raw[0, :, 0], raw[1, :, 0] = -1e30, 1e30
        with torch.no_grad():
            slope = self._slope(raw.reshape(2, -1))
        lo, hi = float(slope.min()), float(slope.max())
        return (lo, hi) if math.isfinite(hi) and lo > 0 else None

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        return self._slope(params).to(values.dtype).flatten()[None].expand(values.shape[0], -1)

    def tail_bounds(self) -> tuple[float, float] | None:
        return self._bounds

    def read(self, x_out: Tensor) -> tuple[Tensor, Tensor]:
        return 1.0 / self._slope(self._last).to(x_out.dtype), self._last


class _SplineSite(_NetSite):
    """A rational-quadratic site: kind and tail start from the live object, c' from its log-slope."""

    batched_probe = True  # the spline maps each row by its own parameters: every probe value in one call

    def __init__(self, name: str, flow: nn.Module, owner: nn.Module, net: str):
        self.name, self.flow, self.owner, self.net = name, flow, owner, net
        self.kind = "rq-spline" if owner.tails == "linear" else "unknown"

    def tail_bounds(self) -> tuple[float, float] | None:
        return (1.0, 1.0) if self.kind == "rq-spline" else None  # linear tails are the identity

    def tail_start(self) -> float | None:
        return float(torch.as_tensor(self.owner.tail_bound).max()) if self.kind == "rq-spline" else None

    def _c_and_log_slope(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def map(self, x: Tensor, params: Tensor) -> Tensor:
        return self._c_and_log_slope(x, params)[0]

    def derivative(self, x: Tensor, params: Tensor) -> Tensor:
        return self._c_and_log_slope(x, params)[1].exp()

    def read(self, x_out: Tensor) -> tuple[Tensor, Tensor]:
        return torch.exp(-self._c_and_log_slope(self._visited(x_out), self._last)[1]), self._last

    def _visited(self, x_out: Tensor) -> Tensor:
        return x_out


class CouplingSplineSite(_SplineSite):
    """The transformed half of ``CoupledRationalQuadraticSpline``; params = raw transform-net output."""

    def __init__(self, name: str, flow: nn.Module):
        super().__init__(name, flow, flow.prqct, f"{name}.prqct.transform_net")

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], self.owner.num_transform_features)

    def _c_and_log_slope(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        p = params.reshape(x.shape[0], x.shape[1], -1).clone()  # _piecewise_cdf scales in place
        return self.owner._piecewise_cdf(x, p, inverse=False)

    def _visited(self, x_out: Tensor) -> Tensor:
        return x_out[:, self.owner.transform_features]


class AutoregressiveSplineSite(_SplineSite):
    """``AutoregressiveRationalQuadraticSpline``; params = the final raw MADE output (B, D·(3K−1))."""

    def __init__(self, name: str, flow: nn.Module):
        super().__init__(name, flow, flow.mprqat, f"{name}.mprqat.autoregressive_net")
        if torch.is_tensor(flow.mprqat.tail_bound) and flow.mprqat.tail_bound.numel() > 1:
            self.kind = "unknown"  # per-feature bounds (circular variants): not evaluated element by element

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], params.shape[1] // self.owner._output_dim_multiplier())

    def _c_and_log_slope(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        # the block's own _elementwise, one element per row: its logabsdet sum is then per element
        b, d = x.shape
        out, logabs = self.owner._elementwise(x.reshape(b * d, 1), params.reshape(b * d, -1).clone(), inverse=False)
        return out.reshape(b, d), logabs.reshape(b, d)


class ConstantSplineSite(_SplineSite):
    """The unconditional spline a coupling applies to its identity half (constant params, varying gain);
    params = ``[widths, heights, derivatives]`` broadcast to the batch, (B, d, 3K−1)."""

    def __init__(self, name: str, flow: nn.Module):
        super().__init__(name, flow, flow.prqct.unconditional_transform, "")
        self._k = self.owner.unnormalized_widths.shape[-1]

    def input_shape(self, params: Tensor) -> tuple[int, ...]:
        return (params.shape[0], self.flow.prqct.num_identity_features)

    def _c_and_log_slope(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        from normflows.utils import splines

        c, k = self.owner, self._k
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

    def read(self, x_out: Tensor) -> tuple[Tensor, Tensor]:
        c = self.owner
        p = torch.cat([c.unnormalized_widths, c.unnormalized_heights, c.unnormalized_derivatives], -1).detach()
        self._last = p[None].expand(x_out.shape[0], *p.shape)
        return super().read(x_out)

    def _visited(self, x_out: Tensor) -> Tensor:
        return x_out[:, self.flow.prqct.identity_features]


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


class NormflowsAdapter(HookedSpeedUps, LibraryAdapter):
    """Adapter of a ``ConditionalNormalizingFlow`` with a ``DiagGaussian`` or ``ConditionalDiagGaussian`` base."""

    family = "normflows"

    def __init__(self, model: nn.Module, name: str | None = None):
        super().__init__(model, name)
        from normflows.distributions import base as nf_base

        q0 = model.q0
        if isinstance(q0, getattr(nf_base, "ConditionalDiagGaussian", ())):  # not re-exported in 1.7.3
            self._prior = PriorSite("q0")
        elif not isinstance(q0, nf_base.DiagGaussian):
            raise TypeError(
                f"normflows base {type(q0).__name__} is not supported (DiagGaussian, ConditionalDiagGaussian)"
            )
        self._latent_shapes = [tuple(q0.shape)]
        names = [f"flows.{i}" for i in range(len(model.flows))]
        self._by_flow = {n: _flow_sites(n, f) for n, f in zip(names, model.flows)}
        self._find_from_data_flow(names)
        self._sites = [s for n in reversed(names) for s in self._by_flow[n]]
        self._layers = ["q0", *names]
        self._unseen = self._unread_of(
            [(n, self._by_flow[n], type(f).__module__ in _UNCONDITIONAL) for n, f in zip(names, model.flows)]
        )
        try:  # an unreadable condition shape is the user's error at adapt time
            self.condition_shape  # noqa: B018
        except ValueError as exc:
            raise TypeError(str(exc)) from None

    def _find_from_data_flow(self, names: list[str]) -> None:
        """Every flow without a site read from its class, tested on one seeded sampling pass by where the
        condition flows (:mod:`.dataflow`): a conditional elementwise flow is a site, a conditional other one
        an ``unknown`` part, a flow whose output ignores the condition no site. No condition shape: skipped."""
        try:
            shape = self.condition_shape
        except ValueError:
            return
        y, eps = probe_inputs(self.model, [shape, self._latent_shapes[0]])
        with torch.no_grad():
            mu, log_sigma = self._base(y)
            z = mu + torch.exp(log_sigma) * eps
            for name, flow in zip(names, self.model.flows):
                out = flow(z, context=y)[0]
                if not any(isinstance(s, _NetSite) for s in self._by_flow[name]):
                    encode = lambda u, c, f=flow: f.inverse(u, context=c)[0]  # noqa: E731
                    decode = lambda u, c, f=flow: f(u, context=c)[0]  # noqa: E731
                    got = found_site(name, flow, encode, decode, out, y)
                    found = [got] if isinstance(got, FlowLayerSite) else [UnknownSite(name, type(flow).__name__)]
                    self._by_flow[name] = found if got is not False else []
                z = out

    def _read_condition_shape(self) -> tuple[int, ...]:
        """From the first context layer of the flows' networks (MADE, ResidualNet), else the base's encoder."""
        for m in self.model.flows.modules():
            layer = getattr(m, "context_layer", None)
            if isinstance(layer, nn.Linear):
                return (layer.in_features,)
        enc = getattr(self.model.q0, "context_encoder", None)
        first = next((m for m in enc.modules() if isinstance(m, nn.Linear)), None) if enc is not None else None
        if first is not None:
            return (first.in_features,)
        return super()._read_condition_shape()

    def _base(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ) of the base at conditions ``y``, as the base class computes them."""
        q0 = self.model.q0
        if self._prior is not None:
            out = q0.context_encoder(y)
            half = out.shape[-1] // 2  # mean first, log σ second (the class's documented layout)
            return out[..., :half], out[..., half:]
        return q0.loc, q0.log_scale if q0.temperature is None else q0.log_scale + math.log(q0.temperature)

    def _base_bound(self, name: str) -> LayerBound:
        q0 = self.model.q0
        log_scale = q0.log_scale if q0.temperature is None else q0.log_scale + math.log(q0.temperature)
        return gaussian_base(name, q0.loc, log_scale)

    def _runs_forward(self, name: str) -> bool:
        return True  # normflows samples by each flow's forward

    def sample(self, y: Tensor, latents: list[Tensor], observer: Observer | None = None) -> Tensor:
        (eps,) = latents
        if observer is None:
            mu, log_sigma = self._base(y)
            return self.model.forward(mu + torch.exp(log_sigma) * eps, context=y)
        return self._observed(observer, lambda: self._observed_pass(y, eps, observer))

    def _net_sites(self) -> dict[str, _NetSite]:
        return {s.net: s for s in self._sites if isinstance(s, _NetSite) and s.net}

    def _hooks(self, observer: Observer, live: list[bool]) -> contextlib.AbstractContextManager:
        """Hooks on the sites' parameter networks, keeping their last output while ``live[0]``."""
        net_sites, keep = self._net_sites(), keeps_graph(observer)

        def on_net(name: str, args: tuple, kwargs: dict, output: Any) -> None:
            if live[0]:
                net_sites[name].on_net(first_tensor(output), keep)

        return hooked(self.model, list(net_sites), on_net)

    def _observed_pass(self, y: Tensor, eps: Tensor, observer: Observer) -> Tensor:
        """The sampling pass reporting to ``observer``, under the hooks of :meth:`_hooks`."""
        for s in self._net_sites().values():
            s.start()
        mu, log_sigma = self._base(y)
        z = mu + torch.exp(log_sigma) * eps
        self._report_base(observer, z, mu, log_sigma)
        for name, flow in zip(self._layers[1:], self.model.flows):
            z, _ = flow(z, context=y)  # normflows' forward: the sampling direction
            for site in reversed(self._by_flow[name]):  # sampling visits a flow's sites in reverse
                if isinstance(site, (_NetSite, FlowLayerSite)):
                    gain, params = site.read(z) if isinstance(site, _NetSite) else site.read(z, y)
                    keep = keeps_graph(observer)
                    observer.site(site.name, gain if keep else gain.detach(), params if keep else params.detach())
            self._report(observer, name, z)
        return z

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Encode x → ε: the flows' ``inverse`` (normflows' encode direction), then the base's affine map."""
        z, logdet = x, torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for flow in reversed(self.model.flows):
            z, ld = flow.inverse(z, context=y)
            logdet = logdet + ld
        mu, log_sigma = self._base(y)
        return [(z - mu) * torch.exp(-log_sigma)], logdet - log_sigma.expand_as(z).flatten(1).sum(1)


def matches(model: Any) -> bool:
    """normflows' ``ConditionalNormalizingFlow`` or a subclass (checked by name: normflows is not imported)."""
    return any(
        c.__module__.split(".")[0] == "normflows" and c.__name__ == "ConditionalNormalizingFlow"
        for c in type(model).__mro__
    )


def make(model: nn.Module, name: str | None = None) -> NormflowsAdapter:
    return NormflowsAdapter(model, name)
