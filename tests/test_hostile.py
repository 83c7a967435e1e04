"""The hostile and broken input catalogue: every user mistake and bad file → exit 2.

Each case runs the real command line (``CliRunner`` on ``flowaudit.cli.main:cli``) and asserts the
exit-code contract: exit code 2, exactly one line on stderr that starts
``flowaudit: error:`` and names the file or option at fault, no traceback, and nothing left where
the output would have gone (no folder, no file, no ``.tmp`` or ``.lock`` sibling).

A case is ``(id, argv, expected)``: ``{F}`` in the argv is the folder of prepared inputs,
``{OUT}`` the output path (inside an otherwise empty folder); ``expected`` is what the line must
contain (``{F}`` expanded too).

The second half treats each group as a class of inputs: code in every pickle protocol and place, every
broken safetensors header, HDF5 data outside the file, every damaged part of a stats file, every numeric
option of every command (generated from the commands, so a new option is covered when it is added), odd
but legal inputs that must succeed, outputs that would destroy an input, file-size limits and interrupts
followed by ``--resume``.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flowaudit.reference_models import CHECKPOINT_DIR, build, load_checkpoint
from flowaudit.reference_models.training import save_checkpoint
from PIL import Image

from flowaudit.cli.main import cli

TOY = str(CHECKPOINT_DIR / "toy-affine.pt")
TINY_SR = dict(scale=4, L=3, K=1, nf=8, nb=2, gc=4, hidden_channels=8, patch=16)

FACTORIES = """
import torch


def raises():
    raise RuntimeError("no GPU here, says the factory")


def not_a_module():
    return {"a": 1}


def linear():
    return torch.nn.Linear(2, 2)
"""


def _png(path: Path, h: int = 8, w: int = 8, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _reference(f: Path, name: str, drop: tuple[str, ...] = (), **changes) -> None:
    state = load_checkpoint(TOY)
    for key in drop:
        state.pop(key)
    state.update(changes)
    torch.save(state, f / name)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Every broken input of the catalogue, built once."""
    f = tmp_path_factory.mktemp("hostile")
    runner = CliRunner()
    assert (
        runner.invoke(cli, ["data", "toy", "--out", str(f / "train.npz"), "--n", "300", "--seed", "0"]).exit_code == 0
    )
    assert runner.invoke(cli, ["data", "toy", "--out", str(f / "test.npz"), "--n", "20"]).exit_code == 0
    res = runner.invoke(
        cli,
        ["-q", "fit", "toy-affine", "--data", str(f / "train.npz"), "--out", str(f / "stats.h5"), "--device", "cpu"],
    )
    assert res.exit_code == 0, res.output
    toy_bytes = Path(TOY).read_bytes()
    # checkpoints
    (f / "empty.pt").write_bytes(b"")
    (f / "truncated.pt").write_bytes(toy_bytes[: len(toy_bytes) // 2])
    (f / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (f / "zipgarbage.pt").write_bytes(b"PK\x03\x04" + np.random.default_rng(1).bytes(512))
    (f / "picklegarbage.pt").write_bytes(b"\x80\x02" + np.random.default_rng(2).bytes(64))
    torch.save({"state_dict": {}, "fn": np.dtype}, f / "pickled.pt")  # a global that needs unpickling code
    torch.save([torch.zeros(2)], f / "list.pt")
    torch.save({"weight": torch.zeros(3, 3)}, f / "layout.pt")
    _reference(f, "noconfig.pt", drop=("config",))
    _reference(f, "nostate.pt", drop=("state_dict",))
    _reference(f, "notask.pt", task="audio")
    _reference(f, "strconfig.pt", config="big")
    _reference(f, "huge.pt", config={**load_checkpoint(TOY)["config"], "hidden": 10**6})
    _reference(f, "badkind.pt", config={**load_checkpoint(TOY)["config"], "coupling": "nonsense"})
    _reference(f, "badoption.pt", config={**load_checkpoint(TOY)["config"], "no_such_option": 3})
    _reference(f, "negative.pt", config={**load_checkpoint(TOY)["config"], "hidden": -4})
    state = load_checkpoint(TOY)
    state["state_dict"].pop(next(iter(state["state_dict"])))
    torch.save(state, f / "missingkey.pt")
    _reference(f, "mismatch.pt", config={**load_checkpoint(TOY)["config"], "hidden": 32})
    torch.save(
        {
            "format": "flowaudit-reference/1",
            "task": "toy",
            "config": load_checkpoint(TOY)["config"],
            "state_dict": [1, 2],
        },
        f / "statelist.pt",
    )
    (f / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    (f / "hugeheader.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")
    (f / "empty.safetensors").write_bytes(b"")
    (f / "ckptdir.pt").mkdir()
    torch.save({"weight": torch.zeros(5)}, f / "wrongweights.pt")
    (f / "factories_hostile.py").write_text(FACTORIES)
    # a tiny SR flow: its squeezes need LR × 4 divisible by 2^3
    torch.manual_seed(0)
    save_checkpoint(f / "tiny_sr.pt", build("sr", TINY_SR))
    for i in range(3):
        _png(f / "lr5" / f"{i}.png", 5, 5, seed=i)
        _png(f / "rgb4" / f"{i}.png", 4, 4, seed=i)
        _png(f / "pairs" / "lr" / f"{i}.png", 4, 4, seed=i)  # LR 4×4 at ×4 needs HR 16×16
        _png(f / "pairs" / "hr" / f"{i}.png", 16 if i else 8, 16 if i else 8, seed=10 + i)
        _png(f / "widehr" / "lr" / f"{i}.png", 4, 4, seed=i)
        _png(f / "widehr" / "hr" / f"{i}.png", 16, 20, seed=10 + i)
    np.savez(f / "pairs.npz", y=np.zeros((2, 3, 4, 4), np.float32), x=np.zeros((2, 3, 12, 12), np.float32))
    np.savez(f / "toypairs.npz", y=np.zeros((2, 2), np.float32), x=np.zeros((2, 3), np.float32))
    np.save(f / "onechannel.npy", np.zeros((2, 1, 4, 4), np.float32))
    # data
    (f / "emptydir").mkdir()
    _png(f / "unreadable" / "a.png")
    (f / "unreadable" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    _png(f / "trunc" / "a.png", 32, 32)
    (f / "trunc" / "b.png").write_bytes((f / "trunc" / "a.png").read_bytes()[:60])
    _png(f / "sizes" / "a.png", 8, 8)
    _png(f / "sizes" / "b.png", 8, 12)
    np.save(f / "wrongshape.npy", np.zeros((4, 3), np.float32))
    np.save(f / "flat.npy", np.zeros(4, np.float32))
    np.save(f / "strings.npy", np.array([["a", "b"]]))
    np.save(f / "complex.npy", np.zeros((3, 2), np.complex64))
    np.save(f / "norows.npy", np.zeros((0, 2), np.float32))
    np.save(f / "allnan.npy", np.full((3, 2), np.nan, np.float32))
    (f / "corrupt.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    header = io.BytesIO()  # a header that declares 10¹² rows over 64 bytes of data
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 2)})
    (f / "absurd.npy").write_bytes(header.getvalue() + bytes(64))
    np.savez(f / "noy.npz", x=np.zeros((2, 2)))
    np.savez(f / "rows.npz", y=np.zeros((3, 2)), x=np.zeros((2, 2)))
    with h5py.File(f / "noy.h5", "w") as h:
        h["x"] = np.zeros((2, 2))
    (f / "data.txt").write_text("1 2\n3 4\n")
    # stats files
    (f / "nothdf5.h5").write_bytes(b"not hdf5 at all")
    stats_bytes = (f / "stats.h5").read_bytes()
    (f / "truncstats.h5").write_bytes(stats_bytes[: len(stats_bytes) // 3])
    with h5py.File(f / "foreign.h5", "w") as h:
        h["data"] = np.zeros(3)
    for name, edit in (
        ("newer.h5", lambda h: h.attrs.__setitem__("format_version", 99)),
        ("nochol.h5", lambda h: h.__delitem__("cholesky")),
    ):
        (f / name).write_bytes(stats_bytes)
        with h5py.File(f / name, "a") as h:
            edit(h)
    res = runner.invoke(
        cli,
        [
            "-q",
            "fit",
            "toy-affine",
            "--data",
            str(f / "train.npz"),
            "--out",
            str(f / "avgstd.h5"),
            "--pooling",
            "avgstd",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    (f / "notjson.json").write_text("{nope")
    (f / "unknownopt.json").write_text(json.dumps({"no_such_option": 1}))
    (f / "existing").mkdir()
    # untrusted files: code in a pickle, HDF5 data outside the file, a stats file with a NaN mean
    (f / "code.pt").write_bytes(pickle.dumps({"state_dict": _Code()}, protocol=2))
    (f / "secret.bin").write_bytes(np.arange(8, dtype=np.float32).tobytes())
    with h5py.File(f / "external.h5", "w") as h:
        h.create_dataset("y", shape=(4, 2), dtype=np.float32, external=[(str(f / "secret.bin"), 0, 32)])
    from flowaudit.stats.gaussian import GaussianOOD

    g = GaussianOOD.load(f / "stats.h5")
    g.location_ = g.location_.copy()
    g.location_[0] = np.nan
    g.save(f / "nanstats.h5")
    # memory: a PNG whose header declares 81 megapixels (a few kilobytes on disk)
    (f / "bomb").mkdir()
    Image.new("1", (9000, 9000)).save(f / "bomb" / "big.png")
    return f


class _Code:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


SCAN = ["scan", "toy-affine", "--data", "{F}/test.npz", "--samples", "1", "--device", "cpu", "--out", "{OUT}"]


def scan_model(model: str, *extra: str) -> list[str]:
    return ["scan", model, "--data", "{F}/test.npz", "--samples", "1", "--device", "cpu", "--out", "{OUT}", *extra]


def scan_data(data: str, model: str = "toy-affine") -> list[str]:
    return ["scan", model, "--data", data, "--samples", "1", "--device", "cpu", "--out", "{OUT}"]


CASES = [
    # -- second round: one class of input per group -----------------------------------------------
    ("ckpt-holds-code", scan_model("{F}/code.pt"), "{F}/code.pt: holds pickled code (posix.system)"),
    ("data-h5-external-storage", scan_data("{F}/external.h5"), "keeps its bytes in external files"),
    ("stats-nan-mean", [*SCAN, "--stats", "{F}/nanstats.h5"], "{F}/nanstats.h5 is not a valid flowaudit stats file"),
    ("temperature-nan", [*SCAN, "--temperature", "nan"], "'--temperature'"),
    ("threshold-nan", [*SCAN, "--threshold", "nan"], "'--threshold'"),
    ("seed-above-generator", [*SCAN, "--seed", str(2**64)], "'--seed'"),
    ("samples-absurd", [*SCAN, "--samples", "1000000000000"], "'--samples'"),
    ("scan-wrong-shape", scan_data("{F}/wrongshape.npy"), "--data {F}/wrongshape.npy: conditions have shape (3,)"),
    ("out-name-too-long", [*SCAN[:-1], "{OUT}/" + "x" * 300], "file name too long"),
    ("data-image-bomb", scan_data("{F}/bomb"), "decompression-bomb"),
    # -- checkpoints ------------------------------------------------------------------------------
    ("ckpt-empty", scan_model("{F}/empty.pt"), "{F}/empty.pt: empty file"),
    ("ckpt-truncated", scan_model("{F}/truncated.pt"), "{F}/truncated.pt: corrupt or truncated"),
    ("ckpt-random-bytes", scan_model("{F}/random.pt"), "{F}/random.pt: not a PyTorch checkpoint"),
    ("ckpt-zip-garbage", scan_model("{F}/zipgarbage.pt"), "{F}/zipgarbage.pt: corrupt or truncated"),
    ("ckpt-pickle-garbage", scan_model("{F}/picklegarbage.pt"), "{F}/picklegarbage.pt: corrupt or truncated"),
    ("ckpt-pickled-code", scan_model("{F}/pickled.pt"), "--trust-checkpoint"),
    ("ckpt-a-list", scan_model("{F}/list.pt"), "{F}/list.pt: holds a list"),
    ("ckpt-unknown-layout", scan_model("{F}/layout.pt"), "{F}/layout.pt: checkpoint layout not recognised"),
    ("ckpt-no-config", scan_model("{F}/noconfig.pt"), "{F}/noconfig.pt: reference checkpoint without 'config'"),
    ("ckpt-no-state-dict", scan_model("{F}/nostate.pt"), "without 'state_dict'"),
    ("ckpt-unknown-task", scan_model("{F}/notask.pt"), "unknown reference task 'audio'"),
    ("ckpt-config-not-dict", scan_model("{F}/strconfig.pt"), "'config' is a str"),
    ("ckpt-absurd-size", scan_model("{F}/huge.pt"), "{F}/huge.pt: the model needs more than 2,000,000,000 parameters"),
    ("ckpt-over-max-parameters", scan_model(TOY, "--max-parameters", "1000"), "more than 1,000 parameters"),
    ("ckpt-bad-coupling", scan_model("{F}/badkind.pt"), "{F}/badkind.pt: invalid model configuration"),
    ("ckpt-unknown-option", scan_model("{F}/badoption.pt"), "no_such_option"),
    ("ckpt-negative-size", scan_model("{F}/negative.pt"), "{F}/negative.pt: invalid model configuration"),
    ("ckpt-missing-key", scan_model("{F}/missingkey.pt"), "{F}/missingkey.pt: weights do not fit its config"),
    ("ckpt-shape-mismatch", scan_model("{F}/mismatch.pt"), "{F}/mismatch.pt: weights do not fit its config"),
    ("ckpt-state-dict-list", scan_model("{F}/statelist.pt"), "'state_dict' is a list"),
    (
        "ckpt-corrupt-safetensors",
        scan_model("{F}/corrupt.safetensors"),
        "{F}/corrupt.safetensors: corrupt .safetensors",
    ),
    ("ckpt-safetensors-huge-header", scan_model("{F}/hugeheader.safetensors"), "corrupt .safetensors"),
    ("ckpt-empty-safetensors", scan_model("{F}/empty.safetensors"), "empty file"),
    ("ckpt-a-folder", scan_model("{F}/ckptdir.pt"), "{F}/ckptdir.pt: is a folder"),
    ("model-unknown-name", scan_model("no-such-model"), "'no-such-model' is neither a bundled model"),
    ("max-parameters-zero", scan_model("toy-affine", "--max-parameters", "0"), "--max-parameters"),
    # -- module:factory and --weights -------------------------------------------------------------
    (
        "factory-raises",
        ["scan", "--model", "factories_hostile:raises", "--data", "{F}/test.npz", "--out", "{OUT}"],
        "--model factories_hostile:raises: the factory raised RuntimeError: no GPU here",
    ),
    (
        "factory-not-importable",
        ["scan", "--model", "no_such_pkg_xyz:make", "--data", "{F}/test.npz", "--out", "{OUT}"],
        "cannot import 'no_such_pkg_xyz:make'",
    ),
    (
        "factory-not-a-flow",
        ["scan", "--model", "factories_hostile:not_a_module", "--data", "{F}/test.npz", "--out", "{OUT}"],
        "--model factories_hostile:not_a_module",
    ),
    (
        "factory-spec-malformed",
        ["scan", "--model", "justamodule:", "--data", "{F}/test.npz", "--out", "{OUT}"],
        "expected package.module:factory",
    ),
    (
        "weights-with-bundled-name",
        scan_model("toy-affine", "--weights", "{F}/wrongweights.pt"),
        "--weights {F}/wrongweights.pt: cannot be used with the bundled model 'toy-affine'",
    ),
    (
        "weights-do-not-fit",
        [
            "scan",
            "--model",
            "factories_hostile:linear",
            "--weights",
            "{F}/wrongweights.pt",
            "--data",
            "{F}/test.npz",
            "--out",
            "{OUT}",
        ],
        "--weights {F}/wrongweights.pt: does not fit",
    ),
    (
        "weights-corrupt",
        [
            "scan",
            "--model",
            "factories_hostile:linear",
            "--weights",
            "{F}/truncated.pt",
            "--data",
            "{F}/test.npz",
            "--out",
            "{OUT}",
        ],
        "{F}/truncated.pt: corrupt or truncated weights file",
    ),
    (
        "model-and-factory",
        ["scan", "toy-affine", "--model", "factories_hostile:linear", "--data", "{F}/test.npz", "--out", "{OUT}"],
        "give MODEL",
    ),
    # -- data -------------------------------------------------------------------------------------
    ("data-missing", scan_data("{F}/nothere.npz"), "'{F}/nothere.npz' does not exist"),
    ("data-empty-folder", scan_data("{F}/emptydir"), "{F}/emptydir: no PNG/JPEG images"),
    ("data-unreadable-image", scan_data("{F}/unreadable", "{F}/tiny_sr.pt"), "{F}/unreadable/b.png: unreadable image"),
    ("data-truncated-image", scan_data("{F}/trunc", "{F}/tiny_sr.pt"), "{F}/trunc/b.png: unreadable image"),
    (
        "data-hr-size-vs-scale",
        scan_data("{F}/pairs", "{F}/tiny_sr.pt"),
        "--data {F}/pairs: target 0 has shape (3, 8, 8), but the model (×4) makes samples of shape (3, 16, 16) "
        "from a condition of shape (3, 4, 4)",
    ),
    (
        "data-hr-aspect-vs-scale",
        scan_data("{F}/widehr", "{F}/tiny_sr.pt"),
        "--data {F}/widehr: target 0 has shape (3, 16, 20), but the model (×4) makes samples of shape (3, 16, 16)",
    ),
    ("data-npz-hr-vs-scale", scan_data("{F}/pairs.npz", "{F}/tiny_sr.pt"), "target row0 has shape (3, 12, 12)"),
    ("data-npz-targets-vs-samples", scan_data("{F}/toypairs.npz"), "target row0 has shape (3,), but the model"),
    (
        "fit-hr-size-vs-scale",
        ["fit", "{F}/tiny_sr.pt", "--data", "{F}/pairs", "--out", "{OUT}", "--device", "cpu"],
        "--data {F}/pairs: target 0 has shape (3, 8, 8)",
    ),
    (
        "fit-data-over-max-memory",
        ["fit", "toy-affine", "--data", "{F}/train.npz", "--out", "{OUT}", "--device", "cpu", "--max-memory", "4096"],
        "above the memory budget of 4.0 KiB (--max-memory)",
    ),
    (
        "scan-data-over-max-memory",
        [*scan_data("{F}/test.npz"), "--max-memory", "100"],
        "{F}/test.npz: the arrays take",
    ),
    (
        "data-lr-size-vs-squeeze",
        scan_data("{F}/lr5", "{F}/tiny_sr.pt"),
        "--data {F}/lr5: an LR size 5×5 (×4 = 20×20) does not divide",
    ),
    (
        "data-image-for-vector-model",
        scan_data("{F}/rgb4"),
        "--data {F}/rgb4: conditions have shape (3, 4, 4), the model expects (2,)",
    ),
    ("data-wrong-channels", scan_data("{F}/onechannel.npy", "{F}/tiny_sr.pt"), "conditions have shape (1, 4, 4)"),
    (
        "data-wrong-shape",
        scan_data("{F}/wrongshape.npy"),
        "--data {F}/wrongshape.npy: conditions have shape (3,), the model expects (2,)",
    ),
    ("data-one-dimensional", scan_data("{F}/flat.npy"), "{F}/flat.npy: array 'y' has shape (4,)"),
    ("data-string-dtype", scan_data("{F}/strings.npy"), "not numeric"),
    ("data-complex-dtype", scan_data("{F}/complex.npy"), "{F}/complex.npy: array 'y' has dtype complex64, not numeric"),
    ("data-no-rows", scan_data("{F}/norows.npy"), "{F}/norows.npy: array 'y' has no rows"),
    ("data-all-nan", scan_data("{F}/allnan.npy"), "{F}/allnan.npy: every condition has NaN or Inf"),
    ("data-corrupt-npy", scan_data("{F}/corrupt.npy"), "{F}/corrupt.npy: unreadable .npy"),
    ("data-npy-absurd-shape", scan_data("{F}/absurd.npy"), "{F}/absurd.npy: unreadable .npy file"),
    ("data-npz-without-y", scan_data("{F}/noy.npz"), "{F}/noy.npz: no array 'y'"),
    ("data-rows-disagree", scan_data("{F}/rows.npz"), "'x' has 2 rows but 'y' has 3"),
    ("data-h5-without-y", scan_data("{F}/noy.h5"), "{F}/noy.h5: no dataset 'y'"),
    ("data-unknown-format", scan_data("{F}/data.txt"), "{F}/data.txt: unknown data format"),
    ("ood-data-wrong-shape", [*SCAN, "--ood-data", "{F}/wrongshape.npy"], "--ood-data {F}/wrongshape.npy"),
    ("fit-data-all-nan", [*SCAN, "--fit-data", "{F}/allnan.npy"], "{F}/allnan.npy: every condition"),
    (
        "attack-all-nan",
        ["attack", "toy-affine", "--data", "{F}/allnan.npy", "--device", "cpu", "--out", "{OUT}"],
        "{F}/allnan.npy: every condition",
    ),
    (
        "attack-bad-checkpoint",
        ["attack", "{F}/noconfig.pt", "--data", "{F}/test.npz", "--device", "cpu", "--out", "{OUT}"],
        "{F}/noconfig.pt: reference checkpoint without 'config'",
    ),
    (
        "attack-bad-budget",
        ["attack", "toy-affine", "--data", "{F}/test.npz", "--budget", "linf:lots", "--out", "{OUT}"],
        "--budget",
    ),
    (
        "inspect-lr-size",
        ["inspect", "{F}/tiny_sr.pt", "--data", "{F}/lr5", "--device", "cpu"],
        "does not divide by the model's 2^L",
    ),
    (
        "fit-wrong-shape",
        ["fit", "toy-affine", "--data", "{F}/wrongshape.npy", "--out", "{OUT}", "--device", "cpu"],
        "--data {F}/wrongshape.npy: conditions have shape (3,)",
    ),
    # -- stats files ------------------------------------------------------------------------------
    ("stats-not-hdf5", [*SCAN, "--stats", "{F}/nothdf5.h5"], "{F}/nothdf5.h5"),
    ("stats-truncated", [*SCAN, "--stats", "{F}/truncstats.h5"], "{F}/truncstats.h5"),
    ("stats-foreign-hdf5", [*SCAN, "--stats", "{F}/foreign.h5"], "not a flowaudit stats file"),
    ("stats-newer-version", [*SCAN, "--stats", "{F}/newer.h5"], "newer flowaudit"),
    ("stats-missing-dataset", [*SCAN, "--stats", "{F}/nochol.h5"], "not a valid flowaudit stats file"),
    (
        "stats-other-model",
        scan_model("toy-modified-rq-spline", "--stats", "{F}/stats.h5"),
        "{F}/stats.h5 was fitted on weights",
    ),
    ("stats-other-pooling", [*SCAN, "--stats", "{F}/avgstd.h5"], "{F}/avgstd.h5 was fitted on layers"),
    (
        "stats-and-fit-data",
        [*SCAN, "--stats", "{F}/stats.h5", "--fit-data", "{F}/train.npz"],
        "give --stats or --fit-data",
    ),
    # -- options and devices ----------------------------------------------------------------------
    (
        "device-nonsense",
        ["scan", "toy-affine", "--data", "{F}/test.npz", "--device", "nonsense", "--out", "{OUT}"],
        "unknown device 'nonsense'",
    ),
    (
        "device-cuda-absent",
        ["scan", "toy-affine", "--data", "{F}/test.npz", "--device", "cuda", "--out", "{OUT}"],
        "CUDA is not available",
    ),
    ("samples-zero", [*SCAN, "--samples", "0"], "'--samples'"),
    ("samples-not-a-number", [*SCAN, "--samples", "many"], "'--samples'"),
    ("temperature-negative", [*SCAN, "--temperature", "-1"], "'--temperature'"),
    ("batch-size-zero", [*SCAN, "--batch-size", "0"], "'--batch-size'"),
    ("fail-on-unknown", [*SCAN, "--fail-on", "sometimes"], "'--fail-on'"),
    ("out-missing", ["scan", "toy-affine", "--data", "{F}/test.npz"], "'--out'"),
    ("out-parents-absent", scan_data("{F}/wrongshape.npy")[:-1] + ["{OUT}/a/b/report"], "--data {F}/wrongshape.npy"),
    (
        "layers-unknown",
        ["fit", "toy-affine", "--data", "{F}/train.npz", "--out", "{OUT}", "--layers", "nope", "--device", "cpu"],
        "nope",
    ),
    ("unknown-option", [*SCAN, "--sampels", "3"], "--sampels"),
    ("unknown-command", ["scna", "toy-affine"], "scna"),
    ("unknown-group-option", ["--bogus", "scan"], "No such option '--bogus'"),
    ("inspect-no-model", ["inspect"], "give MODEL"),
    (
        "train-config-not-json",
        ["train", "sr", "--config", "{F}/notjson.json", "--iters", "1", "--out", "{OUT}"],
        "--config {F}/notjson.json: not JSON",
    ),
    (
        "train-config-unknown",
        ["train", "sr", "--config", "{F}/unknownopt.json", "--iters", "1", "--out", "{OUT}"],
        "unknown option 'no_such_option'",
    ),
    (
        "train-from-truncated",
        ["train", "sr", "--from", "{F}/truncated.pt", "--iters", "1", "--out", "{OUT}"],
        "{F}/truncated.pt: unreadable checkpoint",
    ),
    (
        "train-from-no-config",
        ["train", "lowlight", "--from", "{F}/noconfig.pt", "--iters", "1", "--out", "{OUT}"],
        "{F}/noconfig.pt: reference checkpoint without 'config'",
    ),
    (
        "train-from-not-ours",
        ["train", "sr", "--from", "{F}/layout.pt", "--iters", "1", "--out", "{OUT}"],
        "{F}/layout.pt: not a flowaudit reference checkpoint",
    ),
]


def _expand(value: str, f: Path, out: Path) -> str:
    return value.replace("{F}", str(f)).replace("{OUT}", str(out))


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_hostile_input_exits_2_with_one_line(files: Path, tmp_path: Path, monkeypatch, argv, expected) -> None:
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.chdir(files)  # module:factory imports from the working directory
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    res = CliRunner().invoke(cli, ["-q", *(_expand(a, files, out) for a in argv)], catch_exceptions=False)
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("flowaudit: error: "), lines[0]
    assert _expand(expected, files, out) in lines[0], lines[0]
    assert "Traceback" not in res.output + res.stderr
    assert list(work.iterdir()) == [], "something was written"


def test_catalogue_size() -> None:
    assert len(CASES) >= 40 and len({i for i, _, _ in CASES}) == len(CASES)


def test_existing_out_and_busy_out(files: Path, tmp_path: Path) -> None:
    """--out that exists is refused; --out that another live run has claimed is refused, and left alone."""
    runner = CliRunner()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    res = runner.invoke(cli, ["-q", *(_expand(a, files, existing) for a in SCAN)])
    assert res.exit_code == 2 and res.stderr.strip() == f"flowaudit: error: {existing} exists (use --overwrite)"
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    out = tmp_path / "busy"
    lock = tmp_path / ".busy.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run (here: this test) holds the claim
    try:
        res = runner.invoke(cli, ["-q", *(_expand(a, files, out) for a in SCAN)])
    finally:
        os.close(fd)
    assert res.exit_code == 2, res.output
    assert (
        res.stderr.startswith(f"flowaudit: error: {out}: another run (pid 4242) is writing it")
        and res.stderr.count("\n") == 1
    )
    assert not out.exists() and lock.exists()  # the holder's lock is not ours to remove
    lock.unlink()


def test_stale_lock_is_taken_over(files: Path, tmp_path: Path) -> None:
    """A lock file whose process is gone (no flock held) does not block: the run takes it over and removes it."""
    out = tmp_path / "r"
    (tmp_path / ".r.lock").write_text("999999\n")
    res = CliRunner().invoke(cli, ["-q", *(_expand(a, files, out) for a in SCAN)])
    assert res.exit_code == 0, res.output
    assert (out / "report.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_nonfinite_conditions_are_counted_not_sampled(files: Path, tmp_path: Path) -> None:
    """NaN/Inf conditions: counted in data.<set>.n_nonfinite, flagged per input with s_OOD inf, kept out of the
    Gaussian and of %Inf; the scan does not crash and the fit says how many it skipped."""
    y = np.load(files / "train.npz")["y"][:40].copy()
    y[3, 0], y[7, 1], y[11] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "nan.npy", y)
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "-q",
            "fit",
            "toy-affine",
            "--data",
            str(tmp_path / "nan.npy"),
            "--out",
            str(tmp_path / "s.h5"),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    fit = json.loads(res.output)
    assert fit["ood"]["n_inputs"] == 37 and fit["ood"]["n_nonfinite"] == 3
    res = runner.invoke(
        cli,
        [
            "-q",
            "scan",
            "toy-affine",
            "--data",
            str(tmp_path / "nan.npy"),
            "--stats",
            str(tmp_path / "s.h5"),
            "--samples",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "NaN/Inf conditions, reported but not sampled" in res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["data"]["in"]["n_nonfinite"] == 3 and report["risk"]["n_inputs"] == 37
    assert report["ood"]["n_fit_nonfinite"] == 3  # the Gaussian (from s.h5) says it skipped them too
    flagged = [r for r in report["inputs"] if r.get("nonfinite_condition")]
    assert [r["id"] for r in flagged] == ["in/row3", "in/row7", "in/row11"]
    assert all(r["s_ood"] == "inf" and r["n_inf"] is None and r["risk"] is None for r in flagged)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("truncated.pt", "unreadable checkpoint"),
        ("empty.pt", "empty file"),
        ("mismatch.pt", "cannot resume, it was trained with config"),
    ],
)
def test_train_resume_from_a_broken_checkpoint(files: Path, tmp_path: Path, name: str, expected: str) -> None:
    """--resume over a checkpoint that cannot be used: exit 2, one line, the file left as it was."""
    out = tmp_path / "toy.pt"
    out.write_bytes((files / name).read_bytes())
    res = CliRunner().invoke(cli, ["-q", "train", "toy", "--resume", "--iters", "1", "--out", str(out)])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, (res.exit_code, res.stderr)
    assert res.stderr.startswith(f"flowaudit: error: {out}: {expected}"), res.stderr
    assert out.read_bytes() == (files / name).read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == ["toy.pt"]


def test_a_swallowed_interrupt_still_stops_the_writes(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM whose ``KeyboardInterrupt`` a finaliser swallows (tqdm's ``__del__`` did, in a real ``fit``) still
    stops the command: no atomic write commits after it, file or folder, and the CLI says it was interrupted, in
    its one line: the swallowed interrupt is not printed, while other unraisable exceptions still are."""
    import signal
    import sys

    from flowaudit.cli import options as cli_options
    from flowaudit.utils import atomic

    monkeypatch.setattr(atomic, "_STOP", [])
    swallowed: list[type] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_type))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        cli_options.install_signal_handlers()

        class Finalised:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler's KeyboardInterrupt is raised here and ignored

        class Failing:
            def __del__(self):
                raise ValueError("a finaliser's own error")

        Failing()
        assert swallowed == [ValueError]  # still reported
        Finalised()
        assert swallowed == [ValueError]  # swallowed, and not printed: the code below runs on
        assert cli_options.was_interrupted()
        with pytest.raises(KeyboardInterrupt), atomic.atomic_path(tmp_path / "stats.h5") as tmp:
            tmp.write_text("complete, but asked to stop")
        with pytest.raises(KeyboardInterrupt), atomic.atomic_dir(tmp_path / "report") as tmp:
            (tmp / "report.json").write_text("{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        sys.unraisablehook = getattr(sys.unraisablehook, "wrapped", sys.unraisablehook)


# -- the growing catalogue: one class of hostile input per group, generated where the class is a set ------------


def _safetensors(path: Path, header: object, body: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def _tensor_header(shape: list[int], offsets: list[int], dtype: str = "F32") -> dict:
    return {"w": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


@pytest.fixture(scope="module")
def more(files: Path) -> Path:
    """The second catalogue's inputs, beside the first's (``{X}`` in the argv)."""
    x = files / "x"
    if x.exists():
        return x
    x.mkdir()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # code in every pickle protocol, nested two levels down
        (x / f"code{protocol}.pt").write_bytes(pickle.dumps({"state_dict": {"a": _Code()}}, protocol=protocol))
    (x / "codedeep.pt").write_bytes(pickle.dumps({"a": [1, (2, {"b": [_Code()]})]}, protocol=2))
    (x / "codetop.pt").write_bytes(pickle.dumps(_Code(), protocol=4))
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": [_Code()]}, x / "codezip.pt")  # inside a zip checkpoint
    torch.save(_Code(), x / "codeziptop.pt")
    _safetensors(x / "st_notjson.safetensors", b"not json at all!")
    _safetensors(x / "st_list.safetensors", b"[1,2,3]")
    _safetensors(x / "st_offsets.safetensors", _tensor_header([2], [0, 800]), bytes(8))
    _safetensors(x / "st_dtype.safetensors", _tensor_header([2], [0, 8], "Q99"), bytes(8))
    _safetensors(x / "st_negshape.safetensors", _tensor_header([-2], [0, 8]), bytes(8))
    _safetensors(x / "st_hugeshape.safetensors", _tensor_header([2**40, 2**40], [0, 8]), bytes(8))
    _safetensors(x / "st_reversed.safetensors", _tensor_header([2], [8, 0]), bytes(8))
    overlap = {**_tensor_header([2], [0, 8]), "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    _safetensors(x / "st_overlap.safetensors", overlap, bytes(12))
    (x / "st_short.safetensors").write_bytes(b"\x05\x00")
    np.save(x / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(x / "obj.npz", y=np.array([[_Code()]], dtype=object))
    import zipfile

    with zipfile.ZipFile(x / "pickle_in_npz.npz", "w") as z:
        z.writestr("y.npy", pickle.dumps(_Code()))
    np.save(x / "rank4.npy", np.zeros((3, 1, 1, 2), np.float32))
    np.save(x / "structured.npy", np.zeros(3, dtype=[("a", "f4"), ("b", "f4")]))
    for name, make in (
        ("compound", lambda h: h.__setitem__("y", np.zeros(3, dtype=[("a", "f4"), ("b", "f4")]))),
        ("string", lambda h: h.__setitem__("y", np.array([[b"ab", b"cd"]]))),
        ("vlen", lambda h: h.create_dataset("y", (2,), dtype=h5py.vlen_dtype(np.float32))),
        ("huge", lambda h: h.create_dataset("y", shape=(10**12, 2), dtype=np.float32, chunks=(1024, 2))),
        ("scalar", lambda h: h.__setitem__("y", 3.0)),
        ("group", lambda h: h.create_group("y")),
        ("dangling", lambda h: h.__setitem__("y", h5py.SoftLink("/nothere"))),
    ):
        with h5py.File(x / f"{name}.h5", "w") as h:
            make(h)
    with h5py.File(x / "other.h5", "w") as h:
        h["y"] = np.ones((2, 2), np.float32)
    with h5py.File(x / "x_external.h5", "w") as h:  # the targets, not the conditions, outside the file
        h["y"] = np.zeros((2, 2), np.float32)
        h.create_dataset("x", shape=(2, 3), dtype=np.float32, external=[(str(files / "secret.bin"), 0, 24)])
    with h5py.File(x / "x_link.h5", "w") as h:
        h["y"] = np.zeros((2, 2), np.float32)
        h["x"] = h5py.ExternalLink(str(x / "other.h5"), "y")
    with h5py.File(x / "y_link.h5", "w") as h:
        h["y"] = h5py.ExternalLink(str(x / "other.h5"), "y")
    for name, source in (("virtual_missing", str(x / "missing.h5")), ("virtual_self", ".")):
        with h5py.File(x / f"{name}.h5", "w") as h:
            h["real"] = np.ones((2, 2), np.float32)
            layout = h5py.VirtualLayout(shape=(2, 2), dtype=np.float32)
            layout[:] = h5py.VirtualSource(source, "real" if source == "." else "y", shape=(2, 2))
            h.create_virtual_dataset("y", layout, fillvalue=0)
    with h5py.File(x / "soft.h5", "w") as h:  # a soft link inside the file is the file's own data: accepted
        h["real"] = np.load(files / "test.npz")["y"]
        h["y"] = h5py.SoftLink("/real")
    from flowaudit.stats.gaussian import GaussianOOD

    def stats_variant(name: str, **changes) -> None:
        g = GaussianOOD.load(files / "stats.h5")
        for key, value in changes.items():
            setattr(g, key, value)
        g.save(x / name)

    g = GaussianOOD.load(files / "stats.h5")
    loc, cov = g.location_.copy(), g.covariance_.copy()
    stats_variant("inf_mean.h5", location_=np.where(np.arange(len(loc)) == 0, np.inf, loc))
    stats_variant("nan_cov.h5", covariance_=np.where(np.eye(len(loc)) * (np.arange(len(loc)) == 0) > 0, np.nan, cov))
    asym = cov.copy()
    asym[0, 1] += 1.0
    stats_variant("asym_cov.h5", covariance_=asym)
    stats_variant("neg_cov.h5", covariance_=-cov)
    stats_variant("zero_cov.h5", covariance_=np.zeros_like(cov))
    stats_variant("short_mean.h5", location_=loc[:-1].copy())
    stats_variant("tiny_cov.h5", covariance_=cov * 1e-320)  # denormal: not positive definite in float64
    raw = (files / "stats.h5").read_bytes()
    with h5py.File(files / "stats.h5") as h:
        keys, attrs = list(h.keys()), list(h.attrs.keys())
    for key in keys:
        for how in ("missing", "string", "link"):
            (x / f"{how}_{key}.h5").write_bytes(raw)
            with h5py.File(x / f"{how}_{key}.h5", "a") as h:
                del h[key]
                if how == "string":
                    h[key] = np.array([b"abc"])
                elif how == "link":
                    h[key] = h5py.ExternalLink(str(files / "stats.h5"), key)
    for attr in attrs:
        (x / f"noattr_{attr}.h5").write_bytes(raw)
        with h5py.File(x / f"noattr_{attr}.h5", "a") as h:
            del h.attrs[attr]
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    big = struct.pack(">IIBBBBB", 2**31 - 1, 2**31 - 1, 8, 2, 0, 0, 0)
    (x / "bombpng").mkdir()  # headers alone: a PNG and a JPEG declaring gigapixels in a few dozen bytes
    (x / "bombpng" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", big) + chunk(b"IEND", b""))
    (x / "bombjpg").mkdir()
    sof = b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    (x / "bombjpg" / "b.jpg").write_bytes(b"\xff\xd8" + sof + b"\xff\xd9")
    img = x / "img"
    for i in range(2):
        for mode, make in (
            ("gray", lambda: Image.new("L", (4, 4), 100)),
            ("rgba", lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0))),
            ("i16", lambda: Image.fromarray(np.full((4, 4), 40000, np.uint16))),
            ("palette", lambda: Image.new("P", (4, 4), 3)),
            ("bilevel", lambda: Image.new("1", (4, 4), 1)),
        ):
            (img / mode).mkdir(parents=True, exist_ok=True)
            make().save(img / mode / f"{i}.png")
        (img / "cmyk").mkdir(exist_ok=True)
        Image.new("CMYK", (4, 4)).save(img / "cmyk" / f"{i}.jpg")
        (img / "tiff").mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(img / "tiff" / f"{i}.tiff")
    for layout, made in (("lronly", ("lr",)), ("emptypairs", ("lr", "hr")), ("both", ("lr", "hr", "low", "high"))):
        for d in made:
            (img / layout / d).mkdir(parents=True)
    _png(img / "lronly" / "lr" / "a.png", 4, 4)
    _png(img / "unpaired" / "lr" / "a.png", 4, 4)
    _png(img / "unpaired" / "hr" / "b.png", 16, 16)
    _png(img / "hidden" / ".a.png")
    (img / "zero").mkdir()
    (img / "zero" / "a.png").write_bytes(b"")
    (img / "dirpng" / "a.png").mkdir(parents=True)
    y = np.load(files / "test.npz")["y"].astype(np.float64)
    for name, value in CONDITION_VALUES.items():
        z = y.copy()
        z[2, 0], z[5] = value, value
        np.save(x / f"cond_{name}.npy", z)
    for name in ODD_NAMES:
        (x / "names" / name).mkdir(parents=True)
        (x / "names" / name / "train.npz").write_bytes((files / "train.npz").read_bytes())
    (x / "loop").symlink_to(x / "loop")
    (x / "dangling.npz").symlink_to(x / "nothere.npz")
    (x / "link.npz").symlink_to(files / "train.npz")
    os.mkfifo(x / "fifo.npz")
    os.mkfifo(x / "fifo.pt")
    os.mkfifo(x / "fifo.h5")
    (x / "yaml_code.yml").write_text("network_G:\n  which_model_G: !!python/object/apply:os.system ['echo pwned']\n")
    return x


CONDITION_VALUES = {
    "1e300": 1e300,
    "-1e300": -1e300,
    "nan": np.nan,
    "inf": np.inf,
    "denormal": 1e-310,
    "neg-zero": -0.0,
}
ODD_NAMES = ("new\nline", "sp ace", "ünï©ødé", "-dash", "tab\there", "x" * 200)


def _fit(data: str, model: str = "toy-affine", out: str = "{OUT}") -> list[str]:
    return ["fit", model, "--data", data, "--out", out, "--device", "cpu"]


def _inspect(model: str, *extra: str) -> list[str]:
    return ["inspect", model, "--device", "cpu", *extra]


STATS_ARRAYS = ("n", "reference", "sum", "sum_sq", "sum_cubic", "sum_quartic", "location", "covariance", "cholesky")
#: Attributes a stats file cannot do without (its format, header and metadata; not the writer's version).
STATS_REQUIRED_ATTRIBUTES = (
    "format",
    "estimator",
    "shrinkage",
    "dim",
    "n_inputs",
    "n_nonfinite",
    "json_keys",
    "metadata_keys",
    "model",
    "adapter",
    "fingerprint",
    "layers",
    "pooling",
    "data",
)
_CODE = "holds pickled code (posix.system)"
_CODE_FILES = [f"code{p}" for p in range(pickle.HIGHEST_PROTOCOL + 1)] + [
    "codedeep",
    "codetop",
    "codezip",
    "codeziptop",
]
_BAD_SAFETENSORS = ("notjson", "list", "offsets", "dtype", "negshape", "hugeshape", "reversed", "overlap", "short")

MORE_CASES = [
    # -- untrusted checkpoints: code in any protocol, at any depth, inside a zip; as MODEL, --weights, --from, --resume
    *[(f"code-model-{n}", _inspect("{X}/" + n + ".pt"), "{X}/" + n + ".pt: " + _CODE) for n in _CODE_FILES],
    *[
        (
            f"code-weights-{n}",
            ["inspect", "--model", "factories_hostile:linear", "--weights", "{X}/" + n + ".pt", "--device", "cpu"],
            _CODE,
        )
        for n in _CODE_FILES
    ],
    *[
        (f"code-train-from-{n}", ["train", "sr", "--from", "{X}/" + n + ".pt", "--iters", "1", "--out", "{OUT}"], _CODE)
        for n in ("code2", "codezip")
    ],
    ("code-model-fifo", _inspect("{X}/fifo.pt"), "{X}/fifo.pt: not a regular file"),
    *[
        (f"safetensors-{n}", _inspect("{X}/st_" + n + ".safetensors"), "{X}/st_" + n + ".safetensors: corrupt")
        for n in _BAD_SAFETENSORS
    ],
    # -- untrusted data files: pickles and objects in numpy files, HDF5 outside the file, odd dtypes and shapes --------
    ("npy-object", scan_data("{X}/obj.npy"), "{X}/obj.npy: unreadable .npy file"),
    ("npz-object", scan_data("{X}/obj.npz"), "{X}/obj.npz: unreadable .npz file"),
    ("npz-pickle-member", _fit("{X}/pickle_in_npz.npz"), "{X}/pickle_in_npz.npz: unreadable .npz file"),
    ("npy-rank4", scan_data("{X}/rank4.npy"), "conditions have shape (1, 1, 2), the model expects (2,)"),
    ("npy-structured", scan_data("{X}/structured.npy"), "not numeric"),
    ("h5-compound", scan_data("{X}/compound.h5"), "{X}/compound.h5: array 'y' has dtype"),
    ("h5-string", _fit("{X}/string.h5"), "{X}/string.h5: array 'y' has dtype |S2, not numeric"),
    ("h5-vlen", _fit("{X}/vlen.h5"), "not numeric"),
    ("h5-huge-declared", scan_data("{X}/huge.h5"), "above the memory budget"),
    ("h5-huge-declared-fit", _fit("{X}/huge.h5"), "above the memory budget"),
    ("h5-scalar", scan_data("{X}/scalar.h5"), "has shape ()"),
    ("h5-group", scan_data("{X}/group.h5"), "no dataset 'y'"),
    ("h5-dangling-soft-link", scan_data("{X}/dangling.h5"), "no dataset 'y'"),
    ("h5-targets-external-storage", _fit("{X}/x_external.h5"), "'x' keeps its bytes in external files"),
    ("h5-targets-external-link", scan_data("{X}/x_link.h5"), "'x' is an external link"),
    ("h5-external-link", _fit("{X}/y_link.h5"), "'y' is an external link"),
    ("h5-virtual-missing", scan_data("{X}/virtual_missing.h5"), "'y' is a virtual dataset"),
    ("h5-virtual-own-file", _fit("{X}/virtual_self.h5"), "'y' is a virtual dataset"),
    ("data-fifo", scan_data("{X}/fifo.npz"), "{X}/fifo.npz: not a regular file or folder"),
    ("data-h5-fifo", _fit("{X}/fifo.h5"), "{X}/fifo.h5: not a regular file or folder"),
    # -- statistics files: non-finite, not SPD, asymmetric, wrong shapes, missing or foreign parts ---------------------
    *[
        (f"stats-{n}", [*SCAN, "--stats", "{X}/" + n + ".h5"], "{X}/" + n + ".h5 is not a valid flowaudit stats file")
        for n in ("inf_mean", "nan_cov", "asym_cov", "neg_cov", "zero_cov", "short_mean", "tiny_cov")
    ],
    *[
        (f"stats-{how}-{key}", [*SCAN, "--stats", "{X}/" + f"{how}_{key}.h5"], "{X}/" + f"{how}_{key}.h5{said}")
        for key in STATS_ARRAYS
        for how, said in (
            ("missing", f" is not a valid flowaudit stats file (no dataset {key!r})"),
            ("string", " is not a valid flowaudit stats file"),
            ("link", f" is not a valid flowaudit stats file ({key!r} is an external link"),
        )
    ],
    *[
        (f"stats-no-attribute-{a}", [*SCAN, "--stats", "{X}/noattr_" + a + ".h5"], "{X}/noattr_" + a + ".h5 is not a")
        for a in STATS_REQUIRED_ATTRIBUTES
    ],
    ("stats-fifo", [*SCAN, "--stats", "{X}/fifo.h5"], "{X}/fifo.h5 is not a flowaudit stats file (not a regular"),
    ("stats-loop", [*SCAN, "--stats", "{X}/loop"], "'--stats'"),
    ("stats-npz", [*SCAN, "--stats", "{F}/test.npz"], "{F}/test.npz is not a flowaudit stats file"),
    # -- shapes and images ---------------------------------------------------------------------------------------------
    ("img-tiff-only", scan_data("{X}/img/tiff", "{F}/tiny_sr.pt"), "{X}/img/tiff: no PNG/JPEG images"),
    ("img-lr-without-hr", scan_data("{X}/img/lronly", "{F}/tiny_sr.pt"), "{X}/img/lronly: no PNG/JPEG images"),
    ("img-empty-pairs", _fit("{X}/img/emptypairs", "{F}/tiny_sr.pt"), "no PNG/JPEG image pairs in lr/ and hr/"),
    ("img-unpaired", scan_data("{X}/img/unpaired", "{F}/tiny_sr.pt"), "files do not pair by name"),
    ("img-two-layouts", scan_data("{X}/img/both", "{F}/tiny_sr.pt"), "ambiguous, holds both"),
    ("img-only-hidden", _fit("{X}/img/hidden", "{F}/tiny_sr.pt"), "{X}/img/hidden: no PNG/JPEG images"),
    ("img-empty-file", scan_data("{X}/img/zero", "{F}/tiny_sr.pt"), "{X}/img/zero/a.png: unreadable image"),
    ("img-folder-named-png", scan_data("{X}/img/dirpng", "{F}/tiny_sr.pt"), "no PNG/JPEG images"),
    # -- memory: bombs by header alone, budgets too small for the data ----------------------------------------------
    ("bomb-png-header", scan_data("{X}/bombpng", "{F}/tiny_sr.pt"), "decompression-bomb"),
    ("bomb-jpeg-header", _fit("{X}/bombjpg", "{F}/tiny_sr.pt"), "decompression-bomb"),
    ("bomb-inspect", _inspect("{F}/tiny_sr.pt", "--data", "{X}/bombpng"), "decompression-bomb"),
    (
        "max-memory-one-byte-attack",
        ["attack", "toy-affine", "--data", "{F}/test.npz", "--max-memory", "1", "--out", "{OUT}"],
        "above the memory budget of 1 bytes",
    ),
    ("max-memory-below-resident-scan", [*SCAN, "--max-memory", "1KB"], "--max-memory 0.00 GB leaves 0 MB"),
    ("max-memory-quick-data", [*SCAN, "--quick", "--max-memory", "100"], "above the memory budget of 100 bytes"),
    (
        "max-memory-quick-resident",
        ["scan", "toy-affine", "--data", "{F}/test.npz", "--quick", "--max-memory", "1MB", "--out", "{OUT}"],
        "--max-memory 0.00 GB leaves 0 MB",
    ),
    (
        "max-memory-below-resident-attack",
        ["attack", "toy-affine", "--data", "{F}/test.npz", "--max-memory", "1KB", "--device", "cpu", "--out", "{OUT}"],
        "--max-memory 0.00 GB leaves 0 MB",
    ),
    # -- paths: loops, files where folders must be, outputs that are inputs -------------------------------------------
    ("data-symlink-loop", scan_data("{X}/loop"), "'--data'"),
    ("data-dangling-symlink", _fit("{X}/dangling.npz"), "'--data'"),
    ("out-symlink-loop", [*SCAN[:-1], "{X}/loop", "--overwrite"], "{X}/loop: cannot write: too many levels"),
    ("out-under-symlink-loop", [*SCAN[:-1], "{X}/loop/r"], "{X}/loop is not a folder"),
    ("out-under-a-file", [*SCAN[:-1], "{F}/test.npz/r"], "{F}/test.npz is not a folder"),
    ("out-path-too-long", [*SCAN[:-1], "{OUT}/" + "/".join(["z" * 250] * 20)], "file name too long"),
    ("fit-out-is-data", [*_fit("{F}/train.npz", out="{F}/train.npz"), "--overwrite"], "--out {F}/train.npz is --data"),
    ("fit-out-is-model", [*_fit("{F}/train.npz", "{F}/tiny_sr.pt", "{F}/tiny_sr.pt"), "--overwrite"], "is MODEL"),
    ("scan-out-is-data-folder", [*scan_data("{F}/rgb4")[:-1], "{F}/rgb4", "--overwrite"], "is --data {F}/rgb4"),
    ("quick-out-is-data", [*scan_data("{F}/rgb4")[:-1], "{F}/rgb4", "--quick", "--overwrite"], "is --data {F}/rgb4"),
    ("scan-out-holds-data", [*scan_data("{F}/rgb4")[:-1], "{F}", "--overwrite"], "--out {F} holds --data"),
    ("scan-out-is-stats", [*SCAN[:-1], "{F}/stats.h5", "--stats", "{F}/stats.h5", "--overwrite"], "'--out'"),
    ("scan-junit-is-data", [*scan_data("{F}/test.npz"), "--junit", "{F}/test.npz"], "--junit {F}/test.npz is --data"),
    ("scan-junit-in-out", [*SCAN, "--junit", "{OUT}"], "--junit {OUT} is inside --out"),
    (
        "train-out-is-from",
        ["train", "sr", "--from", "{F}/tiny_sr.pt", "--iters", "1", "--out", "{F}/tiny_sr.pt"],
        "--out {F}/tiny_sr.pt is --from",
    ),
    ("resume-not-a-work-folder", [*SCAN, "--resume", "{F}/test.npz"], "--resume"),
    (
        "official-options-on-reference",
        _inspect("toy-affine", "--official-config", "{X}/yaml_code.yml"),
        "only for official checkpoints",
    ),
]


def _run(argv: list[str], files: Path, x: Path, tmp_path: Path) -> tuple[object, Path, Path]:
    """Run ``flowaudit -q argv`` with ``{F}``, ``{X}`` and ``{OUT}`` expanded; ``(result, work, out)``."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    args = [a.replace("{X}", str(x)).replace("{F}", str(files)).replace("{OUT}", str(out)) for a in argv]
    return CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False), work, out


def _assert_one_line(res, expected: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("flowaudit: error: "), lines[0]
    assert expected in lines[0], (expected, lines[0])
    assert "Traceback" not in res.output + res.stderr


@pytest.mark.parametrize("argv, expected", [pytest.param(a, e, id=i) for i, a, e in MORE_CASES])
def test_more_hostile_inputs_exit_2_with_one_line(
    files: Path, more: Path, tmp_path: Path, monkeypatch, argv, expected
) -> None:
    """The second catalogue: exit 2, one line naming the input, nothing written, every input left as it was."""
    monkeypatch.chdir(files)
    before = {p: p.stat().st_mtime_ns for p in files.iterdir() if p.is_file()}
    res, work, out = _run(argv, files, more, tmp_path)
    _assert_one_line(res, expected.replace("{X}", str(more)).replace("{F}", str(files)).replace("{OUT}", str(out)))
    assert list(work.iterdir()) == [], "something was written"
    assert {p: p.stat().st_mtime_ns for p in files.iterdir() if p.is_file()} == before, "an input was touched"


# -- every numeric option of every command: generated from the commands themselves, so a new option joins ------------

#: The least command line each command runs with; the option under test is appended (the last value wins).
BASE_ARGV = {
    "fit": _fit("{F}/train.npz"),
    "scan": SCAN,
    "attack": ["attack", "toy-affine", "--data", "{F}/test.npz", "--device", "cpu", "--out", "{OUT}"],
    "inspect": _inspect("toy-affine"),
    "demo": ["demo", "--out", "{OUT}"],
    "train toy": ["train", "toy", "--iters", "1", "--out", "{OUT}"],
    "train sr": ["train", "sr", "--iters", "1", "--out", "{OUT}"],
    "train lowlight": ["train", "lowlight", "--iters", "1", "--out", "{OUT}"],
    "data toy": ["data", "toy", "--out", "{OUT}"],
    "data sr": ["data", "sr", "--out", "{OUT}"],
    "data lowlight": ["data", "lowlight", "--out", "{OUT}"],
}


def _commands(group=cli, path: str = "") -> dict:
    import click

    found = {}
    for name, command in group.commands.items():
        sub = f"{path} {name}".strip()
        if isinstance(command, click.Group):
            found.update(_commands(command, sub))
        else:
            found[sub] = command
    return found


def _numeric(command) -> list:
    import click

    from flowaudit.config.validate import MemorySize

    kinds = (click.types.IntParamType, click.types.FloatParamType, MemorySize)
    return [p for p in command.params if isinstance(p, click.Option) and isinstance(p.type, kinds)]


def _bad_values(param) -> list[str]:
    """Values the option must refuse: non-numbers, non-finite values and one step past each end of its range."""
    import click

    from flowaudit.config.validate import MemorySize

    t = param.type
    if isinstance(t, MemorySize):
        return ["nan", "inf", "-1", "0", "abc", "", "1e400GB", "-5GB", "5XB", str(t.hi + 1), str(2**200)]
    values = ["nan", "inf", "-inf", "1e400", "abc", "", str(2**64), str(-(2**64))]
    if isinstance(t, click.types.IntParamType):
        values += ["1.5", str(t.min - 1), str(t.max + 1)]
    else:
        values += [repr(t.min) if t.min_open else repr(t.min - abs(t.min) * 1e-9 - 1e-300), repr(t.max * (1 + 1e-9))]
    return values


NUMERIC_CASES = [
    pytest.param(name, p.opts[0], value, id=f"{name}{p.opts[0]}={value!r}")
    for name, command in _commands().items()
    for p in _numeric(command)
    for value in _bad_values(p)
]


def test_every_numeric_option_is_bounded() -> None:
    """Each numeric option of each command has both ends (a typo of 2**64 or 1e12 is one line, not a crash or a
    hang), refuses NaN/Inf, and each command has a base command line for the generated cases below."""
    import click

    from flowaudit.config.validate import BoundedInt, FiniteFloat, MemorySize

    commands = _commands()
    assert set(commands) == set(BASE_ARGV)
    seen = 0
    for name, command in commands.items():
        for p in _numeric(command):
            seen += 1
            t = p.type
            assert isinstance(t, (BoundedInt, FiniteFloat, MemorySize)), (name, p.opts, t)
            if not isinstance(t, MemorySize):
                assert t.min is not None and t.max is not None, (name, p.opts)
                assert math.isfinite(t.min) and math.isfinite(t.max), (name, p.opts)
        assert all(not isinstance(p.type, click.types.FuncParamType) for p in command.params)
    assert seen >= 40


@pytest.mark.parametrize("command, option, value", NUMERIC_CASES)
def test_every_numeric_option_refuses_bad_values(files: Path, tmp_path: Path, command, option, value) -> None:
    res, work, _ = _run([*BASE_ARGV[command], option, value], files, files, tmp_path)
    _assert_one_line(res, f"'{option}'")
    assert list(work.iterdir()) == [], "something was written"


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--std-steps", "-1", "each index must be in 0..9999"),
        ("--std-steps", str(2**64), "each index must be in 0..9999"),
        ("--stack-blocks", "1,,2", "expected comma-separated block indices"),
        ("--stack-blocks", "nan", "expected comma-separated block indices"),
        ("--stack-blocks", "1e3", "expected comma-separated block indices"),
        ("--output-range", "nan,1", "--output-range"),
        ("--output-range", "0,inf", "--output-range"),
        ("--output-range", "1,0", "--output-range"),
        ("--output-range", "1,1", "--output-range"),
        ("--output-range", "1,2,3", "--output-range"),
        ("--attack", "linf:nan", "--attack"),
        ("--attack", "linf:inf", "--attack"),
        ("--attack", "linf:-1", "--attack"),
        ("--attack", "linf:1/0", "--attack"),
        ("--attack", "box:1,0", "--attack"),
        ("--attack", "box:0,inf", "--attack"),
        ("--attack", "lp:1", "--attack"),
    ],
)
def test_numeric_lists_and_budgets_refuse_bad_values(files: Path, tmp_path: Path, option, value, expected) -> None:
    """Options whose value holds several numbers (indices, a band, a budget) hold each number to the same rule."""
    res, work, _ = _run([*SCAN, option, value], files, files, tmp_path)
    _assert_one_line(res, expected)
    assert list(work.iterdir()) == []


def test_a_long_search_without_budget_does_not_overflow() -> None:
    """The budget-free step schedule grows geometrically: thousands of steps once overflowed a float (exit 3)."""
    from flowaudit.config.budget import parse_budget
    from flowaudit.evidence.search import default_step

    none = parse_budget("none")
    for steps in (1, 50, 1000, 2000, 10**6):
        first, growth = default_step(none, steps, 1.0)
        assert first == 0.01 and 1.0 <= growth <= 2.0 and math.isfinite(growth)
    assert default_step(none, 50, 1.0) == default_step(none, 50, 1.0)  # unchanged where it never overflowed


# -- inputs that are odd but legal: the command succeeds, says at most one line on stderr, and counts what it skips --


def _ok(res) -> None:
    assert res.exit_code == 0, (res.exit_code, res.output, res.stderr)
    assert len([line for line in res.stderr.splitlines() if line.strip()]) <= 1, res.stderr
    assert "Traceback" not in res.output + res.stderr and "Warning" not in res.stderr


@pytest.mark.parametrize(
    "command, value",
    [(c, v) for c in ("fit", "inspect") for v in CONDITION_VALUES]
    + [(c, v) for c in ("scan", "attack") for v in ("1e300", "nan")],
)
def test_absurd_condition_values_are_counted_not_fatal(
    files: Path, more: Path, tmp_path: Path, command: str, value: str
) -> None:
    """NaN, ±Inf, ±1e300 (Inf in float32), denormals and -0.0 among finite conditions: exit 0, at most one line.

    Non-finite rows are counted (``n_nonfinite``) and left out; denormals and -0.0 are ordinary finite values.
    ``fit`` and ``inspect`` take every value; the sampled commands two of them, to stay fast.
    """
    data = "{X}/cond_" + value + ".npy"
    argv = {
        "fit": [*_fit(data), "--json"],
        "inspect": _inspect("toy-affine", "--data", data),
        "scan": scan_data(data),
        "attack": [
            "attack",
            "toy-affine",
            "--data",
            data,
            "--starts",
            "8",
            "--steps",
            "2",
            "--samples",
            "1",
            "--device",
            "cpu",
            "--out",
            "{OUT}",
        ],
    }[command]
    res, _, out = _run(argv, files, more, tmp_path)
    _ok(res)
    nonfinite = 2 if value in ("1e300", "-1e300", "nan", "inf") else 0
    if command == "fit":
        assert json.loads(res.output)["ood"]["n_nonfinite"] == nonfinite
    if command == "scan":
        assert json.loads((out / "report.json").read_text())["data"]["in"]["n_nonfinite"] == nonfinite


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("gray", 100 / 255),
        ("rgba", (10 / 255, 20 / 255, 30 / 255)),  # alpha dropped, colour kept
        ("i16", 40000 / 65535),
        ("palette", None),
        ("bilevel", 1.0),
        ("cmyk", None),
    ],
)
def test_image_modes_become_rgb_in_unit_range(more: Path, mode: str, expected) -> None:
    """Gray, RGBA, 16-bit, palette, 1-bit PNGs and CMYK JPEGs read as N×3×H×W float32 in [0, 1]."""
    from flowaudit.io.datasets import load_conditions

    cs = load_conditions(more / "img" / mode)
    assert tuple(cs.y.shape) == (2, 3, 4, 4) and cs.y.dtype == torch.float32
    assert float(cs.y.min()) >= 0 and float(cs.y.max()) <= 1
    if expected is not None:
        want = torch.tensor(expected, dtype=torch.float32).reshape(-1, 1, 1).expand(3, 4, 4)
        assert torch.allclose(cs.y[0], want, atol=1e-6), cs.y[0, :, 0, 0]


@pytest.mark.slow
def test_an_image_mode_fits_through_the_cli(files: Path, more: Path, tmp_path: Path) -> None:
    res, _, out = _run(scan_data("{X}/img/i16", "{F}/tiny_sr.pt"), files, more, tmp_path)
    _ok(res)
    assert json.loads((out / "report.json").read_text())["data"]["in"]["n"] == 2


@pytest.mark.parametrize("name", ODD_NAMES, ids=lambda n: repr(n[:12]))
def test_any_legal_file_name_works_in_and_out(files: Path, more: Path, tmp_path: Path, name: str) -> None:
    """Newlines, tabs, spaces, non-ASCII, a leading dash and long names: read as data and written as output."""
    data = more / "names" / name / "train.npz"
    out = tmp_path / name / f"{name[:100]}.h5"
    res = CliRunner().invoke(cli, ["-q", "fit", "toy-affine", f"--data={data}", f"--out={out}", "--device", "cpu"])
    _ok(res)
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_symlinked_data_and_an_output_inside_the_data_folder(files: Path, more: Path, tmp_path: Path) -> None:
    """A symlink to the data reads the data; a report inside an image folder is allowed (only the folder's own
    images are read), and the next run over that folder reads the same inputs."""
    res, _, _ = _run(_fit("{X}/link.npz"), files, more, tmp_path)
    _ok(res)
    folder = tmp_path / "images"
    for i in range(24):
        _png(folder / f"{i}.png", 4, 4, seed=i)
    argv = ["-q", "fit", str(files / "tiny_sr.pt"), "--data", str(folder), "--device", "cpu", "--json", "--out"]
    first = CliRunner().invoke(cli, [*argv, str(folder / "stats.h5")])
    _ok(first)
    second = CliRunner().invoke(cli, [*argv, str(folder / "again.h5")])
    _ok(second)
    assert json.loads(first.output)["ood"]["n_inputs"] == json.loads(second.output)["ood"]["n_inputs"] == 24


# -- interrupts: SIGINT or SIGTERM once shards are saved, then --resume gives the uninterrupted result --------------


def _long(kind: str, data: Path, out: Path, stats: Path) -> list[str]:
    import sys

    head = [sys.executable, "-m", "flowaudit", "-q"]
    tail = ["--device", "cpu", "--out", str(out)]
    if kind == "fit":
        return [*head, "fit", "toy-affine", "--data", str(data), *tail]
    if kind == "scan":
        return [*head, "scan", "toy-affine", "--data", str(data), "-k", "4", "--exact", "--stats", str(stats), *tail]
    return [*head, "attack", "toy-affine", "--data", str(data), "--starts", "48", "--steps", "10", "-k", "2", *tail]


def _result(kind: str, out: Path) -> object:
    if kind == "fit":
        with h5py.File(out) as h:
            return {k: h[k][()].tolist() for k in h.keys()}
    report = json.loads((out / "report.json").read_text())
    return report["inputs"] if kind == "scan" else report["attack"]["starts"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("kind", ["fit", "scan", "attack"])
def test_interrupted_once_shards_exist_then_resumed(files: Path, tmp_path: Path, kind: str, sig: str) -> None:
    """Exit 130 with one line, no output and no temporary left; ``--resume`` then equals the run in one go."""
    import signal
    import subprocess

    from flowaudit.reference_models.toy import toy_data
    from runs import ENV, kill_when

    data = tmp_path / "big.npy"
    np.save(data, np.asarray(toy_data(4000 if kind == "fit" else 256, seed=3)[1]))
    suffix = ".h5" if kind == "fit" else ""
    ref, out = tmp_path / f"ref{suffix}", tmp_path / f"out{suffix}"
    done = subprocess.run(_long(kind, data, ref, files / "stats.h5"), env=ENV, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr
    work = out.with_name(f".{out.name}.work")
    proc = kill_when(
        _long(kind, data, out, files / "stats.h5"),
        lambda: work.exists() and any(work.glob("*.npz")),
        getattr(signal, sig),
        [out, work],
    )
    stderr = proc.stderr.read()
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert len(stderr.strip().splitlines()) == 1 and f"interrupted ({sig})" in stderr and "--resume" in stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name or p.name.endswith(".lock")]
    again = subprocess.run(
        [*_long(kind, data, out, files / "stats.h5"), "--resume", str(work)], env=ENV, capture_output=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    assert not work.exists() and _result(kind, out) == _result(kind, ref)


# -- the file system says no: a file-size limit (EFBIG, as a full disk's ENOSPC) is one line and nothing left ---------


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(
            ["fit", "toy-affine", "--data", "{F}/train.npz", "--device", "cpu", "--out", "{OUT}.h5"], id="fit"
        ),
        pytest.param(
            ["scan", "toy-affine", "--data", "{F}/test.npz", "-k", "1", "--device", "cpu", "--out", "{OUT}"],
            id="scan",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["attack", "toy-affine", "--data", "{F}/test.npz", "--starts", "2", "--steps", "2", "--out", "{OUT}"],
            id="attack",
            marks=pytest.mark.slow,
        ),
        pytest.param(["data", "toy", "--n", "5000", "--out", "{OUT}.npz"], id="data", marks=pytest.mark.slow),
        pytest.param(["train", "toy", "--iters", "2", "--out", "{OUT}.pt"], id="train", marks=pytest.mark.slow),
    ],
)
def test_a_file_size_limit_is_one_line_and_leaves_nothing(files: Path, tmp_path: Path, argv: list[str]) -> None:
    """Under ``ulimit -f 8`` the write fails with EFBIG: exit 2 and one line, no signal, no crash inside HDF5,
    and no output, temporary or work folder left (the next run starts afresh)."""
    import resource
    import subprocess
    import sys

    from runs import ENV

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))

    out = tmp_path / "out"
    args = [a.replace("{F}", str(files)).replace("{OUT}", str(out)) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "flowaudit", "-q", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("flowaudit: error: ") and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "file too large" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_stats_catalogue_covers_the_format() -> None:
    """The stats cases above damage every array and every header attribute the format has."""
    from flowaudit.stats.stats_file import ARRAYS, HEADER

    assert STATS_ARRAYS == ARRAYS and set(HEADER) <= set(STATS_REQUIRED_ATTRIBUTES)


def test_relative_names_with_leading_dashes_are_paths_not_options(files: Path, tmp_path: Path, monkeypatch) -> None:
    """``--data -d.npz --out -o.h5``: an option's value that starts with a dash is still the value."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-d.npz").write_bytes((files / "train.npz").read_bytes())
    res = CliRunner().invoke(cli, ["-q", "fit", "toy-affine", "--data", "-d.npz", "--out", "-o.h5", "--device", "cpu"])
    _ok(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["-d.npz", "-o.h5"]
