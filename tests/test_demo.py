"""The demo's embedded data sets: three sets per task, ids and descriptions as the reports show them."""

from __future__ import annotations

import pytest
import torch

from flowaudit.demo import demo_sets


@pytest.mark.parametrize(
    "task, shapes", [("toy", [(2,), (2,), (2,)]), ("sr", [(3, 8, 8)] * 3), ("lowlight", [(3, 32, 32)] * 3)]
)
def test_demo_sets(task: str, shapes: list[tuple[int, ...]]) -> None:
    sets = demo_sets(task, n_fit=8, n_test=4)
    assert [tuple(cs.y.shape[1:]) for cs in sets] == shapes
    for cs in sets:
        assert len(cs.ids) == len(cs.y) == cs.description["n"] and len(set(cs.ids)) == len(cs.ids)
        assert torch.isfinite(cs.y).all()
    if task != "toy":
        assert all(0 <= float(cs.y.min()) and float(cs.y.max()) <= 1 for cs in sets)
        assert [len(cs) for cs in sets] == [8, 4, 4] and all(cs.x is not None for cs in sets[1:])
    fit, test, ood = sets
    assert fit.description["name"] == "train" and ood.description["name"] in ("ood", "eurban", "velol")
