"""What the tests of long runs share: the child process's environment, a run stopped at a chosen
point, and reports compared without the facts of the machine (:data:`flowaudit.runs.runner.RUN_FACTS`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from flowaudit.runs.runner import RUN_FACTS

# PYTHONSAFEPATH: a child started in the repository root must import the installed flowaudit, not the source folder
ENV = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def strip_run_facts(report: dict) -> dict:
    """``report`` (a report.json dict) without ``created`` and the settings that describe the machine or the run's course."""
    report.pop("created")
    for k in RUN_FACTS:
        report["settings"].pop(k, None)
    return report


def start(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """``cmd`` as a child process with pipes; a child of a non-interactive shell may inherit SIGINT
    ignored, so it gets the default, as from a terminal."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def kill_when(
    cmd: list[str], ready: Callable[[], bool], sig: int, left: list[Path], tries: int = 3
) -> subprocess.Popen:
    """Start ``cmd`` and send ``sig`` once ``ready()``. On a loaded machine the polling may not run before
    the command ends: then what it left (``left``) is removed and it is started again."""
    for _ in range(tries):
        proc = start(cmd)
        deadline = time.monotonic() + 240
        sent = False
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(sig)
                sent = True
                break
            time.sleep(0.02)
        proc.wait(timeout=120)
        if sent:
            return proc
        for path in left:  # it finished first: not the case under test
            shutil.rmtree(path, ignore_errors=True)
    return proc
