"""Reference-model data (corpus, degradations, patches, writers) and the ``--data`` loader."""

from __future__ import annotations

import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flowaudit.reference_models import data as D
from PIL import Image
from scipy import ndimage

from flowaudit.io.datasets import ConditionSet, DataError, load_conditions
from flowaudit.io.images import read_paired_folder


@pytest.fixture(scope="module")
def test_images() -> list[tuple[str, np.ndarray]]:
    return D.corpus("test")


def _smooth(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    """A smooth random RGB image in [0, 1] (upsampled noise)."""
    g = torch.Generator().manual_seed(seed)
    t = F.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).numpy().copy()


def _dihedral(t: torch.Tensor) -> list[torch.Tensor]:
    return [u.rot90(k, dims=(-2, -1)) for u in (t, t.flip(-1)) for k in range(4)]


# -- corpus -----------------------------------------------------------------------------
def test_corpus_loads_offline_and_splits_by_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    D._image.cache_clear()
    train, test = D.corpus("train"), D.corpus("test")
    train_names, test_names = [n for n, _ in train], [n for n, _ in test]
    assert train_names == list(D.TRAIN_IMAGES) and test_names == list(D.TEST_IMAGES)
    assert not set(train_names) & set(test_names)
    assert [n for n, _ in D.corpus("all")] == train_names + test_names
    for name, img in train + test:
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float32, name
        assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.02, name
    # the same pixels no image of the other split holds (no near-duplicate across the split)
    sigs = {
        n: np.asarray(D.bicubic_down(torch.from_numpy(a.transpose(2, 0, 1).copy()), 8)).mean((1, 2))
        for n, a in train + test
    }
    assert all(np.abs(sigs[a] - sigs[b]).max() > 1e-3 for a in train_names for b in test_names)


def test_corpus_is_deterministic_and_read_only() -> None:
    a, b = D.corpus("test"), D.corpus("test")
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    with pytest.raises(ValueError):
        a[0][1][0, 0, 0] = 0.0
    with pytest.raises(ValueError, match="unknown corpus split"):
        D.corpus("val")


# -- degradations -----------------------------------------------------------------------
def test_bicubic_down_shapes_and_constant() -> None:
    x = torch.full((2, 3, 32, 48), 0.37)
    y = D.bicubic_down(x, 4)
    assert y.shape == (2, 3, 8, 12)
    assert torch.allclose(y, torch.full_like(y, 0.37), atol=1e-6)
    assert D.bicubic_down(x[0], 4).shape == (3, 8, 12)
    assert D.bicubic_up(y, 4).shape == (2, 3, 32, 48)


def test_bicubic_down_matches_pil_and_antialiases() -> None:
    img = _smooth(0) * 0.5 + 0.5 * np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    ours = D.bicubic_down(torch.from_numpy(img.transpose(2, 0, 1).copy()), 4, clamp=False).numpy()
    pil = np.stack([np.asarray(Image.fromarray(img[..., c]).resize((16, 16), Image.BICUBIC)) for c in range(3)])
    assert np.abs(ours - pil).max() < 1e-5
    # a grating of period 2.5 px lies far above the ×4 Nyquist: antialiasing must suppress it
    stripes = 0.5 + 0.5 * torch.sin(2 * torch.pi * torch.arange(64) / 2.5).expand(1, 3, 64, 64)
    plain = F.interpolate(stripes, size=(16, 16), mode="bicubic", align_corners=False)
    assert D.bicubic_down(stripes, 4).var() < 0.01 * plain.var()


def test_bicubic_up_of_down_recovers_smooth_image() -> None:
    hr = torch.from_numpy(_smooth(1, 128, 128).transpose(2, 0, 1).copy())
    err = (D.bicubic_up(D.bicubic_down(hr, 2), 2) - hr)[:, 8:-8, 8:-8].abs().mean()
    assert err < 0.01


def test_eurban_kernel_and_filter() -> None:
    # eq. S1 as printed: (−1−4−1−4+26−4−1−4−1)/3 = 6/3 = 2, i.e. twice the DC level
    assert D.EURBAN_KERNEL.sum().item() == pytest.approx(2.0, abs=1e-6)
    assert torch.equal(D.EURBAN_KERNEL, D.EURBAN_KERNEL.T) and D.EURBAN_KERNEL[1, 1] * 3 == pytest.approx(26)
    for c, expect in ((0.0, 0.0), (0.3, 0.6), (0.7, 1.0)):  # constant c → min(2c, 1)
        out = D.eurban(torch.full((1, 3, 9, 9), c))
        assert torch.allclose(out, torch.full_like(out, expect), atol=1e-6)
    ramp = torch.linspace(0, 0.4, 16).expand(3, 16, 16)  # Laplacian of a ramp is 0: H doubles it
    assert torch.allclose(D.eurban(ramp)[:, 1:-1, 1:-1], 2 * ramp[:, 1:-1, 1:-1], atol=1e-5)
    img = _smooth(2) * 0.5 + 0.25 * np.random.default_rng(1).random((64, 64, 3), dtype=np.float32)
    ref = np.stack([ndimage.correlate(img[..., c], D.EURBAN_KERNEL.numpy(), mode="mirror") for c in range(3)])
    out = D.eurban(torch.from_numpy(img.transpose(2, 0, 1).copy())).numpy()
    assert np.abs(out - ref.clip(0, 1)).max() < 1e-5
    assert out.shape == (3, 64, 64) and 0 <= out.min() and out.max() <= 1


def test_darken_noise_model_and_determinism() -> None:
    x = torch.full((3, 64, 64), 0.5)
    low = D.darken(x, 2.0, 0.3, 0, 1000.0, 0.0)  # Poisson(p g x^γ)/p: mean g x^γ, variance g x^γ / p
    assert low.mean().item() == pytest.approx(0.075, abs=0.002)
    assert low.var().item() == pytest.approx(0.075 / 1000, rel=0.15)
    assert torch.equal(D.darken(x, 2.0, 0.3, 7, 1000.0, 0.01), D.darken(x, 2.0, 0.3, 7, 1000.0, 0.01))
    assert not torch.equal(D.darken(x, 2.0, 0.3, 7, 1000.0, 0.01), D.darken(x, 2.0, 0.3, 8, 1000.0, 0.01))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(D.LOL_LIKE(x, g1), D.LOL_LIKE(x, g2))


def test_darken_presets_differ(test_images) -> None:
    assert D.LOL_LIKE != D.VELOL_LIKE
    hr = torch.from_numpy(test_images[0][1].transpose(2, 0, 1).copy())
    lol, velol = D.LOL_LIKE(hr, 0), D.VELOL_LIKE(hr, 0)
    assert 0 <= velol.min() and lol.max() <= 1
    assert velol.mean() < lol.mean() < 0.25 * hr.mean()  # darker OOD curve
    noise = [(p(hr, 1) - p(hr, 2)).std() / p(hr, 1).mean() for p in (D.LOL_LIKE, D.VELOL_LIKE)]
    assert noise[1] > 2 * noise[0]  # and noisier relative to its signal


def test_lowlight_pairs_depend_on_seed_and_name_only(test_images) -> None:
    a = {n: lo for n, lo, _ in D.lowlight_pairs(test_images, D.LOL_LIKE, seed=5)}
    b = {n: lo for n, lo, _ in D.lowlight_pairs(test_images[::-1], D.LOL_LIKE, seed=5)}
    c = {n: lo for n, lo, _ in D.lowlight_pairs(test_images, D.LOL_LIKE, seed=6)}
    assert all(np.array_equal(a[n], b[n]) and not np.array_equal(a[n], c[n]) for n in a)


# -- patch datasets -----------------------------------------------------------------------
def _stack(ds, key: str) -> torch.Tensor:
    return torch.stack([ds[i][key] for i in range(len(ds))])


def test_sr_patches(test_images) -> None:
    ds = D.SRPatches(test_images, patch=32, scale=4, n=12, seed=0, residual=True)
    item = ds[3]
    assert len(ds) == 12 and item["lr"].shape == (3, 8, 8) and item["hr"].shape == (3, 32, 32)
    assert torch.equal(item["lr"], D.bicubic_down(item["hr"], 4))
    assert torch.allclose(item["residual"] + D.bicubic_up(item["lr"], 4), item["hr"], atol=1e-6)
    assert torch.equal(_stack(ds, "hr"), _stack(D.SRPatches(test_images, patch=32, n=12, seed=0), "hr"))
    assert not torch.equal(_stack(ds, "hr"), _stack(D.SRPatches(test_images, patch=32, n=12, seed=1), "hr"))
    plain = D.SRPatches(test_images, patch=32, n=12, seed=0, augment=False)
    for i, (img, top, left, _, _) in enumerate(plain.plan):  # unaugmented crops are the image's pixels
        crop = test_images[img][1][top : top + 32, left : left + 32]
        assert np.array_equal(plain[i]["hr"].permute(1, 2, 0).numpy(), crop)
        assert any(torch.equal(ds[i]["hr"], t) for t in _dihedral(plain[i]["hr"]))  # same crop, flipped/rotated
    assert any(not torch.equal(ds[i]["hr"], plain[i]["hr"]) for i in range(len(ds)))
    with pytest.raises(ValueError, match="multiple of scale"):
        D.SRPatches(test_images, patch=30, scale=4)
    with pytest.raises(ValueError, match="smaller than"):
        D.SRPatches([("tiny", np.zeros((16, 16, 3), np.float32))], patch=32)


def test_lowlight_patches_aligned_and_seeded() -> None:
    pairs = [(f"im{i}", 0.5 * _smooth(i), _smooth(i)) for i in range(3)]
    ds = D.LowLightPatches(pairs, patch=24, n=10, seed=0, augment=True)
    for i in range(len(ds)):
        assert ds[i]["low"].shape == (3, 24, 24)
        assert torch.allclose(ds[i]["low"], 0.5 * ds[i]["high"])
    again = D.LowLightPatches(pairs, patch=24, n=10, seed=0)
    other = D.LowLightPatches(pairs, patch=24, n=10, seed=1)
    assert torch.equal(_stack(ds, "low"), _stack(again, "low"))
    assert not torch.equal(_stack(ds, "low"), _stack(other, "low"))
    with pytest.raises(ValueError, match="pair 'bad'"):
        D.LowLightPatches([("bad", np.zeros((32, 32, 3)), np.zeros((32, 40, 3)))], patch=16)


# -- folders, writers and load_conditions ---------------------------------------------------
def test_sr_set_round_trip(tmp_path: Path, test_images) -> None:
    out = D.write_sr_set(tmp_path / "eurban", test_images, patch=32, scale=4, n=5, seed=1, transform=D.eurban)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eurban"]  # no temporary folder left
    stems = sorted(p.stem for p in (out / "hr").glob("*.png"))
    assert stems == sorted(p.stem for p in (out / "lr").glob("*.png")) and len(stems) == 5
    cs = load_conditions(out)
    assert isinstance(cs, ConditionSet) and len(cs) == 5 and cs.ids == stems
    assert cs.y.shape == (5, 3, 8, 8) and cs.x is not None and cs.x.shape == (5, 3, 32, 32)
    assert cs.y.dtype == torch.float32
    assert cs.description == {
        "path": str(out),
        "kind": "paired lr/hr",
        "n": 5,
        "shape": [3, 8, 8],
        "n_nonfinite": 0,
        "target_shape": [3, 32, 32],
    }
    assert (D.bicubic_down(cs.x, 4) - cs.y).abs().max() <= 0.51 / 255  # LR is the downscaled (quantised) HR
    plain = load_conditions(D.write_sr_set(tmp_path / "plain", test_images, patch=32, scale=4, n=5, seed=1))
    assert plain.ids == cs.ids and cs.x.mean() > plain.x.mean()  # same crops, eurban brightened them
    hr_only = load_conditions(out / "hr")
    assert hr_only.description["kind"] == "images" and hr_only.x is None and torch.equal(hr_only.y, cs.x)
    again = D.write_sr_set(tmp_path / "again", test_images, patch=32, scale=4, n=5, seed=1, transform=D.eurban)
    assert all(
        (out / "lr" / f).read_bytes() == (again / "lr" / f).read_bytes()
        for f in (p.name for p in (out / "lr").iterdir())
    )


def test_lowlight_set_round_trip_and_overwrite(tmp_path: Path, test_images) -> None:
    out = D.write_lowlight_set(tmp_path / "velol", test_images, D.VELOL_LIKE, patch=24, n=4, seed=0)
    cs = load_conditions(out)
    assert cs.description["kind"] == "paired low/high" and cs.y.shape == cs.x.shape == (4, 3, 24, 24)
    assert cs.y.mean() < 0.25 * cs.x.mean()
    assert [s for s, _, _ in read_paired_folder(out)] == cs.ids
    with pytest.raises(FileExistsError):
        D.write_lowlight_set(out, test_images, patch=24, n=4)
    D.write_lowlight_set(out, test_images, patch=24, n=2, overwrite=True)
    assert len(load_conditions(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["velol"]


def test_failed_write_leaves_nothing(tmp_path: Path, test_images, monkeypatch: pytest.MonkeyPatch) -> None:
    write_png, calls = D._write_png, []

    def fail_third(path: Path, t: torch.Tensor) -> None:  # dies with PNGs half written
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        write_png(path, t)

    monkeypatch.setattr(D, "_write_png", fail_third)
    with pytest.raises(OSError, match="disk full"):
        D.write_sr_set(tmp_path / "x", test_images, patch=32, n=4)
    calls.clear()
    D.write_lowlight_set(tmp_path / "y", test_images, patch=16, n=1)
    with pytest.raises(OSError, match="disk full"):  # a failed overwrite keeps the old set
        D.write_lowlight_set(tmp_path / "y", test_images, patch=16, n=4, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["y"] and len(load_conditions(tmp_path / "y")) == 1


def test_array_files(tmp_path: Path) -> None:
    y = np.random.default_rng(0).normal(size=(6, 2))
    x = np.random.default_rng(1).normal(size=(6, 2))
    np.save(tmp_path / "c.npy", y)
    np.savez(tmp_path / "c.npz", y=y, x=x)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["y"], f["x"] = y, x
    with h5py.File(tmp_path / "c.hdf5", "w") as f:
        f["y"] = y.astype(np.float16)
    for name, kind, has_x in (
        ("c.npy", "npy", False),
        ("c.npz", "npz", True),
        ("c.h5", "h5", True),
        ("c.hdf5", "h5", False),
    ):
        cs = load_conditions(tmp_path / name)
        assert cs.y.dtype == torch.float32 and cs.y.shape == (6, 2)
        assert np.allclose(cs.y.numpy(), y, atol=1e-2)
        assert (cs.x is not None) == has_x and cs.ids == [f"row{i}" for i in range(6)]
        assert cs.description == {
            "path": str(tmp_path / name),
            "kind": kind,
            "n": 6,
            "shape": [2],
            "n_nonfinite": 0,
            **({"target_shape": [2]} if has_x else {}),
        }


def test_single_image_and_gray_png(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 10), 128, np.uint8)).save(tmp_path / "g.png")
    cs = load_conditions(tmp_path / "g.png")
    assert cs.y.shape == (1, 3, 8, 10) and cs.ids == ["g"] and cs.description["kind"] == "image"
    assert torch.allclose(cs.y, torch.full_like(cs.y, 128 / 255))


def _bad_cases(tmp: Path) -> dict[str, Path]:
    """One path per DataError case, built under ``tmp``."""

    def png(path: Path, h: int = 8, w: int = 8) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)

    cases = {name: tmp / name for name in ("missing", "empty", "mixed", "unreadable", "unpaired", "emptypair")}
    cases["empty"].mkdir()
    png(cases["mixed"] / "a.png")
    png(cases["mixed"] / "b.png", 8, 9)
    png(cases["unreadable"] / "a.png")
    (cases["unreadable"] / "b.png").write_bytes(b"not a png")
    png(cases["unpaired"] / "low" / "a.png")
    png(cases["unpaired"] / "high" / "b.png")
    (cases["emptypair"] / "lr").mkdir(parents=True)
    (cases["emptypair"] / "hr").mkdir()
    png(tmp / "pairmixed" / "low" / "a.png")
    png(tmp / "pairmixed" / "high" / "a.png")
    png(tmp / "pairmixed" / "low" / "b.png", 9, 8)
    png(tmp / "pairmixed" / "high" / "b.png", 9, 8)
    cases["pairmixed"] = tmp / "pairmixed"
    (tmp / "ambiguous" / "low").mkdir(parents=True)
    for d in ("high", "lr", "hr"):
        (tmp / "ambiguous" / d).mkdir()
    cases["ambiguous"] = tmp / "ambiguous"
    cases["extension"] = tmp / "c.txt"
    cases["extension"].write_text("1 2 3")
    np.savez(tmp / "noy.npz", x=np.zeros((2, 2)))
    np.savez(tmp / "len.npz", y=np.zeros((3, 2)), x=np.zeros((2, 2)))
    np.save(tmp / "flat.npy", np.zeros(5))
    np.savez(tmp / "nanx.npz", y=np.zeros((1, 2)), x=np.array([[0.0, np.nan]]))  # targets must be finite
    np.save(tmp / "text.npy", np.array([["a", "b"]]))
    np.save(tmp / "zero.npy", np.zeros((0, 2)))
    (tmp / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 garbage")
    (tmp / "corrupt.h5").write_bytes(b"garbage")
    with h5py.File(tmp / "noy.h5", "w") as f:
        f["x"] = np.zeros((2, 2))
    with h5py.File(tmp / "group.h5", "w") as f:
        f.create_group("y")
    with h5py.File(tmp / "len.h5", "w") as f:
        f["y"], f["x"] = np.zeros((3, 2)), np.zeros((4, 2))
    for name in (
        "noy.npz",
        "len.npz",
        "flat.npy",
        "nanx.npz",
        "text.npy",
        "zero.npy",
        "corrupt.npy",
        "corrupt.npz",
        "corrupt.h5",
        "noy.h5",
        "group.h5",
        "len.h5",
    ):
        cases[name] = tmp / name
    return cases


EXPECTED = {  # case -> what the message must say
    "missing": "no such file",
    "empty": "no PNG/JPEG images",
    "unreadable": "unreadable image",
    "unpaired": "do not pair by name",
    "emptypair": "no PNG/JPEG image pairs",
    "ambiguous": "ambiguous",
    "extension": "unknown data format",
    "noy.npz": "no array 'y'",
    "len.npz": "'x' has 2 rows but 'y' has 3",
    "flat.npy": "expected N×…",
    "nanx.npz": "array 'x' has non-finite values",
    "text.npy": "not numeric",
    "zero.npy": "no rows",
    "corrupt.npy": "unreadable .npy",
    "corrupt.npz": "unreadable .npz",
    "corrupt.h5": "unreadable .h5",
    "noy.h5": "no dataset 'y'",
    "group.h5": "no dataset 'y'",
    "len.h5": "'x' has 4 rows but 'y' has 3",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_data_errors_are_one_line_naming_the_path(tmp_path: Path, case: str) -> None:
    path = _bad_cases(tmp_path)[case]
    with pytest.raises(DataError) as err:
        load_conditions(str(path))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in msg and msg.startswith(f"{path}"), msg
    assert EXPECTED[case] in msg, msg


def test_nonfinite_conditions_are_loaded_and_marked(tmp_path: Path) -> None:
    """NaN/Inf conditions are counted and marked, not refused; finite() keeps the rest; all-NaN leaves nothing."""
    y = np.zeros((4, 2), np.float32)
    y[1, 0], y[3, 1] = np.nan, -np.inf
    np.save(tmp_path / "y.npy", y)
    cs = load_conditions(tmp_path / "y.npy")
    assert cs.description["n_nonfinite"] == 2 and cs.nonfinite.tolist() == [False, True, False, True]
    assert cs.finite().ids == ["row0", "row2"] and torch.isfinite(cs.finite().y).all()
    np.save(tmp_path / "all.npy", np.full((2, 2), np.nan))
    with pytest.raises(DataError, match="every condition has NaN or Inf"):
        load_conditions(tmp_path / "all.npy").finite()


def test_mixed_size_folders_are_read_grouped_by_size(tmp_path: Path) -> None:
    """The folders once refused for mixed sizes: read, sizes contiguous, pairs kept together."""
    cases = _bad_cases(tmp_path)
    cs = load_conditions(cases["mixed"])
    assert cs.mixed and cs.ids == ["a", "b"] and [tuple(cs.y[i].shape) for i in range(2)] == [(3, 8, 8), (3, 8, 9)]
    pairs = load_conditions(cases["pairmixed"])
    assert pairs.mixed and all(pairs.x[i].shape == pairs.y[i].shape for i in range(len(pairs)))
