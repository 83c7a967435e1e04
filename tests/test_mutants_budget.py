"""Attack budgets, figure by figure: projection, step direction, distance, spec and the error message.

Each assertion pins one quantity with a value worked out by hand, so that a flipped sign, a changed
constant or a swapped norm in :mod:`flowaudit.config.budget` fails here and not only in a long attack.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from flowaudit.config.budget import Budget, parse_budget


def test_budget_is_frozen_and_its_hints_resolve() -> None:
    b = parse_budget("linf:0.1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.eps = 0.2  # type: ignore[misc]
    hints = typing.get_type_hints(Budget)
    assert hints["eps"] == hints["lo"] == hints["hi"] == (float | None)


@pytest.mark.parametrize(
    "text, entry",
    [
        ("none", {"spec": "none", "kind": "none", "eps": None, "lo": None, "hi": None, "norm": "linf"}),
        ("linf:0.25", {"spec": "linf:0.25", "kind": "linf", "eps": 0.25, "lo": None, "hi": None, "norm": "linf"}),
        ("l2:0.5", {"spec": "l2:0.5", "kind": "l2", "eps": 0.5, "lo": None, "hi": None, "norm": "l2"}),
        ("box:-1,3", {"spec": "box:-1,3", "kind": "box", "eps": None, "lo": -1.0, "hi": 3.0, "norm": "linf"}),
    ],
)
def test_spec_norm_and_entry(text: str, entry: dict) -> None:
    b = parse_budget(text)
    assert b.to_dict() == entry
    assert parse_budget(b.spec()) == b  # the spec reads back as the same budget
    assert b.radius == {"none": None, "linf": 0.25, "l2": 0.5, "box": 2.0}[b.kind]


def test_bad_budget_names_every_form() -> None:
    with pytest.raises(ValueError) as e:
        parse_budget("lp:1")
    assert str(e.value) == "bad budget 'lp:1': expected linf:EPS, l2:EPS, box:LO,HI or none"
    for bad in ("box:1,1", "linf:0", "l2:-0.5"):  # an empty box and a zero radius are refused
        with pytest.raises(ValueError) as e:
            parse_budget(bad)
        assert str(e.value) == (
            f"bad budget {bad!r}: expected linf:EPS, l2:EPS, box:LO,HI or none with finite numbers, "
            "EPS > 0 and LO < HI"
        )


def test_linf_projection_clips_each_coordinate_around_the_start() -> None:
    b = parse_budget("linf:0.5")
    y0 = torch.tensor([[1.0, 2.0, -3.0]])
    y = torch.tensor([[1.2, 4.0, -5.0]])  # inside on the first coordinate, outside on the others
    assert torch.equal(b.project(y, y0), torch.tensor([[1.2, 2.5, -3.5]]))
    assert torch.equal(b.project(y0, y0), y0)


def test_l2_projection_scales_rows_back_to_the_sphere_and_keeps_inner_rows() -> None:
    b = parse_budget("l2:1")
    y0 = torch.full((3, 2, 2, 2), 5.0, dtype=torch.float64)  # images: B=3, C=2, 2×2
    d = torch.zeros_like(y0)
    d[0, 0, 0, 0], d[1, 1, 1, 1], d[2, 0, 1, 0] = 4.0, 0.5, -2.0  # outside, inside, outside
    out = b.project(y0 + d, y0)
    want = y0.clone()
    want[0, 0, 0, 0], want[1, 1, 1, 1], want[2, 0, 1, 0] = 6.0, 5.5, 4.0
    assert torch.equal(out, want)
    tiny = Budget("l2", eps=1e-30)  # a radius below the guard against division by zero still projects exactly
    d = torch.tensor([[1.5e-30, 0.0]], dtype=torch.float64)
    assert float(tiny.project(d, torch.zeros_like(d)).norm()) / 1e-30 == pytest.approx(1.0, rel=1e-12)


def test_box_projection_and_valid_range() -> None:
    b = parse_budget("box:-1,1")
    y = torch.tensor([[-3.0, 0.5, 2.0]])
    assert torch.equal(b.project(y, torch.zeros_like(y)), torch.tensor([[-1.0, 0.5, 1.0]]))
    linf = parse_budget("linf:10")
    assert torch.equal(linf.project(y, torch.zeros_like(y), valid=(0.0, 1.0)), torch.tensor([[0.0, 0.5, 1.0]]))


def test_direction_is_the_sign_or_the_unit_gradient() -> None:
    g = torch.zeros((3, 2, 1, 2), dtype=torch.float64)
    g[0, 0, 0, 0], g[0, 1, 0, 1] = 3.0, -4.0
    g[1, 1, 0, 0] = 0.5
    g[2, 0, 0, 1] = 1.5e-30  # tiny but non-zero: still a unit step
    for kind in ("linf", "box", "none"):
        b = Budget(kind, eps=1.0, lo=0.0, hi=1.0)
        assert torch.equal(b.direction(g), g.sign())
    unit = Budget("l2", eps=1.0).direction(g)
    want = torch.zeros_like(g)
    want[0, 0, 0, 0], want[0, 1, 0, 1], want[1, 1, 0, 0], want[2, 0, 0, 1] = 0.6, -0.8, 1.0, 1.0
    assert torch.allclose(unit, want, rtol=1e-12, atol=0)


def test_distance_in_the_budget_norm() -> None:
    y0 = torch.zeros((2, 2))
    y = torch.tensor([[3.0, -4.0], [0.0, 1.0]])
    assert parse_budget("l2:1").distance(y, y0).tolist() == [5.0, 1.0]
    for text in ("linf:1", "box:0,1", "none"):
        assert parse_budget(text).distance(y + 1, y0 + 1).tolist() == [4.0, 1.0]


def test_a_radius_may_be_a_fraction() -> None:
    """``8/255`` (the usual image budget) reads as the quotient; a zero denominator is the one-line error."""
    assert parse_budget("linf:8/255").eps == 8 / 255
    assert parse_budget("l2: 3 / 2 ").eps == 1.5
    assert parse_budget("box:-1/2,1/4") == Budget("box", lo=-0.5, hi=0.25)
    assert parse_budget("linf:1/1").eps == 1.0
    for bad in ("linf:1/0", "l2:1/0.0", "box:0,1/0", "linf:1/2/3", "linf:/2"):
        with pytest.raises(ValueError) as e:
            parse_budget(bad)
        assert str(e.value) == (
            f"bad budget {bad!r}: expected linf:EPS, l2:EPS, box:LO,HI or none with finite numbers, "
            "EPS > 0 and LO < HI"
        )
