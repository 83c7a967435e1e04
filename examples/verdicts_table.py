"""Verdicts at a glance: every bundled model and one small flow per library, one row each.

Each row is ``flowaudit.inspect`` (2 samples per condition, the model's default conditions, CPU): the
model's Remark 2 verdict and the evidence it rests on, the largest inverse gain (1/c' met at a site while
sampling, and the largest ∞-norm gain of a non-site layer of the inverse pass), and the whole-inverse
certificate — its bound for latents with |z|∞ ≤ 6 — or the first layer or site that prevents one.
Library rows are seeded random flows (no training), built below.

    python examples/verdicts_table.py > examples/verdicts_table.txt
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
from flowaudit.adapters import load_model
from flowaudit.reference_models import bundled
from torch import nn

import flowaudit
from flowaudit.utils.format import fmt


def nflows_spline() -> nn.Module:
    """nflows: two RQ-spline couplings (linear tails past 3) around ActNorm, LU and a random permutation."""
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
    from nflows.transforms.lu import LULinear
    from nflows.transforms.normalization import ActNorm
    from nflows.transforms.permutations import RandomPermutation

    def net(n_in: int, n_out: int) -> nn.Module:
        return ResidualNet(n_in, n_out, hidden_features=16, context_features=2, num_blocks=1)

    def coupling(mask: list[int]) -> nn.Module:
        return PiecewiseRationalQuadraticCouplingTransform(mask, net, num_bins=4, tails="linear", tail_bound=3.0)

    torch.manual_seed(0)
    act = ActNorm(2)
    act.initialized = torch.tensor(True)
    steps = [coupling([1, 0]), act, LULinear(2, identity_init=False), RandomPermutation(2), coupling([0, 1])]
    return Flow(CompositeTransform(steps), StandardNormal([2])).eval()


def zuko_nsf() -> nn.Module:
    """zuko: a neural spline flow (autoregressive RQ splines, identity past ±5), three transforms."""
    from zuko.flows import NSF

    torch.manual_seed(0)
    return NSF(2, 2, transforms=3, bins=4, hidden_features=[16, 16]).eval()


def normflows_spline() -> nn.Module:
    """normflows: RQ-spline couplings with LU mixing, a conditional diagonal-Gaussian base."""
    import normflows as nf
    from normflows.distributions.base import ConditionalDiagGaussian

    torch.manual_seed(0)
    flows = []
    for i in range(2):
        flows.append(
            nf.flows.CoupledRationalQuadraticSpline(
                2, 1, 16, num_context_channels=2, num_bins=4, tail_bound=3.0, reverse_mask=bool(i % 2)
            )
        )
        flows.append(nf.flows.LULinearPermute(2))
    q0 = ConditionalDiagGaussian(2, nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4)))
    return nf.ConditionalNormalizingFlow(q0, flows).eval()


def freia_glow() -> nn.Module:
    """FrEIA: ActNorm, GLOW affine couplings (soft clamp 2) and random permutations."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)
    inn = Ff.SequenceINN(2)
    for k in range(2):
        inn.append(Fm.ActNorm)
        inn.append(Fm.GLOWCouplingBlock, cond=0, cond_shape=(2,), subnet_constructor=lambda i, o: nn.Linear(i, o))
        inn.append(Fm.PermuteRandom, seed=k)
    for m in inn.modules():
        if type(m).__name__ == "ActNorm":
            m.init_on_next_batch = False
    return inn.eval()


def custom_example() -> object:
    """The custom-adapter example (examples/custom_flow.py): an affine coupling declared by hand."""
    path = Path(__file__).with_name("custom_flow.py")
    spec = importlib.util.spec_from_file_location("custom_flow_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.build_adapter()


LIBRARY = {
    "nflows (RQ spline + ActNorm + LU)": nflows_spline,
    "zuko (NSF)": zuko_nsf,
    "normflows (RQ spline, conditional base)": normflows_spline,
    "FrEIA (GLOW + ActNorm)": freia_glow,
    "custom (examples/custom_flow.py)": custom_example,
}


def row(name: str, model: object) -> str:
    t0 = time.perf_counter()
    report = flowaudit.inspect(model, device="cpu", samples=2)
    m = report["model"]
    r2, cert = m["remark2"], m["certificate"]
    site_gain = max(
        (s["inverse_gain"]["max"] for s in m["sites"] if (s.get("inverse_gain") or {}).get("max") is not None),
        default=None,
    )
    layer_gain = max(
        (r["gain"] for r in cert.get("layers", []) if r["kind"] != "site" and r["gain"] is not None), default=None
    )
    if cert["certified"]:
        verdict_cert = f"|x|∞ ≤ {fmt(cert['gain'])}·|z|∞ + {fmt(cert['offset'])} (≤ {fmt(cert['bound'])})"
    else:
        first = cert["blocking"][0]
        why = first["why"] if len(first["why"]) <= 70 else first["why"][:67] + "…"
        verdict_cert = f"none: {first['site']} ({why})"
    evidence = "+".join(r2.get("rests_on") or []) or "–"
    secs = time.perf_counter() - t0
    cells = [name, r2["verdict"], evidence, fmt(site_gain), fmt(layer_gain), verdict_cert, f"{secs:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    print("| model | verdict | rests on | largest site 1/c' | largest layer gain | certificate | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in bundled():
        print(row(b["name"], load_model(b["name"])), flush=True)
    for name, build in LIBRARY.items():
        print(row(name, build()), flush=True)


if __name__ == "__main__":
    main()
