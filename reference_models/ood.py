r"""Out-of-distribution conditions for the bundled image flows, made by one stated rule.

**Rule.** Take the in-distribution test crops in their order and make each one's condition as the
task does (SR: the bicubic ×4 downscale; low-light: the LOL-like darkening); condition ``j`` then goes
through transform ``j mod T`` of the fixed list :data:`SHIFTS` (``T`` of them), acting on what the
model sees. Nothing is selected by how a model responds: every crop is kept, every transform is used
in turn, and the noise and textures are seeded. The transforms follow the paper's OOD sets (other
image domains, unusual statistics, degradations; Hong et al. 2023, S1.1):

- ``gamma-0.4`` / ``gamma-2.5``: strong gamma, :math:`x^{0.4}` (washed out) and :math:`x^{2.5}` (dark);
- ``contrast-3``: :math:`\mathrm{clip}(3(x - \tfrac12) + \tfrac12)`, strong contrast;
- ``saturate-3``: chroma around the luma tripled, saturated colour;
- ``invert``: :math:`1 - x`, a negative;
- ``noise-0.2``: additive Gaussian noise of σ = 0.2, heavy noise;
- ``blur-3``: Gaussian blur of σ = 3 pixels;
- ``eurban``: the EUrban100 enhancement with kernel H (eq. S1);
- ``cartoon``: colours posterised to 3 levels per channel, a flat cartoon-like domain;
- ``texture``: a synthetic colour grating (random frequency, orientation and phase), another domain.

Each condition stays in [0, 1]; its target stays the untransformed crop, and its id names the transform
(``chelsea_10_20~invert``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import eurban

__all__ = ["SHIFTS", "shift", "shift_names"]

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def _gamma(g: float) -> Callable[[Tensor, torch.Generator], Tensor]:
    return lambda x, rng: x.clamp(0, 1) ** g


def _contrast(x: Tensor, rng: torch.Generator) -> Tensor:
    return (3 * (x - 0.5) + 0.5).clamp(0, 1)


def _saturate(x: Tensor, rng: torch.Generator) -> Tensor:
    luma = (x * _LUMA).sum(0, keepdim=True)
    return (luma + 3 * (x - luma)).clamp(0, 1)


def _invert(x: Tensor, rng: torch.Generator) -> Tensor:
    return 1 - x


def _noise(x: Tensor, rng: torch.Generator) -> Tensor:
    return (x + 0.2 * torch.randn(x.shape, generator=rng)).clamp(0, 1)


def _blur(x: Tensor, rng: torch.Generator, sigma: float = 3.0) -> Tensor:
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0].clamp(0, 1)


def _eurban(x: Tensor, rng: torch.Generator) -> Tensor:
    return eurban(x)


def _cartoon(x: Tensor, rng: torch.Generator) -> Tensor:
    return torch.round(x.clamp(0, 1) * 2) / 2


def _texture(x: Tensor, rng: torch.Generator) -> Tensor:
    _, h, w = x.shape
    freq, angle, phase = (torch.rand(3, generator=rng) * torch.tensor([0.5, math.pi, 2 * math.pi])).tolist()
    freq += 0.1  # cycles per pixel, 0.1 … 0.6
    colour = torch.rand(3, 1, 1, generator=rng)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    wave = torch.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    return (0.5 + 0.5 * wave * colour).clamp(0, 1)


#: the transforms of the rule, in the order crops cycle through them
SHIFTS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "gamma-0.4": _gamma(0.4),
    "gamma-2.5": _gamma(2.5),
    "contrast-3": _contrast,
    "saturate-3": _saturate,
    "invert": _invert,
    "noise-0.2": _noise,
    "blur-3": _blur,
    "eurban": _eurban,
    "cartoon": _cartoon,
    "texture": _texture,
}


def shift_names(n: int) -> list[str]:
    """The transform each of ``n`` crops gets: crop ``j`` the ``j mod T``-th of :data:`SHIFTS`."""
    names = list(SHIFTS)
    return [names[j % len(names)] for j in range(n)]


def shift(condition: Tensor, j: int, seed: int = 0) -> tuple[str, Tensor]:
    """Condition ``j`` (3, H, W) in [0, 1] under its transform; ``(transform name, transformed condition)``.

    The noise and the texture draw from a generator seeded by ``(seed, j)``, so an input's OOD version
    does not depend on the other inputs.
    """
    name = shift_names(j + 1)[j]
    rng = torch.Generator().manual_seed(1_000_003 * seed + j)
    return name, SHIFTS[name](condition.float(), rng).contiguous()
