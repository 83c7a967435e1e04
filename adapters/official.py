r"""Official SRFlow / NCSR / FS-NCSR / spline (robustNF) / LLFlow checkpoints, recognised by key layout.

A state dict written by the authors' code (``save_network``: a plain dict of CPU tensors; wrapped as
``{"state_dict": …}``, ``{"params": …}`` … or with DataParallel's ``module.`` prefixes) is matched
against the layouts below by its keys and shapes; the configuration is read off the weights
(:func:`infer`), the matching bundled architecture
(:class:`~flowaudit.reference_models.sr.SRFlow`, :class:`~flowaudit.reference_models.lowlight.LLFlow`,
which keep the official module names) is built with ``official_features=True`` and the official
weights are loaded into it. The result is a
:class:`~flowaudit.adapters.reference.ReferenceAdapter` of family ``official`` whose
:attr:`OfficialAdapter.inferred` says what was read off the weights and what was assumed.

========== ======================================================= ===============================
layout     recognised by                                           coupling kind
========== ======================================================= ===============================
srflow     ``RRDB.upconv1``, ``…affine.fAffine`` / ``fFeatures``   affine (×8 when ``RRDB.upconv3``)
ncsr       as srflow plus ``…affine.fAffine_std`` in every step     affine; FS-NCSR is a flag
spline     ``…rqspline.fRQspline`` / ``fFeatures`` / ``_std``       modified-rq-spline (Hong et al.)
llflow     ``RRDB.conv_second``, ``RRDB.fine_tune_color_map``       affine, conditional prior
========== ======================================================= ===============================

FS-NCSR's weights have exactly NCSR's keys (it models :math:`x - \mathrm{bicubic}{\uparrow}(y)` and
adds it back), so it cannot be detected: pass ``fs_ncsr=True``. Neither can the stacked trunk blocks
(only their number is in the weights: conditioning width / nf − 1), NCSR's ``S`` (how many last steps
of a level use the noise sub-net; the sub-net exists in every step) nor an affine ``eps`` other than
the default: the released configurations fill them in, options override them, and ``inferred``
marks them ``assumed``.

Latents: :meth:`OfficialAdapter.from_official_latents` takes the official ``epses`` (split latents
first, top latent last, heat already applied) and returns this adapter's latents. For SR they are the
same tensors; for LLFlow the official latent is :math:`z = \mu(y) + \tau\varepsilon` and ours is
:math:`\tau\varepsilon`.

Log-det convention: ``forward`` returns the log-Jacobian of :math:`x \mapsto` latents, where a split's
latent is the standardised :math:`\varepsilon = (z_2 - \mu)e^{-\log\sigma}` (its term is
:math:`-\sum\log\sigma`), so ``log_prob = Σ log N(latent; 0, I) + logdet``. The official
``FlowUpsamplerNet`` instead adds each split's *log-density* :math:`\log N(z_2; \mu, \sigma)` to its
logdet (``Split2d.get_logdet`` is ``GaussianDiag.logp``), and leaves the top latent's prior out
(LLFlow's conditional prior :math:`N(\mu(y), I)` has no Jacobian term, so the two agree there):
``official_logdet = logdet + Σ_splits log N(ε; 0, I)`` (:meth:`OfficialAdapter.official_logdet`);
without dequantisation noise (``add_gt_noise=False``), which would add :math:`-\log(\text{quant})` per pixel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..reference_models.couplings import Affine
from ..reference_models.glow import ActNorm
from ..reference_models.rrdb import spaced_blocks
from .reference import ReferenceAdapter

__all__ = ["LAYOUTS", "LayoutError", "unwrap", "infer", "recognise", "OfficialAdapter", "build", "matches", "make"]

LAYOUTS = ("srflow", "ncsr", "spline", "llflow")
_WRAPPERS = ("state_dict", "params_ema", "params", "model", "netG", "net_g", "network")
_UNUSED = ("flowUpsamplerNet.f.",)  # the official net builds this conv but never calls it

# Released configurations (confs/*.yml) for what the weights cannot say: stacked blocks, NCSR's S.
_BLOCKS = {  # (layout, scale, nb, number of stacked blocks) -> blocks
    ("srflow", 4, 23, 4): [1, 8, 15, 22],
    ("srflow", 8, 23, 4): [1, 3, 5, 7],
    ("srflow", 8, 8, 4): [1, 3, 5, 7],
    ("ncsr", 4, 23, 4): [1, 8, 15, 22],
    ("ncsr", 8, 23, 4): [1, 8, 15, 22],
    ("spline", 4, 23, 4): [1, 8, 15, 22],
    ("spline", 8, 23, 4): [1, 8, 15, 22],
    ("llflow", 1, 24, 4): [1, 3, 5, 7],
    ("llflow", 1, 4, 1): [1],
}
_STD_STEPS = {(4, 3, 16): [0, 16, 16], (8, 4, 20): [0, 0, 16, 16]}  # (scale, L, K) -> S


class LayoutError(ValueError):
    """The weights match no official layout; the message names the closest one and its first mismatches."""


def unwrap(obj: Any) -> dict[str, Tensor]:
    """The tensor state dict inside what the official code (or a wrapper around it) saved."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj, seen = inner, seen + 1
    if not isinstance(obj, Mapping):
        raise LayoutError(f"not a state dict (a {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if not state:
        raise LayoutError("no tensors in the checkpoint")
    return state


def _shape(state: dict, key: str) -> tuple[int, ...] | None:
    v = state.get(key)
    return tuple(v.shape) if v is not None else None


def _layer_kinds(state: dict) -> tuple[list[str], str | None]:
    """Kind of every ``flowUpsamplerNet.layers.{i}``: squeeze (no keys), transition, step, split."""
    idx: dict[int, set[str]] = {}
    for k in state:
        m = re.match(r"flowUpsamplerNet\.layers\.(\d+)\.(.+)$", k)
        if m:
            idx.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not idx:
        return [], None
    kinds, block = [], None
    for i in range(max(idx) + 1):
        keys = idx.get(i, set())
        blocks = {k.split(".")[0] for k in keys if k.split(".")[0] in ("affine", "rqspline")}
        if not keys:
            kinds.append("squeeze")
        elif blocks:
            kinds.append("step")
            block = block or blocks.pop()
        elif "actnorm.bias" in keys:
            kinds.append("transition")
        elif "conv.weight" in keys:
            kinds.append("split")
        else:
            kinds.append("?")
    return kinds, block


def _levels(kinds: list[str]) -> list[list[str]]:
    levels: list[list[str]] = []
    for k in kinds:
        if k == "squeeze":
            levels.append([])
        elif levels:
            levels[-1].append(k)
        else:
            raise LayoutError("flowUpsamplerNet.layers.0 has weights: the official flow starts with a squeeze")
    return levels


def infer(
    state: dict[str, Tensor],
    *,
    fs_ncsr: bool = False,
    stack_blocks: list[int] | None = None,
    std_steps: list[int] | None = None,
    affine_eps: float | None = None,
    scale: int | None = None,
) -> tuple[str, dict, dict]:
    """``(layout, constructor config, inferred)`` read off an official state dict's keys and shapes.

    ``inferred`` lists every value with where it came from (``weights``, ``released config``,
    ``option``, ``assumed``). Raises :class:`LayoutError` when a needed key is absent.
    """
    options_scale = scale

    def need(key: str) -> tuple[int, ...]:
        s = _shape(state, key)
        if s is None:
            raise LayoutError(f"missing key {key!r}")
        return s

    llflow = "RRDB.conv_second.weight" in state or "RRDB.fine_tune_color_map.0.weight" in state
    kinds, block = _layer_kinds(state)
    if block is None:
        raise LayoutError("no coupling step under flowUpsamplerNet.layers.{i}.affine / .rqspline")
    spline = block == "rqspline"
    sub = "fRQspline" if spline else "fAffine"
    first = kinds.index("step")
    pre = f"flowUpsamplerNet.layers.{first}.{block}"
    ncsr = f"{pre}.{sub}_std.0.weight" in state
    layout = "llflow" if llflow else "spline" if spline else "ncsr" if ncsr else "srflow"

    levels = _levels(kinds)
    L = len(levels)
    Ks = {lv.count("step") for lv in levels}
    ts = {lv.index("step") if "step" in lv else -1 for lv in levels}
    if len(Ks) != 1 or len(ts) != 1 or "?" in kinds:
        raise LayoutError(f"levels are not alike (steps per level {sorted(Ks)}, transitions {sorted(ts)})")
    K, n_transition = Ks.pop(), ts.pop()
    split_after = [i + 1 for i, lv in enumerate(levels) if lv and lv[-1] == "split"]
    nf = need("RRDB.conv_first.weight")[0]
    gc = need("RRDB.RRDB_trunk.0.RDB1.conv1.weight")[0]
    nb = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"RRDB\.RRDB_trunk\.(\d+)\.", k)))
    hidden = need(f"{pre}.{sub}.0.weight")[0]
    cond = need(f"{pre}.fFeatures.0.weight")[1]
    c_level1 = need(f"flowUpsamplerNet.layers.{first}.actnorm.bias")[1]
    in_channels = c_level1 // 4
    if cond % nf or cond < nf:
        raise LayoutError(f"conditioning width {cond} is not a multiple of the encoder width nf = {nf}")
    n_blocks = cond // nf - 1
    fixed = any(k.endswith("invconv.weight_transpose") for k in state)
    inferred: dict[str, Any] = {
        "layout": layout,
        "L": L,
        "K": K,
        "n_transition": n_transition,
        "nf": nf,
        "nb": nb,
        "gc": gc,
        "hidden_channels": hidden,
        "conditioning_channels": cond,
        "stacked_blocks": n_blocks,
        "fixed_invconv": fixed,
        "split_after_levels": split_after,
    }
    source = {k: "weights" for k in inferred}

    if llflow:
        if scale not in (None, 1):
            raise LayoutError(f"LLFlow works at scale 1, not {scale}")
        scale = 1
        if split_after:
            raise LayoutError(f"LLFlow has no splits, found splits after levels {split_after}")
    else:
        if "RRDB.upconv4.weight" in state:
            raise LayoutError("×16 SRFlow (RRDB.upconv4) is not supported")
        weights_scale = 8 if "RRDB.upconv3.weight" in state else 4  # ×2 nets have upconv1/2 too: an option
        if scale is not None and (scale == 8) != (weights_scale == 8):
            raise LayoutError(
                f"scale {scale} does not fit the weights (RRDB.upconv3 {'present' if weights_scale == 8 else 'absent'})"
            )
        scale = scale if scale is not None else weights_scale
        cs = L - 1 in split_after
        expected = [lv for lv in range(1, L + 1) if lv < L - (0 if cs else 1)]
        if split_after != expected:
            raise LayoutError(
                f"splits after levels {split_after}; SRFlow splits after {expected} (correct_splits={cs})"
            )
        inferred["correct_splits"], source["correct_splits"] = cs, "weights"
    inferred["scale"] = scale
    source["scale"] = "option" if options_scale is not None else "weights"

    key = (layout, scale, nb, n_blocks)
    if stack_blocks is not None:
        blocks, source["stack_blocks"] = list(stack_blocks), "option"
    elif key in _BLOCKS:
        blocks, source["stack_blocks"] = _BLOCKS[key], "released config"
    else:
        blocks = spaced_blocks(nb, n_blocks) if n_blocks > 1 else [min(1, nb - 1)] * n_blocks
        source["stack_blocks"] = "assumed (not stored in the weights)"
    if len(blocks) != n_blocks or any(not 0 <= b < nb for b in blocks):
        raise LayoutError(f"stack_blocks {blocks} do not fit {n_blocks} stacked blocks of a {nb}-block trunk")
    inferred["stack_blocks"] = blocks

    patch = 160 if 160 % (2**L) == 0 and 160 % max(scale, 1) == 0 else 2**L * max(scale, 1)
    common = dict(
        L=L,
        K=K,
        nf=nf,
        nb=nb,
        gc=gc,
        stack_blocks=blocks,
        hidden_channels=hidden,
        patch=patch,
        fixed_invconv=fixed,
        n_transition=n_transition,
        official_features=True,
    )
    if spline:
        common["coupling"] = "modified-rq-spline"
    elif affine_eps is not None and affine_eps != 1e-4:
        common["coupling"] = "affine-bounded" if affine_eps == 0.1 else "affine"
        inferred["affine_eps"], source["affine_eps"] = affine_eps, "option"
    if llflow:
        if fs_ncsr:
            raise LayoutError("fs_ncsr applies to NCSR weights, not LLFlow")
        config = dict(common)
    else:
        config = dict(common, scale=scale, correct_splits=inferred["correct_splits"], residual=fs_ncsr)
        inferred["fs_ncsr"], source["fs_ncsr"] = fs_ncsr, "option"
        if ncsr or spline:
            std_ch = need(f"{pre}.{sub}_std.0.weight")[1] - c_level1 // 2
            S = list(std_steps) if std_steps is not None else _STD_STEPS.get((scale, L, K), [0] + [K] * (L - 1))
            source["std_steps"] = (
                "option"
                if std_steps is not None
                else "released config"
                if (scale, L, K) in _STD_STEPS
                else "assumed (not stored in the weights)"
            )
            config.update(std_channels=std_ch, std_steps=S)
            inferred.update(std_channels=std_ch, std_steps=S)
            source["std_channels"] = "weights"
        elif fs_ncsr:
            raise LayoutError("fs_ncsr needs NCSR weights (fAffine_std), these are SRFlow's")
    if in_channels != 3:
        raise LayoutError(f"the flow's first level has {c_level1} channels, not 4 × 3")
    inferred["source"] = source
    return layout, config, inferred


def _build_model(layout: str, config: dict):
    if layout == "llflow":
        from ..reference_models.lowlight import LLFlow

        return LLFlow(**config)
    from ..reference_models.sr import SRFlow

    return SRFlow(**config)


def _to_ours(state: dict[str, Tensor], model) -> dict[str, Tensor]:
    """Official keys → the bundled architecture's: drop the unused ``flowUpsamplerNet.f``; a fixed
    1×1's ``weight`` (C, C, 1, 1) becomes 2-D and its ``weight_transpose`` is checked, then dropped."""
    out = {}
    for k, v in state.items():
        if k.startswith(_UNUSED):
            continue
        if k.endswith("invconv.weight_transpose"):
            w = state.get(k[: -len("_transpose")])
            if w is None or not torch.allclose(
                v.reshape(w.shape[0], -1).float(), w.reshape(w.shape[0], -1).t().float(), atol=1e-6
            ):
                raise LayoutError(f"{k} is not the transpose of its weight; the fixed 1×1 would not invert")
            continue
        if k.endswith("invconv.weight") and v.dim() == 4:
            v = v.reshape(v.shape[0], v.shape[1])
        out[k] = v
    return out


def _mismatches(state: dict[str, Tensor], model) -> list[str]:
    """Keys and shapes the official state dict gets wrong for ``model`` (our buffers excluded)."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(".initialized")}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    out = [f"missing {k} {s}" for k, s in ours.items() if k not in theirs]
    out += [f"unexpected {k} {s}" for k, s in theirs.items() if k not in ours]
    out += [
        f"shape of {k}: {theirs[k]} where {s} was expected" for k, s in ours.items() if k in theirs and theirs[k] != s
    ]
    return out


def _reference_keys(layout: str) -> set[str]:
    """The key *patterns* (layer indices and block numbers replaced by #) of a released-style layout."""
    config = dict(L=3, K=2, nf=4, nb=2, gc=2, stack_blocks=[0, 1], hidden_channels=4, patch=16, official_features=True)
    if layout == "llflow":
        model = _build_model(layout, config)
    else:
        extra = dict(scale=4)
        if layout in ("ncsr", "spline"):
            extra.update(std_channels=3)
        if layout == "spline":
            extra.update(coupling="modified-rq-spline", fixed_invconv=True)
        model = _build_model("srflow", dict(config, **extra))
    keys = {
        re.sub(r"\.\d+\.", ".#.", re.sub(r"\.\d+\.", ".#.", k))
        for k in model.state_dict()
        if not k.endswith(".initialized")
    }
    if layout == "spline":
        keys |= {k + "_transpose" for k in keys if k.endswith("invconv.weight")}
    return keys


def _closest(state: dict[str, Tensor]) -> str:
    pats = {re.sub(r"\.\d+\.", ".#.", re.sub(r"\.\d+\.", ".#.", k)) for k in state if not k.startswith(_UNUSED)}
    scores = []
    for layout in LAYOUTS:
        ref = _reference_keys(layout)
        scores.append((len(ref & pats) / max(1, len(ref | pats)), layout, sorted(ref - pats), sorted(pats - ref)))
    score, layout, missing, extra = max(scores)
    first = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in extra[:3]]
    return f"closest layout: {layout} ({100 * score:.0f}% of key patterns shared); first mismatching keys: " + (
        ", ".join(first) if first else "none"
    )


def recognise(obj: Any, **options) -> tuple[str, dict, dict, dict[str, Tensor]]:
    """``(layout, config, inferred, state)`` of an official checkpoint, or :class:`LayoutError`
    naming the closest layout and its first mismatching keys."""
    state = unwrap(obj)
    try:
        layout, config, inferred = infer(state, **options)
        model = _build_model(layout, config)
        bad = _mismatches(_to_ours(state, model), model)
    except LayoutError as exc:
        raise LayoutError(f"not an official SRFlow/NCSR/spline/LLFlow checkpoint: {exc}; {_closest(state)}") from None
    if bad:
        raise LayoutError(
            f"looks like {layout} {_brief(inferred)} but {len(bad)} key(s) do not fit; first: " + "; ".join(bad[:4])
        )
    return layout, config, inferred, state


def _brief(inferred: dict) -> str:
    keys = ("scale", "L", "K", "nf", "nb", "hidden_channels", "conditioning_channels")
    return "(" + ", ".join(f"{k}={inferred[k]}" for k in keys if k in inferred) + ")"


class OfficialAdapter(ReferenceAdapter):
    """A :class:`ReferenceAdapter` over official weights; ``inferred`` and ``layout`` say what it read."""

    family = "official"

    def __init__(self, model, name: str | None = None, layout: str = "srflow", inferred: dict | None = None):
        super().__init__(model, name)
        self.layout = layout
        self.inferred = dict(inferred or {})

    def describe(self) -> dict[str, Any]:
        return {"layout": self.layout, "inferred": self.inferred}

    def from_official_latents(self, y: Tensor, epses: list[Tensor]) -> list[Tensor]:
        """Official ``epses`` (split latents first, top latent last, heat applied) → this adapter's latents."""
        epses = list(epses)
        if self.layout == "llflow":
            _, mean = self.model.encode(y)
            return [epses[0] - mean]
        return epses

    def to_official_latents(self, y: Tensor, latents: list[Tensor]) -> list[Tensor]:
        """This adapter's latents → the official ``epses`` (inverse of :meth:`from_official_latents`)."""
        if self.layout == "llflow":
            _, mean = self.model.encode(y)
            return [latents[0] + mean]
        return list(latents)

    def official_logdet(self, latents: list[Tensor], logdet: Tensor) -> Tensor:
        """The official ``FlowUpsamplerNet`` logdet from ours: plus each split latent's log N(ε; 0, I)."""
        extra = logdet.new_zeros(logdet.shape)
        for eps in latents[:-1]:
            flat = eps.flatten(1)
            extra = extra - 0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
        return logdet + extra


def build(obj: Any, name: str | None = None, **options) -> OfficialAdapter:
    """Recognise an official checkpoint (a loaded object) and return its adapter, in eval mode."""
    layout, config, inferred, state = recognise(obj, **options)
    model = _build_model(layout, config)
    missing, unexpected = model.load_state_dict(_to_ours(state, model), strict=False)
    assert not unexpected and all(k.endswith(".initialized") for k in missing), (missing, unexpected)
    eps = inferred.get("affine_eps")
    for m in model.modules():
        if isinstance(m, ActNorm):  # loaded weights: never re-initialise from data (official behaviour)
            m.initialized.fill_(True)
        elif eps is not None and type(m) is Affine:  # CondAffineSeparatedAndCond.eps other than 1e-4 / 0.1
            m.eps = float(eps)
    model.name = name or f"official-{layout}"
    return OfficialAdapter(model.eval(), model.name, layout, inferred)


def matches(model: Any) -> bool:
    """A raw state dict (or a wrapper of one) with the official top-level module names."""
    if not isinstance(model, Mapping):
        return False
    try:
        keys = unwrap(model).keys()
    except LayoutError:
        return False
    return any(k.startswith("flowUpsamplerNet.layers.") for k in keys) and any(k.startswith("RRDB.") for k in keys)


def make(model: Any, name: str | None = None) -> OfficialAdapter:
    return build(model, name)
