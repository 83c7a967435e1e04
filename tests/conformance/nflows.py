"""Conformance cases for nflows: one small conditional ``nflows.flows.Flow`` per block kind, trained on the toy.

Each flow maps the 2D toy ``x`` to noise given the 2D condition ``y``. nflows has no
public "sample from this noise" call, so ``library_sample`` runs the library's own
``Flow._sample`` path with the given latents in place of its internal ``randn``:
``_embedding_net`` → base (``ConditionalDiagonalNormal``: ``μ + σ ε``) → ``_transform.inverse``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import Case, fit_toy

__all__ = ["CASES"]

HIDDEN = 16


def _net(hidden: int = HIDDEN):
    from nflows.nn.nets import ResidualNet

    return lambda n_in, n_out: ResidualNet(n_in, n_out, hidden_features=hidden, context_features=2, num_blocks=1)


def _coupling_flow(make_coupling, base=None, embedding_net=None) -> nn.Module:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.permutations import ReversePermutation

    transform = CompositeTransform([make_coupling([1, 0]), ReversePermutation(2), make_coupling([1, 0])])
    return Flow(transform, base if base is not None else StandardNormal([2]), embedding_net=embedding_net)


def _nll(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return -m.log_prob(x, context=y).mean()


def _affine() -> nn.Module:
    from nflows.transforms.coupling import AffineCouplingTransform

    torch.manual_seed(0)
    return fit_toy(_coupling_flow(lambda mask: AffineCouplingTransform(mask, _net())), _nll)


def _additive() -> nn.Module:
    from nflows.transforms.coupling import AdditiveCouplingTransform

    torch.manual_seed(0)
    return fit_toy(_coupling_flow(lambda mask: AdditiveCouplingTransform(mask, _net())), _nll)


def _rq_spline() -> nn.Module:
    from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform

    torch.manual_seed(0)
    # with an embedding net: the encoder the OOD features are read from
    emb = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    flow = _coupling_flow(
        lambda mask: PiecewiseRationalQuadraticCouplingTransform(
            mask, _net(), num_bins=4, tails="linear", tail_bound=3.0
        ),
        embedding_net=emb,
    )
    return fit_toy(flow, _nll)


def _maf(make_ar) -> nn.Module:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.permutations import ReversePermutation

    torch.manual_seed(0)
    flow = Flow(CompositeTransform([make_ar(), ReversePermutation(2), make_ar()]), StandardNormal([2]))
    return fit_toy(flow, _nll)


def _maf_affine() -> nn.Module:
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform

    return _maf(
        lambda: MaskedAffineAutoregressiveTransform(
            features=2, hidden_features=HIDDEN, context_features=2, num_blocks=1
        )
    )


def _maf_rq_spline() -> nn.Module:
    from nflows.transforms.autoregressive import MaskedPiecewiseRationalQuadraticAutoregressiveTransform

    return _maf(
        lambda: MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
            features=2,
            hidden_features=HIDDEN,
            context_features=2,
            num_bins=4,
            tails="linear",
            tail_bound=3.0,
            num_blocks=1,
        )
    )


def _iaf_affine() -> nn.Module:
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
    from nflows.transforms.base import InverseTransform

    # an IAF: sampling runs the autoregressive transform's forward (one pass), density its inverse
    return _maf(
        lambda: InverseTransform(
            MaskedAffineAutoregressiveTransform(features=2, hidden_features=HIDDEN, context_features=2, num_blocks=1)
        )
    )


def _prior() -> nn.Module:
    from nflows.distributions.normal import ConditionalDiagonalNormal
    from nflows.transforms.coupling import AdditiveCouplingTransform

    torch.manual_seed(0)
    base = ConditionalDiagonalNormal([2], context_encoder=nn.Linear(2, 4))
    return fit_toy(_coupling_flow(lambda mask: AdditiveCouplingTransform(mask, _net()), base=base), _nll)


def _sample(m: nn.Module, y: Tensor, latents: list[Tensor]) -> Tensor:
    from nflows.distributions.normal import ConditionalDiagonalNormal

    context = m._embedding_net(y)
    z = latents[0]
    if isinstance(m._distribution, ConditionalDiagonalNormal):
        means, log_stds = m._distribution._compute_params(context)
        z = means + torch.exp(log_stds) * z
    return m._transform.inverse(z, context=context)[0]


def _log_prob(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return m.log_prob(x, context=y)


def _case(id: str, build, kinds: list[str], **kw) -> Case:
    return Case(
        id=id,
        requires="nflows",
        build=build,
        expected_kinds=kinds,
        library_sample=_sample,
        library_log_prob=_log_prob,
        **kw,
    )


CASES = [
    # nflows' affine scale is sigmoid(u + 2) + 1e-3 (read from _scale_and_shift): floor 1e-3 → affine
    _case("nflows-affine", _affine, ["affine", "affine"]),
    _case("nflows-additive", _additive, ["additive", "additive"]),
    _case("nflows-rq-spline", _rq_spline, ["rq-spline", "rq-spline"]),
    # MAF's scale is softplus(u) + 1e-3: floor 1e-3, no ceiling → affine
    _case("nflows-maf-affine", _maf_affine, ["affine", "affine"]),
    # inverted, softplus(u) + 1e-3 ∈ (1e-3, ∞) becomes c' = 1/s ∈ (0, 1000): floor 0 → affine
    _case("nflows-iaf-affine", _iaf_affine, ["affine", "affine"]),
    _case("nflows-maf-rq-spline", _maf_rq_spline, ["rq-spline", "rq-spline"]),
    # the prior's c' = 1/σ(y) does not depend on x; across the probed conditions σ varies (measured ratio ≈ 0.05)
    _case(
        "nflows-prior",
        _prior,
        ["additive", "additive", "prior"],
        expected_verdicts=["compliant", "compliant", "violates"],
    ),
]
