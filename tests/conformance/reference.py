"""Conformance cases: the bundled reference toy (:class:`~flowaudit.reference_models.toy.Toy2D`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import Case, fit_toy


def _build(coupling: str):
    def build() -> nn.Module:
        from flowaudit.reference_models.toy import Toy2D

        torch.manual_seed(0)
        flow = Toy2D(coupling=coupling, steps=2, hidden=32, depth=2, feature_dim=8)
        return fit_toy(flow, lambda m, x, y: -m.log_prob(x, y).mean())

    return build


def _sample(model: nn.Module, y: Tensor, latents: list[Tensor]) -> Tensor:
    return model.reverse(latents, y)


def _log_prob(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return model.log_prob(x, y)


CASES = [
    Case(
        id=f"reference-{kind}",
        build=_build(kind),
        expected_kinds=[kind, kind],
        library_sample=_sample,
        library_log_prob=_log_prob,
    )
    for kind in ("affine", "additive", "modified-rq-spline")
]
