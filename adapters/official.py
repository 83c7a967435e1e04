r"""Official SRFlow / NCSR / FS-NCSR / spline (robustNF) / LLFlow checkpoints, recognised by key layout.

A state dict written by the authors' code (plain, wrapped as ``{"state_dict": …}`` and the like, or
with DataParallel's ``module.`` prefixes) is matched by its keys and shapes; the configuration is read
off the weights (:func:`~.official_layouts.infer`), the bundled architecture that keeps the official
module names is built with ``official_features=True`` and the weights are loaded into it. The result is
an :class:`OfficialAdapter`, whose ``inferred`` says what was read and what was assumed.

========== ======================================================= ===============================
layout     recognised by                                           coupling kind
========== ======================================================= ===============================
srflow     ``RRDB.upconv1``, ``…affine.fAffine`` / ``fFeatures``   affine (×8 when ``RRDB.upconv3``)
ncsr       as srflow plus ``…affine.fAffine_std`` in every step     affine; FS-NCSR is a flag
spline     ``…rqspline.fRQspline`` / ``fFeatures`` / ``_std``       modified-rq-spline (Hong et al.)
llflow     ``RRDB.conv_second``, ``RRDB.fine_tune_color_map``       affine, conditional prior
========== ======================================================= ===============================

FS-NCSR's weights have exactly NCSR's keys (it models :math:`x - \mathrm{bicubic}{\uparrow}(y)`), so
pass ``fs_ncsr=True``.

Latents: the official ``epses`` (split latents first, top latent last, heat applied) are this
adapter's latents for SR; for LLFlow the official latent is :math:`z = \mu(y) + \tau\varepsilon` and
ours is :math:`\tau\varepsilon`. Log-det: ours standardises each split's latent (its term is
:math:`-\sum\log\sigma`, so ``log_prob = Σ log N(latent; 0, I) + logdet``); the official
``FlowUpsamplerNet`` adds each split's log-density instead:
``official_logdet = logdet + Σ_splits log N(ε; 0, I)`` (without dequantisation noise).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..reference_models.couplings import Affine
from ..reference_models.glow import ActNorm
from . import official_options as oo
from .official_layouts import LAYOUTS, LayoutError, infer, unwrap
from .official_options import Provenance
from .reference import ReferenceAdapter

__all__ = [
    "LAYOUTS",
    "LayoutError",
    "unwrap",
    "infer",
    "recognise",
    "configure",
    "OfficialAdapter",
    "build",
    "matches",
    "make",
]

_UNUSED = ("flowUpsamplerNet.f.",)  # the official net builds this conv but never calls it


def _build_model(layout: str, config: dict):
    """The bundled architecture for ``layout`` on the ``meta`` device: shapes only, no random initialisation
    of weights the checkpoint is about to replace (seconds and a copy of every weight on a released model)."""
    with torch.device("meta"):
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
        out[k] = v.float() if v.is_floating_point() else v  # the bundled networks run in float32
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
        self.configuration: dict[str, dict] = {}  # name -> {value, source, key}: weights, option file, flag, default
        self.warnings: list[str] = []  # values defaulted because another reading would not change the outputs

    def warning_line(self) -> str | None:
        """One line naming every defaulted value (``None`` when nothing was defaulted)."""
        return oo.warning_line(self.warnings)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layout": self.layout, "inferred": self.inferred, "configuration": self.configuration}
        if self.warnings:
            out["configuration_warning"] = self.warning_line()
        return out

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


def configure(
    state: dict[str, Tensor], official_config: str | Path | None = None, **flags
) -> tuple[str, dict[str, Provenance], list[str]]:
    """``(layout, {name: Provenance}, warnings)``: the weights read first, then the option file and flags.

    Raises :class:`LayoutError` for weights of no official layout and
    :class:`~flowaudit.adapters.checkpoint.ModelError` (naming the option key or flag) for a file or flag
    that contradicts the weights, or a value that changes the outputs and that none of them gives.
    """
    try:
        layout, _, read = infer(state)
    except LayoutError as exc:
        raise LayoutError(f"not an official SRFlow/NCSR/spline/LLFlow checkpoint: {exc}; {_closest(state)}") from None
    weights = {k: v for k, v in read.items() if read["source"].get(k) == "weights"}
    said = oo.option_values(oo.read_option_file(official_config)) if official_config is not None else None
    resolved, warnings = oo.resolve(layout, weights, options=said, flags=flags)
    return layout, resolved, warnings


def build(obj: Any, name: str | None = None, *, official_config: str | Path | None = None, **flags) -> OfficialAdapter:
    """Recognise an official checkpoint (a loaded object) and return its adapter, in eval mode.

    ``official_config`` is the official repository's YAML option file the checkpoint was trained with;
    ``flags`` (``stack_blocks``, ``std_steps``, ``fs_ncsr``, ``affine_eps``, ``scale``) say what the weights
    cannot. A value whose other readings change the outputs must come from one of them
    (:func:`~.official_options.resolve`); harmless defaults are listed in ``adapter.warnings``.
    """
    state = unwrap(obj)
    _, resolved, warnings = configure(state, official_config, **flags)
    layout, config, inferred, state = recognise(state, **oo.infer_options(resolved))
    for key, p in resolved.items():
        inferred[key] = p.value
    inferred["source"] = {**inferred["source"], **{k: p.source for k, p in resolved.items()}}
    model = _build_model(layout, config)
    # the checkpoint's tensors become the weights (no copy); what it lacks is ActNorm's flag
    missing, unexpected = model.load_state_dict(_to_ours(state, model), strict=False, assign=True)
    assert not unexpected and all(k.endswith(".initialized") for k in missing), (missing, unexpected)
    eps = inferred.get("affine_eps")
    for m in model.modules():
        if isinstance(m, ActNorm):  # loaded weights: never re-initialise from data (official behaviour)
            m.initialized = torch.tensor(True)
        elif eps is not None and type(m) is Affine:  # CondAffineSeparatedAndCond.eps other than 1e-4 / 0.1
            m.eps = float(eps)
    model.name = name or f"official-{layout}"
    adapter = OfficialAdapter(model.eval(), model.name, layout, inferred)
    adapter.configuration = {k: p.as_dict() for k, p in resolved.items()}
    adapter.warnings = list(warnings)
    return adapter


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
