"""The image reference flows: SRFlow / FS-NCSR-style SR and LLFlow-style low-light.

Tiny configurations (nf 8, nb 2, gc 4, hidden 8, 16×16 patches) so the whole
file runs in well under a minute on 2 CPU cores. Before the numeric checks
every zero-initialised output layer is drawn at random and the ActNorms are
initialised on data (:func:`ready`), so that no identity-at-init site hides a bug.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from flowaudit.reference_models import build
from flowaudit.reference_models.couplings import KINDS, Elementwise
from flowaudit.reference_models.lowlight import LLFlow, equalize_hist, llflow_input
from flowaudit.reference_models.rrdb import RRDBNet, spaced_blocks, stack_features
from flowaudit.reference_models.sr import Conv2dZeros, SRFlow, squeeze2d, unsqueeze2d

TINY = dict(nf=8, nb=2, gc=4, hidden_channels=8)


def sr(**kw) -> SRFlow:
    return SRFlow(**{**TINY, "scale": 4, "L": 3, "K": 2, "patch": 16, **kw})


def ll(**kw) -> LLFlow:
    return LLFlow(**{**TINY, "L": 3, "K": 2, "patch": 16, **kw})


def sr_data(model: SRFlow, n: int = 2, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = model.config["patch"]
    x = torch.rand(n, 3, p, p, generator=g, dtype=dtype)
    return x, F.avg_pool2d(x, model.scale)  # a plausible LR: box-downscaled HR


def ll_data(model: LLFlow, n: int = 2, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p = model.config["patch"]
    x = torch.rand(n, 3, p, p, generator=g, dtype=dtype)
    return x, 0.15 * x  # a darkened copy


def ready(model, x, y, seed: int = 1, jitter: float = 0.05):
    """Random (not zero) output layers, then ActNorm's data-dependent init on (x, y); eval mode.

    The encoder and hidden conditioner layers keep their random initialisation;
    only the zero-initialised ``Conv2dZeros`` are drawn anew, before the
    ActNorms see data, so every site is non-trivial while the activations stay
    normalised (a flow with huge random parameters is too ill conditioned for
    any float32 round trip, whatever its code).
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Conv2dZeros):
                for p in (module.weight, module.bias, module.logs):
                    p.normal_(0.0, jitter)
        model.train()
        model(x, y)
    return model.eval()


# -- invertibility -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sr_round_trip(kind):
    torch.manual_seed(0)
    model = sr(coupling=kind)
    x, y = sr_data(model)
    ready(model, x, y)
    with torch.no_grad():
        latents, logdet = model(x, y)
        back = model.reverse(latents, y)
    assert [tuple(z.shape) for z in latents] == model.latent_shapes(y)
    assert torch.isfinite(logdet).all()
    assert (back - x).abs().max() <= 1e-4


def test_fs_ncsr_round_trip_with_noise_subnet():
    torch.manual_seed(0)
    model = sr(coupling="modified-rq-spline", residual=True, std_channels=3, std_steps=[0, 1, 2])
    x, y = sr_data(model)
    ready(model, x, y)
    active = [m.std_active for m in model.modules() if hasattr(m, "std_active")]
    assert active == [False, False, False, True, True, True]  # the last S[l] steps of each level
    with torch.no_grad():
        back = model.reverse(model(x, y)[0], y)
    assert (back - x).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_lowlight_round_trip(kind):
    torch.manual_seed(0)
    model = ll(coupling=kind)
    x, y = ll_data(model)
    ready(model, x, y)
    with torch.no_grad():
        latents, logdet = model(x, y)
        back = model.reverse(latents, y)
    assert [tuple(z.shape) for z in latents] == model.latent_shapes(y) == [(2, 192, 2, 2)]
    assert torch.isfinite(logdet).all()
    assert (back - x).abs().max() <= 1e-4


# -- log-determinant against autograd -------------------------------------------------------------


def _jacobian_logdet(model, x, y) -> tuple[float, float]:
    """(log|det J| by autograd, our log-det) at one input, J = d[flattened latents]/dx."""

    def flat(inp):
        return torch.cat([z.flatten() for z in model(inp, y)[0]])

    jac = torch.autograd.functional.jacobian(flat, x, vectorize=True).reshape(x.numel(), x.numel())
    sign, value = torch.linalg.slogdet(jac)
    assert sign != 0
    ladj = []  # the sites must actually bend inside the Jacobian, not sit on their identity tails
    hooks = [
        m.register_forward_hook(lambda m, a, o: ladj.append(o[1].abs().sum()))
        for m in model.modules()
        if isinstance(m, Elementwise) and m.kind != "prior"
    ]
    try:
        with torch.no_grad():
            ours = model(x, y)[1]
    finally:
        for h in hooks:
            h.remove()
    assert min(ladj) > 0
    return float(value), float(ours)


@pytest.mark.parametrize("kind", ["affine", "modified-rq-spline", "rq-spline"])
def test_sr_logdet_matches_autograd(kind):
    # ×2 on an 8×8 HR image, L = 3 so that one split (and its prior site) is inside the Jacobian
    torch.manual_seed(0)
    model = SRFlow(**{**TINY, "scale": 2, "L": 3, "K": 1, "patch": 8, "coupling": kind}).double()
    x, y = sr_data(model, n=4, dtype=torch.float64)
    ready(model, x, y)
    assert len(model.latent_shapes(y[:1])) == 2
    exact, ours = _jacobian_logdet(model, x[:1], y[:1])
    assert ours == pytest.approx(exact, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("kind", ["affine", "modified-rq-spline"])
def test_lowlight_logdet_matches_autograd(kind):
    torch.manual_seed(0)
    model = LLFlow(**{**TINY, "L": 3, "K": 1, "patch": 8, "coupling": kind}).double()
    x, y = ll_data(model, n=4, dtype=torch.float64)
    ready(model, x, y)
    exact, ours = _jacobian_logdet(model, x[:1], y[:1])
    assert ours == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_log_prob_is_base_plus_logdet_and_finite():
    torch.manual_seed(0)
    model = sr(coupling="affine")
    x, y = sr_data(model)
    ready(model, x, y)
    with torch.no_grad():
        latents, logdet = model(x, y)
        assert torch.allclose(model.log_prob(x, y), model.base_log_prob(latents, y) + logdet)


# -- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, L", [(2, 2), (4, 3), (8, 4)])
def test_sr_shapes(scale, L):
    torch.manual_seed(0)
    model = SRFlow(**{**TINY, "scale": scale, "L": L, "K": 1, "patch": 32}).eval()
    lr = 32 // scale
    assert model.condition_shape == (3, lr, lr)
    y = torch.rand(2, 3, lr, lr)
    shapes = model.latent_shapes(y)
    # official rule: a split after level l while l < L − 1 (1-based)
    assert len(shapes) == max(L - 2, 0) + 1
    assert sum(math.prod(s[1:]) for s in shapes) == 3 * 32 * 32
    feats = model.encode(y)
    assert [tuple(f.shape[2:]) for f in feats] == [(32 >> lvl, 32 >> lvl) for lvl in range(1, L + 1)]
    assert all(f.shape[1] == 8 * (1 + len(model.stack_blocks)) for f in feats)
    with torch.no_grad():
        out = model.sample(y, temperature=0.9, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32)
    assert ("RRDB.upconv3.weight" in model.state_dict()) == (scale == 8)


def test_correct_splits_and_bad_sizes():
    assert len(sr(correct_splits=True).latent_shapes(torch.rand(1, 3, 4, 4))) == 3
    with pytest.raises(ValueError):
        sr(patch=20)
    with pytest.raises(ValueError):
        SRFlow(**TINY, scale=2, L=4, patch=16)  # would need features at 1/8 of the LR size


# -- names: an official state dict maps by configuration alone ------------------------------------


def test_sr_state_dict_layout_affine():
    keys = set(sr(coupling="affine").state_dict())
    assert "RRDB.RRDB_trunk.0.RDB1.conv1.weight" in keys and "RRDB.RRDB_trunk.1.RDB3.conv5.bias" in keys
    for name in ("conv_first", "trunk_conv", "upconv1", "upconv2", "HRconv", "conv_last"):
        assert f"RRDB.{name}.weight" in keys
    # level 1 with K = 2: 0 squeeze, 1–2 transition steps, 3–4 conditional steps, 5 split
    assert not any(k.startswith("flowUpsamplerNet.layers.0.") for k in keys)
    for i in (1, 2):
        assert f"flowUpsamplerNet.layers.{i}.actnorm.bias" in keys
        assert f"flowUpsamplerNet.layers.{i}.invconv.weight" in keys
        assert not any(k.startswith(f"flowUpsamplerNet.layers.{i}.affine") for k in keys)
    for i in (3, 4):
        for suffix in (
            "actnorm.bias",
            "actnorm.logs",
            "invconv.weight",
            "affine.fAffine.0.weight",
            "affine.fAffine.0.actnorm.bias",
            "affine.fAffine.2.weight",
            "affine.fAffine.4.weight",
            "affine.fAffine.4.bias",
            "affine.fAffine.4.logs",
            "affine.fFeatures.0.weight",
        ):
            assert f"flowUpsamplerNet.layers.{i}.{suffix}" in keys
    assert "flowUpsamplerNet.layers.5.conv.logs" in keys
    assert not any("rqspline" in k or "_std" in k for k in keys)


def test_sr_state_dict_shapes_follow_official_formulae():
    sd = sr(coupling="affine").state_dict()
    cond = 8 * (1 + 2)  # nf · (1 + stacked blocks)
    assert sd["flowUpsamplerNet.layers.3.affine.fFeatures.0.weight"].shape == (8, cond, 3, 3)
    assert sd["flowUpsamplerNet.layers.3.affine.fFeatures.4.weight"].shape[0] == 12 * 2
    assert sd["flowUpsamplerNet.layers.3.affine.fAffine.0.weight"].shape == (8, 6 + cond, 3, 3)
    assert sd["flowUpsamplerNet.layers.3.affine.fAffine.2.weight"].shape == (8, 8, 1, 1)
    assert sd["flowUpsamplerNet.layers.3.affine.fAffine.4.logs"].shape == (12, 1, 1)
    assert sd["flowUpsamplerNet.layers.3.actnorm.logs"].shape == (1, 12, 1, 1)
    assert sd["flowUpsamplerNet.layers.5.conv.weight"].shape == (12, 6, 3, 3)


@pytest.mark.parametrize("kind", ["rq-spline", "modified-rq-spline"])
def test_sr_state_dict_layout_splines(kind):
    model = sr(coupling=kind, std_channels=3)
    sd = model.state_dict()
    p = model.flowUpsamplerNet.layers[3].rqspline.coupling_site.params_per_dim
    assert sd["flowUpsamplerNet.layers.3.rqspline.fRQspline.4.weight"].shape[0] == 6 * p
    assert sd["flowUpsamplerNet.layers.3.rqspline.fFeatures.4.weight"].shape[0] == 12 * p  # spline injector too
    assert "flowUpsamplerNet.layers.3.rqspline.fRQspline_std.0.weight" in sd  # NCSR keys in every step
    assert not any(".affine." in k for k in sd)
    if kind == "modified-rq-spline":
        assert p == 4


def test_lowlight_state_dict_layout():
    model = ll()
    sd = model.state_dict()
    assert sd["RRDB.conv_first.weight"].shape[1] == 12
    for name in ("conv_second", "downconv1", "downconv2", "downconv3", "trunk_conv", "fine_tune_color_map.0"):
        assert f"RRDB.{name}.weight" in sd
    assert "RRDB.RRDB_trunk.0.RDB1.conv1.weight" in sd
    assert "flowUpsamplerNet.layers.3.affine.fFeatures.0.weight" in sd
    assert not any(k.endswith("conv.logs") for k in sd)  # no split


def test_rebuild_from_config():
    torch.manual_seed(0)
    for model in (sr(coupling="modified-rq-spline", residual=True, std_channels=3), ll(coupling="affine")):
        data = sr_data(model) if model.task == "sr" else ll_data(model)
        ready(model, *data)
        twin = build(model.task, model.config)
        twin.load_state_dict(model.state_dict())
        twin.eval()
        with torch.no_grad():
            assert torch.equal(model(*data)[0][-1], twin(*data)[0][-1])
        # plain values only: checkpoints are read back with torch.load(weights_only=True)
        assert all(isinstance(v, (int, float, str, bool, list, type(None))) for v in model.config.values())


# -- what a freshly built model is -------------------------------------------------------------


def _site_calls(model, x, y):
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: calls.append((m, a[0], *o)))
        for m in model.modules()
        if isinstance(m, Elementwise)
    ]
    try:
        with torch.no_grad():
            model(x, y)
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", ["sr", "lowlight"])
def test_fresh_sites_start_at_their_zero_parameter_map(task, kind):
    # zero-initialised conditioners: h = 0 everywhere, so spline/additive/prior sites are the
    # identity and affine sites a constant scale sigmoid(2) + eps (0.8809 or 0.9808 for the bounded one)
    model = (sr if task == "sr" else ll)(coupling=kind).eval()
    x, y = (sr_data if task == "sr" else ll_data)(model)
    calls = _site_calls(model, x, y)
    assert len(calls) > 0
    for site, inp, out, ladj in calls:
        if site.kind in ("affine", "affine-bounded"):
            s = torch.sigmoid(torch.tensor(2.0)) + site.eps
            assert torch.allclose(out, inp * s, atol=1e-6) and torch.allclose(ladj, torch.log(s).expand_as(ladj))
        elif site.kind == "prior" and task == "lowlight":
            continue  # μ is the encoder's colour map, not 0
        else:
            assert torch.allclose(out, inp, atol=1e-6) and ladj.abs().max() < 1e-6


# -- sampling ------------------------------------------------------------------------------------


def test_lowlight_zero_temperature_is_the_official_inference():
    torch.manual_seed(0)
    model = ll(coupling="modified-rq-spline")
    x, y = ll_data(model)
    ready(model, x, y)
    with torch.no_grad():
        zero = model.reverse([torch.zeros(s) for s in model.latent_shapes(y)], y)
        assert torch.equal(model.sample(y, temperature=0.0), zero)
        assert torch.equal(model.enhance(y), zero)
        assert torch.allclose(model.sample_mean(y, temperature=0.0, n=3), zero)
        g = torch.Generator().manual_seed(3)
        mean = model.sample_mean(y, temperature=1.0, n=3, generator=g)
        g = torch.Generator().manual_seed(3)
        manual = sum(model.sample(y, 1.0, g) for _ in range(3)) / 3
        assert torch.allclose(mean, manual)


def test_lowlight_prior_mean_is_the_squeezed_colour_map():
    torch.manual_seed(0)
    model = ll()
    x, y = ll_data(model)
    ready(model, x, y)
    with torch.no_grad():
        _, mean = model.encode(y)
        z = model.flowUpsamplerNet.encode(x, model.encode(y)[0])[0][-1]
        eps = model(x, y)[0][0]
    assert mean.shape == z.shape == (2, 192, 2, 2)
    assert torch.allclose(eps, z - mean)
    assert ((mean > 0) & (mean < 1)).all()  # sigmoid output of fine_tune_color_map


def test_residual_adds_bicubic_back():
    torch.manual_seed(0)
    plain = sr(coupling="affine")
    x, y = sr_data(plain)
    ready(plain, x, y)
    res = sr(coupling="affine", residual=True)
    res.load_state_dict(plain.state_dict())
    res.eval()
    up = F.interpolate(y, scale_factor=4, mode="bicubic", align_corners=False)
    latents = plain.sample_latents(y, 0.9, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(res.reverse(latents, y) - up, plain.reverse(latents, y), atol=1e-6)
        for a, b in zip(res(x, y)[0], plain(x - up, y)[0]):
            assert torch.allclose(a, b, atol=1e-6)


def test_sample_temperature_scales_every_latent():
    torch.manual_seed(0)
    model = sr()
    y = torch.rand(2, 3, 4, 4)
    a = model.sample_latents(y, 1.0, torch.Generator().manual_seed(5))
    b = model.sample_latents(y, 0.5, torch.Generator().manual_seed(5))
    assert len(a) == 2 and all(torch.allclose(0.5 * u, v) for u, v in zip(a, b))


# -- the audit's view: feature layers and the layer trace -------------------------------------------


@pytest.mark.parametrize("make", [sr, ll])
def test_trace_layers_are_visited_in_sampling_order(make):
    model = make().eval()
    y = torch.rand(1, *model.condition_shape) * (1 if model.task == "sr" else 0.2)
    modules = dict(model.named_modules())
    names = model.trace_layers()
    feature_layers = model.default_feature_layers()
    assert all(n in modules for n in names + feature_layers)
    assert feature_layers == [f"RRDB.RRDB_trunk.{b}" for b in model.stack_blocks]
    seen = []
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen.append(n)) for n in names]
    try:
        with torch.no_grad():
            model.sample(y, 0.9)
    finally:
        for h in hooks:
            h.remove()
    assert seen == names


# -- encoders -------------------------------------------------------------------------------------


def test_spaced_blocks_match_the_papers_choice():
    assert spaced_blocks(23) == [1, 8, 15, 22]
    assert spaced_blocks(8) == [1, 3, 5, 7]
    assert spaced_blocks(3) == [0, 1, 2]


def test_rrdb_features_follow_the_official_definitions():
    torch.manual_seed(0)
    net = RRDBNet(nf=8, nb=2, gc=4, scale=4).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        f = net(x, with_output=True)
        trunk = net.RRDB_trunk(net.conv_first(x))
        assert torch.allclose(f["fea_up1"], trunk + net.trunk_conv(trunk))
        up2 = net.upconv1(F.interpolate(f["fea_up1"], scale_factor=2))
        # official: fea_up2 is read after the in-place LeakyReLU; legacy checkpoints read it before
        assert torch.allclose(f["fea_up2"], F.leaky_relu(up2, 0.2))
        net.official_features = False
        assert torch.allclose(net(x)["fea_up2"], up2)
        net.official_features = True
        assert torch.allclose(f["fea_up0"], F.interpolate(f["fea_up1"], scale_factor=0.5, mode="bilinear"))
        assert f["out"].shape == (1, 3, 32, 32)
        stacked = stack_features(f, [0, 1])
    assert stacked["fea_up2"].shape == (1, 24, 16, 16)
    assert torch.equal(stacked["fea_up0"][:, 8:16], F.interpolate(f["block_0"], size=(4, 4)))


def test_equalize_hist_matches_opencv_rule():
    # 4 pixels with values 10, 10, 20, 40: first bin 10 (2 pixels) → 0, 20 → round(255·1/2), 40 → 255
    y = torch.tensor([10.0, 10.0, 20.0, 40.0]).reshape(1, 1, 2, 2) / 255
    assert torch.equal(equalize_hist(y) * 255, torch.tensor([0.0, 0.0, 128.0, 255.0]).reshape(1, 1, 2, 2))
    flat = torch.full((1, 1, 3, 3), 7 / 255)
    assert torch.allclose(equalize_hist(flat), flat)  # a constant channel keeps its value
    inp = llflow_input(torch.zeros(1, 3, 4, 4))
    assert inp.shape == (1, 6, 4, 4) and torch.allclose(inp[:, :3], torch.full_like(inp[:, :3], math.log(1e-3)))


def test_squeeze_round_trip_and_order():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    s = squeeze2d(x)
    assert s.shape == (2, 12, 2, 2) and torch.equal(unsqueeze2d(s), x)
    assert torch.equal(s[0, :4, 0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))  # channel c·4 + 2i + j


def test_gradients_reach_the_used_parameters():
    torch.manual_seed(0)
    model = sr(coupling="modified-rq-spline")
    x, y = sr_data(model)
    ready(model, x, y)
    model.train()
    (-model.log_prob(x, y).mean()).backward()
    unused = ("RRDB.upconv2", "RRDB.HRconv", "RRDB.conv_last")  # ×4 reads fea_up2, fea_up1, fea_up0 only
    for name, p in model.named_parameters():
        if name.startswith(unused):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("make", [sr, ll])
def test_encode_once_equals_encode_of_every_row_and_passes_gradients(make):
    """Sampling encodes each run of equal consecutive conditions once: the rows equal encoding all of them
    (float64, so kernels' batch blocking cannot hide a wrong row), NaN rows are never merged, and the gradient
    of a condition repeated per sample is the one :meth:`encode` gives."""
    torch.manual_seed(0)
    model = make().double().eval()
    data = sr_data if make is sr else ll_data
    _, y = data(model, n=3, dtype=torch.float64)
    rows = y.repeat_interleave(torch.tensor([2, 1, 3]), 0)  # runs of 2, 1 and 3
    rows[3, 0, 0, 0] = float("nan")  # a lone NaN row in the last run

    def flat(out):
        return torch.cat([t.flatten(1) for t in (out if isinstance(out, list) else [*out[0], out[1]])], 1)

    once, every = flat(model.encode_once(rows)), flat(model.encode(rows))
    ok = torch.isfinite(every)
    assert torch.equal(ok, torch.isfinite(once)) and torch.allclose(once[ok], every[ok], rtol=1e-12, atol=1e-12)
    leaf = y.clone().requires_grad_(True)  # the attack's way: a leaf per condition, repeated per sample

    def repeat(t):
        return t.repeat_interleave(torch.tensor([2, 1, 3]), 0)

    weights = torch.randn(once.shape, dtype=torch.float64)
    (g_once,) = torch.autograd.grad((flat(model.encode_once(repeat(leaf))) * weights).sum(), leaf)
    (g_every,) = torch.autograd.grad((flat(model.encode(repeat(leaf))) * weights).sum(), leaf)
    assert g_every.abs().min(0).values.gt(0).any() and torch.allclose(g_once, g_every, rtol=1e-9, atol=1e-12)
