"""What the audit assumes about the user's model and data is said, never defaulted silently.

Untrained factories need ``--random-init`` and are reported as such; the error band carries its
source (flag, adapter, targets, default) and a guessed or misfitting band is said in one line; ids
are unique across the sets of a report; folders of mixed image sizes are audited with the same
per-input figures as separate runs, and a condition of a size the model cannot take is refused in
one line with the expected shape.
"""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flowaudit.adapters import ModelError, load_model
from flowaudit.adapters.custom import CustomAdapter, site
from flowaudit.cli.main import cli
from flowaudit.errors import AuditError
from flowaudit.reference_models import build

import flowaudit

ROOT = Path(__file__).resolve().parents[1]


def _one_line(res, *words: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, (res.exit_code, res.stderr, res.output)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# -- untrained weights --------------------------------------------------------------------------


def test_factory_without_weights_is_refused_unless_random_init(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ModelError, match="--random-init"):
        load_model("examples.custom_flow:build")
    with pytest.raises(ModelError, match="--random-init goes with"):
        load_model("toy-affine", random_init=True)
    runner = CliRunner()
    _one_line(runner.invoke(cli, ["-q", "inspect", "--model", "examples.custom_flow:build"]), "untrained", "--weights")
    np.save(tmp_path / "y.npy", np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32) * 0.3)
    out = tmp_path / "r"
    args = ["-q", "scan", "--model", "examples.custom_flow:build", "--data", str(tmp_path / "y.npy")]
    res = runner.invoke(cli, [*args, "--out", str(out), "--samples", "2", "--device", "cpu"])
    _one_line(res, "--random-init")
    assert not out.exists()
    res = runner.invoke(cli, [*args, "--random-init", "--out", str(out), "--samples", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "untrained weights" in res.stdout
    assert json.loads((out / "report.json").read_text())["model"]["weights"] == "untrained (--random-init)"


# -- the error band -----------------------------------------------------------------------------


def _plain_adapter(**kw) -> CustomAdapter:
    """The example flow declared without an output range: its outputs are not images."""
    from examples.custom_flow import build as build_flow
    from examples.custom_flow import read_coupling

    flow = build_flow()
    return CustomAdapter(
        flow,
        condition_shape=(2,),
        latent_shape=(2,),
        inverse=flow.inverse,
        forward=flow,
        sites=[site(c.inverse, read=read_coupling, kind="affine") for c in flow.couplings],
        **kw,
    )


def _y(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 2)).astype(np.float32) * 0.3)


def test_band_without_range_or_targets_is_a_default_with_a_warning_and_a_misfit_line(monkeypatch):
    monkeypatch.chdir(ROOT)
    rep = flowaudit.scan(_plain_adapter(), _y(), samples=4, device="cpu")
    band = rep["risk"]["error_band"]
    assert (band["lo"], band["hi"], band["source"]) == (-0.5, 1.5, "default")
    assert "--output-range" in band["warning"]
    text = rep.summary()
    assert "error band [-0.5, 1.5] from default" in text and f"warning: {band['warning']}" in text
    pct = rep["risk"]["by_set"]["in"]["pct_pixel_err"]
    assert pct > 50 and "does not fit" in band["misfit"] and band["misfit"] in text


def test_band_from_flag_counts_exactly_the_values_outside_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    y = _y()
    wide = flowaudit.scan(_plain_adapter(), y, samples=4, device="cpu", output_range=(-1e6, 1e6))
    assert wide["risk"]["error_band"]["source"] == "flag" and wide["risk"]["error_band"]["warning"] is None
    assert wide["risk"]["pct_pixel_err"] == 0 and wide["risk"]["error_band"]["misfit"] is None
    # a band just inside each input's largest |x|: every input with a finite max has an error
    narrow = flowaudit.scan(_plain_adapter(), y, samples=4, device="cpu", output_range=(-1e-3, 1e-3))
    assert narrow["model"]["error_band"] == [-1e-3, 1e-3]
    assert all(r["n_pixel_err"] == 4 for r in narrow["inputs"])  # a 2-D sample is never inside ±1e-3
    with pytest.raises(AuditError, match="LO < HI"):
        flowaudit.scan(_plain_adapter(), y, samples=2, device="cpu", output_range=(1.0, 0.0))


def test_band_derived_from_targets_says_how(monkeypatch):
    monkeypatch.chdir(ROOT)
    y = _y()
    x = torch.linspace(2.0, 6.0, 24).reshape(12, 2)
    from flowaudit.io.datasets import ConditionSet

    cs = ConditionSet(y=y, x=x, ids=[f"t{i}" for i in range(12)], description={"kind": "test"})
    band = flowaudit.scan(_plain_adapter(), cs, samples=2, device="cpu")["risk"]["error_band"]
    assert (band["lo"], band["hi"], band["source"]) == (0.0, 8.0, "targets")  # [2, 6] widened by 2 on each side
    assert "[2, 6]" in band["detail"] and band["warning"] is None


def test_band_stated_by_the_model_or_images_is_the_adapters(monkeypatch):
    monkeypatch.chdir(ROOT)
    band = flowaudit.scan(_plain_adapter(output_range=(-0.5, 0.5)), _y(), samples=2, device="cpu")["risk"]
    assert (band["error_band"]["lo"], band["error_band"]["hi"], band["error_band"]["source"]) == (-1, 1, "adapter")
    rep = flowaudit.scan(load_model("toy-affine"), _y(), samples=2, device="cpu")
    assert rep["risk"]["error_band"]["source"] == "adapter"
    assert [rep["risk"]["error_band"][k] for k in ("lo", "hi")] == rep["model"]["error_band"]


def test_cli_output_range_is_parsed_and_reported(tmp_path):
    np.savez(tmp_path / "d.npz", y=_y().numpy())
    runner = CliRunner()
    base = ["-q", "scan", "toy-affine", "--data", str(tmp_path / "d.npz"), "--samples", "2", "--device", "cpu"]
    for bad in ("1,0", "a,b", "1", "0,inf"):
        _one_line(runner.invoke(cli, [*base, "--out", str(tmp_path / "bad"), "--output-range", bad]), "--output-range")
    res = runner.invoke(cli, [*base, "--out", str(tmp_path / "r"), "--output-range", "-3,3"])
    assert res.exit_code == 0, res.output
    assert "error band [-3, 3] from flag" in res.stdout
    band = json.loads((tmp_path / "r" / "report.json").read_text())["risk"]["error_band"]
    assert (band["lo"], band["hi"], band["source"]) == (-3, 3, "flag")


# -- unique ids -----------------------------------------------------------------------------------


def test_ids_are_unique_across_sets_in_json_csv_and_html(tmp_path):
    np.savez(tmp_path / "in.npz", y=_y(6).numpy())
    np.savez(tmp_path / "ood.npz", y=(_y(6, seed=1) * 20).numpy())
    rep = flowaudit.scan(load_model("toy-affine"), str(tmp_path / "in.npz"), ood=str(tmp_path / "ood.npz"),
                         samples=2, device="cpu")
    ids = [r["id"] for r in rep["inputs"]]
    assert ids == [f"in/row{i}" for i in range(6)] + [f"ood/row{i}" for i in range(6)]
    assert all(r["id"].startswith(r["set"] + "/") for r in rep["inputs"])
    rep.save(tmp_path / "r")
    with open(tmp_path / "r" / "inputs.csv") as f:
        assert [row["id"] for row in csv.DictReader(f)] == ids
    html = (tmp_path / "r" / "report.html").read_text()
    assert "ood/row0" in html and "in/row0" in html
    assert set(rep["risk"]["ranked"]) <= set(ids)


# -- images as they come ------------------------------------------------------------------------


def _sr():
    torch.manual_seed(0)
    return build("sr", dict(L=3, K=1, nf=8, nb=2, gc=4, hidden_channels=8, patch=16, scale=4, coupling="affine")).eval()


def _png(path: Path, h: int, w: int, seed: int) -> None:
    from PIL import Image

    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path)


def _figures(rep) -> dict:
    keys = ("s_ood", "n_inf", "n_pixel_err", "max_abs", "lr_psnr_min", "lr_psnr_std")
    return {r["id"].split("/", 1)[1]: {k: r[k] for k in keys} for r in rep["inputs"]}


def test_mixed_size_folder_gives_the_figures_of_separate_runs(tmp_path):
    model = _sr()
    mixed, small, large = (tmp_path / d for d in ("mixed", "small", "large"))
    for d in (mixed, small, large):
        d.mkdir()
    for k, (name, size) in enumerate([("a", 4), ("b", 8), ("c", 4), ("d", 8)]):
        _png(mixed / f"{name}.png", size, size, k)
        _png((small if size == 4 else large) / f"{name}.png", size, size, k)
    from flowaudit.io.datasets import load_conditions

    cs = load_conditions(mixed)
    assert cs.ids == ["a", "c", "b", "d"] and cs.mixed and cs.description["shapes"] == [[3, 4, 4], [3, 8, 8]]
    stats = flowaudit.fit(model, torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(3)), device="cpu")
    kw = dict(stats=stats.gaussian, samples=3, device="cpu")
    # τ = 0: every figure depends on the image alone, so each input matches its same-size run
    at0 = _figures(flowaudit.scan(model, str(mixed), temperature=0.0, **kw))
    apart = {**_figures(flowaudit.scan(model, str(small), temperature=0.0, **kw)),
             **_figures(flowaudit.scan(model, str(large), temperature=0.0, **kw))}
    assert at0 == apart
    # τ = 0.9: latents are seeded by row; the first size's rows are those of its own run
    rep = flowaudit.scan(model, str(mixed), **kw)
    assert rep["settings"]["exact"] is True
    got, own = _figures(rep), _figures(flowaudit.scan(model, str(small), **kw))
    assert {k: got[k] for k in own} == own
    # batched or not, a mixed set is read one input per pass: the same figures
    assert _figures(flowaudit.scan(model, str(mixed), exact=False, **kw)) == got


def test_paired_mixed_folder_keeps_pairs_together(tmp_path):
    for d in ("lr", "hr"):
        (tmp_path / d).mkdir()
    for k, (name, size) in enumerate([("a", 4), ("b", 8), ("c", 4)]):
        _png(tmp_path / "lr" / f"{name}.png", size, size, k)
        _png(tmp_path / "hr" / f"{name}.png", 4 * size, 4 * size, 10 + k)
    from flowaudit.io.datasets import load_conditions

    cs = load_conditions(tmp_path)
    assert cs.ids == ["a", "c", "b"]
    for i, name in enumerate(cs.ids):
        assert cs.x[i].shape[-1] == 4 * cs.y[i].shape[-1]
        want = load_conditions(tmp_path / "hr" / f"{name}.png").y[0]
        assert torch.equal(cs.x[i], want)


def test_wrong_size_image_is_refused_with_the_expected_shape(tmp_path):
    model = _sr()
    (tmp_path / "odd").mkdir()
    _png(tmp_path / "odd" / "a.png", 4, 4, 0)
    _png(tmp_path / "odd" / "b.png", 5, 5, 1)  # HR 20×20 does not squeeze three times
    with pytest.raises(AuditError, match=r"odd: an LR size 5×5 .* does not divide"):  # the adapter's own check
        flowaudit.scan(model, str(tmp_path / "odd"), samples=2, device="cpu")


FREIA_MODULE = '''
import torch
from torch import nn


def _conv(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c_out, 3, padding=1))


def build():
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)
    inp, cond = Ff.InputNode(3, 8, 8, name="x"), Ff.ConditionNode(3, 8, 8, name="y")
    n1 = Ff.Node(inp, Fm.GLOWCouplingBlock, {"subnet_constructor": _conv, "clamp": 1.5}, conditions=cond, name="glow")
    return Ff.GraphINN([inp, cond, n1, Ff.OutputNode(n1, name="z")])
'''


def test_freia_graph_with_a_wrong_size_image_exits_2_naming_the_expected_shape(tmp_path, monkeypatch):
    pytest.importorskip("FrEIA")
    name = f"fa_graph_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FREIA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "ok").mkdir()
    (tmp_path / "bad").mkdir()
    _png(tmp_path / "ok" / "a.png", 8, 8, 0)
    _png(tmp_path / "bad" / "a.png", 8, 8, 0)
    _png(tmp_path / "bad" / "b.png", 12, 12, 1)
    base = ["-q", "scan", "--model", f"{name}:build", "--random-init", "--samples", "2", "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(cli, [*base, "--data", str(tmp_path / "ok"), "--out", str(tmp_path / "r1")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*base, "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "r2")])
    _one_line(res, "(3, 12, 12)", "expects (3, 8, 8)")
    assert not (tmp_path / "r2").exists()
