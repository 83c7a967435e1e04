"""The parameter reservoir keeps its budget whatever the image size: a spatial site's rows too large for two a
half are kept as windows over (H, W), scored by their largest gain and keyed by their unit id, the same windows
however the rows arrive; rows that fit, and rows of non-spatial sites, are kept whole as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flowaudit.adapters import adapt
from flowaudit.reference_models import load

from flowaudit.config.sampling import Sampling
from flowaudit.evidence.probe import measured_evidence
from flowaudit.tracing.reservoir import ParamReservoir
from flowaudit.tracing.trace import Tracer
from flowaudit.tracing.windows import TILE_UNITS, Tiling

BUDGET = 4096
ROW = (8, 37, 45)  # 13,320 numbers a row: more than half the budget; H, W that the windows do not divide


def _calls(n_inputs: int, k: int, seed: int, row=ROW, gain_channels: int = 4):
    """(params, per-position gains) of ``n_inputs`` inputs of ``k`` rows, seeded; gains heavy-tailed."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn((n_inputs * k, *row), generator=g)
    gain = torch.rand((n_inputs * k, gain_channels, *row[-2:]), generator=g).pow(-2.0)
    return rows, gain


def _feed(res: ParamReservoir, rows, gain, k: int, per: int, first: int = 0, host: bool = True) -> None:
    """Offer ``rows`` in calls of ``per`` inputs (batch index = call index), numbered from input ``first``."""
    for c, i in enumerate(range(0, len(rows) // k, per)):
        part, g = rows[i * k : (i + per) * k], gain[i * k : (i + per) * k]
        row_max = g.flatten(1).amax(1).double()
        if host:
            res.add(part, row_max.numpy(), first + i, k, c, gain=g)
        else:
            res._add_tensors(part, row_max, first + i, k, c, g)


def _kept(res: ParamReservoir):
    rows, ids = res.kept()
    order = torch.argsort(ids[:, 0])
    return rows[order], ids[order]


def test_windows_are_the_rows_positions_and_fit_the_budget():
    t = Tiling.of(ROW, BUDGET)
    assert t is not None and t.unit[:-2] == ROW[:-2]
    assert TILE_UNITS * math.prod(t.unit) <= BUDGET  # at least 8 windows a half
    rows, _ = _calls(1, 3, seed=1)
    cut = t.cut(rows)
    h, w = t.tile
    assert cut.shape == (3 * t.per_row, *t.unit)
    k = 0
    covered = torch.zeros(ROW[-2:], dtype=torch.bool)
    for r in range(3):
        for y in t.starts[0]:
            for x in t.starts[1]:
                assert torch.equal(cut[k], rows[r, :, y : y + h, x : x + w])
                assert torch.equal(t.window(rows, k), cut[k]) and (t.window(rows.numpy(), k) == cut[k].numpy()).all()
                covered[y : y + h, x : x + w] = True
                k += 1
    assert bool(covered.all())  # every position of a row lies in some window
    assert Tiling.of((8, 16, 16), BUDGET) is None  # 2,048 numbers: two rows a half fit, kept whole
    assert Tiling.of((40_000,), BUDGET) is None  # no (C, H, W): a vector row is never cut


def test_a_huge_row_site_keeps_its_budget_and_the_largest_gain():
    rows, gain = _calls(6, 2, seed=2)
    peak_row, peak_pos = 7, (36, 44)  # the last position: in the overlapping last window of both sides
    peak = float(gain.max()) * 10
    gain[peak_row, 1, peak_pos[0], peak_pos[1]] = peak
    res = ParamReservoir(BUDGET, salt=11, spatial=True)
    _feed(res, rows, gain, k=2, per=2)
    info = res.info()
    t = res.tiling
    unit = math.prod(t.unit)
    assert info["points"] <= BUDGET + unit
    assert info["tiles"] == {"shape": list(t.tile), "per_row": t.per_row, "kept": info["points"] // unit}
    assert info["rows_seen"] == 12 and info["inputs"] >= 1 and info["rows"] <= info["tiles"]["kept"]
    assert info["largest_gain_kept"] == peak
    kept, ids = _kept(res)
    # the window holding the peak is kept, whole, under its unit id (row × windows a row + window)
    win = (len(t.starts[0]) - 1) * len(t.starts[1]) + len(t.starts[1]) - 1
    at = (ids[:, 0] == peak_row * t.per_row + win).nonzero().flatten()
    assert len(at) == 1
    h, w = t.tile
    assert torch.equal(kept[at[0]], rows[peak_row, :, ROW[1] - h :, ROW[2] - w :])
    assert int(ids[at[0], 1]) == peak_row // 2  # its input
    # the half kept by gain holds the windows with the largest window maxima of all rows offered
    scores = t.scores(gain, None, len(rows))
    best = torch.argsort(scores, descending=True, stable=True)[: res.capacity(unit)[0]]
    assert set(res._top[2][:, 0].tolist()) == set(best.tolist())


def test_the_same_windows_whatever_the_batches_shards_or_device_path():
    rows, gain = _calls(12, 3, seed=3)
    whole = ParamReservoir(BUDGET, salt=5, spatial=True)
    _feed(whole, rows, gain, k=3, per=12)
    want_rows, want_ids = _kept(whole)
    for per in (1, 5):
        for host in (True, False):
            res = ParamReservoir(BUDGET, salt=5, spatial=True)
            _feed(res, rows, gain, k=3, per=per, host=host)
            got_rows, got_ids = _kept(res)
            assert torch.equal(got_ids[:, :2], want_ids[:, :2]) and torch.equal(got_rows, want_rows)
            assert res.info()["rows_seen"] == 36
    # shards of 4 inputs, each saved and restored, merged in order
    merged = None
    for s in range(3):
        part = ParamReservoir(BUDGET, salt=5, spatial=True)
        sl = slice(12 * s, 12 * (s + 1))
        _feed(part, rows[sl], gain[sl], k=3, per=2, first=4 * s)
        part = ParamReservoir.from_state(part.state())
        merged = part if merged is None else merged.merge(part)
    got_rows, got_ids = _kept(merged)
    assert torch.equal(got_ids[:, :2], want_ids[:, :2]) and torch.equal(got_rows, want_rows)
    assert merged.tiling == whole.tiling and merged.info()["rows_seen"] == 36


def test_windows_scored_from_log_gains_as_from_the_gains_a_tracer_rounds():
    """A model's log-gains (``site_log``) score windows on the CPU by their largest log, through one float64 ``exp``:
    the scores a device path gives the gains ``float32(exp(ℓ))``, to the bit (a float32 ``exp`` of every log is
    off by an ulp on some)."""
    rows, gain = _calls(6, 3, seed=7)
    log = gain.log().mul_(4.0).sub_(40.0)  # gains from e^-40 to about e^80, finite in float32
    log[0, 0, 0, 0], log[1, 1, 2, 3], log[2, 0, 5, 5] = math.nan, math.inf, -math.inf
    rounded = log.double().exp().float()
    tiling = Tiling.of(ROW, BUDGET)
    assert torch.equal(tiling.scores(log, None, 18, log=True), tiling.scores(rounded, None, 18))  # every window
    host, device = ParamReservoir(BUDGET, salt=5, spatial=True), ParamReservoir(BUDGET, salt=5, spatial=True)
    for c, i in enumerate(range(0, 18, 3)):
        part, ell, g = rows[i : i + 3], log[i : i + 3], rounded[i : i + 3]
        row_max = torch.nan_to_num(g.flatten(1).amax(1).double(), nan=math.inf)
        host.add_host(part.numpy(), row_max.numpy(), c, 3, c, gain=ell.numpy(), log=True)
        device._add_tensors(part, row_max, c, 3, c, g)
    (a_rows, a_ids), (b_rows, b_ids) = _kept(host), _kept(device)
    assert torch.equal(a_ids[:, :2], b_ids[:, :2]) and torch.equal(a_rows, b_rows)
    assert torch.equal(host._top[1].sort().values, device._top[1].sort().values)
    assert host.info()["largest_gain_kept"] == math.inf


def test_rows_that_fit_and_non_spatial_rows_are_kept_whole_as_before():
    small, gain = _calls(6, 2, seed=4, row=(8, 16, 16))
    spatial, plain = ParamReservoir(BUDGET, salt=1, spatial=True), ParamReservoir(BUDGET, salt=1)
    _feed(spatial, small, gain, k=2, per=2)
    _feed(plain, small, gain, k=2, per=2)
    assert spatial.tiling is None and spatial.info() == plain.info()
    for a, b in zip(spatial.kept(), plain.kept()):
        assert torch.equal(a, b)
    big, gain = _calls(3, 2, seed=5)
    plain = ParamReservoir(BUDGET, salt=1)
    _feed(plain, big, gain, k=2, per=1)
    kept = plain.kept()[0]
    assert plain.tiling is None and kept.shape[1:] == ROW and len(kept) <= 2  # whole rows, one a half, as before


def test_rows_of_another_shape_are_skipped_not_cut():
    rows, gain = _calls(2, 2, seed=6)
    res = ParamReservoir(BUDGET, salt=1, spatial=True)
    _feed(res, rows, gain, k=2, per=2)
    other, g2 = _calls(1, 2, seed=7, row=(8, 37, 44))
    res.add(other, g2.flatten(1).amax(1).double().numpy(), 2, 2, 1, gain=g2)
    info = res.info()
    assert info["rows_seen"] == 4 and info["rows_skipped"] == 2


class _Both:
    """Observer handing every report to two tracers (one pass feeds both)."""

    def __init__(self, *tracers: Tracer):
        self.tracers = tracers

    def layer(self, name, x):
        for t in self.tracers:
            t.layer(name, x)

    def site(self, name, gain, params):
        for t in self.tracers:
            t.site(name, gain, params)


@pytest.mark.parametrize("model", ["sr-affine", "sr-modified-rq-spline"])
def test_the_probe_on_windows_gives_the_verdict_of_whole_rows(model):
    """The bundled SR flows at a size where every row fits a large budget: the probe on the windows a small budget
    keeps says what it says on all whole rows, from a subset of their points."""
    adapter = adapt(load(model))
    sites = adapter.sites()
    sampling = Sampling(2, 0.9, 0)
    spatial = [s.name for s in sites if s.spatial_params]
    assert spatial == [s.name for s in sites]
    every, tiles = Tracer(sampling, 1 << 30, spatial), Tracer(sampling, 512, spatial)
    y = 0.3 + 0.4 * torch.rand((2, *adapter.condition_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # conditions like images: every kept parameter finite
        adapter.sample(sampling.repeat(y), sampling.latents(adapter, y, 0, 0, torch.device("cpu")), _Both(every, tiles))
    every.end_batch(2)
    tiles.end_batch(2)
    picked = [s for s in sites if s.name.endswith(("coupling_site", "injector_site", "prior"))]
    picked = [picked[0], picked[1], picked[-1], next(s for s in sites if s.name.endswith("prior"))]
    verdicts = set()
    for site in picked:
        whole, cut = every.reservoirs[site.name], tiles.reservoirs[site.name]
        assert whole.tiling is None and cut.tiling is not None
        assert cut.info()["points"] <= 512 + math.prod(cut.tiling.unit) < whole.info()["points"]
        assert cut.info()["largest_gain_kept"] == whole.info()["largest_gain_kept"]
        a = measured_evidence(site, every.params[site.name])
        b = measured_evidence(site, tiles.params[site.name])
        assert b["verdict"] == a["verdict"], site.name
        assert b["probe"]["n_points"] < a["probe"]["n_points"]
        assert b["derivative_min"] >= a["derivative_min"] and b["derivative_max"] <= a["derivative_max"]
        assert np.isfinite(b["tail_ratio"]) and b["probe"]["nonfinite_param_rows"] == 0
        verdicts.add(a["verdict"])
    assert verdicts == {"compliant", "violates"}  # both verdicts met, and both kept by the windows


def test_scan_passes_keep_windows_of_spatial_sites_only_where_rows_are_too_large():
    """A scan's tracer marks the reference adapter's sites spatial; with the default budget the bundled SR rows
    fit and are kept whole (the report's figures stay those of whole rows)."""
    adapter = adapt(load("sr-affine"))
    sampling = Sampling(2, 0.9, 0)
    tracer = Tracer(sampling, spatial=[s.name for s in adapter.sites() if s.spatial_params])
    y = torch.rand((1, *adapter.condition_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapter.sample(sampling.repeat(y), sampling.latents(adapter, y, 0, 0, torch.device("cpu")), tracer)
    tracer.end_batch(1)
    assert tracer.reservoirs and all(r.spatial and r.tiling is None for r in tracer.reservoirs.values())
    assert all("tiles" not in tracer.reservoir_info(n) for n in tracer.reservoirs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_windows_on_the_gpu_are_those_of_the_cpu():
    rows, gain = _calls(8, 2, seed=8)
    host = ParamReservoir(BUDGET, salt=9, spatial=True)
    _feed(host, rows, gain, k=2, per=3)
    dev = ParamReservoir(BUDGET, salt=9, spatial=True)
    _feed(dev, rows.cuda(), gain.cuda(), k=2, per=3, host=False)
    a, b = _kept(host), _kept(dev)
    assert torch.equal(a[1][:, :2], b[1][:, :2].cpu()) and torch.equal(a[0], b[0].cpu())
