"""One progress bar per phase, over its true total: fit, sample (every set, every shard), probe, attack."""

from __future__ import annotations

import pytest
import torch
from flowaudit.adapters import load_model
from flowaudit.reference_models.toy import toy_data

import flowaudit
import flowaudit.config.sampling as sampling
from flowaudit.runs.shards import SHARD_INPUTS


class _Bar:
    """Stands in for tqdm: keeps the totals and what was counted."""

    made: list[_Bar] = []

    def __init__(self, **kw):
        self.kw, self.n = kw, 0
        _Bar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def bars(monkeypatch):
    _Bar.made = []
    monkeypatch.setattr(sampling, "BAR_FACTORY", _Bar)
    return lambda: {b.kw["desc"]: (b.kw["total"], b.n) for b in _Bar.made if not b.kw["disable"]}


def test_scan_draws_one_bar_per_phase_over_every_shard(bars):
    n_in, n_ood = 3 * SHARD_INPUTS + 5, SHARD_INPUTS + 1  # several shards in each set
    fit = toy_data(200, seed=0)[1]
    y, ood = toy_data(n_in, seed=1)[1], toy_data(n_ood, seed=1, ood=True)[1]
    adapter = load_model("toy-affine")
    flowaudit.scan(adapter, y, ood=ood, fit_data=fit, samples=2, device="cpu", progress=True)
    seen = bars()
    n_sites = len(adapter.sites())
    assert seen == {"fit": (200, 200), "sample": (n_in + n_ood, n_in + n_ood), "probe": (n_sites, n_sites)}
    # the same run with progress off draws nothing
    _Bar.made = []
    flowaudit.scan(adapter, y[:4], samples=2, device="cpu", progress=False)
    assert bars() == {}


def test_attack_bar_counts_every_step_of_every_start(bars):
    y = toy_data(20, seed=2)[1]  # two shards of starts
    flowaudit.attack(
        load_model("toy-affine"), y, budget="linf:0.1", steps=3, starts=20, samples=2, device="cpu", progress=True
    )
    assert bars() == {"attack": (20 * 3, 20 * 3)}


def test_phase_settles_each_part_once():
    _Bar.made = []
    old, sampling.BAR_FACTORY = sampling.BAR_FACTORY, _Bar
    try:
        with sampling.Phase(10, "sample", True) as phase:
            phase.advance("a", 2)
            phase.settle("a", 4)  # the rest of part a arrived at once
            phase.settle("a", 4)  # settled twice: counted once
            phase.settle("b", 3)  # a part computed elsewhere (another rank, a resumed shard)
            phase.finish()
        assert _Bar.made[0].n == 10 and _Bar.made[0].kw["total"] == 10
    finally:
        sampling.BAR_FACTORY = old


def test_quiet_and_ranks_turn_bars_off():
    from flowaudit.cli.options import CommandState, run_settings

    class Group:
        device, leader = torch.device("cpu"), False

    class Run:
        group = Group()

    assert run_settings(CommandState()).progress
    assert not run_settings(CommandState(quiet=True)).progress
    assert not run_settings(CommandState(), Run()).progress  # rank ≠ 0 of a torchrun
    Group.leader = True
    assert run_settings(CommandState(), Run()).progress
