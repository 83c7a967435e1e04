"""The command line: exit codes, one-line errors, nothing half written, JSON output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from flowaudit.cli.main import cli


@pytest.fixture()
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    runner = CliRunner()
    for name, extra in (
        ("train", ["--seed", "0", "--n", "400"]),
        ("test", ["--n", "40"]),
        ("ood", ["--n", "40", "--ood"]),
    ):
        res = runner.invoke(cli, ["data", "toy", "--out", str(d / f"{name}.npz"), *extra])
        assert res.exit_code == 0, res.output
    return d


def test_help_and_version(run):
    res = run("--help")
    assert res.exit_code == 0 and "scan" in res.output and "demo" in res.output
    for cmd in ("inspect", "fit", "scan", "demo", "train", "data"):
        assert run(cmd, "--help").exit_code == 0
    assert "flowaudit" in run("--version").output


def test_inspect_list_and_json(run):
    res = run("inspect", "--list", "--json")
    names = {m["name"] for m in json.loads(res.output)["models"]}
    assert {"toy-affine", "toy-modified-rq-spline"} <= names
    res = run("inspect", "toy-affine", "--json", "--device", "cpu")
    assert res.exit_code == 0
    model = json.loads(res.output)["model"]
    assert set(json.loads(res.output)) == {"model"}
    assert model["name"] == "toy-affine" and len(model["sites"]) == 4
    assert all(s["remark2"]["verdict"] == "violates" for s in model["sites"])


def test_fit_then_scan_and_fail_on(run, toy_files, tmp_path):
    stats = tmp_path / "stats.h5"
    res = run("fit", "toy-affine", "--data", toy_files / "train.npz", "--out", stats, "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ood"]["n_inputs"] == 400
    args = [
        "scan",
        "toy-affine",
        "--data",
        toy_files / "test.npz",
        "--ood-data",
        toy_files / "ood.npz",
        "--stats",
        stats,
        "--samples",
        3,
        "--device",
        "cpu",
    ]
    res = run(*args, "--out", tmp_path / "r1")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r1" / "report.json").exists() and (tmp_path / "r1" / "report.html").exists()
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert report["risk"]["n_inputs"] == 80 and report["ood"]["dim"] == 16
    # affine sites violate Remark 2: --fail-on violation exits 1, never exits 0
    assert run(*args, "--out", tmp_path / "r2", "--fail-on", "violation").exit_code == 1
    assert run(*args, "--out", tmp_path / "r3", "--fail-on", "never").exit_code == 0
    res = run(
        "scan",
        "toy-modified-rq-spline",
        "--data",
        toy_files / "test.npz",
        "--fit-data",
        toy_files / "train.npz",
        "--samples",
        3,
        "--device",
        "cpu",
        "--out",
        tmp_path / "r4",
        "--fail-on",
        "violation",
    )
    assert res.exit_code == 0, res.output


def _one_line_error(res):
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [l for l in res.stderr.splitlines() if l.strip()] if hasattr(res, "stderr") else res.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowaudit: error:"), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, toy_files, tmp_path):
    out = tmp_path / "never"
    bad = tmp_path / "bad.npz"
    np.savez(bad, z=np.zeros((3, 2)))
    line = _one_line_error(run("scan", "toy-affine", "--data", bad, "--out", out))
    assert "bad.npz" in line and not out.exists()
    line = _one_line_error(run("scan", "no-such-model", "--data", toy_files / "test.npz", "--out", out))
    assert "no-such-model" in line and not out.exists()
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 3), dtype=np.float32))
    line = _one_line_error(run("scan", "toy-affine", "--data", wrong, "--out", out))
    assert "(3,)" in line and "(2,)" in line and not out.exists()
    out.mkdir()
    line = _one_line_error(run("scan", "toy-affine", "--data", toy_files / "test.npz", "--out", out))
    assert "exists" in line
    stats = tmp_path / "s.h5"
    stats.write_bytes(b"not hdf5")
    line = _one_line_error(
        run("scan", "toy-affine", "--data", toy_files / "test.npz", "--stats", stats, "--out", tmp_path / "x")
    )
    assert "s.h5" in line and not (tmp_path / "x").exists()
    line = _one_line_error(
        run("fit", "toy-affine", "--data", toy_files / "train.npz", "--out", tmp_path / "f.h5", "--layers", "nope")
    )
    assert "nope" in line and not (tmp_path / "f.h5").exists()
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def test_click_usage_errors_exit_2(run, toy_files, tmp_path):
    assert run("scan", "toy-affine", "--data", toy_files / "test.npz").exit_code == 2  # --out missing
    assert (
        run("scan", "toy-affine", "--data", toy_files / "test.npz", "--out", tmp_path / "o", "--samples", 0).exit_code
        == 2
    )
    assert run("inspect").exit_code == 2  # neither MODEL nor --model


def test_internal_error_exits_3_not_1(run, toy_files, tmp_path, monkeypatch):
    import flowaudit.audit

    def broken(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(flowaudit.audit, "scan", broken)
    res = run("scan", "toy-affine", "--data", toy_files / "test.npz", "--out", tmp_path / "o", "--fail-on", "risk")
    assert res.exit_code == 3
    assert "internal error" in res.output and "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_model_factory_with_weights(run, toy_files, tmp_path):
    import torch
    from flowaudit.reference_models import load

    weights = tmp_path / "w.pt"
    torch.save(load("toy-affine").state_dict(), weights)
    res = run(
        "inspect", "--model", "flowaudit.reference_models.toy:Toy2D", "--weights", weights, "--json", "--device", "cpu"
    )
    assert res.exit_code == 0, res.output
    assert (
        json.loads(res.output)["model"]["fingerprint"]
        == json.loads(run("inspect", "toy-affine", "--json", "--device", "cpu").output)["model"]["fingerprint"]
    )
    pickled = tmp_path / "p.pt"
    torch.save({"state_dict": load("toy-affine").state_dict(), "fn": np.dtype}, pickled)  # needs unpickling code
    line = _one_line_error(run("inspect", "--model", "flowaudit.reference_models.toy:Toy2D", "--weights", pickled))
    assert "--trust-checkpoint" in line


def test_image_pipeline_train_data_scan(run, tmp_path):
    """train sr (tiny, 2 steps) → data sr (image folders) → scan with --fit-data: the whole image path."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(L=3, K=1, nf=8, nb=2, gc=4, hidden_channels=8)))
    ckpt = tmp_path / "tiny.pt"
    res = run("train", "sr", "--config", config, "--iters", 2, "--batch", 2, "--patch", 16, "--out", ckpt, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["config"]["coupling"] == "affine"
    assert run("data", "sr", "--out", tmp_path / "d", "--patch", 16, "--n", 6).exit_code == 0
    assert run("data", "sr", "--out", tmp_path / "o", "--patch", 16, "--n", 6, "--eurban").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["hr", "lr", "meta.json"]
    res = run(
        "scan",
        ckpt,
        "--data",
        tmp_path / "d",
        "--ood-data",
        tmp_path / "o",
        "--fit-data",
        tmp_path / "d",
        "--samples",
        2,
        "--device",
        "cpu",
        "--out",
        tmp_path / "r",
        "--json",
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["model"]["task"] == "sr" and report["risk"]["n_inputs"] == 12
    assert all("reconstruction_error" in r and "lr_psnr_min" in r for r in report["inputs"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such_option": 1}))
    line = _one_line_error(run("train", "sr", "--config", bad, "--iters", 1, "--out", tmp_path / "x.pt"))
    assert "no_such_option" in line and not (tmp_path / "x.pt").exists()
