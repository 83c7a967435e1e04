"""Conformance case: a flow of one's own (``examples/custom_flow.py``), declared with ``flowaudit.adapters.custom``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import Tensor, nn

from . import Case, fit_toy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_flow.py"


def _build() -> nn.Module:
    spec = importlib.util.spec_from_file_location("custom_flow_conformance", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return fit_toy(example.build(), lambda m, x, y: -m.log_prob(x, y).mean())  # build() seeds


def _sample(model: nn.Module, y: Tensor, latents: list[Tensor]) -> Tensor:
    return model.inverse(latents[0], y)


def _log_prob(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return model.log_prob(x, y)


CASES = [
    Case(
        id="custom-affine",
        build=_build,
        expected_kinds=["affine"] * 4,
        library_sample=_sample,
        library_log_prob=_log_prob,
    )
]
