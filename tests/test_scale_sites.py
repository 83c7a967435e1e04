"""Small flows' fixed costs: c' read from the map that made the sample, and the tail probe evaluating every probe
value in one call, with the same figures as the per-value, rebuild-per-call paths they replace."""

from __future__ import annotations

import pytest
import torch
from flowaudit.adapters import adapt, load_model
from flowaudit.adapters.base import Site


def _zuko_nsf():
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    return zuko.flows.NSF(2, 2, transforms=2, bins=8, hidden_features=(16, 16)).eval()


def _probe_values() -> torch.Tensor:
    v = torch.tensor([0.3, 2.0, 7.0, 1e3, 1e30], dtype=torch.float64)
    return torch.cat([-v.flip(0), v])


def _counting_builds(monkeypatch) -> list[int]:
    from zuko.transforms import MonotonicRQSTransform

    count = [0]
    init = MonotonicRQSTransform.__init__

    def counted(self, *args, **kwargs):
        count[0] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(MonotonicRQSTransform, "__init__", counted)
    return count


def test_zuko_gain_comes_from_the_sampling_build(monkeypatch):
    """An observed pass builds each spline as often as the library's own sampling does (no second build for c'),
    and its gains are those of the rebuilt map, bit for bit."""
    flow = _zuko_nsf()
    adapter = adapt(flow)
    y = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    latents = adapter.sample_latents(y, 1.0, torch.Generator().manual_seed(2))
    builds = _counting_builds(monkeypatch)
    gains: dict[str, list] = {}

    class Observer:
        def site(self, name, gain, params):
            gains[name] = [gain, params]

        def layer(self, name, x):
            if name in gains:
                gains[name].append(x)  # the transform's output on the inverse pass: where c' is read

    with torch.no_grad():
        x = adapter.sample(y, latents, Observer())
        observed = builds[0]
        builds[0] = 0
        flow(y).sample()  # the library's own pass, same shapes
        assert observed == builds[0] > 0
        assert torch.equal(x, adapter.sample(y, latents))
        assert len(gains) == 2
        for name, (gain, params, visited) in gains.items():
            site = next(s for s in adapter.sites() if s.name == name)
            assert site.mode == "autoregressive"  # an NSF's transforms map the whole vector
            assert torch.equal(gain, 1.0 / site.derivative(visited, params))  # the map built again from φ


def test_zuko_probe_builds_once_and_matches_repeated_rows():
    """The probe evaluates every value at every point through one build (broadcast), with the bits of the map
    built on rows repeated per value; a parameter tensor changed in place is read as it is now."""
    flow = _zuko_nsf()
    adapter = adapt(flow)
    site = adapter.sites()[0]
    params = torch.randn(50, 2, site.lazy.total, generator=torch.Generator().manual_seed(4))
    values = _probe_values()
    with torch.no_grad():
        fast = site.derivative_at(values, params)
        slow = Site.derivative_at(site, values, params)  # the base: rows repeated, one build a block
        assert fast.shape == (len(values), 100)
        assert torch.equal(fast, slow)
        assert torch.equal(site.derivative_at(values, params), fast)  # the same bits again
        params.mul_(3.0)
        assert torch.equal(site.derivative_at(values, params), Site.derivative_at(site, values, params))
        tails = site.derivative_at(torch.tensor([-1e30, 1e30], dtype=torch.float64), params)
        assert torch.equal(tails, torch.ones_like(tails))  # the identity beyond the knots


@pytest.mark.parametrize("name", ["toy-affine", "toy-modified-rq-spline", "sr-affine"])
def test_reference_probe_in_one_call_matches_per_value(name):
    """A bundled flow's site probes all values in one call, with the bits of one call per value."""
    adapter = adapt(load_model(name))
    site = adapter.sites()[0]
    p = site.module.params_per_dim
    shape = (40, 2 * p) if name.startswith("toy") else (3, 6 * p, 4, 4)
    params = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    values = _probe_values()
    with torch.no_grad():
        batched = site.derivative_at(values, params)
        site.batched_probe = False  # the per-value path: one call per value
        per_value = site.derivative_at(values, params)
    assert type(site).batched_probe
    assert torch.equal(batched, per_value)


@pytest.mark.parametrize("block", ["CoupledRationalQuadraticSpline", "AutoregressiveRationalQuadraticSpline"])
def test_normflows_probe_in_one_call_matches_per_value(block):
    """normflows' spline sites (the conditional ones and a coupling's constant spline) probe every value in one
    call, with the bits of one call per value, at the parameters met while sampling."""
    pytest.importorskip("normflows")
    from conformance.normflows import CASES

    model = next(c for c in CASES if c.id == f"normflows-{block}").build()
    adapter = adapt(model)
    y = torch.randn(24, 2, generator=torch.Generator().manual_seed(1))
    latents = adapter.sample_latents(y, 1.0, torch.Generator().manual_seed(2))
    kept: dict[str, torch.Tensor] = {}

    class Observer:
        def site(self, name, gain, params):
            kept[name] = params

        def layer(self, name, x):
            pass

    with torch.no_grad():
        adapter.sample(y, latents, Observer())
    sites = [s for s in adapter.sites() if s.name in kept and s.kind == "rq-spline"]
    assert len(sites) == len(adapter.sites()) == (4 if block.startswith("Coupled") else 2)  # a coupling: 2 a block
    values = _probe_values()
    for site in sites:
        with torch.no_grad():
            batched = site.derivative_at(values, kept[site.name])
            site.batched_probe = False  # the per-value path, on this instance
            per_value = site.derivative_at(values, kept[site.name])
        assert type(site).batched_probe
        assert batched.shape == (len(values), per_value.shape[1]) and torch.equal(batched, per_value)


def test_gain_plot_draws_the_riskiest_sites_only():
    """A model of many sites gets histograms of the riskiest :data:`GAIN_PANELS` (the page's table order picks
    them, the inverse-pass order draws them); a model of few gets every site."""
    import copy

    import flowaudit
    from flowaudit.render.plots import GAIN_PANELS, gain_plot, gain_sites

    y = torch.randn(6, 2, generator=torch.Generator().manual_seed(6))
    site = flowaudit.scan(load_model("toy-affine"), y, samples=2, device="cpu").data["model"]["sites"][0]
    assert site["inverse_gain"]["histogram"]
    sites = []
    for i in range(20):
        s = copy.deepcopy(site)
        s["name"], s["inverse_gain"]["max"] = f"s{i}", float((i * 7) % 20)  # gains 0 … 19 in a shuffled order
        sites.append(s)
    sites.append(dict(copy.deepcopy(site), name="unvisited", inverse_gain={}))
    drawn = gain_sites(sites)
    assert len(drawn) == GAIN_PANELS
    assert sorted(s["inverse_gain"]["max"] for s in drawn) == [float(g) for g in range(20 - GAIN_PANELS, 20)]
    assert [s["name"] for s in drawn] == [s["name"] for s in sites if s in drawn]  # inverse-pass order
    assert gain_sites(sites[:3]) == sites[:3]
    assert gain_plot(sites).startswith("data:image/png;base64,")
    assert gain_plot(sites[-1:]) is None


def _nflows_spline(inverted: bool):
    pytest.importorskip("nflows")
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms.base import CompositeTransform, InverseTransform
    from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform

    torch.manual_seed(0)
    net = lambda a, b: ResidualNet(a, b, hidden_features=16, context_features=2, num_blocks=1)  # noqa: E731
    t = PiecewiseRationalQuadraticCouplingTransform([1, 0], net, num_bins=8, tails="linear", tail_bound=3.0)
    return Flow(CompositeTransform([InverseTransform(t) if inverted else t]), StandardNormal([2])).eval()


@pytest.mark.parametrize("inverted", [False, True])
def test_nflows_probe_copies_the_rows_once_and_leaves_them_intact(inverted):
    """The probe hands the library its own repeated rows (rescaled in place there) with the bits of the generic
    path, and the kept parameters stay as they were, one probe value included (a view of them)."""
    site = adapt(_nflows_spline(inverted)).sites()[0]
    params = torch.randn(30, 23, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # no cast to copy
    kept = params.clone()
    for values in (_probe_values(), torch.tensor([2.5], dtype=torch.float64)):
        with torch.no_grad():
            fast = site.derivative_at(values, params)
            slow = Site.derivative_at(site, values, params)  # Site.probe: derivative() on repeated rows, copied
        assert fast.shape == (len(values), 30) and torch.equal(fast, slow)
        assert torch.equal(params, kept)
