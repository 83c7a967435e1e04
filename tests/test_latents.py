"""The scan's latents: one seeded generator per input, drawn for a whole pass at once.

An input's latents are what the adapter draws for that input alone from the generator seeded by (seed, set,
input), whatever else its pass holds. The pass's draw must give exactly those, for every adapter (the bundled
models and each library's conformance cases), and must leave the draw to the adapter where it draws otherwise.
"""

from __future__ import annotations

import pytest
import torch
from conformance import Case
from flowaudit.adapters import adapt, load_model
from test_conformance import PARAMS, _model

from flowaudit.config.sampling import Sampling

CPU = torch.device("cpu")


def _alone(adapter, y, sampling: Sampling, set_index: int, first: int) -> list[torch.Tensor]:
    """The definition: each input's K rows drawn by the adapter from that input's own generator."""
    parts = [
        adapter.sample_latents(
            y[j : j + 1].repeat_interleave(sampling.samples, 0),
            sampling.temperature,
            torch.Generator().manual_seed(sampling.seed_of(set_index, first + j)),
        )
        for j in range(len(y))
    ]
    return [torch.cat(p) for p in zip(*parts)]


def _assert_each_inputs_own(adapter, y, sampling: Sampling) -> None:
    ours = sampling.latents(adapter, y, 1, 7, CPU)
    want = _alone(adapter, y, sampling, 1, 7)
    assert len(ours) == len(want)
    for z, w in zip(ours, want):
        assert z.dtype == w.dtype and torch.equal(z, w)
    split = [sampling.latents(adapter, y[a:b], 1, 7 + a, CPU) for a, b in ((0, 2), (2, len(y)))]
    for z, (p, q) in zip(ours, zip(*split)):  # a pass of any size gives the same rows
        assert torch.equal(z, torch.cat([p, q]))


@pytest.mark.parametrize("name", ["toy-affine", "sr-affine", "lowlight-modified-rq-spline"])
def test_bundled_models(name):
    adapter = load_model(name)
    shape = adapter.condition_shape if name.startswith("toy") else (3, 8, 8)
    y = torch.rand(5, *shape, generator=torch.Generator().manual_seed(0))
    _assert_each_inputs_own(adapter, y, Sampling(4, 0.9, 3))


@pytest.mark.parametrize("case", PARAMS)
def test_library_adapters(case: Case):
    adapter = adapt(_model(case))
    y = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    _assert_each_inputs_own(adapter, y, Sampling(3, 0.7, 11))


def _shifted(adapter):
    """``adapter`` with latents that are not plain ``τ·ε`` (shifted by the condition), its shapes still stated:
    its own draw must be used."""

    class Shifted(type(adapter)):
        def sample_latents(self, y, temperature, generator):
            return [z + y[:, :1] for z in super().sample_latents(y, temperature, generator)]

    adapter.__class__ = Shifted
    return adapter


def test_latents_drawn_otherwise_are_the_adapters_own():
    adapter, plain = _shifted(load_model("toy-affine")), load_model("toy-affine")
    assert adapter.latent_shapes(torch.zeros(1, 2)) == plain.latent_shapes(torch.zeros(1, 2))
    y = torch.arange(12.0).reshape(6, 2)
    _assert_each_inputs_own(adapter, y, Sampling(3, 0.5, 0))
    ours, theirs = (Sampling(3, 0.5, 0).latents(a, y, 1, 7, CPU)[0] for a in (adapter, plain))
    torch.testing.assert_close(ours - theirs, y.repeat_interleave(3, 0)[:, :1].expand_as(ours), rtol=0, atol=1e-6)
