"""Verdicts follow the evidence: no "safe" that the same run contradicts.

Each test builds a one- or two-site flow of its own (a :class:`~flowaudit.adapters.custom.CustomAdapter`)
whose map has a known answer: declared bounds judged by numbers, declarations contradicted by the probe
or the condition sweep, non-finite values, huge gains, maps whose slope decays only far out, maps with
no tails, unreached sites, conditional priors, and the gate that asks for proof.
"""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flowaudit.adapters.custom import CustomAdapter, site
from torch import Tensor, nn

import flowaudit
from flowaudit.cli.main import cli
from flowaudit.evidence.probe import measured_evidence
from flowaudit.evidence.remark2 import HUGE_GAIN

B = 1.0  # where the identity of the "bent" map ends


def bent(x: Tensor, k: Tensor) -> Tensor:
    """Identity on [-B, B], slope 1/(1 + k(|x| − B)) beyond: identity tails for k = 0, decaying for k > 0."""
    u = (x.abs() - B).clamp(min=0)
    ks = torch.where(k > 0, k, torch.ones_like(k))
    tail = torch.where(k > 0, torch.log1p(k * u) / ks, u)
    return torch.sign(x) * (x.abs().clamp(max=B) + tail)


def bent_inverse(z: Tensor, k: Tensor) -> Tensor:
    v = (z.abs() - B).clamp(min=0)
    ks = torch.where(k > 0, k, torch.ones_like(k))
    tail = torch.where(k > 0, torch.expm1(k * v) / ks, v)
    return torch.sign(z) * (z.abs().clamp(max=B) + tail)


class OneMap(nn.Module):
    """x = c⁻¹(z; φ(y)) for an elementwise map c with parameters φ = param(net(y)); dims 2, condition 2."""

    def __init__(self, c, c_inv, param, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Linear(2, 2)
        self.c, self.c_inv, self.param = c, c_inv, param

    def params(self, y: Tensor):
        return self.param(self.net(y))

    def step(self, z: Tensor, y: Tensor) -> Tensor:
        return self.c_inv(z, self.params(y))

    def unused(self, z: Tensor, y: Tensor) -> Tensor:  # declared as a site, never called while sampling
        return z

    def inverse(self, z: Tensor, y: Tensor) -> Tensor:
        return self.step(z, y)

    def forward(self, x: Tensor, y: Tensor):
        p = self.params(y)
        from torch.func import jvp

        z, d = jvp(lambda v: self.c(v, p), (x,), (torch.ones_like(x),))
        return z, d.abs().log().sum(1)


def adapter_of(flow: OneMap, extra_sites=(), **declared) -> CustomAdapter:
    s = site(flow.step, read=lambda m, args, x: (x, m.params(args[1])), map=flow.c, **declared)
    return CustomAdapter(
        flow,
        condition_shape=(2,),
        latent_shape=(2,),
        inverse=flow.inverse,
        forward=flow,
        sites=[s, *extra_sites],
        output_range=(-3.0, 3.0),
    )


def affine(x: Tensor, p) -> Tensor:
    s, t = p
    return s * x + t


def affine_inverse(z: Tensor, p) -> Tensor:
    s, t = p
    return (z - t) / s


def scaled(lo: float, hi: float):
    """φ = (s, t) with s = lo + (hi − lo)·sigmoid(a): a scale held inside [lo, hi]."""
    return lambda h: (lo + (hi - lo) * torch.sigmoid(h[:, :1]).expand(-1, 2), h[:, 1:].expand(-1, 2))


def r2_of(adapter, **kw) -> tuple[dict, dict]:
    report = flowaudit.inspect(adapter, device="cpu", samples=2, **kw)
    return report["model"]["sites"][0]["remark2"], report


# -- 1. numbers decide, never names; evidence beats declarations ---------------------------------


@pytest.mark.parametrize(("lo", "hi"), [(0.9, 1.1), (0.8, 1.2)], ids=["affine-bounded", "soft-clamp"])
def test_declared_bounds_are_judged_by_the_ratio_rule(lo, hi):
    flow = OneMap(affine, affine_inverse, scaled(lo, hi))
    r2, report = r2_of(adapter_of(flow, kind="affine-bounded", tail_bounds=(lo, hi)))
    assert r2["structural"]["bound_ratio"] == pytest.approx(lo / hi) and lo / hi > 0.5
    assert r2["structural"]["verdict"] == "compliant" and r2["verdict"] == "compliant", r2["words"]
    assert not r2["words"].startswith("violates")
    # the kind alone stands for (0.1, 1.1): ratio 0.09 — violates by the same rule, not by its name
    r2, _ = r2_of(adapter_of(flow, kind="affine-bounded"))
    assert r2["structural"]["bounds_from"] == "kind" and r2["structural"]["bound_ratio"] == pytest.approx(0.1 / 1.1)
    assert r2["verdict"] == "violates" and r2["rests_on"] == ["structural"]


def test_declared_spline_contradicted_at_far_conditions_violates_and_voids_the_certificate():
    # k = 0 for the scanned conditions (identity tails); k grows only for conditions 10× and more out
    flow = OneMap(bent, bent_inverse, lambda h: torch.relu(h.sum(1, keepdim=True) - 4.0).expand(-1, 2))
    with torch.no_grad():
        flow.net.weight.fill_(1.0)
        flow.net.bias.zero_()
    y = torch.randn(32, 2, generator=torch.Generator().manual_seed(3)) * 0.3
    r2, report = r2_of(adapter_of(flow, kind="rq-spline", tail_start=B), data=y.numpy())
    assert r2["measured"]["verdict"] == "compliant"  # the scanned data never show it
    assert r2["swept"]["verdict"] == "violates"
    assert r2["verdict"] == "violates" and r2["rests_on"][0] == "swept", r2["words"]
    assert r2["words"].startswith("violates (declared rq-spline, contradicted by the sweep: c' ∈ [")
    assert not r2["structural"]["certificate"]["certified"] and "voided" in r2["structural"]["certificate"]["why"]
    assert not report["model"]["certificate"]["certified"]
    # the same map with k = 0 everywhere keeps its certificate
    flat = OneMap(bent, bent_inverse, lambda h: torch.zeros_like(h))
    r2, report = r2_of(adapter_of(flat, kind="rq-spline", tail_start=B))
    assert r2["verdict"] == "compliant" and report["model"]["certificate"]["certified"], r2["words"]


# -- 2. non-finite is evidence ------------------------------------------------------------------


def test_nonfinite_samples_count_as_blow_up_at_the_site():
    # k ≈ 200 on every condition: expm1(k·v) overflows float32 for |z| past B + 0.45, samples go Inf
    flow = OneMap(bent, bent_inverse, lambda h: 200.0 + 0 * h)
    adapter = adapter_of(flow)  # kind unknown: no declaration to lean on
    y = torch.zeros(8, 2)
    report = flowaudit.scan(adapter, y.numpy(), samples=8, device="cpu", temperature=1.5)
    (s,) = report["model"]["sites"]
    assert report["risk"]["pct_inf"] > 0
    assert s["inverse_gain"]["n_nonfinite"] > 0
    r2 = s["remark2"]
    assert r2["gain"]["nonfinite_here"] and r2["verdict"] == "violates"
    assert "non-finite values first appear at this site" in r2["words"]
    assert report.gate("violation").startswith("--fail-on violation: Remark 2 violated by: step")


def test_nonfinite_derivative_in_the_probe_is_not_dropped():
    class Site:
        kind = "unknown"

        def tail_start(self):
            return None

        def derivative_at(self, values, params):  # c' = 1, then NaN past |x| = 1e6
            v = values[:, None].abs() * torch.ones_like(params[None, :])
            return torch.where(v > 1e6, torch.full_like(v, math.nan), torch.ones_like(v))

    ev = measured_evidence(Site(), [torch.ones(3)])
    assert ev["nonfinite"]["count"] > 0 and 1e6 <= ev["nonfinite"]["first_abs_x"] <= 1e7
    assert ev["verdict"] == "violates" and ev["tail_ratio"] == 0.0


# -- 3. the size of the inverse gain ---------------------------------------------------------------


def test_a_huge_gain_is_flagged_whatever_the_ratio():
    flow = OneMap(affine, affine_inverse, scaled(0.9e-3, 1.1e-3))  # ratio 0.82, gain ≈ 1000 everywhere
    r2, _ = r2_of(adapter_of(flow, kind="affine-bounded", tail_bounds=(0.9e-3, 1.1e-3)))
    assert r2["structural"]["verdict"] == "compliant"
    assert r2["verdict"] == "violates" and r2["rests_on"] == ["gain"], r2["words"]
    assert r2["gain"]["structural_sup"] > 900 and "measured_max" in r2["gain"]["huge"]
    assert f"> {HUGE_GAIN:g}" in r2["words"]
    # the same map with no declaration: the probe settles (ratio 1), the gain still decides
    r2, _ = r2_of(adapter_of(OneMap(affine, affine_inverse, scaled(1e-3, 1e-3))))
    assert r2["measured"]["settled"] and r2["tail_ratio"] == pytest.approx(1.0)
    assert r2["verdict"] == "violates" and r2["rests_on"] == ["gain"]


# -- 4. a probe that reaches the tails -------------------------------------------------------------


class FnSite:
    kind = "unknown"

    def __init__(self, fn, start=None):
        self.fn, self.start = fn, start

    def tail_start(self):
        return self.start

    def derivative_at(self, values, params):
        return self.fn(values[:, None].abs(), params[None, :])


def test_identity_to_100_then_decaying_violates():
    site = FnSite(lambda x, a: torch.where(x <= 100, torch.ones_like(x * a), 100 / x * a))
    ev = measured_evidence(site, [torch.ones(3)])
    assert ev["settled"] is False and ev["verdict"] == "violates" and ev["tail_ratio"] < 1e-10
    assert ev["probe"]["abs_x_max"] >= 1e36  # float32 parameters: out to near their limit
    assert ev["slope"]["log_max"] < -1  # log c' keeps falling with log |x|


def test_polynomial_with_identity_tails_settles_and_complies():
    # c' = 1 + 3(1 − x²)² inside [−1, 1], exactly 1 beyond: settled over the whole range
    site = FnSite(lambda x, a: torch.where(x < 1, 1 + 3 * (1 - x**2) ** 2, torch.ones_like(x)) * a)
    ev = measured_evidence(site, [torch.ones(2)])
    assert ev["settled"] and ev["verdict"] == "compliant" and ev["tail_ratio"] == 1.0


def test_a_map_with_no_tails_is_a_finding_not_a_crash():
    class Interval(FnSite):
        def derivative_at(self, values, params):
            if (values.abs() > 1).any():
                raise ValueError("spline defined on [0, 1] only")
            return torch.ones(len(values), len(params))

    ev = measured_evidence(Interval(None), [torch.ones(2)])
    assert ev["verdict"] == "inconclusive" and ev["domain"]["no_tails"] and "[0, 1]" in ev["domain"]["why"]


# -- 5. unvisited declared sites ------------------------------------------------------------------


def test_an_unreached_site_is_reported_and_blocks_the_certificate():
    flow = OneMap(bent, bent_inverse, lambda h: torch.zeros_like(h))
    ghost = site(
        flow.unused, read=lambda m, args, x: (x, torch.zeros_like(x)), kind="rq-spline", map=bent, tail_start=B
    )
    report = flowaudit.inspect(adapter_of(flow, [ghost], kind="rq-spline", tail_start=B), device="cpu", samples=2)
    model = report["model"]
    assert model["coverage"]["complete"] is False and "unused" in model["coverage"]["reason"]
    assert model["certificate"]["certified"] is False
    assert any(b["site"] == "unused" for b in model["certificate"]["blocking"])
    assert model["remark2"]["verdict"] != "compliant"
    assert any("unused" in u for u in report.unproven())


# -- 6. conditional priors ------------------------------------------------------------------------


def prior(x: Tensor, p) -> Tensor:
    mean, std = p
    return (x - mean) / std


def prior_inverse(z: Tensor, p) -> Tensor:
    mean, std = p
    return mean + std * z


@pytest.mark.parametrize(
    ("log_std", "verdict"), [(lambda a: a, "violates"), (lambda a: 0.2 * torch.tanh(a), "compliant")]
)
def test_a_prior_whose_sigma_is_an_unbounded_function_of_the_condition_violates(log_std, verdict):
    flow = OneMap(prior, prior_inverse, lambda h: (h[:, 1:].expand(-1, 2), log_std(h[:, :1]).exp().expand(-1, 2)))
    with torch.no_grad():
        flow.net.weight.mul_(0.01)  # on the scanned data σ barely moves: only the sweep shows where it goes
    r2, _ = r2_of(adapter_of(flow, kind="prior"), data=(np.random.default_rng(0).standard_normal((16, 2)) * 0.1))
    assert r2["verdict"] == verdict, r2["words"]
    if verdict == "violates":
        assert r2["measured"]["verdict"] == "compliant" and "swept" in r2["rests_on"]


# -- 7. the gate that asks for proof ----------------------------------------------------------------


def unproven_adapter() -> CustomAdapter:
    """An undeclared affine map: compliant on the measured ratio, but nothing bounds it: not certified."""
    return adapter_of(OneMap(affine, affine_inverse, scaled(0.6, 1.0)))


def certified_adapter() -> CustomAdapter:
    return adapter_of(OneMap(bent, bent_inverse, lambda h: torch.zeros_like(h)), kind="rq-spline", tail_start=B)


@pytest.fixture()
def factory(tmp_path, monkeypatch):
    name = f"fa_verdicts_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(f"from {__name__} import unproven_adapter, certified_adapter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "y.npy"
    np.save(data, (np.random.default_rng(0).standard_normal((6, 2)) * 0.3).astype(np.float32))
    return name, data


def test_report_unproven_and_gate():
    rep = flowaudit.inspect(unproven_adapter(), device="cpu", samples=2)
    assert rep.violations() == []
    assert rep.unproven() and rep.unproven()[-1].startswith("model not certified")
    assert rep.gate("unproven").startswith("--fail-on unproven: not proven safe: ")
    assert rep.gate("violation") is None and rep.unproven_note().startswith("note: no violation")
    ok = flowaudit.inspect(certified_adapter(), device="cpu", samples=2)
    assert ok.unproven() == [] and ok.gate("unproven") is None and ok.unproven_note() is None


def test_cli_fail_on_unproven(factory, tmp_path):
    name, data = factory
    runner = CliRunner()

    def scan(builder, out, rule):
        args = [
            "-q",
            "scan",
            "--model",
            f"{name}:{builder}",
            "--random-init",
            "--data",
            str(data),
            "--samples",
            "2",
            "--device",
            "cpu",
        ]
        return runner.invoke(cli, [*args, "--out", str(tmp_path / out), "--fail-on", rule])

    res = scan("unproven_adapter", "a", "violation")
    assert res.exit_code == 0, res.output
    assert "note: no violation, but the model is not proven safe" in res.output
    res = scan("unproven_adapter", "b", "unproven")
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.startswith("--fail-on")]
    assert len(lines) == 1 and lines[0].startswith("--fail-on unproven: not proven safe: ")
    assert "model not certified: step" in lines[0]
    assert json.loads((tmp_path / "b" / "report.json").read_text())["model"]["certificate"]["certified"] is False
    res = scan("certified_adapter", "c", "unproven")
    assert res.exit_code == 0, res.output
