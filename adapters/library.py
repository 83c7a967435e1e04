"""Base of the adapters that drive a library's own flow (nflows, zuko, normflows, FrEIA).

It owns what they share: latents τ·ε, a standard-normal ``log_prob``, the condition shape a user may
state on the model, the site lists and the reports of the base distribution and of each layer. A
library adapter fills ``_sites``, ``_prior``, ``_unseen``, ``_layers`` and ``_latent_shapes`` and
drives the library's sampling.

Reports to an observer that keeps the graph (the attack's, :func:`~.base.keeps_graph`) stay attached:
each library adapter computes a site's ``1/c'`` from its parameters or by a JVP through its map, never
from the log-det the library returns, so every objective differentiates w.r.t. the condition.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Adapter, Observer, PriorSite, Site, UnknownSite, keeps_graph
from .bounds import LayerBound, exact, module_bound, site_layer

__all__ = ["LibraryAdapter"]


class LibraryAdapter(Adapter):
    """An adapter of a flow built with a library; subclasses fill the fields below in ``__init__``."""

    _sites: list[Site]  # in forward (encode) order, the prior left out
    _prior: PriorSite | None = None  # a condition-dependent base, the last site
    _unseen: list[str]  # parts that may be conditional and that no site reads
    _layers: list[str]  # the inverse pass's layers, in the order it reports them
    _latent_shapes: list[tuple[int, ...]]  # one per latent, no batch axis
    _base_in_layers: bool = True  # whether ``_layers[0]`` is the base distribution (FrEIA: a standard normal, unlisted)

    @property
    def condition_shape(self) -> tuple[int, ...]:
        """The model's ``condition_shape`` attribute when a user set one, else read off its layers."""
        shape = getattr(self.model, "condition_shape", None)
        return tuple(shape) if shape is not None else self._read_condition_shape()

    def _read_condition_shape(self) -> tuple[int, ...]:
        raise ValueError(f"cannot tell this {self.family} flow's condition shape: set `model.condition_shape = (C,)`")

    def sites(self) -> list[Site]:
        return list(self._sites) + ([self._prior] if self._prior is not None else [])

    def unread(self) -> list[str]:
        return list(self._unseen)

    def layer_names(self) -> list[str]:
        return list(self._layers)

    def latent_shapes(self, y: Tensor) -> list[tuple[int, ...]]:
        return list(self._latent_shapes)

    def inverse_layers(self) -> list[LayerBound]:
        """The base, then every layer in sampling order: the sites it applies, else its module's bound
        (:func:`~.bounds.module_bound`, run forward where :meth:`_runs_forward` says so)."""
        if not self._base_in_layers:
            return [self._layer_bound(name) for name in self._layers]
        base = self._layers[0]
        if self._prior is not None:
            why = "a conditional base: μ(y) and σ(y) come from the condition, not bounded by structure"
            out = [LayerBound(base, "prior", None, None, why, (self._prior.name,))]
        else:
            out = [self._base_bound(base)]
        return out + [self._layer_bound(name) for name in self._layers[1:]]

    def _layer_bound(self, name: str) -> LayerBound:
        """Layer ``name``: the sites it applies (inverse order), else its module's bound."""
        own = [s.name for s in self._sites if s.name == name or s.name.startswith(f"{name}.")]
        if own:
            return site_layer(name, list(reversed(own)))
        return module_bound(name, self.model.get_submodule(name), self._runs_forward(name))

    def _base_bound(self, name: str) -> LayerBound:
        """The unconditional base ``x = μ + σε`` (default: a standard normal, exact)."""
        return exact(name, "base")

    def _runs_forward(self, name: str) -> bool:
        """Whether the inverse pass runs layer ``name``'s forward map (default: its inverse)."""
        return False

    def _report_base(
        self, observer: Observer | None, z: Tensor, mean: Tensor | None = None, log_std: Tensor | None = None
    ) -> None:
        """Report the base's draw ``z = μ + e^{log σ} ε``: the prior site's gain σ (when conditional), the layer."""
        if observer is None:
            return
        if self._prior is not None:
            params = torch.stack([mean.expand_as(z), log_std.expand_as(z)], 1)
            gain = torch.exp(log_std).expand_as(z)
            observer.site(self._prior.name, *_kept(observer, gain, params))
        observer.layer(self._layers[0], z.detach())

    @staticmethod
    def _unread_of(parts: list[tuple[str, list[Site], bool]]) -> list[str]:
        """Names of the parts ``(name, sites, constant Jacobian)`` that a site of unknown code stands for, or
        that no site reads while their Jacobian may vary with the input: the view of them is partial."""
        unknown = lambda sites: any(isinstance(s, UnknownSite) for s in sites)  # noqa: E731
        return [n for n, sites, constant in parts if unknown(sites) or not (sites or constant)]

    @staticmethod
    def _report(
        observer: Observer | None, name: str, x: Tensor, gain: Tensor | None = None, params: Any = None
    ) -> None:
        """Report layer ``name``'s output ``x``, after its site's gain and parameters when given."""
        if observer is None:
            return
        if gain is not None:
            observer.site(name, *_kept(observer, gain, params))
        observer.layer(name, x.detach())


def _kept(observer: Observer, gain: Tensor, params: Any) -> tuple[Tensor, Any]:
    """``(gain, params)`` as ``observer`` takes them: attached to the graph if it keeps it, else detached."""
    if keeps_graph(observer):
        return gain, params
    return gain.detach(), (params.detach() if isinstance(params, Tensor) else params)
