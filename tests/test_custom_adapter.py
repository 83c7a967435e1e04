"""A flow of one's own (examples/custom_flow.py) through :mod:`flowaudit.adapters.custom`, and ``--weights``.

The flow's affine coupling has a hand-written scale; the adapter must find its sites, compute
``c'`` by JVP equal to the coupling's own scale, sample exactly as the flow does, leave no hook
or wrapper behind, restore ``training``, and give Remark 2's ``violates``. ``--weights`` that
cannot be used is exit 2 with one line, never ignored.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from flowaudit.adapters import Adapter, ModelError, adapt, custom, load_model
from flowaudit.adapters.custom import CustomAdapter, site
from flowaudit.adapters.hooks import HookError

import flowaudit
from flowaudit.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_flow_example", ROOT / "examples" / "custom_flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _load_example()


class Recorder:
    """An observer that keeps what the adapter reports."""

    def __init__(self):
        self.gains, self.params, self.layers = {}, {}, []

    def layer(self, name, x):
        self.layers.append(name)

    def site(self, name, gain, params):
        self.gains[name], self.params[name] = gain, params


def _no_trace(flow):
    """No hook on any module and no instance wrapper left behind."""
    for m in flow.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert "inverse" not in vars(m) and "forward" not in vars(m)


@pytest.fixture()
def flow():
    return ex.build()


def test_sites_found_and_declared_on_the_class(flow):
    adapter = adapt(flow)  # ToyFlow.__flowaudit__
    assert isinstance(adapter, CustomAdapter) and adapter.family == "custom"
    assert [s.name for s in adapter.sites()] == [f"couplings.{i}" for i in range(4)]
    assert {s.kind for s in adapter.sites()} == {"affine"}
    assert adapter.layer_names() == [f"couplings.{i}" for i in (3, 2, 1, 0)]
    assert adapter.feature_layers() == ["encoder.net.1", "encoder.net.3"]
    assert adapter.coverage() == {"n_sites": 4, "complete": True, "reason": None}


def test_gain_is_one_over_the_hand_written_scale_and_c_prime_is_the_jvp(flow):
    adapter = ex.auditable(flow)
    y = torch.randn(6, 2)
    z = adapter.sample_latents(y, 0.9, torch.Generator().manual_seed(0))
    rec = Recorder()
    with torch.no_grad():
        adapter.sample(y, z, rec)
    assert rec.layers == adapter.layer_names()
    # the coupling's own scale at the points the inverse pass visited
    with torch.no_grad():
        h, x = flow.encoder(y), z[0]
        for i in (3, 2, 1, 0):
            c = flow.couplings[i]
            x = c.inverse(x, h)
            s, _ = c.params(c.split(x)[0], h)
            torch.testing.assert_close(rec.gains[f"couplings.{i}"], 1 / s)
    values = torch.tensor([-1e3, -2.0, 0.5, 40.0], dtype=torch.float64)
    for s in adapter.sites():
        p = rec.params[s.name]
        d = s.derivative_at(values, p)
        jvp = torch.func.jvp(lambda v: s.map_at(v, p), (values,), (torch.ones_like(values),))[1]
        assert d.shape == (4, 6) and d.dtype == torch.float64
        torch.testing.assert_close(d, jvp)
        torch.testing.assert_close(d[0], (1 / rec.gains[s.name]).flatten().double())  # affine: c' = s everywhere


def test_unknown_kind_derivative_by_jvp_and_closed_form():
    """A map whose c' depends on x: the JVP equals the hand derivative; a declared one is used as given."""
    fn = lambda x, p: x + p[0] * torch.tanh(x)  # noqa: E731
    by_jvp = site("m", read=None, map=fn)
    by_hand = site("m", read=None, map=fn, derivative=lambda x, p: 1 + p[0] * (1 - torch.tanh(x) ** 2))
    x, a = torch.randn(5, 3), torch.rand(5, 3) * 0.9
    for s in (by_jvp, by_hand):
        packed = s._pack(x, (a, torch.zeros(1)))
        assert s.kind == "unknown" and packed.shape == (5, 3 * 1 + 1)
        values = torch.linspace(-3, 3, 7, dtype=torch.float64)
        want = torch.stack([1 + a.double().flatten() * (1 - torch.tanh(v) ** 2) for v in values])
        torch.testing.assert_close(s.derivative_at(values, packed), want)
    with pytest.raises(ValueError, match="needs map"):
        site("m", read=None, kind="rq-spline")
    with pytest.raises(ValueError, match="unknown site kind"):
        site("m", read=None, kind="affine-ish")


def test_probe_takes_every_value_in_one_call_with_the_bits_of_one_call_a_value():
    """A declared site maps each row by its own parameters (one tensor or a tuple of them), so the probe repeats
    the rows once per value and calls the map once; c' and c come out as from one call per value, to the bit."""
    fn = lambda x, p: x + p[0] * torch.tanh(x)  # noqa: E731
    sites = [
        site("m", read=None, map=fn),  # c' by autograd
        site("m", read=None, map=fn, derivative=lambda x, p: 1 + p[0] * (1 - torch.tanh(x) ** 2)),
        site("m", read=None, kind="affine"),
    ]
    g = torch.Generator().manual_seed(7)
    x, a = torch.randn(6, 3, generator=g), torch.rand(6, 3, generator=g)
    values = torch.tensor([-1e30, -7.0, -0.3, 0.0, 0.3, 7.0, 1e30], dtype=torch.float64)
    for s, params in zip(sites, [(a, torch.zeros(1)), (a, torch.zeros(1)), (a, a.neg())]):
        packed = s._pack(x, params)
        with torch.no_grad():
            batched = (s.derivative_at(values, packed), s.map_at(values, packed))
            s.batched_probe = False  # the per-value path, on this instance
            per_value = (s.derivative_at(values, packed), s.map_at(values, packed))
        assert type(s).batched_probe
        for b, v in zip(batched, per_value):
            assert b.shape == (len(values), 18) and torch.equal(b, v)


def test_sampling_forward_and_log_prob_match_the_flow(flow):
    adapter = adapt(flow)
    y, x = torch.randn(8, 2), torch.randn(8, 2) * 0.3
    with torch.no_grad():
        own = flow.sample(y, 0.9, torch.Generator().manual_seed(3))
        latents = adapter.sample_latents(y, 0.9, torch.Generator().manual_seed(3))
        torch.testing.assert_close(adapter.sample(y, latents), own)
        torch.testing.assert_close(adapter.sample(y, latents, Recorder()), own)
        torch.testing.assert_close(adapter.log_prob(x, y), flow.log_prob(x, y))
        zs, _ = adapter.forward(x, y)
        torch.testing.assert_close(adapter.sample(y, zs), x, atol=1e-5, rtol=1e-5)


def test_hooks_removed_and_training_restored_also_after_a_failure(flow):
    adapter = adapt(flow)
    flow.train()
    flow.couplings[1].eval()
    flags = [m.training for m in flow.modules()]
    adapter.sample(torch.randn(3, 2), adapter.sample_latents(torch.randn(3, 2), 1.0, None), Recorder())
    _no_trace(flow)

    class Broken(Recorder):
        def site(self, name, gain, params):
            raise RuntimeError("observer broke")

    with pytest.raises(HookError, match="couplings.3"):
        adapter.sample(torch.randn(3, 2), adapter.sample_latents(torch.randn(3, 2), 1.0, None), Broken())
    _no_trace(flow)
    assert [m.training for m in flow.modules()] == flags
    flow.train()  # the engine restores the root's flag (per-module flags: its own business)
    flowaudit.inspect(adapter, device="cpu", samples=2)
    _no_trace(flow)
    assert all(m.training for m in flow.modules())


def test_inspect_and_scan_say_violates(flow):
    report = flowaudit.inspect(flow, device="cpu", samples=2)
    sites = report["model"]["sites"]
    assert report["model"]["adapter"] == "custom" and len(sites) == 4
    assert all(s["remark2"]["verdict"] == "violates" for s in sites)
    assert all(s["inverse_gain"]["max"] > 0 for s in sites)
    from flowaudit.reference_models.toy import toy_data

    scan = flowaudit.scan(
        flow,
        toy_data(12, seed=1)[1],
        ood=toy_data(12, seed=1, ood=True)[1],
        fit_data=toy_data(200, seed=0)[1],
        samples=2,
        device="cpu",
    )
    assert scan.violations() == [f"couplings.{i}" for i in range(4)]
    assert scan["ood"]["layers"] == ["encoder.net.1", "encoder.net.3"]


def test_declaration_errors(flow):
    kw = dict(condition_shape=(2,), latent_shape=(2,), inverse=flow.inverse, forward=flow)
    read = ex.read_coupling
    with pytest.raises(ValueError, match="no module named 'couplings.9'"):
        CustomAdapter(flow, sites=[site("couplings.9", read=read, kind="affine")], **kw)
    with pytest.raises(ValueError, match="two sites are named"):
        CustomAdapter(flow, sites=[site("couplings.0", read=read, kind="affine")] * 2, **kw)
    with pytest.raises(ValueError, match="encoder"):
        CustomAdapter(flow, encoder=["encoder.nope"], **kw)
    with pytest.raises(ValueError, match="is not a module of"):
        CustomAdapter(flow, sites=[site(torch.nn.Linear(2, 2).forward, read=read, kind="affine")], **kw)
    with pytest.raises(TypeError, match="not a module name"):
        CustomAdapter(flow, sites=[site(print, read=read, kind="affine")], **kw)
    # a module name works as well as a bound method (here the hooks watch forward, which sampling never calls)
    adapter = CustomAdapter(flow, sites=[site("couplings.0", read=read, kind="affine")], **kw)
    adapter.sample(torch.randn(2, 2), [torch.randn(2, 2)], Recorder())
    assert "never called while sampling: couplings.0" in adapter.coverage()["reason"]


def test_docstring_example_runs():
    assert doctest.testmod(custom, optionflags=doctest.ELLIPSIS).failed == 0


# -- the CLI: `--model module:factory --weights FILE` ----------------------------------------------


@pytest.fixture()
def cli_run(monkeypatch):
    monkeypatch.chdir(ROOT)  # `examples.custom_flow` is importable from the working directory, as for uvicorn
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, ["-q", *map(str, args)])

    return invoke


@pytest.fixture()
def weights(tmp_path):
    """Weights that differ from build()'s, so that loading them shows."""
    flow = ex.build()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.01)
    path = tmp_path / "w.pt"
    torch.save(flow.state_dict(), path)
    return path, adapt(flow).fingerprint()


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    """A module of odd factories, importable under a unique name."""
    name = f"fa_factories_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from flowaudit.adapters import Adapter\n"
        "class Bare(Adapter):\n"
        "    condition_shape = (2,)\n"
        "    def sites(self): return []\n"
        "    def sample_latents(self, y, t, g): return []\n"
        "    def sample(self, y, latents, observer=None): return y\n"
        "    def forward(self, x, y): return [x], x[:, 0] * 0\n"
        "    def log_prob(self, x, y): return x[:, 0] * 0\n"
        "def not_a_module(): return {'weights': 1}\n"
        "def adapter_of_no_module(): return Bare(object(), 'bare')\n"
        "def raises(): raise RuntimeError('no GPU here\\nsecond line')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _one_line_error(res, *words):
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flowaudit: error:"), err
    assert "Traceback" not in res.output
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("factory", ["build", "build_adapter"])
def test_cli_factory_with_weights(cli_run, weights, factory):
    path, fingerprint = weights
    res = cli_run(
        "inspect", "--model", f"examples.custom_flow:{factory}", "--weights", path, "--json", "--device", "cpu"
    )
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout)["model"]
    assert model["fingerprint"] == fingerprint  # the weights were loaded, not ignored
    assert [s["remark2"]["verdict"] for s in model["sites"]] == ["violates"] * 4


def test_weights_with_a_bundled_name_or_a_checkpoint_is_exit_2(cli_run, weights):
    path, _ = weights
    _one_line_error(cli_run("inspect", "toy-affine", "--weights", path), str(path), "bundled model", "own weights")
    ckpt = ROOT / "reference_models" / "checkpoints" / "toy-affine.pt"
    _one_line_error(cli_run("inspect", ckpt, "--weights", path), str(path), "checkpoint", "own weights")


def test_weights_that_cannot_be_loaded_are_exit_2(cli_run, weights, factories, tmp_path):
    path, _ = weights
    _one_line_error(
        cli_run("inspect", "--model", f"{factories}:not_a_module", "--weights", path),
        str(path),
        "dict",
        "not an nn.Module",
    )
    _one_line_error(
        cli_run("inspect", "--model", f"{factories}:adapter_of_no_module", "--weights", path),
        str(path),
        "adapter whose model is a object",
    )
    _one_line_error(
        cli_run("inspect", "--model", "examples.custom_flow:Encoder", "--weights", path),
        str(path),
        "does not fit",
        "missing keys net.0.weight",
    )
    tensor = tmp_path / "t.pt"
    torch.save(torch.zeros(3), tensor)
    _one_line_error(
        cli_run("inspect", "--model", "examples.custom_flow:build", "--weights", tensor),
        str(tensor),
        "not a state dict",
    )


def test_factory_that_raises_or_is_missing_is_exit_2(cli_run, factories):
    _one_line_error(
        cli_run("inspect", "--model", f"{factories}:raises"), f"{factories}:raises", "RuntimeError: no GPU here"
    )
    _one_line_error(cli_run("inspect", "--model", f"{factories}:nope"), f"{factories}:nope", "has no attribute")
    _one_line_error(cli_run("inspect", "--model", "no_such_module_xyz:build"), "no_such_module_xyz")
    _one_line_error(cli_run("inspect", "--model", f"{factories}:not_a_module"), "no flowaudit adapter", "CustomAdapter")


def test_load_model_raises_model_error(weights, factories):
    path, _ = weights
    with pytest.raises(ModelError, match="own weights"):
        load_model("toy-affine", weights=str(path))
    with pytest.raises(ModelError, match="the factory raised RuntimeError"):
        load_model(f"{factories}:raises")
    assert isinstance(load_model(f"{factories}:adapter_of_no_module", random_init=True), Adapter)


# -- declared kinds drive the structural view; unknown ones are measured ----------------------------


class ShiftFlow(torch.nn.Module):
    """An additive coupling flow of one's own: x_b ↦ x_b + t(x_a, y) (identity tails: Remark 2 compliant)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.nets = torch.nn.ModuleList(torch.nn.Linear(3, 1) for _ in range(2))

    def forward(self, x, y):
        for i, net in enumerate(self.nets):
            a, b = (x[:, :1], x[:, 1:]) if i % 2 == 0 else (x[:, 1:], x[:, :1])
            b = b + net(torch.cat([a, y], 1))
            x = torch.cat([a, b], 1) if i % 2 == 0 else torch.cat([b, a], 1)
        return x, x.new_zeros(len(x))

    def inverse(self, z, y):
        for i in reversed(range(len(self.nets))):
            z = self.step(i, z, y)
        return z

    def step(self, i, z, y):
        a, b = (z[:, :1], z[:, 1:]) if i % 2 == 0 else (z[:, 1:], z[:, :1])
        b = b - self.nets[i](torch.cat([a, y], 1))
        return torch.cat([a, b], 1) if i % 2 == 0 else torch.cat([b, a], 1)


def test_additive_sites_comply_and_unknown_kinds_are_measured():
    flow = ShiftFlow()
    order = lambda i, x: (x[:, :1], x[:, 1:]) if i % 2 == 0 else (x[:, 1:], x[:, :1])  # noqa: E731

    def read(flow, args, x):  # step(i, z, y) returned x: the site shifted x_b by net_i([x_a, y])
        i, _, y = args
        a, b = order(i, x)
        return b, flow.nets[i](torch.cat([a, y], 1))

    kw = dict(condition_shape=(2,), latent_shape=(2,), inverse=flow.inverse, forward=flow, output_range=(-3.0, 3.0))
    adapter = CustomAdapter(flow, sites=[site(flow.step, read=read, kind="additive")], **kw)
    report = flowaudit.inspect(adapter, device="cpu", samples=2)
    (entry,) = report["model"]["sites"]
    assert entry["name"] == "step" and entry["kind"] == "additive"  # a method of the flow itself
    assert entry["remark2"]["verdict"] == "compliant" and entry["remark2"]["tail_ratio"] == 1.0
    assert entry["inverse_gain"]["max"] == 1.0
    # the same map declared as unknown: no structure to read, c' = 1 measured by JVP over the whole range
    unknown = CustomAdapter(flow, sites=[site(flow.step, read=read, map=lambda x, t: x + t)], **kw)
    (entry,) = flowaudit.inspect(unknown, device="cpu", samples=2)["model"]["sites"]
    assert entry["kind"] == "unknown" and entry["remark2"]["tail_ratio"] == 1.0
    assert entry["remark2"]["verdict"] == "compliant" and entry["remark2"]["rests_on"] == ["measured", "swept"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda(flow):
    report = flowaudit.inspect(flow, device="cuda", samples=2)
    assert [s["remark2"]["verdict"] for s in report["model"]["sites"]] == ["violates"] * 4
    assert next(flow.parameters()).device.type == "cpu"
    _no_trace(flow)
