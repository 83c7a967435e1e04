r"""Image data for the bundled reference flows: corpus, degradations, patches, folders.

**Corpus** (no download). The RGB photographs bundled in the scikit-image wheel
and scikit-learn's two sample images, split *by image* (never by patch), fixed:

- ``train``: astronaut, coffee, motorcycle (``stereo_motorcycle`` left view),
  immunohistochemistry, hubble_deep_field, retina, china (sklearn)
- ``test``: chelsea, rocket, flower (sklearn)

Left out: grayscale images (an R = G = B statistic no photograph of the set has), near-duplicates of a kept
image (``cat``, the right motorcycle view: a leak across the split), synthetic graphics, and images that need a
download.

**Degradations.** SR conditions are bicubic downscales of HR crops (paper S1.3:
DF2K/DIV2K ×4, 160×160 HR patches, random 90° rotations and horizontal flips).
The severe-OOD set EUrban100 (S1.1.1) sharpens HR images with kernel H (eq. S1),

.. math:: H = \tfrac13 \begin{bmatrix} -1 & -4 & -1 \\ -4 & 26 & -4 \\ -1 & -4 & -1 \end{bmatrix}
          = 2\,(\delta - \tfrac16 L_9),\qquad \textstyle\sum H = 2,

where :math:`L_9` is the zero-sum 9-point Laplacian stencil: H doubles the DC level
as printed, so a constant image ``c`` becomes ``min(2c, 1)`` after clipping.
Low-light pairs (LOL → VE-LOL, S1.4) are stood in for by a synthetic camera model,

.. math:: y_{low} = \mathrm{clip}\big(\mathrm{Poisson}(p\, g\, x^\gamma)/p + \mathcal N(0, \sigma^2), 0, 1\big),

with gamma ``γ``, gain ``g``, full-scale photon count ``p`` and read noise ``σ``;
:data:`LOL_LIKE` is the training/test distribution and :data:`VELOL_LIKE` (a steeper
curve, less light, more noise) the OOD stand-in.

Example:
    >>> ds = SRPatches(corpus("test"), patch=32, scale=4, n=2, seed=0)
    >>> ds[0]["lr"].shape, ds[0]["hr"].shape
    (torch.Size([3, 8, 8]), torch.Size([3, 32, 32]))
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..utils.atomic import atomic_dir

__all__ = [
    "TRAIN_IMAGES",
    "TEST_IMAGES",
    "EURBAN_KERNEL",
    "LowLightPreset",
    "LOL_LIKE",
    "VELOL_LIKE",
    "corpus",
    "bicubic_down",
    "bicubic_up",
    "eurban",
    "darken",
    "lowlight_pairs",
    "SRPatches",
    "LowLightPatches",
    "write_sr_set",
    "write_lowlight_set",
]

Named = tuple[str, np.ndarray]  # (name, H×W×3 float32 in [0, 1])
Pair = tuple[str, np.ndarray, np.ndarray]  # (name, condition, target)

TRAIN_IMAGES = ("astronaut", "coffee", "motorcycle", "immunohistochemistry", "hubble_deep_field", "retina", "china")
TEST_IMAGES = ("chelsea", "rocket", "flower")
EURBAN_KERNEL = torch.tensor([[-1.0, -4.0, -1.0], [-4.0, 26.0, -4.0], [-1.0, -4.0, -1.0]]) / 3


# -- corpus -------------------------------------------------------------------------
def _load_uint8(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    from skimage import data

    return data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()


@cache
def _image(name: str) -> np.ndarray:
    img = np.asarray(_load_uint8(name))
    if img.shape[2:] != (3,) or img.dtype != np.uint8:
        raise RuntimeError(f"corpus image {name!r} is {img.shape} {img.dtype}, not H×W×3 uint8")
    out = img.astype(np.float32) / 255
    out.flags.writeable = False
    return out


def corpus(split: str) -> list[Named]:
    """The embedded images of ``split`` (``"train"``, ``"test"`` or ``"all"``), in a fixed order.

    Arrays are H×W×3 float32 in [0, 1], cached and read-only (copy before editing).
    """
    names = {"train": TRAIN_IMAGES, "test": TEST_IMAGES, "all": TRAIN_IMAGES + TEST_IMAGES}.get(split)
    if names is None:
        raise ValueError(f"unknown corpus split {split!r} (train, test, all)")
    return [(n, _image(n)) for n in names]


# -- degradations ---------------------------------------------------------------------
def _batched(fn: Callable[[Tensor], Tensor], img: Tensor) -> Tensor:
    return fn(img[None])[0] if img.dim() == 3 else fn(img)


def bicubic_down(hr: Tensor, scale: int, clamp: bool = True) -> Tensor:
    """Antialiased bicubic downscale of (B, C, H, W) or (C, H, W) by ``scale`` (paper S1.3)."""

    def f(x: Tensor) -> Tensor:
        out = F.interpolate(
            x, size=(x.shape[-2] // scale, x.shape[-1] // scale), mode="bicubic", align_corners=False, antialias=True
        )
        return out.clamp(0, 1) if clamp else out

    return _batched(f, hr)


def bicubic_up(lr: Tensor, scale: int, clamp: bool = True) -> Tensor:
    """Bicubic upscale of (B, C, h, w) or (C, h, w) by ``scale`` (no antialias needed)."""

    def f(x: Tensor) -> Tensor:
        out = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        return out.clamp(0, 1) if clamp else out

    return _batched(f, lr)


def eurban(img: Tensor) -> Tensor:
    """EUrban100 enhancement (eq. S1): per-channel 3×3 convolution with H, reflect padding, clipped to [0, 1]."""

    def f(x: Tensor) -> Tensor:
        k = EURBAN_KERNEL.to(x).expand(x.shape[1], 1, 3, 3)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1]).clamp(0, 1)

    return _batched(f, img)


def _generator(rng: torch.Generator | int) -> torch.Generator:
    return rng if isinstance(rng, torch.Generator) else torch.Generator().manual_seed(int(rng))


def darken(
    img: Tensor, gamma: float, gain: float, rng: torch.Generator | int, poisson_peak: float, read_noise: float
) -> Tensor:
    r"""Synthetic low-light image (gamma darkening, then Poisson–Gaussian noise):

    .. math:: \mathrm{clip}\big(\mathrm{Poisson}(p\, g\, x^\gamma)/p + \mathcal N(0, \sigma^2), 0, 1\big)

    Shot noise scales with the signal (variance :math:`g x^\gamma / p`), read noise does not.
    ``rng`` is a ``torch.Generator`` or a seed; the same seed gives the same noise.
    """
    g = _generator(rng)
    signal = gain * img.clamp(0, 1) ** gamma
    shot = torch.poisson(signal * poisson_peak, generator=g) / poisson_peak
    return (shot + read_noise * torch.randn(img.shape, generator=g, dtype=img.dtype)).clamp(0, 1)


@dataclass(frozen=True)
class LowLightPreset:
    """Parameters of :func:`darken`; ``preset(img, rng)`` applies them."""

    gamma: float
    gain: float
    poisson_peak: float
    read_noise: float

    def __call__(self, img: Tensor, rng: torch.Generator | int) -> Tensor:
        return darken(img, self.gamma, self.gain, rng, self.poisson_peak, self.read_noise)


LOL_LIKE = LowLightPreset(gamma=2.0, gain=0.3, poisson_peak=1000.0, read_noise=0.005)
VELOL_LIKE = LowLightPreset(gamma=2.6, gain=0.25, poisson_peak=300.0, read_noise=0.02)


def _chw(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32).transpose(2, 0, 1).copy())


def _hwc(t: Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy().astype(np.float32)


def lowlight_pairs(images: Sequence[Named], preset: LowLightPreset = LOL_LIKE, seed: int = 0) -> list[Pair]:
    """``(name, low, high)`` for each image, darkened whole; the noise depends on (seed, name) only."""
    out = []
    for name, img in images:
        s = int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])
        out.append((name, _hwc(preset(_chw(img), s)), img))
    return out


# -- patch datasets -------------------------------------------------------------------
class _Patches(Dataset):
    """Crop plan drawn once from ``seed``: item ``i`` is (image, top, left, flip, rot90 k)."""

    def __init__(self, sizes: Sequence[tuple[str, int, int]], patch: int, n: int, seed: int, augment: bool):
        if not sizes:
            raise ValueError("no images to crop patches from")
        for name, h, w in sizes:
            if h < patch or w < patch:
                raise ValueError(f"image {name!r} is {h}×{w}, smaller than the {patch}×{patch} patch")
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(sizes), n)
        top = [int(rng.integers(0, sizes[i][1] - patch + 1)) for i in idx]
        left = [int(rng.integers(0, sizes[i][2] - patch + 1)) for i in idx]
        flip = rng.integers(0, 2, n) if augment else np.zeros(n, int)
        rot = rng.integers(0, 4, n) if augment else np.zeros(n, int)
        self.plan = [(int(i), t, lf, bool(f), int(k)) for i, t, lf, f, k in zip(idx, top, left, flip, rot)]
        self.names = [f"{sizes[i][0]}_{t}_{lf}" for i, t, lf, _, _ in self.plan]
        self.patch = patch

    def __len__(self) -> int:
        return len(self.plan)

    def _crop(self, a: np.ndarray, i: int) -> Tensor:
        _, t, lf, flip, k = self.plan[i]
        x = _chw(a[t : t + self.patch, lf : lf + self.patch])
        x = x.flip(-1) if flip else x
        return x.rot90(k, dims=(-2, -1)).contiguous() if k else x


class SRPatches(_Patches):
    """Random HR crops of ``patch``² and their bicubic ×``scale`` downscales (paper S1.3).

    Item ``i``: ``{"lr": (3, p/s, p/s), "hr": (3, p, p)}``; with ``residual`` also
    ``"residual" = hr − bicubic_up(lr)``. ``augment`` adds random horizontal flips and
    90° rotations (applied to HR before downscaling). Deterministic under ``seed``.
    """

    def __init__(
        self,
        images: Sequence[Named],
        patch: int = 48,
        scale: int = 4,
        n: int = 1000,
        seed: int = 0,
        augment: bool = True,
        residual: bool = False,
    ):
        if patch % scale:
            raise ValueError(f"patch {patch} is not a multiple of scale {scale}")
        super().__init__([(nm, *a.shape[:2]) for nm, a in images], patch, n, seed, augment)
        self.images, self.scale, self.residual = [a for _, a in images], scale, residual

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        hr = self._crop(self.images[self.plan[i][0]], i)
        lr = bicubic_down(hr, self.scale)
        out = {"lr": lr, "hr": hr}
        if self.residual:
            out["residual"] = hr - bicubic_up(lr, self.scale)
        return out


class LowLightPatches(_Patches):
    """Aligned random crops ``{"low": (3, p, p), "high": (3, p, p)}`` of ``(name, low, high)`` pairs."""

    def __init__(self, pairs: Sequence[Pair], patch: int = 48, n: int = 1000, seed: int = 0, augment: bool = True):
        for name, low, high in pairs:
            if low.shape != high.shape:
                raise ValueError(f"pair {name!r}: low is {low.shape}, high is {high.shape}")
        super().__init__([(nm, *lo.shape[:2]) for nm, lo, _ in pairs], patch, n, seed, augment)
        self.pairs = [(lo, hi) for _, lo, hi in pairs]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        low, high = self.pairs[self.plan[i][0]]
        return {"low": self._crop(low, i), "high": self._crop(high, i)}


# -- writing sets -------------------------------------------------------------------
def _write_png(path: Path, t: Tensor) -> None:
    from PIL import Image

    Image.fromarray(np.rint(_hwc(t.clamp(0, 1)) * 255).astype(np.uint8)).save(path)


def _quantize(images: Sequence[Named], fn: Callable[[Tensor], Tensor] | None = None) -> list[Named]:
    out = []
    for name, img in images:
        t = _chw(img)
        t = _batched(fn, t) if fn is not None else t
        out.append((name, np.rint(_hwc(t.clamp(0, 1)) * 255) / np.float32(255)))
    return out


def _write_set(out_dir: str | Path, ds: _Patches, keys: tuple[str, str], meta: dict, overwrite: bool) -> Path:
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for k in keys:
            (tmp / k).mkdir()
        for i in range(len(ds)):
            item = ds[i]
            for k in keys:
                _write_png(tmp / k / f"{i:04d}_{ds.names[i]}.png", item[k])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return Path(out_dir)


def write_sr_set(
    out_dir: str | Path,
    images: Sequence[Named],
    patch: int = 160,
    scale: int = 4,
    n: int = 100,
    seed: int = 0,
    transform: Callable[[Tensor], Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` test crops as ``hr/`` and ``lr/`` uint8 PNGs (same stems), plus ``meta.json``.

    ``transform`` (e.g. :func:`eurban`) acts on each whole HR image before cropping;
    HR is quantised to uint8 first and LR is downscaled from the quantised HR.
    No augmentation. Written to a temporary sibling folder renamed at the end.
    """
    ds = SRPatches(_quantize(images, transform), patch=patch, scale=scale, n=n, seed=seed, augment=False)
    meta = {
        "kind": "sr",
        "images": [nm for nm, _ in images],
        "patch": patch,
        "scale": scale,
        "n": n,
        "seed": seed,
        "transform": getattr(transform, "__name__", None if transform is None else repr(transform)),
    }
    return _write_set(out_dir, ds, ("hr", "lr"), meta, overwrite)


def write_lowlight_set(
    out_dir: str | Path,
    images: Sequence[Named],
    preset: LowLightPreset = LOL_LIKE,
    patch: int = 100,
    n: int = 90,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write ``n`` aligned crops of darkened images as ``low/`` + ``high/`` uint8 PNGs, plus ``meta.json``.

    Defaults follow S1.1.2 (90 patches of 100×100). Atomic like :func:`write_sr_set`.
    """
    ds = LowLightPatches(lowlight_pairs(images, preset, seed), patch=patch, n=n, seed=seed, augment=False)
    meta = {
        "kind": "lowlight",
        "images": [nm for nm, _ in images],
        "preset": asdict(preset),
        "patch": patch,
        "n": n,
        "seed": seed,
    }
    return _write_set(out_dir, ds, ("low", "high"), meta, overwrite)
