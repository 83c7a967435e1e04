r"""A conditional flow written from scratch, made auditable in a few lines.

The flow is none of ours: its own encoder :math:`h = g(y)` and its own affine coupling

.. math:: [x_a, x_b] \mapsto [x_a,\; s\,x_b + t], \qquad s = \mathrm{softplus}(a) + 10^{-3},
          \quad (a, t) = \mathrm{NN}([x_a, h]),

with a hand-written scale. Its derivative is :math:`c' = s`, nothing keeps :math:`s` away from
:math:`10^{-3}`, so its inverse gain :math:`1/s` can reach 1000 on an unbounded tail: Remark 2's
``violates``. :func:`auditable` is all the audit needs (which encoder layers to hook, which
method each coupling runs while sampling, and how to read the visited points and ``(s, t)``
from one such call); ``c'`` comes from forward-mode autodiff of the declared map.

Run it::

    python examples/custom_flow.py                  # train briefly, inspect and scan, save w.pt
    flowaudit inspect --model examples.custom_flow:build --weights w.pt
    flowaudit scan --model examples.custom_flow:build --weights w.pt --data toy.npz --out report

``build`` returns the flow (its class declares ``__flowaudit__``); ``build_adapter`` returns the
adapter itself. Either works as a ``--model`` factory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flowaudit.adapters.custom import CustomAdapter, site
from torch import Tensor, nn

__all__ = ["Encoder", "AffineCoupling", "ToyFlow", "auditable", "build", "build_adapter", "train"]


class Encoder(nn.Module):
    """The conditioning network :math:`g(y)`: 2 → ``width`` → ``features``."""

    def __init__(self, features: int = 8, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, features), nn.Tanh())

    def forward(self, y: Tensor) -> Tensor:
        return self.net(y)


class AffineCoupling(nn.Module):
    """:math:`x_b \\mapsto s x_b + t` given :math:`x_a` and :math:`h`; ``flip`` picks the coordinate :math:`x_b`."""

    def __init__(self, flip: bool, features: int = 8, width: int = 32):
        super().__init__()
        self.flip = flip
        self.net = nn.Sequential(nn.Linear(1 + features, width), nn.ReLU(), nn.Linear(width, 2))

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, :1], x[:, 1:]
        return (xb, xa) if self.flip else (xa, xb)

    def join(self, xa: Tensor, xb: Tensor) -> Tensor:
        return torch.cat([xb, xa] if self.flip else [xa, xb], 1)

    def params(self, xa: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        a, t = self.net(torch.cat([xa, h], 1)).chunk(2, 1)
        return F.softplus(a) + 1e-3, t  # the hand-written scale

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = self.split(x)
        s, t = self.params(xa, h)
        return self.join(xa, s * xb + t), s.log().sum(1)

    def inverse(self, z: Tensor, h: Tensor) -> Tensor:
        za, zb = self.split(z)
        s, t = self.params(za, h)
        return self.join(za, (zb - t) / s)


class ToyFlow(nn.Module):
    """:math:`z = f(x; y)` on the 2D toy of the paper: ``n`` alternating couplings, standard-normal base."""

    def __init__(self, n: int = 4, features: int = 8):
        super().__init__()
        self.encoder = Encoder(features)
        self.couplings = nn.ModuleList(AffineCoupling(i % 2 == 1, features) for i in range(n))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h, logdet = self.encoder(y), x.new_zeros(len(x))
        for c in self.couplings:
            x, ld = c(x, h)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.encoder(y)
        for c in reversed(self.couplings):
            z = c.inverse(z, h)
        return z

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        z, logdet = self(x, y)
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) + logdet

    def sample(self, y: Tensor, temperature: float = 0.9, generator: torch.Generator | None = None) -> Tensor:
        return self.inverse(temperature * torch.randn(len(y), 2, generator=generator), y)

    def __flowaudit__(self) -> CustomAdapter:
        return auditable(self)


# -- what makes it auditable ---------------------------------------------------------------------


def read_coupling(coupling: AffineCoupling, args: tuple, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One ``coupling.inverse(z, h)`` call that returned ``x``: the site mapped ``x_b`` with ``(s, t)``."""
    xa, xb = coupling.split(x)
    return xb, coupling.params(xa, args[1])


def auditable(flow: ToyFlow) -> CustomAdapter:
    return CustomAdapter(
        flow,
        condition_shape=(2,),
        latent_shape=(2,),
        output_range=(-0.5, 0.5),
        inverse=flow.inverse,
        forward=flow,
        encoder=["encoder.net.1", "encoder.net.3"],
        sites=[site(c.inverse, read=read_coupling, kind="affine") for c in flow.couplings],
    )


# -- factories for the CLI (`--model examples.custom_flow:build --weights w.pt`) -----------------


def build() -> ToyFlow:
    torch.manual_seed(0)
    return ToyFlow().eval()


def build_adapter() -> CustomAdapter:
    return auditable(build())


def train(flow: ToyFlow, iters: int = 400, seed: int = 0) -> ToyFlow:
    """Maximum likelihood on the bundled toy pairs (eq. S2), Adam, batch 256."""
    from flowaudit.reference_models.toy import toy_data

    x, y = toy_data(4000, seed=seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    flow.train()
    for _ in range(iters):
        idx = torch.randint(len(x), (256,), generator=g)
        loss = -flow.log_prob(x[idx], y[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()


if __name__ == "__main__":
    from flowaudit.reference_models.toy import toy_data

    import flowaudit

    torch.set_num_threads(1)
    flow = train(build())
    torch.save(flow.state_dict(), "w.pt")
    print(flowaudit.inspect(flow, device="cpu").summary())
    report = flowaudit.scan(
        flow,
        toy_data(200, seed=1)[1],
        ood=toy_data(200, seed=1, ood=True)[1],
        fit_data=toy_data(2000, seed=0)[1],
        samples=10,
        device="cpu",
    )
    print(report.summary())
    print("Remark 2 violations:", report.violations())
    print("wrote w.pt: flowaudit inspect --model examples.custom_flow:build --weights w.pt")
