"""CI formats: JUnit XML per site and per rule, and ``report.passed(fail_on)`` equal to the exit code."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flowaudit.reference_models.toy import Toy2D, toy_data
from test_audit import Rigged, _conditions

import flowaudit
from flowaudit.cli.main import cli
from flowaudit.report import Report


@pytest.fixture(scope="module")
def reports():
    torch.manual_seed(0)
    spline = Toy2D(coupling="modified-rq-spline", hidden=16, depth=2, zero_init=False).eval()
    y = toy_data(16, seed=1)[1]
    return {
        "broken": flowaudit.scan(Rigged(), _conditions(3), samples=3, device="cpu"),
        "spline": flowaudit.scan(spline, y, samples=3, device="cpu"),
    }


def _suites(xml: str) -> dict[str, ET.Element]:
    root = ET.fromstring(xml)
    return {s.get("name"): s for s in root.iter("testsuite")}


@pytest.mark.parametrize("name", ["broken", "spline"])
def test_one_case_per_site_and_rule_failures_with_reasons(reports, name):
    rep = reports[name]
    suites = _suites(rep.to_junit("violation"))
    cases = suites["remark2"].findall("testcase")
    assert [c.get("name") for c in cases] == [s["name"] for s in rep["model"]["sites"]]
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == set(rep.violations()) - {"no sites found"}
    for c in cases:
        f = c.find("failure")
        if f is not None:
            assert f.get("message").startswith("unsafe") and "tail ratio" in f.text
    gates = {c.get("name"): c for c in suites["gates"].findall("testcase")}
    assert {"fail-on violation", "fail-on risk"} <= set(gates)
    for rule in ("violation", "risk"):
        assert (gates[f"fail-on {rule}"].find("failure") is None) == rep.passed(rule)
    assert int(suites["remark2"].get("failures")) == len(failed)


def test_passed_follows_the_rules(reports):
    broken, spline = reports["broken"], reports["spline"]
    assert broken.passed("never") and not broken.passed("violation") and not broken.passed("risk")
    assert broken.failures("risk") == ["in/row0", "in/row1", "in/row2"]
    assert spline.passed("violation") and not spline.violations()
    assert spline.passed("risk") == (not spline.at_risk())
    with pytest.raises(ValueError):
        spline.passed("sometimes")


def test_cli_exit_code_matches_passed_and_junit_is_written(tmp_path):
    x, y = toy_data(40, seed=1)
    np.savez(tmp_path / "d.npz", y=y.numpy(), x=x.numpy())
    np.savez(tmp_path / "fit.npz", y=toy_data(200, seed=0)[1].numpy())
    runner = CliRunner()
    base = ["scan", "toy-affine", "--data", str(tmp_path / "d.npz"), "--fit-data", str(tmp_path / "fit.npz"),
            "--samples", "2", "--device", "cpu", "--quiet"]  # fmt: skip
    for rule in ("never", "violation", "risk"):
        out, xml = tmp_path / f"r-{rule}", tmp_path / f"{rule}.xml"
        res = runner.invoke(cli, [*base, "--out", str(out), "--fail-on", rule, "--junit", str(xml)])
        assert res.exit_code in (0, 1), res.output
        rep = Report(json.loads((out / "report.json").read_text()))
        assert res.exit_code == (0 if rep.passed(rule) else 1), rule
        props = {p.get("name"): p.get("value") for p in ET.parse(xml).getroot().iter("property")}
        assert props["fail_on"] == rule and props["passed"] == str(rep.passed(rule)).lower()


def test_junit_into_a_missing_folder_is_refused_before_the_audit(tmp_path):
    np.save(tmp_path / "d.npy", toy_data(8, seed=1)[1].numpy())
    res = CliRunner().invoke(
        cli,
        ["scan", "toy-affine", "--data", str(tmp_path / "d.npy"), "--out", str(tmp_path / "r"),
         "--junit", str(tmp_path / "nope" / "a.xml")],
    )  # fmt: skip
    assert res.exit_code == 2 and "--junit" in res.output
    assert not (tmp_path / "r").exists()
