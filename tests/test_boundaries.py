"""Figures at their boundaries: the tail-ratio threshold τ, a lone non-finite value, the error band edges.

Each test sits exactly on a boundary and one ulp either side, so that a ``<`` turned ``<=`` (or a band
widened, or %Inf counted only for all-non-finite samples) fails a unit test, not only the golden file.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowaudit.adapters.base import widen
from flowaudit.config.sampling import Sampling
from flowaudit.evidence import remark2
from flowaudit.stats.risk import sample_checks

TAUS = [0.5, 0.25, 0.9]


@pytest.mark.parametrize("tau", TAUS)
def test_verdict_exactly_at_tau_is_compliant_one_ulp_below_violates(tau: float) -> None:
    below, above = math.nextafter(tau, 0.0), math.nextafter(tau, 1.0)
    for kind in ("unknown", "affine"):
        assert remark2.verdict(kind, below, tau) == "violates", kind
    assert remark2.verdict("unknown", tau, tau) == "inconclusive"  # no structure: measured compliance alone
    assert remark2.verdict("prior", tau, tau) == "compliant"
    assert remark2.verdict("prior", above, tau) == "compliant"
    assert remark2.verdict("prior", below, tau) == "violates"


@pytest.mark.parametrize("tau", TAUS)
def test_worst_case_ratio_at_tau_does_not_violate(tau: float) -> None:
    below = math.nextafter(tau, 0.0)
    ok = {"verdict": "compliant"}
    assert remark2.combine("compliant", ok, {"tail_ratio": tau}, "additive", tau)[0] == "compliant"
    assert remark2.combine("compliant", ok, {"tail_ratio": below}, "additive", tau)[0] == "violates"
    nan = {"tail_ratio": math.nan}
    assert remark2.combine("compliant", {"verdict": "compliant"}, nan, "additive", tau)[0] == "compliant"


def test_tail_ratio_is_min_over_max_of_the_finite_values() -> None:
    assert remark2.tail_ratio(torch.tensor([0.5, 1.0, 2.0])) == 0.25
    assert remark2.tail_ratio(torch.tensor([0.5, math.inf, 2.0, math.nan])) == 0.25
    assert math.isnan(remark2.tail_ratio(torch.tensor([math.nan, math.inf])))
    assert remark2.tail_ratio(torch.tensor([0.0, 0.0])) == 0.0


def _checks(values: list[float], k: int = 1) -> dict:
    x = torch.tensor(values, dtype=torch.float64).reshape(len(values) // 4, 4)
    return sample_checks(x, Sampling(samples=k, temperature=0.9, seed=0), (-0.5, 1.5))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_one_nonfinite_value_among_finite_ones_counts(bad: float) -> None:
    out = _checks([0.1, 0.2, bad, 0.4, 0.1, 0.2, 0.3, 0.4], k=2)  # one input, K = 2, one sample has one bad pixel
    assert out["n_inf"].tolist() == [1]
    assert out["n_pixel_err"].tolist() == [1]  # a non-finite value is outside the band too
    assert out["max_abs"].tolist() == [math.inf]


def test_error_band_edges() -> None:
    assert widen((0.0, 1.0)) == (-0.5, 1.5)
    inside = [-0.5, 1.5, 0.0, 1.0]
    out = _checks(inside + [math.nextafter(-0.5, -1.0), 0.0, 0.0, 0.0] + [0.0, 0.0, math.nextafter(1.5, 2.0), 0.0])
    assert out["n_pixel_err"].tolist() == [0, 1, 1]
    assert out["n_inf"].tolist() == [0, 0, 0]
    out = _checks([math.nextafter(-0.5, 0.0), math.nextafter(1.5, 0.0), -1.0 + 0.5, 1.0])
    assert out["n_pixel_err"].tolist() == [0]
    assert _checks([-1.0, 0.0, 0.0, 0.0])["n_pixel_err"].tolist() == [1]  # the band is not [-1, 2]
    assert _checks([0.0, 2.0, 0.0, 0.0])["n_pixel_err"].tolist() == [1]


class _Declared:
    """A site that declares tail bounds (lo, 1): its structural ratio is lo."""

    kind = "unknown"

    def __init__(self, lo: float):
        self.lo = lo

    def tail_bounds(self):
        return (self.lo, 1.0)

    def tail_start(self):
        return 0.0


@pytest.mark.parametrize("tau", [0.5, 0.25, 0.9])
def test_declared_bounds_exactly_at_tau_comply_and_one_ulp_below_violate(tau):
    """The structural ratio rule is ``ratio >= τ``: at τ compliant, one ulp below violates, one above complies."""
    from flowaudit.evidence.remark2 import structural_evidence

    assert structural_evidence(_Declared(tau), tau)["verdict"] == "compliant"
    assert structural_evidence(_Declared(math.nextafter(tau, 0.0)), tau)["verdict"] == "violates"
    assert structural_evidence(_Declared(math.nextafter(tau, 1.0)), tau)["verdict"] == "compliant"
