"""Interruption and concurrent writers, with real processes (``python -m flowaudit``).

SIGINT or SIGTERM in the middle of ``fit``, ``scan``, ``attack`` or ``train`` must exit 130, say on
stderr in one line what was stopped, and leave no partial output: no ``--out`` (``train``: at most
its last *complete* periodic checkpoint), no ``.tmp`` sibling, no lock file. (The hidden work folder
``.<out>.work`` of completed shards is kept on purpose: ``--resume`` finishes from it.)

Each test starts Python and torch in a subprocess (5–10 s on a busy CPU); the two longest
(train past a checkpoint, SIGKILL) are marked ``slow``; in-process tests of the stale
lock are in ``test_hostile.py``. Two runs on one
``--out`` at once: one writes it, the other exits 2, and what is written is one run's whole result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import runs
import torch

ENV = {**runs.ENV, "PYTHONUNBUFFERED": "1"}
TINY_SR = {"L": 3, "K": 1, "nf": 8, "nb": 2, "gc": 4, "hidden_channels": 8}


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return runs.start([sys.executable, "-m", "flowaudit", *args], cwd=cwd, env=ENV)


def _wait_for(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"finished (exit {proc.returncode}) before it could be interrupted: {err[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("never got going")
        time.sleep(0.05)


def _interrupt(
    proc: subprocess.Popen, sig: signal.Signals, ready: Callable[[], bool], settle: float
) -> tuple[int, str]:
    _wait_for(ready, proc)
    time.sleep(settle)  # well inside the run
    assert proc.poll() is None, "finished before the signal"
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{sig.name} did not stop it within 60 s")
    return proc.returncode, err


def _leftovers(folder: Path) -> list[str]:
    """Partial output beside the target: temporary files or folders, lock files, moved-aside old outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".lock", ".old")))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """Conditions enough for a scan or fit of a minute on a busy CPU."""
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    np.save(d / "y.npy", rng.normal(size=(6000, 2)).astype(np.float32))
    np.save(d / "fit.npy", rng.normal(size=(2_000_000, 2)).astype(np.float32))
    return d


def _claimed(out: Path) -> Callable[[], bool]:
    return lambda: out.with_name(f".{out.name}.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_scan_interrupted_leaves_nothing(big: Path, tmp_path: Path, sig) -> None:
    out = tmp_path / "report"
    proc = _start(
        [
            "-q",
            "scan",
            "toy-affine",
            "--data",
            str(big / "y.npy"),
            "--samples",
            "10",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    rc, err = _interrupt(proc, sig, _claimed(out), settle=2.0)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 130, err
    assert len(lines) == 1 and lines[0].startswith(
        f"flowaudit: interrupted ({sig.name}): flowaudit scan stopped; nothing was written to {out}"
    ), err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_fit_interrupted_leaves_nothing(big: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats.h5"
    proc = _start(
        ["-q", "fit", "toy-affine", "--data", str(big / "fit.npy"), "--device", "cpu", "--out", str(out)], tmp_path
    )
    rc, err = _interrupt(proc, signal.SIGTERM, _claimed(out), settle=2.0)
    assert rc == 130 and err.count("\n") == 1, err
    assert err.startswith(f"flowaudit: interrupted (SIGTERM): flowaudit fit stopped; nothing was written to {out}"), err
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow
def test_train_interrupted_keeps_only_a_complete_checkpoint(tmp_path: Path) -> None:
    """Interrupted after its first periodic checkpoint, ``train`` leaves that checkpoint, whole and resumable."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_SR))
    out = tmp_path / "sr.pt"
    proc = _start(
        [
            "-q",
            "train",
            "sr",
            "--config",
            "tiny.json",
            "--iters",
            "400",
            "--batch",
            "2",
            "--patch",
            "16",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    rc, err = _interrupt(proc, signal.SIGINT, out.exists, settle=0.5)
    assert rc == 130, err
    assert err.strip() == (
        f"flowaudit: interrupted (SIGINT): flowaudit train sr stopped; {out} keeps its last complete "
        "checkpoint (--resume continues from it)"
    ), err
    state = torch.load(out, weights_only=True)
    assert state["step"] % 50 == 0 and 0 < state["step"] < 400
    assert _leftovers(tmp_path) == []


def test_train_interrupted_before_any_checkpoint_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "toy.pt"
    proc = _start(["-q", "train", "toy", "--iters", "100000", "--out", str(out)], tmp_path)
    rc, err = _interrupt(proc, signal.SIGTERM, _claimed(out), settle=1.0)
    assert rc == 130 and "flowaudit train toy stopped" in err and err.count("\n") == 1, err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_attack_interrupted_leaves_nothing(big: Path, tmp_path: Path) -> None:
    """Interrupted after its first shard of starts, ``attack`` writes nothing to --out and says where its
    completed shards are (``--resume`` finishes from them: ``tests/test_attack_runs.py``)."""
    from flowaudit.cli.main import cli

    if "attack" not in cli.commands:
        pytest.skip("no attack command in this tree")
    out = tmp_path / "attack"
    work = out.with_name(".attack.work")
    proc = _start(
        [
            "-q",
            "attack",
            "toy-affine",
            "--data",
            str(big / "y.npy"),
            "--starts",
            "2000",
            "--steps",
            "50",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    rc, err = _interrupt(proc, signal.SIGINT, lambda: work.exists() and any(work.glob("attack-*.npz")), settle=0.2)
    assert rc == 130 and err.count("\n") == 1, err
    assert err.startswith(f"flowaudit: interrupted (SIGINT): flowaudit attack stopped; nothing was written to {out}"), (
        err
    )
    assert f"completed shards are kept in {work}: rerun the same command with --resume {work}" in err, err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_two_runs_on_one_out(big: Path, tmp_path: Path) -> None:
    """Started together on an absent --out: one writes it whole, the other exits 2 in one line."""
    out = tmp_path / "report"
    y = np.load(big / "y.npy")
    np.save(tmp_path / "a.npy", y[:100])
    np.save(tmp_path / "b.npy", y[100:250])
    procs = [
        _start(
            [
                "-q",
                "scan",
                "toy-affine",
                "--data",
                str(tmp_path / f"{name}.npy"),
                "--samples",
                "2",
                "--device",
                "cpu",
                "--out",
                str(out),
            ],
            tmp_path,
        )
        for name in ("a", "b")
    ]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert loser.count("\n") == 1 and loser.startswith(f"flowaudit: error: {out}") and "Traceback" not in loser, loser
    assert ("is writing it" in loser) or ("exists" in loser), loser
    report = json.loads((out / "report.json").read_text())
    assert report["risk"]["n_inputs"] in (100, 150)  # one run's whole result, not a mix
    assert len({r["set"] for r in report["inputs"]}) == 1 and len(report["inputs"]) == report["risk"]["n_inputs"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".work")) == ["a.npy", "b.npy", "report"]


@pytest.mark.slow
def test_sigkilled_run_leaves_a_stale_lock_that_does_not_block(big: Path, tmp_path: Path) -> None:
    """SIGKILL cannot be cleaned up after: the lock file stays, but its flock died with the process."""
    out = tmp_path / "report"
    proc = _start(
        ["-q", "scan", "toy-affine", "--data", str(big / "y.npy"), "--device", "cpu", "--out", str(out)], tmp_path
    )
    _wait_for(_claimed(out), proc)
    proc.kill()
    proc.wait()
    assert out.with_name(".report.lock").exists() and not out.exists()
    shutil.rmtree(
        out.with_name(".report.work"), ignore_errors=True
    )  # shards of the killed run: --resume's business, not the lock's
    np.save(tmp_path / "few.npy", np.load(big / "y.npy")[:20])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowaudit",
            "-q",
            "scan",
            "toy-affine",
            "--data",
            str(tmp_path / "few.npy"),
            "--samples",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert (out / "report.json").exists() and not out.with_name(".report.lock").exists()


# -- the writers themselves, in-process ------------------------------------------------------------


def test_atomic_writers_leave_nothing_on_keyboard_interrupt(tmp_path: Path) -> None:
    """Ctrl-C (or SIGTERM, turned into KeyboardInterrupt) inside a writer: no target, no temporary, no lock."""
    from flowaudit.utils.atomic import atomic_dir, atomic_path

    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "report") as tmp:
            (tmp / "report.json").write_text("{}")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "stats.h5") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    (tmp_path / "old.pt").write_bytes(b"complete")  # a checkpoint from an earlier save stays whole
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "old.pt") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"] and (tmp_path / "old.pt").read_bytes() == b"complete"
    )


def test_claims_are_reentrant_and_exclusive(tmp_path: Path) -> None:
    """The command's claim covers the writers inside it; another process's claim on the same target is refused."""
    from flowaudit.utils.atomic import TargetBusy, atomic_dir, claim

    target = tmp_path / "deep" / "er" / "report"
    with claim(target):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("1")
        code = (
            "import sys\nfrom flowaudit.utils.atomic import claim, TargetBusy\n"
            "try:\n    with claim(sys.argv[1]): pass\nexcept TargetBusy as e:\n    print(e); sys.exit(2)\n"
        )
        res = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=ENV)
        assert res.returncode == 2 and f"pid {os.getpid()}" in res.stdout, res
    assert (target / "a").exists() and not target.with_name(".report.lock").exists()
    with pytest.raises(TargetBusy.__mro__[1]):  # FileExistsError: a finished target is not replaced without overwrite
        with atomic_dir(target):
            pass
    missing = tmp_path / "x" / "y" / "out"
    with pytest.raises(RuntimeError):
        with claim(missing):
            raise RuntimeError
    assert not (tmp_path / "x").exists()  # folders a failed claim created are gone again


def test_ctrl_c_while_the_command_line_loads_is_one_line(monkeypatch, capsys):
    """A Ctrl-C during the imports, before any handler exists: one line, exit 130, no traceback."""
    import importlib.abc  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import flowaudit.cli  # noqa: PLC0415

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "flowaudit.cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "flowaudit.cli.main", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as exc:
        flowaudit.cli.start()
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert err == "flowaudit: interrupted while starting; nothing was written\n"
