"""The audit engine: exact counting, Remark 2 verdicts, traces, hooks left behind, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flowaudit.reference_models import ReferenceFlow
from flowaudit.reference_models.couplings import Affine
from flowaudit.reference_models.toy import Toy2D, toy_data
from torch import nn

import flowaudit
from flowaudit.errors import AuditError
from flowaudit.evidence.remark2 import probe_values, tail_ratio, verdict
from flowaudit.tracing.gains import GainStats
from flowaudit.tracing.layer_stats import LayerStats


class Rigged(ReferenceFlow):
    """x = f⁻¹(z; y) with one affine site whose scale is sigmoid(y₀) exactly (no epsilon).

    For y₀ = -1000 the scale is 0 in float32, so every sample of that input is
    ±Inf: the inputs that break are known in advance.
    """

    task = "toy"
    condition_shape = (2,)
    output_range = (-5.0, 5.0)  # band [-10, 10]: only the rigged inputs leave it

    def __init__(self, fail: bool = False):
        super().__init__(fail=fail)
        self.site = Affine(eps=0.0, offset=0.0)
        self.lin = nn.Linear(2, 2)  # a parameter to fingerprint and to move between devices
        self.fail = fail

    def encoder_module(self):
        return None

    def default_feature_layers(self):
        return []

    def encode(self, y):
        return y

    def _h(self, y):
        raw = y[:, :1].expand(-1, 2)
        return torch.stack([torch.zeros_like(raw), raw], -1).flatten(1)  # cross layout: shift 0, raw y₀

    def forward(self, x, y):
        z, ladj = self.site(x, self._h(y))
        return [z], ladj.sum(1)

    def reverse(self, latents, y):
        if self.fail:
            raise RuntimeError("rigged failure")
        return self.site(latents[0], self._h(y), reverse=True)[0]

    def latent_shapes(self, y):
        return [(y.shape[0], 2)]

    def trace_layers(self):
        return ["site"]


def _conditions(n_bad: int, n: int = 12) -> torch.Tensor:
    y = torch.full((n, 2), 3.0)
    y[:n_bad, 0] = -1000.0
    return y


def test_non_finite_samples_are_counted_exactly():
    model = Rigged()
    y = _conditions(n_bad=3)
    fit_y = torch.randn(200, 2) * 0.1 + 3.0
    report = flowaudit.scan(model, y, fit_data=fit_y, samples=5, device="cpu", batch_size=10)
    recs = report["inputs"]
    assert [r["n_inf"] for r in recs] == [5] * 3 + [0] * 9
    assert all(r["n_pixel_err"] == 5 for r in recs[:3])
    assert all(math.isinf(r["max_abs"]) for r in recs[:3])
    assert report["risk"]["pct_inf"] == pytest.approx(100 * 3 / 12)
    site = report["model"]["sites"][0]
    assert site["inverse_gain"]["n_nonfinite"] == 3 * 5 * 2  # 1/s = inf at every value of the bad inputs
    trace = {row["name"]: row for row in report["layers"]}
    assert trace["site"]["in"]["n_nonfinite"] == 3 * 5 * 2
    # the bad inputs are far from the fit data: s_OOD ranks them and the logistic fit exists
    assert report["risk"]["auroc"] == 1.0
    assert report["risk"]["ranked"][:3] == ["in/row0", "in/row1", "in/row2"]
    json.loads(report.to_json())  # strict JSON despite inf values
    g = recs[5]["inverse_gain"]  # a healthy input: 1/s = 1 + e⁻³ at every visited point
    assert g["min"] == pytest.approx(1 + math.exp(-3), rel=1e-6) and g["max"] == pytest.approx(g["min"])
    assert g["min"] <= g["p50"] <= g["p99"] <= g["max"]
    assert math.isinf(recs[0]["inverse_gain"]["max"])


def test_explosion_layer_is_the_first_past_the_threshold():
    """OOD inputs (y₀ = -5) make 1/s ≈ 150: variance × 22 000 at the site, named as the explosion layer."""
    y_in = torch.full((20, 2), 3.0)
    y_ood = torch.full((20, 2), -5.0)
    rep = flowaudit.scan(Rigged(), y_in, ood=y_ood, samples=8, device="cpu")
    ratio = (1 + math.exp(5)) ** 2 / (1 + math.exp(-3)) ** 2
    row = rep["layers"][0]
    assert row["name"] == "site" and rep["explosion_layer"] == "site"
    assert row["variance_ratio"] == pytest.approx(ratio, rel=0.6)  # 160 samples of each
    assert (
        flowaudit.scan(Rigged(), y_in, ood=y_ood, samples=8, device="cpu", explosion_threshold=1e9)["explosion_layer"]
        is None
    )


def test_failure_leaves_no_hook_and_restores_training_flag():
    model = Rigged(fail=True)
    model.train()
    with pytest.raises(RuntimeError, match="rigged failure"):
        flowaudit.scan(model, _conditions(0), samples=2, device="cpu")
    assert model.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_hooks_with_kwargs


@pytest.fixture(scope="module")
def toys():
    torch.manual_seed(0)
    return {
        k: Toy2D(coupling=k, hidden=16, depth=2, zero_init=False).eval()
        for k in ("affine", "modified-rq-spline", "additive")
    }


def test_remark2_verdicts_on_toy_models(toys):
    y = toy_data(64, seed=1)[1]
    aff = flowaudit.inspect(toys["affine"], y, device="cpu")
    spl = flowaudit.inspect(toys["modified-rq-spline"], y, device="cpu")
    add = flowaudit.inspect(toys["additive"], y, device="cpu")
    assert {s["remark2"]["verdict"] for s in aff["model"]["sites"]} == {"violates"}
    for rep in (spl, add):
        for s in rep["model"]["sites"]:
            assert s["remark2"]["verdict"] == "compliant"
            assert s["remark2"]["tail_ratio"] == pytest.approx(1.0, abs=1e-12)


def test_probe_follows_the_live_spline_bound():
    """Bins out to |x| = 500: the probe reads the live bound (tail_start) and looks beyond it, 5·10³ to the float limit.

    (A probe fixed to [1, 10⁴] would see these bins and say "violates". The identity tails themselves
    comply; a spline whose tails start beyond a *condition-dependent* bound is in
    tests/test_evidence.py.)
    """
    torch.manual_seed(0)
    model = Toy2D(coupling="rq-spline", hidden=16, depth=2, zero_init=False).eval()
    for step in model.flow:
        step.coupling.site.bound = 500.0
        last = step.coupling.net[-1]
        with torch.no_grad():  # far from the identity: bins of very different widths and slopes
            last.bias.copy_(torch.randn(last.bias.shape, generator=torch.Generator().manual_seed(1)) * 3)
    rep = flowaudit.inspect(model, toy_data(32, seed=1)[1], device="cpu")
    assert {s["remark2"]["verdict"] for s in rep["model"]["sites"]} == {"compliant"}
    for s in rep["model"]["sites"]:
        assert s["remark2"]["probe"]["abs_x_min"] == 5000.0 and s["remark2"]["probe"]["abs_x_max"] >= 1e36
        assert s["remark2"]["tail_ratio"] == 1.0


def test_verdict_rules():
    assert verdict("affine", 1.0) == "violates"
    assert verdict("modified-rq-spline", 1.0) == "compliant"
    assert verdict("rq-spline", 0.2) == "violates"
    assert verdict("unknown", 0.9) == "inconclusive"
    assert verdict("unknown", 0.1) == "violates"
    assert verdict("prior", 1.0) == "compliant"
    assert verdict("additive", math.nan) == "compliant"  # not visited: the structure alone
    assert tail_ratio(torch.tensor([0.5, 2.0, float("nan")])) == 0.25
    v = probe_values()
    assert v.abs().min() == 1 and v.abs().max() == 1e4 and (v < 0).sum() == (v > 0).sum()


def test_scan_is_batch_size_independent_and_reproducible(toys):
    x, y = toy_data(30, seed=3)
    a = flowaudit.scan(toys["affine"], y, samples=4, batch_size=8, device="cpu", seed=7)
    b = flowaudit.scan(toys["affine"], y, samples=4, batch_size=500, device="cpu", seed=7)
    for ra, rb in zip(a["inputs"], b["inputs"]):  # same latents; matmul blocking may differ by an ulp
        assert (ra["n_inf"], ra["n_pixel_err"]) == (rb["n_inf"], rb["n_pixel_err"])
        assert ra["max_abs"] == pytest.approx(rb["max_abs"], rel=1e-5)
    c = flowaudit.scan(toys["affine"], y, samples=4, device="cpu", seed=8)
    assert c["inputs"] != a["inputs"]


def test_report_has_the_contract_keys_and_explosion_layer(toys, tmp_path):
    x, y = toy_data(40, seed=3)
    _, y_ood = toy_data(40, seed=4, ood=True)
    from flowaudit.io.datasets import ConditionSet

    data = ConditionSet(y=y, x=x, ids=[f"t{i}" for i in range(40)], description={"kind": "test"})
    rep = flowaudit.scan(toys["affine"], data, ood=y_ood, fit_data=toy_data(300, seed=0)[1], samples=3, device="cpu")
    d = json.loads(rep.to_json())
    for key in ("flowaudit_version", "model", "ood", "risk", "layers", "inputs"):
        assert key in d
    for key in ("name", "adapter", "n_parameters", "sites"):
        assert key in d["model"]
    site = d["model"]["sites"][0]
    assert {"name", "kind", "remark2", "inverse_gain"} <= set(site)
    assert {"verdict", "tail_ratio"} <= set(site["remark2"])
    assert {"min", "p50", "p99", "max"} <= set(site["inverse_gain"])
    assert {"layers", "dim", "s_ood"} <= set(d["ood"])
    for key in (
        "n_inputs",
        "samples_per_input",
        "temperature",
        "pct_inf",
        "pct_pixel_err",
        "auroc",
        "spearman",
        "logistic",
    ):
        assert key in d["risk"]
    for key in ("id", "s_ood", "n_inf", "n_pixel_err", "max_abs", "risk"):
        assert key in d["inputs"][0]
    # targets given: the forward/inverse reconstruction error is small for a healthy flow
    assert max(r["reconstruction_error"] for r in rep["inputs"] if r["set"] == "in") < 1e-4
    assert [r["name"] for r in rep["layers"]] == toys["affine"].trace_layers() + ["output"]
    html = rep.to_html()
    assert '<img src="data:image/png;base64,' in html and "http://" not in html and "https://" not in html
    out = rep.save(tmp_path / "r")
    assert sorted(p.name for p in out.iterdir()) == ["inputs.csv", "report.html", "report.json"]
    with pytest.raises(FileExistsError):
        rep.save(tmp_path / "r")


def test_stats_must_match_the_model(toys, tmp_path):
    y = toy_data(100, seed=0)[1]
    flowaudit.fit(toys["affine"], y, out=tmp_path / "s.h5", device="cpu")
    rep = flowaudit.scan(toys["affine"], y[:5], stats=tmp_path / "s.h5", samples=2, device="cpu")
    assert rep["ood"]["n_fit"] == 100
    with pytest.raises(AuditError, match="fitted on weights"):
        flowaudit.scan(toys["modified-rq-spline"], y[:5], stats=tmp_path / "s.h5", samples=2, device="cpu")
    with pytest.raises(AuditError, match="layers"):
        flowaudit.scan(toys["affine"], y[:5], stats=tmp_path / "s.h5", samples=2, device="cpu", pooling="avgstd")


def test_features_hook_the_encoder_and_leave_nothing(toys):
    from flowaudit.adapters import adapt

    from flowaudit.stats.features import features

    model = toys["affine"]
    y = toy_data(10, seed=0)[1]
    v = features(adapt(model), y, ["encoder"], "avg", 4, torch.device("cpu"))
    assert torch.allclose(v, model.encoder(y).double())
    assert all(not m._forward_hooks_with_kwargs for m in model.modules())
    with pytest.raises(AuditError, match="no module named 'nope'"):
        features(adapt(model), y, ["nope"], "avg", 4, torch.device("cpu"))


def test_layer_and_gain_statistics_match_numpy():
    rng = np.random.default_rng(0)
    values = [rng.normal(3, 2, size=(50, 4)) for _ in range(5)]
    st = LayerStats()
    for v in values:
        st.add(torch.tensor(v))
    st.add(torch.tensor([[math.inf, math.nan]]))
    allv = np.concatenate([v.ravel() for v in values])
    assert st.variance == pytest.approx(allv.var(), rel=1e-12)
    assert st.n_nonfinite == 2 and st.max_abs == math.inf
    g = GainStats()
    gains = 10 ** rng.uniform(-1, 3, size=20000)
    g.add(torch.tensor(gains))
    assert g.min == gains.min() and g.max == gains.max()
    for q in (0.5, 0.99):
        assert g.quantile(q) == pytest.approx(np.quantile(gains, q), rel=0.06)  # bins are 0.025 decades


def test_auditing_restores_every_modules_training_flag():
    from flowaudit.adapters import adapt

    from flowaudit.config.device import auditing

    model = Toy2D(coupling="affine")
    model.train()
    frozen = next(m for m in model.modules() if m is not model)
    frozen.eval()  # a user may keep one part in eval mode while training the rest
    before = {n: m.training for n, m in model.named_modules()}
    with auditing(adapt(model), torch.device("cpu")):
        assert not any(m.training for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == before
