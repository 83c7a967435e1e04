"""The attack as a long run: shards of starts, ``--resume`` after SIGKILL, batch-size determinism.

``flowaudit attack`` cuts its starts into shards of ``ATTACK_SHARD_STARTS`` (kept in ``.<out>.work/``),
so a killed attack finishes with ``--resume`` and its report.json equals an uninterrupted run's (except
``created`` and the run facts). Each inverse pass is one start's K samples (exact passes), so the report
does not depend on ``--batch-size``; ``--batched`` trades that for speed. ``scan --attack`` keeps its
attack shards (``attack-<k>``) in the scan's work folder. Two ranks: ``tests/test_distributed.py``.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import ENV, kill_when, strip_run_facts

from flowaudit.runs.shards import ATTACK_SHARD_STARTS, unpack

STARTS, STEPS, K = 64, 20, 4  # 4 shards of 16 starts; a few seconds on one busy core


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from flowaudit.reference_models.toy import toy_data

    d = tmp_path_factory.mktemp("toy")
    np.save(d / "in.npy", np.asarray(toy_data(STARTS, seed=10_001)[1]))
    return d


def _args(data: Path, out: Path, *extra: str, steps: int = STEPS, starts: int = STARTS) -> list[str]:
    return [
        "-q",
        "attack",
        "toy-affine",
        "--data",
        str(data / "in.npy"),
        "--budget",
        "none",
        "--starts",
        str(starts),
        "--steps",
        str(steps),
        "-k",
        str(K),
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flowaudit", *_args(data, out, *extra)]


def _cli(*args: str):
    """The CLI in this process (refusals exit before any search: no process start to pay)."""
    from click.testing import CliRunner

    from flowaudit.cli.main import cli

    return CliRunner().invoke(cli, list(args))


def _worst(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "attack" / "worst.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)


def _shards(work: Path) -> list[Path]:
    return sorted(work.glob("attack-*.npz"))


@pytest.fixture(scope="module")
def uninterrupted(data) -> tuple[dict, dict]:
    """The same attack in one go, through the Python API (the CLI is a thin wrapper over it)."""
    from flowaudit.adapters import load_model

    import flowaudit

    report = flowaudit.attack(
        load_model("toy-affine"),
        str(data / "in.npy"),
        budget="none",
        starts=STARTS,
        steps=STEPS,
        samples=K,
        device="cpu",
    )
    with np.load(io.BytesIO(report.files["attack/worst.npz"])) as npz:
        worst = {k: npz[k] for k in npz.files}
    return strip_run_facts(json.loads(report.to_json())), worst


def _kill_after_a_shard(data: Path, out: Path) -> subprocess.Popen:
    """Start the attack and SIGKILL it once a shard is saved (:func:`runs.kill_when`)."""
    work = out.with_name(f".{out.name}.work")
    return kill_when(_cmd(data, out), lambda: work.exists() and len(_shards(work)) >= 1, signal.SIGKILL, [out, work])


def test_attack_sigkilled_then_resumed_equals_uninterrupted(data, tmp_path, uninterrupted):
    out = tmp_path / "attack"
    work = tmp_path / ".attack.work"
    proc = _kill_after_a_shard(data, out)
    assert proc.returncode == -signal.SIGKILL, "the attack finished before it could be killed"
    assert not out.exists()  # no partial output
    done = len(_shards(work))
    assert 0 < done < STARTS // ATTACK_SHARD_STARTS
    for f in _shards(work):  # a payload is plain data: arrays and a JSON head, no pickle
        head = json.loads(np.load(f, allow_pickle=False)["__head__"].tobytes().decode())
        payload = unpack(f.read_bytes(), head["key"], head["tag"])
        assert isinstance(payload["y"], torch.Tensor) and len(payload["y"]) == ATTACK_SHARD_STARTS

    again = _cli(*_args(data, out))  # without --resume: refused, one line, nothing touched
    assert again.exit_code == 2 and "--resume" in again.output and len(again.output.strip().splitlines()) == 1
    other = _cli(*_args(data, out, "--resume", str(work), steps=STEPS + 1))  # other settings: refused, naming the key
    assert other.exit_code == 2 and f"steps={STEPS}" in other.output and f"steps={STEPS + 1}" in other.output, (
        other.output
    )
    assert len(other.output.strip().splitlines()) == 1
    assert not out.exists() and len(_shards(work)) == done

    r = subprocess.run(_cmd(data, out, "--resume", str(work)), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not work.exists()  # the run is complete: shards dropped
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["resumed_shards"] == done
    whole, worst = uninterrupted
    assert strip_run_facts(report) == whole
    assert _same_arrays(_worst(out), worst)


@pytest.mark.parametrize("batched", [False, True], ids=["exact", "batched"])
def test_report_does_not_depend_on_the_batch_size(data, tmp_path, batched):
    """Exact passes: report.json identical for K, 3K and all starts' samples per pass. ``--batched`` is
    allowed to move the last bits of float32 kernels, not what the attack found (which starts broke)."""
    n = ATTACK_SHARD_STARTS + 4  # two shards, the second short
    reports, worst = [], []
    for size in (K, 3 * K, n * K):
        out = tmp_path / f"b{size}"
        extra = ["--batch-size", str(size), *(["--batched"] if batched else [])]
        r = _cli(*_args(data, out, *extra, steps=8, starts=n))
        assert r.exit_code == 0, r.output
        report = json.loads((out / "report.json").read_text())
        assert report["settings"]["batch_size"] == size and report["settings"]["exact"] is not batched
        assert report["attack"]["summary"]["n_starts"] == n
        assert not out.with_name(f".{out.name}.work").exists()
        reports.append(strip_run_facts(report))
        worst.append(_worst(out))
    if not batched:
        assert reports[0] == reports[1] == reports[2]
        assert _same_arrays(worst[0], worst[1]) and _same_arrays(worst[0], worst[2])
        return
    for rep in reports[1:]:
        first = reports[0]["attack"]
        assert [s["id"] for s in rep["attack"]["starts"]] == [s["id"] for s in first["starts"]]
        assert [s["broken"] for s in rep["attack"]["starts"]] == [s["broken"] for s in first["starts"]]
        for k in ("n_broken", "n_nonfinite_starts", "n_starts"):
            assert rep["attack"]["summary"][k] == first["summary"][k], k


def test_scan_attack_resumes_from_its_shards(tmp_path, monkeypatch):
    """``scan --attack`` shards its starts in the scan's work folder (``attack-<k>``): interrupted after
    the first one, the resumed scan loads it and equals an uninterrupted scan."""
    from flowaudit.adapters import load_model
    from flowaudit.reference_models.toy import toy_data

    import flowaudit
    from flowaudit.errors import AuditError
    from flowaudit.runs.runner import Context
    from flowaudit.runs.shards import WorkFolder

    y = toy_data(40, seed=3)[1]
    kw = dict(samples=2, device="cpu", attack="linf:0.5", attack_starts=20, attack_steps=4)
    model = load_model("toy-affine")
    whole = strip_run_facts(json.loads(flowaudit.scan(model, y, **kw).to_json()))

    work = tmp_path / ".report.work"
    save = WorkFolder.save

    def save_then_stop(self, key, payload, count=True):
        save(self, key, payload, count)
        if key == "attack-00000":
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        flowaudit.scan(model, y, context=Context(work_dir=work), **kw)
    monkeypatch.undo()
    assert (work / "attack-00000.npz").exists() and not (work / "attack-00001.npz").exists()
    assert json.loads((work / "settings.json").read_text())["attack"]["steps"] == 4

    with pytest.raises(AuditError, match="attack="):  # the attack's settings are the scan's too
        flowaudit.scan(model, y, context=Context(work_dir=work, resume=True), **{**kw, "attack_steps": 5})
    resumed = json.loads(flowaudit.scan(model, y, context=Context(work_dir=work, resume=True), **kw).to_json())
    assert resumed["settings"]["resumed_shards"] >= 2  # the scan's shard and the attack's
    assert strip_run_facts(resumed) == whole
