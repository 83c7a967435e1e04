"""The attack through every library adapter: the default objective differentiates through each library.

Each library detaches (or never returns per element) what the attack needs; the adapters recompute
``1/c'`` from the site's parameters, attached to the graph when the attack's observer asks. Checked on a
small seeded flow per library: the CLI attack runs with the default objective and reports the keys of
``docs/report.md``, the objective never falls, and the gradient of the inverse log-determinant w.r.t. the
condition is finite and equals a central finite difference of the same objective evaluated detached.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from flowaudit.adapters import adapt
from flowaudit.cli.main import cli
from flowaudit.evidence.search import GainKeeper

FACTORIES = '''
import torch
from torch import nn


def nflows():
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.permutations import ReversePermutation

    torch.manual_seed(0)
    steps = []
    for _ in range(2):
        steps += [MaskedAffineAutoregressiveTransform(2, 8, context_features=2), ReversePermutation(2)]
    return Flow(CompositeTransform(steps), StandardNormal([2]))


def zuko():
    from zuko.flows import RealNVP

    torch.manual_seed(0)
    return RealNVP(2, 2, transforms=2, hidden_features=[8, 8])


def freia():
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)
    net = lambda c_in, c_out: nn.Sequential(nn.Linear(c_in, 8), nn.ReLU(), nn.Linear(8, c_out))  # noqa: E731
    inn = Ff.SequenceINN(2)
    for _ in range(2):
        inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(2,), subnet_constructor=net)
    return inn


def normflows():
    import normflows as nf

    torch.manual_seed(0)
    flows = []
    for _ in range(2):
        flows += [nf.flows.MaskedAffineAutoregressive(2, 8, context_features=2, num_blocks=1), nf.flows.Permute(2)]
    return nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(2), flows)
'''

LIBRARIES = [("nflows", "nflows"), ("zuko", "zuko"), ("freia", "FrEIA"), ("normflows", "normflows")]
START_KEYS = {"id", "objective_before", "objective_after", "max_abs", "max_inverse_gain", "nonfinite", "broken",
              "distance", "distance_to_break", "layer"}
SUMMARY_KEYS = {"n_starts", "n_broken", "broken_rate", "median_distance_to_break", "worst_max_abs",
                "worst_inverse_gain", "worst"}


@pytest.fixture
def factories(tmp_path, monkeypatch):
    name = f"fa_libs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return __import__(name)


@pytest.mark.parametrize("factory,module", LIBRARIES)
def test_cli_attack_runs_the_default_objective(factory, module, factories, tmp_path):
    pytest.importorskip(module)
    y = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "rep"
    args = ["-q", "attack", "--model", f"{factories.__name__}:{factory}", "--random-init", "--data",
            str(tmp_path / "y.npy"), "--budget", "linf:0.1", "--steps", "3", "--samples", "2", "--device", "cpu",
            "--out", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    a = rep["attack"]
    assert a["objective"] == "logdet" and a["budget"]["spec"] == "linf:0.1"
    assert len(a["starts"]) == 3 and SUMMARY_KEYS <= set(a["summary"])
    for s in a["starts"]:
        assert START_KEYS <= set(s)
        assert np.isfinite(s["objective_before"]) and s["objective_after"] >= s["objective_before"]
        assert s["distance"] <= 0.1 + 1e-6
    names = [s.name for s in adapt(getattr(factories, factory)()).sites()]
    assert names and set(a["sites"]) == set(names)
    for entry in a["sites"].values():
        assert {"reached", "max_inverse_gain", "budget", "objective", "broken_rate", "n_starts"} <= set(entry)
        assert np.isfinite(entry["max_inverse_gain"]) and entry["objective"] == "logdet"


def _logdet(adapter, y: torch.Tensor, z: list[torch.Tensor]) -> torch.Tensor:
    keeper = GainKeeper()
    adapter.sample(y, z, observer=keeper)
    assert keeper.attached or not torch.is_grad_enabled()
    return keeper.logdet


@pytest.mark.parametrize("factory,module", LIBRARIES)
def test_logdet_gradient_is_finite_and_matches_finite_differences(factory, module, factories):
    pytest.importorskip(module)
    model = getattr(factories, factory)().double().eval()
    adapter = adapt(model)
    y = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = [t.double() for t in adapter.sample_latents(y, 0.9, torch.Generator().manual_seed(2))]
    yg = y.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_logdet(adapter, yg, z).sum(), yg)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    h, fd = 1e-5, torch.zeros_like(y)
    with torch.no_grad():
        for i in range(y.shape[0]):
            for j in range(y.shape[1]):
                e = torch.zeros_like(y)
                e[i, j] = h
                fd[i, j] = (_logdet(adapter, y + e, z)[i] - _logdet(adapter, y - e, z)[i]) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-4, atol=1e-6)


def test_per_site_evidence_per_start_follows_the_schema(factories):
    """Each site's worst case carries, per start, the largest |value| and the non-finite count of the layer
    output it feeds; a site's per-start gains agree with its overall maximum; the report validates."""
    pytest.importorskip("nflows")
    from flowaudit import attack
    from flowaudit.report import validate

    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    rep = attack(factories.nflows(), y, budget="none", steps=4, samples=2, device="cpu")
    validate(rep.data)
    a = rep["attack"]
    ids = [s["id"] for s in a["starts"]]
    for name, entry in a["sites"].items():
        per = entry["per_start"]
        assert [p["id"] for p in per] == ids
        assert max(p["max_inverse_gain"] for p in per) == entry["max_inverse_gain"]
        for p, start in zip(per, a["starts"]):
            assert p["max_abs"] >= 0 and p["nonfinite"] >= 0
            assert p["max_inverse_gain"] <= start["max_inverse_gain"] or np.isnan(start["max_inverse_gain"])
    # sites are listed as sampling meets them; the last one (the first transform) outputs the sample itself
    last = list(a["sites"])[-1]
    assert last == "_transform._transforms.0"
    for p, start in zip(a["sites"][last]["per_start"], a["starts"]):
        assert p["max_abs"] == start["max_abs"] and p["nonfinite"] == start["nonfinite"]
