"""The demo's embedded data sets, the OOD rule that makes the image sets, and the story it prints first."""

from __future__ import annotations

import pytest
import torch

from flowaudit.demo import _story, demo_sets
from flowaudit.reference_models.ood import SHIFTS, shift, shift_names


@pytest.mark.parametrize(
    "task, shapes", [("toy", [(2,), (2,), (2,)]), ("sr", [(3, 8, 8)] * 3), ("lowlight", [(3, 32, 32)] * 3)]
)
def test_demo_sets(task: str, shapes: list[tuple[int, ...]]) -> None:
    sets = demo_sets(task, n_fit=8, n_test=4, n_ood=12)
    assert [tuple(cs.y.shape[1:]) for cs in sets] == shapes
    for cs in sets:
        assert len(cs.ids) == len(cs.y) == cs.description["n"] and len(set(cs.ids)) == len(cs.ids)
        assert torch.isfinite(cs.y).all()
    fit, test, ood = sets
    assert fit.description["name"] == "train"
    if task == "toy":
        assert ood.description["name"] == "ood" and ood.description["shift"] == [0.8, -0.8]
        return
    assert all(0 <= float(cs.y.min()) and float(cs.y.max()) <= 1 for cs in sets)
    assert [len(cs) for cs in sets] == [8, 4, 12] and all(cs.x is not None for cs in sets[1:])
    # the rule: input j through transform j mod T, every transform in turn, named in the id
    assert ood.description["name"] == "shifted" and ood.description["transforms"] == list(SHIFTS)
    assert [i.rsplit("~", 1)[1] for i in ood.ids] == shift_names(12) == list(SHIFTS) + list(SHIFTS)[:2]
    again = demo_sets(task, n_fit=8, n_test=4, n_ood=12)[2]
    assert torch.equal(again.y, ood.y) and again.ids == ood.ids  # deterministic


def test_each_transform_changes_the_condition_and_keeps_the_range() -> None:
    lr = demo_sets("sr", n_fit=1, n_test=1, n_ood=1)[1].y[0]
    for j, name in enumerate(SHIFTS):
        got_name, out = shift(lr, j)
        assert got_name == name and out.shape == lr.shape
        assert 0 <= float(out.min()) and float(out.max()) <= 1
        assert not torch.allclose(out, lr, atol=1e-3), name
    assert torch.equal(shift(lr, 5)[1], shift(lr, 5)[1])  # seeded noise
    assert not torch.equal(shift(lr, 5)[1], shift(lr, 5, seed=1)[1])


def _report(ood_records: list[dict], layers: list[dict], explosion: str | None) -> dict:
    ins = [{"id": f"in/test:{i}", "set": "in", "n_inf": 0, "n_pixel_err": 0} for i in range(3)]
    return {"inputs": ins + ood_records, "layers": layers, "explosion_layer": explosion}


def test_story_names_the_inputs_and_layers_responsible() -> None:
    ood = [
        {"id": "ood/shifted:a~noise-0.2", "set": "ood", "n_inf": 2, "n_pixel_err": 3},
        {"id": "ood/shifted:b~noise-0.2", "set": "ood", "n_inf": 0, "n_pixel_err": 1},
        {"id": "ood/shifted:c~invert", "set": "ood", "n_inf": 0, "n_pixel_err": 0},
        {"id": "ood/shifted:d~texture", "set": "ood", "n_inf": 0, "n_pixel_err": 2},
    ]
    layers = [
        {"name": "l0", "ood": {"n_nonfinite": 0}},
        {"name": "l1", "ood": {"n_nonfinite": 7}},
        {"name": "output", "ood": {"n_nonfinite": 9}},
    ]
    text = _story("m", _report(ood, layers, "l0"))
    assert text.startswith("m: Inf samples on 0/3 in-distribution and 1/4 OOD inputs; pixel errors on 0/3 and 3/4")
    assert "noise-0.2 1/2/2, texture 0/1/1." in text and "invert" not in text  # the responsible transforms only
    assert "first non-finite value at l1" in text and "threshold at l0" in text
    calm = [dict(r, n_inf=0, n_pixel_err=0) for r in ood]
    assert _story("m", _report(calm, [], None)).endswith(": no blow-up.")
