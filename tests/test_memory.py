"""The memory budget: sizes, the batch a budget allows, the probe that counts a pass's tensors,
and the command line's answer to a budget too small."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flowaudit.adapters import load_model

from flowaudit.cli.main import cli
from flowaudit.config.sampling import Sampling
from flowaudit.errors import AuditError
from flowaudit.runs.memory import LiveTensors, batch_for, parse_size, pass_bytes, probe_pass
from flowaudit.runs.passes import spatial_sites
from flowaudit.tracing.trace import Tracer


@pytest.mark.parametrize(
    "text, size",
    [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", 1_500_000_000), ("300", 300), (" 4 kb ", 4000), (7, 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2 parsecs", "-1GB", "0MB", ""])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_size(text)


def test_batch_for_whole_inputs_under_the_budget():
    # room 800, one input's 10 samples need 100 → 8 inputs a pass
    assert batch_for(1000, 200, 10, 10, exact=False) == 80
    assert batch_for(1000, 200, 11, 10, exact=False) == 70  # 800 // 110 = 7
    assert batch_for(1000, 200, 10, 10, exact=True) == 10
    assert batch_for(300, 200, 10, 10, exact=False) == 10  # exactly one input fits
    with pytest.raises(AuditError, match="leaves 100 MB beside the 200 MB already resident.*need about 110 MB"):
        batch_for(300 * 10**6, 200 * 10**6, 11 * 10**6, 10, exact=False)


def test_live_tensors_counts_storages_until_they_die():
    with LiveTensors() as live:
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # 8000
        c = b.view(-1)  # a view: same storage
        b.add_(1)  # in place: same storage
        del a
        gc.collect()  # 4000
        d = torch.zeros(500, dtype=torch.float64)  # 8000
        e = torch.ones(1500)  # 14000: the peak
        del b, e
        gc.collect()  # c still holds b's storage: 4000 + 4000
        assert live.live_ == 8000
    assert live.peak_ == 14000
    assert float(c.sum()) == 3000.0 and float(d.sum()) == 0.0


def test_live_tensors_ignore_what_existed_before():
    w = torch.ones(256)
    with LiveTensors() as live:
        w.mul_(2)  # in place on an outside tensor
        v = w[:128]  # a view of it
        u = w + 1  # new: 1024 B
    assert live.peak_ == 1024 and live.live_ == 1024
    assert float(v.sum() + u.sum()) == 128 * 2 + 256 * 3


def test_probe_pass_is_the_same_in_every_pass_and_holds_a_sample():
    """The CPU probe counts tensors, not the resident size: the same model and input give the same bytes."""
    torch.manual_seed(0)
    adapter = load_model("sr-affine")
    sampling = Sampling(samples=3, temperature=0.8, seed=0)
    y = torch.rand(2, 3, 8, 8)
    first, _ = probe_pass(adapter, y, sampling, torch.device("cpu"))
    second, resident = probe_pass(adapter, y, sampling, torch.device("cpu"))
    assert first == second
    assert first >= 1.25 * 3 * 32 * 32 * 4  # at least one ×4 sample in float32
    assert resident > 0


def test_cli_refuses_a_budget_one_input_does_not_fit(tmp_path):
    data = tmp_path / "lr.npy"
    np.save(data, np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        [
            "-q",
            "scan",
            "sr-affine",
            "--data",
            str(data),
            "-k",
            "2",
            "--batched",
            "--max-memory",
            "1MB",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--max-memory 0.00 GB leaves 0 MB" in lines[0] and "raise --max-memory" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_live_tensors_pass_over_tensors_without_storage():
    i = torch.tensor([[0, 1], [1, 0]])
    with LiveTensors() as live:
        sparse = torch.sparse_coo_tensor(i, torch.ones(2), (2, 2), check_invariants=True)
        dense = sparse.to_dense()  # 16 B
    assert live.peak_ >= 16 and float(dense.sum()) == 2.0  # the sparse tensor is passed over, not an error


class _Big(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(8, 1 << 22).clone()  # 128 MB


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_pass_bytes_sees_what_the_count_cannot():
    """A scripted module's calls do not reach the function mode; the resident read after its forward does."""
    scripted = torch.jit.script(_Big())
    x = torch.ones(1)
    eager, _ = pass_bytes(lambda: _Big()(x).sum())
    hidden, _ = pass_bytes(lambda: scripted(x).sum())
    assert eager == int(1.25 * ((8 << 22) * 4 + 4))  # the count: 1.25 × (128 MiB and the 4-byte sum, alive together)
    assert hidden >= 0.9 * (8 << 22) * 4  # the resident read: the 128 MiB while the module's output lives


def _sizes_sampled(monkeypatch) -> list[tuple[int, int]]:
    """(rows, condition side) of every sampling pass from now on."""
    from flowaudit.adapters.reference import ReferenceAdapter

    calls, real = [], ReferenceAdapter.sample

    def counted(self, y, *args, **kwargs):
        calls.append((int(y.shape[0]), int(y.shape[-1])))
        return real(self, y, *args, **kwargs)

    monkeypatch.setattr(ReferenceAdapter, "sample", counted)
    return calls


@pytest.mark.parametrize(
    "name, side", [("sr-affine", 64), ("sr-affine", 96), ("lowlight-affine", 64), ("lowlight-affine", 128)]
)
def test_probe_extrapolates_an_image_pass_from_two_small_crops(monkeypatch, name, side):
    """At 8–16× the probe's side the estimate is 1.0–1.5 × what a pass at that size measures, without running one.

    The low-light flow's peak at the crops is a part that does not grow with the pixels; at 128×128 another
    part of the pass decides, which a line through the two crops' peaks misses by half (extrapolated call by
    call, it is found)."""
    torch.manual_seed(0)
    adapter = load_model(name)
    sampling = Sampling(samples=3, temperature=0.8, seed=0)
    y = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    calls = _sizes_sampled(monkeypatch)
    with torch.no_grad():
        estimate, _ = probe_pass(adapter, y, sampling, torch.device("cpu"))
    assert calls == [(3, 8), (3, 8), (3, 16), (3, 16)]  # bare and traced at the probe's size and twice it
    latents = sampling.latents(adapter, y[:1], 0, 0, torch.device("cpu"))
    tracer = Tracer(sampling, spatial=spatial_sites(adapter))  # as the scan's own passes and the probe run
    with torch.no_grad():
        measured, _ = pass_bytes(lambda: adapter.sample(sampling.repeat(y[:1]), latents, observer=tracer))
    assert measured / 3 <= estimate <= 1.5 * measured / 3


def test_the_hold_is_added_whole_to_the_estimate(monkeypatch):
    """The crops are traced with each report made at once; the reports a pass may hold are added as a bound."""
    adapter = load_model("sr-affine")
    sampling = Sampling(samples=3, temperature=0.8, seed=0)
    y = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        small, _ = probe_pass(adapter, y, sampling, torch.device("cpu"))
        monkeypatch.setattr("flowaudit.adapters.hooks.HOLD_BYTES", 64 << 20)
        large, _ = probe_pass(adapter, y, sampling, torch.device("cpu"))
    from flowaudit.runs.memory import MARGIN

    assert abs(3 * (large - small) - MARGIN * 1.25 * (62 << 20)) <= 6  # per-sample floors: a byte each


def test_a_pass_whose_calls_change_with_the_size_is_measured_at_the_data_size(monkeypatch):
    """Call-by-call extrapolation needs the same calls at both crops; a model that branches on the size
    (here: one more tensor at 16×16) is measured at the data's own size instead."""
    from flowaudit.adapters.reference import ReferenceAdapter

    real = ReferenceAdapter.sample

    def branching(self, y, *args, **kwargs):
        if y.shape[-1] == 16:
            torch.zeros(4).add_(1)
        return real(self, y, *args, **kwargs)

    monkeypatch.setattr(ReferenceAdapter, "sample", branching)
    calls = _sizes_sampled(monkeypatch)
    with torch.no_grad():
        probe_pass(
            load_model("sr-affine"),
            torch.rand(1, 3, 64, 64),
            Sampling(samples=2, temperature=0.8, seed=0),
            torch.device("cpu"),
        )
    assert calls[-1] == (2, 64)


def test_holding_sets_the_hold_for_a_block_and_puts_it_back():
    from flowaudit.adapters import hooks

    before = hooks.HOLD_BYTES
    with pytest.raises(KeyError), hooks.holding(0):
        assert hooks.HOLD_BYTES == 0
        raise KeyError
    assert hooks.HOLD_BYTES == before


def test_small_images_and_vectors_are_measured_directly(monkeypatch):
    calls = _sizes_sampled(monkeypatch)
    sampling = Sampling(samples=2, temperature=0.8, seed=0)
    adapter = load_model("sr-affine")
    with torch.no_grad():
        probe_pass(adapter, torch.rand(1, 3, 24, 24), sampling, torch.device("cpu"))  # under twice the 16 crop
    assert calls == [(2, 24)]


def test_a_budget_just_below_the_estimate_refuses(monkeypatch):
    """The refusal answers to the extrapolated bytes: one byte short of one input's pass refuses, the pass fits."""
    from flowaudit.config.settings import settings_from
    from flowaudit.io.datasets import ConditionSet
    from flowaudit.runs import memory
    from flowaudit.runs.runner import Context, size_batches

    monkeypatch.setattr(memory, "resident", lambda: 300_000_000)  # a fixed resident size: the budget is exact
    adapter = load_model("sr-affine")
    y = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cs = ConditionSet(y=y, x=None, ids=["a"], description={})
    run = settings_from(None, {"samples": 3, "device": "cpu"}).replace(exact=True)
    with torch.no_grad():
        per_sample, base = probe_pass(adapter, y, run.sampling, torch.device("cpu"))
    assert base == 300_000_000
    need = base + 3 * per_sample
    with torch.no_grad():
        fitted, budget = size_batches(adapter, cs, run, Context(max_memory=need))
        assert fitted.batch_size == 3 and budget == need
        with pytest.raises(AuditError, match="raise --max-memory"):
            size_batches(adapter, cs, run, Context(max_memory=need - 1))


def test_cli_refuses_a_large_image_before_sampling_it_k_times(tmp_path, monkeypatch):
    data = tmp_path / "lr.npy"
    np.save(data, np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    calls = _sizes_sampled(monkeypatch)
    out = tmp_path / "out"
    argv = ["-q", "scan", "sr-affine", "--data", str(data), "-k", "2", "--max-memory", "1MB", "--out", str(out)]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "raise --max-memory" in lines[0]
    assert all(side < 64 for rows, side in calls if rows > 1)  # the probe's crops (one row: the shape trial)
    assert not out.exists() or not any(out.iterdir())
