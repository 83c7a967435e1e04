"""Remark 2 from evidence: the tail probe looks at the tails, the parameter reservoir
draws from every batch, each site's verdict says what it rests on, and certificates hold."""

from __future__ import annotations

import math

import pytest
import torch
from flowaudit.adapters import adapt
from flowaudit.reference_models import load
from flowaudit.reference_models.couplings import Elementwise, RQSpline
from flowaudit.reference_models.toy import Toy2D, toy_data
from torch import Tensor, nn

import flowaudit
from flowaudit.config.sampling import Sampling
from flowaudit.evidence.certificate import model_certificate, site_certificate
from flowaudit.evidence.sites import site_entries
from flowaudit.tracing.trace import Tracer


def _spline_toy(bound: float, steps: int = 0, seed: int = 0) -> Toy2D:
    """A random-init toy with standard RQ splines on [-bound, bound]; ``steps`` of training on the toy data."""
    torch.manual_seed(seed)
    model = Toy2D(coupling="rq-spline", steps=2, hidden=16, depth=2, feature_dim=4, zero_init=False)
    for step in model.flow:
        step.coupling.site.bound = float(bound)
    if steps:
        x, y = toy_data(512, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = -model.log_prob(x, y).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("bound", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("steps", [0, 20], ids=["random-init", "trained"])
def test_standard_rq_splines_comply(bound, steps):
    report = flowaudit.inspect(_spline_toy(bound, steps), toy_data(32, seed=1)[1], device="cpu", samples=2)
    for s in report["model"]["sites"]:
        r2 = s["remark2"]
        assert r2["verdict"] == "compliant" and r2["rests_on"] == ["structural", "measured", "swept"], r2["words"]
        assert r2["tail_ratio"] == 1.0
        # from past the interval out to near the float32 limit
        assert r2["probe"]["abs_x_min"] == pytest.approx(10 * bound) and r2["probe"]["abs_x_max"] >= 1e36
        assert r2["structural"]["tail_start"] == bound
    cert = report["model"]["certificate"]
    # two sites, each |x| ≤ max(|y|, B); ActNorms and 1×1s multiply: the whole inverse adds at least 2B
    assert cert["certified"] and cert["offset"] >= 2 * bound
    assert cert["bound"] == pytest.approx(cert["gain"] * cert["latent_abs"] + cert["offset"])
    assert f"no blow-up beyond {cert['bound']:.3g}" in report.summary()


class DriftingSpline(RQSpline):
    """An RQ spline whose interval is [-B(h), B(h)], B(h) = B·(1 + 10³·σ(h_extra)): it grows with the condition.

    Both axes scale together, so the bins keep their slopes; the site still reports ``bound`` = B.
    """

    def __init__(self, bound: float = 3.0):
        super().__init__(bins=4, bound=bound)
        self.params_per_dim = 3 * 4  # 11 spline parameters and one for the interval

    def _knots(self, x, h):
        k = self.bins
        p = h.reshape(x.shape[0], x.shape[1], self.params_per_dim, *x.shape[2:]).movedim(2, -1)
        scale = 1 + 1e3 * torch.sigmoid(p[..., -1:])
        d = self.min_derivative + nn.functional.softplus(
            p[..., 2 * k : -1] + math.log(math.expm1(1 - self.min_derivative))
        )
        one = torch.ones_like(d[..., :1])
        xk, yk = self._cumknots(p[..., :k]) * scale, self._cumknots(p[..., k : 2 * k]) * scale
        return xk, yk, torch.cat([one, d, one], -1), torch.zeros_like(x)


def test_a_spline_whose_tails_start_beyond_a_condition_dependent_bound_violates():
    torch.manual_seed(0)
    model = Toy2D(coupling="rq-spline", steps=2, hidden=16, depth=2, feature_dim=4, zero_init=False)
    g = torch.Generator().manual_seed(1)
    for step in model.flow:
        step.coupling.site = DriftingSpline()
        last = nn.Linear(16, step.coupling.site.params_per_dim)
        with torch.no_grad():  # bins far from the identity, the interval out to hundreds
            last.weight.mul_(0.1)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 3)
        step.coupling.net[-1] = last
    report = flowaudit.inspect(model.eval(), toy_data(32, seed=1)[1], device="cpu", samples=2)
    for s in report["model"]["sites"]:
        r2 = s["remark2"]
        assert r2["structural"]["verdict"] == "compliant"  # the declared bounds alone would pass it
        assert r2["verdict"] == "violates" and r2["rests_on"][0] == "measured", r2["words"]
        assert r2["structural"]["contradicted"][0]["by"] == "measured"
        assert r2["words"].startswith("violates (declared rq-spline, contradicted by your data: c' ∈ [")
        assert not r2["structural"]["certificate"]["certified"]
        assert r2["tail_ratio"] < 0.5
    assert report["model"]["remark2"]["verdict"] == "violates"


def test_affine_sites_are_labelled_by_structure_with_real_measured_figures():
    adapter = adapt(load("toy-affine"))
    report = flowaudit.inspect(adapter, device="cpu", samples=2)
    for s in report["model"]["sites"]:
        r2 = s["remark2"]
        assert r2["verdict"] == "violates" and r2["rests_on"] == ["structural"]
        assert r2["structural"]["verdict"] == "violates" and r2["structural"]["bound_ratio"] == pytest.approx(
            1e-4, rel=1e-3
        )
        m = r2["measured"]
        for key in ("tail_ratio", "derivative_min", "derivative_max"):
            assert isinstance(m[key], float) and math.isfinite(m[key])
        assert 0 < m["tail_ratio"] <= 1 and m["settled"] is True
        assert r2["worst_case"] is None
        assert r2["words"].startswith("violates by structure; not reached on your data (tail ratio ")
        assert not r2["structural"]["certificate"]["certified"]
    assert not report["model"]["certificate"]["certified"]
    # the attack's evidence plugs in per site
    names = [s.name for s in adapter.sites()]
    tracer = Tracer(Sampling(2, 0.9, 0))
    wc = {
        names[0]: {"reached": True, "distance": 15.0, "max_inverse_gain": 2e3},
        names[1]: {"reached": False, "distance": None},
    }
    entries = site_entries(adapter, [tracer], 0.5, worst_case=wc)
    assert entries[0]["remark2"]["rests_on"] == ["structural", "worst_case"]
    assert entries[0]["remark2"]["words"] == (
        "violates by structure; not measured (site not visited); "
        "inverse gain 1e+04 > 100 (structural sup, worst case max); reached by the attack at distance 15"
    )
    assert entries[1]["remark2"]["words"].endswith("not reached by the attack")
    assert entries[2]["remark2"]["worst_case"] is None


def test_an_unknown_map_is_probed_until_c_prime_settles():
    from flowaudit.evidence.remark2 import measured_evidence

    class Site:
        kind = "unknown"

        def __init__(self, fn):
            self.fn = fn

        def tail_start(self):
            return None

        def derivative_at(self, values, params):
            return self.fn(values[:, None].abs(), params[None, :])

    params = [torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)]
    tanh_tail = measured_evidence(Site(lambda x, a: 1 + torch.exp(-x / a)), params)  # c' → 1
    assert tanh_tail["settled"] and tanh_tail["verdict"] == "compliant" and tanh_tail["tail_ratio"] > 0.99
    assert tanh_tail["probe"]["abs_x_min"] >= 10 and tanh_tail["probe"]["abs_x_max"] >= 1e300  # float64 params
    soft_clip = measured_evidence(Site(lambda x, a: (1 + x / a) ** -2), params)  # c' → 0: never settles
    assert soft_clip["settled"] is False and soft_clip["verdict"] == "violates"


def _feed(tracer: Tracer, gains: list[Tensor]) -> None:
    """One batch per entry of ``gains`` (one gain per row); params are the global row number."""
    row = 0
    for g in gains:
        n = len(g)
        params = torch.arange(row, row + n, dtype=torch.float32)[:, None, None].expand(n, 2, 1).contiguous()
        tracer.site("s", g[:, None], params)
        tracer.end_batch(n // tracer.sampling.samples)
        row += n


def test_reservoir_keeps_every_batch_and_the_largest_gains():
    gen = torch.Generator().manual_seed(0)
    gains = [torch.rand(8, generator=gen) + 1 for _ in range(10)]  # 10 batches of 4 inputs × K = 2
    gains[7][3] = 1e6  # the two largest gains sit in batches 7 and 2
    gains[2][0] = 1e4
    big = Tracer(Sampling(2, 0.9, 0), param_budget=1024)  # room for all 80 rows
    _feed(big, gains)
    info = big.reservoir_info("s")
    assert info["rows"] == 80 and info["batches"] == 10 and info["inputs"] == 40 and info["rows_seen"] == 80
    small = Tracer(Sampling(2, 0.9, 0), param_budget=24)  # 12 rows: 6 by gain, 6 at random
    _feed(small, gains)
    (kept,) = small.params["s"]
    rows = set(kept[:, 0, 0].long().tolist())
    assert {7 * 8 + 3, 2 * 8 + 0} <= rows  # the largest gains are always kept
    info = small.reservoir_info("s")
    assert info["rows_capacity"] == 12 and info["rows"] <= 12 and info["batches"] >= 4 and info["budget"] == 24
    again = Tracer(Sampling(2, 0.9, 0), param_budget=24)
    _feed(again, gains)
    assert torch.equal(again.params["s"][0], kept)  # seeded: the same rows


def test_scan_probes_parameters_from_every_batch():
    report = flowaudit.scan(
        load("toy-modified-rq-spline"), toy_data(40, seed=2)[1], samples=2, batch_size=16, exact=False, device="cpu"
    )
    for s in report["model"]["sites"]:
        res = s["remark2"]["probe"]["reservoir"]
        # rows from every input and every inverse pass (5 passes of 8 inputs, or 40 of one in exact mode)
        assert res["inputs"] == 40 and res["batches"] >= 5 and res["rows"] == res["rows_seen"] == 80
        assert res["budget"] == report["model"]["remark2"]["reservoir_budget"]
    assert "reservoir of 65,536 parameter numbers per site" in report.summary()


def _displacements(model, y: Tensor, latents: list[Tensor]) -> list[tuple[Elementwise, Tensor, Tensor, Tensor]]:
    """(site, input, output, h) of every reverse site call while sampling."""
    seen = []

    def hook(module, args, kwargs, output):
        if kwargs.get("reverse", args[2] if len(args) > 2 else False):
            seen.append(
                (module, args[0].detach(), output[0].detach(), (args[1] if len(args) > 1 else kwargs["h"]).detach())
            )

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, Elementwise) and m.kind != "prior"
    ]
    try:
        with torch.no_grad():
            model.reverse(latents, y)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ["toy-modified-rq-spline", "lowlight-modified-rq-spline"])
def test_certificate_holds_under_large_latents(name):
    model = load(name).eval()
    adapter = adapt(model)
    certs = {s.name: site_certificate(s) for s in adapter.sites()}
    y = (
        toy_data(16, seed=5)[1]
        if name.startswith("toy")
        else torch.rand(2, *adapter.condition_shape, generator=torch.Generator().manual_seed(5))
    )
    latents = [z * 50 for z in adapter.sample_latents(y, 1.0, torch.Generator().manual_seed(0))]  # far out in the tails
    names = {m: n for n, m in model.named_modules()}
    seen = _displacements(model, y, latents)
    assert seen
    for module, inp, out, h in seen:
        cert = certs[names[module]]
        assert cert["plus_bias"] and cert["displacement"] == pytest.approx(module.b2 - module.b1)
        t = module._interior(inp, h)[3]
        assert bool(((out - inp).abs() <= cert["displacement"] + t.abs() + 1e-4 * (1 + inp.abs())).all())
    assert not model_certificate(
        [{"name": n, "remark2": {"structural": {"certificate": c}}} for n, c in certs.items()]
    )["certified"]


def test_certified_spline_bound_holds_under_large_latents():
    model = _spline_toy(3.0)
    adapter = adapt(model)
    y = toy_data(64, seed=5)[1]
    latents = [z * 100 for z in adapter.sample_latents(y, 1.0, torch.Generator().manual_seed(0))]
    seen = _displacements(model, y, latents)
    assert seen and all(bool(((out - inp).abs() <= 2 * 3.0 + 1e-5 * (1 + inp.abs())).all()) for _, inp, out, _ in seen)
    assert any(bool(((out - inp).abs() > 0.1).any()) for _, inp, out, _ in seen)  # the bins do move values


def test_reservoir_line_writes_counts_whole():
    """Counts of kept rows, inputs and passes read as whole numbers, not in 3-digit scientific notation."""
    from flowaudit.render.text import reservoir_line

    def site(rows, inputs, batches):
        return {
            "remark2": {"probe": {"reservoir": {"budget": 65536, "rows": rows, "inputs": inputs, "batches": batches}}}
        }

    line = reservoir_line({"sites": [site(20000, 2000, 2000), site(20000, 1990, 1990)]})
    assert line.endswith("kept 20,000 sample rows from 1,990–2,000 inputs in 1,990–2,000 inverse passes")
    assert reservoir_line({"sites": [{"remark2": {}}]}) is None


def test_reservoir_line_says_how_many_rows_the_whole_ladder_probed():
    """Where the probe screened rows and laddered only the extreme ones, the summary says so, with the counts."""
    from flowaudit.render.text import reservoir_line

    def site(rows, screened, ladder):
        kept = {"budget": 65536, "rows": rows, "inputs": 1000, "batches": 1}
        return {
            "remark2": {"probe": {"reservoir": kept, "rows": rows, "rows_screened": screened, "rows_ladder": ladder}}
        }

    line = reservoir_line({"sites": [site(4000, 4000, 75), site(3000, 3000, 80), site(10, 0, 10)]})
    assert line.endswith(
        "; 2 site(s) screened every kept row at the farthest |x| and probed the whole |x| range under 75–80 of "
        "3,000–4,000 rows, the ones the screen ranks most extreme"
    )
    assert "screened" not in reservoir_line({"sites": [site(10, 0, 10)]})


def test_vector_sweep_in_one_pass_keeps_what_decade_passes_keep_and_falls_back_on_a_refusal(monkeypatch):
    """Vector conditions go through every decade in one inverse pass: the same gain extremes and counts as one
    pass a decade (to float32 rounding). A model that refuses the far decades makes the sweep go decade by
    decade, keeping the nearer decades and naming the refusal."""
    from flowaudit.adapters import load_model
    from flowaudit.evidence import sweep as sw

    adapter = load_model("toy-affine")
    sample, calls = type(adapter).sample, []

    def counted(self, y, latents, observer=None):
        calls.append(len(y))
        return sample(self, y, latents, observer)

    monkeypatch.setattr(type(adapter), "sample", counted)
    one = sw.sweep(adapter)
    assert calls == [5 * sw.N_BASE * sw.SAMPLES]  # every decade in one call
    monkeypatch.setattr(sw, "_one_pass", lambda *a: None)  # as after a refusal of the one pass
    by_decade = sw.sweep(adapter)
    assert calls[1:] == [sw.N_BASE * sw.SAMPLES] * 5
    monkeypatch.undo()
    assert one["error"] is None and by_decade["error"] is None
    assert one["max_gain"].keys() == by_decade["max_gain"].keys()
    for name, g in one["max_gain"].items():
        assert g == pytest.approx(by_decade["max_gain"][name], rel=1e-5)
    assert (
        one["nonfinite_gain"] == by_decade["nonfinite_gain"] and one["nonfinite_layer"] == by_decade["nonfinite_layer"]
    )
    assert {k: sum(len(p) for p in v) for k, v in one["params"].items()} == {
        k: sum(len(p) for p in v) for k, v in by_decade["params"].items()
    }

    def refuse_far(self, y, latents, observer=None):
        if float(y.abs().max()) > 50:
            raise ValueError("condition out of range")
        return sample(self, y, latents, observer)

    monkeypatch.setattr(type(adapter), "sample", refuse_far)
    out = sw.sweep(adapter)
    assert out["error"] == "ValueError: condition out of range"
    assert {k: sum(len(p) for p in v) for k, v in out["params"].items()} == {
        k: 2 * n // 5 for k, n in ((k, sum(len(p) for p in v)) for k, v in one["params"].items())
    }  # the first two of five decades (1 and 10) kept
