"""The CPU reservoir's halves hold arrays for the rows they hold, grown as rows come, with the rows, slots and
order of halves made at full capacity at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowaudit.tracing.reservoir import ParamReservoir, uniform_keys

BUDGET = 4096


def _calls(seed: int, sizes: list[int], m: int, ties: bool):
    """Calls of ``sizes`` rows of ``m`` numbers, their gains (few distinct values where ``ties``) and first inputs."""
    rng = np.random.default_rng(seed)
    out, first = [], 0
    for b, n in enumerate(sizes):
        rows = rng.standard_normal((n, m)).astype(np.float32)
        gain = rng.integers(0, 4, n).astype(np.float64) if ties else rng.random(n)
        out.append((rows, gain, first, b))
        first += n
    return out


def _offered(calls, full: bool) -> ParamReservoir:
    r = ParamReservoir(BUDGET, salt=11)
    for rows, gain, first, b in calls:
        if full and r._host is not None and r._growing:  # the reference: every slot made before the next rows
            for half in r._host:
                half._resize(half.k)
            r._room(0)
        r.add_host(rows, gain, first, 1, b)
        if full and r._growing:
            for half in r._host:
                half._resize(half.k)
            r._room(0)
    return r


def test_a_half_holding_few_rows_holds_arrays_for_about_those_rows():
    m = 16
    k_top, k_rand = ParamReservoir(BUDGET).capacity(m)
    r = ParamReservoir(BUDGET, salt=3)
    held = 0
    for rows, gain, first, b in _calls(0, [3, 5, 1, 8, 7], m, ties=False):
        r.add_host(rows, gain, first, 1, b)
        held += len(rows)
        for half in r._host:
            assert int(half.fill[0]) == held < half.k
            assert held <= len(half.heap) <= 4 * held  # O(rows held), not k
            assert half.rows().shape[0] == half.flat.shape[0] == len(half.score) == len(half.ids) == len(half.heap)
            assert half.nbytes() < 4 * held * (4 * m + 40) + 64
    assert (k_top, k_rand) == (128, 128)
    assert r.info()["rows"] == held  # every row kept, in both halves
    state = r.state()
    assert len(state["top"][0]) == len(state["rand"][0]) == held


@pytest.mark.parametrize("sizes", [[1] * 300, [7, 1, 64, 200, 3, 90], [128], [129, 500], [2, 2, 250, 1]])
@pytest.mark.parametrize("ties", [False, True])
def test_growing_halves_keep_the_rows_and_order_of_full_ones(sizes, ties):
    calls = _calls(len(sizes), sizes, 16, ties)
    grown, full = _offered(calls, full=False), _offered(calls, full=True)
    assert max(len(h.heap) for h in grown._host) <= max(h.k for h in grown._host)
    a, b = grown.state(), full.state()
    for half in ("top", "rand"):
        for x, y in zip(a[half], b[half]):
            assert torch.equal(x, y)
    # and they are the top k by (score, smaller id): gains for the first half, smallest uniform keys for the other
    rows = np.concatenate([c[0] for c in calls])
    gain = np.concatenate([c[1] for c in calls])
    ids = np.arange(len(gain))
    keys = -uniform_keys(torch.from_numpy(ids), 11).numpy()
    k_top, k_rand = grown.capacity(16)
    for half, score, k in (("top", gain, k_top), ("rand", keys, k_rand)):
        want = np.lexsort((ids, -score))[:k]
        got = a[half][2][:, 0].numpy()
        assert sorted(got) == sorted(want)
        assert np.array_equal(a[half][0].numpy(), rows[got])


def test_a_resumed_half_grows_from_what_it_kept():
    calls = _calls(5, [40, 30, 300], 16, ties=True)
    one = _offered(calls, full=False)
    first = _offered(calls[:1], full=False)
    again = ParamReservoir.from_state(first.state())
    for rows, gain, start, b in calls[1:]:
        again.add_host(rows, gain, start, 1, b)
    a, b = one.state(), again.state()
    for half in ("top", "rand"):
        assert sorted(a[half][2][:, 0].tolist()) == sorted(b[half][2][:, 0].tolist())
