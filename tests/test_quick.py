"""``scan --quick``: the scan's %Inf, %PixelErr and inverse-gain range, and it says what it skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from flowaudit.adapters import load_model

import flowaudit
from flowaudit.cli.main import cli
from flowaudit.demo import demo_sets
from flowaudit.runs.quick import SKIPPED


@pytest.mark.parametrize("model", ["toy-affine", "sr-affine"])
def test_quick_gives_the_scans_figures(model):
    adapter = load_model(model)
    _, test, ood = demo_sets(adapter.task, n_fit=4, n_test=8, n_ood=10)
    test, ood = (type(cs)(y=cs.y[:10], x=None, ids=cs.ids[:10], description=cs.description) for cs in (test, ood))
    full = flowaudit.scan(adapter, test, ood=ood, samples=3, device="cpu")
    fast = flowaudit.quick(adapter, test, ood=ood, samples=3, device="cpu", batch_size=12)
    for name in ("in", "ood"):
        want, got = full["risk"]["by_set"][name], fast["by_set"][name]
        assert (got["pct_inf"], got["pct_pixel_err"]) == (want["pct_inf"], want["pct_pixel_err"])
        gains = [s["inverse_gain_by_set"][name] for s in full["model"]["sites"] if "inverse_gain_by_set" in s]
        high = max(g["max"] for g in gains)
        assert got["inverse_gain"]["max"] == pytest.approx(high, rel=1e-5)
        low = min(g["min"] for g in gains)
        assert got["inverse_gain"]["min"] == pytest.approx(low, rel=1e-5)
    assert fast["skipped"] == list(SKIPPED)


def test_cli_quick_prints_the_answer_and_what_it_skipped(tmp_path):
    _, test, _ = demo_sets("toy")
    data = tmp_path / "y.npy"
    np.save(data, test.y[:20].numpy())
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["-q", "scan", "toy-affine", "--data", str(data), "--out", str(out), "--quick"])
    assert r.exit_code == 0, r.output
    assert "%Inf 0.0" in r.output and "skipped (--quick): s_OOD" in r.output and "Remark 2" in r.output
    answer = json.loads((out / "quick.json").read_text())
    assert answer["kind"] == "quick" and answer["by_set"]["in"]["n_inputs"] == 20
    assert not (out / "report.html").exists()


@pytest.mark.parametrize("extra", [["--attack", "linf:0.1"], ["--fail-on", "risk"], ["--fit-data", "DATA"]])
def test_cli_quick_refuses_what_it_would_ignore(tmp_path, extra):
    data = tmp_path / "y.npy"
    np.save(data, np.zeros((4, 2), np.float32))
    extra = [str(data) if e == "DATA" else e for e in extra]
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["scan", "toy-affine", "--data", str(data), "--out", str(out), "--quick", *extra])
    assert r.exit_code == 2 and "--quick" in r.output and not out.exists()
