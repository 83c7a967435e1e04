"""The tracer's fast paths (issue 12, audit overhead) against their definitions.

* float32 gain bins from the bit tables equal the float64 ``log10`` definition for every float32
  tried (random bit patterns, every bin edge ± 2 patterns, the special values);
* one :func:`~flowaudit.gains.summarize` read equals the float64 reference path, junk included,
  with and without the CPU's shortcut for gains that are all finite and positive;
* a layer's statistics on the CPU's all-finite path equal the general path's, strided input too;
* the CPU reservoir (selection in numpy) keeps the rows the device path keeps;
* the per-call loop (layers, sites, reservoir) reads nothing back to the host: it runs on the
  ``meta`` device, where any such read raises.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowaudit.binning import GAIN_EDGES, GainBins, _thresholds, bin_index, high_bits
from flowaudit.gains import _summarize_reference, settle, settle_inputs, summarize
from flowaudit.layout import Sampling
from flowaudit.reservoir import ParamReservoir
from flowaudit.scratch import Scratch
from flowaudit.trace import Tracer


@pytest.mark.parametrize("edges", [GAIN_EDGES])
def test_bit_table_bins_equal_the_float64_definition(edges):
    t = torch.from_numpy(_thresholds(edges))
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0, 1, 2, 0xFFFF, 0x10000, 0x3F800000, 0x7F7FFFFF, 0x7F800000, -(2**31), -1])
    bits = torch.cat([torch.randint(-(2**31), 2**31 - 1, (400_000,), generator=g), t - 2, t - 1, t, t + 1, t + 2, special])
    x = torch.nan_to_num(bits.to(torch.int32).view(torch.float32), nan=math.inf, posinf=math.inf, neginf=-math.inf)
    b = x.view(torch.int32)
    got = GainBins(edges, torch.device("cpu")).index(b, high_bits(b)).long()
    ok = torch.isfinite(x) & (x > 0)
    want = torch.where(ok, bin_index(torch.where(ok, x, torch.ones_like(x)), edges) + 1, torch.where(x > 0, len(edges), 0))
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(16, 300), (8, 4100), (4, 1)])
@pytest.mark.parametrize("special", [True, False], ids=["junk", "clean"])
def test_summarize_equals_the_reference_path(shape, special):
    g = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 4).exp()
    g[0, -1] = 1.0  # a power of ten: the bin it starts, in both histograms
    if special:
        g[0, 0], g[1, 0], g[2, 0], g[3, 0] = math.nan, math.inf, 0.0, -2.0
        g[-1, -1] = -0.0
    fast, ref = summarize(g, 4, Scratch()), _summarize_reference(g, 4)
    counts, ext = settle(*fast.raw)
    assert torch.equal(counts, ref.counts) and torch.equal(ext, ref.ext)
    assert torch.equal(settle_inputs(fast.input_counts), ref.input_counts)
    for k in ("row_max", "input_max", "input_min"):
        assert torch.equal(getattr(fast, k), getattr(ref, k)), k


def test_input_bins_are_four_site_bins():
    """Per input, a coarse bin is four site bins: 1.0 lies in [1, 10^0.1), not in the bin below it."""
    g = torch.tensor([[0.999, 1.0, 1.2, 1.26, 10.0, 1e-5, 2e8]])
    ref = _summarize_reference(g, 1)
    site = bin_index(g.double(), GAIN_EDGES)[0]
    assert torch.equal(ref.input_counts[0].nonzero()[:, 0], torch.unique(site // 4))
    assert int(ref.input_counts[0, 40]) == 2 and int(ref.input_counts[0, 39]) == 1  # 1.0 and 1.2 in [1, 1.259)


def _traced(pass_buffer: bool, passes: list, monkeypatch) -> Tracer:
    """A tracer fed ``passes`` of (layer values, gains, params): through the CPU's pass buffer or call by call."""
    from flowaudit.pass_buffer import PassBuffer

    with monkeypatch.context() as m:
        if not pass_buffer:
            m.setattr(PassBuffer, "takes", staticmethod(lambda t: False))
        tracer = Tracer(Sampling(4, 0.9, 0), param_budget=200)
        for i, (x, gain, params) in enumerate(passes):
            tracer.layer("a", x)
            tracer.site("s", gain, params)
            tracer.layer("b", x[:, :2].transpose(1, 2))  # strided
            tracer.site("t", gain[:, :3] * 2, params[:, :5])
            tracer.layer("c", x[:, 0, :5, :5])  # rows of one chunk or less
            tracer.site("u", gain[:, :2].double(), params[:, :3])  # float64 gains: call by call in the same pass
            tracer.end_batch(x.shape[0] // 4)
        tracer.state()  # flushes
    return tracer


def _assert_same_figures(buffered: Tracer, by_call: Tracer) -> None:
    """Counts, extremes, kept rows, reservoir info and per-input figures equal; layer sums to the last bit or two."""
    for name in ("s", "t", "u"):
        a, b = buffered.gains[name].state(), by_call.gains[name].state()
        assert torch.equal(a["counts"], b["counts"]) and torch.equal(a["ext"], b["ext"])
        for u, v in zip(buffered.reservoirs[name].kept(), by_call.reservoirs[name].kept()):
            assert torch.equal(u, v)
        assert buffered.reservoir_info(name) == by_call.reservoir_info(name)
    assert buffered.input_gain == by_call.input_gain
    for name in ("a", "b", "c"):
        a, b = buffered.layers[name].state(), by_call.layers[name].state()
        assert torch.equal(a[[0, 3, 4]], b[[0, 3, 4]])
        assert torch.allclose(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("capacity", [None, 10_000], ids=["whole-pass", "in-parts"])
@pytest.mark.parametrize("junk", [False, True], ids=["clean", "junk"])
def test_pass_buffer_equals_call_by_call(junk, capacity, monkeypatch):
    """The CPU's pass buffer gives the figures of the call-by-call path: counts, extremes and kept rows
    exactly, layer sums to the last bit or two (the last association of a row's sum differs); also
    when a small capacity makes it summarize a pass in parts."""
    if capacity is not None:
        monkeypatch.setattr("flowaudit.pass_buffer.CAPACITY", capacity)
    g = torch.Generator().manual_seed(5)
    passes = []
    for n in (2, 1, 3, 40):  # inputs per pass (40: more count bins than gains, the inputs counted apart)
        x = torch.randn(4 * n, 3, 70, 30, generator=g) * 3 + 1
        gain = (torch.randn(4 * n, 6, 10 if n == 40 else 100, generator=g) * 3).exp()  # n = 40: fewer gains than bins
        gain[0, 0, 0] = 1.0
        if junk and n == 1:
            gain[1, 2, 3], gain[2, 0, 0], gain[3, 1, 1] = math.nan, math.inf, -1.0
            x[0, 0, 0, 0], x[1, 1, 1, 1] = math.inf, math.nan
        passes.append((x, gain, torch.randn(4 * n, 12, generator=g)))
    _assert_same_figures(_traced(True, passes, monkeypatch), _traced(False, passes, monkeypatch))


@pytest.mark.parametrize("capacity", [None, 500_000, 250_000, 100_000], ids=["one-part", "two-passes", "pass-by-pass", "in-parts"])
def test_pass_buffer_reusing_its_layout_equals_call_by_call(capacity, monkeypatch):
    """Passes that repeat a layout reuse the buffer's views (its plan) and are summarized a few at a
    time; layouts that change midway (another number of inputs, then the first again) make it anew.
    Every figure equals the call-by-call path's, with the buffer holding all passes, two, one, or parts
    of one (~200 kB a pass of two inputs); the reservoir sees rows of several passes at once and keeps
    the same rows."""
    from flowaudit.pass_buffer import PassBuffer

    if capacity is not None:
        monkeypatch.setattr("flowaudit.pass_buffer.CAPACITY", capacity)
    made = []
    for new in ("_new_site", "_new_layer"):  # count the calls whose place is made anew (not taken from the plan)
        monkeypatch.setattr(PassBuffer, new, lambda self, *a, _f=getattr(PassBuffer, new): made.append(1) or _f(self, *a))
    g = torch.Generator().manual_seed(11)
    passes = []
    for n in (2, 2, 2, 2, 3, 3, 2, 2, 2, 1):
        x = torch.randn(4 * n, 3, 32, 32, generator=g)
        gain = (torch.randn(4 * n, 6, 100, generator=g) * 2).exp()
        passes.append((x, gain, torch.randn(4 * n, 12, generator=g)))
    buffered = _traced(True, passes, monkeypatch)
    if capacity in (500_000, 250_000):  # the plan was reused: fewer places made than the 50 buffered calls
        assert len(made) < 50
    _assert_same_figures(buffered, _traced(False, passes, monkeypatch))
    assert len(buffered.input_gain) == 21


def test_pass_buffer_holds_passes_until_read():
    """Passes are summarized a few at a time on the CPU, but every reading (input figures, layers,
    gains, kept rows, state) sees all the passes ended so far."""
    tracer = Tracer(Sampling(4, 0.9, 0))
    g = torch.Generator().manual_seed(2)
    for i in range(3):
        tracer.layer("a", torch.randn(4, 3, 8, 8, generator=g))
        tracer.site("s", torch.rand(4, 6, generator=g) + 0.5, torch.randn(4, 12, generator=g))
        tracer.end_batch(1)
        assert len(tracer._ended) == i + 1  # held, not summarized
    assert len(tracer.input_gain) == 3 and not tracer._ended
    assert int(tracer.layers["a"].state()[0]) == 3 * 4 * 3 * 64
    assert tracer.reservoir_info("s")["rows_seen"] == 12


@pytest.mark.parametrize("order", ["later", "earlier"])
@pytest.mark.parametrize("per", [4, 8, 28])
def test_cpu_reservoir_keeps_the_rows_the_device_path_keeps(per, order):
    """Ties go to the smaller row id: rows coming after the kept ones lose them, rows coming before win them."""
    rows = torch.randn(120, 5, generator=torch.Generator().manual_seed(3))
    gain = torch.rand(120, generator=torch.Generator().manual_seed(4)).double().round(decimals=1)  # ties
    host, device = ParamReservoir(40, salt=7), ParamReservoir(40, salt=7)
    starts = range(0, 120, per)
    for i in starts if order == "later" else reversed(starts):
        host.add(rows[i : i + per], gain[i : i + per], i // 4, 4, i // per)
        device._add_device(rows[i : i + per], gain[i : i + per], i // 4, 4, i // per)
    for a, b in zip(host.kept(), device.kept()):
        assert torch.equal(a, b)
    assert host.info() == device.info()


def test_reservoir_keys_on_the_host_equal_the_device_keys():
    from flowaudit.reservoir import uniform_keys, uniform_keys_host

    for salt in (0, 7, -5 * 1_000_003, 2**40 + 3):
        assert np.array_equal(uniform_keys(torch.arange(1000, 3000), salt).numpy(), uniform_keys_host(1000, 2000, salt))


def test_reservoir_in_order_fast_path_keeps_the_general_order():
    rows = torch.randn(120, 5, generator=torch.Generator().manual_seed(3))
    gain = torch.rand(120, generator=torch.Generator().manual_seed(4)).double().round(decimals=1)  # ties
    fast, general = ParamReservoir(40, salt=7), ParamReservoir(40, salt=7)
    for i in range(0, 120, 8):  # the device path, run here on the CPU
        fast._add_device(rows[i : i + 8], gain[i : i + 8], i // 4, 4, i // 8)
        general._next_id = None  # force the (score, id) sort
        general._add_device(rows[i : i + 8], gain[i : i + 8], i // 4, 4, i // 8)
    for a, b in zip(fast._top + fast._rand, general._top + general._rand):
        assert torch.equal(a, b)


def test_tracer_loop_reads_nothing_back_to_the_host():
    tracer = Tracer(Sampling(4, 0.9, 0))
    for _ in range(3):
        tracer.layer("layer", torch.empty(16, 3, 8, 8, device="meta"))
        tracer.site("site", torch.empty(16, 6, 4, 4, device="meta"), torch.empty(16, 12, 4, 4, device="meta"))
    assert tracer.reservoirs["site"].rows_seen == 48


def test_per_input_quantiles_equal_the_one_row_definition():
    from flowaudit.binning import INPUT_EDGES, histogram_quantile, histogram_quantiles

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=(300, 120)) * (rng.random((300, 120)) < 0.1)
    counts[0], counts[1, 5], counts[2, -1], counts[3, 0] = 0, 7, 3, 1  # empty, one bin, the end bins
    for q in (0.0, 0.5, 0.99, 1.0):
        assert np.array_equal(histogram_quantiles(counts, INPUT_EDGES, q), [histogram_quantile(c, INPUT_EDGES, q) for c in counts])


def test_reservoir_state_holds_only_the_kept_rows():
    """A half with free slots hands over copies of what it holds, so a saved state carries no unused slots."""
    r = ParamReservoir(400, salt=7)  # 400 / 5 numbers a row: 40 + 40 slots, 12 rows offered
    r.add(torch.randn(12, 5), np.arange(12.0), 0, 4, 0)
    for rows, _, _ in (r.state()["top"], r.state()["rand"]):
        assert len(rows) == 12 and rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()


def test_rows_without_one_gain_each_are_offered_at_gain_zero():
    """A call whose gains do not give one largest gain per parameter row offers its rows at gain 0, on the host as on a device."""
    rows = torch.randn(12, 5, generator=torch.Generator().manual_seed(5))
    host, device = ParamReservoir(400, salt=7), ParamReservoir(400, salt=7)
    for r in (host, device):
        r.add(rows[:4], np.array([3.0, 2.0, 1.0, 0.5]), 0, 4, 0)
    host.add(rows[4:], np.array([9.0, 9.0]), 1, 4, 1)  # 2 gains for 8 rows
    device._add_device(rows[4:], torch.tensor([9.0, 9.0], dtype=torch.float64), 1, 4, 1)
    assert host.state()["top"][1].tolist() == [3.0, 2.0, 1.0, 0.5] + [0.0] * 8
    for a, b in zip(host.kept(), device.kept()):
        assert torch.equal(a, b)
