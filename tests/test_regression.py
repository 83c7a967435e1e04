"""Behaviour pinned across redesigns: the scan figures of bundled models at a fixed seed.

``tests/golden/scan_figures.json`` was written by ``tests/golden/make_scan_figures.py`` before the
layers redesign; the same figures must come out of every later version. A change that is
meant to alter them rewrites the file in its own commit and says why.
"""

from __future__ import annotations

import json
import math

import pytest
from golden.make_scan_figures import GOLDEN, MODELS, figures

PINNED = json.loads(GOLDEN.read_text())


def _close(got, want, path: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert math.isclose(float(got), float(want), rel_tol=1e-5, abs_tol=1e-12), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", MODELS)
def test_scan_figures_unchanged(name: str) -> None:
    _close(json.loads(json.dumps(figures(name))), PINNED[name], name)
