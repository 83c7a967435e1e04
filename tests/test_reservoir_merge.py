"""The reservoir's in-order merge keeps exactly the rows of the general one.

A scan folds its shards in input order, and a device pass offers rows above every id kept so far: both
place the new rows among the kept ones (:meth:`ParamReservoir._append`, sorting the new rows only) where
the general merge sorts the union. Ties in score are frequent (an exploding site reads ``inf`` on many
rows), so the cases round scores to a few values.
"""

from __future__ import annotations

import pytest
import torch

from flowaudit.tracing.reservoir import ParamReservoir


def _part(n: int, first: int, seed: int, m: int = 3, levels: int = 4) -> tuple:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, m, generator=g)
    score = torch.randint(0, levels, (n,), generator=g).double()  # few values: many ties
    score[torch.rand(n, generator=g) < 0.1] = float("inf")
    r = torch.arange(first, first + n)
    ids = torch.stack([r, r // 4, torch.zeros_like(r)], 1)
    return rows, score, ids


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("n_old", "n_new", "k"), [(0, 7, 5), (5, 0, 5), (5, 9, 5), (3, 4, 10), (16, 16, 16), (2, 40, 9)]
)
def test_append_equals_the_general_merge(seed: int, n_old: int, n_new: int, k: int) -> None:
    old = ParamReservoir._rank(_part(n_old, 0, seed))
    new = _part(n_new, 100, seed + 50)
    want = ParamReservoir._merge(old, new, k)
    got = ParamReservoir._append(old, new, k)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert len(got[1]) == min(k, n_old + n_new)
    s, i = got[1], got[2][:, 0]  # rank order: score descending, ties by ascending id
    assert bool(((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (i[:-1] < i[1:]))).all())


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("budget", [6, 24, 400])
@pytest.mark.parametrize("backwards", [False, True])
def test_folded_shards_keep_the_rows_of_one_reservoir(compiled: bool, budget: int, backwards: bool) -> None:
    """Shards folded in input order (the scan's way) or backwards keep the rows one reservoir over all inputs
    keeps, whether a shard's halves come from the compiled heaps or from tensor merges, and whether or not they
    overflow."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(240, 3, generator=g)
    gain = torch.randint(0, 3, (240,), generator=g).double()
    whole = ParamReservoir(budget, salt=9, compiled=compiled)
    whole.add(rows, gain, 0, 4, 0)
    folded = None
    for s in reversed(range(6)) if backwards else range(6):  # six shards of 10 inputs, two calls a shard
        shard = ParamReservoir(budget, salt=9, compiled=compiled)
        for c in range(2):
            a = s * 40 + c * 20
            shard.add(rows[a : a + 20], gain[a : a + 20], a // 4, 4, s * 2 + c)
        shard = ParamReservoir.from_state(shard.state())
        folded = shard if folded is None else folded.merge(shard)
    a, b = whole.kept(), folded.kept()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][:, :2], b[1][:, :2])
    assert folded.info()["rows"] == whole.info()["rows"]
