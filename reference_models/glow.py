r"""Glow pieces that carry no condition: ActNorm and the invertible 1×1 convolution.

Both act on ``(B, C, *S)`` tensors (``S`` empty for vector data, ``(H, W)``
for images) and follow one calling convention with the coupling sites::

    out, logdet = layer(inp, reverse=False)   # logdet: (B,), of the map applied

References: Kingma & Dhariwal 2018 (Glow); Lugmayr et al. 2020 (SRFlow's
parameter names ``bias``, ``logs``, ``weight``, which we keep so official
state dicts map onto ours).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import shapes_only

__all__ = ["ActNorm", "InvConv1x1"]


def _spatial(x: Tensor) -> int:
    return math.prod(x.shape[2:])


class ActNorm(nn.Module):
    r"""Per-channel affine normalisation :math:`y = (x + b)\,e^{\ell}` (SRFlow's form).

    Data-dependent initialisation on the first training batch: :math:`b = -\mu`,
    :math:`\ell = -\log(\sigma + 10^{-6})` per channel, so the first batch comes out
    standardised. :math:`\log|\det| = \sum_c \ell_c \cdot |S|`. As in the official
    SRFlow ActNorm, a layer whose bias is already non-zero (loaded weights, also
    after a non-strict load that left ``initialized`` unset) counts as initialised
    and is never re-initialised from data.
    """

    def __init__(self, channels: int, spatial_dims: int = 2):
        super().__init__()
        shape = (1, channels) + (1,) * spatial_dims
        self.bias = nn.Parameter(torch.zeros(shape))
        self.logs = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        std = x.std(dims, keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        if self.training and not reverse and not bool(self.initialized):
            if bool((self.bias != 0).any()):  # loaded weights: keep them (official behaviour)
                self.initialized.fill_(True)
            else:
                self._initialize(x)
        logdet = self.logs.sum() * _spatial(x) * x.new_ones(x.shape[0])
        if reverse:
            return x * torch.exp(-self.logs) - self.bias, -logdet
        return (x + self.bias) * torch.exp(self.logs), logdet


class InvConv1x1(nn.Module):
    r"""Invertible 1×1 convolution :math:`y = W x` per location, :math:`W` orthogonal at init.

    :math:`\log|\det| = \log|\det W| \cdot |S|`. The inverse is computed in float64
    (as SRFlow does). With ``fixed=True`` :math:`W` is a fixed random orthogonal
    matrix (a buffer, no training, inverted by its transpose, log-det 0), the
    cheap permutation of Lugmayr et al. used for the paper's ×8 models.
    """

    def __init__(self, channels: int, fixed: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        if shapes_only():
            w = torch.empty(channels, channels)
        else:
            w = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0]
        self.fixed = fixed
        if fixed:
            self.register_buffer("weight", w)
        else:
            self.weight = nn.Parameter(w)

    def _apply_matrix(self, x: Tensor, w: Tensor) -> Tensor:
        return torch.einsum("ij,bj...->bi...", w.to(x.dtype), x)

    def forward(self, x: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        if self.fixed:
            logdet = x.new_zeros(x.shape[0])
            w = self.weight.t() if reverse else self.weight
            return self._apply_matrix(x, w), logdet
        logdet = torch.linalg.slogdet(self.weight)[1] * _spatial(x) * x.new_ones(x.shape[0])
        if reverse:
            w_inv = torch.linalg.inv(self.weight.double())
            return self._apply_matrix(x, w_inv), -logdet
        return self._apply_matrix(x, self.weight), logdet

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, fixed={self.fixed}"
