"""Determinism: the same seed gives the same report.json for any batch size, thread count and resume.

Reports are compared whole, except ``created`` and the settings that describe the machine or the
course of the run (:data:`flowaudit.runs.runner.RUN_FACTS`: batch size, memory budget, peak RSS, ranks,
resumed shards). Exact passes (the default: one input's K samples per inverse pass) make the
model's float32 arithmetic independent of the batch; the engine's float64 sums are folded input by
input and merged shard by shard. Thread counts: a 1-ulp difference of the toy at 1 vs 2 threads,
seen once on a loaded machine and put down to MKL's sgemm, did not reproduce since (1, 2, 3, 4
and 8 threads, idle and with both cores busy, ``MKL_DYNAMIC`` on and off: identical reports), so
the tests below ask for identical reports.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from flowaudit.adapters import load_model
from runs import strip_run_facts

import flowaudit
from flowaudit.runs.runner import Context
from flowaudit.tracing.layer_stats import LayerStats, _row_sums
from flowaudit.tracing.reservoir import ParamReservoir


def _toy_sets():
    from flowaudit.reference_models.toy import toy_data

    return toy_data(300, seed=0)[1], toy_data(40, seed=10_001)[1], toy_data(20, seed=10_001, ood=True)[1]


def _result(report) -> dict:
    return strip_run_facts(json.loads(report.to_json()))


def _toy_scan(threads: int = 1, **kw) -> dict:
    fit, y, ood = _toy_sets()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _result(
            flowaudit.scan(load_model("toy-affine"), y, ood=ood, fit_data=fit, samples=4, seed=3, device="cpu", **kw)
        )
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_reference() -> dict:
    return _toy_scan(batch_size=4 * 40)  # all inputs in one batch


@pytest.mark.parametrize("inputs", [1, 3])
def test_toy_any_batch_size(toy_reference, inputs):
    assert _toy_scan(batch_size=4 * inputs) == toy_reference


def test_toy_resume_after_an_interruption(toy_reference, tmp_path, monkeypatch):
    import flowaudit.runs.runner as runner

    work, calls = tmp_path / ".out.work", []
    real = runner.sample_range

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second shard of the in-distribution set
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(runner, "sample_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _toy_scan(batch_size=8, context=Context(work_dir=work))
    monkeypatch.setattr(runner, "sample_range", real)
    names = ["fit-00000.npz", "fit.fold.npz", "in-00000.npz", "in.fold.npz"]
    assert sorted(f.name for f in work.glob("*.npz")) == names
    ctx = Context(work_dir=work, resume=True)
    assert _toy_scan(batch_size=12, context=ctx) == toy_reference
    assert ctx.work.resumed == 2  # the fit shard and the first scan shard were read back, not computed


@pytest.mark.parametrize("threads", [2, 3])
def test_toy_any_thread_count(toy_reference, threads):
    assert _toy_scan(threads=threads) == toy_reference


@pytest.fixture(scope="module")
def sr_sets():
    from flowaudit.demo import demo_sets

    fit, test, ood = demo_sets("sr")[:3]
    return fit.y[:8], test.y[:5], ood.y[:3]


def _sr_scan(sr_sets, threads=1, **kw) -> dict:
    fit, y, ood = sr_sets
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _result(
            flowaudit.scan(load_model("sr-affine"), y, ood=ood, fit_data=fit, samples=2, seed=1, device="cpu", **kw)
        )
    finally:
        torch.set_num_threads(before)


def test_sr_batch_sizes_and_threads(sr_sets):
    """A small SR conv model, exact passes: the same report for 1 / 3 / all inputs per batch, and 2 threads.

    Batch sizes give the same bits. Two threads may split a convolution's reduction differently on some CPUs
    (oneDNN picks its blocking per thread count), so there the figures agree to float32 rounding only.
    """
    ref = _sr_scan(sr_sets, batch_size=2 * 8)
    assert _sr_scan(sr_sets, batch_size=2) == ref
    _floats_close(_sr_scan(sr_sets, batch_size=2 * 3, threads=2), ref, rel=1e-6)


def _floats_close(a, b, path="", rel=1e-6):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _floats_close(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _floats_close(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, float):
        # a spread of K values near each other (LR-PSNR's std over samples) loses the relative digits its
        # inputs share: float32 rounding of a 30 dB PSNR is ~1e-6 dB absolute
        small = 1e-5 if path.endswith("_std") else 1e-12
        assert math.isclose(a, b, rel_tol=rel, abs_tol=small) or (math.isnan(a) and math.isnan(b)), (
            f"{path}: {a} vs {b}"
        )
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_sr_batched_passes_residual(sr_sets):
    """Batched passes promise no bits: a pass of n inputs runs the RRDB encoder on n rows (each input
    encoded once), and its convolutions round differently for other batch sizes. Counts agree exactly,
    figures to float32 rounding."""
    a, b = (_sr_scan(sr_sets, batch_size=2 * n, exact=False) for n in (1, 3))
    for key in ("layers", "inputs", "ood"):
        _floats_close(a[key], b[key], key, rel=1e-5)


# -- the pieces ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [5, 4096, 4097, 40_000, 300_000])
def test_row_sums_do_not_depend_on_rows_or_threads(m):
    g = torch.Generator().manual_seed(m)
    v = torch.randn(6, m, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, m, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(torch.cat([_row_sums(v[i : i + 1]) for i in range(6)]))
            out.append(_row_sums(v))
            out.append(torch.cat([_row_sums(v[:3]), _row_sums(v[3:])]))
    finally:
        torch.set_num_threads(before)
    for o in out[1:]:
        assert torch.equal(o, out[0])
    assert torch.allclose(out[0], v.sum(1), rtol=1e-12)


def test_layer_stats_fold_per_input_and_merge_in_order():
    x = torch.randn(12, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 1e3
    x[4, 0, 0, 0] = float("inf")
    one = LayerStats()
    one.add(x, 4)
    parts = [LayerStats(), LayerStats()]
    parts[0].add(x[:3], 1)
    parts[0].add(x[3:6], 1)
    parts[1].add(x[6:], 2)
    merged = LayerStats.from_state(parts[0].state()).merge(LayerStats.from_state(parts[1].state()))
    assert torch.equal(merged.state(), one.state())
    assert one.n_nonfinite == 1


def test_reservoir_keeps_the_same_rows_however_rows_arrive():
    rows = torch.randn(60, 3, generator=torch.Generator().manual_seed(1))
    gain = torch.rand(60, generator=torch.Generator().manual_seed(2)).double().round(decimals=1)  # ties
    whole = ParamReservoir(12, salt=5)
    whole.add(rows, gain, 0, 4, 0)
    split = [ParamReservoir(12, salt=5) for _ in range(3)]
    for k, r in enumerate(split):
        for a in range(k * 20, k * 20 + 20, 4):  # one input (4 rows) per call
            r.add(rows[a : a + 4], gain[a : a + 4], a // 4, 4, a // 4)
    merged = split[0]
    for r in split[1:]:
        merged.merge(ParamReservoir.from_state(r.state()))
    a, b = whole.kept(), merged.kept()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][:, :2], b[1][:, :2])
    assert merged.rows_seen == whole.rows_seen == 60
