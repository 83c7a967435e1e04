"""Glow pieces (ActNorm, invertible 1×1), the 2D toy of Hong et al. (data and flow), its training and loading.

Tiny configurations (2 steps, widths 8–16, batches of 64, ≤ 40 iterations) so the
whole file runs in a few seconds on 2 busy CPU cores. Flows are first run once in
training mode (ActNorm's data-dependent initialisation) with their coupling nets'
last layers left random (``zero_init=False``), so that no identity-initialised
site hides a bug. Jacobian checks run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from flowaudit.reference_models import build, load, load_checkpoint, training
from flowaudit.reference_models.couplings import KINDS, Elementwise
from flowaudit.reference_models.glow import ActNorm, InvConv1x1
from flowaudit.reference_models.recipes import TOY_TRAIN_SIZE, train_toy
from flowaudit.reference_models.toy import OOD_SHIFT, A, M, Toy2D, toy_data

SHAPES = {"vector": (6, 3), "image": (3, 3, 2, 4)}  # (B, C, *S)
TINY = dict(steps=2, hidden=8, depth=1, feature_dim=4)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def jacobian_logdet(fn, x: torch.Tensor) -> float:
    """log|det| of the Jacobian of ``fn`` (one sample in, one sample out) at ``x``, by autograd."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v).flatten(), x)
    sign, value = torch.linalg.slogdet(jac.reshape(x.numel(), x.numel()))
    assert sign != 0
    return float(value)


# -- ActNorm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_actnorm_standardises_the_first_training_batch_and_only_the_first(shape):
    gen = torch.Generator().manual_seed(0)
    layer = ActNorm(shape[1], spatial_dims=len(shape) - 2).train()
    dims = [0, *range(2, len(shape))]
    first = 3 * torch.randn(shape, generator=gen) + torch.arange(shape[1]).reshape(1, -1, *[1] * (len(shape) - 2))
    out, _ = layer(first)
    assert bool(layer.initialized)
    assert out.mean(dims).abs().max() <= 1e-5
    assert (out.std(dims, unbiased=False) - 1).abs().max() <= 1e-5
    after_first = snapshot(layer)

    second = 5 * torch.randn(shape, generator=gen) - 2
    out2, _ = layer(second)
    assert same_state(snapshot(layer), after_first)  # no second initialisation
    assert torch.allclose(out2, (second + layer.bias) * layer.logs.exp())
    assert (out2.std(dims, unbiased=False) - 1).abs().max() > 0.1  # so not standardised

    # neither eval mode nor the reverse pass initialises; a loaded (initialised) state is kept
    for mode in ("eval", "reverse"):
        fresh = ActNorm(shape[1], spatial_dims=len(shape) - 2)
        fresh.train(mode == "reverse")
        before = snapshot(fresh)
        fresh(first, reverse=(mode == "reverse"))
        assert same_state(snapshot(fresh), before) and not bool(fresh.initialized)
    loaded = ActNorm(shape[1], spatial_dims=len(shape) - 2)
    loaded.load_state_dict(after_first)
    loaded.train()(second)
    assert same_state(snapshot(loaded), after_first)


def _random_actnorm(c, spatial_dims):
    torch.manual_seed(1)
    layer = ActNorm(c, spatial_dims=spatial_dims).double().eval()
    with torch.no_grad():
        layer.bias.normal_()
        layer.logs.normal_(0, 0.5)
    return layer


def _random_invconv(c, fixed=False):
    torch.manual_seed(2)
    layer = InvConv1x1(c, fixed=fixed).double()
    if not fixed:
        with torch.no_grad():
            layer.weight.add_(0.3 * torch.randn(c, c, dtype=torch.float64))  # |det| ≠ 1
    return layer


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("which", ["actnorm", "invconv", "invconv-fixed"])
def test_glow_layer_round_trip_and_logdet_match_autograd(which, shape):
    c = shape[1]
    layer = (
        _random_actnorm(c, len(shape) - 2) if which == "actnorm" else _random_invconv(c, fixed=which.endswith("fixed"))
    )
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, logdet = layer(x)
        back, logdet_rev = layer(y, reverse=True)
    # the fixed W comes from a float32 QR: orthogonal, so Wᵀ = W⁻¹ and log|det| = 0, to float32 precision only
    fixed = which.endswith("fixed")
    tol = 1e-6 if fixed else 1e-9
    assert logdet.shape == (shape[0],)
    assert torch.allclose(back, x, rtol=0, atol=1e-6 if fixed else 1e-12)
    assert torch.allclose(logdet_rev, -logdet)
    for i in range(2):
        exact = jacobian_logdet(lambda v: layer(v[None])[0][0], x[i])
        assert float(logdet[i]) == pytest.approx(exact, rel=tol, abs=tol)
        exact_rev = jacobian_logdet(lambda v: layer(v[None], reverse=True)[0][0], y[i])
        assert float(logdet_rev[i]) == pytest.approx(exact_rev, rel=tol, abs=tol)
    if which == "invconv":
        assert abs(float(logdet[0])) > 0.01  # the perturbed W really has |det| ≠ 1

    # float32 round trip too (the learnable 1×1 inverts W in float64)
    layer32 = layer.float()
    x32 = x.float()
    with torch.no_grad():
        back32 = layer32(layer32(x32)[0], reverse=True)[0]
    assert (back32 - x32).abs().max() <= 1e-5 * max(1.0, float(x32.abs().max()))


def test_fixed_invconv_is_a_buffer_inverted_by_its_transpose():
    layer = InvConv1x1(4, fixed=True, generator=torch.Generator().manual_seed(0))
    assert list(layer.parameters()) == []
    assert "weight" in dict(layer.named_buffers()) and "weight" in layer.state_dict()
    w = layer.weight
    assert torch.allclose(w @ w.T, torch.eye(4), atol=1e-6)  # orthogonal, so Wᵀ = W⁻¹
    x = torch.randn(5, 4, 3, 3)
    back, logdet = layer(x, reverse=True)
    assert torch.equal(back, torch.einsum("ij,bj...->bi...", w.T, x))
    assert torch.equal(logdet, torch.zeros(5))
    assert torch.allclose(layer(back)[0], x, atol=1e-5)
    # the generator seeds it: the same seed, the same W
    assert torch.equal(InvConv1x1(4, fixed=True, generator=torch.Generator().manual_seed(0)).weight, w)
    learnable = InvConv1x1(4)
    assert [n for n, _ in learnable.named_parameters()] == ["weight"]


# -- toy data --------------------------------------------------------------------------------------


def test_toy_constants_are_the_papers():
    assert torch.equal(M, torch.tensor([[math.sqrt(3) / 4, -1 / 10], [1 / 4, -math.sqrt(3) / 10]]))
    assert torch.equal(A, torch.tensor([[0.7, 0.3], [0.3, 0.7]]))
    assert torch.equal(OOD_SHIFT, torch.tensor([0.8, -0.8]))


def test_toy_data_shapes_support_noise_and_ood_shift():
    rng_before = torch.random.get_rng_state()
    x, y = toy_data(2000, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # its own generator, never the global one
    assert x.shape == y.shape == (2000, 2) and x.dtype == y.dtype == torch.float32

    u = x.double() @ torch.linalg.inv(M.double()).T  # x = M u: inside the parallelogram iff |u|∞ ≤ 1
    assert u.abs().max() <= 1 + 1e-6
    assert u.abs().amax(0).min() > 0.99  # and filling it
    noise = y.double() - x.double() @ A.double().T
    assert noise.std().item() == pytest.approx(0.01, rel=0.1)
    assert noise.mean().abs() < 2e-3

    x_ood, y_ood = toy_data(2000, seed=3, ood=True)
    assert torch.equal(x_ood, x)
    assert torch.equal(y_ood, y + OOD_SHIFT)  # the shift is exactly [0.8, −0.8]


def test_toy_data_is_deterministic_under_its_seed():
    a, b = toy_data(50, seed=7), toy_data(50, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = toy_data(50, seed=8)
    assert not torch.equal(a[0], c[0])
    assert torch.equal(toy_data(80, seed=7)[0][:50], a[0])  # a larger draw extends the smaller one


# -- the toy flow ----------------------------------------------------------------------------------


def ready_toy(kind: str, seed: int = 0) -> Toy2D:
    """A small toy flow with random coupling nets, ActNorm initialised on toy data, in eval mode."""
    torch.manual_seed(seed)
    model = Toy2D(kind, steps=2, hidden=16, depth=2, feature_dim=4, zero_init=False)
    x, y = toy_data(256, seed=1)
    model.train()
    with torch.no_grad():
        model(x, y)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_toy_round_trip_and_log_prob(kind):
    model = ready_toy(kind)
    for ood in (False, True):
        x, y = toy_data(128, seed=2, ood=ood)
        with torch.no_grad():
            (z,), logdet = model(x, y)
            back = model.reverse([z], y)
            assert z.shape == x.shape and logdet.shape == (128,)
            assert (back - x).abs().max() <= 1e-5
            base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
            assert torch.allclose(model.base_log_prob([z], y), base, atol=1e-5)
            assert torch.allclose(model.log_prob(x, y), base + logdet, atol=1e-5)
    y = toy_data(5, seed=4)[1]
    samples = model.sample(y, temperature=0.9, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, 2)
    assert torch.equal(samples, model.sample(y, temperature=0.9, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kind", KINDS)
def test_toy_log_prob_is_change_of_variables(kind):
    """log q(x|y) = log N(f(x; y)) + log|det ∂f/∂x| with the Jacobian of the whole flow by autograd."""
    model = ready_toy(kind).double()
    x, y = (t.double() for t in toy_data(64, seed=5))
    bends = torch.zeros(len(x), dtype=torch.float64)

    def record(module, args, out):
        bends.add_(out[1].detach().abs().flatten(1).sum(1))

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, Elementwise)]
    try:
        with torch.no_grad():
            ours = model.log_prob(x, y)
    finally:
        for h in hooks:
            h.remove()
    if kind != "additive":  # check where the sites really bend (points on a spline's identity tails prove little)
        pick = bends.topk(3).indices
        assert bends[pick].min() > 0
    else:
        pick = torch.arange(3)
    x, y, ours = x[pick], y[pick], ours[pick]
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    for i in range(len(x)):
        flow = lambda v: model(v[None], y[i : i + 1])[0][0][0]  # noqa: E731
        z = flow(x[i]).detach()
        exact = normal.log_prob(z).sum() + jacobian_logdet(flow, x[i])
        assert float(ours[i]) == pytest.approx(float(exact), rel=1e-9, abs=1e-9)


def test_toy_trace_layers_are_modules_in_the_order_sampling_visits_them():
    model = ready_toy("affine")
    names = model.trace_layers()
    modules = dict(model.named_modules())
    assert names and all(n in modules for n in names)
    assert len(names) == 3 * model.config["steps"]
    visited: list[str] = []
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: visited.append(n)) for n in names]
    try:
        with torch.no_grad():
            model.sample(toy_data(4, seed=0)[1], generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert visited == names  # the reverse of the forward order: last step's coupling first
    assert names[0] == f"flow.{model.config['steps'] - 1}.coupling" and names[-1] == "flow.0.actnorm"


# -- training, checkpoints, loading ----------------------------------------------------------------


def small_batches(n: int = 512, batch: int = 64, seed: int = 0):
    x_all, y_all = toy_data(n, seed=seed)

    def batches(step: int, gen: torch.Generator):
        idx = torch.randint(0, n, (batch,), generator=gen)
        return x_all[idx], y_all[idx]

    return batches


def run_train(out, iters, batches=None, resume=None, checkpoint_every=1000, kind="rq-spline", init_seed=123):
    torch.manual_seed(init_seed)
    model = Toy2D(kind, **TINY)
    result = training.train(
        model,
        batches or small_batches(),
        iters=iters,
        lr=1e-2,
        out=out,
        seed=3,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=False,
    )
    return model, result


def test_train_toy_writes_a_weights_only_checkpoint_with_its_provenance(tmp_path):
    out = tmp_path / "toy.pt"
    result = train_toy("modified-rq-spline", out=out, iters=30, batch=64, seed=3, progress=False, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.pt"]  # written atomically, nothing left over
    raw = torch.load(out, map_location="cpu", weights_only=True)  # tensors and numbers only
    state = load_checkpoint(out)
    assert state.keys() == raw.keys()
    assert state["format"] == training.CHECKPOINT_FORMAT and state["task"] == "toy"
    assert (
        state["config"]
        == Toy2D("modified-rq-spline", **TINY).config
        == {"coupling": "modified-rq-spline", **TINY, "zero_init": True}
    )
    assert state["seed"] == 3 and state["step"] == state["iters"] == 30 and state["skipped_steps"] == 0
    assert state["data"] == {"name": "toy", "n": TOY_TRAIN_SIZE, "seed": 3, "noise": 0.01}
    assert {"optimizer", "rng", "history", "lr"} <= state.keys()
    assert state["history"] and all(math.isfinite(v) for _, v in state["history"])
    assert same_state(state["state_dict"], result["state_dict"])
    model = build("toy", state["config"])
    model.load_state_dict(state["state_dict"])  # the stored config rebuilds the very architecture
    assert [step for step, _ in state["history"]] == [0, 29]  # every 50th step and the last


def test_resume_from_a_step_20_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """40 steps in one go vs 20 steps, a crash, and a resume (lr halvings at 50/75/90/95 % included)."""
    model_a, result_a = run_train(tmp_path / "a.pt", 40)

    class Crash(Exception):
        pass

    batches = small_batches()

    def crashing(step, gen):
        if step == 20:
            raise Crash
        return batches(step, gen)

    with pytest.raises(Crash):
        run_train(tmp_path / "b.pt", 40, batches=crashing, checkpoint_every=20)
    partial = load_checkpoint(tmp_path / "b.pt")
    assert partial["step"] == 20
    model_b, result_b = run_train(tmp_path / "b.pt", 40, resume=partial, checkpoint_every=20, init_seed=999)
    assert same_state(snapshot(model_b), snapshot(model_a))  # exactly, not approximately
    assert result_b["step"] == 40 and result_b["history"] == result_a["history"]
    final = load_checkpoint(tmp_path / "b.pt")
    assert same_state(final["state_dict"], load_checkpoint(tmp_path / "a.pt")["state_dict"])


def test_train_toy_resume_continues_and_refuses_another_config(tmp_path):
    # the global seed pins the initial weights (see test_train_toy_is_reproducible_from_its_seed)
    torch.manual_seed(0)
    straight = train_toy("affine", out=tmp_path / "a.pt", iters=40, batch=64, seed=1, progress=False, **TINY)
    torch.manual_seed(0)
    train_toy("affine", out=tmp_path / "b.pt", iters=20, batch=64, seed=1, progress=False, **TINY)
    torch.manual_seed(1)  # whatever the global state now, the resumed run continues from the file
    resumed = train_toy(
        "affine", out=tmp_path / "b.pt", iters=40, batch=64, seed=1, resume=True, progress=False, **TINY
    )
    assert resumed["step"] == 40
    assert same_state(resumed["state_dict"], straight["state_dict"])
    with pytest.raises(ValueError, match="cannot resume"):
        train_toy(
            "affine",
            out=tmp_path / "b.pt",
            iters=60,
            batch=64,
            seed=1,
            resume=True,
            progress=False,
            **{**TINY, "hidden": 12},
        )


def test_train_toy_is_reproducible_from_its_seed(tmp_path):
    torch.manual_seed(0)
    first = train_toy("affine", out=tmp_path / "a.pt", iters=2, batch=16, seed=1, progress=False, **TINY)
    torch.manual_seed(1)  # another caller, another global RNG state
    second = train_toy("affine", out=tmp_path / "b.pt", iters=2, batch=16, seed=1, progress=False, **TINY)
    assert same_state(first["state_dict"], second["state_dict"])


def _nan_at(bad_step: int, record: dict, model_ref: list):
    batches = small_batches()

    def nan_batches(step, gen):
        if model_ref:
            record[step] = snapshot(model_ref[0])  # the weights every step starts from
        x, y = batches(step, gen)
        if step == bad_step:
            x = torch.full_like(x, float("nan"))
        return x, y

    return nan_batches


def test_a_nan_batch_is_skipped_counted_and_leaves_the_weights_alone(tmp_path):
    torch.manual_seed(123)
    model = Toy2D("affine", **TINY)
    record: dict[int, dict] = {}
    result = training.train(
        model, _nan_at(3, record, [model]), iters=8, lr=1e-2, out=tmp_path / "n.pt", seed=3, progress=False
    )
    assert result["skipped_steps"] == 1 and load_checkpoint(tmp_path / "n.pt")["skipped_steps"] == 1
    assert same_state(record[4], record[3])  # the NaN step changed nothing
    assert not same_state(record[3], record[2]) and not same_state(record[5], record[4])  # the others did
    assert all(torch.isfinite(v).all() for v in snapshot(model).values())
    adam_steps = {int(s["step"]) for s in result["optimizer"]["state"].values()}
    assert adam_steps == {8 - 1}  # the optimiser never saw the skipped step


def test_a_nan_first_batch_is_skipped_like_any_other(tmp_path):
    torch.manual_seed(123)
    model = Toy2D("affine", **TINY)
    result = training.train(model, _nan_at(0, {}, []), iters=6, lr=1e-2, out=tmp_path / "n0.pt", seed=3, progress=False)
    assert all(torch.isfinite(v).all() for v in snapshot(model).values())
    assert result["skipped_steps"] == 1


def test_load_returns_the_saved_model_in_eval_mode(tmp_path):
    model, _ = run_train(tmp_path / "m.pt", 12, kind="modified-rq-spline")
    loaded = load(tmp_path / "m.pt")
    assert isinstance(loaded, Toy2D) and loaded.name == "m"
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert same_state(snapshot(loaded), snapshot(model))
    y = toy_data(16, seed=9, ood=True)[1]
    with torch.no_grad():
        ours = model.sample(y, temperature=0.9, generator=torch.Generator().manual_seed(4))
        theirs = loaded.sample(y, temperature=0.9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ours, theirs)
    # the restored ActNorms are initialised: training the loaded model never re-initialises them
    before = snapshot(loaded)
    with torch.no_grad():
        loaded.train()(*toy_data(64, seed=11))
    assert same_state(snapshot(loaded), before)
