r"""How much each layer of an inverse pass can grow a value: the per-layer bounds of the whole-inverse certificate.

Every layer :math:`L` of the inverse pass (latent side → data side) gets an :math:`\infty`-norm bound

.. math:: \|v_{\text{out}}\|_\infty \le g_L\,\|v_{\text{in}}\|_\infty + d_L

(:class:`LayerBound`: ``gain`` :math:`g_L`, ``offset`` :math:`d_L`), read from the live module:

* **sites** (conditional elementwise maps) — from their structure, which the evidence may void: the
  layer only names them (``sites``), :mod:`flowaudit.evidence.certificate` reads their bound;
* **ActNorm** :math:`x = y\,e^{-\ell} - b` — :math:`g = \max e^{-\ell}`, :math:`d = \max|b|` (each library's
  own form and direction);
* **invertible 1×1 convolutions, LU and linear layers** :math:`x = W^{-1}(y - b)` — :math:`g = \|W^{-1}\|_\infty`
  (largest absolute row sum, from the live weights in float64), :math:`d = \|W^{-1}b\|_\infty`; a singular
  :math:`W` has none;
* **permutations, squeezes, reshapes** — exact (:math:`g = 1, d = 0`); **Haar** — :math:`g = 4 f_{\text{rev}}`
  (four coefficients per output, each scaled by the block's factor);
* **unconditional bases and split priors** :math:`x = \mu + \sigma\varepsilon` — :math:`g = \max\sigma`,
  :math:`d = \max|\mu|` (a split whose :math:`\mu` is linear in the kept half adds that operator's norm);
* anything else — ``gain=None`` with the reason: the certificate is then not issued and names the layer.

The generic rules recognise modules by type (FrEIA, nflows, zuko, normflows, the bundled flows) in
:func:`module_bound`; each adapter lists its inverse pass with them (``Adapter.inverse_layers``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LayerBound",
    "exact",
    "unbounded",
    "site_layer",
    "row_norm",
    "inverse_norm",
    "module_bound",
    "gaussian_base",
    "reference_layers",
]


@dataclasses.dataclass(frozen=True)
class LayerBound:
    """One layer of the inverse pass: ``‖out‖∞ ≤ gain·‖in‖∞ + offset``; ``gain=None``: no bound (``why``).

    ``sites``: the sites this layer applies (their bounds come from the evidence), in inverse order.
    """

    name: str
    kind: str
    gain: float | None
    offset: float | None = 0.0
    why: str | None = None
    sites: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "gain": self.gain,
            "offset": self.offset,
            "why": self.why,
            "sites": list(self.sites),
        }


def exact(name: str, kind: str) -> LayerBound:
    """A layer that only moves or copies values (permutation, squeeze, reshape): gain 1, offset 0."""
    return LayerBound(name, kind, 1.0, 0.0)


def unbounded(name: str, kind: str, why: str) -> LayerBound:
    """A layer with no bound; ``why`` says what prevents one."""
    return LayerBound(name, kind, None, None, why)


def site_layer(name: str, sites: list[str] | tuple[str, ...]) -> LayerBound:
    """A layer made of sites: its bound is theirs, read from the evidence."""
    return LayerBound(name, "site", None, None, None, tuple(sites))


def _finite(name: str, kind: str, gain: float, offset: float, what: str) -> LayerBound:
    if math.isfinite(gain) and math.isfinite(offset):
        return LayerBound(name, kind, float(gain), float(offset))
    return unbounded(name, kind, f"{what} is not finite (gain {gain:.3g}, offset {offset:.3g})")


def row_norm(m: Tensor) -> float:
    """``‖M‖∞``: the largest absolute row sum of a matrix (rows = outputs)."""
    return float(m.detach().to(torch.float64).abs().sum(1).max())


def inverse_norm(w: Tensor) -> float:
    """``‖W⁻¹‖∞`` of a square matrix, in float64; ``inf`` when ``W`` is singular."""
    w = w.detach().to(torch.float64).cpu()
    try:
        inv = torch.linalg.inv(w)
    except RuntimeError:  # exactly singular
        return math.inf
    return row_norm(inv) if bool(torch.isfinite(inv).all()) else math.inf


def _max(t: Tensor) -> float:
    return float(t.detach().to(torch.float64).max()) if t.numel() else 0.0


def _absmax(t: Tensor) -> float:
    return float(t.detach().to(torch.float64).abs().max()) if t.numel() else 0.0


def _linear_inverse(name: str, kind: str, w: Tensor, b: Tensor | None, inverted: bool) -> LayerBound:
    """``x = W⁻¹(y − b)`` (or ``W y + b`` where the inverse pass runs the layer forward)."""
    w64 = w.detach().to(torch.float64).cpu()
    b64 = None if b is None else b.detach().to(torch.float64).cpu().reshape(-1)
    if inverted:
        return _finite(name, kind, row_norm(w64), 0.0 if b64 is None else _absmax(b64), "the weight")
    g = inverse_norm(w64)
    if not math.isfinite(g):
        return unbounded(name, kind, "the weight is singular: its inverse is unbounded")
    d = 0.0 if b64 is None else _absmax(torch.linalg.inv(w64) @ b64)
    cond = g * row_norm(w64)
    out = _finite(name, kind, g, d, "the inverse weight")
    if out.gain is not None and cond > 1e12:
        return unbounded(name, kind, f"the weight is near-singular (‖W⁻¹‖∞ = {g:.3g}, condition {cond:.3g})")
    return out


def _affine_probe(name: str, kind: str, fn, n: int, image: bool, like: Tensor) -> LayerBound:
    """Bound of a layer known to be affine in ``x`` from its own map: ``M = f(I) − f(0)``, ``b = f(0)``."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    zero = torch.zeros(1, n, dtype=like.dtype, device=like.device)
    if image:
        eye, zero = eye[:, :, None, None], zero[:, :, None, None]
    with torch.no_grad():
        b = fn(zero).reshape(1, n)
        m = (fn(eye).reshape(n, n) - b).t()  # column j: the image of e_j
    return _finite(name, kind, row_norm(m), _absmax(b), "the layer's operator")


# -- the generic rules -----------------------------------------------------------------------------


def module_bound(name: str, module: nn.Module, inverted: bool = False) -> LayerBound:
    """The bound of an unconditional layer recognised by type (module docstring); ``inverted``: the inverse
    pass runs the module's *forward* map (nflows' ``InverseTransform``). Unrecognised: ``gain=None``."""
    cls, mod = type(module).__name__, type(module).__module__
    lib = mod.split(".")[0]
    try:
        if lib == "flowaudit":
            return _bundled(name, module, cls)
        if lib == "FrEIA":
            return _freia(name, module, cls)
        if lib == "nflows":
            return _nflows(name, module, cls, inverted)
        if lib == "normflows":
            return _normflows(name, module, cls)
        if lib == "zuko":
            return _zuko(name, module)
    except (AttributeError, RuntimeError, ValueError, TypeError) as exc:  # parameters not where expected
        return unbounded(name, "unknown", f"{cls}: its parameters could not be read ({type(exc).__name__})")
    return unbounded(name, "unknown", f"{cls} is not a layer whose inverse flowaudit can bound")


def _bundled(name: str, m: nn.Module, cls: str) -> LayerBound:
    if cls == "ActNorm":  # x = y e^{-logs} - bias
        return _finite(name, "actnorm", _max(torch.exp(-m.logs.detach().double())), _absmax(m.bias), "the scale")
    if cls == "InvConv1x1":
        w = m.weight.detach()
        if m.fixed:  # inverted by its transpose
            return _finite(name, "1x1-conv", row_norm(w.t()), 0.0, "the weight")
        return _linear_inverse(name, "1x1-conv", w, None, False)
    if cls == "Squeeze":
        return exact(name, "squeeze")
    return unbounded(name, "unknown", f"{cls} is not a layer whose inverse flowaudit can bound")


_FREIA_EXACT = {
    "PermuteRandom": "permutation",
    "IRevNetDownsampling": "squeeze",
    "IRevNetUpsampling": "squeeze",
    "Flatten": "reshape",
    "Reshape": "reshape",
    "Split": "reshape",
    "Concat": "reshape",
}


def _freia(name: str, m: nn.Module, cls: str) -> LayerBound:
    if cls in _FREIA_EXACT:
        return exact(name, _FREIA_EXACT[cls])
    if cls == "ActNorm":  # rev: (y - bias) / e^{scale}
        inv = torch.exp(-m.scale.detach().double())
        return _finite(name, "actnorm", _max(inv), _absmax(m.bias.detach().double() * inv), "the scale")
    if cls == "Fixed1x1Conv":  # rev: conv2d with M_inv (out, in, 1, 1)
        return _finite(name, "1x1-conv", row_norm(m.M_inv.detach()[:, :, 0, 0]), 0.0, "the inverse weight")
    if cls == "FixedLinearTransform":  # rev: (y - b) M_inv (row vectors)
        w_inv = m.M_inv.detach().double().t()
        return _finite(name, "linear", row_norm(w_inv), _absmax(w_inv @ m.b.detach().double().reshape(-1)), "M⁻¹")
    if cls == "HaarDownsampling":  # rev: four coefficients summed with signs, each × fac_rev
        return _finite(name, "haar", 4.0 * abs(float(m.fac_rev)), 0.0, "the factor")
    if cls == "HaarUpsampling":
        return _finite(name, "haar", 4.0 * abs(float(m.fac_fwd)), 0.0, "the factor")
    return unbounded(name, "unknown", f"FrEIA {cls} is not a layer whose inverse flowaudit can bound")


def _nflows(name: str, m: nn.Module, cls: str, inverted: bool) -> LayerBound:
    from nflows.transforms.linear import Linear
    from nflows.transforms.normalization import ActNorm
    from nflows.transforms.permutations import Permutation
    from nflows.transforms.reshape import SqueezeTransform

    if isinstance(m, Permutation):
        return exact(name, "permutation")
    if isinstance(m, SqueezeTransform):
        return exact(name, "squeeze")
    if isinstance(m, ActNorm):  # forward y = s x + shift
        s, shift = m.scale.detach().double(), m.shift.detach().double()
        if inverted:
            return _finite(name, "actnorm", _max(s), _absmax(shift), "the scale")
        return _finite(name, "actnorm", _max(1 / s), _absmax(shift / s), "the scale")
    if isinstance(m, Linear):  # forward y = W x + b (LU, 1×1 convolution, naive, SVD, QR)
        kind = "1x1-conv" if cls == "OneByOneConvolution" else ("lu" if "LU" in cls else "linear")
        with torch.no_grad():
            w = m.weight()
        return _linear_inverse(name, kind, w, m.bias, inverted)
    return unbounded(name, "unknown", f"nflows {cls} is not a layer whose inverse flowaudit can bound")


def _normflows(name: str, m: nn.Module, cls: str) -> LayerBound:
    """normflows samples by each flow's ``forward``: that is the map bounded."""
    import normflows as nf

    like = next(iter(m.parameters()), None)
    like = like if like is not None else torch.zeros(())
    if isinstance(m, nf.flows.Permute):
        return exact(name, "permutation")
    if isinstance(m, nf.flows.AffineConstFlow):  # ActNorm included: z e^{s} + t
        s, t = m.s.detach().double(), m.t.detach().double()
        return _finite(name, "actnorm", _max(torch.exp(s)), _absmax(t), "the scale")
    if isinstance(m, nf.flows.Invertible1x1Conv):
        n = m.num_channels
        return _checked(_affine_probe(name, "1x1-conv", lambda x: m(x)[0], n, True, like))
    if isinstance(m, (nf.flows.InvertibleAffine, nf.flows.LULinearPermute)):
        n = m.num_channels if hasattr(m, "num_channels") else m.linear.bias.numel()
        kind = "lu" if isinstance(m, nf.flows.LULinearPermute) or getattr(m, "use_lu", False) else "linear"
        return _checked(_affine_probe(name, kind, lambda x: m(x)[0], n, False, like))
    return unbounded(name, "unknown", f"normflows {cls} is not a layer whose inverse flowaudit can bound")


def _checked(b: LayerBound) -> LayerBound:
    """A probed linear operator whose norm is astronomically large is called near-singular, not bounded."""
    if b.gain is not None and b.gain > 1e12:
        return unbounded(b.name, b.kind, f"near-singular: the inverse operator's ∞-norm is {b.gain:.3g}")
    return b


def _zuko(name: str, m: nn.Module) -> LayerBound:
    from zuko.lazy import UnconditionalTransform
    from zuko.transforms import PermutationTransform

    if isinstance(m, UnconditionalTransform):
        t = m()
        if isinstance(t, PermutationTransform):
            return exact(name, "permutation")
        return unbounded(name, "unknown", f"zuko {type(t).__name__} is not a layer whose inverse flowaudit can bound")
    return unbounded(name, "unknown", f"zuko {type(m).__name__} is not a layer whose inverse flowaudit can bound")


def gaussian_base(name: str, mean: Tensor | None, log_std: Tensor | None) -> LayerBound:
    """An unconditional normal base ``x = μ + σε`` (``None``: a standard normal, exact)."""
    if mean is None:
        return exact(name, "base")
    return _finite(name, "base", _max(torch.exp(log_std.detach().double())), _absmax(mean), "σ")


# -- the bundled flows -------------------------------------------------------------------------------


def _split_bound(name: str, split: nn.Module) -> LayerBound:
    r"""Split2d decoded: ``[z₁, μ(z₁) + σ(z₁)ε]`` with ``[μ, log σ] = conv(z₁)·e^{3ℓ}`` (cross layout).

    :math:`\|μ(z_1)\|_\infty \le A\|z_1\|_\infty + b` (``A`` the μ rows' absolute weight sums), and σ is
    bounded only when the log σ rows do not read :math:`z_1` (zero weights): then
    :math:`g = \max(1, A + \sigma_{\max})`, :math:`d = b`, with the drawn ε no larger than the running bound.
    """
    conv = split.conv
    factor = torch.exp(conv.logs.detach().double() * conv.logscale_factor).reshape(-1)
    w = conv.weight.detach().double() * factor[:, None, None, None]
    bias = conv.bias.detach().double() * factor
    w_mu, w_ls = w[0::2], w[1::2]
    if bool((w_ls != 0).any()):
        return unbounded(
            name, "split", "log σ is a linear function of the kept half: σ = e^{…} is not bounded by structure"
        )
    a = float(w_mu.abs().flatten(1).sum(1).max()) if w_mu.numel() else 0.0
    sigma = _max(torch.exp(bias[1::2]))
    return _finite(name, "split", max(1.0, a + sigma), _absmax(bias[0::2]), "the split's operator")


def reference_layers(model: nn.Module, site_names: dict[int, str]) -> list[LayerBound] | None:
    """The inverse pass of a bundled flow (toy, SR, low-light), in the order sampling runs it.

    ``site_names`` maps ``id(module)`` of each site (an ``Elementwise``) to its name. ``None`` for a model built
    on the reference base class with a body of its own: its layers are not known, so no certificate.
    """
    from ..reference_models.sr import CondCoupling, FlowStep, Split2d, Squeeze

    names = {id(m): n for n, m in model.named_modules()}

    def sites_of(block: nn.Module) -> list[str]:
        """The sites a coupling block runs, inverse order: coupling, noise coupling where active, injector."""
        if isinstance(block, CondCoupling):
            order = [block.coupling_site] + ([block.std_site] if block.std_active else []) + [block.injector_site]
        else:  # the toy's Coupling
            order = [block.site]
        return [site_names[id(s)] for s in order]

    out: list[LayerBound] = []
    known = hasattr(model, "flow") if model.task == "toy" else hasattr(model, "flowUpsamplerNet")
    if not known:
        return None
    if model.task == "toy":
        for i in reversed(range(len(model.flow))):
            step = model.flow[i]
            out.append(site_layer(names[id(step.coupling)], sites_of(step.coupling)))
            out.append(module_bound(names[id(step.invconv)], step.invconv))
            out.append(module_bound(names[id(step.actnorm)], step.actnorm))
        return out
    if getattr(model, "prior", None) is not None:  # LLFlow's conditional prior: z = μ(y) + ε
        p = names[id(model.prior)]
        out.append(
            LayerBound(p, "prior", None, None, "μ(y) is the encoder's colour map, not bounded by structure", (p,))
        )
    body = model.flowUpsamplerNet
    for layer in reversed(body.layers):
        n = names[id(layer)]
        if isinstance(layer, Split2d):
            b = _split_bound(n, layer)
            out.append(dataclasses.replace(b, sites=(names[id(layer.prior)],)))
        elif isinstance(layer, FlowStep):
            if layer.block_name:
                block = getattr(layer, layer.block_name)
                out.append(site_layer(names[id(block)], sites_of(block)))
            out.append(module_bound(names[id(layer.invconv)], layer.invconv))
            out.append(module_bound(names[id(layer.actnorm)], layer.actnorm))
        elif isinstance(layer, Squeeze):
            out.append(exact(n, "squeeze"))
        else:
            out.append(module_bound(n, layer))
    if getattr(model, "residual", False):
        out.append(
            unbounded("residual", "condition-add", "adds bicubic↑(y): bounded by the condition, not by structure")
        )
    return out
