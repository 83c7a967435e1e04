"""Nothing passes unseen: a model whose adapter finds no site must never look clean.

Adapter side (passes now): ``sites()`` may be empty and ``coverage()`` says why in one line
starting ``"no sites found: "``. Engine side: the report
carries ``model.coverage`` and the model-level verdict ``"no sites found"``, says so at the top of
the summary and the HTML, ``Report.violations()`` is not empty, and ``scan --fail-on violation``
exits 1.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flowaudit.adapters import Adapter, adapt
from flowaudit.adapters.custom import CustomAdapter
from torch import nn

import flowaudit
from flowaudit.cli.main import cli


class PlainFlow(nn.Module):
    """A conditional flow with its own couplings and no declarations: x = z·s(y) + t(y)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(2, 4)

    def params(self, y):
        a, t = self.net(y).chunk(2, 1)
        return torch.sigmoid(a) + 1e-4, t

    def forward(self, x, y):
        s, t = self.params(y)
        return (x - t) / s, -s.log().sum(1)

    def inverse(self, z, y):
        s, t = self.params(y)
        return z * s + t


def no_site_adapter(flow: PlainFlow | None = None) -> CustomAdapter:
    """The flow declared without sites: it runs, but the audit sees no elementwise map."""
    flow = flow or PlainFlow()
    return CustomAdapter(
        flow,
        condition_shape=(2,),
        latent_shape=(2,),
        output_range=(-0.5, 0.5),
        inverse=flow.inverse,
        forward=flow,
        sites=[],
    )


# -- adapter side ----------------------------------------------------------------------------------


def test_custom_adapter_without_sites_is_allowed_and_says_so():
    adapter = no_site_adapter()
    assert adapter.sites() == []
    cov = adapter.coverage()
    assert cov["n_sites"] == 0 and cov["complete"] is False
    assert cov["reason"].startswith("no sites found: ") and "declares none" in cov["reason"]
    assert "\n" not in cov["reason"]
    json.dumps(cov)


def test_base_adapter_coverage_default():
    class Bare(Adapter):
        family = "bare"
        condition_shape = (2,)

        def sites(self):
            return []

        def sample_latents(self, y, t, g):
            return []

        def sample(self, y, latents, observer=None):
            return y

        def forward(self, x, y):
            return [x], x[:, 0] * 0

        def log_prob(self, x, y):
            return x[:, 0] * 0

    cov = Bare(PlainFlow(), "plain").coverage()
    assert cov == {"n_sites": 0, "complete": False, "reason": cov["reason"]}
    assert cov["reason"].startswith("no sites found: the bare adapter") and "plain" in cov["reason"]


def test_plain_module_without_declarations_has_no_adapter_and_the_cli_says_how(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="CustomAdapter"):
        adapt(PlainFlow())
    name = f"fa_plain_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = CliRunner().invoke(cli, ["-q", "inspect", "--model", f"{name}:build"])
    assert res.exit_code == 2 and "no flowaudit adapter" in res.stderr and "CustomAdapter" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_scan_without_sites_still_runs():
    report = flowaudit.scan(no_site_adapter(), torch.randn(6, 2) * 0.3, samples=2, device="cpu")
    assert report["model"]["sites"] == []
    assert len(report["inputs"]) == 6


# -- engine side: the report carries coverage and the model verdict -------------------------------


def test_inspect_reports_no_sites_found_prominently():
    report = flowaudit.inspect(no_site_adapter(), device="cpu", samples=2)
    model = report["model"]
    assert model["coverage"] == no_site_adapter().coverage()
    assert model["remark2"]["verdict"] == "no sites found"
    head = "\n".join(report.summary().lower().splitlines()[:3])
    assert "no sites found" in head, report.summary()
    assert "no sites found" in report.to_html().lower()


def test_python_gate_does_not_pass_a_model_without_sites():
    report = flowaudit.scan(no_site_adapter(), torch.randn(6, 2) * 0.3, samples=2, device="cpu")
    assert report["model"]["remark2"]["verdict"] == "no sites found"
    assert report.violations(), "`assert not report.violations()` must not pass an audit that saw nothing"


def test_model_verdict_with_sites():
    from flowaudit.reference_models import load

    report = flowaudit.inspect(load("toy-affine"), device="cpu", samples=2)
    assert report["model"]["coverage"] == {"n_sites": 4, "complete": True, "reason": None}
    assert report["model"]["remark2"]["verdict"] == "violates"
    report = flowaudit.inspect(load("toy-modified-rq-spline"), device="cpu", samples=2)
    assert report["model"]["remark2"]["verdict"] == "compliant"


@pytest.fixture()
def factory(tmp_path, monkeypatch):
    name = f"fa_nosites_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(f"from {__name__} import no_site_adapter as build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "y.npy"
    np.save(data, (np.random.default_rng(0).standard_normal((6, 2)) * 0.3).astype(np.float32))
    return f"{name}:build", data


def test_cli_scan_fail_on_violation_exits_1_without_sites(factory, tmp_path):
    spec, data = factory
    runner = CliRunner()
    args = ["-q", "scan", "--model", spec, "--random-init", "--data", str(data), "--samples", "2", "--device", "cpu"]
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "r1"), "--fail-on", "violation"])
    assert res.exit_code == 1, res.output
    assert "no sites found" in res.output.lower()
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert report["model"]["remark2"]["verdict"] == "no sites found"
    assert report["model"]["coverage"]["reason"].startswith("no sites found")
    res = runner.invoke(cli, [*args, "--out", str(tmp_path / "r2"), "--fail-on", "never"])
    assert res.exit_code == 0 and "no sites found" in res.output.lower()


def test_cli_inspect_json_carries_coverage(factory):
    spec, _ = factory
    res = CliRunner().invoke(cli, ["-q", "inspect", "--model", spec, "--random-init", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout)["model"]
    assert model["sites"] == [] and model["remark2"]["verdict"] == "no sites found"
    assert model["coverage"]["complete"] is False
