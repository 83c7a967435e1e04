"""Sites found from where the condition flows, whatever the layer's class.

Each library flow below holds a layer of the user's own class that scales by a raw linear function of the
condition, outside any coupling: it must be found as a site and violate (its log-scale is unbounded). A
layer holding a conditional sub-network that it never calls, and a module of the model that sampling never
runs, are not sites. A conditional layer that mixes elements is conditional but not elementwise: not a
site, and the coverage names it.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import flowaudit
from flowaudit.adapters import adapt
from flowaudit.adapters.dataflow import FlowLayerSite, depends_on_condition, is_elementwise
from flowaudit.cli.main import cli

FIXTURES = '''
import torch
from torch import nn


def _scale(c, w):
    return w(c)  # raw linear log-scale of the condition: unbounded


def nflows(layer="scale"):
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms.base import CompositeTransform, Transform
    from nflows.transforms.coupling import AdditiveCouplingTransform

    class CondScale(Transform):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 2)

        def forward(self, x, context=None):
            s = _scale(context, self.w)
            return x * torch.exp(s), s.sum(1)

        def inverse(self, x, context=None):
            s = _scale(context, self.w)
            return x * torch.exp(-s), -s.sum(1)

    class Idle(Transform):  # holds a conditional network it never calls
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(2, 2)

        def forward(self, x, context=None):
            return x + 1.0, x.new_zeros(x.shape[0])

        def inverse(self, x, context=None):
            return x - 1.0, x.new_zeros(x.shape[0])

    class CondMix(Transform):  # conditional, but mixes the two elements: not elementwise
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 1)

        def _m(self, context):
            a = torch.tanh(self.w(context))[:, 0]
            m = torch.zeros(len(a), 2, 2)
            m[:, 0, 0], m[:, 1, 1], m[:, 0, 1] = 1.0, 1.0, a
            return m

        def forward(self, x, context=None):
            return torch.einsum("bij,bj->bi", self._m(context), x), x.new_zeros(x.shape[0])

        def inverse(self, x, context=None):
            return torch.linalg.solve(self._m(context), x), x.new_zeros(x.shape[0])

    torch.manual_seed(0)
    net = lambda i, o: ResidualNet(i, o, 8, context_features=2, num_blocks=1)  # noqa: E731
    extra = {"scale": CondScale(), "mix": CondMix()}[layer]
    flow = Flow(CompositeTransform([AdditiveCouplingTransform(torch.tensor([1, 0]), net), extra, Idle()]),
                StandardNormal([2]))
    flow.head = nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 2))  # a sub-network sampling never runs
    return flow


def zuko():
    import zuko as zk
    from zuko.flows import MaskedAutoregressiveTransform
    from zuko.lazy import Flow, LazyTransform, UnconditionalDistribution
    from zuko.distributions import DiagNormal
    from zuko.transforms import AffineTransform, DependentTransform

    class CondScale(LazyTransform):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 2)

        def forward(self, c=None):
            return DependentTransform(AffineTransform(torch.zeros(()), torch.exp(_scale(c, self.w))), 1)

    torch.manual_seed(0)
    base = UnconditionalDistribution(DiagNormal, torch.zeros(2), torch.ones(2), buffer=True)
    flow = Flow([MaskedAutoregressiveTransform(2, 2, hidden_features=[8]), CondScale()], base)
    flow.head = nn.Linear(2, 2)
    return flow


def normflows():
    import normflows as nf

    class CondScale(nf.flows.Flow):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(2, 2)

        def forward(self, z, context=None):
            s = _scale(context, self.w)
            return z * torch.exp(s), s.sum(1)

        def inverse(self, z, context=None):
            s = _scale(context, self.w)
            return z * torch.exp(-s), -s.sum(1)

    class Idle(nf.flows.Flow):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(2, 2)

        def forward(self, z, context=None):
            return z + 1.0, z.new_zeros(z.shape[0])

        def inverse(self, z, context=None):
            return z - 1.0, z.new_zeros(z.shape[0])

    torch.manual_seed(0)
    flows = [nf.flows.MaskedAffineAutoregressive(2, 8, context_features=2, num_blocks=1), CondScale(), Idle()]
    return nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(2), flows)


def freia():
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    class CondScale(Fm.InvertibleModule):
        def __init__(self, dims_in, dims_c):
            super().__init__(dims_in, dims_c)
            self.w = nn.Linear(dims_c[0][0], dims_in[0][0])

        def forward(self, x, c=[], rev=False, jac=True):
            s = _scale(c[0], self.w)
            return ((x[0] * torch.exp(-s),), -s.sum(1)) if rev else ((x[0] * torch.exp(s),), s.sum(1))

        def output_dims(self, input_dims):
            return input_dims

    class Idle(Fm.InvertibleModule):  # gets the condition, never reads it
        def __init__(self, dims_in, dims_c):
            super().__init__(dims_in, dims_c)
            self.unused = nn.Linear(dims_c[0][0], 2)

        def forward(self, x, c=[], rev=False, jac=True):
            return ((x[0] - 1.0,) if rev else (x[0] + 1.0,)), x[0].new_zeros(x[0].shape[0])

        def output_dims(self, input_dims):
            return input_dims

    torch.manual_seed(0)
    net = lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.ReLU(), nn.Linear(8, o))  # noqa: E731
    inn = Ff.SequenceINN(2)
    inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(2,), subnet_constructor=net)
    inn.append(CondScale, cond=0, cond_shape=(2,))
    inn.append(Idle, cond=0, cond_shape=(2,))
    return inn
'''

LIBRARIES = [("nflows", "nflows"), ("zuko", "zuko"), ("normflows", "normflows"), ("freia", "FrEIA")]


@pytest.fixture
def fixtures(tmp_path, monkeypatch):
    name = f"fa_sites_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FIXTURES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return __import__(name)


def _scale_site(adapter):
    found = [s for s in adapter.sites() if isinstance(s, FlowLayerSite)]
    assert len(found) == 1, adapter.sites()
    return found[0]


@pytest.mark.parametrize("factory,module", LIBRARIES)
def test_a_condition_dependent_scale_outside_any_coupling_is_a_site(factory, module, fixtures):
    pytest.importorskip(module)
    model = getattr(fixtures, factory)()
    adapter = adapt(model)
    site = _scale_site(adapter)
    assert type(site.module).__name__ == "CondScale"
    # no other layer was taken for one: the unused network, the idle layer and the model's head are not sites
    names = [s.name for s in adapter.sites()]
    assert not any("Idle" == type(getattr(s, "module", None)).__name__ for s in adapter.sites())
    assert not any("head" in n or "unused" in n for n in names)
    assert site.name not in (adapter.coverage()["reason"] or "")  # read, not named as unread
    # its gain while sampling is exp(s(y)), the layer's own scale
    rep = flowaudit.inspect(model, device="cpu", seed=0)
    entry = next(s for s in rep["model"]["sites"] if s["name"] == site.name)
    assert entry["remark2"]["verdict"] == "violates", entry["remark2"]
    assert entry["inverse_gain"]["max"] > 1.0


def test_the_found_site_reports_the_layers_own_gain(fixtures):
    pytest.importorskip("nflows")
    model = fixtures.nflows()
    adapter = adapt(model)
    site = _scale_site(adapter)
    y = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    seen = {}

    class Keep:
        def layer(self, name, x):
            pass

        def site(self, name, gain, params):
            seen[name] = gain

    adapter.sample(y, adapter.sample_latents(y, 0.9, torch.Generator().manual_seed(4)), Keep())
    layer = site.module
    with torch.no_grad():
        expected = torch.exp(layer.w(model._embedding_net(y)))  # c(x) = x e^{s}, so 1/c' = e^{-s}
    torch.testing.assert_close(seen[site.name], 1.0 / expected)


def test_cli_scan_fails_on_the_found_site(fixtures, tmp_path):
    pytest.importorskip("nflows")
    np.save(tmp_path / "y.npy", np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32))
    args = ["-q", "scan", "--model", f"{fixtures.__name__}:nflows", "--random-init", "--data", str(tmp_path / "y.npy"),
            "--samples", "2", "--device", "cpu", "--fail-on", "violation", "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    verdicts = {s["name"]: s["remark2"]["verdict"] for s in rep["model"]["sites"]}
    assert verdicts["_transform._transforms.1"] == "violates"


def test_a_conditional_layer_that_mixes_elements_is_named_not_probed(fixtures):
    pytest.importorskip("nflows")
    adapter = adapt(fixtures.nflows("mix"))
    assert not any(isinstance(s, FlowLayerSite) for s in adapter.sites())
    cov = adapter.coverage()
    assert not cov["complete"] and "_transform._transforms.1" in cov["reason"]


def test_dependence_and_elementwise_checks():
    lin = nn.Linear(2, 3)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    assert depends_on_condition(lambda u, c: u * torch.exp(lin(c)), x, [y, y + 1])
    assert not depends_on_condition(lambda u, c: u * 2.0 + lin(c).detach() * 0.0 + 1.0, x, [y, y + 1])
    assert is_elementwise(lambda u: u * torch.exp(lin(y)) + torch.sinh(u), x)
    assert not is_elementwise(lambda u: u + u.sum(1, keepdim=True), x)
    assert not is_elementwise(lambda u: u.flip(1), x)


def test_a_bundled_flows_site_that_sampling_never_calls_is_no_site():
    from flowaudit.reference_models import ReferenceFlow
    from flowaudit.reference_models.couplings import Affine

    class Spare(ReferenceFlow):
        """x = z / s(y): one affine site, and a second one (``spare``) that no pass calls."""

        task = "toy"

        def __init__(self):
            super().__init__()
            self.condition_shape = (2,)
            self.site, self.spare = Affine(eps=1e-4), Affine(eps=1e-4)

        def encoder_module(self):
            return None

        def default_feature_layers(self):
            return []

        def encode(self, y):
            return y

        def _h(self, y):
            return torch.stack([torch.zeros_like(y), -y], 2).flatten(1, 2)

        def forward(self, x, y):
            z, ladj = self.site(x, self._h(y))
            return [z], ladj.flatten(1).sum(1)

        def reverse(self, latents, y):
            return self.site(latents[0], self._h(y), reverse=True)[0]

        def latent_shapes(self, y):
            return [(y.shape[0], 2)]

        def trace_layers(self):
            return ["site"]

    flow = Spare()
    assert [s.name for s in adapt(flow).sites()] == ["site"]
    assert flow.training  # the pass that finds the calls leaves the model's mode as it was
