"""LR-PSNR downscales a sample as a saved image is downscaled: Pillow's bicubic resize, the reference.

Torch's bicubic interpolation matches Pillow's ``Image.resize(..., BICUBIC)`` only with ``antialias=True``
and ``align_corners=False`` (differences of 1e-8 against 0.2–0.4 with either flag changed), so this pins
the resize :func:`flowaudit.stats.risk.lr_psnr` uses, not only its constant-image limits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from flowaudit.config.sampling import Sampling
from flowaudit.stats.risk import lr_psnr


def _pil_down(channel: np.ndarray, scale: int) -> np.ndarray:
    im = Image.fromarray(channel.astype(np.float32), mode="F")
    h, w = channel.shape
    return np.asarray(im.resize((w // scale, h // scale), Image.BICUBIC), dtype=np.float64)


@pytest.mark.parametrize("scale", [2, 4])
def test_lr_psnr_equals_the_psnr_of_a_pillow_bicubic_downscale(scale: int) -> None:
    k, c, size = 3, 2, 16
    g = torch.Generator().manual_seed(scale)
    sr = torch.rand(k, c, size, size, generator=g, dtype=torch.float64)  # one input, K = 3 samples in [0, 1]
    lr = torch.rand(1, c, size // scale, size // scale, generator=g, dtype=torch.float64)
    got = lr_psnr(sr, lr, scale, Sampling(samples=k, temperature=0.9, seed=0))
    assert got.shape == (1, k)
    for j in range(k):
        down = np.stack([_pil_down(sr[j, ch].numpy(), scale) for ch in range(c)]).clip(0, 1)
        mse = float(((down - lr[0].numpy()) ** 2).mean())
        assert got[0, j].item() == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)


def test_the_downscale_is_clipped_to_0_1_as_a_saved_image() -> None:
    """A sharp edge rings: the bicubic downscale overshoots 1 and undershoots 0; a saved image clips both."""
    sr = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    sr[..., 8:] = 1.0
    raw = _pil_down(sr[0, 0].numpy(), 2)
    assert raw.max() > 1.01 and raw.min() < -0.01  # the ringing the clip removes
    lr = torch.from_numpy(raw.clip(0, 1))[None, None]
    psnr = lr_psnr(sr, lr, 2, Sampling(samples=1, temperature=0.9, seed=0))
    assert psnr.item() == pytest.approx(120.0, abs=1e-6)  # equal up to float32 rounding: mse at its 1e-12 floor
