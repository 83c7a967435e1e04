r"""The conditioning networks :math:`g_\theta`: ESRGAN's RRDB net (SRFlow) and LLFlow's ``ConEncoder1``.

Both keep the official module names (``conv_first``, ``RRDB_trunk.{b}.RDB{1-3}.conv{1-5}``,
``trunk_conv``, …) so an official state dict loads by configuration alone,
and both return the official dictionary of per-level features, named by the
resolution factor ``f`` relative to the network input: ``fea_up{f}`` for
``f ≥ 1`` and ``fea_up0``, ``fea_up-1``, … for ``f = ½, ¼, …``
(:func:`feature_name`), plus ``block_{b}`` for every trunk block.

A residual dense block (Wang et al. 2018, ESRGAN) on :math:`x_0`:

.. math:: x_k = \mathrm{lrelu}(\mathrm{conv}_k[x_0, \dots, x_{k-1}]),\quad
          \mathrm{RDB}(x_0) = x_0 + 0.2\,\mathrm{conv}_5[x_0, \dots, x_4]

and an RRDB chains three of them with another ``0.2``-scaled skip.

SRFlow (:class:`RRDBNet`, on the LR image, Lugmayr et al. 2020): ``fea_up1 = t + trunk_conv(t)`` with
``t = RRDB_trunk(conv_first(x))`` (the official code adds the trunk output, not ``conv_first``'s as ESRGAN
does); ``fea_up2, fea_up4, fea_up8`` are the ``upconv`` outputs (nearest ×2 before), read after the official
code's in-place LeakyReLU (``official_features=True``; ``False`` keeps the pre-activation features older
checkpoints were trained with); ``fea_up0`` / ``fea_up-1`` are bilinear ½ / ¼ of ``fea_up1``.

LLFlow (:class:`ConEncoder1`, on the 6-channel low-light input, Wang et al. 2022): the colour map
:math:`x / \sum_c x` and a noise map (:func:`color_and_noise_maps`) are appended inside; ``conv_first → lrelu →
conv_second → maxpool 2`` gives ``fea_head``, ``fea_up2 = fea_head + trunk_conv(trunk)`` at ½, ``downconv1/2``
after bilinear ½ give ¼ and ⅛ (``fea_up1`` read after its in-place LeakyReLU, ``fea_up0`` raw, as in the
official code), and ``color_map = fine_tune_color_map(nearest×2(fea_up2))`` in (0, 1).

Example:
    >>> net = RRDBNet(nf=8, nb=2, gc=4, scale=4)
    >>> feats = net(torch.rand(1, 3, 8, 8))
    >>> stack_features(feats, [0, 1])["fea_up2"].shape
    torch.Size([1, 24, 16, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import shapes_only

__all__ = [
    "ResidualDenseBlock",
    "RRDB",
    "RRDBNet",
    "ConEncoder1",
    "feature_name",
    "spaced_blocks",
    "stack_features",
    "color_and_noise_maps",
]


def feature_name(factor: float) -> str:
    """Official key of the feature at ``factor`` × input resolution (2 → ``fea_up2``, ½ → ``fea_up0``)."""
    e = round(math.log2(factor))
    if 2.0**e != factor:
        raise ValueError(f"feature factor {factor} is not a power of two")
    return f"fea_up{2**e}" if e >= 0 else f"fea_up{e + 1}"


def spaced_blocks(nb: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced trunk blocks from 1 to ``nb − 1`` (0-based): 23 → [1, 8, 15, 22], 8 → [1, 3, 5, 7].

    SRFlow stacks (and the paper hooks, S1.1) exactly these for its 23-block
    ×4 net; a trunk of at most ``n`` blocks uses all of them.
    """
    if nb <= n:
        return list(range(nb))
    return sorted({round(1 + i * (nb - 2) / (n - 1)) for i in range(n)})


def stack_features(feats: dict[str, Tensor], blocks: list[int] | tuple[int, ...]) -> dict[str, Tensor]:
    """Append the concatenated trunk-block outputs, nearest-resized, to every ``fea_up*`` map.

    This is SRFlow's ``stackRRDB`` (``concat: true``): with 4 blocks of ``nf``
    channels each level feature grows from ``nf`` to ``5·nf`` channels.
    """
    if not blocks:
        return dict(feats)
    concat = torch.cat([feats[f"block_{b}"] for b in blocks], 1)
    out = dict(feats)
    for key, value in feats.items():
        if (key.startswith("fea_up") or key == "last_lr_fea") and value is not None:
            out[key] = torch.cat([value, F.interpolate(concat, size=value.shape[2:], mode="nearest")], 1)
    return out


def _kaiming(convs: list[nn.Conv2d], scale: float) -> None:
    # ESRGAN's initialisation of the dense blocks: He-normal scaled by 0.1, zero bias
    if shapes_only():
        return
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
        conv.weight.data.mul_(scale)
        nn.init.zeros_(conv.bias)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3×3 convolutions with a 0.2-scaled residual (ESRGAN's RDB)."""

    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        _kaiming([self.conv1, self.conv2, self.conv3, self.conv4, self.conv5], 0.1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual in residual dense block: three RDBs and a 0.2-scaled skip."""

    def __init__(self, nf: int = 64, gc: int = 32):
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.RDB3(self.RDB2(self.RDB1(x)))


def _half(x: Tensor, factor: float = 0.5) -> Tensor:
    """Bilinear downscaling, ``align_corners=False`` as the official code calls it."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False, recompute_scale_factor=True)


def _trunk(fea: Tensor, trunk: nn.Sequential, out: dict[str, Tensor]) -> Tensor:
    for b, block in enumerate(trunk):
        fea = block(fea)
        out[f"block_{b}"] = fea
    return fea


class RRDBNet(nn.Module):
    """SRFlow's RRDB encoder on the LR image; returns the per-level feature dict.

    Args:
        in_nc, out_nc: image channels in and out (``out`` is the RRDB's own SR
            estimate, used only when pretraining it as a regressor).
        nf, nb, gc: trunk width, number of RRDB blocks, growth channels
            (official: 64, 23, 32).
        scale: 2, 4 or 8. ``upconv1`` and ``upconv2`` always exist (as in the
            official net, whatever the scale), ``upconv3`` from ×8 on.
        official_features: store ``fea_up2/4/8`` after their LeakyReLU, as the
            official net does (``False``: before it, our earlier behaviour).
    """

    def __init__(
        self,
        in_nc: int = 3,
        out_nc: int = 3,
        nf: int = 64,
        nb: int = 23,
        gc: int = 32,
        scale: int = 4,
        official_features: bool = True,
    ):
        super().__init__()
        self.official_features = official_features
        if scale not in (2, 4, 8):
            raise ValueError(f"scale must be 2, 4 or 8, not {scale}")
        self.scale = scale
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.upconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        if scale >= 8:
            self.upconv3 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

    def upconvs(self) -> list[nn.Conv2d]:
        return [self.upconv1, self.upconv2] + ([self.upconv3] if self.scale >= 8 else [])

    def forward(self, x: Tensor, max_factor: int | None = None, with_output: bool = False) -> dict[str, Tensor]:
        """Features ``fea_up{f}`` for f = ¼ … ``max_factor`` (default ``scale``), ``block_{b}``,
        ``last_lr_fea`` and, with ``with_output``, the SR estimate ``out`` (at ×4 or ×8)."""
        out: dict[str, Tensor] = {}
        trunk = _trunk(self.conv_first(x), self.RRDB_trunk, out)
        lr_fea = trunk + self.trunk_conv(trunk)  # official: trunk output, not conv_first's
        out["last_lr_fea"] = out["fea_up1"] = lr_fea
        out["fea_up0"] = _half(lr_fea)
        if min(lr_fea.shape[2:]) >= 4:  # ¼ of an input under 4 px has no pixels (only a 4th ×4 level reads it)
            out["fea_up-1"] = _half(lr_fea, 0.25)
        upconvs = self.upconvs()
        n_up = len(upconvs) if with_output else max(0, int(math.log2(max_factor or self.scale)))
        fea = lr_fea
        for i, conv in enumerate(upconvs[:n_up]):
            up = conv(F.interpolate(fea, scale_factor=2, mode="nearest"))
            fea = F.leaky_relu(up, 0.2)
            out[f"fea_up{2 ** (i + 1)}"] = fea if self.official_features else up
        if with_output:
            out["out"] = self.conv_last(F.leaky_relu(self.HRconv(fea), 0.2))
        return out


def _gradient(x: Tensor, dim: int) -> Tensor:
    """Central difference ``½(x[i+1] − x[i−1])`` along ``dim`` with zeros beyond the border (LLFlow's)."""
    n = x.shape[dim]
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    ahead = torch.cat([x.narrow(dim, 1, n - 1), zero], dim)
    behind = torch.cat([zero, x.narrow(dim, 0, n - 1)], dim)
    return 0.5 * (ahead - behind)


def color_and_noise_maps(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""LLFlow's colour map :math:`c = e^{x_{0:3}} / (\sum_c e^{x_{0:3}} + 10^{-4})` and noise map
    :math:`\max(|\partial_h c|, |\partial_w c|)` from the log-image channels ``x[:, :3]``."""
    raw = x[:, :3].exp()
    color = raw / (raw.sum(1, keepdim=True) + 1e-4)
    noise = torch.maximum(_gradient(color, 2).abs(), _gradient(color, 3).abs())
    return color, noise


class ConEncoder1(nn.Module):
    """LLFlow's encoder on ``[log low, hist-eq low]`` (6 channels); returns the per-level dict.

    ``conv_first`` takes 12 channels: the 6 given plus the colour and noise maps
    computed inside. Levels: ``fea_up2`` (½), ``fea_up1`` (¼, ``downconv1``),
    ``fea_up0`` (⅛, ``downconv2``) and, our extension for a fourth level,
    ``fea_up-1`` (1/16, ``downconv3``, unused by the official net). ``HRconv``,
    ``conv_last`` and ``awb_para`` are unused, kept so official keys match.
    ``official_features``: ``fea_up1`` after ``downconv1``'s LeakyReLU, as the
    official net reads it (``False``: before it, our earlier behaviour).
    """

    def __init__(
        self, in_nc: int = 6, nf: int = 64, nb: int = 24, gc: int = 32, out_nc: int = 3, official_features: bool = True
    ):
        super().__init__()
        self.official_features = official_features
        self.conv_first = nn.Conv2d(in_nc + 6, nf, 3, 1, 1)
        self.conv_second = nn.Conv2d(nf, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.downconv3 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.awb_para = nn.Linear(nf, 3)
        self.fine_tune_color_map = nn.Sequential(nn.Conv2d(nf, 3, 1, 1), nn.Sigmoid())

    def forward(self, x: Tensor, levels: int = 3) -> dict[str, Tensor]:
        """Features for flow levels 1…``levels`` (at ½ … 1/2^levels), ``block_{b}`` and ``color_map``."""
        color, noise = color_and_noise_maps(x)
        fea = self.conv_second(F.leaky_relu(self.conv_first(torch.cat([x, color, noise], 1)), 0.2))
        head = F.max_pool2d(fea, 2)
        out: dict[str, Tensor] = {"fea_up4": head}
        down = head + self.trunk_conv(_trunk(head, self.RRDB_trunk, out))  # ESRGAN form here: head + trunk
        out["fea_up2"] = down
        out["color_map"] = self.fine_tune_color_map(F.interpolate(down, scale_factor=2, mode="nearest"))
        fea = down
        for level, conv in zip(range(2, levels + 1), (self.downconv1, self.downconv2, self.downconv3)):
            d = conv(_half(fea))
            fea = F.leaky_relu(d, 0.2)
            # official: only downconv1's output goes through the in-place LeakyReLU before it is read
            out[feature_name(2.0 ** (2 - level))] = fea if self.official_features and level == 2 else d
        if levels >= 2:
            out["last_lr_fea"] = out["fea_up1"]
        return out
