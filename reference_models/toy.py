r"""The 2D toy of Hong et al. 2023 (§3.2.1, S1.2): data, OOD shift and the flow.

Data (eq. S2, eq. 7):

.. math:: x = M u,\; u \sim \mathcal{U}(-1, 1)^2,\quad
          M = \begin{bmatrix} \sqrt3/4 & -1/10 \\ 1/4 & -\sqrt3/10 \end{bmatrix},\quad
          y = A x + \mathcal{N}(0, 0.01^2 I),\;
          A = \begin{bmatrix} 0.7 & 0.3 \\ 0.3 & 0.7 \end{bmatrix}

and the OOD conditions :math:`y_{OOD} = y + [0.8, -0.8]`.

Flow (Fig. 3a): ``steps`` × (ActNorm → invertible 1×1 → conditional coupling)
with a standard-normal base. The conditioning network :math:`g_\theta` is a
small MLP (``encoder``) whose output is the feature the OOD score hooks; each
coupling's NN is a fully connected net of ``depth`` hidden layers of width
``hidden`` on :math:`[x_a, g(y)]` whose output parameterises the elementwise
map of the chosen kind on :math:`x_b`.

Example:
    >>> flow = Toy2D(coupling="modified-rq-spline")
    >>> x = flow.sample(toy_data(5, seed=0)[1], temperature=1.0)
    >>> x.shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ReferenceFlow
from .couplings import Elementwise, make_elementwise
from .glow import ActNorm, InvConv1x1

__all__ = ["M", "A", "OOD_SHIFT", "toy_data", "Toy2D", "Coupling"]

M = torch.tensor([[math.sqrt(3) / 4, -1 / 10], [1 / 4, -math.sqrt(3) / 10]])
A = torch.tensor([[0.7, 0.3], [0.3, 0.7]])
OOD_SHIFT = torch.tensor([0.8, -0.8])


def toy_data(n: int, seed: int = 0, noise: float = 0.01, ood: bool = False) -> tuple[Tensor, Tensor]:
    """Draw ``n`` pairs ``(x, y)`` of eq. S2 / eq. 7; ``ood`` shifts ``y`` by [0.8, −0.8]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 2, generator=g) * 2 - 1
    x = u @ M.T
    y = x @ A.T + noise * torch.randn(n, 2, generator=g)
    if ood:
        y = y + OOD_SHIFT
    return x, y


def _mlp(d_in: int, d_out: int, hidden: int, depth: int, zero_last: bool) -> nn.Sequential:
    dims = [d_in] + [hidden] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    last = nn.Linear(dims[-1], d_out)
    if zero_last:  # start every coupling at the identity-like point of its kind
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class Coupling(nn.Module):
    r"""Conditional coupling :math:`[x_a, x_b] \mapsto [x_a, c(x_b; \mathrm{NN}([x_a, g(y)]))]`."""

    def __init__(self, site: Elementwise, net: nn.Module, split: int):
        super().__init__()
        self.net, self.site, self.split = net, site, split

    def forward(self, x: Tensor, cond: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, : self.split], x[:, self.split :]
        h = self.net(torch.cat([xa, cond], 1))
        xb, ladj = self.site(xb, h, reverse=reverse)
        return torch.cat([xa, xb], 1), ladj.flatten(1).sum(1)


class _Step(nn.Module):
    def __init__(self, coupling: Coupling):
        super().__init__()
        self.actnorm = ActNorm(2, spatial_dims=0)
        self.invconv = InvConv1x1(2)
        self.coupling = coupling


class Toy2D(ReferenceFlow):
    """The paper's 2D conditional flow with a selectable coupling kind (see module docstring).

    Args:
        coupling: coupling kind (``affine``, ``affine-bounded``, ``additive``,
            ``rq-spline``, ``modified-rq-spline``).
        steps: number of ActNorm → 1×1 → coupling steps (paper: 4).
        hidden, depth: coupling NN width and hidden-layer count (paper: 64, 4).
        feature_dim: width of the conditioning feature ``g(y)``; 0 feeds ``y`` raw.
        zero_init: zero-initialise each coupling NN's last layer.
    """

    task = "toy"
    condition_shape = (2,)
    # The data lie in about [-0.54, 0.54]²; widened by half the range on each
    # side (the rule that widens images' [0, 1] to [-0.5, 1.5]) this is the paper's [-1, 1]².
    output_range = (-0.5, 0.5)

    def __init__(
        self,
        coupling: str = "affine",
        steps: int = 4,
        hidden: int = 64,
        depth: int = 4,
        feature_dim: int = 16,
        zero_init: bool = True,
    ):
        super().__init__(
            coupling=coupling, steps=steps, hidden=hidden, depth=depth, feature_dim=feature_dim, zero_init=zero_init
        )
        self.encoder = _mlp(2, feature_dim, hidden, 2, zero_last=False) if feature_dim else None
        cond_dim = feature_dim or 2
        site_proto = make_elementwise(coupling)
        self.flow = nn.ModuleList(
            _Step(
                Coupling(
                    make_elementwise(coupling),
                    _mlp(1 + cond_dim, site_proto.params_per_dim, hidden, depth, zero_init),
                    1,
                )
            )
            for _ in range(steps)
        )

    def encoder_module(self) -> nn.Module | None:
        return self.encoder

    def default_feature_layers(self) -> list[str]:
        return ["encoder"] if self.encoder is not None else []

    def encode(self, y: Tensor) -> Tensor:
        return self.encoder(y) if self.encoder is not None else y

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        cond = self.encode(y)
        logdet = x.new_zeros(x.shape[0])
        for step in self.flow:
            x, ld = step.actnorm(x)
            logdet = logdet + ld
            x, ld = step.invconv(x)
            logdet = logdet + ld
            x, ld = step.coupling(x, cond)
            logdet = logdet + ld
        return [x], logdet

    def reverse(self, latents: list[Tensor], y: Tensor) -> Tensor:
        cond = self.encode(y)
        (x,) = latents
        for step in reversed(self.flow):
            x, _ = step.coupling(x, cond, reverse=True)
            x, _ = step.invconv(x, reverse=True)
            x, _ = step.actnorm(x, reverse=True)
        return x

    def latent_shapes(self, y: Tensor) -> list[tuple[int, ...]]:
        return [(y.shape[0], 2)]

    def trace_layers(self) -> list[str]:
        names = []
        for i in reversed(range(len(self.flow))):
            names += [f"flow.{i}.coupling", f"flow.{i}.invconv", f"flow.{i}.actnorm"]
        return names
