"""What every bundled reference flow offers the audit (one small base class).

A reference flow is an ``nn.Module`` that maps data ``x`` to latents under a
condition ``y``. Its conditional elementwise maps are
:class:`~flowaudit.reference_models.couplings.Elementwise` sub-modules, called
through ``__call__`` so that forward hooks see them; the reference adapter
finds the sites by type and the layer trace by :meth:`trace_layers`.

Latents are a list of tensors: the factored-out split latents first, the top
latent last (SRFlow's ``epses`` order); a flow without splits has one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ReferenceFlow", "shapes_only"]


def shapes_only() -> bool:
    """Whether modules are being built on the ``meta`` device (shapes, no numbers), as a checkpoint's loader
    does before the file's tensors become the weights: random initialisation is then skipped. It would be
    thrown away, and torch's meta kernels for ``normal_``, ``randn`` and ``qr`` import its compiler stack
    (sympy, dynamo: some 80 MB resident and seconds)."""
    return torch.empty(0).is_meta


class ReferenceFlow(nn.Module):
    """Base class of the bundled flows; subclasses fill in the abstract methods.

    Attributes set by subclasses:
        task: ``"toy"``, ``"sr"`` or ``"lowlight"``.
        config: the constructor's keyword arguments (stored in checkpoints).
        condition_shape: shape of one condition ``y`` (no batch axis).
        output_range: the valid range of a sample's values, e.g. ``(0, 1)``.
    """

    task: str = "generic"
    condition_shape: tuple[int, ...] = ()
    output_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, **config: Any):
        super().__init__()
        self.config = dict(config)

    # -- what subclasses define -------------------------------------------------
    def encoder_module(self) -> nn.Module | None:
        """The conditioning network ``g_θ`` (``None`` when the condition is fed raw)."""
        raise NotImplementedError

    def default_feature_layers(self) -> list[str]:
        """Names (``model.named_modules()``) hooked for ``s_OOD`` by default."""
        raise NotImplementedError

    def encode(self, y: Tensor) -> Any:
        """Run the conditioning network; the flow's conditioning for :meth:`forward`/`reverse`."""
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Data → latents: ``(latents, logdet)`` with ``logdet`` of shape (B,)."""
        raise NotImplementedError

    def reverse(self, latents: list[Tensor], y: Tensor) -> Tensor:
        """Latents → data, ``x = f⁻¹(z; y)``; no clamp (the band check is the audit's)."""
        raise NotImplementedError

    def latent_shapes(self, y: Tensor) -> list[tuple[int, ...]]:
        """Shapes (with batch axis) of the latents for conditions ``y``."""
        raise NotImplementedError

    def trace_layers(self) -> list[str]:
        """Module names of the inverse pass's layers, in the order sampling visits them.

        Each returns ``(x, logdet)`` or ``x``; the audit hooks them for the layer trace.
        """
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------
    def encode_once(self, y: Tensor) -> Any:
        """:meth:`encode` with each run of equal consecutive conditions encoded once, its rows repeated.

        Sampling passes a condition once per sample, K in a row; the encoder (often the larger half of an SR
        flow) then costs one row instead of K, with the same values per row. The gradient of a run reaches
        its first row (a condition repeated per sample gets its whole gradient). One host read a call, to
        size the distinct rows.
        """
        if y.shape[0] < 2:
            return self.encode(y)
        starts = torch.cat([y.new_ones(1, dtype=torch.bool), (y[1:] != y[:-1]).flatten(1).any(1)])
        first = starts.nonzero().squeeze(1)
        if len(first) == len(y):
            return self.encode(y)
        run = starts.long().cumsum(0) - 1  # row → its run
        return _take(self.encode(y.index_select(0, first)), run)

    def base_log_prob(self, latents: list[Tensor], y: Tensor) -> Tensor:
        """Standard-normal log-density of the latents, (B,).

        Conditional and split priors are sites inside the flow
        (:class:`~flowaudit.reference_models.couplings.GaussianPrior`), so every
        latent is standard normal and their log-dets are in ``forward``'s.
        """
        total = 0.0
        for z in latents:
            flat = z.flatten(1)
            total = total - 0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
        return total

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        latents, logdet = self(x, y)
        return self.base_log_prob(latents, y) + logdet

    def sample_latents(
        self, y: Tensor, temperature: float = 0.9, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Standard-normal latents scaled by the temperature (τ scales ε only)."""
        return [
            temperature * torch.randn(shape, generator=generator, device=y.device, dtype=y.dtype)
            for shape in self.latent_shapes(y)
        ]

    def sample(self, y: Tensor, temperature: float = 0.9, generator: torch.Generator | None = None) -> Tensor:
        return self.reverse(self.sample_latents(y, temperature, generator), y)


def _take(out: Any, rows: Tensor) -> Any:
    """``out`` (a tensor, or lists and tuples of them) with its batch rows picked by ``rows``."""
    if isinstance(out, Tensor):
        return out.index_select(0, rows)
    return type(out)(_take(o, rows) for o in out)
