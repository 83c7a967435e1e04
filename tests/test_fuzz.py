"""Fuzzing the readers of untrusted files: they load, or raise the project's one-line error.

Every reader of a file a user hands in — checkpoints (``.pt``, ``.safetensors``), condition arrays
(``.npy``, ``.npz``, ``.h5``), stats files (HDF5) and images (PNG, JPEG) — is fed random bytes,
truncations and byte-level mutations of a valid file. Whatever the bytes, it either returns or raises
:class:`~flowaudit.adapters.ModelError` / :class:`~flowaudit.errors.DataError` /
:class:`~flowaudit.errors.AuditError` with a one-line message naming the file: never another
exception (which the CLI would report as an internal error, exit 3).

Examples are bounded and derandomised (the same inputs every run, well under 30 s in all);
``FLOWAUDIT_FUZZ_EXAMPLES=2000`` and ``FLOWAUDIT_FUZZ_RANDOM=1`` turn it into a long, randomised fuzzing run.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from flowaudit.adapters import ModelError, load_model
from flowaudit.adapters.checkpoint import read_weights
from flowaudit.reference_models import CHECKPOINT_DIR
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flowaudit.audit import _load_stats
from flowaudit.errors import AuditError, DataError
from flowaudit.io.datasets import load_conditions
from flowaudit.stats.gaussian import GaussianOOD

EXAMPLES = int(os.environ.get("FLOWAUDIT_FUZZ_EXAMPLES", "40"))
pytestmark = pytest.mark.filterwarnings("error::UserWarning")  # shown by default: a second line on the CLI's stderr
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("FLOWAUDIT_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
TMP = Path(tempfile.mkdtemp(prefix="flowaudit-fuzz-"))


def mutants(base: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, truncations of ``base``, and ``base`` with a few bytes overwritten (headers and tails favoured)."""
    n = len(base)
    position = st.one_of(st.integers(0, min(n, 512) - 1), st.integers(max(0, n - 512), n - 1), st.integers(0, n - 1))
    edits = st.lists(st.tuples(position, st.integers(0, 255)), min_size=1, max_size=6)

    def apply(changes: list[tuple[int, int]]) -> bytes:
        b = bytearray(base)
        for i, v in changes:
            b[i] = v
        return bytes(b)

    return st.one_of(st.binary(max_size=1024), st.integers(0, n - 1).map(lambda k: base[:k]), edits.map(apply))


def _write(name: str, data: bytes) -> Path:
    path = TMP / name
    path.write_bytes(data)
    return path


def _one_line(exc: Exception, path: Path) -> None:
    text = str(exc)
    assert "\n" not in text.strip(), text
    assert str(path) in text or path.name in text, text


def _bytes_of(save) -> bytes:
    buf = io.BytesIO()
    save(buf)
    return buf.getvalue()


# -- checkpoints -----------------------------------------------------------------------------------

TOY_BYTES = (CHECKPOINT_DIR / "toy-affine.pt").read_bytes()
SMALL_PT = _bytes_of(lambda f: torch.save({"w": torch.arange(6.0).reshape(2, 3), "n": 3}, f))


@FUZZ
@given(mutants(TOY_BYTES))
def test_fuzz_reference_checkpoint(data: bytes) -> None:
    path = _write("fuzz.pt", data)
    try:
        load_model(str(path))
    except ModelError as exc:
        _one_line(exc, path)


@FUZZ
@given(mutants(SMALL_PT))
def test_fuzz_pt_reader(data: bytes) -> None:
    path = _write("small.pt", data)
    try:
        read_weights(path)
    except ModelError as exc:
        _one_line(exc, path)


def _safetensors() -> bytes:
    from safetensors.torch import save

    return save({"weight": torch.arange(12.0).reshape(3, 4), "bias": torch.zeros(3)})


@FUZZ
@given(mutants(_safetensors()))
def test_fuzz_safetensors(data: bytes) -> None:
    path = _write("fuzz.safetensors", data)
    try:
        load_model(str(path))
    except ModelError as exc:
        _one_line(exc, path)


# -- condition arrays ------------------------------------------------------------------------------

Y = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
NPY = _bytes_of(lambda f: np.save(f, Y))
NPZ = _bytes_of(lambda f: np.savez(f, y=Y, x=Y * 2))


def _h5_bytes() -> bytes:
    path = TMP / "seed.h5"
    with h5py.File(path, "w") as f:
        f["y"], f["x"] = Y, Y * 2
    return path.read_bytes()


@FUZZ
@given(
    st.sampled_from(["npy", "npz", "h5"]).flatmap(
        lambda k: st.tuples(st.just(k), mutants({"npy": NPY, "npz": NPZ, "h5": _h5_bytes()}[k]))
    )
)
def test_fuzz_condition_arrays(case: tuple[str, bytes]) -> None:
    kind, data = case
    path = _write(f"fuzz.{kind}", data)
    try:
        cs = load_conditions(path)
    except DataError as exc:
        _one_line(exc, path)
    else:
        assert cs.y.dtype == torch.float32 and len(cs) == cs.y.shape[0] >= 1


# -- stats files -----------------------------------------------------------------------------------


def _stats_bytes() -> bytes:
    path = TMP / "seed-stats.h5"
    GaussianOOD(estimator="empirical").fit(np.random.default_rng(1).normal(size=(50, 3))).save(
        path, layers=["<condition>"], pooling="avg"
    )
    return path.read_bytes()


class _Adapter:
    """Just enough of an adapter for the stats check: a fingerprint that never matches."""

    def fingerprint(self) -> str:
        return "0" * 16


@FUZZ
@given(mutants(_stats_bytes()))
def test_fuzz_stats_file(data: bytes) -> None:
    path = _write("fuzz-stats.h5", data)
    try:
        _load_stats(_Adapter(), str(path), [], "avg")
    except AuditError as exc:
        _one_line(exc, path)


# -- images ----------------------------------------------------------------------------------------

PIXELS = np.random.default_rng(2).integers(0, 255, (12, 12, 3), dtype=np.uint8)
PNG = _bytes_of(lambda f: Image.fromarray(PIXELS).save(f, format="PNG"))
JPEG = _bytes_of(lambda f: Image.fromarray(PIXELS).save(f, format="JPEG"))


@FUZZ
@given(st.sampled_from(["png", "jpg"]).flatmap(lambda k: st.tuples(st.just(k), mutants(PNG if k == "png" else JPEG))))
def test_fuzz_images(case: tuple[str, bytes]) -> None:
    kind, data = case
    folder = TMP / "images"
    folder.mkdir(exist_ok=True)
    path = folder / f"a.{kind}"
    for old in folder.iterdir():
        old.unlink()
    path.write_bytes(data)
    try:
        cs = load_conditions(folder)
    except DataError as exc:
        _one_line(exc, path)
    else:
        assert cs.y.shape[:2] == (1, 3) and cs.y.dtype == torch.float32


def test_fuzz_regressions(tmp_path: Path) -> None:
    """Inputs the fuzz found: a zip end record claiming several disks; a pickle that trips an assert in torch."""
    for name, base, at, value in (
        ("disk.pt", SMALL_PT, 1539, 1),
        ("toy-disk.pt", TOY_BYTES, 268035, 1),
        ("assert.pt", TOY_BYTES, 1642, 75),
    ):
        data = bytearray(base)
        data[at] = (
            value  # found by the fuzz: is_zipfile raising "… span multiple disks"; torch asserting "expected dict"
        )
        with pytest.raises(ModelError, match="corrupt or truncated"):
            load_model(str(_write(name, bytes(data))))


def _segfault(path) -> None:
    import ctypes

    ctypes.string_at(0)  # what HDF5 did on one fuzzed stats file


def test_a_crashing_reader_is_refused_not_fatal(tmp_path: Path) -> None:
    """A native reader that segfaults on a file kills only the throwaway child; the file is refused in one line."""
    from flowaudit.io.untrusted import ReaderCrashed, survives

    with pytest.raises(ReaderCrashed, match="crashed on it with SIGSEGV"):
        survives(_segfault, tmp_path / "x.h5")
    survives(lambda path: 1 / 0, tmp_path / "x.h5")  # an ordinary exception is the caller's to raise again


def test_fuzz_seeds_are_valid() -> None:
    """The unmutated seeds load: the fuzz starts from files that work."""
    assert load_model(str(_write("seed.pt", TOY_BYTES))).name == "seed"
    assert set(read_weights(_write("seed.safetensors", _safetensors()))) == {"weight", "bias"}
    for kind, data in (("npy", NPY), ("npz", NPZ), ("h5", _h5_bytes())):
        assert load_conditions(_write(f"seed.{kind}", data)).y.shape == (5, 2)
    stats = _write("seed-check.h5", _stats_bytes())
    with pytest.raises(AuditError, match="fitted on weights"):  # a valid file, for another model
        _load_stats(_Adapter(), str(stats), [], "avg")
