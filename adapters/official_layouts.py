"""Key-layout inference for official SRFlow / NCSR / FS-NCSR / robust-spline / LLFlow state dicts.

:func:`infer` reads a flow's configuration off the keys and shapes of a state dict written by the
authors' code: first what all families share (levels, steps, widths), then one function per family
for what only it says. What the weights cannot say (stacked trunk blocks, NCSR's ``S``, an affine
``eps``) comes from the released configurations or options, and ``inferred["source"]`` says which.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..reference_models.rrdb import spaced_blocks

__all__ = ["LAYOUTS", "LayoutError", "unwrap", "infer"]

LAYOUTS = ("srflow", "ncsr", "spline", "llflow")
_WRAPPERS = ("state_dict", "params_ema", "params", "model", "netG", "net_g", "network")

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
_ASSUMED = "assumed (not stored in the weights)"


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


def _need(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise LayoutError(f"missing key {key!r}")
    return tuple(state[key].shape)


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


@dataclass
class _Flow:
    """What every family's weights say, and where the first coupling step's keys start."""

    inferred: dict[str, Any]
    source: dict[str, str]
    spline: bool  # robust-spline couplings (``rqspline``) rather than affine ones
    pre: str  # key prefix of the first step's coupling
    sub: str  # its conditioner's name: fAffine or fRQspline
    c_level1: int  # channels of the first level (4 × the image's)


def _read_flow(state: dict[str, Tensor]) -> _Flow:
    """Levels, steps, trunk and coupling widths: the part of the layout all families share."""
    kinds, block = _layer_kinds(state)
    if block is None:
        raise LayoutError("no coupling step under flowUpsamplerNet.layers.{i}.affine / .rqspline")
    spline = block == "rqspline"
    sub = "fRQspline" if spline else "fAffine"
    first = kinds.index("step")
    pre = f"flowUpsamplerNet.layers.{first}.{block}"
    llflow = "RRDB.conv_second.weight" in state or "RRDB.fine_tune_color_map.0.weight" in state
    ncsr = f"{pre}.{sub}_std.0.weight" in state
    levels = _levels(kinds)
    Ks = {lv.count("step") for lv in levels}
    ts = {lv.index("step") if "step" in lv else -1 for lv in levels}
    if len(Ks) != 1 or len(ts) != 1 or "?" in kinds:
        raise LayoutError(f"levels are not alike (steps per level {sorted(Ks)}, transitions {sorted(ts)})")
    nf = _need(state, "RRDB.conv_first.weight")[0]
    gc = _need(state, "RRDB.RRDB_trunk.0.RDB1.conv1.weight")[0]
    nb = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"RRDB\.RRDB_trunk\.(\d+)\.", k)))
    hidden = _need(state, f"{pre}.{sub}.0.weight")[0]
    cond = _need(state, f"{pre}.fFeatures.0.weight")[1]
    c_level1 = _need(state, f"flowUpsamplerNet.layers.{first}.actnorm.bias")[1]
    if cond % nf or cond < nf:
        raise LayoutError(f"conditioning width {cond} is not a multiple of the encoder width nf = {nf}")
    inferred: dict[str, Any] = {
        "layout": "llflow" if llflow else "spline" if spline else "ncsr" if ncsr else "srflow",
        "L": len(levels),
        "K": Ks.pop(),
        "n_transition": ts.pop(),
        "nf": nf,
        "nb": nb,
        "gc": gc,
        "hidden_channels": hidden,
        "conditioning_channels": cond,
        "stacked_blocks": cond // nf - 1,
        "fixed_invconv": any(k.endswith("invconv.weight_transpose") for k in state),
        "split_after_levels": [i + 1 for i, lv in enumerate(levels) if lv and lv[-1] == "split"],
    }
    return _Flow(inferred, {k: "weights" for k in inferred}, spline, pre, sub, c_level1)


def _llflow_scale(flow: _Flow, scale: int | None) -> int:
    """LLFlow works at scale 1, without splits."""
    if scale not in (None, 1):
        raise LayoutError(f"LLFlow works at scale 1, not {scale}")
    if flow.inferred["split_after_levels"]:
        raise LayoutError(f"LLFlow has no splits, found splits after levels {flow.inferred['split_after_levels']}")
    return 1


def _srflow_scale(state: dict[str, Tensor], flow: _Flow, scale: int | None) -> int:
    """SRFlow's scale (×8 when ``RRDB.upconv3`` exists; ×2 only as an option) and its split pattern."""
    if "RRDB.upconv4.weight" in state:
        raise LayoutError("×16 SRFlow (RRDB.upconv4) is not supported")
    weights_scale = 8 if "RRDB.upconv3.weight" in state else 4  # ×2 nets have upconv1/2 too: an option
    if scale is not None and (scale == 8) != (weights_scale == 8):
        upconv3 = "present" if weights_scale == 8 else "absent"
        raise LayoutError(f"scale {scale} does not fit the weights (RRDB.upconv3 {upconv3})")
    L, split_after = flow.inferred["L"], flow.inferred["split_after_levels"]
    cs = L - 1 in split_after
    expected = [lv for lv in range(1, L + 1) if lv < L - (0 if cs else 1)]
    if split_after != expected:
        raise LayoutError(f"splits after levels {split_after}; SRFlow splits after {expected} (correct_splits={cs})")
    flow.inferred["correct_splits"], flow.source["correct_splits"] = cs, "weights"
    return scale if scale is not None else weights_scale


def _stack_blocks(flow: _Flow, stack_blocks: list[int] | None) -> list[int]:
    """The trunk blocks whose features are stacked: an option, the released configuration or spaced evenly."""
    inf = flow.inferred
    nb, n_blocks = inf["nb"], inf["stacked_blocks"]
    key = (inf["layout"], inf["scale"], nb, n_blocks)
    if stack_blocks is not None:
        blocks, flow.source["stack_blocks"] = list(stack_blocks), "option"
    elif key in _BLOCKS:
        blocks, flow.source["stack_blocks"] = _BLOCKS[key], "released config"
    else:
        blocks = spaced_blocks(nb, n_blocks) if n_blocks > 1 else [min(1, nb - 1)] * n_blocks
        flow.source["stack_blocks"] = _ASSUMED
    if len(blocks) != n_blocks or any(not 0 <= b < nb for b in blocks):
        raise LayoutError(f"stack_blocks {blocks} do not fit {n_blocks} stacked blocks of a {nb}-block trunk")
    inf["stack_blocks"] = blocks
    return blocks


def _common_config(flow: _Flow, affine_eps: float | None) -> dict[str, Any]:
    """Constructor options every family takes, and the coupling kind (spline, or an affine ``eps`` option)."""
    inf = flow.inferred
    L, scale = inf["L"], max(inf["scale"], 1)
    patch = 160 if 160 % (2**L) == 0 and 160 % scale == 0 else 2**L * scale
    keys = ("L", "K", "nf", "nb", "gc", "stack_blocks", "hidden_channels")
    config: dict[str, Any] = {k: inf[k] for k in keys}
    config.update(patch=patch, fixed_invconv=inf["fixed_invconv"], n_transition=inf["n_transition"])
    config["official_features"] = True
    if flow.spline:
        config["coupling"] = "modified-rq-spline"
    elif affine_eps is not None and affine_eps != 1e-4:
        config["coupling"] = "affine-bounded" if affine_eps == 0.1 else "affine"
        inf["affine_eps"], flow.source["affine_eps"] = affine_eps, "option"
    return config


def _ncsr_noise(state: dict[str, Tensor], flow: _Flow, std_steps: list[int] | None) -> dict[str, Any]:
    """NCSR / spline: the noise sub-net's conditioning width (weights) and the steps that use it (``S``)."""
    inf, source = flow.inferred, flow.source
    std_ch = _need(state, f"{flow.pre}.{flow.sub}_std.0.weight")[1] - flow.c_level1 // 2
    released = (inf["scale"], inf["L"], inf["K"])
    if std_steps is not None:
        steps, source["std_steps"] = list(std_steps), "option"
    elif released in _STD_STEPS:
        steps, source["std_steps"] = _STD_STEPS[released], "released config"
    else:
        steps, source["std_steps"] = [0] + [inf["K"]] * (inf["L"] - 1), _ASSUMED
    inf.update(std_channels=std_ch, std_steps=steps)
    source["std_channels"] = "weights"
    return {"std_channels": std_ch, "std_steps": steps}


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
    flow = _read_flow(state)
    inf, layout = flow.inferred, flow.inferred["layout"]
    if layout == "llflow":
        inf["scale"] = _llflow_scale(flow, scale)
    else:
        inf["scale"] = _srflow_scale(state, flow, scale)
    flow.source["scale"] = "option" if scale is not None else "weights"
    _stack_blocks(flow, stack_blocks)
    config = _common_config(flow, affine_eps)
    if layout == "llflow":
        if fs_ncsr:
            raise LayoutError("fs_ncsr applies to NCSR weights, not LLFlow")
    else:
        config.update(scale=inf["scale"], correct_splits=inf["correct_splits"], residual=fs_ncsr)
        inf["fs_ncsr"], flow.source["fs_ncsr"] = fs_ncsr, "option"
        if layout in ("ncsr", "spline"):
            config.update(_ncsr_noise(state, flow, std_steps))
        elif fs_ncsr:
            raise LayoutError("fs_ncsr needs NCSR weights (fAffine_std), these are SRFlow's")
    if flow.c_level1 // 4 != 3:
        raise LayoutError(f"the flow's first level has {flow.c_level1} channels, not 4 × 3")
    inf["source"] = flow.source
    return layout, config, inf
