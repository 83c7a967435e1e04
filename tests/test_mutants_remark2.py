"""Remark 2 piece by piece: the ratio rule at τ, the bound slack, the gain readings, the verdict order, the words.

Every expected value is worked out by hand from the module docstring of :mod:`flowaudit.evidence.remark2`
(thresholds exactly at their value and one ulp either side), so that a flipped comparison, a changed
constant, a swapped branch or a dropped key fails a unit test here and not only in a full audit.
The sites are small stand-ins with a constant derivative and a constant bias past their interval.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowaudit.evidence import remark2
from flowaudit.evidence.remark2 import (
    combine,
    contradiction,
    evidence_words,
    gain_reading,
    model_verdict,
    probe_site,
    structural_evidence,
)

UP, DOWN = math.inf, -math.inf


def ulp_below(x: float) -> float:
    return math.nextafter(x, DOWN)


def ulp_above(x: float) -> float:
    return math.nextafter(x, UP)


class Site:
    """A site with declared ``bounds``, a tail ``start``, a constant derivative ``d`` and bias ``t`` = the param."""

    def __init__(self, kind: str = "unknown", bounds=None, start=None, d: float = 1.0):
        self.kind, self.bounds, self.start, self.d = kind, bounds, start, d

    def tail_bounds(self):
        return self.bounds

    def tail_start(self):
        return self.start

    def derivative_at(self, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.full((v.numel(), p.shape[0]), self.d, dtype=torch.float64)

    def map_at(self, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return v[:, None] * self.d + p[:, 0][None, :]


PARAMS = [torch.tensor([[0.5], [-2.0]], dtype=torch.float64)]


def test_every_exported_name_exists() -> None:
    assert all(hasattr(remark2, name) for name in remark2.__all__)
    assert len(set(remark2.__all__)) == len(remark2.__all__) == 14


def test_probe_values_are_both_signs_of_a_logspace() -> None:
    v = remark2.probe_values()
    assert v.dtype == torch.float64 and v.numel() == 34
    assert torch.equal(v, -v.flip(0))  # symmetric
    pos = v[17:]
    assert float(pos[0]) == 1.0 and float(pos[-1]) == pytest.approx(1e4, rel=1e-12)
    assert torch.allclose(torch.log10(pos), torch.linspace(0.0, 4.0, 17, dtype=torch.float64))
    assert remark2.probe_values(10.0, 100.0, 3).tolist() == pytest.approx([-100, -(10**1.5), -10, 10, 10**1.5, 100])


def test_tail_ratio_divides_by_a_positive_maximum() -> None:
    assert remark2.tail_ratio(torch.tensor([0.25, 0.5])) == 0.5
    assert remark2.tail_ratio(torch.tensor([-1.0, -0.5])) == 0.0  # no positive c': ratio 0
    assert remark2.tail_ratio(torch.tensor([1.0])) == 1.0


# -- structural ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, pair",
    [
        ("affine", (0.0, math.inf)),
        ("affine-bounded", (0.1, 1.1)),
        ("additive", (1.0, 1.0)),
        ("rq-spline", (1.0, 1.0)),
        ("modified-rq-spline", (1.0, 1.0)),
    ],
)
def test_kind_bounds_stand_in_when_the_site_reports_none(kind: str, pair: tuple[float, float]) -> None:
    s = structural_evidence(Site(kind), 0.5)
    assert s["tail_bounds"] == list(pair) and s["bounds_from"] == "kind"
    ratio = 0.0 if math.isinf(pair[1]) else pair[0] / pair[1]
    assert s["bound_ratio"] == ratio
    assert s["verdict"] == ("compliant" if ratio >= 0.5 else "violates")
    assert remark2.KIND_BOUNDS[kind] == pair


def test_structural_reading_of_reported_bounds() -> None:
    s = structural_evidence(Site("affine", (0.25, 1.0), start=2), 0.25)
    assert s == {
        "verdict": "compliant",
        "tail_bounds": [0.25, 1.0],
        "bounds_from": "site",
        "bound_ratio": 0.25,
        "tail_start": 2.0,
    }
    assert isinstance(s["tail_start"], float)
    assert structural_evidence(Site("affine", (0.25, 1.0)), ulp_above(0.25))["verdict"] == "violates"
    assert structural_evidence(Site("affine", (0.25, 1.0)))["tail_start"] is None


def test_structural_default_threshold_is_one_half() -> None:
    assert structural_evidence(Site(bounds=(0.5, 1.0)))["verdict"] == "compliant"
    assert structural_evidence(Site(bounds=(ulp_below(0.5), 1.0)))["verdict"] == "violates"


def test_structural_with_nothing_to_read_is_inconclusive() -> None:
    s = structural_evidence(Site("mystery"), 0.5)
    assert s == {
        "verdict": "inconclusive",
        "tail_bounds": None,
        "bounds_from": None,
        "bound_ratio": None,
        "tail_start": None,
    }


@pytest.mark.parametrize(
    "bounds, ratio, verdict",
    [
        ((math.nan, 1.0), math.nan, "inconclusive"),
        ((0.5, math.nan), math.nan, "inconclusive"),
        ((1.0, math.inf), 0.0, "violates"),
        ((0.0, 0.0), 0.0, "violates"),
        ((1.0, -1.0), 0.0, "violates"),
        ((1.0, 2.0), 0.5, "compliant"),
        ((3.0, 2.0), 1.5, "compliant"),
    ],
)
def test_bound_ratio_edges(bounds, ratio, verdict) -> None:
    s = structural_evidence(Site(bounds=bounds), 0.5)
    assert s["bound_ratio"] == ratio or (math.isnan(ratio) and math.isnan(s["bound_ratio"]))
    assert s["verdict"] == verdict


# -- contradiction ---------------------------------------------------------------------------------


def test_contradiction_needs_bounds_and_evidence() -> None:
    ev = {"derivative_min": 0.0, "derivative_max": 9.0}
    assert contradiction(None, ev, "x") is None
    assert contradiction([0.5, 1.0], None, "x") is None
    assert contradiction([0.5, 1.0], {}, "x") is None
    assert contradiction([0.5, 1.0], ev, "x") == "x: c' ∈ [0, 9]"


def test_contradiction_by_a_nonfinite_derivative() -> None:
    ev = {"nonfinite": {"first_abs_x": 1234.5}, "derivative_min": 0.75, "derivative_max": 0.75}
    assert contradiction([0.5, 1.0], ev, "your data") == "your data: c' non-finite at |x| ≥ 1.23e+03"


def test_contradiction_skips_a_missing_reading() -> None:
    assert contradiction([1.0, 2.0], {"derivative_min": math.nan, "derivative_max": 5.0}, "x") is None
    assert contradiction([1.0, 2.0], {"derivative_min": 0.1, "derivative_max": math.nan}, "x") is None
    assert contradiction([1.0, 2.0], {"derivative_max": 5.0}, "x") is None
    assert contradiction([1.0, 2.0], {"derivative_min": 0.1}, "x") is None


def test_contradiction_slack_is_one_per_mille_each_side() -> None:
    lo, hi = 0.5, 2.0
    edge_lo, edge_hi = lo * (1 - 1e-3), hi * (1 + 1e-3)
    assert remark2.BOUND_SLACK == 1e-3
    fits = {"derivative_min": edge_lo, "derivative_max": edge_hi}
    assert contradiction([lo, hi], fits, "x") is None
    low = {"derivative_min": ulp_below(edge_lo), "derivative_max": 1.0}
    assert contradiction([lo, hi], low, "x") == "x: c' ∈ [0.499, 1]"
    high = {"derivative_min": 1.0, "derivative_max": ulp_above(edge_hi)}
    assert contradiction([lo, hi], high, "x") == "x: c' ∈ [1, 2]"


def test_contradiction_says_where_the_probe_started() -> None:
    ev = {"derivative_min": 0.1, "derivative_max": 1.0, "probe": {"abs_x_min": 10.0}}
    assert contradiction([0.5, 1.0], ev, "the sweep") == "the sweep: c' ∈ [0.1, 1] at |x| ≥ 10"
    for where in (None, math.nan):
        ev["probe"]["abs_x_min"] = where
        assert contradiction([0.5, 1.0], ev, "the sweep") == "the sweep: c' ∈ [0.1, 1]"


# -- gain ------------------------------------------------------------------------------------------


def _gain(bounds=None, d_min=None, worst_case=None, visited=None, **kw) -> dict:
    m = {} if d_min == "missing" else {"derivative_min": d_min}
    return gain_reading({"tail_bounds": bounds}, m, worst_case, visited, **kw)


def test_gain_reading_with_nothing_read() -> None:
    assert _gain() == {
        "structural_sup": None,
        "tail_probe_max": None,
        "measured_max": None,
        "swept_max": None,
        "worst_case_max": None,
        "measured_nonfinite": 0,
        "nonfinite_here": False,
        "upstream": None,
        "huge_gain": 100.0,
        "huge": [],
    }
    assert _gain(d_min="missing")["tail_probe_max"] is None
    assert _gain(d_min=math.nan)["tail_probe_max"] is None


@pytest.mark.parametrize("low, sup", [(0.25, 4.0), (0.0, math.inf), (-1.0, math.inf), (2.0, 0.5)])
def test_gain_structural_supremum_is_one_over_the_lower_bound(low: float, sup: float) -> None:
    assert _gain(bounds=[low, 1.0])["structural_sup"] == sup
    assert _gain(d_min=low)["tail_probe_max"] == sup


def test_gain_readings_carry_what_sampling_and_the_attack_met() -> None:
    v = {"max": 3.0, "swept_max": 7.0, "n_nonfinite": 4, "upstream": "s0"}
    g = _gain(visited=v, worst_case={"max_inverse_gain": 5.0})
    assert (g["measured_max"], g["swept_max"], g["worst_case_max"]) == (3.0, 7.0, 5.0)
    assert g["measured_nonfinite"] == 4 and g["upstream"] == "s0" and g["nonfinite_here"] is False
    assert _gain(visited={"nonfinite_origin": True})["nonfinite_here"] is True
    assert _gain(worst_case={"nonfinite_origin": True})["nonfinite_here"] is True
    assert _gain(visited={"n_nonfinite": None})["measured_nonfinite"] == 0


def test_huge_gain_is_strictly_above_the_limit() -> None:
    at = {"max": 100.0, "swept_max": ulp_above(100.0)}
    assert remark2.HUGE_GAIN == 100.0
    assert _gain(visited=at)["huge"] == ["swept_max"]  # default limit 100: at it is not huge
    assert _gain(visited={"max": 100.0}, huge_gain=ulp_below(100.0))["huge"] == ["measured_max"]
    g = _gain(bounds=[0.0, 1.0], d_min=0.5, visited={"max": math.nan}, worst_case={"max_inverse_gain": 1e3})
    assert g["huge"] == ["structural_sup", "measured_max", "worst_case_max"]
    assert _gain(visited={"max": 5.0}, huge_gain=4.0) | {} == _gain(visited={"max": 5.0}, huge_gain=4.0)
    assert _gain(visited={"max": 5.0}, huge_gain=4.0)["huge_gain"] == 4.0


# -- combine and verdict ---------------------------------------------------------------------------

OK, BAD, NONE = {"verdict": "compliant"}, {"verdict": "violates"}, {"verdict": "inconclusive"}


def test_worst_case_decides_first() -> None:
    assert combine("compliant", OK, {"nonfinite_origin": True}, "additive") == ("violates", ["worst_case"])
    assert combine("compliant", OK, {"tail_ratio": ulp_below(0.5)}, "additive") == ("violates", ["worst_case"])
    assert combine("compliant", OK, {"tail_ratio": 0.5}, "additive") == ("compliant", ["structural", "measured"])
    assert combine("compliant", OK, {"tail_ratio": None}, "additive")[0] == "compliant"
    st = {"verdict": "compliant", "contradicted": [{"by": "measured"}, {"by": "swept"}]}
    assert combine(st, OK, None, "additive") == ("violates", ["measured", "swept"])
    assert combine({"verdict": "compliant", "contradicted": None}, OK, None, "x") == (
        "compliant",
        ["structural", "measured"],
    )


def test_structural_violation_names_the_attack_when_it_reached() -> None:
    assert combine("violates", OK, None, "affine") == ("violates", ["structural"])
    assert combine("violates", OK, {"reached": True}, "affine") == ("violates", ["structural", "worst_case"])
    assert combine("violates", OK, {"reached": False}, "affine") == ("violates", ["structural"])


def test_measured_and_swept_violations() -> None:
    assert combine("compliant", BAD, None, "x") == ("violates", ["measured"])
    assert combine("compliant", OK, None, "x", swept=BAD) == ("violates", ["swept"])
    assert combine("inconclusive", BAD, {"reached": True}, "x", swept=BAD) == (
        "violates",
        ["measured", "swept", "worst_case"],
    )


def test_gain_violations_and_the_bounded_exception() -> None:
    huge = {"huge": ["measured_max"]}
    assert combine("compliant", OK, None, "x", gain={"nonfinite_here": True}) == ("violates", ["gain"])
    assert combine("compliant", OK, None, "x", gain={"nonfinite_here": True}, bounded=True) == ("violates", ["gain"])
    assert combine("compliant", OK, None, "x", gain=huge) == ("violates", ["gain"])
    assert combine("compliant", OK, None, "x", gain=huge, bounded=True) == ("compliant", ["structural", "measured"])
    assert combine("compliant", OK, None, "x", gain={"huge": []}) == ("compliant", ["structural", "measured"])


def test_compliance_lists_the_agreeing_evidence() -> None:
    assert combine("compliant", OK, None, "x", swept=OK) == ("compliant", ["structural", "measured", "swept"])
    assert combine("compliant", NONE, None, "x", swept=OK) == ("compliant", ["structural", "swept"])
    assert combine("compliant", {}, None, "x") == ("compliant", ["structural"])


def test_no_structure_the_attack_or_a_settled_probe_decides() -> None:
    assert combine("inconclusive", OK, {"reached": True}, "x") == ("violates", ["worst_case"])
    assert combine("inconclusive", OK, None, "prior") == ("compliant", ["measured"])
    assert combine("inconclusive", {"verdict": "compliant", "settled": True}, None, "x") == ("compliant", ["measured"])
    assert combine("inconclusive", {"verdict": "compliant", "settled": 1}, None, "x") == ("inconclusive", ["measured"])
    assert combine("inconclusive", {"verdict": "compliant", "settled": False}, None, "x") == (
        "inconclusive",
        ["measured"],
    )
    assert combine("inconclusive", NONE, None, "prior") == ("inconclusive", [])
    assert combine("inconclusive", OK, None, "x", swept=OK) == ("inconclusive", ["measured", "swept"])


def test_combine_default_threshold_is_one_half() -> None:
    assert combine("compliant", OK, {"tail_ratio": 0.5}, "x")[0] == "compliant"
    assert combine("compliant", OK, {"tail_ratio": ulp_below(0.5)}, "x")[0] == "violates"
    assert combine("compliant", OK, {"tail_ratio": 0.75}, "x", 0.75)[0] == "compliant"
    assert combine("compliant", OK, {"tail_ratio": ulp_below(0.75)}, "x", 0.75)[0] == "violates"


def test_verdict_of_a_measured_ratio() -> None:
    assert remark2.verdict("prior", 0.5) == "compliant"
    assert remark2.verdict("prior", ulp_below(0.5)) == "violates"
    assert remark2.verdict("prior", math.nan) == "inconclusive"
    assert remark2.verdict("affine", 0.9) == "violates"  # by structure, whatever was measured
    assert remark2.verdict("additive", 0.9) == "compliant"
    assert remark2.verdict("additive", 0.1) == "violates"
    assert remark2.verdict("affine-bounded", 0.9, 0.05) == "compliant"
    assert remark2.verdict("affine-bounded", 0.9, ulp_above(0.1 / 1.1)) == "violates"
    assert remark2.verdict("additive", 1.0, 1.0) == "compliant"  # bounds ratio 1 at τ = 1 complies


# -- probe_site ------------------------------------------------------------------------------------


def test_probe_site_of_a_compliant_additive_site() -> None:
    site = Site("additive", (1.0, 1.0), start=0.0, d=1.0)
    e = probe_site(site, PARAMS, 0.5, reservoir={"rows": 2})
    assert e["verdict"] == "compliant" and e["rests_on"] == ["structural", "measured"]
    assert e["tail_ratio"] == 1.0 and e["threshold"] == 0.5 and e["bound_ratio"] == 1.0
    assert e["derivative_min"] == e["derivative_max"] == 1.0
    assert e["probe"] is e["measured"]["probe"] and e["probe"]["reservoir"] == {"rows": 2}
    assert e["swept"] is None and e["worst_case"] is None and e["kind"] == "additive"
    assert e["structural"]["contradicted"] is None
    cert = e["structural"]["certificate"]
    assert cert["plus_bias"] is True and cert["bias_max_scanned"] == 2.0 and not cert["certified"]
    assert e["gain"]["structural_sup"] == 1.0 and e["gain"]["huge"] == []
    assert e["words"] == evidence_words(e) == "complies by structure; not reached on your data (tail ratio 1)"
    assert "reservoir" not in probe_site(site, PARAMS, 0.5)["probe"]


def test_probe_site_default_threshold_is_one_half() -> None:
    assert probe_site(Site(bounds=(0.5, 1.0), d=0.75), PARAMS)["threshold"] == 0.5
    assert probe_site(Site(bounds=(0.5, 1.0), d=0.75), PARAMS)["structural"]["verdict"] == "compliant"
    assert probe_site(Site(bounds=(ulp_below(0.5), 1.0), d=0.75), PARAMS)["structural"]["verdict"] == "violates"


def test_probe_site_contradicted_by_data_and_by_the_sweep() -> None:
    site = Site("affine-bounded", (0.5, 1.0), d=0.25)  # declared [0.5, 1], measures 0.25 everywhere
    e = probe_site(site, PARAMS, 0.5)
    assert e["verdict"] == "violates" and e["rests_on"] == ["measured"]
    words = "your data: c' ∈ [0.25, 0.25] at |x| ≥ 1"
    assert e["structural"]["contradicted"] == [{"by": "measured", "words": words}]
    ok = Site("affine-bounded", (0.5, 1.0), d=0.75)
    swept = {"verdict": "compliant", "derivative_min": 0.1, "derivative_max": 1.0, "tail_ratio": 0.1}
    e = probe_site(ok, PARAMS, 0.5, swept=swept)
    assert e["structural"]["contradicted"] == [{"by": "swept", "words": "the sweep: c' ∈ [0.1, 1]"}]
    assert e["rests_on"] == ["swept"] and e["swept"] is swept
    e = probe_site(Site("affine", (0.1, 1.0), d=0.05), PARAMS, 0.5, swept=swept)  # a violating hypothesis
    assert e["structural"]["contradicted"] is None and e["rests_on"] == ["structural"]


def test_probe_site_worst_case_gain_against_one_over_s_l() -> None:
    site = Site("affine-bounded", (0.5, 1.0), d=0.75)  # 1/s_l = 2

    def run(gain, reached=True):
        return probe_site(site, PARAMS, 0.5, worst_case={"reached": reached, "max_inverse_gain": gain})

    assert run(2.0 * (1 + 1e-3))["structural"]["contradicted"] is None
    e = run(ulp_above(2.0 * (1 + 1e-3)))
    assert e["structural"]["contradicted"] == [{"by": "worst_case", "words": "the attack: inverse gain 2 > 1/s_l = 2"}]
    assert e["verdict"] == "violates" and e["rests_on"] == ["worst_case"]
    assert run(math.nan)["structural"]["contradicted"][0]["by"] == "worst_case"
    assert run(50.0, reached=False)["structural"]["contradicted"] is None
    assert run(None)["structural"]["contradicted"] is None
    assert (
        probe_site(
            Site("affine", (0.0, 1.0), d=0.75), PARAMS, 0.0, worst_case={"reached": True, "max_inverse_gain": 50.0}
        )["structural"]["contradicted"]
        is None
    )


def test_probe_site_a_certified_interval_bounds_a_huge_gain() -> None:
    spline = Site("rq-spline", (1.0, 1.0), start=2.0, d=1.0)
    e = probe_site(spline, PARAMS, 0.5, visited={"max": 1e4})
    assert e["gain"]["huge"] == ["measured_max"]
    assert e["verdict"] == "compliant" and e["structural"]["certificate"]["certified"] is True
    e = probe_site(spline, PARAMS, 0.5, worst_case={"reached": True, "max_inverse_gain": 1e4})
    assert e["structural"]["contradicted"] is None and e["verdict"] == "compliant"  # gain inside the interval
    bounded = Site("affine-bounded", (0.5, 1.0), d=0.75)  # no displacement bound: a huge gain violates
    e = probe_site(bounded, PARAMS, 0.5, visited={"max": 1e4})
    assert e["verdict"] == "violates" and e["rests_on"] == ["gain"]
    swept = {"verdict": "compliant", "derivative_min": 0.5, "derivative_max": 1.0, "tail_ratio": 0.5}
    e = probe_site(spline, PARAMS, 0.5, swept=swept, visited={"max": 1e4})  # contradicted: the bound is void
    assert e["verdict"] == "violates" and e["rests_on"] == ["swept"]


def test_probe_site_voids_the_certificate_of_a_violating_site() -> None:
    spline = Site("rq-spline", (1.0, 1.0), start=2.0, d=1.0)
    swept = {"verdict": "violates", "derivative_min": 1.0, "derivative_max": 1.0, "tail_ratio": 0.1}
    cert = probe_site(spline, PARAMS, 0.5, swept=swept)["structural"]["certificate"]
    assert cert["certified"] is False
    assert cert["void"] == cert["why"] == "voided: the site violates on swept"
    e = probe_site(spline, PARAMS, 0.5, worst_case={"nonfinite_origin": True, "reached": True})
    assert e["structural"]["certificate"]["void"] == "voided: the site violates on worst_case"
    assert "void" not in probe_site(spline, PARAMS, 0.5)["structural"]["certificate"]
    bent = Site("rq-spline", (1.0, 1.0), start=2.0, d=0.25)  # its data and the sweep both contradict the bounds
    swept = {"verdict": "compliant", "derivative_min": 0.1, "derivative_max": 1.0, "tail_ratio": 0.1}
    e = probe_site(bent, PARAMS, 0.5, swept=swept)
    assert e["rests_on"] == ["measured", "swept"]
    assert e["structural"]["certificate"]["void"] == "voided: the site violates on measured+swept"


# -- words -----------------------------------------------------------------------------------------


def _r2(structural="compliant", measured=None, verdict="compliant", rests_on=("structural",), **kw) -> dict:
    st = structural if isinstance(structural, dict) else {"verdict": structural}
    m = {"tail_ratio": 1.0, "probe": {}} if measured is None else measured
    return {"structural": st, "measured": m, "verdict": verdict, "rests_on": list(rests_on), "threshold": 0.5, **kw}


def test_words_for_the_structural_reading() -> None:
    assert evidence_words(_r2("violates")).startswith("violates by structure; ")
    assert evidence_words(_r2("compliant")).startswith("complies by structure; ")
    assert evidence_words(_r2("inconclusive")).startswith("no structure to read; ")
    st = {"verdict": "compliant", "contradicted": [{"words": "your data: c' ∈ [0.1, 1]"}, {"words": "later"}]}
    assert evidence_words(_r2(st, kind="affine-bounded")).startswith(
        "violates (declared affine-bounded, contradicted by your data: c' ∈ [0.1, 1]); "
    )
    assert evidence_words(_r2(st)).startswith("violates (declared bounds, contradicted by your data")


def test_words_for_the_measured_reading() -> None:
    def second(m: dict) -> str:
        return evidence_words(_r2(measured=m)).split("; ", 1)[1]

    assert second({"domain": {"why": "ValueError: outside"}, "tail_ratio": 0.1}) == "no tails: ValueError: outside"
    assert second({"tail_ratio": None}) == "not measured (site not visited)"
    assert second({"tail_ratio": math.nan}) == "not measured (site not visited)"
    assert second({"tail_ratio": 0.5, "probe": {}}) == "not reached on your data (tail ratio 0.5)"
    assert second({"tail_ratio": ulp_below(0.5), "probe": {}}) == "reached on your data (tail ratio 0.5)"
    bad = {"tail_ratio": 0.75, "nonfinite": {"first_abs_x": 1000.0}, "probe": {}}
    assert second(bad) == "reached on your data (tail ratio 0.75); c' non-finite from |x| = 1e+03"
    unsettled = {"tail_ratio": 0.75, "settled": False, "probe": {"start": "settling", "abs_x_max": 1e37}}
    assert second(unsettled) == "not reached on your data (tail ratio 0.75); c' not settled by |x| = 1.00e+37"
    assert second({**unsettled, "settled": None}) == "not reached on your data (tail ratio 0.75)"
    assert second({**unsettled, "probe": {"start": "tail_start", "abs_x_max": 1e37}}) == (
        "not reached on your data (tail ratio 0.75)"
    )


def test_words_for_sweep_gain_attack_and_what_decided() -> None:
    base = "complies by structure; not reached on your data (tail ratio 1)"
    assert evidence_words(_r2(swept={"verdict": "violates", "tail_ratio": 0.125})) == (
        base + "; reached under swept conditions (tail ratio 0.125)"
    )
    assert evidence_words(_r2(swept={"verdict": "compliant", "tail_ratio": 0.9})) == base
    assert evidence_words(_r2(gain={"nonfinite_here": True})) == base + "; non-finite values first appear at this site"
    g = {"huge": ["measured_max", "worst_case_max"], "measured_max": 300.0, "worst_case_max": 200.0, "huge_gain": 100.0}
    assert evidence_words(_r2(gain=g)) == base + "; inverse gain 300 > 100 (measured max, worst case max)"
    g = {**g, "worst_case_max": math.nan}
    assert evidence_words(_r2(gain=g)) == base + "; inverse gain nan > 100 (measured max, worst case max)"
    assert evidence_words(_r2(worst_case={"reached": True, "distance": 15.0})) == (
        base + "; reached by the attack at distance 15"
    )
    assert evidence_words(_r2(worst_case={"reached": True, "distance": None})) == base + "; reached by the attack"
    assert evidence_words(_r2(worst_case={"reached": False})) == base + "; not reached by the attack"
    assert evidence_words(_r2(verdict="violates", rests_on=["gain"])) == base + "; decided by gain"
    assert evidence_words(_r2(verdict="violates", rests_on=["measured", "worst_case"])) == (
        base + "; decided by measured+worst_case"
    )
    assert evidence_words(_r2(verdict="violates", rests_on=["structural", "worst_case"])) == base
    assert evidence_words(_r2(verdict="violates", rests_on=[])) == base
    assert evidence_words(_r2(verdict="compliant", rests_on=["measured"])) == base


# -- the model -------------------------------------------------------------------------------------


def _entries(*pairs) -> list[dict]:
    return [{"remark2": {"verdict": v, **({} if r is None else {"rests_on": r})}} for v, r in pairs]


def test_model_verdict_counts_and_evidence_order() -> None:
    es = _entries(
        ("violates", ["gain"]),
        ("compliant", ["structural", "worst_case"]),
        ("inconclusive", ["swept"]),
        ("compliant", ["measured"]),
        ("compliant", None),
    )
    assert model_verdict(es, {"reason": "r"}) == {
        "verdict": "violates",
        "rests_on": ["structural", "measured", "swept", "worst_case", "gain"],
        "n_sites": 5,
        "n_violates": 1,
        "n_compliant": 3,
        "n_inconclusive": 1,
        "reason": "r",
    }
    assert remark2.EVIDENCE == ("structural", "measured", "swept", "worst_case", "gain")


def test_model_verdict_needs_every_site_compliant_and_reached() -> None:
    ok = _entries(("compliant", ["structural"]), ("compliant", ["structural"]))
    assert model_verdict(ok, {})["verdict"] == "compliant"
    assert model_verdict(ok, {"complete": True})["verdict"] == "compliant"
    assert model_verdict(ok, {"complete": False, "reason": "1 site unvisited"})["verdict"] == "inconclusive"
    assert model_verdict(ok, {})["reason"] is None
    mixed = _entries(("compliant", ["structural"]), ("inconclusive", []))
    assert model_verdict(mixed, {})["verdict"] == "inconclusive"
    none = model_verdict([], {"reason": "no sites"})
    assert none == {
        "verdict": "no sites found",
        "rests_on": [],
        "n_sites": 0,
        "n_violates": 0,
        "n_compliant": 0,
        "n_inconclusive": 0,
        "reason": "no sites",
    }
