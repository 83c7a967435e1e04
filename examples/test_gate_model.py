"""Gate a model in your own test suite with the Python API (run: ``pytest examples/test_gate_model.py``).

The pattern: scan the model you are about to release on held-out conditions and a set of
conditions you know are out of distribution, then assert on the report. Here the bundled
modified-RQ-spline toy passes and the affine toy is shown to fail the Remark 2 gate.
"""

import pytest
from flowaudit.reference_models import load
from flowaudit.reference_models.toy import toy_data

import flowaudit


@pytest.fixture(scope="module")
def conditions():
    return toy_data(2000, seed=0)[1], toy_data(200, seed=1)[1], toy_data(200, seed=1, ood=True)[1]


def audit(name, conditions):
    fit_y, test_y, ood_y = conditions
    return flowaudit.scan(load(name), test_y, ood=ood_y, fit_data=fit_y, samples=10, device="cpu")


def test_spline_model_is_safe_to_release(conditions):
    report = audit("toy-modified-rq-spline", conditions)
    assert not report.violations(), report.summary()
    assert report["risk"]["by_set"]["ood"]["pct_inf"] == 0


def test_affine_model_fails_the_remark2_gate(conditions):
    report = audit("toy-affine", conditions)
    assert report.violations() == [s["name"] for s in report["model"]["sites"]]
