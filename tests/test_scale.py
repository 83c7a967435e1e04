"""Small flows batched across inputs: the same per-input figures as exact passes, c' from the sampling call,
and the GPU path (skipped without a GPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from flowaudit.adapters import adapt, load_model, rows_independent, small_flow

import flowaudit
from flowaudit.runs.shards import shard_slices

K = 4


def _toy_y(n: int = 40) -> torch.Tensor:
    from flowaudit.reference_models.toy import toy_data

    return toy_data(n, seed=10_001)[1]


def _records(report) -> list[dict]:
    return json.loads(report.to_json())["inputs"]


def test_small_flow_rule():
    toy, sr = adapt(load_model("toy-affine")), adapt(load_model("sr-affine"))
    assert small_flow(toy, torch.zeros(1, 2))
    assert not small_flow(sr, torch.zeros(1, 3, 8, 8))  # an image flow: one input's samples are a large call


def test_toy_batched_passes_match_exact_ones():
    """Default passes of a small flow (1024 inputs a pass) against one input a pass: every per-input figure
    to float32 rounding (the toy's MLP kernels are not batch-invariant on the CPU)."""
    y = _toy_y()
    batched = flowaudit.scan(load_model("toy-affine"), y, samples=K, seed=2, device="cpu")
    exact = flowaudit.scan(load_model("toy-affine"), y, samples=K, seed=2, device="cpu", exact=True)
    assert batched.data["settings"]["passes"] == {"inputs_per_pass": 1024, "small_flow": True}
    assert exact.data["settings"]["passes"] == {"inputs_per_pass": 1, "small_flow": False}
    for a, b in zip(_records(batched), _records(exact), strict=True):
        assert a["id"] == b["id"] and a["n_inf"] == b["n_inf"] and a["n_pixel_err"] == b["n_pixel_err"]
        assert math.isclose(a["max_abs"], b["max_abs"], rel_tol=1e-5)
        assert math.isclose(a["max_inverse_gain"], b["max_inverse_gain"], rel_tol=1e-5)


def test_batched_figures_do_not_follow_batch_size():
    """A small flow's passes are fixed (one shard), so --batch-size changes no bit."""
    y = _toy_y(24)
    a, b = (
        _records(flowaudit.scan(load_model("toy-affine"), y, samples=K, device="cpu", batch_size=n)) for n in (4, 64)
    )
    assert a == b


def _zuko_nsf():
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    return zuko.flows.NSF(2, 2, transforms=2, bins=8, hidden_features=(16, 16)).eval()


def test_zuko_passes_are_batch_invariant_and_scan_matches_exact():
    """zuko's NSF is batch-invariant on the CPU (checked row by row): batched passes give the exact bits."""
    flow = _zuko_nsf()
    adapter = adapt(flow)
    y = torch.randn(12, 2, generator=torch.Generator().manual_seed(3))
    yk = y.repeat_interleave(K, 0)
    with torch.no_grad():
        latents = adapter.sample_latents(yk, 0.9, torch.Generator().manual_seed(0))
        assert rows_independent(adapter, yk, latents, K)
    a = _records(flowaudit.scan(flow, y, samples=K, device="cpu"))
    b = _records(flowaudit.scan(flow, y, samples=K, device="cpu", exact=True))
    assert a == b


def _nflows_rqs():
    pytest.importorskip("nflows")
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
    from nflows.transforms.permutations import ReversePermutation

    torch.manual_seed(0)
    net = lambda a, b: ResidualNet(a, b, hidden_features=16, context_features=2, num_blocks=1)  # noqa: E731
    steps = [PiecewiseRationalQuadraticCouplingTransform([1, 0], net, num_bins=8, tails="linear", tail_bound=3.0)]
    return Flow(CompositeTransform(steps + [ReversePermutation(2)]), StandardNormal([2])).eval()


def test_nflows_spline_gain_comes_from_the_sampling_call():
    """The spline's inverse gain read off the library's own elementwise log-derivative equals 1/c' by autograd,
    and the sample is the library's own inverse bit for bit."""
    flow = _nflows_rqs()
    adapter = adapt(flow)
    site = adapter.sites()[0]
    y = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    z = 2.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(2))  # into the tails too
    with torch.no_grad():
        x, gain, params = site.inverse(z, y)
        want, _ = flow._transform._transforms[0].inverse(z, y)
        assert torch.equal(x, want)
        visited = x[:, site.module.transform_features]
        by_autograd = super(type(site), site).derivative(visited, params)
    torch.testing.assert_close(gain, 1.0 / by_autograd, rtol=1e-4, atol=1e-6)


def test_elementwise_derivative_matches_forward_mode():
    from torch.func import jvp

    from flowaudit.adapters.base import elementwise_derivative

    fn = lambda u: torch.sinh(u) * 3 + u**3  # noqa: E731
    x = torch.linspace(-3, 3, 50, dtype=torch.float64)
    with torch.no_grad():
        d = elementwise_derivative(fn, x)
    torch.testing.assert_close(d, jvp(fn, (x,), (torch.ones_like(x),))[1])


def test_cli_refuses_exact_with_batched(tmp_path):
    from flowaudit.cli.main import cli

    data = tmp_path / "y.npy"
    import numpy as np

    np.save(data, _toy_y(4).numpy())
    out = tmp_path / "out"
    args = ["scan", "toy-affine", "--data", str(data), "--out", str(out), "--exact", "--batched"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "--exact or --batched" in res.output
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scan_matches_cpu_with_tf32_off():
    """``--device cuda``: the toy's figures as on the CPU (float32 rounding), TF32 off while auditing, restored."""
    from flowaudit.config.device import auditing

    before = torch.backends.cuda.matmul.allow_tf32
    adapter = adapt(load_model("toy-affine"))
    with auditing(adapter, torch.device("cuda")):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert adapter.device.type == "cuda"
    assert torch.backends.cuda.matmul.allow_tf32 == before
    y = _toy_y()
    gpu = _records(flowaudit.scan(load_model("toy-affine"), y, samples=K, device="cuda"))
    cpu = _records(flowaudit.scan(load_model("toy-affine"), y, samples=K, device="cpu"))
    for a, b in zip(gpu, cpu, strict=True):
        assert a["n_inf"] == b["n_inf"] and a["n_pixel_err"] == b["n_pixel_err"]
        assert math.isclose(a["max_abs"], b["max_abs"], rel_tol=1e-4)


def _without_run_facts(report) -> dict:
    data = json.loads(report.to_json())
    for key in ("created", "provenance"):
        data.pop(key, None)
    data["settings"] = {k: v for k, v in data["settings"].items() if k in ("samples", "seed", "passes", "exact")}
    return data


def test_small_flow_shard_of_several_passes_reports_what_shards_of_one_pass_do(monkeypatch):
    """A small flow's shard holds sixteen passes, so its reservoirs take the passes' rows one by one where shards of
    one pass each were merged: the same report whichever way the passes are grouped (the reservoirs' strict order),
    but for the layers' float64 sums, which fold per shard, to rounding."""
    from flowaudit.runs import runner

    sizes = []
    monkeypatch.setattr(runner, "shard_slices", lambda n, size: sizes.append(size) or shard_slices(n, size))
    y = _toy_y(2600)  # three passes of 1024 inputs
    model = load_model("toy-modified-rq-spline")
    one = flowaudit.scan(model, y, samples=2, seed=4, device="cpu")
    assert sizes == [16 * 1024]  # one shard
    three = flowaudit.scan(model, y, samples=2, seed=4, device="cpu", shard_inputs=1024)
    reservoirs = [s["remark2"]["probe"]["reservoir"] for s in one.data["model"]["sites"]]
    assert reservoirs and all(r["batches"] == 3 and r["rows_seen"] == 2 * 2600 for r in reservoirs)
    a, b = _without_run_facts(one), _without_run_facts(three)
    for row_a, row_b in zip(a.pop("layers"), b.pop("layers"), strict=True):
        assert row_a["name"] == row_b["name"] and row_a["in"]["n_values"] == row_b["in"]["n_values"]
        assert row_a["in"]["max_abs"] == row_b["in"]["max_abs"]
        assert math.isclose(row_a["in"]["variance"], row_b["in"]["variance"], rel_tol=1e-12)
    assert a == b
