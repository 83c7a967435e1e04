r"""LLFlow-style low-light enhancement flow with selectable site kinds (Wang et al. 2022; Hong et al. 2023 S1.4).

The condition :math:`y` is the low-light image in [0, 1]. The encoder reads
the official input pipeline (:func:`llflow_input`):

.. math:: \tilde y = \big[\log\max(y + 10^{-3}, 10^{-3}),\ \mathrm{HE}(y)\big]

with :math:`\mathrm{HE}` OpenCV's per-channel histogram equalisation of the
8-bit image (:func:`equalize_hist`), and adds the colour and noise maps
itself (:class:`~flowaudit.reference_models.rrdb.ConEncoder1`). The flow body
is SRFlow's (:class:`~flowaudit.reference_models.sr.FlowUpsamplerNet`) at
scale 1: ``L`` levels of squeeze · 2 transition steps · ``K`` conditional
steps, no split; level :math:`l` reads the encoder feature at :math:`1/2^l`.

The top latent has the conditional prior :math:`\mathcal N(\mu(y), I)` with
:math:`\mu = \mathrm{squeeze}_{2^L}(\text{colour map})`, the encoder's learned
colour map squeezed in one step, as the official code does. It is the
:class:`~flowaudit.reference_models.couplings.GaussianPrior` site ``prior``
(log σ = 0), so the returned latent :math:`\varepsilon = z - \mu` is standard normal.

Sampling: the official inference sets :math:`z = \mu` (``enhance``, i.e. ε = 0,
temperature ignored); the paper's second scheme (S1.4) averages samples,
:meth:`LLFlow.sample_mean`. No clamp anywhere.

Example:
    >>> flow = LLFlow(L=3, K=1, nf=8, nb=2, gc=4, hidden_channels=8, patch=16)
    >>> flow.enhance(torch.rand(1, 3, 16, 16) * 0.2).shape
    torch.Size([1, 3, 16, 16])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import ReferenceFlow
from .couplings import GaussianPrior
from .rrdb import ConEncoder1, feature_name, spaced_blocks, stack_features
from .sr import FlowUpsamplerNet, squeeze2d

__all__ = ["OFFICIAL", "equalize_hist", "llflow_input", "LLFlow"]

# confs/LOL-pc.yml of the official repository, for the checkpoint adapter.
OFFICIAL = {
    "llflow-lol": dict(L=3, K=12, nf=64, nb=24, gc=32, stack_blocks=[1, 3, 5, 7], hidden_channels=64, patch=160),
}


@torch.no_grad()
def equalize_hist(y: Tensor) -> Tensor:
    r"""Per-image, per-channel histogram equalisation of ``round(255·y)``, as ``cv2.equalizeHist``; in [0, 1].

    With :math:`h` the 256-bin histogram, :math:`i_0` its first non-empty bin
    and :math:`N` the pixel count, :math:`\mathrm{lut}(i) = \mathrm{round}\big(255
    \sum_{i_0 < j \le i} h_j / (N - h_{i_0})\big)` (half to even, float32), and a
    constant channel keeps its value; NaN counts as 0. Bit-exact with OpenCV on
    8-bit images; deterministic; no gradient.
    """
    b, c, h, w = y.shape
    v = (torch.nan_to_num(y, nan=0.0).clamp(0, 1) * 255).round().long().reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=y.device).scatter_add_(1, v, torch.ones_like(v))
    first = (hist > 0).long().argmax(1, keepdim=True)
    h0 = hist.gather(1, first)
    scale = torch.tensor(255.0, dtype=torch.float32, device=y.device) / (h * w - h0).clamp_min(1).float()
    lut = ((hist.cumsum(1) - h0).float() * scale).round().clamp(0, 255)
    constant = h0 == h * w  # OpenCV: a flat channel stays as it is
    lut = torch.where(constant, torch.arange(256, device=y.device, dtype=lut.dtype).expand_as(lut), lut)
    return (lut.gather(1, v) / 255).reshape(b, c, h, w).to(y.dtype)


def llflow_input(y: Tensor) -> Tensor:
    """The encoder's 6 channels: ``log(clamp(y + 1e-3, 1e-3))`` then :func:`equalize_hist` of ``y``.

    The official loader equalises the whole image before cropping; here the
    model equalises what it is given.
    """
    return torch.cat([torch.log(torch.clamp(y + 1e-3, min=1e-3)), equalize_hist(y)], 1)


class LLFlow(ReferenceFlow):
    """LLFlow-style low-light flow (see module docstring).

    Args:
        L, K: levels (≤ 4; official 3) and conditional steps per level (official 12).
        nf, nb, gc: encoder width, RRDB blocks, growth channels (official 64, 24, 32).
        stack_blocks: trunk blocks appended to each level feature and hooked for ``s_OOD``
            (default 4 evenly spaced; official and the paper: 1, 3, 5, 7).
        hidden_channels: conditioner width (official 64).
        coupling, injector: site kinds as in :class:`~flowaudit.reference_models.sr.SRFlow`.
        patch: training patch size (``condition_shape``); divisible by 2^L.
        fixed_invconv, n_transition: as in ``SRFlow``.
        official_features: level 2 reads ``fea_up1`` after ``downconv1``'s LeakyReLU, as the
            official ``ConEncoder1`` does; configs without the key load with ``False``
            (:attr:`LEGACY_CONFIG`), the behaviour they were trained with.
    """

    task = "lowlight"
    output_range = (0.0, 1.0)
    LEGACY_CONFIG = {"official_features": False}

    def __init__(
        self,
        L: int = 3,
        K: int = 4,
        nf: int = 32,
        nb: int = 4,
        gc: int = 16,
        stack_blocks: list[int] | None = None,
        hidden_channels: int = 32,
        coupling: str = "affine",
        injector: str | None = None,
        patch: int = 32,
        fixed_invconv: bool = False,
        n_transition: int = 2,
        official_features: bool = True,
    ):
        stack_blocks = list(spaced_blocks(nb) if stack_blocks is None else stack_blocks)
        super().__init__(
            L=L,
            K=K,
            nf=nf,
            nb=nb,
            gc=gc,
            stack_blocks=stack_blocks,
            hidden_channels=hidden_channels,
            coupling=coupling,
            injector=injector,
            patch=patch,
            fixed_invconv=fixed_invconv,
            n_transition=n_transition,
            official_features=official_features,
        )
        if not 1 <= L <= 4:
            raise ValueError(f"L must be 1…4 (the encoder has features down to 1/16), not {L}")
        if patch % 2**L:
            raise ValueError(f"patch {patch} must be divisible by 2^L = {2**L}")
        self.L, self.stack_blocks = L, stack_blocks
        self.condition_shape = (3, patch, patch)
        self.RRDB = ConEncoder1(6, nf, nb, gc, official_features=official_features)
        self.flowUpsamplerNet = FlowUpsamplerNet(
            3,
            L,
            K,
            nf * (1 + len(stack_blocks)),
            hidden_channels,
            coupling,
            injector,
            n_transition,
            split=False,
            fixed_invconv=fixed_invconv,
        )
        self.prior = GaussianPrior(unit_sigma=True)  # N(μ(y), I): log σ = 0 always (_prior_params)

    def encoder_module(self) -> nn.Module:
        return self.RRDB

    def default_feature_layers(self) -> list[str]:
        return [f"RRDB.RRDB_trunk.{b}" for b in self.stack_blocks]

    def encode(self, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Level features ``[u_1, …, u_L]`` (``u_l`` at 1/2^l) and the prior mean μ (latent-shaped)."""
        feats = stack_features(self.RRDB(llflow_input(y), levels=self.L), self.stack_blocks)
        conds = [feats[feature_name(2.0 ** (2 - level))] for level in range(1, self.L + 1)]
        return conds, squeeze2d(feats["color_map"], 2**self.L)

    @staticmethod
    def _prior_params(mean: Tensor) -> Tensor:
        # cross layout of GaussianPrior: mean on channels 0::2, log σ = 0 on 1::2
        return torch.stack([mean, torch.zeros_like(mean)], 2).flatten(1, 2)

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        conds, mean = self.encode(y)
        (z,), logdet = self.flowUpsamplerNet.encode(x, conds)
        eps, ladj = self.prior(z, self._prior_params(mean))
        return [eps], logdet + ladj.flatten(1).sum(1)

    def reverse(self, latents: list[Tensor], y: Tensor) -> Tensor:
        conds, mean = self.encode_once(y)
        (eps,) = latents
        z, _ = self.prior(eps, self._prior_params(mean), reverse=True)
        return self.flowUpsamplerNet.decode([z], conds)[0]

    def latent_shapes(self, y: Tensor) -> list[tuple[int, ...]]:
        return self.flowUpsamplerNet.latent_shapes(y.shape[0], y.shape[2], y.shape[3])

    def trace_layers(self) -> list[str]:
        body = [f"flowUpsamplerNet.layers.{i}" for i in reversed(range(len(self.flowUpsamplerNet.layers)))]
        return ["prior"] + body

    def enhance(self, y: Tensor) -> Tensor:
        """The official LLFlow inference: ``z = μ(y)``, i.e. :meth:`reverse` of a zero latent."""
        return self.reverse([torch.zeros(s, dtype=y.dtype, device=y.device) for s in self.latent_shapes(y)], y)

    def sample_mean(
        self, y: Tensor, temperature: float = 1.0, n: int = 10, generator: torch.Generator | None = None
    ) -> Tensor:
        r""":math:`\frac1n \sum_i f^{-1}(\tau\varepsilon_i; y)`, the paper's second scheme (S1.4; τ = 1 there).

        One non-finite sample makes the mean non-finite, which is the artefact
        the paper reports for affine LLFlow.
        """
        total = None
        for _ in range(n):
            x = self.sample(y, temperature, generator)
            total = x if total is None else total + x
        return total / n
