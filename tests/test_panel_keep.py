"""The worst-input panel shows the scan's own samples, kept while sampling instead of drawn again."""

from __future__ import annotations

import random

import torch
from flowaudit.adapters import adapt
from flowaudit.adapters.reference import ReferenceAdapter
from flowaudit.reference_models import build

import flowaudit
from flowaudit.config.sampling import Sampling
from flowaudit.runs.passes import Keeper, risk_key
from flowaudit.runs.runner import Context

TINY = dict(L=3, K=1, nf=8, nb=2, gc=4, hidden_channels=8, patch=16, scale=4, coupling="affine")


def _model():
    torch.manual_seed(0)
    return build("sr", TINY).eval()


def _data():
    g = torch.Generator().manual_seed(3)
    y, y_ood = torch.rand(9, 3, 4, 4, generator=g), torch.rand(5, 3, 4, 4, generator=g).pow(6)
    return y, y_ood


def _count(monkeypatch) -> list[int]:
    calls, real = [], ReferenceAdapter.sample

    def counted(self, y, *args, **kwargs):
        calls.append(int(y.shape[0]))
        return real(self, y, *args, **kwargs)

    monkeypatch.setattr(ReferenceAdapter, "sample", counted)
    return calls


def _resampled(model, item, sets, samples: int, seed: int, shown: int) -> torch.Tensor:
    """The panel's samples as drawn again from the input's seed (what the panel did before keeping them)."""
    adapter = adapt(model)
    index = [name for name, _ in sets].index(item.set)
    j = int(item.id.split("row")[-1])
    y = item.y[None]
    lat = [z[:shown] for z in Sampling(samples, 0.8, seed).latents(adapter, y, index, j, torch.device("cpu"))]
    with torch.no_grad():
        return adapter.sample(y.repeat_interleave(shown, 0), lat)


def test_panel_samples_are_the_scans_own_bit_for_bit(monkeypatch):
    model, (y, y_ood) = _model(), _data()
    calls = _count(monkeypatch)
    rep = flowaudit.scan(model, y, ood=y_ood, samples=4, temperature=0.8, seed=5, device="cpu")
    assert len(rep.panel) == 6
    # K = 4 rows: one call a pass (14 inputs) and the memory probe's; 3 rows: a panel input drawn again (none)
    assert calls.count(4) == 15 and calls.count(3) == 0
    sets = [("in", None), ("ood", None)]
    order = sorted(range(len(rep["inputs"])), key=lambda i: risk_key(rep["inputs"][i]))[:6]
    assert [item.id for item in rep.panel] == [rep["inputs"][i]["id"] for i in order]
    for item in rep.panel:
        assert item.samples.shape == (3, 3, 16, 16)
        assert torch.equal(item.samples, _resampled(model, item, sets, 4, 5, 3))


def test_a_resumed_scan_draws_the_panel_again_the_same(monkeypatch, tmp_path):
    """Shards loaded from the work folder were not sampled here: their panel inputs are drawn again."""
    model, (y, y_ood) = _model(), _data()
    kw = dict(ood=y_ood, samples=4, temperature=0.8, seed=5, device="cpu")
    first = flowaudit.scan(model, y, context=Context(work_dir=tmp_path / "w"), **kw)
    calls = _count(monkeypatch)
    again = flowaudit.scan(model, y, context=Context(work_dir=tmp_path / "w", resume=True), **kw)
    assert calls.count(4) == 1 and calls.count(3) == 6  # the probe, each panel input drawn again, no shard
    assert [i.id for i in again.panel] == [i.id for i in first.panel]
    for a, b in zip(first.panel, again.panel):
        assert torch.equal(a.samples, b.samples)


def test_keeper_keeps_what_a_stable_sort_ranks_first():
    rng = random.Random(0)
    recs = [
        {
            "n_inf": rng.choice([0, 0, 0, 1, 2]),
            "n_pixel_err": rng.choice([0, 0, 3]),
            "s_ood": rng.choice([None, 1.0, 2.0]),
            "max_abs": rng.choice([0.5, 1.0]),
        }
        for _ in range(60)
    ]
    keep = Keeper(n=6, shown=2)
    x = torch.arange(60 * 3, dtype=torch.float32)[:, None]  # 3 samples an input, input-major
    for start in range(0, 60, 7):  # passes of up to 7 inputs, in two sets of 30
        stop = min(start + 7, 30 if start < 30 else 60)
        for lo, hi in ((start, min(stop, 30)), (max(start, 30), stop)):
            if lo < hi:
                keep.offer(lo // 30, lo % 30, recs[lo:hi], x[3 * lo : 3 * hi], 3)
    want = sorted(range(60), key=lambda i: risk_key(recs[i]))[:6]
    kept = [i for i in range(60) if keep.samples(i // 30, i % 30) is not None]
    assert sorted(kept) == sorted(want)
    for i in want:
        assert torch.equal(keep.samples(i // 30, i % 30), x[3 * i : 3 * i + 2])
