"""Thread defaults never oversubscribe; --threads / threads= set the count for the run and restore it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from flowaudit.adapters import load_model
from flowaudit.reference_models.toy import toy_data

import flowaudit
from flowaudit.cli.main import cli
from flowaudit.config import threads as T
from flowaudit.errors import AuditError


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("processes", [1, 2, 4, 8])
@pytest.mark.parametrize("busy", [0.0, 0.9, 1.5, 7.0, 100.0])
def test_default_never_oversubscribes(cores, processes, busy):
    n = T.default_threads(cores=cores, processes=processes, busy=busy)
    assert n >= 1
    free = max(1, cores - int(busy))
    assert n * processes <= max(free, processes)  # at least one thread each, else never past the free cores
    if processes <= free:
        assert n == free // processes  # and all of them are used


def test_torchrun_local_ranks_share_the_cores(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert T.local_processes() == 4
    assert T.default_threads(cores=8, busy=0) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "junk")
    assert T.local_processes() == 1


def test_usable_cores_within_affinity():
    import os

    assert T.usable_cores() >= 1
    if hasattr(os, "sched_getaffinity"):
        assert T.usable_cores() <= len(os.sched_getaffinity(0))


def test_threads_set_for_the_run_and_restored(monkeypatch):
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    y = toy_data(8, seed=1)[1]
    flowaudit.scan(load_model("toy-affine"), y, samples=2, device="cpu", threads=3)
    assert 3 in seen and torch.get_num_threads() == before
    seen.clear()
    with T.using_threads(2):
        with T.using_threads(None):  # an inner block without a count keeps the outer one's
            assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_default_keeps_a_lower_count(monkeypatch):
    monkeypatch.setattr(T, "default_threads", lambda: 8)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with T.using_threads(None) as n:
            assert n == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_same_figures_for_any_thread_count():
    fit, y = toy_data(100, seed=0)[1], toy_data(12, seed=1)[1]
    a, b = (
        flowaudit.scan(load_model("toy-affine"), y, fit_data=fit, samples=3, device="cpu", threads=n)["risk"]
        for n in (1, 2)
    )
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_bad_thread_counts_refused(tmp_path):
    with pytest.raises(AuditError, match="--threads"):
        flowaudit.scan(load_model("toy-affine"), toy_data(4, seed=1)[1], samples=2, device="cpu", threads=0)
    r = CliRunner().invoke(
        cli, ["scan", "toy-affine", "--data", "x.npy", "--out", str(tmp_path / "o"), "--threads", "0"]
    )
    assert r.exit_code == 2 and not (tmp_path / "o").exists()


def test_cli_threads_reach_the_run(tmp_path, monkeypatch):
    import numpy as np

    data = tmp_path / "y.npy"
    np.save(data, toy_data(6, seed=1)[1].numpy())
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    out = tmp_path / "r"
    r = CliRunner().invoke(
        cli,
        [
            "-q",
            "scan",
            "toy-affine",
            "--data",
            str(data),
            "--out",
            str(out),
            "-k",
            "2",
            "--threads",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert 3 in seen


def test_every_pass_of_an_image_scan_runs_on_the_given_threads(monkeypatch):
    """Sampling, the shape trial, the spatial fit and the worst-input panel all honour ``threads``: a pass on
    more threads than asked can run ten times slower where another job holds a core."""
    from flowaudit.demo import demo_sets  # noqa: PLC0415 - the bundled SR sets, only here

    adapter = flowaudit.adapt(load_model("sr-affine"))
    counts, real = [], adapter.sample
    monkeypatch.setattr(adapter, "sample", lambda *a, **k: (counts.append(torch.get_num_threads()), real(*a, **k))[1])
    encodes, real_encode = [], adapter.encode
    monkeypatch.setattr(adapter, "encode", lambda y: (encodes.append(torch.get_num_threads()), real_encode(y))[1])
    fit = demo_sets("sr")[0].y[:8]
    odd = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))  # not the model's LR size: tried
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = flowaudit.scan(adapter, odd, fit_data=fit, samples=2, device="cpu", threads=1)
    finally:
        torch.set_num_threads(before)
    assert report.panel and len(counts) > 3 and encodes and set(counts) == {1} and set(encodes) == {1}
