"""The whole-inverse certificate: every layer of the inverse pass bounded, composed, and never exceeded.

Property: over the bundled flows and one flow per library (random weights, ActNorm, invertible 1×1
convolutions, LU layers and priors included), no sample and no attack result exceeds a certificate that
was issued; each library's per-layer bound holds layer by layer on the traced pass. Findings: a certified
spline toy with one ActNorm at log-scale −8, or a near-singular 1×1 convolution, gets no certificate and
the layer is named.
"""

from __future__ import annotations

import math

import pytest
import torch
from flowaudit.adapters import adapt
from flowaudit.adapters.bounds import LayerBound
from flowaudit.adapters.custom import CustomAdapter, site
from flowaudit.reference_models.glow import ActNorm
from flowaudit.reference_models.toy import Toy2D, toy_data
from torch import Tensor, nn

import flowaudit
from flowaudit.evidence.certificate import LATENT_ABS, model_certificate

Y = toy_data(8, seed=3)[1]


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random ActNorm scales and biases (log-scale in [-1, 1]) and random, non-orthogonal 1×1 weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "ActNorm" and hasattr(m, "logs"):
                m.logs.copy_(torch.rand(m.logs.shape, generator=g) * 2 - 1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if type(m).__name__ == "InvConv1x1" and not m.fixed:
                n = m.weight.shape[0]
                m.weight.copy_(torch.randn(n, n, generator=g) + 2 * torch.eye(n))
    return model.eval()


def spline_toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Toy2D(coupling="rq-spline", steps=3, hidden=16, depth=2, feature_dim=4, zero_init=False)
    return _randomise(model, seed)


def spline_sr(seed: int = 0) -> nn.Module:
    """A tiny SR flow with RQ-spline sites and a split whose log σ does not read the kept half."""
    from flowaudit.reference_models.sr import Split2d, SRFlow

    torch.manual_seed(seed)
    model = SRFlow(
        scale=2, L=2, K=1, nf=4, nb=1, gc=4, hidden_channels=4, patch=8, coupling="rq-spline", correct_splits=True
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Conv2dZeros":  # conditioners and splits: non-zero, so the splines bend
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.05)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, Split2d):
                m.conv.weight[1::2] = 0.0  # log σ = its bias: a constant σ
    return _randomise(model, seed)


def nflows_flow(seed: int = 0) -> nn.Module:
    from nflows.distributions.normal import DiagonalNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
    from nflows.transforms.lu import LULinear
    from nflows.transforms.normalization import ActNorm as NActNorm
    from nflows.transforms.permutations import RandomPermutation

    torch.manual_seed(seed)

    def net(n_in, n_out):
        return ResidualNet(n_in, n_out, hidden_features=8, context_features=2, num_blocks=1)

    def coupling(mask):
        return PiecewiseRationalQuadraticCouplingTransform(mask, net, num_bins=4, tails="linear", tail_bound=2.0)

    act = NActNorm(2)
    lu = LULinear(2, identity_init=False)
    transform = CompositeTransform([coupling([1, 0]), act, lu, RandomPermutation(2), coupling([0, 1])])
    base = DiagonalNormal([2])
    with torch.no_grad():
        act.log_scale.copy_(torch.rand(2) * 2 - 1)
        act.shift.copy_(torch.randn(2))
        act.initialized = torch.tensor(True)
        lu.bias.copy_(torch.randn(2))
        base.mean_.copy_(torch.randn(2))
        base.log_std_.copy_(torch.rand(2) - 0.5)
    return Flow(transform, base).eval()


def zuko_flow(seed: int = 0) -> nn.Module:
    from zuko.flows import NSF

    torch.manual_seed(seed)
    return NSF(2, 2, transforms=3, bins=4, hidden_features=[8, 8]).eval()


def normflows_flow(seed: int = 0) -> nn.Module:
    import normflows as nf

    torch.manual_seed(seed)
    flows = []
    for i in range(2):
        flows.append(
            nf.flows.CoupledRationalQuadraticSpline(
                2, 1, 8, num_context_channels=2, num_bins=4, tail_bound=3.0, reverse_mask=bool(i % 2)
            )
        )
        flows.append(nf.flows.LULinearPermute(2, identity_init=False))  # normflows' ActNorm takes no context
        flows.append(nf.flows.InvertibleAffine(2, use_lu=False))
    q0 = nf.distributions.DiagGaussian(2)
    model = nf.ConditionalNormalizingFlow(q0, flows)
    with torch.no_grad():
        q0.loc.copy_(torch.randn(q0.loc.shape))
        q0.log_scale.copy_(torch.rand(q0.log_scale.shape) - 0.5)
    model.condition_shape = (2,)
    return model.eval()


def freia_flow(seed: int = 0) -> nn.Module:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(seed)
    inn = Ff.SequenceINN(2)
    inn.append(Fm.ActNorm)
    inn.append(Fm.GLOWCouplingBlock, cond=0, cond_shape=(2,), subnet_constructor=lambda i, o: nn.Linear(i, o))
    inn.append(Fm.PermuteRandom, seed=seed)
    inn.append(Fm.FixedLinearTransform, M=torch.randn(2, 2) + 2 * torch.eye(2), b=torch.randn(2))
    with torch.no_grad():
        act = inn.module_list[0]
        act.scale.copy_(torch.rand(act.scale.shape) * 2 - 1)
        act.bias.copy_(torch.randn(act.bias.shape))
        act.init_on_next_batch = False
    return inn.eval()


LIBRARIES = {
    "nflows": (nflows_flow, True),
    "zuko": (zuko_flow, True),
    "normflows": (normflows_flow, True),
    "freia": (freia_flow, False),  # affine couplings: their shift t is unbounded, never certified
}


def _check_samples(adapter, cert: dict, seeds=(0, 1, 2), scales=(1.0, 30.0)) -> float:
    """Sample at several latent scales; every sample within G·|z|∞ + D. Returns the largest |x|∞ / bound."""
    worst = 0.0
    for seed in seeds:
        for scale in scales:
            latents = adapter.sample_latents(Y, 1.0, torch.Generator().manual_seed(seed))
            latents = [z * scale for z in latents]
            with torch.no_grad():
                x = adapter.sample(Y, latents)
            z_abs = torch.stack([z.flatten(1).abs().amax(1) for z in latents], 1).amax(1).double()
            bound = cert["gain"] * z_abs + cert["offset"]
            x_abs = x.flatten(1).abs().amax(1).double()
            assert bool(torch.isfinite(x_abs).all())
            assert bool((x_abs <= bound * (1 + 1e-5) + 1e-6).all()), (float((x_abs / bound).max()), cert["gain"])
            worst = max(worst, float((x_abs / bound).max()))
    return worst


# -- the property -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_spline_toy_with_random_actnorm_and_1x1_is_certified_and_never_exceeded(seed):
    model = spline_toy(seed)
    report = flowaudit.inspect(model, Y, device="cpu", samples=2)
    cert = report["model"]["certificate"]
    assert cert["certified"], cert["blocking"]
    kinds = {row["kind"] for row in cert["layers"]}
    assert {"site", "actnorm", "1x1-conv"} <= kinds
    assert cert["bound"] == pytest.approx(cert["gain"] * LATENT_ABS + cert["offset"])
    assert cert["gain"] > 1.0  # the random 1×1s and ActNorms do grow values: the sites alone would say less
    assert _check_samples(adapt(model), cert) > 1e-3


def test_spline_sr_with_split_prior_is_certified_and_never_exceeded():
    model = spline_sr(0)
    y = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    report = flowaudit.inspect(model, y, device="cpu", samples=1)
    cert = report["model"]["certificate"]
    assert cert["certified"], cert["blocking"]
    assert {"split", "squeeze", "actnorm", "1x1-conv", "site"} <= {row["kind"] for row in cert["layers"]}
    adapter = adapt(model)
    for scale in (1.0, 20.0):
        latents = [z * scale for z in adapter.sample_latents(y, 1.0, torch.Generator().manual_seed(1))]
        with torch.no_grad():
            x = adapter.sample(y, latents)
        z_abs = max(float(z.abs().max()) for z in latents)
        assert float(x.abs().max()) <= cert["gain"] * z_abs + cert["offset"]


def test_split_whose_sigma_reads_the_kept_half_blocks_the_certificate():
    model = spline_sr(0)
    split = next(m for m in model.modules() if type(m).__name__ == "Split2d")
    with torch.no_grad():
        split.conv.weight[1::2] = 0.01
    layers = adapt(model).inverse_layers()
    row = next(b for b in layers if b.kind == "split")
    assert row.gain is None and "log σ" in row.why


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_library_flows_never_exceed_an_issued_certificate(library):
    build, certified = LIBRARIES[library]
    pytest.importorskip({"freia": "FrEIA", "normflows": "normflows", "nflows": "nflows", "zuko": "zuko"}[library])
    model = build(0)
    report = flowaudit.inspect(model, Y, device="cpu", samples=2)
    cert = report["model"]["certificate"]
    assert cert["certified"] is certified, cert["blocking"]
    if certified:
        _check_samples(adapt(model), cert)
    else:
        first = cert["blocking"][0]
        assert first["site"] and first["why"]


class _Trace:
    """Records each traced layer's largest |value| per input, in the order the pass reports them."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Tensor]] = []

    def layer(self, name: str, x: Tensor) -> None:
        self.rows.append((name, x.detach().flatten(1).abs().amax(1).double()))

    def site(self, name: str, gain: Tensor, params) -> None:
        pass


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_each_library_layer_bound_holds_layer_by_layer(library):
    """The per-layer rules on the traced pass: ‖out‖∞ ≤ g·‖in‖∞ + d for every bounded layer."""
    build, _ = LIBRARIES[library]
    pytest.importorskip({"freia": "FrEIA", "normflows": "normflows", "nflows": "nflows", "zuko": "zuko"}[library])
    adapter = adapt(build(1))
    layers = {b.name: b for b in adapter.inverse_layers()}
    assert set(layers) == set(adapter.layer_names())
    bounded = [b for b in layers.values() if b.gain is not None and b.kind != "site"]
    assert bounded
    checked = 0
    for scale in (1.0, 10.0):
        latents = [z * scale for z in adapter.sample_latents(Y, 1.0, torch.Generator().manual_seed(2))]
        trace = _Trace()
        with torch.no_grad():
            adapter.sample(Y, latents, trace)
        prev = latents[0].flatten(1).abs().amax(1).double()
        for name, out in trace.rows:
            b = layers[name]
            if b.gain is not None and b.kind != "site":
                assert bool((out <= b.gain * prev * (1 + 1e-5) + b.offset + 1e-6).all()), (name, b)
                checked += 1
            prev = out
    assert checked == 2 * len(bounded)


def test_the_attack_never_exceeds_an_issued_certificate_and_reports_it():
    model = spline_toy(0)
    rep = flowaudit.attack(model, Y[:4], budget="none", steps=8, samples=2, device="cpu")
    cert = rep["model"]["certificate"]
    assert cert["certified"]
    assert rep["attack"]["summary"]["worst_max_abs"] <= cert["bound"]
    assert all("worst_case" in s["remark2"] for s in rep["model"]["sites"])
    assert any(s["remark2"]["worst_case"] is not None for s in rep["model"]["sites"])


def test_the_attack_on_a_library_flow_never_exceeds_its_certificate():
    pytest.importorskip("nflows")
    rep = flowaudit.attack(nflows_flow(0), Y[:4], budget="none", objective="max-abs", steps=6, samples=2, device="cpu")
    cert = rep["model"]["certificate"]
    assert cert["certified"], cert["blocking"]
    assert rep["attack"]["summary"]["worst_max_abs"] <= cert["bound"]


# -- the findings -------------------------------------------------------------------------------------


def test_actnorm_at_log_scale_minus_8_blocks_the_certificate_and_is_named():
    model = spline_toy(0)
    with torch.no_grad():
        model.flow[1].actnorm.logs.fill_(-8.0)
    report = flowaudit.inspect(model, Y, device="cpu", samples=2)
    cert = report["model"]["certificate"]
    assert not cert["certified"] and cert["bound"] is None
    assert cert["blocking"][0]["site"] == "flow.1.actnorm" and "actnorm" in cert["blocking"][0]["why"]
    row = next(r for r in cert["layers"] if r["name"] == "flow.1.actnorm")
    assert row["gain"] == pytest.approx(math.exp(8.0))
    assert "flow.1.actnorm" in report.summary()
    # and it does blow up: far beyond what the sites alone allow
    adapter = adapt(model)
    with torch.no_grad():
        x = adapter.sample(Y, [z * 5 for z in adapter.sample_latents(Y, 1.0, torch.Generator().manual_seed(0))])
    assert float(x.abs().max()) > 1e3


def test_near_singular_1x1_conv_blocks_the_certificate_and_is_named():
    model = spline_toy(0)
    with torch.no_grad():
        model.flow[2].invconv.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-6]]))
    cert = flowaudit.inspect(model, Y, device="cpu", samples=2)["model"]["certificate"]
    assert not cert["certified"]
    assert cert["blocking"][0]["site"] == "flow.2.invconv"
    assert "1x1-conv" in cert["blocking"][0]["why"]


def _bent(x: Tensor, k) -> Tensor:  # identity: a declared rq-spline site with identity tails past 1
    return x


class _CustomFlow(nn.Module):
    """A custom flow: one declared spline site, then a bundled ActNorm the author did not declare."""

    def __init__(self, log_scale: float):
        super().__init__()
        self.net = nn.Linear(2, 2)
        self.norm = ActNorm(2, spatial_dims=0)
        with torch.no_grad():
            self.norm.logs.fill_(log_scale)

    def step(self, z: Tensor, y: Tensor) -> Tensor:
        return z

    def inverse(self, z: Tensor, y: Tensor) -> Tensor:
        return self.norm(self.step(z, y), reverse=True)[0]

    def forward(self, x: Tensor, y: Tensor):
        z, ld = self.norm(x)
        return z, ld


def _custom(log_scale: float) -> CustomAdapter:
    flow = _CustomFlow(log_scale)
    s = site(flow.step, read=lambda m, args, x: (x, m.net(args[1])), map=_bent, kind="rq-spline", tail_start=1.0)
    return CustomAdapter(
        flow,
        condition_shape=(2,),
        latent_shape=(2,),
        inverse=flow.inverse,
        forward=flow,
        sites=[s],
        output_range=(-3.0, 3.0),
    )


def test_a_custom_flow_sees_its_recognised_modules():
    cert = flowaudit.inspect(_custom(-8.0), Y, device="cpu", samples=2)["model"]["certificate"]
    assert not cert["certified"] and cert["blocking"][0]["site"] == "norm"
    adapter = _custom(-0.5)
    cert = flowaudit.inspect(adapter, Y, device="cpu", samples=2)["model"]["certificate"]
    assert cert["certified"] and "custom flow" in cert["scope"] and "without their order" in cert["scope"]
    assert cert["gain"] == pytest.approx(math.exp(0.5))
    _check_samples(adapter, cert)


def test_composition_formula():
    """G = Π max(g, 1), D = Σ (Π after) g·d in sampling order; a layer with no bound blocks and is named."""
    entries = [
        {
            "name": "s",
            "remark2": {
                "verdict": "compliant",
                "rests_on": ["structural"],
                "structural": {"tail_start": 2.0, "certificate": {"certified": True, "displacement": 4.0}},
            },
        }
    ]
    layers = [
        LayerBound("a", "actnorm", 3.0, 1.0),
        LayerBound("s", "site", None, None, None, ("s",)),
        LayerBound("b", "1x1-conv", 0.5, 0.0),
        LayerBound("c", "linear", 2.0, 0.5),
    ]
    cert = model_certificate(entries, {"complete": True}, layers)
    assert cert["certified"]
    assert cert["gain"] == pytest.approx(3.0 * 1.0 * 1.0 * 2.0)
    assert cert["offset"] == pytest.approx(((1.0 * 1 + 2.0) * 1.0) * 2.0 + 0.5)
    blocked = model_certificate(entries, {"complete": True}, [*layers, LayerBound("d", "unknown", None, None, "x")])
    assert not blocked["certified"] and blocked["blocking"][0]["site"] == "d"
    assert not model_certificate(entries, {"complete": True}, None)["certified"]
