"""The tracer's fast paths (issue 12, audit overhead) against their definitions.

* float32 gain bins from the bit tables equal the float64 ``log10`` definition for every float32
  tried (random bit patterns, every bin edge ± 2 patterns, the special values);
* one :func:`~flowaudit.gains.summarize` read equals the float64 reference path, junk included;
* the per-call loop (layers, sites, reservoir) reads nothing back to the host: it runs on the
  ``meta`` device, where any such read raises.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowaudit.binning import GAIN_EDGES, INPUT_EDGES, GainBins, _thresholds, bin_index, high_bits
from flowaudit.gains import _summarize_reference, settle, settle_inputs, summarize
from flowaudit.layout import Sampling
from flowaudit.reservoir import ParamReservoir
from flowaudit.scratch import Scratch
from flowaudit.trace import Tracer


@pytest.mark.parametrize("edges", [GAIN_EDGES, INPUT_EDGES], ids=["site", "input"])
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
def test_summarize_equals_the_reference_path(shape):
    g = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 4).exp()
    g[0, 0], g[1, 0], g[2, 0], g[3, 0] = math.nan, math.inf, 0.0, -2.0
    g[-1, -1] = -0.0
    fast, ref = summarize(g, 4, Scratch()), _summarize_reference(g, 4)
    counts, ext = settle(*fast.raw)
    assert torch.equal(counts, ref.counts) and torch.equal(ext, ref.ext)
    assert torch.equal(settle_inputs(fast.input_counts), ref.input_counts)
    for k in ("row_max", "input_max", "input_min"):
        assert torch.equal(getattr(fast, k), getattr(ref, k)), k


def test_reservoir_in_order_fast_path_keeps_the_general_order():
    rows = torch.randn(120, 5, generator=torch.Generator().manual_seed(3))
    gain = torch.rand(120, generator=torch.Generator().manual_seed(4)).double().round(decimals=1)  # ties
    fast, general = ParamReservoir(40, salt=7), ParamReservoir(40, salt=7)
    for i in range(0, 120, 8):
        fast.add(rows[i : i + 8], gain[i : i + 8], i // 4, 4, i // 8)
        general._next_id = None  # force the (score, id) sort
        general.add(rows[i : i + 8], gain[i : i + 8], i // 4, 4, i // 8)
    for a, b in zip(fast._top + fast._rand, general._top + general._rand):
        assert torch.equal(a, b)


def test_tracer_loop_reads_nothing_back_to_the_host():
    tracer = Tracer(Sampling(4, 0.9, 0))
    for _ in range(3):
        tracer.layer("layer", torch.empty(16, 3, 8, 8, device="meta"))
        tracer.site("site", torch.empty(16, 6, 4, 4, device="meta"), torch.empty(16, 12, 4, 4, device="meta"))
    assert tracer.reservoirs["site"].rows_seen == 48
