r"""SRFlow / FS-NCSR-style super-resolution flow with selectable site kinds (Lugmayr et al. 2020, Song et al. 2022).

The HR image :math:`x` (or, with ``residual``, :math:`x - \mathrm{bicubic}{\uparrow}(y)`
as FS-NCSR models it) goes through ``L`` levels of the flow body; level
:math:`l` sees the RRDB feature of its own resolution, :math:`u_l = g_\theta(y)`
at ``scale / 2^l`` × the LR size, with the stacked trunk blocks appended
(:mod:`~flowaudit.reference_models.rrdb`).

Level :math:`l` (encode direction): squeeze ×2 · ``n_transition`` steps of
ActNorm → 1×1 (no coupling) · ``K`` conditional steps · a split while
:math:`l < L - 1`, l = 1…L (SRFlow's ``correct_splits = false``; ``correct_splits``
splits after every level but the last). A conditional step is
ActNorm → 1×1 → :class:`CondCoupling`, SRFlow's ``CondAffineSeparatedAndCond``
with any site kind:

.. math:: z \leftarrow c_F\big(z;\ \mathrm{NN}_F(u_l)\big), \qquad
          z_2 \leftarrow c_A\big(z_2;\ \mathrm{NN}_A([z_1, u_l])\big)

(the injector over all C channels, then the coupling on the second half;
affine :math:`c(x) = (x + t)(\sigma(r + 2) + \epsilon)`). A split keeps
:math:`z_1` and factors out :math:`\varepsilon = (z_2 - \mu(z_1)) e^{-\log\sigma(z_1)}`
through a :class:`~flowaudit.reference_models.couplings.GaussianPrior` site;
the top latent is :math:`\mathcal N(0, I)`. With ``std_channels`` (NCSR /
FS-NCSR) the last ``std_steps[l]`` steps of a level carry a third coupling
on :math:`[z_1, \text{noise map}]` between the two, its noise map the
test-time level 0.

Module names follow the official code (``RRDB.…``, ``flowUpsamplerNet.layers.{i}.actnorm / invconv /
affine.fAffine / affine.fFeatures``, ``rqspline.fRQspline``, ``…_std``), so an official state dict maps by
configuration alone (:data:`OFFICIAL`: the released configurations); ``flowaudit.adapters.official`` maps the
three small differences left (ActNorm's ``initialized`` buffer, the fixed 1×1's 2-D ``weight``, the unused
``flowUpsamplerNet.f``).

Example:
    >>> flow = SRFlow(scale=4, L=3, K=1, nf=8, nb=2, gc=4, hidden_channels=8, patch=16)
    >>> y = torch.rand(2, 3, 4, 4)
    >>> flow.sample(y, temperature=0.9).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ReferenceFlow, shapes_only
from .couplings import GaussianPrior, make_elementwise
from .glow import ActNorm, InvConv1x1
from .rrdb import RRDBNet, feature_name, spaced_blocks, stack_features

__all__ = [
    "SPLINE_KINDS",
    "OFFICIAL",
    "Conv2dZeros",
    "Conv2dActNorm",
    "conditioner",
    "squeeze2d",
    "unsqueeze2d",
    "Squeeze",
    "CondCoupling",
    "FlowStep",
    "Split2d",
    "FlowUpsamplerNet",
    "SRFlow",
]

SPLINE_KINDS = ("rq-spline", "modified-rq-spline")

# The released configurations (confs/*.yml of the official repositories), for the checkpoint adapter.
_BIG = dict(nf=64, gc=32, hidden_channels=64, patch=160)
OFFICIAL = {
    "srflow-df2k-4x": dict(scale=4, L=3, K=16, nb=23, stack_blocks=[1, 8, 15, 22], **_BIG),
    "srflow-df2k-8x": dict(scale=8, L=4, K=16, nb=23, stack_blocks=[1, 3, 5, 7], **_BIG),
    "srflow-celeba-8x": dict(scale=8, L=4, K=16, nb=8, stack_blocks=[1, 3, 5, 7], **_BIG),
    "fs-ncsr-4x": dict(
        scale=4,
        L=3,
        K=16,
        nb=23,
        stack_blocks=[1, 8, 15, 22],
        residual=True,
        std_channels=3,
        std_steps=[0, 16, 16],
        **_BIG,
    ),
    "fs-ncsr-8x": dict(
        scale=8,
        L=4,
        K=20,
        nb=23,
        stack_blocks=[1, 8, 15, 22],
        residual=True,
        std_channels=3,
        std_steps=[0, 0, 16, 16],
        **_BIG,
    ),
}


class Conv2dZeros(nn.Conv2d):
    r"""Glow's zero-initialised 3×3 output layer: :math:`\mathrm{conv}(x) \cdot e^{3\,\ell}` (``logs`` = ℓ)."""

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.logscale_factor = logscale_factor
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * torch.exp(self.logs * self.logscale_factor)


class Conv2dActNorm(nn.Conv2d):
    """Glow's bias-free convolution (weights ~ N(0, 0.05²)) followed by its own ActNorm (``.actnorm``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        if not shapes_only():
            nn.init.normal_(self.weight, 0.0, 0.05)
        self.actnorm = ActNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.actnorm(super().forward(x))[0]


def conditioner(in_channels: int, out_channels: int, hidden: int) -> nn.Sequential:
    """SRFlow's subnet ``F``: conv3×3+ActNorm → ReLU → conv1×1+ActNorm → ReLU → :class:`Conv2dZeros`.

    Zero output at initialisation, so every site starts at its kind's ``h = 0`` map.
    """
    return nn.Sequential(
        Conv2dActNorm(in_channels, hidden, 3),
        nn.ReLU(),
        Conv2dActNorm(hidden, hidden, 1),
        nn.ReLU(),
        Conv2dZeros(hidden, out_channels),
    )


def squeeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """(B, C, H, W) → (B, C·f², H/f, W/f), channel ``c·f² + i·f + j`` (Glow's / SRFlow's order)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * factor * factor, h // factor, w // factor)


def unsqueeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """Inverse of :func:`squeeze2d`."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // factor**2, factor, factor, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // factor**2, h * factor, w * factor)


class Squeeze(nn.Module):
    """Parameter-free ×2 squeeze layer; ``(out, logdet = 0)``."""

    def forward(self, x: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        return (unsqueeze2d(x) if reverse else squeeze2d(x)), x.new_zeros(x.shape[0])


class CondCoupling(nn.Module):
    r"""SRFlow's ``CondAffineSeparatedAndCond`` for any site kind (see module docstring).

    Sub-nets keep the official names: injector ``fFeatures`` (on :math:`u`, C·P
    outputs), coupling ``fAffine`` or, for spline kinds, ``fRQspline`` (on
    :math:`[z_1, u]`, ⌈C/2⌉·P outputs), and NCSR's ``fAffine_std`` /
    ``fRQspline_std``. The sites are the parameter-free children
    ``injector_site``, ``coupling_site`` and ``std_site``.
    """

    def __init__(
        self,
        channels: int,
        cond_channels: int,
        hidden: int,
        coupling: str = "affine",
        injector: str | None = None,
        std_channels: int = 0,
        std_active: bool = False,
    ):
        super().__init__()
        self.channels_for_nn = channels // 2
        self.channels_for_co = channels - channels // 2
        self.injector_site = make_elementwise(injector or coupling)
        self.coupling_site = make_elementwise(coupling)
        self.net_name = "fRQspline" if coupling in SPLINE_KINDS else "fAffine"
        nn_in, co_out = self.channels_for_nn, self.channels_for_co * self.coupling_site.params_per_dim
        self.add_module(self.net_name, conditioner(nn_in + cond_channels, co_out, hidden))
        self.fFeatures = conditioner(cond_channels, channels * self.injector_site.params_per_dim, hidden)
        self.std_channels, self.std_active = std_channels, bool(std_channels and std_active)
        if std_channels:  # NCSR builds the noise sub-net in every step, uses it only where active
            self.std_site = make_elementwise(coupling)
            self.add_module(self.net_name + "_std", conditioner(nn_in + std_channels, co_out, hidden))

    def _couple(self, z: Tensor, cond: Tensor, suffix: str, reverse: bool) -> tuple[Tensor, Tensor]:
        """Coupling on the second half by ``net_name + suffix`` on ``[z1, cond]``; suffix "" or "_std"."""
        net, site = getattr(self, self.net_name + suffix), (self.std_site if suffix else self.coupling_site)
        z1, z2 = z[:, : self.channels_for_nn], z[:, self.channels_for_nn :]
        z2, ladj = site(z2, net(torch.cat([z1, cond], 1)), reverse=reverse)
        return torch.cat([z1, z2], 1), ladj.flatten(1).sum(1)

    def _inject(self, z: Tensor, ft: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
        z, ladj = self.injector_site(z, self.fFeatures(ft), reverse=reverse)
        return z, ladj.flatten(1).sum(1)

    def forward(self, z: Tensor, ft: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Encode: injector, (noise coupling), coupling; decode: the same backwards. ``(z, logdet)``."""
        # FS-NCSR samples at noise level 0: its noise map is all zeros
        std = z.new_zeros(z.shape[0], self.std_channels, *z.shape[2:]) if self.std_active else None
        if not reverse:
            z, ld_inj = self._inject(z, ft, False)
            z, ld_std = self._couple(z, std, "_std", False) if std is not None else (z, 0.0)
            z, ld_cpl = self._couple(z, ft, "", False)
        else:
            z, ld_cpl = self._couple(z, ft, "", True)
            z, ld_std = self._couple(z, std, "_std", True) if std is not None else (z, 0.0)
            z, ld_inj = self._inject(z, ft, True)
        return z, ld_inj + ld_std + ld_cpl


class FlowStep(nn.Module):
    """ActNorm → invertible 1×1 → (optional) :class:`CondCoupling` named ``affine`` or ``rqspline``."""

    def __init__(
        self,
        channels: int,
        cond_channels: int | None = None,
        hidden: int = 64,
        coupling: str = "affine",
        injector: str | None = None,
        fixed_invconv: bool = False,
        std_channels: int = 0,
        std_active: bool = False,
    ):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels, fixed=fixed_invconv)
        self.block_name = None
        if cond_channels is not None:
            self.block_name = "rqspline" if coupling in SPLINE_KINDS else "affine"
            block = CondCoupling(channels, cond_channels, hidden, coupling, injector, std_channels, std_active)
            self.add_module(self.block_name, block)

    def forward(self, z: Tensor, ft: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor]:
        block = getattr(self, self.block_name) if self.block_name else None
        logdet = z.new_zeros(z.shape[0])
        if reverse and block is not None:
            z, ld = block(z, ft, reverse=True)
            logdet = logdet + ld
        for layer in (self.invconv, self.actnorm) if reverse else (self.actnorm, self.invconv):
            z, ld = layer(z, reverse=reverse)
            logdet = logdet + ld
        if not reverse and block is not None:
            z, ld = block(z, ft)
            logdet = logdet + ld
        return z, logdet


class Split2d(nn.Module):
    r"""SRFlow's split: keep :math:`z_1`, factor out :math:`z_2` under the prior site ``prior``
    with :math:`[\mu, \log\sigma] = \mathrm{Conv2dZeros}(z_1)` (cross split)."""

    def __init__(self, channels: int, consume_ratio: float = 0.5):
        super().__init__()
        self.num_channels_consume = int(round(channels * consume_ratio))
        self.num_channels_pass = channels - self.num_channels_consume
        self.conv = Conv2dZeros(self.num_channels_pass, 2 * self.num_channels_consume)
        self.prior = GaussianPrior()

    def forward(self, z: Tensor, reverse: bool = False, eps: Tensor | None = None):
        """Encode: ``(z1, logdet, ε)``; decode (``eps`` given): ``(z, logdet)``."""
        if not reverse:
            z1, z2 = z[:, : self.num_channels_pass], z[:, self.num_channels_pass :]
            eps, ladj = self.prior(z2, self.conv(z1))
            return z1, ladj.flatten(1).sum(1), eps
        z2, ladj = self.prior(eps, self.conv(z), reverse=True)
        return torch.cat([z, z2], 1), ladj.flatten(1).sum(1)


class FlowUpsamplerNet(nn.Module):
    """The multi-level flow body shared by SRFlow and LLFlow (official name and layer indexing).

    ``conds[l − 1]`` is level l's conditioning feature; latents are returned
    split ε first, top latent last.
    """

    def __init__(
        self,
        in_channels: int = 3,
        L: int = 3,
        K: int = 16,
        cond_channels: int = 320,
        hidden_channels: int = 64,
        coupling: str = "affine",
        injector: str | None = None,
        n_transition: int = 2,
        split: bool = True,
        correct_splits: bool = False,
        fixed_invconv: bool = False,
        std_channels: int = 0,
        std_steps: list[int] | None = None,
    ):
        super().__init__()
        self.L, self.in_channels = L, in_channels
        self.layers = nn.ModuleList()
        self.level_of: list[int] = []
        std_steps = std_steps if std_steps is not None else [0] + [K] * (L - 1)
        c = in_channels
        for level in range(1, L + 1):
            c *= 4
            new = [Squeeze()] + [FlowStep(c, fixed_invconv=fixed_invconv) for _ in range(n_transition)]
            new += [
                FlowStep(
                    c,
                    cond_channels,
                    hidden_channels,
                    coupling,
                    injector,
                    fixed_invconv,
                    std_channels,
                    std_steps[level - 1] >= K - k,
                )
                for k in range(K)
            ]
            if split and level < L - (0 if correct_splits else 1):
                new.append(Split2d(c))
                c = new[-1].num_channels_pass
            self.layers.extend(new)
            self.level_of += [level] * len(new)

    def latent_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        if height % 2**self.L or width % 2**self.L:
            raise ValueError(f"image size {height}×{width} is not divisible by 2^L = {2**self.L}")
        shapes, c, h, w = [], self.in_channels, height, width
        for layer in self.layers:
            if isinstance(layer, Squeeze):
                c, h, w = 4 * c, h // 2, w // 2
            elif isinstance(layer, Split2d):
                shapes.append((batch, layer.num_channels_consume, h, w))
                c = layer.num_channels_pass
        return shapes + [(batch, c, h, w)]

    def encode(self, x: Tensor, conds: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        self.latent_shapes(*x.shape[:1], *x.shape[2:])  # validates the size
        logdet, latents = x.new_zeros(x.shape[0]), []
        for layer, level in zip(self.layers, self.level_of):
            if isinstance(layer, Split2d):
                x, ld, eps = layer(x)
                latents.append(eps)
            elif isinstance(layer, FlowStep):
                x, ld = layer(x, conds[level - 1])
            else:
                x, ld = layer(x)
            logdet = logdet + ld
        return latents + [x], logdet

    def decode(self, latents: list[Tensor], conds: list[Tensor]) -> tuple[Tensor, Tensor]:
        latents = list(latents)
        z = latents.pop()
        logdet = z.new_zeros(z.shape[0])
        for layer, level in zip(reversed(self.layers), reversed(self.level_of)):
            if isinstance(layer, Split2d):
                z, ld = layer(z, reverse=True, eps=latents.pop())
            elif isinstance(layer, FlowStep):
                z, ld = layer(z, conds[level - 1], reverse=True)
            else:
                z, ld = layer(z, reverse=True)
            logdet = logdet + ld
        if latents:
            raise ValueError(f"{len(latents)} latent(s) left over: expected {self.n_latents}")
        return z, logdet

    @property
    def n_latents(self) -> int:
        return 1 + sum(isinstance(m, Split2d) for m in self.layers)


class SRFlow(ReferenceFlow):
    """SRFlow / FS-NCSR super-resolution flow (see module docstring).

    Args:
        scale: 2, 4 or 8. L, K: levels and conditional steps per level (official ×4: 3, 16).
        nf, nb, gc: RRDB width, blocks, growth channels (official: 64, 23, 32).
        stack_blocks: trunk blocks appended to each level feature (default: 4 evenly spaced,
            :func:`~flowaudit.reference_models.rrdb.spaced_blocks`); their outputs are also the
            default ``s_OOD`` features, as in the paper (blocks 1, 8, 15, 22 of 23).
        hidden_channels: conditioner width (official 64).
        coupling: site kind of the couplings (``couplings.KINDS``).
        injector: site kind of the ``fFeatures`` injectors; ``None`` = the coupling's kind, as
            the paper's official spline code swaps both (its ``fFeatures`` outputs 4 per
            channel) and FS-NCSR† bounds both through the shared ``eps``.
        residual: FS-NCSR's frequency split: model ``x − bicubic↑(y)``, add it back when sampling.
        patch: HR training patch size (``condition_shape`` is its LR size).
        fixed_invconv: fixed random orthogonal 1×1s (the paper's ×8 recipe).
        correct_splits: split after every level but the last (official default: not after L − 1).
        n_transition: unconditional ActNorm → 1×1 steps after each squeeze (official 2).
        std_channels, std_steps: NCSR's noise sub-net (3 and, per level, how many last steps use
            it; default ``[0, K, …]``); 0 for SRFlow.
        official_features: the flow reads ``fea_up2/4/8`` after their LeakyReLU, as the official
            code does (:class:`~flowaudit.reference_models.rrdb.RRDBNet`). Checkpoints whose config
            lacks the key were trained with ``False`` and load that way (:attr:`LEGACY_CONFIG`).
    """

    task = "sr"
    output_range = (0.0, 1.0)
    # what a saved config without these keys was built with (``load_checkpoint`` fills them in)
    LEGACY_CONFIG = {"official_features": False}

    def __init__(
        self,
        scale: int = 4,
        L: int = 3,
        K: int = 4,
        nf: int = 32,
        nb: int = 4,
        gc: int = 16,
        stack_blocks: list[int] | None = None,
        hidden_channels: int = 32,
        coupling: str = "affine",
        injector: str | None = None,
        residual: bool = False,
        patch: int = 32,
        fixed_invconv: bool = False,
        correct_splits: bool = False,
        n_transition: int = 2,
        std_channels: int = 0,
        std_steps: list[int] | None = None,
        official_features: bool = True,
    ):
        stack_blocks = list(spaced_blocks(nb) if stack_blocks is None else stack_blocks)
        std_steps = None if not std_channels else list(std_steps if std_steps is not None else [0] + [K] * (L - 1))
        super().__init__(
            scale=scale,
            L=L,
            K=K,
            nf=nf,
            nb=nb,
            gc=gc,
            stack_blocks=stack_blocks,
            hidden_channels=hidden_channels,
            coupling=coupling,
            injector=injector,
            residual=residual,
            patch=patch,
            fixed_invconv=fixed_invconv,
            correct_splits=correct_splits,
            n_transition=n_transition,
            std_channels=std_channels,
            std_steps=std_steps,
            official_features=official_features,
        )
        if not 1 <= 2**L <= 4 * scale:  # level features exist from scale/2 down to ¼ of the LR size
            max_l = (4 * scale).bit_length() - 1
            raise ValueError(f"L = {L} needs features at {scale / 2**L} × the LR size; ×{scale} allows L ≤ {max_l}")
        if patch % 2**L or patch % scale:
            raise ValueError(f"patch {patch} must be divisible by scale {scale} and 2^L = {2**L}")
        self.scale, self.L, self.residual = scale, L, residual
        self.stack_blocks = stack_blocks
        self.condition_shape = (3, patch // scale, patch // scale)
        self.RRDB = RRDBNet(3, 3, nf, nb, gc, scale, official_features=official_features)
        self.flowUpsamplerNet = FlowUpsamplerNet(
            3,
            L,
            K,
            nf * (1 + len(stack_blocks)),
            hidden_channels,
            coupling,
            injector,
            n_transition,
            split=True,
            correct_splits=correct_splits,
            fixed_invconv=fixed_invconv,
            std_channels=std_channels,
            std_steps=std_steps,
        )

    def encoder_module(self) -> nn.Module:
        return self.RRDB

    def default_feature_layers(self) -> list[str]:
        return [f"RRDB.RRDB_trunk.{b}" for b in self.stack_blocks]

    def encode(self, y: Tensor) -> list[Tensor]:
        """Level features ``[u_1, …, u_L]``, ``u_l`` = stacked ``fea_up{scale/2^l}``."""
        feats = stack_features(self.RRDB(y, max_factor=max(1, self.scale // 2)), self.stack_blocks)
        return [feats[feature_name(self.scale / 2**level)] for level in range(1, self.L + 1)]

    def upsample(self, y: Tensor) -> Tensor:
        """Bicubic ×scale (``align_corners=False``), FS-NCSR's low-frequency part."""
        return F.interpolate(y, scale_factor=self.scale, mode="bicubic", align_corners=False)

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        if self.residual:
            x = x - self.upsample(y)
        return self.flowUpsamplerNet.encode(x, self.encode(y))

    def reverse(self, latents: list[Tensor], y: Tensor) -> Tensor:
        x, _ = self.flowUpsamplerNet.decode(latents, self.encode_once(y))
        return x + self.upsample(y) if self.residual else x

    def latent_shapes(self, y: Tensor) -> list[tuple[int, ...]]:
        return self.flowUpsamplerNet.latent_shapes(y.shape[0], y.shape[2] * self.scale, y.shape[3] * self.scale)

    def trace_layers(self) -> list[str]:
        return [f"flowUpsamplerNet.layers.{i}" for i in reversed(range(len(self.flowUpsamplerNet.layers)))]
