"""The tail probe's budget: every kept row screened at the far tail, the whole ladder for the ranked rows within
the budget, the cost counted truthfully, and a violating row among many compliant ones still caught."""

from __future__ import annotations

import pytest
import torch
from flowaudit.adapters import adapt
from flowaudit.reference_models import load
from torch import Tensor

import flowaudit
from flowaudit.evidence.probe import LADDER_MIN_ROWS, PROBE_BUDGET, measured_evidence


class RowSite:
    """c'(x) = a / (1 + k |x|) per parameter row (a, k): k = 0 is a constant slope (compliant tails), k > 0
    decays past |x| ≈ 1/k. Every call is recorded: (values, rows, parameter numbers, the rows' a)."""

    kind, name = "custom", "row-site"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, Tensor]] = []

    def tail_start(self) -> float:
        return 0.0

    def tail_bounds(self) -> None:
        return None

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        self.calls.append((len(values), params.shape[0], params.numel(), params[:, 0].clone()))
        x = values.abs().to(torch.float64)[:, None]
        return params[:, 0][None] / (1 + x * params[:, 1][None])

    def cost(self) -> int:
        return sum(v * n for v, _, n, _ in self.calls)

    def laddered(self) -> Tensor:
        """The a of every row that got more than the screen's two values."""
        return torch.cat([a for v, _, _, a in self.calls if v > 2] or [torch.zeros(0)])


def _rows(n: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    a = 1.0 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    return torch.stack([a, torch.zeros(n, dtype=torch.float64)], 1)


def test_the_cost_stays_within_the_budget_and_is_reported() -> None:
    site, p = RowSite(), _rows(20_000)
    ev = measured_evidence(site, [p])
    probe = ev["probe"]
    ladder_values = probe["n_values"] - 2
    ladder_cost = site.cost() - 2 * p.numel()
    assert probe["cost"] == site.cost()  # counted as evaluated
    assert ladder_cost <= max(PROBE_BUDGET, LADDER_MIN_ROWS * ladder_values * 2)
    assert site.cost() < probe["n_values"] * p.numel() / 10  # far below the whole ladder under every row
    assert probe["rows"] == probe["rows_screened"] == 20_000 and 0 < probe["rows_ladder"] < 20_000
    assert probe["n_points"] == 2 * 20_000 + ladder_values * probe["rows_ladder"]  # c' values, every one finite
    assert probe["budget"] == PROBE_BUDGET


@pytest.mark.parametrize("budget", [0, 1000, 50_000, PROBE_BUDGET])
def test_a_smaller_budget_spends_less_but_keeps_the_minimum_rows(budget: int) -> None:
    site, p = RowSite(), _rows(5_000, seed=1)
    probe = measured_evidence(site, [p], budget=budget)["probe"]
    ladder_values = probe["n_values"] - 2
    assert probe["rows_ladder"] == min(5_000, max(LADDER_MIN_ROWS, budget // (ladder_values * 2)))
    assert site.cost() - 2 * p.numel() <= max(budget, LADDER_MIN_ROWS * ladder_values * 2)


def test_the_extreme_rows_always_get_the_ladder() -> None:
    """The rows with the largest tail gain 1/c' (smallest c') and the smallest gain are laddered, whatever the
    budget, as are rows with a non-positive or non-finite c'."""
    site, p = RowSite(), _rows(10_000, seed=2)
    p[7_777, 0] = 0.2  # the largest gain of all rows
    p[123, 0] = 9.0  # the smallest gain
    p[4_242, 1] = -1e-300  # a row whose c' turns negative in the far tail (1 - 10^7 at the top of the range)
    p = p[torch.randperm(len(p), generator=torch.Generator().manual_seed(3))]
    ev = measured_evidence(site, [p], budget=0)
    got = site.laddered()
    assert (got == 0.2).any() and (got == 9.0).any() and (got == p[p[:, 1] < 0, 0]).any()
    assert len(got) == LADDER_MIN_ROWS
    assert ev["derivative_min"] < 0 and ev["derivative_max"] == 9.0  # the negative row is read in full
    assert ev["verdict"] == "violates"


def test_a_violating_row_among_many_compliant_ones_is_caught() -> None:
    site, p = RowSite(), _rows(30_000, seed=4)
    ok = measured_evidence(RowSite(), [p.clone()])
    assert ok["verdict"] == "compliant" and ok["tail_ratio"] >= 0.5
    p[29_000, 1] = 1e-12  # one row's slope decays past |x| = 1e12: c'(1e307) ≈ 1e-295 a
    ev = measured_evidence(site, [p])
    assert ev["verdict"] == "violates" and ev["tail_ratio"] < 1e-20
    assert ev["probe"]["rows_ladder"] < 30_000  # caught by the screen, not by laddering everything


class Kept:
    """An observer that keeps every site call's parameter rows."""

    def __init__(self) -> None:
        self.params: dict[str, list[Tensor]] = {}

    def layer(self, name: str, x: Tensor) -> None:
        pass

    def site(self, name: str, gain: Tensor, params: Tensor) -> None:
        self.params.setdefault(name, []).append(params.detach())


class Ladder:
    """``site`` with its c' probed at every value, its declaration that c' does not depend on x withheld."""

    derivative_constant = False

    def __init__(self, site) -> None:
        self.site = site

    def __getattr__(self, name: str):
        return getattr(self.site, name)

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        return self.site.derivative_at(values, params)


class ConstantRowSite(RowSite):
    """A :class:`RowSite` that declares c' independent of x (true for rows with k = 0 only)."""

    derivative_constant = True


def test_a_constant_derivative_is_probed_at_four_values_with_the_figures_of_the_whole_ladder() -> None:
    site, p = ConstantRowSite(), _rows(20_000, seed=5)
    p[11, 0] = 0.0  # a row whose c' is 0: the tails' ratio is 0, at every decade
    fast = measured_evidence(site, [p])
    assert [(v, n) for v, n, _, _ in site.calls] == [(4, 20_000)]  # one call, every row at once
    whole = measured_evidence(Ladder(RowSite()), [p], budget=1 << 40)
    assert fast["probe"]["rows_ladder"] == fast["probe"]["rows"] == whole["probe"]["rows_ladder"] == 20_000
    assert fast["probe"]["cost"] == 4 * p.numel() and fast["probe"]["rows_screened"] == 0
    for k in ("verdict", "tail_ratio", "derivative_min", "derivative_max", "settled", "slope", "nonfinite"):
        assert fast[k] == whole[k], k
    assert fast["verdict"] == "violates" and fast["derivative_min"] == 0.0
    assert fast["probe"]["n_points"] == whole["probe"]["n_points"]


class ExpSite(RowSite):
    """c' = e^a per row, whatever x (an affine scale), declared so."""

    derivative_constant = True

    def derivative_at(self, values: Tensor, params: Tensor) -> Tensor:
        self.calls.append((len(values), params.shape[0], params.numel(), params[:, 0].clone()))
        return params[:, 0].exp()[None].expand(len(values), -1)


def test_a_constant_derivative_counts_non_finite_values_as_the_ladder_does() -> None:
    p = _rows(500, seed=6)
    p[7, 0] = 1000.0  # e^1000 = inf
    fast, whole = measured_evidence(ExpSite(), [p]), measured_evidence(Ladder(ExpSite()), [p], budget=1 << 40)
    assert fast["nonfinite"] == whole["nonfinite"] and fast["nonfinite"]["count"] == fast["probe"]["n_values"]
    assert fast["verdict"] == whole["verdict"] == "violates" and fast["probe"]["n_points"] == whole["probe"]["n_points"]


def test_a_wrong_declaration_of_a_constant_derivative_is_not_believed() -> None:
    """A site that says c' does not depend on x while one row's c' decays in the far tail: the four values
    disagree, and the row is found as it would be without the declaration."""
    p = _rows(30_000, seed=4)
    p[29_000, 1] = 1e-12
    site = ConstantRowSite()
    ev = measured_evidence(site, [p])
    plain = measured_evidence(RowSite(), [p])
    assert ev["verdict"] == plain["verdict"] == "violates" and ev["tail_ratio"] == plain["tail_ratio"] < 1e-20
    assert ev["probe"]["rows_ladder"] < 30_000 and ev["probe"]["rows_screened"] == 30_000


@pytest.mark.parametrize("name", ["toy-affine", "toy-modified-rq-spline"])
def test_budgeted_figures_of_the_bundled_toys_equal_the_whole_ladder(name: str) -> None:
    """On the toys' rows (4000 a site) the budget changes no figure: their c' does not depend on x in the
    tails, so the screen's extreme rows hold each decade's extremes; the affine sites, whose c' does not depend
    on x anywhere, give every row the ladder's figures from four values."""
    adapter = adapt(load(name).eval())
    y = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1)).repeat_interleave(4, 0)
    kept = Kept()
    with torch.no_grad():
        adapter.sample(y, adapter.sample_latents(y, 0.9, torch.Generator().manual_seed(0)), kept)
    for s in adapter.sites():
        params = kept.params[s.name]
        cut = measured_evidence(s, params)
        whole = measured_evidence(Ladder(s), params, budget=1 << 40)
        assert whole["probe"]["rows_ladder"] == whole["probe"]["rows"] == 4000
        if s.derivative_constant:
            assert cut["probe"]["rows_ladder"] == 4000 and cut["probe"]["n_points"] == whole["probe"]["n_points"]
            assert cut["probe"]["cost"] == 4 * sum(p.numel() for p in params)
        else:
            assert cut["probe"]["rows_ladder"] < 4000
        for k in ("verdict", "tail_ratio", "derivative_min", "derivative_max", "settled", "slope"):
            assert cut[k] == whole[k], (s.name, k)


@pytest.mark.parametrize("name", ["toy-affine", "toy-modified-rq-spline"])
def test_scan_reports_the_probe_budget(name: str) -> None:
    y = torch.randn(300, 2, generator=torch.Generator().manual_seed(5))
    report = flowaudit.scan(load(name), y, samples=4, device="cpu")
    for s in report["model"]["sites"]:
        probe = s["remark2"]["probe"]
        assert probe["rows"] == probe["reservoir"]["rows"] == 1200 and probe["budget"] == PROBE_BUDGET
        if s["kind"] == "affine":  # c' read at four values under every row
            assert probe["rows_screened"] == 0 and probe["rows_ladder"] == 1200
            assert probe["cost"] == 4 * probe["reservoir"]["points"]
        else:
            assert probe["rows_screened"] == 1200 and LADDER_MIN_ROWS <= probe["rows_ladder"] < 1200
        assert s["remark2"]["swept"]["probe"]["rows"] == 40  # 4 conditions × 2 samples × 5 decades
        assert (
            s["remark2"]["swept"]["probe"]["rows_ladder"] == 40 and s["remark2"]["swept"]["probe"]["rows_screened"] == 0
        )
