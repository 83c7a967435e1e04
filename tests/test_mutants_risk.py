"""The risk figures one by one: error band, range parsing, misfit, sample checks, LR-PSNR, the aggregates.

Every expected value is worked out by hand (or by the library the module defers to, called directly), so
that a changed constant, comparison or key in :mod:`flowaudit.stats.risk` fails a unit test here.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from flowaudit.adapters import Adapter
from flowaudit.config.sampling import Sampling
from flowaudit.errors import AuditError
from flowaudit.stats import risk
from flowaudit.stats.risk import ErrorBand, aggregate, band_misfit, error_band, logistic_fit, parse_range, predict


class _Model(torch.nn.Module):
    pass


class _Plain(Adapter):
    """An adapter that states nothing: its shape and task are given, its output range is the base class's."""

    def __init__(self, shape: tuple[int, ...], task: str = "generic", model: torch.nn.Module | None = None):
        super().__init__(model or _Model())
        self._shape, self.task = shape, task

    @property
    def condition_shape(self) -> tuple[int, ...]:
        return self._shape

    def sites(self) -> list:
        return []

    def sample_latents(self, y, temperature, generator):
        raise NotImplementedError

    def sample(self, y, latents, observer=None):
        raise NotImplementedError

    def forward(self, x, y):
        raise NotImplementedError


class _Stated(_Plain):
    @property
    def output_range(self) -> tuple[float, float]:
        return (-1.0, 3.0)


DEFAULT_WARNING = (
    "error band [-0.5, 1.5] is a default: the outputs are not images, the model states no output range "
    "and the data has no targets; give --output-range LO,HI"
)


def test_band_given_by_the_flag() -> None:
    band = error_band(_Plain((2,)), (-2, 3))
    assert band == ErrorBand(-2.0, 3.0, "flag", "[-2, 3] given with --output-range", None)
    assert band.bounds == (-2.0, 3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        band.lo = 0.0  # type: ignore[misc]
    assert typing.get_type_hints(ErrorBand)["warning"] == (str | None)
    assert band.entry() == {
        "lo": -2.0,
        "hi": 3.0,
        "source": "flag",
        "detail": "[-2, 3] given with --output-range",
        "warning": None,
    }
    for bad in ((1, 1), (2, 1), (math.nan, 1), (0, math.inf)):
        with pytest.raises(AuditError, match="expected finite LO < HI"):
            error_band(_Plain((2,)), bad)
    with pytest.raises(AuditError, match=r"^--output-range 2,1: expected finite LO < HI$"):
        error_band(_Plain((2,)), (2, 1))


@pytest.mark.parametrize("adapter", [_Plain((3, 4, 4)), _Plain((2,), task="sr"), _Plain((2,), task="lowlight")])
def test_images_take_the_image_range(adapter: Adapter) -> None:
    band = error_band(adapter, None, torch.tensor([[10.0, 20.0]]))  # targets do not matter for images
    assert band == ErrorBand(-0.5, 1.5, "adapter", "the image range [0, 1], widened by half its width")


def test_a_stated_range_wins_over_targets() -> None:
    want = ErrorBand(-3.0, 5.0, "adapter", "the valid range the model states [-1, 3], widened by half its width")
    assert error_band(_Stated((2,)), None, torch.tensor([[10.0]])) == want
    model = _Model()
    model.output_range = (-1.0, 3.0)
    assert error_band(_Plain((2,), model=model), None, torch.tensor([[10.0]])) == want
    declared = _Stated((2,))
    declared.output_range_declared = False  # an adapter may say its range is only a default
    assert error_band(declared, None, torch.tensor([[1.0, 3.0]])).source == "targets"
    plain = _Plain((2,))
    plain.output_range_declared = True
    assert error_band(plain).source == "adapter"


@pytest.mark.parametrize(
    "targets, lo, hi, span",
    [
        ([[1.0, 3.0], [2.0, 2.0]], 0.0, 4.0, "[1, 3]"),  # w = 2
        ([[5.0], [5.0]], 2.5, 7.5, "[5, 5]"),  # equal: w = |a| = 5
        ([[-4.0], [-4.0]], -6.0, -2.0, "[-4, -4]"),  # equal: w = |a| = 4
        ([[0.25], [0.25]], -0.25, 0.75, "[0.25, 0.25]"),  # equal and small: w = 1
    ],
)
def test_targets_widen_by_half_their_width(targets: list, lo: float, hi: float, span: str) -> None:
    band = error_band(_Plain((2,)), None, torch.tensor(targets))
    assert (band.source, band.warning) == ("targets", None)
    assert band.lo == pytest.approx(lo, abs=1e-15) and band.hi == pytest.approx(hi, abs=1e-15)
    assert band.detail == f"the targets' range {span}, widened by half its width"


def test_default_band_warns() -> None:
    for targets in (None, torch.zeros((0, 2))):
        band = error_band(_Plain((2,)), None, targets)
        assert band == ErrorBand(
            -0.5, 1.5, "default", "the default range [0, 1], widened by half its width", DEFAULT_WARNING
        )


def test_parse_range() -> None:
    assert parse_range("-0.5,1.5") == (-0.5, 1.5)
    assert parse_range(" 0 , 2e3 ") == (0.0, 2000.0)
    for text in ("1", "1,2,3", "a,b", ""):
        with pytest.raises(ValueError) as e:
            parse_range(text)
        assert str(e.value) == f"{text!r}: expected LO,HI, two numbers, e.g. -0.5,1.5"
    for text in ("2,1", "1,1", "nan,1", "0,inf", "-inf,0"):
        with pytest.raises(ValueError) as e:
            parse_range(text)
        assert str(e.value) == f"{text!r}: expected finite LO < HI"


def test_misfit_starts_just_above_half() -> None:
    band = {"lo": -0.5, "hi": 1.5, "source": "adapter"}
    assert risk.MISFIT_PCT == 50.0
    assert band_misfit(band, None) is None
    assert band_misfit(band, 50.0) is None
    assert band_misfit(band, math.nextafter(50.0, 100.0)) == (
        "50% of in-distribution inputs leave the error band [-0.5, 1.5] (adapter): the band probably does not "
        "fit the model's outputs; give --output-range LO,HI"
    )
    assert band_misfit(band, 100.0).startswith("100% of in-distribution inputs")


def test_sample_checks_per_input_over_k_samples() -> None:
    x = torch.tensor(
        [
            [0.0, 0.5, 1.0],  # input 0, sample 0: inside
            [0.0, -2.0, 1.0],  # input 0, sample 1: outside, finite
            [0.0, 0.0, 3.0],  # input 0, sample 2: outside
            [0.1, 0.1, 0.1],  # input 1: all inside
            [-0.25, 0.1, 0.1],
            [0.1, 0.1, 0.1],
        ]
    )
    out = risk.sample_checks(x, Sampling(samples=3, temperature=0.9, seed=0), (-0.5, 1.5))
    assert out["n_inf"].tolist() == [0, 0]
    assert out["n_pixel_err"].tolist() == [2, 0]
    assert out["max_abs"].tolist() == [3.0, 0.25]
    assert out["max_abs"].dtype == torch.float64
    x[4, 1] = -math.inf
    out = risk.sample_checks(x, Sampling(samples=3, temperature=0.9, seed=0), (-0.5, 1.5))
    assert out["n_inf"].tolist() == [0, 1] and out["max_abs"].tolist() == [3.0, math.inf]


def test_lr_psnr_of_constant_images() -> None:
    s = Sampling(samples=2, temperature=0.9, seed=0)
    lr = torch.full((1, 3, 2, 2), 0.25)
    sr = torch.full((2, 3, 8, 8), 0.5)
    sr[1] = 0.25
    psnr = risk.lr_psnr(sr, lr, 4, s)
    assert psnr.shape == (1, 2) and psnr.dtype == torch.float64
    assert psnr[0, 0].item() == pytest.approx(10 * math.log10(1 / 0.0625), rel=1e-6)  # mse 0.25² → 12.04 dB
    assert psnr[0, 1].item() == pytest.approx(120.0, rel=1e-9)  # equal: mse clamped at 1e-12
    bad = torch.full((2, 3, 8, 8), 0.25)
    bad[0] = math.nan  # NaN reads as 0: mse 0.0625
    bad[1] = math.inf  # +Inf reads as 1: mse 0.5625
    psnr = risk.lr_psnr(bad, lr, 4, s)
    assert psnr[0].tolist() == pytest.approx([10 * math.log10(16), 10 * math.log10(1 / 0.5625)], rel=1e-6)
    bright = torch.full((2, 3, 8, 8), 7.0)  # clamped to 1 before and after the resize
    bright[1] = -math.inf  # -Inf reads as 0
    psnr = risk.lr_psnr(bright, lr, 4, s)
    assert psnr[0].tolist() == pytest.approx([10 * math.log10(1 / 0.5625), 10 * math.log10(16)], rel=1e-6)
    edge = torch.zeros((2, 3, 8, 8))
    edge[..., 4:] = 7.0  # a sample brighter than white reads as the white a saved image holds, before the resize
    assert torch.equal(risk.lr_psnr(edge, lr, 4, s), risk.lr_psnr(edge.clamp(0, 1), lr, 4, s))


def test_logistic_fit_in_original_units() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(3.0, 2.0, 400)
    has = rng.uniform(size=400) < 1 / (1 + np.exp(-(s - 3.0)))
    fit = logistic_fit(np.r_[s, np.nan, np.inf], np.r_[has, True, False])
    direct = LogisticRegression(C=1e6, tol=1e-10, max_iter=10_000).fit(s[:, None], has.astype(int))
    assert fit["coef"] == pytest.approx(direct.coef_[0, 0], rel=1e-3)
    assert fit["intercept"] == pytest.approx(direct.intercept_[0], rel=1e-3)
    assert logistic_fit(s, np.zeros(400, bool)) is None
    assert logistic_fit(np.r_[s[:5], np.nan], np.r_[np.zeros(5, bool), True]) is None  # the error's score is NaN


def test_predict_replaces_non_finite_scores_by_the_largest_finite_one() -> None:
    assert np.isnan(predict(None, np.array([1.0, 2.0]))).all()
    fit = {"intercept": 1.0, "coef": 2.0}
    p = predict(fit, np.array([0.0, 1.0, np.inf, np.nan]))
    assert p == pytest.approx(1 / (1 + np.exp(-np.array([1.0, 3.0, 3.0, 3.0]))), rel=1e-15)
    assert predict(fit, np.array([np.inf])) == pytest.approx([1 / (1 + math.exp(-1.0))], rel=1e-15)


def _records(s: list, n_err: list, n_inf: list | None = None, psnr: bool = False) -> list[dict]:
    out = []
    for i, (score, err) in enumerate(zip(s, n_err)):
        r = {"id": f"in/{i}", "s_ood": score, "n_pixel_err": err, "n_inf": (n_inf or [0] * len(s))[i]}
        if psnr and i < 2:
            r["lr_psnr_min"], r["lr_psnr_std"] = 20.0 + 10 * i, 1.0 + i
        out.append(r)
    return out


def test_aggregate_figures() -> None:
    s, n_err = [1.0, 2.0, 3.0, None, 0.5], [0, 0, 2, 1, 4]
    recs = _records(s, n_err, n_inf=[0, 1, 0, 0, 0], psnr=True)
    out = aggregate(recs, 4, 0.7)
    assert (out["n_inputs"], out["samples_per_input"], out["temperature"]) == (5, 4, 0.7)
    assert out["pct_inf"] == 20.0 and out["pct_pixel_err"] == 60.0
    assert out["lr_psnr_min"] == 25.0 and out["lr_psnr_std"] == 1.5
    scored, has = np.array([1.0, 2.0, 3.0, 0.5]), np.array([0, 0, 1, 1])
    assert out["auroc"] == roc_auc_score(has, scored)
    rate = np.array([0, 0, 2, 4]) / 4
    assert out["spearman"] == pytest.approx(spearmanr(scored, rate).statistic, rel=1e-12)
    fit = logistic_fit(np.array([1.0, 2.0, 3.0, np.nan, 0.5]), np.array(n_err) > 0)
    assert out["logistic"] == pytest.approx(fit)
    p = predict(fit, np.array([1.0, 2.0, 3.0, np.nan, 0.5]))
    assert [r["risk"] for r in recs] == pytest.approx(list(p))
    order = sorted(range(5), key=lambda i: (-p[i], -n_err[i] / 4, -(s[i] if s[i] is not None else 1e300)))
    assert out["ranked"] == [f"in/{i}" for i in order]
    assert "lr_psnr_min" not in aggregate(_records(s, n_err), 4, 0.7)


def test_aggregate_without_errors_or_scores() -> None:
    recs = _records([3.0, None, 1.0, 2.0] * 6, [0] * 24)  # one class: no AUROC, no fit, no risk
    out = aggregate(recs, 2, 0.9)
    assert out["auroc"] is None and out["logistic"] is None and out["spearman"] is None
    assert all(r["risk"] is None for r in recs)
    assert out["ranked"][:4] == ["in/1", "in/5", "in/9", "in/13"]  # no score ranks first (as the worst)
    assert len(out["ranked"]) == 20
    empty = aggregate([], 2, 0.9)
    assert math.isnan(empty["pct_inf"]) and math.isnan(empty["pct_pixel_err"]) and empty["ranked"] == []
    unscored = aggregate(_records([None, None], [0, 1]), 2, 0.9)
    assert unscored["auroc"] is None and unscored["logistic"] is None


def test_spearman_needs_three_scores_and_a_spread() -> None:
    two = aggregate(_records([1.0, 2.0, None], [0, 1, 1]), 2, 0.9)
    assert two["spearman"] is None and two["auroc"] == 1.0
    three = aggregate(_records([1.0, 2.0, 3.0], [0, 1, 2]), 2, 0.9)
    assert three["spearman"] == pytest.approx(1.0)
    flat = aggregate(_records([1.0, 2.0, 3.0], [1, 1, 1]), 2, 0.9)
    assert flat["spearman"] is None and flat["auroc"] is None  # every input has an error: one class


def test_the_band_is_closed_its_edges_are_inside() -> None:
    """A value exactly on ``lo`` or ``hi`` is inside the band; one ulp past either edge is a pixel error."""
    lo, hi = -0.5, 1.5
    x = torch.tensor(
        [
            [lo, hi],  # input 0: both edges, inside
            [math.nextafter(lo, -2.0), hi],  # input 1: one ulp below lo
            [lo, math.nextafter(hi, 2.0)],  # input 2: one ulp above hi
        ],
        dtype=torch.float64,
    )
    out = risk.sample_checks(x, Sampling(samples=1, temperature=0.9, seed=0), (lo, hi))
    assert out["n_pixel_err"].tolist() == [0, 1, 1]
    assert out["n_inf"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("unit", [1e-3, 1e3])
def test_logistic_fit_does_not_depend_on_the_unit_of_the_score(unit: float) -> None:
    """The fit standardizes ``s_OOD`` first, so a score in other units gives the same curve: the coefficient
    scales by ``1 / unit``, the intercept stays. Unstandardized, the weak penalty (C = 1e6) would bite on a
    coefficient of 1e3 and the solver would stall on scores of 1e3."""
    rng = np.random.default_rng(1)
    s = rng.normal(3.0, 2.0, 300)
    has = rng.uniform(size=300) < 1 / (1 + np.exp(-2.0 * (s - 3.0)))
    base, scaled = logistic_fit(s, has), logistic_fit(s * unit, has)
    assert scaled["coef"] * unit == pytest.approx(base["coef"], rel=1e-9)
    assert scaled["intercept"] == pytest.approx(base["intercept"], rel=1e-9)


def test_logistic_fit_of_equal_scores_is_flat() -> None:
    """Every finite score equal (σ = 0): no slope, and the intercept is the log-odds of an error."""
    fit = logistic_fit(np.full(8, 2.5), np.array([1, 0, 0, 0, 1, 0, 0, 0], bool))
    assert fit["coef"] == 0.0
    assert fit["intercept"] == pytest.approx(math.log(2 / 6), abs=1e-3)  # to the solver's tolerance


def test_a_risk_of_exactly_zero_ranks_last() -> None:
    """A score far below the rest underflows the fitted probability to 0.0: that input is the safest, not a
    missing risk, and ranks last."""
    recs = _records([1.0, 2.0, 3.0, 4.0, -5000.0], [0, 1, 0, 1, 0])
    with np.errstate(over="ignore"):  # exp(-z) overflows to inf: the probability is 0.0
        out = aggregate(recs, 2, 0.9)
    assert out["logistic"]["coef"] > 0 and recs[4]["risk"] == 0.0
    assert out["ranked"] == ["in/3", "in/2", "in/1", "in/0", "in/4"]


def test_ranking_matches_a_sort_by_risk_rate_and_score_ties_in_record_order() -> None:
    rng = np.random.default_rng(3)
    pool = [None, -np.inf, np.inf, np.nan, 0.5, 1.0, 2.0]
    s = [pool[i] for i in rng.integers(0, len(pool), 300)]
    n_err = [int(v) for v in rng.integers(0, 3, 300)]
    recs = _records(s, n_err)
    out = aggregate(recs, 4, 0.9)
    finite = [v if v is not None and np.isfinite(v) else None for v in s]
    key = [
        (-(r["risk"] or 0.0), -n_err[i] / 4, -(finite[i] if finite[i] is not None else 1e300))
        for i, r in enumerate(recs)
    ]
    assert out["ranked"] == [f"in/{i}" for i in sorted(range(300), key=key.__getitem__)[:20]]
    assert "ranked" not in aggregate(_records(s, n_err), 4, 0.9, ranked=False)


def test_a_set_holding_every_input_has_the_overall_figures() -> None:
    from flowaudit.audit import _risk
    from flowaudit.config.settings import Settings

    s, n_err = [1.0, 2.0, 3.0, None, 0.5, 4.0], [0, 0, 2, 1, 4, 3]
    settings = Settings(samples=4, temperature=0.7)
    one = [{**r, "set": "in"} for r in _records(s, n_err)]
    out = _risk(one, [("in", None)], settings)
    alone = aggregate(_records(s, n_err), 4, 0.7, ranked=False)
    assert out["by_set"]["in"] == alone and out["by_set"]["in"]["logistic"] is not out["logistic"]
    two = [{**r, "set": "in" if i < 3 else "ood"} for i, r in enumerate(_records(s, n_err))]
    out = _risk(two, [("in", None), ("ood", None)], settings)
    assert out["by_set"]["ood"] == aggregate(_records(s, n_err)[3:], 4, 0.7, ranked=False)
    overall = _records(s, n_err)
    aggregate(overall, 4, 0.7)
    assert [r["risk"] for r in two] == [r["risk"] for r in overall]  # each record keeps the overall fit's risk
