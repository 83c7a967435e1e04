"""Interruption and resume: a scan killed with SIGKILL halfway finishes with ``--resume``,
and its report.json equals an uninterrupted run's (except ``created`` and the run facts).

The scans run as subprocesses of the real CLI. The killed run leaves no output folder, only its
work folder ``.<out>.work`` of completed shards; a resumed run must ask for the same settings.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runs import ENV, kill_when, strip_run_facts


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from flowaudit.reference_models.toy import toy_data

    d = tmp_path_factory.mktemp("toy")
    np.save(d / "fit.npy", np.asarray(toy_data(400, seed=0)[1]))
    np.save(d / "in.npy", np.asarray(toy_data(192, seed=10_001)[1]))  # 6 shards of 32 inputs
    np.save(d / "ood.npy", np.asarray(toy_data(64, seed=10_001, ood=True)[1]))
    return d


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-q",
        "scan",
        "toy-affine",
        "--data",
        str(data / "in.npy"),
        "--ood-data",
        str(data / "ood.npy"),
        "--fit-data",
        str(data / "fit.npy"),
        "-k",
        "4",
        "--exact",  # shards of 32 inputs (a small flow's scan would otherwise be one shard of 16,384)
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flowaudit", *_args(data, out, *extra)]


def _cli(*args: str):
    """The CLI in this process (refusals exit before any sampling: no process start to pay)."""
    from click.testing import CliRunner

    from flowaudit.cli.main import cli

    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def uninterrupted(data) -> dict:
    """The same scan in one go, through the Python API (the CLI is a thin wrapper over it)."""
    from flowaudit.adapters import load_model

    import flowaudit

    report = flowaudit.scan(
        load_model("toy-affine"),
        str(data / "in.npy"),
        ood=str(data / "ood.npy"),
        fit_data=str(data / "fit.npy"),
        samples=4,
        device="cpu",
        exact=True,
    )
    return strip_run_facts(json.loads(report.to_json()))


def _kill_halfway(data: Path, out: Path, sig: int, shards: int = 3) -> subprocess.Popen:
    """Start the scan and send ``sig`` once ``shards`` shards are saved (:func:`runs.kill_when`)."""
    work = out.with_name(f".{out.name}.work")
    return kill_when(
        _cmd(data, out), lambda: work.exists() and len(list(work.glob("in-*.npz"))) >= shards, sig, [out, work]
    )


def test_sigkill_halfway_then_resume_equals_uninterrupted(data, tmp_path, uninterrupted):
    out = tmp_path / "report"
    work = tmp_path / ".report.work"
    proc = _kill_halfway(data, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the scan finished before it could be killed"
    assert not out.exists()  # no partial output
    done = len([f for f in work.glob("*.npz") if not f.name.endswith(".fold.npz")])  # shards, not the running folds
    assert 0 < done < 1 + 6 + 2  # the fit shard, some in-distribution shards, not all

    again = _cli(*_args(data, out))  # without --resume: refused, one line, nothing touched
    assert again.exit_code == 2 and "--resume" in again.output and len(again.output.strip().splitlines()) == 1
    other = _cli(*_args(data, out, "--resume", str(work), "--seed", "7"))  # other settings: refused
    assert other.exit_code == 2 and "seed=0" in other.output and "seed=7" in other.output
    elsewhere = _cli(*_args(data, tmp_path / "other", "--resume", str(work)))  # another output's work folder
    assert elsewhere.exit_code == 2 and "not of --out" in elsewhere.output
    assert not out.exists() and len([f for f in work.glob("*.npz") if not f.name.endswith(".fold.npz")]) == done

    r = subprocess.run(_cmd(data, out, "--resume", str(work)), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not work.exists()  # the run is complete: shards dropped
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["settings"]["resumed_shards"] <= done  # a shard saved after its set's last fold is computed again
    assert strip_run_facts(report) == uninterrupted


def test_sigint_says_how_to_resume(data, tmp_path):
    out = tmp_path / "report"
    proc = _kill_halfway(data, out, signal.SIGINT, shards=1)
    err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert "interrupted" in err and f"--resume {out.with_name('.report.work')}" in err
    assert not out.exists()


def test_resume_of_nothing_is_refused(data, tmp_path):
    r = _cli(*_args(data, tmp_path / "report", "--resume", str(tmp_path / ".report.work")))
    assert r.exit_code == 2 and "nothing to resume" in r.output
