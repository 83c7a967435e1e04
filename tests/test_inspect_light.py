"""``inspect`` runs a few small passes: its tracer reads them with tensor operations, without loading the compiled
loops (numba and its cache: about 0.8 s and 120 MB of a process), and gives the figures the compiled loops give."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from flowaudit.adapters import load_model

import flowaudit
import flowaudit.audit as audit


def _model_entry(report) -> dict:
    return json.loads(report.to_json())["model"]


@pytest.mark.parametrize("name", ["toy-affine", "sr-affine", "lowlight-modified-rq-spline"])
def test_inspect_figures_are_the_compiled_loops_figures(name, monkeypatch):
    light = _model_entry(flowaudit.inspect(load_model(name), device="cpu"))
    sample_range = audit.sample_range
    monkeypatch.setattr(audit, "sample_range", lambda *a, compiled=True: sample_range(*a, compiled=True))
    compiled = _model_entry(flowaudit.inspect(load_model(name), device="cpu"))
    assert light["sites"] == compiled["sites"] and light == compiled


def test_inspect_loads_no_numba(tmp_path):
    code = (
        "import sys, flowaudit\n"
        "from flowaudit.adapters import load_model\n"
        "flowaudit.inspect(load_model('sr-affine'), device='cpu')\n"
        "assert 'numba' not in sys.modules, 'numba loaded'\n"
        "from flowaudit.reference_models.toy import toy_data\n"
        "flowaudit.scan(load_model('toy-affine'), toy_data(3)[1], samples=2, device='cpu')\n"
        "assert 'numba' in sys.modules, 'a scan reads with the compiled loops'\n"
    )
    done = subprocess.run(  # outside the checkout: the installed package, not its source folders
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
