"""Conformance cases: normflows ``ConditionalNormalizingFlow`` with its context-taking blocks.

normflows' ``forward`` samples (latent → data) and ``inverse`` encodes. Its own sampler draws the
base noise with ``torch.randn``; to sample the same latents through the library's own
``model.sample``, the case replays ours through that one call.
"""

from __future__ import annotations

from unittest import mock

import torch
from torch import Tensor, nn

from . import Case, fit_toy


def _build(block: str, prior: bool = False):
    def build() -> nn.Module:
        import normflows as nf
        from normflows.distributions.base import ConditionalDiagGaussian

        torch.manual_seed(0)
        flows = []
        for i in range(2):
            if block == "MaskedAffineAutoregressive":
                flows.append(nf.flows.MaskedAffineAutoregressive(2, 32, context_features=2, num_blocks=1))
            elif block == "CoupledRationalQuadraticSpline":
                flows.append(
                    nf.flows.CoupledRationalQuadraticSpline(
                        2, 1, 32, num_context_channels=2, num_bins=8, tail_bound=3.0, reverse_mask=bool(i % 2)
                    )
                )
            else:
                flows.append(
                    nf.flows.AutoregressiveRationalQuadraticSpline(
                        2, 1, 32, num_context_channels=2, num_bins=8, tail_bound=3.0
                    )
                )
            flows.append(nf.flows.LULinearPermute(2))
        if prior:
            q0 = ConditionalDiagGaussian(2, nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4)))
        else:
            q0 = nf.distributions.DiagGaussian(2)
        model = nf.ConditionalNormalizingFlow(q0, flows)
        return fit_toy(model, lambda m, x, y: -m.log_prob(x, context=y).mean(), steps=100)

    return build


def _sample(model: nn.Module, y: Tensor, latents: list[Tensor]) -> Tensor:
    eps = latents[0]
    # q0 draws ε with torch.randn inside model.sample: hand it ours
    with mock.patch.object(torch, "randn", lambda *args, **kwargs: eps.clone()):
        x, _ = model.sample(len(y), context=y)
    return x


def _log_prob(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return model.log_prob(x, context=y)


def _case(id: str, build, kinds: list[str], **kw) -> Case:
    return Case(
        id=id,
        build=build,
        expected_kinds=kinds,
        library_sample=_sample,
        library_log_prob=_log_prob,
        requires="normflows",
        **kw,
    )


RQ = "rq-spline"
CASES = [
    _case("normflows-MaskedAffineAutoregressive", _build("MaskedAffineAutoregressive"), ["affine-bounded"] * 2),
    # encode order: flows[-1] … flows[0], then the conditional base; each coupling's unconditional
    # spline on its identity half follows its conditional half
    _case("normflows-CoupledRationalQuadraticSpline", _build("CoupledRationalQuadraticSpline"), [RQ] * 4),
    _case("normflows-AutoregressiveRationalQuadraticSpline", _build("AutoregressiveRationalQuadraticSpline"), [RQ] * 2),
    _case(
        "normflows-MAF-ConditionalDiagGaussian",
        _build("MaskedAffineAutoregressive", prior=True),
        ["affine-bounded", "affine-bounded", "prior"],
    ),
]
