"""The worst-case attack: it raises its objective, keeps its budget, repeats, and never dies of Inf."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flowaudit.adapters import adapt, load_model
from flowaudit.adapters.reference import ReferenceAdapter
from flowaudit.reference_models import ReferenceFlow
from flowaudit.reference_models.couplings import Affine
from flowaudit.reference_models.toy import toy_data

import flowaudit
from flowaudit import attack
from flowaudit.cli.main import cli
from flowaudit.config.budget import parse_budget
from flowaudit.errors import AuditError


class Fragile(ReferenceFlow):
    r"""x = f⁻¹(z; y) = z / s(y) with one affine site, :math:`s = \sigma(2 - a\,u(y)) + \epsilon`.

    Toy (condition (2,)): :math:`u = \lVert y\rVert^2`, so the scale collapses — and the inverse
    explodes — as :math:`|y|` grows; image (condition (1, 4, 4)): :math:`u = y` per pixel, so the
    gain grows towards the top of the valid range [0, 1]. ``eps = 0`` lets it reach Inf.
    """

    task = "toy"
    output_range = (-5.0, 5.0)  # band [-10, 10]: a sample breaks once 1/s passes ~4

    def __init__(self, image: bool = False, eps: float = 1e-4, a: float = 1.0):
        super().__init__(image=image, eps=eps, a=a)
        self.image, self.a = image, a
        self.condition_shape = (1, 4, 4) if image else (2,)
        if image:
            self.output_range = (0.0, 1.0)
        self.site = Affine(eps=eps)  # sigmoid(raw + 2) + eps
        self.w = torch.nn.Parameter(torch.ones(1))  # a parameter: graphs reach x from the weights too

    def encoder_module(self):
        return None

    def default_feature_layers(self):
        return []

    def encode(self, y):
        return y

    def _h(self, y):
        u = y if self.image else (y * y).sum(1, keepdim=True).expand(-1, 2)
        raw = -self.a * u * self.w
        return torch.stack([torch.zeros_like(raw), raw], 2).flatten(1, 2)  # cross layout: shift 0, raw scale

    def forward(self, x, y):
        z, ladj = self.site(x, self._h(y))
        return [z], ladj.flatten(1).sum(1)

    def reverse(self, latents, y):
        return self.site(latents[0], self._h(y), reverse=True)[0]

    def latent_shapes(self, y):
        return [(y.shape[0], *self.condition_shape)]

    def trace_layers(self):
        return ["site"]


def _starts(n: int = 6, image: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if image:
        return torch.rand(n, 1, 4, 4, generator=g) * 0.5 + 0.25
    return torch.randn(n, 2, generator=g) * 0.3


def _attacked(report) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(start conditions, attacked conditions, ids) from the saved worst cases, in rank order."""
    npz = np.load(io.BytesIO(report.files["attack/worst.npz"]))
    return npz["y_start"], npz["y_attack"], list(npz["ids"])


def test_budget_strings():
    assert parse_budget("linf:8/255").eps == pytest.approx(8 / 255)
    assert parse_budget("L2:0.5").kind == "l2"
    b = parse_budget("box:-1,2")
    assert (b.lo, b.hi, b.norm, b.spec()) == (-1.0, 2.0, "linf", "box:-1,2")
    assert parse_budget(" none ").kind == "none"
    for bad in ("linf", "linf:0", "linf:-1", "l2:x", "box:1", "box:2,1", "box:a,b", "lp:1", "linf:1/0", "linf:inf", ""):
        with pytest.raises(ValueError, match="bad budget"):
            parse_budget(bad)


@pytest.mark.parametrize("rule", ["adam", "sign"])
def test_attack_raises_its_objective_on_a_fragile_model(rule):
    rep = attack(Fragile(), _starts(), budget="linf:1", steps=20, samples=3, rule=rule, device="cpu")
    starts = rep["attack"]["starts"]
    assert all(s["objective_after"] > s["objective_before"] + 0.5 for s in starts)
    assert rep["attack"]["summary"]["worst_inverse_gain"] > 3
    json.loads(rep.to_json())


@pytest.mark.parametrize("budget", ["linf:0.3", "l2:0.4", "box:-0.5,0.7"])
def test_attack_never_leaves_its_budget(budget):
    b = parse_budget(budget)
    rep = attack(Fragile(), _starts(8), budget=budget, steps=15, samples=2, device="cpu")
    y0, y, _ = _attacked(rep)
    d = (y - y0).reshape(len(y), -1)
    if b.kind == "linf":
        assert np.abs(d).max() <= b.eps + 1e-6
    elif b.kind == "l2":
        assert np.linalg.norm(d, axis=1).max() <= b.eps + 1e-6
    else:
        assert y.min() >= b.lo - 1e-7 and y.max() <= b.hi + 1e-7
    dist = [s["distance"] for s in rep["attack"]["starts"]]
    assert max(dist) <= (b.radius * 2 if b.kind == "box" else b.eps) + 1e-6 and max(dist) > 0


def test_image_conditions_stay_in_their_range():
    # τ = 0.1 keeps the samples z/s inside the band [-0.5, 1.5] at the start
    rep = attack(
        Fragile(image=True),
        _starts(4, image=True),
        budget="linf:0.5",
        steps=10,
        samples=2,
        temperature=0.1,
        device="cpu",
    )
    y0, y, _ = _attacked(rep)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert np.abs(y - y0).max() <= 0.5 + 1e-6
    assert y.max() == 1.0  # the gain grows with y: the search pushes into the range's edge
    assert any(k.endswith("_attack.png") for k in rep.files)
    assert "data:image/png;base64" in rep.to_html()


def test_attack_repeats_exactly_under_a_seed():
    def run(seed):
        rep = attack(Fragile(), _starts(), budget="l2:0.8", steps=8, samples=3, seed=seed, device="cpu")
        return rep["attack"]["starts"], rep.files["attack/worst.npz"]

    a, b, c = run(3), run(3), run(4)
    assert a[0] == b[0] and a[1] == b[1]
    assert a[0] != c[0]


def test_batched_equals_one_by_one():
    """``exact=False`` puts several starts in a pass: the same search up to the model's float32 kernels.
    Exact passes (the default) make the batch size irrelevant, bit for bit."""
    kw = dict(budget="linf:0.6", steps=10, samples=2, device="cpu")
    batched = attack(Fragile(), _starts(), batch_size=64, exact=False, **kw)["attack"]["starts"]
    single = attack(Fragile(), _starts(), batch_size=2, exact=False, **kw)["attack"]["starts"]
    exact = [attack(Fragile(), _starts(), batch_size=b, **kw) for b in (2, 64)]
    assert exact[0]["attack"] == exact[1]["attack"] and exact[0].files == exact[1].files
    for p, q in zip(batched, single):
        assert p["id"] == q["id"] and p["broken"] == q["broken"] and p["layer"] == q["layer"]
        for k in ("objective_before", "objective_after", "max_abs", "max_inverse_gain", "distance"):
            assert p[k] == pytest.approx(q[k], rel=1e-5, abs=1e-6)


def test_none_finds_the_distance_to_break():
    rep = attack(Fragile(), _starts(), budget="none", steps=40, samples=2, device="cpu")
    a = rep["attack"]
    assert a["summary"]["broken_rate"] == 1.0
    d = a["summary"]["median_distance_to_break"]
    assert 0.3 < d < 10  # |y|² ≈ 2–3 takes 1/s past 3: z/s leaves [-1, 1]
    assert all(s["broken_at_step"] > 0 and s["max_abs"] > 10 for s in a["starts"])
    # a broken start keeps climbing: reported beyond where it first broke
    assert all(s["distance"] >= s["distance_to_break"] - 1e-9 for s in a["starts"])
    assert d == pytest.approx(float(np.median([s["distance_to_break"] for s in a["starts"]])))
    assert a["sites"]["site"]["reached"] and a["sites"]["site"]["distance"] is not None


@pytest.mark.parametrize("objective", ["logdet", "max-gain", "max-abs"])
def test_inf_is_a_finding_not_a_crash(objective):
    """Scale exactly 0 in float32 at |y| = 3: those samples are ±Inf from the start, broken at step 0."""
    y = _starts(4)
    y[:2] = 3.0
    rep = attack(Fragile(eps=0.0, a=30.0), y, budget="linf:0.5", objective=objective, steps=5, samples=2, device="cpu")
    a = rep["attack"]
    json.loads(rep.to_json())  # strict JSON: inf written as "inf"
    for s in a["starts"][:2]:
        assert (
            s["broken"]
            and s["broken_at_step"] == 0
            and s["distance"] == s["distance_to_break"] == 0
            and s["nonfinite"] > 0
        )
        assert s["layer"] == "site" and math.isinf(s["max_abs"])
    assert a["summary"]["n_nonfinite_starts"] >= 2 and math.isinf(a["summary"]["worst_max_abs"])
    assert all(math.isfinite(s["objective_before"]) for s in a["starts"][2:])


class Chain(Fragile):
    """Fragile's site, then an affine-bounded site whose raw scale is 0·x: NaN (not Inf) once x is Inf."""

    def __init__(self):
        super().__init__(eps=0.0, a=30.0)
        from flowaudit.reference_models.couplings import AffineBounded

        self.second = AffineBounded()

    def reverse(self, latents, y):
        x = super().reverse(latents, y)
        raw = 0 * x
        return self.second(x, torch.stack([torch.zeros_like(raw), raw], 2).flatten(1, 2), reverse=True)[0]

    def trace_layers(self):
        return ["site", "second"]


def test_a_blow_up_is_charged_to_the_site_that_made_it():
    y = _starts(2)
    y[0] = 3.0  # scale exactly 0 at the first site: its gain is Inf, the second site's NaN
    rep = attack(Chain(), y, budget="linf:0.1", steps=2, samples=2, device="cpu")
    sites = rep["attack"]["sites"]
    assert math.isinf(sites["site"]["max_inverse_gain"]) and sites["site"]["reached"]
    assert sites["second"]["max_inverse_gain"] < 11 and not sites["second"]["reached"]
    assert rep["attack"]["starts"][0]["layer"] == "site"


def test_an_adapter_that_cannot_differentiate_says_so():
    class Detached(ReferenceAdapter):
        def sample(self, y, latents, observer=None):
            return super().sample(y.detach(), latents, observer)

    with pytest.raises(AuditError, match="cannot differentiate"):
        attack(
            Detached(Fragile()), _starts(2), budget="linf:0.1", steps=2, samples=1, device="cpu", objective="max-abs"
        )


def test_scan_attack_falls_back_to_max_abs_on_detached_gains():
    class Detached(ReferenceAdapter):
        def sample(self, y, latents, observer=None):
            class Strip:  # passes the gains on detached, like an adapter that cannot keep their graph
                def layer(self, name, x):
                    observer.layer(name, x)

                def site(self, name, gain, params):
                    observer.site(name, gain.detach(), params)

            return super().sample(y, latents, Strip() if observer is not None else None)

    with pytest.raises(AuditError, match="detached inverse gains"):
        attack(Detached(Fragile()), _starts(2), budget="linf:0.1", steps=2, samples=1, device="cpu")
    rep = flowaudit.scan(
        Detached(Fragile()), _starts(), samples=2, device="cpu", attack="linf:1", attack_starts=3, attack_steps=3
    )
    assert rep["attack"]["objective"] == "max-abs" and "logdet → max-abs" in rep["attack"]["fallback"]


def test_normal_scan_keeps_no_graph():
    ad = adapt(Fragile())
    seen = []

    class Plain:
        def layer(self, name, x):
            seen.append(x.requires_grad)

        def site(self, name, gain, params):
            seen.append(gain.requires_grad)

    y = _starts(2).requires_grad_(True)
    with torch.enable_grad():
        ad.sample(y, ad.sample_latents(y, 0.9, torch.Generator().manual_seed(0)), Plain())
    assert seen and not any(seen)


def test_scan_with_attack_adds_worst_case_evidence():
    rep = flowaudit.scan(
        Fragile(), _starts(), samples=2, device="cpu", attack="linf:1", attack_starts=4, attack_steps=5
    )
    wc = rep["model"]["sites"][0]["remark2"]["worst_case"]
    assert wc["budget"] == "linf:1" and wc["max_inverse_gain"] >= wc["max_inverse_gain_before"]
    assert rep["attack"]["summary"]["n_starts"] == 4


def test_attack_never_exceeds_the_certificate():
    """A certified model (standard RQ splines on a fixed [-B, B]): while the unbounded attack climbs, no
    site ever moves a value by more than its certified 2B. The bundled modified splines are not certified
    (their bias t is unbounded); for them the report says why, and the attack's 1/c' stays that of the bins."""
    from flowaudit.reference_models.couplings import RQSpline
    from flowaudit.reference_models.toy import Toy2D

    torch.manual_seed(0)
    model = Toy2D(coupling="rq-spline", steps=2, hidden=16, depth=2, feature_dim=4, zero_init=False).eval()
    bound = 3.0
    for step in model.flow:
        step.coupling.site.bound = bound
    _, y = toy_data(6, seed=5)
    cert = flowaudit.inspect(model, y, device="cpu", samples=2)["model"]["certificate"]
    assert cert["certified"] and cert["offset"] >= 2 * bound  # the sites add B each; the whole inverse more
    moved: list[float] = []

    def hook(module, args, kwargs, output):
        if kwargs.get("reverse", args[2] if len(args) > 2 else False):
            moved.append(float((output[0] - args[0]).detach().abs().max()))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, RQSpline)]
    try:
        rep = attack(model, y, budget="none", steps=30, samples=2, device="cpu")
    finally:
        for h in handles:
            h.remove()
    assert len(moved) >= 30 and max(moved) <= 2 * bound + 1e-5  # every site call of every step
    assert max(moved) > 0.1  # the bins do move values
    assert rep["attack"]["summary"]["worst_inverse_gain"] > 1  # inner bins: large gains, bounded moves

    bundled = flowaudit.inspect(load_model("toy-modified-rq-spline"), y, device="cpu", samples=2)["model"][
        "certificate"
    ]
    assert not bundled["certified"] and any("bias" in b["why"] for b in bundled["blocking"])


# -- CLI ------------------------------------------------------------------------------------------


@pytest.fixture()
def toy_file(tmp_path):
    path = tmp_path / "y.npy"
    np.save(path, toy_data(8, seed=2)[1].numpy())
    return str(path)


def test_cli_attack_exit_codes(toy_file, tmp_path):
    run = CliRunner().invoke
    base = ["-q", "attack", "toy-affine", "--data", toy_file, "--starts", "3", "-k", "2"]
    ok = run(cli, [*base, "--budget", "linf:0.01", "--steps", "3", "--out", str(tmp_path / "a"), "--fail-on", "broken"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "a" / "report.json").exists() and (tmp_path / "a" / "attack" / "worst.npz").exists()
    data = json.loads((tmp_path / "a" / "report.json").read_text())
    assert set(data["attack"]) >= {"objective", "budget", "starts", "summary"}
    assert set(data["attack"]["starts"][0]) >= {
        "id",
        "objective_before",
        "objective_after",
        "max_abs",
        "max_inverse_gain",
        "nonfinite",
        "broken",
        "distance",
        "layer",
    }
    broken = run(
        cli,
        [
            *base,
            "--budget",
            "none",
            "--step-size",
            "0.3",
            "--steps",
            "20",
            "--out",
            str(tmp_path / "b"),
            "--fail-on",
            "broken",
            "--json",
        ],
    )
    assert broken.exit_code == 1, broken.output
    assert json.loads(broken.stdout)["attack"]["summary"]["n_broken"] > 0
    bad = run(cli, [*base, "--budget", "linf:-2", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and not (tmp_path / "c").exists()
    assert len(bad.stderr.strip().splitlines()) == 1 and "bad budget" in bad.stderr
    again = run(cli, [*base, "--budget", "linf:0.01", "--steps", "1", "--out", str(tmp_path / "a")])
    assert again.exit_code == 2  # the folder exists and no --overwrite
    scan_bad = run(
        cli, ["-q", "scan", "toy-affine", "--data", toy_file, "--attack", "box:3,1", "--out", str(tmp_path / "d")]
    )
    assert scan_bad.exit_code == 2 and not (tmp_path / "d").exists()
    scanned = run(
        cli,
        [
            "-q",
            "scan",
            "toy-affine",
            "--data",
            toy_file,
            "-k",
            "2",
            "--attack",
            "linf:0.1",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert scanned.exit_code == 0, scanned.output
    data = json.loads((tmp_path / "e" / "report.json").read_text())
    assert data["attack"]["budget"]["spec"] == "linf:0.1"
    assert all(s["remark2"]["worst_case"]["budget"] == "linf:0.1" for s in data["model"]["sites"])
