"""Scale-out: ``torchrun --nproc_per_node=2 -m flowaudit fit|scan|attack --distributed`` on 2 CPU ranks (gloo).

Shards are spread over the ranks and their payloads all-gathered and merged in shard order, so the
Gaussian sums, every per-input record and every attack start's record equal one process's (the test asks for bit-equality; the
issue's bound is 1e-10 on the Gaussian statistics). Rank 0 alone writes the output.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flowaudit.adapters import load_model
from runs import ENV, strip_run_facts

import flowaudit
from flowaudit.stats.gaussian import GaussianOOD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "flowaudit",
        "-q",
        *args,
        "--distributed",
        "--device",
        "cpu",
    ]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from flowaudit.reference_models.toy import toy_data

    d = tmp_path_factory.mktemp("toy")
    np.save(d / "fit.npy", np.asarray(toy_data(1100, seed=0)[1]))  # 3 fit shards of 512: ranks 0, 1, 0
    np.save(d / "in.npy", np.asarray(toy_data(70, seed=10_001)[1]))  # 3 scan shards of 32
    np.save(d / "ood.npy", np.asarray(toy_data(20, seed=10_001, ood=True)[1]))
    return d


def test_fit_two_ranks_equals_one_process(data, tmp_path):
    out = tmp_path / "stats.h5"
    r = _torchrun("fit", "toy-affine", "--data", str(data / "fit.npy"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    two = GaussianOOD.load(out)
    one = flowaudit.fit(load_model("toy-affine"), str(data / "fit.npy"), device="cpu").gaussian
    assert two.n_ == one.n_ == 1100
    for name in ("reference_", "sum_", "sum_sq_", "sum_cubic_", "location_", "covariance_"):
        a, b = getattr(two, name), getattr(one, name)
        assert np.abs(a - b).max() <= 1e-10 * max(1.0, np.abs(b).max()), name
        assert np.array_equal(a, b), name  # in fact bit for bit: the same merges in the same order
    assert two.sum_quartic_ == one.sum_quartic_
    assert not list(tmp_path.glob(".*"))  # no work folder, no lock left


def test_scan_two_ranks_equals_one_process(data, tmp_path):
    out = tmp_path / "report"
    args = [
        "toy-affine",
        "--data",
        str(data / "in.npy"),
        "--ood-data",
        str(data / "ood.npy"),
        "--fit-data",
        str(data / "fit.npy"),
        "-k",
        "4",
    ]
    r = _torchrun("scan", *args, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("report:") == 1  # rank 0 alone reports
    two = json.loads((out / "report.json").read_text())
    assert two["settings"]["ranks"] == 2
    one = json.loads(
        flowaudit.scan(
            load_model("toy-affine"),
            str(data / "in.npy"),
            ood=str(data / "ood.npy"),
            fit_data=str(data / "fit.npy"),
            samples=4,
            device="cpu",
        ).to_json()
    )
    one, two = strip_run_facts(one), strip_run_facts(two)
    assert two["inputs"] == one["inputs"]  # per-input records identical
    assert two == one
    assert not list(tmp_path.glob(".*"))


def test_attack_two_ranks_equals_one_process(data, tmp_path):
    """The attack's shards of starts (3 of 16, 16, 8: ranks 0, 1, 0) give every start the record one process gives it."""
    out = tmp_path / "attack"
    np.save(tmp_path / "y.npy", np.load(data / "in.npy")[:40])
    kw = dict(budget="linf:0.5", starts=40, steps=6, samples=2)
    r = _torchrun(
        "attack",
        "toy-affine",
        "--data",
        str(tmp_path / "y.npy"),
        "--budget",
        kw["budget"],
        "--starts",
        "40",
        "--steps",
        "6",
        "-k",
        "2",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("report:") == 1  # rank 0 alone reports
    two = json.loads((out / "report.json").read_text())
    assert two["settings"]["ranks"] == 2
    one = json.loads(flowaudit.attack(load_model("toy-affine"), str(tmp_path / "y.npy"), device="cpu", **kw).to_json())
    one, two = strip_run_facts(one), strip_run_facts(two)
    assert two["attack"]["starts"] == one["attack"]["starts"]  # per-start records identical
    assert two == one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attack", "y.npy"]  # no work folder, no lock left
