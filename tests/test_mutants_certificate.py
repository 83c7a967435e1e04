"""The certificate piece by piece: one site's bound, the scanned bias, the composition G, D, and what blocks it.

Every expected value is worked out by hand from the closed forms in :mod:`flowaudit.evidence.certificate`
(``G = Π max(g, 1)``, ``D = Σ (Π after) d``, ``bound = 6·G + D``), with the huge-gain limit exactly at its
value and one ulp above, so that a changed constant, comparison, key or message fails here.
"""

from __future__ import annotations

import math

import pytest
import torch
from flowaudit.adapters.bounds import LayerBound, site_layer

from flowaudit.evidence import certificate
from flowaudit.evidence.certificate import FORMULA, LATENT_ABS, SCOPE, model_certificate, site_certificate


class Site:
    """A site with ``bounds`` and ``start``; past ``start`` its map is ``v + t`` (``t`` = the parameter row)."""

    def __init__(self, kind: str, bounds=(1.0, 1.0), start=None, inside: float = 1.0, fail: bool = False):
        self.kind, self.bounds, self.start, self.inside, self.fail = kind, bounds, start, inside, fail

    def tail_bounds(self):
        return self.bounds

    def tail_start(self):
        return self.start

    def map_at(self, v: torch.Tensor, p) -> torch.Tensor:
        if self.fail:
            raise NotImplementedError
        t = p[:, 0] if isinstance(p, torch.Tensor) else torch.tensor([float(p)], dtype=torch.float64)
        b = 0.0 if self.start is None else self.start
        past = v.abs() > b
        return torch.where(past[:, None], v[:, None] + t[None, :], v[:, None] * self.inside)


def rows(*t: float) -> torch.Tensor:
    return torch.tensor([[x] for x in t], dtype=torch.float64)


def test_every_exported_name_exists() -> None:
    assert all(hasattr(certificate, name) for name in certificate.__all__) and len(certificate.__all__) == 3
    assert certificate.BIASED == ("additive", "modified-rq-spline")
    assert LATENT_ABS == 6.0 and certificate.LAYER_HUGE_GAIN == 100.0


# -- one site --------------------------------------------------------------------------------------


def test_identity_tail_spline_is_certified_with_displacement_2b() -> None:
    cert = site_certificate(Site("rq-spline", start=2.5))
    assert cert == {"certified": True, "displacement": 5.0, "plus_bias": False, "tail_gain": 1.0, "why": None}


def test_identity_tails_with_an_unknown_start_are_not_certified() -> None:
    cert = site_certificate(Site("rq-spline", start=None))
    assert cert == {
        "certified": False,
        "displacement": None,
        "plus_bias": False,
        "tail_gain": 1.0,
        "why": "identity tails, but where they start is not known (tail_start unknown, may depend on the condition)",
    }


@pytest.mark.parametrize("bounds", [(1.0, 2.0), (0.5, 1.0), (2.0, 2.0), (0.5, 0.5)])
def test_tails_other_than_the_identity_are_not_certified(bounds) -> None:
    cert = site_certificate(Site("rq-spline", bounds, start=1.0))
    assert cert["certified"] is False and cert["displacement"] is None and cert["plus_bias"] is False
    assert cert["tail_gain"] == 1.0 / bounds[0]


def test_why_a_site_is_not_certified() -> None:
    cert = site_certificate(Site("affine", (0.25, 2.0)))
    assert cert == {
        "certified": False,
        "displacement": None,
        "plus_bias": False,
        "tail_gain": 4.0,
        "why": "tails not the identity: c' ∈ [0.25, 2], the inverse multiplies values by up to 4 per site",
    }
    assert site_certificate(Site("affine", (0.0, math.inf)))["tail_gain"] == math.inf
    assert site_certificate(Site("affine", (-1.0, 1.0)))["tail_gain"] == math.inf
    unknown = site_certificate(Site("unknown", None))
    assert unknown["why"] == "no structure to read: tail bounds unknown" and unknown["tail_gain"] is None
    prior = "a prior's σ(y) is not bounded by structure: its inverse scales ε by σ"
    assert site_certificate(Site("prior", None))["why"] == prior
    assert site_certificate(Site("prior", (0.5, 2.0)))["why"] == prior


def test_given_bounds_replace_the_sites_own() -> None:
    assert site_certificate(Site("rq-spline", None, start=1.0), [], (1.0, 1.0))["certified"] is True
    assert site_certificate(Site("rq-spline", (1.0, 1.0), start=1.0), None, (0.5, 1.0))["certified"] is False


def test_additive_tails_start_at_zero_and_carry_the_bias() -> None:
    cert = site_certificate(Site("additive", start=None), [rows(0.5, -3.0)])
    assert cert == {
        "certified": False,
        "displacement": 0.0,
        "plus_bias": True,
        "tail_gain": 1.0,
        "why": "the bias t is an unbounded output of the conditioner: |c⁻¹(y) − y| ≤ displacement + |t|",
        "bias_max_scanned": 3.0,
        "bound_scanned": 3.0,
    }


def test_modified_spline_bias_is_read_past_the_interval() -> None:
    # inside [-B, B] the stand-in maps v to 10 v: a probe there would read |t| = 9 |v|, not the bias
    for start in (0.25, 0.5, 2.0):
        site = Site("modified-rq-spline", start=start, inside=10.0)
        cert = site_certificate(site, [rows(0.5, -1.5), rows(1.25)])
        assert cert["displacement"] == 2 * start and cert["plus_bias"] is True
        assert cert["bias_max_scanned"] == 1.5  # the largest |t| over every kept row
        assert cert["bound_scanned"] == 2 * start + 1.5
    assert site_certificate(site, [rows(0.5, -1.5)] * 0 + [1.75])["bias_max_scanned"] == 1.75  # a non-tensor row


def test_bias_reading_ignores_nonfinite_values_and_may_be_unreadable() -> None:
    site = Site("modified-rq-spline", start=1.0)
    assert site_certificate(site, [rows(math.inf, 0.5)])["bias_max_scanned"] == 0.5
    cert = site_certificate(site, [rows(math.nan)])
    assert cert["bias_max_scanned"] is None and cert["bound_scanned"] is None
    assert site_certificate(site, None)["bias_max_scanned"] is None
    assert site_certificate(site, [])["bias_max_scanned"] is None
    cert = site_certificate(Site("modified-rq-spline", start=1.0, fail=True), [rows(0.5)])
    assert cert["bias_max_scanned"] is None and cert["bound_scanned"] is None
    assert site_certificate(site, [rows(0.0)])["bias_max_scanned"] == 0.0


# -- the model -------------------------------------------------------------------------------------


def entry(name: str, start=2.0, certified=True, verdict="compliant", rests_on=("structural",), **cert) -> dict:
    c = {"certified": certified, "why": None if certified else f"{name} is not certified", **cert}
    return {
        "name": name,
        "remark2": {
            "verdict": verdict,
            "rests_on": list(rests_on),
            "structural": {"tail_start": start, "certificate": c},
        },
    }


FULL = {"complete": True}


def test_composition_in_inverse_order_matches_the_closed_form() -> None:
    es = [entry("s1", 2.0), entry("s2", 1.0)]
    layers = [site_layer("a", ["s1"]), LayerBound("n", "actnorm", 3.0, 0.5), site_layer("b", ["s2"])]
    cert = model_certificate(es, FULL, layers)
    # G = 1·3·1, D = 3·2 + 1·0.5 + 1·1
    assert cert["certified"] is True and cert["blocking"] == []
    assert (cert["gain"], cert["offset"], cert["bound"]) == (3.0, 7.5, 3.0 * 6 + 7.5)
    assert cert["bound_scanned"] == 25.5  # certified sites: scanned bound = structural bound
    assert cert["latent_abs"] == 6.0 and cert["formula"] == FORMULA and cert["scope"] == SCOPE
    # the report states the closed form and its scope in words
    assert FORMULA == ("|x|∞ ≤ G·|z|∞ + D,  G = Π_L max(g_L, 1),  D = Σ_L (Π_{L′ after L} max(g_L′, 1))·d_L")
    assert SCOPE == (
        "the whole inverse pass, every layer the adapter lists (sites, ActNorm, 1×1 convolutions, LU and linear "
        "layers, permutations, squeezes, splits and priors), for every condition; stated for latents with "
        "|z|∞ ≤ 6 (gain and offset give it for any |z|)"
    )
    assert cert["largest_layer_gain"] == 3.0
    assert [r["gain"] for r in cert["layers"]] == [1.0, 3.0, 1.0]
    assert [r["offset"] for r in cert["layers"]] == [2.0, 0.5, 1.0]
    assert cert["layers"][0] == {"name": "a", "kind": "site", "gain": 1.0, "offset": 2.0, "why": None, "sites": ["s1"]}
    assert "why" not in cert
    unordered = model_certificate(es, FULL, layers, ordered=False)
    assert (unordered["gain"], unordered["offset"]) == (3.0, 3.0 * 3.5)  # D = G Σ d
    assert unordered["scope"] == SCOPE + "; layers composed without their order"
    assert unordered["bound_scanned"] == 3.0 * 6 + 10.5


def test_gains_below_one_count_as_one_and_offsets_default_to_zero() -> None:
    es = [entry("s", 1.0)]
    layers = [LayerBound("c", "linear", 0.25, None), site_layer("a", ["s"]), LayerBound("d", "linear", 2.0, 1.0)]
    cert = model_certificate(es, FULL, layers)
    assert (cert["gain"], cert["offset"]) == (2.0, (0.0 + 1.0) * 2.0 + 1.0)
    assert cert["largest_layer_gain"] == 2.0


def test_sites_in_one_layer_compose_in_their_order() -> None:
    es = [entry("s1", 2.0), entry("s2", 0.5)]
    cert = model_certificate(es, FULL, [site_layer("pair", ["s1", "s2"]), LayerBound("x", "linear", 4.0, 0.0)])
    assert cert["layers"][0]["gain"] == 1.0 and cert["layers"][0]["offset"] == 2.5
    assert (cert["gain"], cert["offset"]) == (4.0, 10.0)
    assert cert["bound_scanned"] == 4.0 * 6 + 10.0  # the scanned bound composes the two sites the same way


def test_a_layer_with_sites_and_no_gain_of_its_own_reads_its_sites() -> None:
    es = [entry("s", 1.5)]
    cert = model_certificate(es, FULL, [LayerBound("split", "split", None, None, None, ("s",))])
    assert cert["certified"] is True and (cert["gain"], cert["offset"]) == (1.0, 1.5)


def test_a_biased_site_gives_only_a_scanned_bound() -> None:
    biased = entry("b", 1.0, certified=False, bound_scanned=5.0)
    layers = [site_layer("a", ["b"]), LayerBound("n", "actnorm", 2.0, 1.0)]
    cert = model_certificate([biased], FULL, layers)
    assert cert["certified"] is False and cert["bound"] is None and cert["gain"] is None and cert["offset"] is None
    assert cert["blocking"] == [{"site": "b", "why": "b: b is not certified"}]
    assert cert["bound_scanned"] == 2.0 * 6 + (5.0 * 2.0 + 1.0)
    assert cert["layers"][0]["gain"] is None and cert["layers"][0]["why"] == "b: b is not certified"
    assert cert["largest_layer_gain"] == 2.0
    unscanned = entry("u", 1.0, certified=False)
    assert model_certificate([unscanned], FULL, [site_layer("a", ["u"])])["bound_scanned"] is None
    assert model_certificate([biased, unscanned], FULL, [site_layer("a", ["u", "b"])])["bound_scanned"] is None


def test_a_certified_site_without_a_start_has_no_bound() -> None:
    cert = model_certificate([entry("s", None)], FULL, [site_layer("a", ["s"])])
    assert cert["certified"] is False and cert["blocking"][0]["site"] == "s"


def test_a_site_missing_from_the_report_blocks() -> None:
    es = [entry("s", 1.0)]
    cert = model_certificate(es, FULL, [site_layer("a", ["s", "zz"])])
    assert cert["blocking"] == [{"site": "a", "why": "site zz is not in the report"}]
    assert cert["bound_scanned"] is None
    cert = model_certificate(es, FULL, [site_layer("a", ["s"]), site_layer("b", ["zz"])])
    assert cert["blocking"] == [{"site": "zz", "why": "site zz is not in the report"}]
    two = model_certificate([], FULL, [site_layer("a", ["x", "y"])])
    assert two["blocking"][1] == {"site": "a", "why": "site x is not in the report"}  # the first reason is kept


def test_unbounded_and_huge_layers_block_by_name() -> None:
    es = [entry("s", 1.0)]
    cert = model_certificate(es, FULL, [site_layer("a", ["s"]), LayerBound("u", "1x1-conv", None, None, "singular")])
    assert cert["blocking"] == [{"site": "u", "why": "1x1-conv layer: singular"}]
    assert cert["bound_scanned"] is None and cert["largest_layer_gain"] == 1.0
    at = model_certificate(es, FULL, [site_layer("a", ["s"]), LayerBound("n", "actnorm", 100.0, 0.0)])
    assert at["certified"] is True and at["gain"] == 100.0 and at["largest_layer_gain"] == 100.0
    huge = math.nextafter(100.0, math.inf)
    over = model_certificate(es, FULL, [site_layer("a", ["s"]), LayerBound("n", "actnorm", huge, 0.0)])
    why = "actnorm layer: its inverse multiplies values by up to 100 (> 100)"
    assert over["blocking"] == [{"site": "n", "why": why}]
    assert over["bound_scanned"] is None and over["largest_layer_gain"] == huge
    for blocker in (LayerBound("u", "1x1-conv", None, None, "singular"), LayerBound("h", "actnorm", 500.0, 0.0)):
        after = [site_layer("a", ["s"]), blocker, LayerBound("n", "linear", 2.0, 0.0), site_layer("b", [])]
        cert = model_certificate(es, FULL, after)  # a blocked layer leaves no scanned bound, whatever follows
        assert cert["bound_scanned"] is None and [b["site"] for b in cert["blocking"]] == [blocker.name]
    big = model_certificate(es, FULL, [LayerBound("n", "actnorm", 2980.0, 0.0), site_layer("a", ["s"])])
    assert big["blocking"][0]["why"] == "actnorm layer: its inverse multiplies values by up to 2.98e+03 (> 100)"


def test_a_bounded_layer_applying_a_contradicted_site_blocks() -> None:
    bad = entry("p", None, certified=False, verdict="violates", rests_on=("structural", "measured"))
    layers = [LayerBound("split", "split", 2.0, 0.5, None, ("p",))]
    cert = model_certificate([bad], FULL, layers)
    assert cert["blocking"] == [{"site": "p", "why": "violates on structural+measured"}]
    by_structure = entry("p", None, certified=False, verdict="violates", rests_on=("structural",))
    ok = model_certificate([by_structure], FULL, layers)
    assert ok["certified"] is True and (ok["gain"], ok["offset"]) == (2.0, 0.5)
    assert ok["bound_scanned"] == 2.0 * 6 + 0.5


def test_unplaced_and_unreached_sites_block() -> None:
    es = [entry("s", 1.0), entry("t", 1.0)]
    cert = model_certificate(es, FULL, [site_layer("a", ["s"])])
    assert cert["blocking"] == [{"site": "t", "why": "a site the adapter's layer list does not place"}]
    layers = [site_layer("a", ["s"]), site_layer("b", ["t"])]
    cov = {"complete": False, "unvisited": ["t"], "reason": "r"}
    assert model_certificate(es, cov, layers)["blocking"] == [{"site": "t", "why": "never reached while sampling"}]
    cov = {"complete": False, "reason": "2 of 3 passes"}
    assert model_certificate(es, cov, layers)["blocking"] == [
        {"site": "model", "why": "coverage incomplete: 2 of 3 passes"}
    ]
    assert model_certificate(es, None, layers)["certified"] is True  # no coverage said: complete
    both = model_certificate(es, {"complete": False, "unvisited": ["s"]}, [site_layer("a", ["s"])])["blocking"]
    assert both == [
        {"site": "t", "why": "a site the adapter's layer list does not place"},
        {"site": "s", "why": "never reached while sampling"},
    ]


def test_no_layer_list_and_no_sites_are_never_certified() -> None:
    es = [entry("s", 1.0)]
    cert = model_certificate(es, FULL, None)
    assert cert["blocking"] == [{"site": "model", "why": "the adapter does not list the layers of its inverse pass"}]
    assert cert["bound_scanned"] is None and cert["layers"] == [] and cert["largest_layer_gain"] is None
    empty = model_certificate([], FULL, [LayerBound("n", "actnorm", 2.0, 0.0)])
    assert empty["certified"] is False and empty["why"] == "no sites found"
    assert empty["blocking"] == [{"site": "model", "why": "no sites found"}]
    assert empty["bound_scanned"] is None
    none = model_certificate([], None, None)
    assert [b["why"] for b in none["blocking"]] == [
        "no sites found",
        "the adapter does not list the layers of its inverse pass",
    ]


class TwoTails(Site):
    """Identity tails with a different bias on each side: ``v + t`` past ``B``, ``v - 3t`` before ``-B``."""

    def map_at(self, v: torch.Tensor, p) -> torch.Tensor:
        t = p[:, 0]
        right = v[:, None] + t[None, :]
        return torch.where((v > 0)[:, None], right, v[:, None] - 3 * t[None, :])


def test_bias_is_the_largest_over_both_tails() -> None:
    cert = site_certificate(TwoTails("modified-rq-spline", start=1.0), [rows(0.5)])
    assert cert["bias_max_scanned"] == 1.5 and cert["bound_scanned"] == 2.0 + 1.5
    cert = site_certificate(TwoTails("modified-rq-spline", start=1.0), [rows(-2.0)])
    assert cert["bias_max_scanned"] == 6.0
