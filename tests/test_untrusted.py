"""Untrusted files, statistics, numbers, the file system and exact batching, one class of input at a time.

Complements the CLI catalogue of ``test_hostile.py`` with the engine-level properties behind it:
pickles are read and never run, HDF5 data must live in the file, shards are plain data and a bad one
is recomputed, stats files are validated on load, writes fail in one line and leave nothing behind,
and the Gaussian's sums do not depend on how the rows were batched or sharded.
"""

from __future__ import annotations

import math
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowaudit.adapters.checkpoint import ModelError, read_weights
from flowaudit.config import validate
from flowaudit.errors import DataError
from flowaudit.io.datasets import load_conditions
from flowaudit.runs.shards import WorkFolder, pack, run_folded, run_shards, unpack
from flowaudit.stats.gaussian import GaussianOOD
from flowaudit.utils.atomic import OutputError, atomic_dir, atomic_path


class _Code:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


# -- untrusted checkpoints and HDF5 ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pickled_code_is_named_as_code_not_corrupt(tmp_path: Path, protocol: int) -> None:
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"w": _Code()}, protocol=protocol))
    zipped = tmp_path / "zip.pt"
    torch.save({"w": _Code()}, zipped)
    for f in (raw, zipped):
        with pytest.raises(ModelError, match=r"holds pickled code \(posix\.system\).*--trust-checkpoint"):
            read_weights(f)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(zipped.read_bytes()[:-40])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        read_weights(truncated)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    assert read_weights(plain)["w"].tolist() == [1.0, 1.0]


def _h5_with(tmp_path: Path, how: str) -> Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(8, dtype=np.float32).tobytes())
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["y"] = np.ones((2, 4), np.float32)
    path = tmp_path / f"{how}.h5"
    with h5py.File(path, "w") as f:
        if how == "external-storage":
            f.create_dataset("y", shape=(2, 4), dtype=np.float32, external=[(str(secret), 0, 32)])
        elif how == "external-link":
            f["y"] = h5py.ExternalLink(str(other), "y")
        elif how == "virtual":
            layout = h5py.VirtualLayout(shape=(2, 4), dtype=np.float32)
            layout[:] = h5py.VirtualSource(str(tmp_path / "missing.h5"), "y", shape=(2, 4))
            f.create_virtual_dataset("y", layout, fillvalue=0)
    return path


@pytest.mark.parametrize("how", ["external-storage", "external-link", "virtual"])
def test_hdf5_data_outside_the_file_is_refused(tmp_path: Path, how: str) -> None:
    with pytest.raises(DataError, match="refused") as err:
        load_conditions(_h5_with(tmp_path, how))
    assert "\n" not in str(err.value)


# -- shards and work folders -----------------------------------------------------------------------

PAYLOAD = {
    "records": [{"id": "row0", "s": math.inf, "n": None}, {"id": "a\nb", "s": -0.5, "n": 3}],
    "state": {"sum": torch.arange(6, dtype=torch.float64).reshape(2, 3), "n": 7, "t": (1, "x")},
    "half": torch.ones(3, dtype=torch.bfloat16),
    "np": np.array([1, 2], dtype=np.int32),
    1: "int key",
}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_shard_round_trip_is_plain_data_of_its_job() -> None:
    data = pack(PAYLOAD, "in-00000", "tag")
    assert data[:2] == b"PK" and b"posix" not in data
    assert _same(unpack(data, "in-00000", "tag"), PAYLOAD)
    for key, tag in (("in-00001", "tag"), ("in-00000", "other")):
        with pytest.raises(ValueError, match="another job or run"):
            unpack(data, key, tag)
    with pytest.raises(TypeError):
        pack({"f": lambda: 0}, "k", "t")


@given(st.binary(max_size=600), st.integers(0, 2000))
@settings(max_examples=150, deadline=None)
def test_fuzz_shard_bytes_load_or_refuse(noise: bytes, cut: int) -> None:
    """Any bytes — truncated, spliced, random — either unpack or raise ValueError; nothing else escapes."""
    good = pack(PAYLOAD, "k", "t")
    for data in (noise, good[:cut], good[:cut] + noise + good[cut + len(noise) :]):
        try:
            unpack(data, "k", "t")
        except ValueError:
            pass


def _jobs(calls: list[int], n: int = 4) -> list:
    def job(i: int):
        def compute():
            calls.append(i)
            return {"keep": {"i": i}, "state": torch.tensor([float(i)], dtype=torch.float64)}

        return compute

    return [(f"in-{i:05d}", job(i)) for i in range(n)]


def _fold(work: WorkFolder | None, calls: list[int]):
    return run_folded(_jobs(calls), lambda a, s: a + s, torch.zeros(1, dtype=torch.float64), lambda a: a,
                      lambda a: a, work)  # fmt: skip


@pytest.mark.parametrize("damage", ["truncate", "foreign", "pickle", "delete", "fold"])
def test_a_damaged_work_folder_resumes_to_the_same_result(tmp_path: Path, damage: str) -> None:
    expected, _ = _fold(None, [])
    work = WorkFolder(tmp_path / ".out.work", {"seed": 0})
    _fold(work, [])
    victim = work.path / ("fold.fold.npz" if damage == "fold" else "in-00001.npz")
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "foreign":
        victim.write_bytes(b"not a shard at all")
    elif damage == "pickle":
        victim.write_bytes(pickle.dumps(_Code()))
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(b"\x00" * 10)
    (work.path / "notes.txt").write_text("a foreign file is ignored")
    calls: list[int] = []
    acc, keeps = _fold(WorkFolder(work.path, {"seed": 0}, resume=True), calls)
    assert torch.equal(acc, expected) and [k["i"] for k in keeps] == [0, 1, 2, 3]
    assert calls == [0, 1, 2, 3]  # the fold could not be trusted: folded again from the first job


def test_run_shards_recomputes_only_the_bad_shard(tmp_path: Path) -> None:
    jobs = lambda calls: [(f"s-{i}", lambda i=i: calls.append(i) or {"i": i}) for i in range(3)]  # noqa: E731
    work = WorkFolder(tmp_path / ".o.work", {"a": 1})
    assert [p["i"] for p in run_shards(jobs([]), work)] == [0, 1, 2]
    (work.path / "s-1.npz").write_bytes(b"PK\x03\x04 truncated")
    calls: list[int] = []
    assert [p["i"] for p in run_shards(jobs(calls), WorkFolder(work.path, {"a": 1}, resume=True))] == [0, 1, 2]
    assert calls == [1]


@pytest.mark.parametrize("state", ["empty", "truncated-settings", "only-tmp"])
def test_a_work_folder_without_settings_is_started_afresh(tmp_path: Path, state: str) -> None:
    path = tmp_path / ".out.work"
    path.mkdir()
    if state == "truncated-settings":
        (path / "settings.json").write_text('{"seed": ')
    elif state == "only-tmp":
        (path / ".in-00000.npz.0123abcd.tmp").write_bytes(b"half")
    for resume in (False, True):
        work = WorkFolder(path, {"seed": 0}, resume=resume)
        assert not path.exists() and work.n_done() == 0
        path.mkdir()


# -- statistics files ------------------------------------------------------------------------------


def _stats(tmp_path: Path, name: str, **change) -> Path:
    g = GaussianOOD().fit(np.random.default_rng(0).normal(size=(200, 5)))
    for key, value in change.items():
        setattr(g, key, value(getattr(g, key).copy()))
    path = tmp_path / f"{name}.h5"
    g.save(path)
    return path


def _nan_at(i):
    def f(a):
        a.flat[i] = np.nan
        return a

    return f


@pytest.mark.parametrize(
    "name, change, reason",
    [
        ("nan-mean", {"location_": _nan_at(2)}, "location holds NaN"),
        ("inf-cov", {"covariance_": _nan_at(0)}, "covariance holds NaN"),
        ("asymmetric", {"covariance_": lambda c: c + np.triu(np.ones_like(c), 1)}, "not symmetric"),
        ("indefinite", {"covariance_": lambda c: c - 10 * np.eye(len(c))}, "not positive definite"),
        ("upper-factor", {"cholesky_": lambda L: L.T.copy()}, "lower triangular"),
        ("other-factor", {"cholesky_": lambda L: 2 * L}, "cholesky is not the covariance's factor"),
        ("moved-mean", {"location_": lambda m: m + 1}, "location does not match"),
    ],
)
def test_stats_are_validated_on_load(tmp_path: Path, name: str, change: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        GaussianOOD.load(_stats(tmp_path, name, **change))
    assert GaussianOOD.load(_stats(tmp_path, "fine")).score(np.zeros((1, 5))).shape == (1,)


def test_indefinite_covariance_with_its_own_factor_is_refused(tmp_path: Path) -> None:
    def indefinite(c):
        c = c.copy()
        c[0, 1] = c[1, 0] = 10 * math.sqrt(c[0, 0] * c[1, 1])
        return c

    with pytest.raises(ValueError, match="positive definite|factor"):
        GaussianOOD.load(_stats(tmp_path, "indef", covariance_=indefinite))


# -- numbers ---------------------------------------------------------------------------------------


def test_numeric_types_refuse_non_finite_and_out_of_range() -> None:
    import click

    for text in ("nan", "inf", "-inf", "1e400"):
        with pytest.raises(click.BadParameter):
            validate.FiniteFloat(0, 1).convert(text, None, None)
    assert validate.FiniteFloat(0, 1).convert("1", None, None) == 1.0
    assert validate.SEED.convert(str(2**63 - 1), None, None) == 2**63 - 1
    for bad in (str(2**63), str(2**64), "-1", "1.5"):
        with pytest.raises(click.BadParameter):
            validate.SEED.convert(bad, None, None)
    assert validate.SAMPLES.convert("1e3", None, None) == 1000
    for bad in ("1e12", "0", "1.5e0"):
        with pytest.raises(click.BadParameter):
            validate.SAMPLES.convert(bad, None, None)
    with pytest.raises(ValueError, match="finite"):
        validate.finite(float("nan"), "x")
    with pytest.raises(ValueError, match="range"):
        validate.check_seed(2**64)


def test_absurd_magnitudes_are_counted_as_nonfinite_without_warnings(tmp_path: Path, recwarn) -> None:
    y = np.zeros((4, 2))
    y[1, 0], y[2, 1] = 1e300, -1e300
    np.save(tmp_path / "y.npy", y)
    cs = load_conditions(tmp_path / "y.npy")
    assert cs.n_nonfinite == 2 and len(cs.finite()) == 2
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# -- memory ----------------------------------------------------------------------------------------


def test_image_size_is_read_from_the_header_and_bombs_are_refused(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from flowaudit.io import images

    Image.new("L", (64, 32)).save(tmp_path / "a.png")
    assert images.image_size(tmp_path / "a.png") == (64, 32)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    monkeypatch.setattr(images, "read_image", lambda p: pytest.fail("decoded before the size check"))
    with pytest.raises(DataError, match="decompression-bomb"):
        load_conditions(tmp_path)


def test_memory_budget_is_checked_before_loading(tmp_path: Path) -> None:
    np.save(tmp_path / "y.npy", np.zeros((1000, 100), np.float32))
    with pytest.raises(DataError, match="memory budget"):
        load_conditions(tmp_path / "y.npy", max_bytes=100_000)
    assert len(load_conditions(tmp_path / "y.npy", max_bytes=10**7)) == 1000


# -- the file system -------------------------------------------------------------------------------


def test_odd_and_long_names_are_written(tmp_path: Path) -> None:
    for name in ("new\nline.txt", "x" * 255, "tab\tand space.h5"):
        with atomic_path(tmp_path / name) as tmp:
            tmp.write_text("ok")
        assert (tmp_path / name).read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_too_long_and_unwritable_paths_are_output_errors(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="too long"), atomic_path(tmp_path / ("y" * 300)) as tmp:
        tmp.write_text("never")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="permission denied"), atomic_dir(ro / "report"):
                pass
        finally:
            ro.chmod(0o700)
        assert list(ro.iterdir()) == []


def test_file_size_limit_is_one_error_not_a_signal(tmp_path: Path) -> None:
    code = (
        "import resource, sys\n"
        "from flowaudit.utils.atomic import atomic_path, OutputError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    with atomic_path({str(tmp_path / 'big.bin')!r}) as tmp:\n"
        "        tmp.write_bytes(bytes(100_000))\n"
        "except OutputError as e:\n"
        "    print(e); sys.exit(2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "file too large" in proc.stdout
    assert list(tmp_path.iterdir()) == []
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY or True


def test_stale_tmp_is_cleaned_and_symlinked_out_stays_one_folder(tmp_path: Path) -> None:
    real = tmp_path / "real"
    with atomic_dir(real) as tmp:
        (tmp / "a.txt").write_text("1")
    (tmp_path / ".real.0123abcd.tmp").mkdir()  # left by a killed writer of the folder `report` points to
    (tmp_path / ".report.89abcdef.tmp.keep").write_text("not ours")
    link = tmp_path / "report"
    link.symlink_to(real)
    with atomic_dir(link, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report.89abcdef.tmp.keep", "real", "report"]


# -- exact batching --------------------------------------------------------------------------------


def test_gaussian_sums_do_not_depend_on_batch_size_or_shards() -> None:
    rng = np.random.default_rng(3)
    V = 1e3 + rng.standard_normal((5000, 6)) * rng.uniform(0.01, 100, 6)  # large means, spreads over 4 decades
    ref = GaussianOOD(block_size=4096).fit(V)
    for block in (1, 7, 4096):
        for shards in (1, 2, 3):
            parts = np.array_split(V, shards)
            g = GaussianOOD(block_size=block).partial_fit(parts[0])
            for p in parts[1:]:
                g.merge(GaussianOOD(block_size=block).partial_fit(p))
            g.finalize()
            for name in ("location_", "covariance_"):
                a, b = getattr(g, name), getattr(ref, name)
                assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), (block, shards, name)
            s, r = g.score(V[:50]), ref.score(V[:50])
            assert np.abs(s - r).max() <= 1e-12 * np.abs(r).max(), (block, shards)


@pytest.mark.parametrize("model", ["toy-affine", "sr-affine"])
def test_fit_does_not_depend_on_batch_size_or_shards(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 encoder runs fixed passes, so batch sizes 1, 7, 4096 and 1–3 shards give the same Gaussian."""
    import flowaudit
    from flowaudit.adapters import load_model
    from flowaudit.reference_models.toy import toy_data
    from flowaudit.runs import runner

    flow = load_model(model)
    if model == "toy-affine":
        y = np.asarray(toy_data(500, seed=0)[1])
    else:
        y = np.random.default_rng(0).uniform(0, 1, (200, *flow.condition_shape)).astype(np.float32)
    ref = None
    for shards in (1, 2, 3):
        shard_inputs = 16 * math.ceil(len(y) / shards / 16)  # each shard a whole number of fixed passes
        assert len(runner.shard_slices(len(y), shard_inputs)) == shards
        monkeypatch.setattr(runner, "FIT_SHARD_INPUTS", shard_inputs)
        for batch in (1, 7, 4096):
            g = flowaudit.fit(flow, y, device="cpu", batch_size=batch).gaussian
            if ref is None:
                ref = g
            for name in ("sum_", "sum_sq_", "location_", "covariance_"):
                a, b = getattr(g, name), getattr(ref, name)
                assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max(), (model, shard_inputs, batch, name)
