"""Conformance cases: FrEIA ``SequenceINN`` / ``GraphINN`` with each coupling block, condition ``c=[y]``.

FrEIA has no base distribution; the convention (FrEIA's own examples) is a standard normal
on the output, so the library's log-density is ``log N(z; 0, I) + log|det J|`` from ``inn(x, c=[y])``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import Case, fit_toy


def _subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 32), nn.ReLU(), nn.Linear(32, c_out))


def _nll(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return -_log_prob(model, x, y).mean()


def _sequence(block: str, permute: bool = False, **kwargs):
    def build() -> nn.Module:
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        torch.manual_seed(0)
        inn = Ff.SequenceINN(2)
        for _ in range(2):
            inn.append(getattr(Fm, block), cond=0, cond_shape=(2,), subnet_constructor=_subnet, **kwargs)
            if permute:  # one-sided couplings transform one half only: permute between them
                inn.append(Fm.PermuteRandom, seed=0)
        return fit_toy(inn, _nll)

    return build


def _graph() -> nn.Module:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)
    inp, cond = Ff.InputNode(2, name="x"), Ff.ConditionNode(2, name="y")
    n1 = Ff.Node(
        inp, Fm.GLOWCouplingBlock, {"subnet_constructor": _subnet, "clamp": 1.5}, conditions=cond, name="glow1"
    )
    n2 = Ff.Node(n1, Fm.PermuteRandom, {"seed": 1}, name="perm")
    n3 = Ff.Node(n2, Fm.GLOWCouplingBlock, {"subnet_constructor": _subnet, "clamp": 1.5}, conditions=cond, name="glow2")
    inn = Ff.GraphINN([inp, cond, n1, n2, n3, Ff.OutputNode(n3, name="z")])
    return fit_toy(inn, _nll)


def _sample(model: nn.Module, y: Tensor, latents: list[Tensor]) -> Tensor:
    x, _ = model(latents[0], c=[y], rev=True)
    return x


def _log_prob(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    z, logdet = model(x, c=[y])
    return -0.5 * (z**2 + math.log(2 * math.pi)).sum(1) + logdet


def _case(id: str, build, kinds: list[str]) -> Case:
    return Case(
        id=id, build=build, expected_kinds=kinds, library_sample=_sample, library_log_prob=_log_prob, requires="FrEIA"
    )


AB = "affine-bounded"
CASES = [
    _case("freia-GLOWCouplingBlock", _sequence("GLOWCouplingBlock", clamp=2.0), [AB] * 4),
    _case("freia-RNVPCouplingBlock-tanh", _sequence("RNVPCouplingBlock", clamp_activation="TANH"), [AB] * 4),
    _case("freia-AllInOneBlock", _sequence("AllInOneBlock"), [AB] * 2),
    _case(
        "freia-AffineCouplingOneSided-sigmoid",
        _sequence("AffineCouplingOneSided", permute=True, clamp_activation="SIGMOID"),
        [AB] * 2,
    ),
    _case("freia-ConditionalAffineTransform", _sequence("ConditionalAffineTransform"), [AB] * 2),
    _case("freia-NICECouplingBlock", _sequence("NICECouplingBlock"), ["additive"] * 4),
    # one element per half: GIN's mean-centred log-scale is identically 0, an additive coupling
    _case("freia-GINCouplingBlock", _sequence("GINCouplingBlock"), ["additive"] * 4),
    _case("freia-GraphINN-GLOW", _graph, [AB] * 4),
]
