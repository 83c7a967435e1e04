"""The tracer's fast paths (audit overhead) against their definitions.

* float32 gain bins from the bit tables equal the float64 ``log10`` definition for every float32
  tried (random bit patterns, every bin edge ± 2 patterns, the special values);
* one :func:`~flowaudit.tracing.gains.summarize` read equals the float64 reference path, junk included,
  with and without the CPU's shortcut for gains that are all finite and positive;
* the CPU's compiled loops (:mod:`flowaudit.tracing.host_kernels`) give the tensor operations' figures:
  bins, extremes, per-input figures and kept rows exactly, layer sums to the last bits, junk,
  strided layers, float16 and float64 gains included;
* the CPU reservoir (a heap a half, compiled) keeps the rows the device path keeps, and its keys
  are the device's bits;
* the per-call loop (layers, sites, reservoir) reads nothing back to the host: it runs on the
  ``meta`` device, where any such read raises.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from flowaudit.config.sampling import Sampling
from flowaudit.tracing.binning import GAIN_EDGES, GainBins, _thresholds, bin_index
from flowaudit.tracing.gains import _summarize_reference, settle, settle_inputs, summarize
from flowaudit.tracing.host_kernels import layer_sums, memory_rows
from flowaudit.tracing.layer_stats import LayerStats
from flowaudit.tracing.reservoir import ParamReservoir
from flowaudit.tracing.scratch import Scratch
from flowaudit.tracing.trace import Tracer


@pytest.mark.parametrize("edges", [GAIN_EDGES])
def test_bit_table_bins_equal_the_float64_definition(edges):
    t = torch.from_numpy(_thresholds(edges))
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0, 1, 2, 0xFFFF, 0x10000, 0x3F800000, 0x7F7FFFFF, 0x7F800000, -(2**31), -1])
    bits = torch.cat(
        [torch.randint(-(2**31), 2**31 - 1, (400_000,), generator=g), t - 2, t - 1, t, t + 1, t + 2, special]
    )
    x = torch.nan_to_num(bits.to(torch.int32).view(torch.float32), nan=math.inf, posinf=math.inf, neginf=-math.inf)
    b = x.view(torch.int32)
    got = GainBins(edges, torch.device("cpu")).index(b, ((b >> 16) & 0xFFFF).reshape(-1)).long()
    ok = torch.isfinite(x) & (x > 0)
    want = torch.where(
        ok, bin_index(torch.where(ok, x, torch.ones_like(x)), edges) + 1, torch.where(x > 0, len(edges), 0)
    )
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


def _traced(compiled: bool, passes: list) -> Tracer:
    """A tracer fed ``passes`` of (layer values, gains, params): by the CPU's compiled loops or by tensor operations."""
    tracer = Tracer(Sampling(4, 0.9, 0), param_budget=200, compiled=compiled)
    for x, gain, params in passes:
        tracer.layer("a", x)
        tracer.site("s", gain, params)
        tracer.layer("b", x[:, :2].transpose(1, 2))  # strided
        tracer.site("t", gain[:, :3] * 2, params[:, :5])
        tracer.layer("c", x[:, 0, :5, :5])  # rows of one chunk or less
        tracer.layer("d", x.transpose(0, 1).contiguous().transpose(0, 1))  # channel-major, dense: read where it lies
        tracer.site("u", gain[:, :2].double(), params[:, :3])  # float64 gains: tensor operations in the same pass
        tracer.site("v", gain[:, :1, :7].half(), None)  # float16, widened; no parameter rows
        tracer.end_batch(x.shape[0] // 4)
    return tracer


def _assert_same_figures(compiled: Tracer, tensors: Tracer) -> None:
    _assert_same_figures_of(compiled, tensors, sites=("s", "t", "u", "v"), layers=("a", "b", "c", "d"))


def _assert_same_figures_of(compiled: Tracer, tensors: Tracer, sites: tuple[str, ...], layers: tuple[str, ...]) -> None:
    """Counts, extremes, kept rows, reservoir info and per-input figures equal; layer sums to the last bits."""
    for name in sites:
        a, b = compiled.gains[name].state(), tensors.gains[name].state()
        assert torch.equal(a["counts"], b["counts"]) and torch.equal(a["ext"], b["ext"])
        if name in compiled.reservoirs or name in tensors.reservoirs:
            for u, v in zip(compiled.reservoirs[name].kept(), tensors.reservoirs[name].kept()):
                assert torch.equal(u, v)
            assert compiled.reservoir_info(name) == tensors.reservoir_info(name)
    assert compiled.input_gain == tensors.input_gain
    for name in layers:
        a, b = compiled.layers[name].state(), tensors.layers[name].state()
        assert torch.equal(a[[0, 3, 4]], b[[0, 3, 4]])
        assert torch.allclose(a, b, rtol=1e-13, atol=0)


@pytest.mark.parametrize("junk", [False, True], ids=["clean", "junk"])
def test_compiled_loops_equal_tensor_operations(junk):
    """The CPU's compiled loops give the figures of the tensor operations a device runs: counts, extremes,
    per-input figures and kept rows exactly, layer sums to the last bits (a chunk's sum associates
    differently); with Inf, NaN of either sign, negative, zero and denormal gains and non-finite layer values."""
    g = torch.Generator().manual_seed(5)
    passes = []
    for n in (2, 1, 3, 40):  # inputs per pass
        x = torch.randn(4 * n, 3, 70, 30, generator=g) * 3 + 1
        gain = (torch.randn(4 * n, 6, 10 if n == 40 else 100, generator=g) * 3).exp()
        gain[0, 0, 0] = 1.0
        if junk and n in (1, 3):
            gain[1, 2, 3], gain[2, 0, 0], gain[3, 1, 1] = math.nan, math.inf, -1.0
            gain[0, 0, 1], gain[0, 1, 0], gain[0, 0, 5] = -math.nan, 0.0, -0.0
            gain[2, 1, 2], gain[3, 2, 2] = 1e-45, -math.inf  # a denormal
            gain[-1, 0] = math.nan  # a row of NaN where the float16 site reads
            x[0, 0, 0, 0], x[1, 1, 1, 1], x[2, 0, 3, 3] = math.inf, math.nan, -math.inf
        passes.append((x, gain, torch.randn(4 * n, 12, generator=g)))
    _assert_same_figures(_traced(True, passes), _traced(False, passes))


def test_first_bits_start_each_index_of_the_bit_table():
    """``GainBins.first_bits[c]`` is the smallest float32 at index c: the table puts it at c and the float32 below it at c − 1."""
    bins = GainBins(GAIN_EDGES, torch.device("cpu"))
    first = torch.from_numpy(bins.first_bits[1:].astype(np.int64))
    for bits, want in ((first, torch.arange(1, len(first) + 1)), (first - 1, torch.arange(len(first)))):
        b = bits.to(torch.int32)
        assert torch.equal(bins.index(b, (b >> 16) & 0xFFFF).long(), want)


def test_rows_spanning_few_bins_are_counted_as_every_row():
    """Rows of finite positive gains spanning a few bin indices (counted by compares, not by the table) give the
    figures of the tensor operations: gains at each bin's first bits and just below, rows spanning the most
    indices counted that way and one more, rows of a single bin, beside wide rows and rows with junk."""
    from flowaudit.tracing.host_kernels import _NARROW

    first = GainBins(GAIN_EDGES, torch.device("cpu")).first_bits.astype(np.int64)
    g = torch.Generator().manual_seed(9)
    passes = []
    for n, start in ((1, 200), (3, 150), (2, 330)):  # inputs per pass, the lowest index of its narrow rows
        rows = []
        for r in range(4 * n):
            span = (0, 1, _NARROW, _NARROW + 1, 3, 40)[r % 6]
            lo, hi = first[start + r], first[start + r + span + 1]  # indices start + r … start + r + span
            b = torch.randint(int(lo), int(hi), (6 * 100,), generator=g)
            b[:4] = torch.tensor(
                [lo, hi - 1, first[start + r + span // 2], first[start + r + span // 2] - 1 if span else lo]
            )
            rows.append(b.to(torch.int32).view(torch.float32))
        gain = torch.stack(rows).reshape(4 * n, 6, 100)
        if n == 3:
            gain[5, 0, 0], gain[9, 1, 1] = math.inf, -math.nan  # a NaN with the sign bit in an input without +inf
        passes.append((torch.randn(4 * n, 3, 70, 30, generator=g), gain, torch.randn(4 * n, 12, generator=g)))
    _assert_same_figures(_traced(True, passes), _traced(False, passes))


def test_rows_that_repeat_their_input_s_first_count_as_it():
    """Rows equal bit for bit to their input's first row (a site whose parameters come from the condition alone)
    are counted as that row without being binned again: the figures of the tensor operations, also where only some
    rows repeat, where the first repeat comes late, and where the repeated row holds Inf, NaN of either sign and 0."""
    g = torch.Generator().manual_seed(6)
    passes = []
    for n in (1, 4):
        x = torch.randn(4 * n, 3, 70, 30, generator=g)
        gain = (torch.randn(n, 1, 6, 100, generator=g) * 3).exp().repeat(1, 4, 1, 1)  # every row repeats the first
        if n == 4:
            gain[1, 2] *= 1.5  # the third row differs
            gain[2, 1] *= 2  # the second differs: the third and fourth, equal to the first, are binned
            gain[3, :, 0, :4] = torch.tensor([math.inf, math.nan, -math.nan, 0.0])  # a repeated row of junk
        passes.append((x, gain.reshape(4 * n, 6, 100), torch.randn(4 * n, 12, generator=g)))
    _assert_same_figures(_traced(True, passes), _traced(False, passes))


def test_repeated_rows_add_their_first_row_s_counts_only():
    """An input whose first row repeats and whose other rows reach bins the first row does not: the repeats add the
    first row's counts there and nothing at the other bins, also after an input whose first row filled those."""
    first = GainBins(GAIN_EDGES, torch.device("cpu")).first_bits.astype(np.int64)
    g = torch.Generator().manual_seed(10)

    def row(index: int) -> torch.Tensor:  # 600 gains within bin indices index … index + 3
        return (
            torch.randint(int(first[index]), int(first[index + 4]), (600,), generator=g)
            .to(torch.int32)
            .view(torch.float32)
        )

    wide, narrow = row(300), row(100)
    rows = [wide] * 4 + [narrow, narrow, row(298), narrow]  # input 0 repeats a row at 300…303; input 1 reaches 298…301
    passes = [
        (torch.randn(8, 3, 70, 30, generator=g), torch.stack(rows).reshape(8, 6, 100), torch.randn(8, 12, generator=g))
    ]
    _assert_same_figures(_traced(True, passes), _traced(False, passes))


def test_calls_that_are_not_whole_inputs_count_as_one_input_everywhere():
    """A call whose rows are not whole inputs (32 rows, K = 12; 5 rows, K = 12) is one input for layers and sites,
    on the CPU's compiled loops as in the tensor operations: the same figures, its extremes charged to every input
    of the pass, its layer sums those of one input."""
    g = torch.Generator().manual_seed(8)
    odd = {
        "layer": torch.randn(32, 50, generator=g) * 1e3,
        "gain": (torch.randn(32, 9, generator=g) * 3).exp(),
        "short": (torch.randn(5, 9, generator=g) * 3).exp(),
    }
    whole = (torch.randn(36, 4, generator=g) * 2).exp()

    def traced(compiled: bool) -> Tracer:
        tracer = Tracer(Sampling(12, 0.9, 0), param_budget=100, compiled=compiled)
        tracer.site("whole", whole, torch.randn(36, 3, generator=torch.Generator().manual_seed(1)))
        tracer.site("odd", odd["gain"], torch.randn(32, 3, generator=torch.Generator().manual_seed(2)))
        tracer.site("short", odd["short"], None)
        tracer.layer("odd", odd["layer"])
        tracer.end_batch(3)
        return tracer

    compiled, tensors = traced(True), traced(False)
    _assert_same_figures_of(compiled, tensors, sites=("whole", "odd", "short"), layers=("odd",))
    one = LayerStats()
    one.add(odd["layer"], 1)
    assert torch.allclose(compiled.layers["odd"].state(), one.state(), rtol=1e-13, atol=0)
    top = max(float(odd["gain"].max()), float(odd["short"].max()))
    assert [f["max"] for f in compiled.input_gain] == [max(top, float(w.max())) for w in whole.view(3, -1)]


def test_a_channel_major_layer_is_read_where_it_lies_the_same_bits_in_any_batch():
    """A dense view in another order (a Glow step's channel-major output) is read in memory order with no copy,
    as rows of every input's piece; an input's sums are the same bits in an exact pass (K rows) and in a batched
    one (8 inputs), and equal the logical order's to the last bits. An expanded view and one row an input are
    copied and read in logical order."""
    g = torch.Generator().manual_seed(11)
    k, n = 8, 5
    batch = torch.randn(12, n * k, 4, 6, generator=g) * torch.randn(12, n * k, 4, 6, generator=g).mul(12).exp()
    batch = batch.transpose(
        0, 1
    )  # (40, 12, 4, 6), channel-major; magnitudes far apart, so that the order of a sum shows
    batch[3, 2, 1, 1], batch[17, 0, 0, 5] = math.inf, math.nan
    v = batch.numpy()
    flat, rows = memory_rows(v, n)
    assert rows == 12 and np.shares_memory(flat, v)
    conv = np.zeros(2, dtype=np.int32)
    batched = np.zeros(5)
    layer_sums(flat, flat.view(np.int32), rows, n, batched, conv, conv.view(np.float32))
    exact = np.zeros(5)
    for i in range(n):  # each input's pass hands over its own channel-major tensor
        one = batch[i * k : (i + 1) * k].transpose(0, 1).contiguous().transpose(0, 1).numpy()
        f, r = memory_rows(one, 1)
        assert r == 12 and np.shares_memory(f, one)
        layer_sums(f, f.view(np.int32), r, 1, exact, conv, conv.view(np.float32))
    assert np.array_equal(batched, exact)
    logical = LayerStats()
    logical.add(batch.contiguous(), n)
    assert np.array_equal(batched[[0, 3, 4]], logical.state().numpy()[[0, 3, 4]]) and batched[4] == 2
    assert np.allclose(batched, logical.state().numpy(), rtol=1e-13, atol=0)
    for odd in (
        torch.randn(12, 1, 4, generator=g).expand(12, 40, 4).transpose(0, 1),  # 5 inputs of 8 rows, expanded
        torch.randn(12, n, 4, generator=g).transpose(0, 1),
    ):  # 5 inputs of 1 row, dense channel-major
        f, r = memory_rows(odd.numpy(), n)
        assert r == 1 and np.array_equal(f, odd.contiguous().numpy().reshape(-1))


def test_a_scalar_layer_output_is_one_value():
    tracer = Tracer(Sampling(4, 0.9, 0))
    tracer.layer("scalar", torch.tensor(-3.0))
    assert tracer.layers["scalar"].to_dict() == {"variance": 0.0, "max_abs": 3.0, "n_nonfinite": 0, "n_values": 1}


def test_compiled_bins_equal_the_definition():
    """Every gain's bin from the compiled loop is :func:`bin_index`'s: every bin edge ± 2 bit patterns, gains
    beyond both ends, denormals."""
    edges = torch.from_numpy(_thresholds(GAIN_EDGES))[:, None] + torch.arange(-2, 3)  # every bin edge ± 2 patterns
    g = torch.cat(
        [
            torch.logspace(-6, 10, 19_950),
            torch.tensor([1.0, 10.0, 1e-4, 1e8, 3.4e38, 1e-45, 1e-40]),
            edges.reshape(-1).to(torch.int32).view(torch.float32),
        ]
    )
    g = g[: len(g) // 5 * 5].reshape(5, -1)
    tracer = Tracer(Sampling(5, 0.9, 0))
    tracer.site("s", g, None)
    want = torch.bincount(bin_index(g.reshape(-1).double(), GAIN_EDGES), minlength=len(GAIN_EDGES) - 1)
    assert torch.equal(tracer.gains["s"].state()["counts"], want)


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int32])
def test_cpu_reservoir_keeps_rows_of_any_dtype(dtype):
    """Rows the compiled loop cannot copy as they are (numba has no 16-bit floats) are kept widened, exactly:
    the same rows and values as the device path, in float32 (narrow floats) or float64 (the rest)."""
    rows = (torch.randn(40, 5, generator=torch.Generator().manual_seed(3)) * 5).to(dtype)
    gain = torch.rand(40, generator=torch.Generator().manual_seed(4)).double()
    host, device = ParamReservoir(40, salt=3), ParamReservoir(40, salt=3)
    for i in range(0, 40, 8):
        host.add(rows[i : i + 8], gain[i : i + 8], i // 4, 4, i // 8)
        device._add_device(rows[i : i + 8], gain[i : i + 8], i // 4, 4, i // 8)
    (a, ids), (b, ids_device) = host.kept(), device.kept()
    assert torch.equal(ids, ids_device) and torch.equal(a.double(), b.double())
    assert a.dtype == (dtype if dtype == torch.float64 else torch.float32 if dtype.is_floating_point else torch.float64)


def test_rows_of_another_shape_are_counted_not_kept():
    """On the CPU, rows whose shape differs from the rows kept are counted as skipped and never mixed in: the kept
    rows are those of the right-shaped rows alone, also when the CPU's halves start from rows a device path kept."""
    g = torch.Generator().manual_seed(5)
    rows, other = torch.randn(16, 5, generator=g), torch.randn(8, 3, generator=g)
    gain = torch.rand(16, generator=g).double()
    host, alone, mixed = (ParamReservoir(40, salt=2) for _ in range(3))
    host.add(rows[:8], gain[:8], 0, 4, 0)
    host.add(other, gain[:8], 2, 4, 1)
    host.add(rows[8:], gain[8:], 4, 4, 2)
    alone.add(rows[:8], gain[:8], 0, 4, 0)
    alone.add(rows[8:], gain[8:], 4, 4, 2)
    mixed._add_device(rows[:8], gain[:8], 0, 4, 0)
    mixed.add(other, gain[:8], 2, 4, 1)  # the CPU's halves start from the device path's rows: other's are skipped
    assert host.skipped == mixed.skipped == 8 and alone.skipped == 0
    assert host.rows_seen == alone.rows_seen == 16 and mixed.rows_seen == 8
    for a, b in zip(host.kept(), alone.kept()):
        assert torch.equal(a, b)
    assert mixed.kept()[0].shape[1:] == (5,)


def test_reservoir_keys_on_the_host_equal_the_device_keys():
    from flowaudit.tracing.host_kernels import salt_mix, split_mix
    from flowaudit.tracing.reservoir import uniform_keys

    for salt in (0, 7, -5 * 1_000_003, 2**40 + 3):
        host = [split_mix(salt_mix(salt), r) for r in range(1000, 1300)]
        assert uniform_keys(torch.arange(1000, 1300), salt).tolist() == host


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
    from flowaudit.tracing.binning import INPUT_EDGES, histogram_quantile, histogram_quantiles

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=(300, 120)) * (rng.random((300, 120)) < 0.1)
    counts[0], counts[1, 5], counts[2, -1], counts[3, 0] = 0, 7, 3, 1  # empty, one bin, the end bins
    for q in (0.0, 0.5, 0.99, 1.0):
        assert np.array_equal(
            histogram_quantiles(counts, INPUT_EDGES, q), [histogram_quantile(c, INPUT_EDGES, q) for c in counts]
        )


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


def test_layer_sums_read_runs_of_non_finite_chunks_as_chunk_by_chunk():
    """After a chunk holding Inf or NaN the next is read masked first: every chunk's sums stay those of the loop
    that fits it (plain where finite, masked where not), the same bits as summing the chunks one call each, for
    runs of bad chunks, single ones and a finite chunk between them."""
    g = torch.Generator().manual_seed(5)
    chunk = 4096
    pattern = [False, True, True, False, True, False, False, True, True, True, False]  # chunk holds Inf/NaN
    x = (torch.randn(len(pattern) * chunk, generator=g) * torch.randn(len(pattern) * chunk, generator=g).exp()).numpy()
    for c, bad in enumerate(pattern):
        if bad:
            x[c * chunk + (c * 37) % chunk] = math.inf if c % 2 else math.nan
    x[-1] = -math.inf  # the last chunk's last value too
    conv = np.zeros(2, dtype=np.int32)
    whole = np.zeros(5)
    layer_sums(x, x.view(np.int32), 1, 1, whole, conv, conv.view(np.float32))
    parts = []
    for c in range(len(pattern)):  # one chunk a call: no chunk before it, so each is read by its own loop
        one = np.zeros(5)
        piece = x[c * chunk : (c + 1) * chunk]
        layer_sums(piece, piece.view(np.int32), 1, 1, one, conv, conv.view(np.float32))
        parts.append(one)
    s = q = 0.0
    for p in parts:  # the loop's own order: chunk sums added one after another
        s += p[1]
        q += p[2]
    assert whole[1] == s and whole[2] == q
    assert whole[0] == sum(p[0] for p in parts) and whole[4] == sum(p[4] for p in parts) == sum(pattern) + 1
    assert whole[3] == max(p[3] for p in parts) == math.inf
