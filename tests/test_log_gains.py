"""Log-gains binned as they are: the figures of the gains float32(e^ℓ), with no ``exp`` over a call.

* :func:`~flowaudit.tracing.binning.log_first_keys` starts each bin index at the smallest ℓ whose gain lies there
  (checked at every entry and the key below it, against the float64 definition);
* a tracer fed ℓ (``site_log``) keeps exactly the counts, extremes, kept rows and per-input figures of a tracer
  fed the gains, for narrow and wide rows, repeated rows, ℓ on the bin edges, and ±inf, NaN of either sign,
  overflow to +inf and underflow to 0 and to denormals;
* the windows kept of spatial rows too large for the budget are scored by the gains, not by their logs;
* an observer without ``site_log`` is given the gains.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowaudit.adapters.base import log_gain_reporter
from flowaudit.config.sampling import Sampling
from flowaudit.tracing.binning import GAIN_EDGES, bin_index, log_first_keys, order_keys
from flowaudit.tracing.trace import Tracer

B = len(GAIN_EDGES) - 1


def _index_by_definition(ell: torch.Tensor) -> torch.Tensor:
    """0 for a gain of 0, 1 + bin for a positive finite gain, B + 1 for +inf or NaN: of g = float32(e^ℓ)."""
    g = torch.exp(ell.double()).float()
    positive = torch.isfinite(g) & (g > 0)
    inside = 1 + bin_index(torch.where(positive, g, torch.ones_like(g)), GAIN_EDGES)
    return torch.where(positive, inside, torch.where(g == 0, 0, B + 1))


def _ell(keys: torch.Tensor) -> torch.Tensor:
    return order_keys(keys.long()).to(torch.int32).view(torch.float32)


def test_first_keys_start_each_index():
    first = torch.from_numpy(log_first_keys(GAIN_EDGES).astype(np.int64))
    assert len(first) == B + 2 and bool((first[1:].diff() > 0).all())
    at, below = _index_by_definition(_ell(first[1:])), _index_by_definition(_ell(first[1:] - 1))
    assert torch.equal(at, torch.arange(1, B + 2)) and torch.equal(below, torch.arange(0, B + 1))


def _row_sets(seed: int) -> list[torch.Tensor]:
    """Calls of log-gains (4 rows an input, 2 inputs): every kind of row the compiled loop tells apart."""
    g = torch.Generator().manual_seed(seed)
    first = torch.from_numpy(log_first_keys(GAIN_EDGES).astype(np.int64))
    edges = _ell(torch.cat([first[1:-1] - 1, first[1:-1], first[1:-1] + 1]))  # ℓ on and beside every bin edge
    calls = [
        torch.randn(8, 3, 40, generator=g) * 0.01 + 1.0,  # narrow rows: a few bins
        torch.randn(8, 3, 40, generator=g) * 6,  # wide rows, g ≪ 1e-4 to ≫ 1e8
        edges[torch.randperm(len(edges), generator=g)[:960]].reshape(8, 120),
    ]
    junk = torch.randn(8, 50, generator=g)
    junk[0, 0], junk[1, 1], junk[2, 2], junk[3, 3] = math.inf, -math.inf, math.nan, -math.nan
    junk[4, 0], junk[5, 0], junk[6, 0] = 100.0, -200.0, -100.0  # overflow, underflow to 0, a denormal gain
    junk[7] = math.nan  # a row of NaN
    repeated = torch.randn(2, 1, 60, generator=g).expand(2, 4, 60).reshape(8, 60) * 2  # an input's rows alike
    return calls + [junk, repeated]


def _fed(log: bool, calls: list[torch.Tensor], compiled: bool = True) -> Tracer:
    tracer = Tracer(Sampling(4, 0.9, 0), param_budget=300, compiled=compiled)
    params = torch.Generator().manual_seed(9)
    for round_ in range(3):
        for i, ell in enumerate(calls):
            p = torch.randn(len(ell), 7, generator=params)
            if log:
                tracer.site_log(f"s{i}", ell, p)
            else:
                tracer.site(f"s{i}", torch.exp(ell.double()).float(), p)
        tracer.end_batch(2)
    return tracer


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "tensors"])
def test_log_gains_give_the_figures_of_their_gains(compiled):
    """By the compiled loops or by tensor operations (a device, or a tracer without the loops), the figures of
    the gains float32(e^ℓ) rounded once, to the last bit."""
    calls = _row_sets(0)
    logs, gains = _fed(True, calls, compiled), _fed(False, calls)
    for i in range(len(calls)):
        a, b = logs.gains[f"s{i}"].state(), gains.gains[f"s{i}"].state()
        assert torch.equal(a["counts"], b["counts"]) and torch.equal(a["ext"], b["ext"]), i
        for u, v in zip(logs.reservoirs[f"s{i}"].kept(), gains.reservoirs[f"s{i}"].kept()):
            assert torch.equal(u, v)
    assert logs.input_gain == gains.input_gain
    assert int(logs.gains["s3"].state()["ext"][1]) == 3 * (6 + 50)  # ±inf, NaNs, 0 and a row of NaN, a round each


def test_log_gains_score_the_windows_of_spatial_rows_by_their_gains():
    """Rows too large for the budget are kept as windows scored by their positions' gains: the same windows,
    and the same largest kept gain, whether the site reports gains or their logs."""
    g = torch.Generator().manual_seed(3)
    calls = [(torch.randn(8, 3, 12, 12, generator=g) * 3, torch.randn(8, 6, 12, 12, generator=g)) for _ in range(3)]
    tracers = []
    for log in (True, False):
        tracer = Tracer(Sampling(4, 0.9, 0), param_budget=600, spatial={"s"})
        for ell, p in calls:
            if log:
                tracer.site_log("s", ell, p)
            else:
                tracer.site("s", torch.exp(ell.double()).float(), p)
            tracer.end_batch(2)
        tracers.append(tracer)
    logs, gains = tracers
    assert logs.reservoirs["s"].tiling is not None
    for u, v in zip(logs.reservoirs["s"].kept(), gains.reservoirs["s"].kept()):
        assert torch.equal(u, v)
    assert logs.reservoir_info("s") == gains.reservoir_info("s")


def test_log_gain_counts_are_the_definitions_bins():
    """Every value of a call counted in its own bin: the histogram is the definition's, value by value."""
    ell = torch.cat([c.reshape(-1) for c in _row_sets(1)])
    ell = ell[: len(ell) // 8 * 8].reshape(8, -1)
    tracer = Tracer(Sampling(4, 0.9, 0))
    tracer.site_log("s", ell, None)
    want = torch.bincount(_index_by_definition(ell.reshape(-1)), minlength=B + 2)
    state = tracer.gains["s"].state()  # the bins, then the count in them and of g ≤ 0 or not finite
    assert torch.equal(state["counts"].long(), want[1 : B + 1])
    assert state["ext"][:2].tolist() == [float(want[1 : B + 1].sum()), float(want[0] + want[B + 1])]


def test_observers_without_site_log_get_gains():
    got = {}

    class Gains:
        def site(self, name, gain, params):
            got[name] = gain

    ell = torch.tensor([[0.0, 1.0, -2.0]])
    log_gain_reporter(Gains())("s", ell, None)
    assert torch.equal(got["s"], ell.exp())
