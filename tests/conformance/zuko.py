"""Conformance cases for zuko: one small conditional lazy flow per block kind, trained on the toy.

``library_sample`` maps the latents onto the base of ``flow(y)`` (a ``DiagNormal``:
``μ + σ ε``) and runs the built transform's inverse, which is what
``flow(y).sample()`` does after drawing ``ε`` itself. zuko's ``NICE`` is affine by
default (it is ``RealNVP``); the additive NICE of Dinh et al. 2014 is
``NICE(..., univariate=AdditiveTransform, shapes=[()])``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import Case, fit_toy

__all__ = ["CASES"]

NET = {"hidden_features": [16, 16]}


def _nll(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return -m(y).log_prob(x).mean()


def _fit(make) -> nn.Module:
    torch.manual_seed(0)
    return fit_toy(make(), _nll)


def _realnvp() -> nn.Module:
    from zuko.flows import RealNVP

    return _fit(lambda: RealNVP(2, 2, transforms=2, **NET))


def _nice() -> nn.Module:
    from zuko.flows import NICE
    from zuko.transforms import AdditiveTransform

    return _fit(lambda: NICE(2, 2, transforms=2, univariate=AdditiveTransform, shapes=[()], **NET))


def _nsf() -> nn.Module:
    from zuko.flows import NSF

    return _fit(lambda: NSF(2, 2, transforms=2, bins=4, **NET))


def _maf() -> nn.Module:
    from zuko.flows import MAF

    return _fit(lambda: MAF(2, 2, transforms=2, **NET))


def _naf() -> nn.Module:
    from zuko.flows import NAF

    return _fit(lambda: NAF(2, 2, transforms=2, signal=4, network={"hidden_features": [8]}, **NET))


def _sample(m: nn.Module, y: Tensor, latents: list[Tensor]) -> Tensor:
    d = m(y)
    return d.transform.inv(d.base.mean + d.base.stddev * latents[0])


def _log_prob(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return m(y).log_prob(x)


def _case(id: str, build, kinds: list[str], **kw) -> Case:
    return Case(
        id=id,
        requires="zuko",
        build=build,
        expected_kinds=kinds,
        library_sample=_sample,
        library_log_prob=_log_prob,
        **kw,
    )


CASES = [
    # MonotonicAffineTransform: c' = exp(a / (1 + |a / log 1e-3|)) ∈ (1e-3, 1e3), read from built objects → affine
    _case("zuko-realnvp", _realnvp, ["affine", "affine"]),
    _case("zuko-nice", _nice, ["additive", "additive"]),
    _case("zuko-nsf", _nsf, ["rq-spline", "rq-spline"]),
    _case("zuko-maf", _maf, ["affine", "affine"]),
    # NAF: monotonic-MLP transforms (unknown closed form) with a soft clip between them
    # the soft clip's c' = (1 + |x|/B)^-2 → 0 violates under any tail probe; the monotonic MLPs (no structure)
    # are left to the measurement: ratio 0.41 (violates) with the |x| ∈ [1, 1e4] probe, ≈ 0.7-0.8
    # (inconclusive) with the decade-settling probe, so their verdict is not pinned
    _case("zuko-naf", _naf, ["unknown", "unknown", "unknown"], expected_verdicts=[None, "violates", None]),
]
