r"""Official option files: the YAML each official repository ships beside its checkpoints, read as its code reads it.

SRFlow (``code/confs/SRFlow_*.yml``), NCSR / FS-NCSR / the robust spline (``confs/{4X,8X}.yml``, or the
``config.yml`` a training run writes) and LLFlow (``code/confs/LOL*.yml``) describe the network in
``network_G`` (``which_model_G``, ``nf``, ``nb``, ``flow: {K, L, S, coupling, stackRRDB, split, …}``) and
a few top-level keys (``scale``, ``divide_freq``, LLFlow's ``concat_histeq`` …). The official code reads
them into a dict whose absent keys are ``None``, so an absent key means the official code's own default;
:func:`option_values` returns what a file says under the names :func:`flowaudit.adapters.official.infer`
uses, each with its :class:`Provenance`.

:func:`resolve` merges the three sources of a configuration value, weights first:

- a value the weights settle is taken from them; a file or flag that says otherwise is refused
  (:class:`~flowaudit.adapters.checkpoint.ModelError` naming the option key or flag);
- a value they do not settle comes from a flag or the file (both: they must agree);
- otherwise, per family (:data:`RULES`): a value whose other readings change the outputs is refused,
  naming the flag and the option key; a harmless one takes the official default and is listed in one
  warning line (:func:`warning_line`).

=============== ================================= ================ =========================== ===============
value           option key                        flag             families                    if not given
=============== ================================= ================ =========================== ===============
stack_blocks    network_G.flow.stackRRDB.blocks   --stack-blocks   all                         refused
std_steps       network_G.flow.S                  --std-steps      ncsr, fs-ncsr, spline       refused
fs_ncsr         divide_freq                       --fs-ncsr        ncsr, fs-ncsr, spline       refused
scale           scale                             --scale          srflow, ncsr, fs-ncsr, spl. 4, warned
affine_eps      …CondAffineSeparatedAndCond.eps   --affine-eps     srflow, ncsr, fs-ncsr, llf. 1e-4, warned
spline_bounds   …CondRQsplineSeparatedAndCond     (none)           spline                      ±0.5, warned
=============== ================================= ================ =========================== ===============

LLFlow's input-pipeline keys (``concat_histeq``, ``to_yuv``, ``avg_color_map`` …) must hold the values of the
released LOL configurations, which the bundled LLFlow reproduces; another value is refused naming the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import ModelError

__all__ = [
    "SOURCES",
    "FAMILIES",
    "Provenance",
    "Rule",
    "RULES",
    "read_option_file",
    "family",
    "option_values",
    "resolve",
    "warning_line",
    "infer_options",
]

SOURCES = ("weights", "option file", "flag", "default")
FAMILIES = ("srflow", "ncsr", "fs-ncsr", "spline", "llflow")
_LAYOUT = {"srflow": "srflow", "ncsr": "ncsr", "fs-ncsr": "ncsr", "spline": "spline", "llflow": "llflow"}
_MODELS = {"SRFlowNet": "srflow", "NCSRNet": "ncsr", "LLFlow": "llflow"}
_COUPLINGS = {"CondAffineSeparatedAndCond": "affine", "CondRQsplineSeparatedAndCond": "spline"}
_MAX_BYTES = 1 << 20
_SPLINE_BOUNDS = (-0.5, 0.5)  # CondRQsplineSeparatedAndCond's defaults (left/bottom, right/top)


@dataclass(frozen=True)
class Provenance:
    """One configuration value and where it came from: ``source`` in :data:`SOURCES`, ``key`` the
    option key (dotted), flag or weights key that gave it. ``stated`` is false for an option key the
    file leaves out, whose value is then the official code's default for it."""

    value: Any
    source: str
    key: str
    stated: bool = True

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source {self.source!r} is not one of {', '.join(SOURCES)}")

    def as_dict(self) -> dict[str, Any]:
        out = {"value": self.value, "source": self.source, "key": self.key}
        if not self.stated:
            out["stated"] = False
        return out

    def __str__(self) -> str:
        where = self.key if self.stated else f"{self.key} absent"
        return f"{_show(self.value)} ({self.source}: {where})"


@dataclass(frozen=True)
class Rule:
    """A value the weights cannot settle: its option key, flag, the families it applies to, whether
    another reading changes the outputs (then it must be given) and otherwise the default used."""

    name: str
    key: str
    flag: str | None
    families: tuple[str, ...]
    changes_outputs: bool
    default: Any = None


_SR = ("srflow", "ncsr", "fs-ncsr", "spline")
_NOISE = ("ncsr", "fs-ncsr", "spline")
_AFFINE = ("srflow", "ncsr", "fs-ncsr", "llflow")
RULES: tuple[Rule, ...] = (
    # only the number of stacked trunk blocks is in the weights (conditioning width / nf − 1), not which
    Rule("stack_blocks", "network_G.flow.stackRRDB.blocks", "--stack-blocks", FAMILIES, True),
    # NCSR's noise sub-net exists in every step; S says in how many of a level's last steps it is used
    Rule("std_steps", "network_G.flow.S", "--std-steps", _NOISE, True),
    # FS-NCSR models HR − bicubic↑(LR): identical keys to NCSR's
    Rule("fs_ncsr", "divide_freq", "--fs-ncsr", _NOISE, True),
    # ×2 and ×4 nets have the same keys; a wrong scale cannot pass silently (the data's shapes do not fit)
    Rule("scale", "scale", "--scale", _SR, False, 4),
    Rule("affine_eps", "network_G.flow.CondAffineSeparatedAndCond.eps", "--affine-eps", _AFFINE, False, 1e-4),
    Rule("spline_bounds", "network_G.flow.CondRQsplineSeparatedAndCond", None, ("spline",), False, [-0.5, 0.5]),
)
_RULE = {r.name: r for r in RULES}

# The weights' keys (``#`` any index) each value read off a state dict comes from, for provenance.
_LAYERS = "flowUpsamplerNet.layers.#"
_WEIGHTS_KEYS = {
    "layout": "keys (fAffine_std, fRQspline, RRDB.conv_second)",
    "L": f"{_LAYERS} (squeezes: gaps in the indices)",
    "K": f"{_LAYERS}.affine / .rqspline (steps per level)",
    "n_transition": f"{_LAYERS}.actnorm without a coupling",
    "nf": "RRDB.conv_first.weight",
    "nb": "RRDB.RRDB_trunk.#",
    "gc": "RRDB.RRDB_trunk.0.RDB1.conv1.weight",
    "hidden_channels": f"{_LAYERS}.*.fAffine.0.weight / fRQspline.0.weight",
    "conditioning_channels": f"{_LAYERS}.*.fFeatures.0.weight",
    "stacked_blocks": "conditioning width / nf − 1",
    "fixed_invconv": f"{_LAYERS}.invconv.weight_transpose",
    "split_after_levels": f"{_LAYERS}.conv (split priors)",
    "correct_splits": f"{_LAYERS}.conv (split priors)",
    "scale": "RRDB.upconv3 (×8), RRDB.conv_second (LLFlow, ×1)",
    "std_channels": f"{_LAYERS}.*.fAffine_std.0.weight / fRQspline_std.0.weight",
}

# What the bundled LLFlow reproduces: the released LOL configurations' input pipeline and prior.
# Each released option file states these values; another value builds a network flowaudit does not model.
_LLFLOW_SUPPORTED = {
    "cond_encoder": "ConEncoder1",
    "concat_histeq": True,
    "histeq_as_input": False,
    "concat_color_map": False,
    "gray_map": False,
    "to_yuv": False,
    "encode_color_map": False,
    "le_curve": False,
    "avg_color_map": False,
}


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def read_option_file(path: str | Path) -> dict[str, Any]:
    """The mapping in an official YAML option file, or one :class:`ModelError` line saying why not."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > _MAX_BYTES:  # the released files are about 3 kB; a large one is not an option file
            raise ModelError(f"--official-config {path}: {size:,} bytes; an option file is at most {_MAX_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"--official-config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"--official-config {path}: cannot read it ({type(exc).__name__})") from None
    try:
        opt = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ModelError(f"--official-config {path}: not valid YAML{at}") from None
    if not isinstance(opt, dict):
        raise ModelError(f"--official-config {path}: holds a {type(opt).__name__}, not a mapping of options")
    net = opt.get("network_G")
    if not isinstance(net, dict) or not isinstance(net.get("flow"), dict):
        raise ModelError(
            f"--official-config {path}: no network_G.flow section; expected an official SRFlow / NCSR / FS-NCSR / "
            "spline / LLFlow option file"
        )
    return opt


def _get(opt: Mapping, key: str) -> Any:
    node: Any = opt
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def family(opt: Mapping) -> str:
    """The family an option file describes (one of :data:`FAMILIES`), from ``network_G.which_model_G``,
    ``network_G.flow.coupling`` and ``divide_freq``; :class:`ModelError` naming the key otherwise."""
    model = _get(opt, "network_G.which_model_G")
    if not isinstance(model, str) or model not in _MODELS:  # a list or a mapping is no name
        raise ModelError(f"option file: network_G.which_model_G is {model!r}; expected one of {', '.join(_MODELS)}")
    coupling = _get(opt, "network_G.flow.coupling")
    if not isinstance(coupling, str) or coupling not in _COUPLINGS:
        raise ModelError(
            f"option file: network_G.flow.coupling is {coupling!r}; expected one of {', '.join(_COUPLINGS)}"
        )
    base = _MODELS[model]
    if _COUPLINGS[coupling] == "spline":
        if base != "ncsr":
            raise ModelError(f"option file: {coupling} goes with NCSRNet (robustNF), not {model}")
        return "spline"
    if base == "ncsr" and bool(_get(opt, "divide_freq")):
        return "fs-ncsr"
    return base


def _bool(opt: Mapping, key: str, where: str) -> bool:
    v = _get(opt, key)
    if v is not None and not isinstance(v, bool):
        raise ModelError(f"{where}: {key} is {v!r}, not true or false")
    return bool(v)


def _stated_bool(opt: Mapping, key: str, where: str) -> bool | None:
    """The boolean at ``key``, or ``None`` when the file leaves it out (so that a default can be reported)."""
    return _bool(opt, key, where) if _get(opt, key) is not None else None


def _checked_int(v: Any, key: str, where: str, lo: int) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ModelError(f"{where}: {key} is {v!r}, not an integer ≥ {lo}")
    return v


def _int(opt: Mapping, key: str, where: str, lo: int = 0) -> int | None:
    return _checked_int(_get(opt, key), key, where, lo)


def _ints(opt: Mapping, key: str, where: str) -> list[int] | None:
    v = _get(opt, key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in v):
        raise ModelError(f"{where}: {key} is {v!r}, not a list of integers ≥ 0")
    return list(v)


def _steps_per_level(opt: Mapping, key: str, where: str, levels: Provenance | None) -> int | None:
    """``K``, which the official FlowUpsamplerNet may also take as a list indexed by level (1-based);
    flowaudit models the same K on every level, so such a list must repeat one value."""
    K = _get(opt, key)
    if isinstance(K, list):
        if levels is None or len(K) < levels.value + 1 or len(set(K[1 : levels.value + 1])) != 1:
            raise ModelError(f"{where}: {key} is {K!r}; flowaudit models the same K on every level")
        K = K[1]
    return _checked_int(K, key, where, 1)


def _put(out: dict[str, Provenance], name: str, key: str, value: Any, default: Any = None) -> None:
    """Record ``value`` as stated by the file, or the official ``default`` (not stated) when it is absent."""
    if value is not None:
        out[name] = Provenance(value, "option file", key)
    elif default is not None:
        out[name] = Provenance(default, "option file", key, stated=False)


Reader = Callable[[Mapping, str, str, dict[str, Provenance]], None]

# The integer sizes in the order they are reported: (name, option key, least value, official default).
_SIZES: tuple[tuple[str, str, int, int | None], ...] = (
    ("in_nc", "network_G.in_nc", 1, None),
    ("out_nc", "network_G.out_nc", 1, None),
    ("nf", "network_G.nf", 1, None),
    ("nb", "network_G.nb", 1, None),
    ("gc", "network_G.gc", 1, None),
    ("L", "network_G.flow.L", 1, None),
    ("K", "network_G.flow.K", 1, None),
    ("n_transition", "network_G.flow.additionalFlowNoAffine", 0, 0),
    ("hidden_channels", "network_G.flow.CondAffineSeparatedAndCond.hidden_channels", 1, 64),
)


def _read_identity(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """Which network the file describes: family, model class, coupling and the key layout it implies."""
    model, coupling = "network_G.which_model_G", "network_G.flow.coupling"
    out["family"] = Provenance(fam, "option file", model)
    out["model"] = Provenance(_get(opt, model), "option file", model)
    out["coupling"] = Provenance(_get(opt, coupling), "option file", coupling)
    out["layout"] = Provenance(_LAYOUT[fam], "option file", model)


def _read_sizes(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """The integer sizes of :data:`_SIZES`; ``K`` is read against the ``L`` read before it."""
    for name, key, lo, default in _SIZES:
        value = _steps_per_level(opt, key, where, out.get("L")) if name == "K" else _int(opt, key, where, lo)
        _put(out, name, key, value, default)


def _read_stack(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """Which trunk blocks feed the conditioning; flowaudit models them concatenated, as the releases do."""
    key = "network_G.flow.stackRRDB.blocks"
    blocks = _ints(opt, key, where)
    _put(out, "stack_blocks", key, blocks, [])
    if blocks and not _bool(opt, "network_G.flow.stackRRDB.concat", where):
        raise ModelError(f"{where}: network_G.flow.stackRRDB.concat is not true; flowaudit models concatenated blocks")


def _read_split(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """Whether levels split off half their channels, and with a split, whether ``correct_splits`` is on."""
    key = "network_G.flow.split.enable"
    split = _bool(opt, key, where)
    out["split"] = Provenance(split, "option file", key, _get(opt, key) is not None)
    if split:
        key = "network_G.flow.split.correct_splits"
        _put(out, "correct_splits", key, _stated_bool(opt, key, where), False)


def _read_permutation(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """``permutation_train: false`` (the paper's spline recipe) keeps the random orthogonal 1×1s fixed."""
    key = "network_G.flow.permutation_train"
    perm = _stated_bool(opt, key, where)
    out["fixed_invconv"] = Provenance(perm is False, "option file", key, perm is not None)


def _read_scale(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """The scale from ``scale`` or ``network_G.upscale`` (which must agree); LLFlow's absent scale is 1."""
    scale = _int(opt, "scale", where, 1)
    upscale = _int(opt, "network_G.upscale", where, 1)
    if scale is not None and upscale is not None and scale != upscale:
        raise ModelError(f"{where}: scale is {scale} but network_G.upscale is {upscale}")
    if fam == "llflow":
        _put(out, "scale", "scale", scale, 1)
    elif scale is not None:
        _put(out, "scale", "scale", scale)
    elif upscale is not None:
        _put(out, "scale", "network_G.upscale", upscale)


def _read_noise(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """NCSR's noise sub-net: the steps ``S`` that use it, its width, and FS-NCSR's ``divide_freq``."""
    _put(out, "std_steps", "network_G.flow.S", _ints(opt, "network_G.flow.S", where))
    _put(out, "std_channels", "network_G.flow.std_channels", _int(opt, "network_G.flow.std_channels", where, 1))
    _put(out, "fs_ncsr", "divide_freq", _stated_bool(opt, "divide_freq", where), False)


def _read_affine_eps(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """The affine coupling's scale floor ``eps`` (a number > 0; official default 1e-4)."""
    key = "network_G.flow.CondAffineSeparatedAndCond.eps"
    eps = _get(opt, key)
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
        raise ModelError(f"{where}: {key} is {eps!r}, not a number > 0")
    _put(out, "affine_eps", key, None if eps is None else float(eps), 1e-4)


def _read_spline_bounds(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """The spline's interval. The official code reads left, righ (sic), bottom, top, with defaults
    −0.5, 0.5, −0.5, 0.5; flowaudit's modified RQ-spline maps one interval onto itself."""
    sub = "network_G.flow.CondRQsplineSeparatedAndCond"
    vals = [_get(opt, f"{sub}.{k}") for k in ("left", "righ", "bottom", "top")]
    stated = any(v is not None for v in vals)
    lo_x, hi_x, lo_y, hi_y = (v if v is not None else d for v, d in zip(vals, (*_SPLINE_BOUNDS, *_SPLINE_BOUNDS)))
    if (lo_x, hi_x) != (lo_y, hi_y):
        raise ModelError(
            f"{where}: {sub} gives the interval [{lo_x}, {hi_x}] for x and [{lo_y}, {hi_y}] for y; "
            "flowaudit's modified RQ-spline maps one interval onto itself"
        )
    out["spline_bounds"] = Provenance([float(lo_x), float(hi_x)], "option file", sub, stated)


def _read_llflow_pipeline(opt: Mapping, fam: str, where: str, out: dict[str, Provenance]) -> None:
    """LLFlow's input-pipeline keys, each of which must hold the released value (:data:`_LLFLOW_SUPPORTED`)."""
    for key, supported in _LLFLOW_SUPPORTED.items():
        value = _get(opt, key)
        stated = value is not None
        value = value if stated else (None if isinstance(supported, str) else False)
        if value != supported:
            raise ModelError(
                f"{where}: {key} is {_show(value)}{'' if stated else ' (absent)'}; flowaudit reproduces LLFlow "
                f"with {key}: {_show(supported).lower() if isinstance(supported, bool) else supported} "
                "(the released LOL configurations)"
            )
        out[key] = Provenance(value, "option file", key, stated)


# Each reader adds its names in report order; a reader runs for the families listed beside it.
_READERS: tuple[tuple[tuple[str, ...], Reader], ...] = (
    (FAMILIES, _read_identity),
    (FAMILIES, _read_sizes),
    (FAMILIES, _read_stack),
    (FAMILIES, _read_split),
    (FAMILIES, _read_permutation),
    (FAMILIES, _read_scale),
    (_NOISE, _read_noise),
    (_AFFINE, _read_affine_eps),
    (("spline",), _read_spline_bounds),
    (("llflow",), _read_llflow_pipeline),
)


def option_values(opt: Mapping, where: str = "option file") -> dict[str, Provenance]:
    """What an option file says about the network, as ``{name: Provenance}`` with source ``option file``.

    Names follow :func:`flowaudit.adapters.official.infer` (``L``, ``K``, ``nf``, ``stack_blocks``,
    ``std_steps`` …). A key the official code reads with a default (``additionalFlowNoAffine``,
    ``split.correct_splits``, ``CondAffineSeparatedAndCond.hidden_channels`` …) is reported with that
    default and ``stated=False`` when the file leaves it out. ``where`` prefixes error messages.
    """
    fam = family(opt)
    out: dict[str, Provenance] = {}
    for families, read in _READERS:
        if fam in families:
            read(opt, fam, where, out)
    return out


def _check(ok: bool, said: Provenance, weights: str) -> None:
    """Refuse, naming the option key or flag, when ``said`` does not fit what the weights have."""
    if ok:
        return
    if said.source == "flag":
        what = f"{said.key} {_show(said.value)}"
    elif said.stated:
        what = f"option file: {said.key} is {_show(said.value)}"
    else:
        what = f"option file: {said.key} is absent (the official code then uses {_show(said.value)})"
    raise ModelError(f"{what}, but the weights have {weights}")


def _checks_against_weights(layout: str, said: Mapping[str, Provenance], w: Mapping[str, Any]) -> None:
    """Every value the weights settle must agree with what the file (or a flag) says about it."""
    if "layout" in said and said["layout"].value != layout:
        spline = "spline" in (layout, said["layout"].value)
        p = said.get("coupling" if spline else "model", said["layout"])
        hint = ""
        if layout == "spline" and said["layout"].value == "ncsr":  # robustNF's confs/*.yml; runs override it
            hint = (
                " (robustNF's example run overrides network_G.flow.coupling=CondRQsplineSeparatedAndCond: "
                "give the config.yml that run wrote)"
            )
        _check(False, p, f"the {layout} layout{hint}")
    for name in ("L", "K", "nf", "nb", "gc", "hidden_channels", "n_transition", "std_channels", "fixed_invconv"):
        if name in said and name in w:
            _check(said[name].value == w[name], said[name], f"{name} = {_show(w[name])}")
    for name in ("in_nc", "out_nc"):
        if name in said:
            _check(said[name].value == 3, said[name], "3 image channels")
    if "split" in said and "split_after_levels" in w:
        has = bool(w["split_after_levels"])
        _check(said["split"].value == has, said["split"], "splits" if has else "no split")
    if "correct_splits" in said and "correct_splits" in w:
        _check(
            said["correct_splits"].value == w["correct_splits"],
            said["correct_splits"],
            f"correct_splits = {w['correct_splits']} (splits after levels {w.get('split_after_levels')})",
        )
    if "scale" in said and "scale" in w:
        got, have = said["scale"].value, w["scale"]
        fits = got == have if have in (1, 8) else got in (2, 4)  # ×2 and ×4 nets have the same keys
        _check(fits, said["scale"], f"scale {have}" if have in (1, 8) else "a ×2 or ×4 encoder")
    if "stack_blocks" in said and "stacked_blocks" in w:
        blocks, n, nb = said["stack_blocks"].value, w["stacked_blocks"], w.get("nb")
        _check(
            len(blocks) == n,
            said["stack_blocks"],
            f"{n} stacked block(s) (conditioning width {w.get('conditioning_channels')} = nf × {n + 1})",
        )
        if nb is not None:
            _check(all(b < nb for b in blocks), said["stack_blocks"], f"a trunk of nb = {nb} blocks")
    if "std_steps" in said and "L" in w:
        # the official code reads S[l - 1] for levels l = 1 … L and uses the noise in step k of K where
        # S[l - 1] ≥ K − k: any entry is a count (S ≥ K every step, as the released S = 16 on a smaller K),
        # but a level without one fails there
        _check(len(said["std_steps"].value) >= w["L"], said["std_steps"], f"L = {w['L']} levels, one entry each")


def resolve(
    layout: str,
    weights: Mapping[str, Any],
    *,
    options: Mapping[str, Provenance] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Provenance], list[str]]:
    """``({name: Provenance}, warnings)`` for an official checkpoint of ``layout`` whose weights gave ``weights``.

    ``weights`` holds what :func:`flowaudit.adapters.official.infer` reads off the state dict (``L``, ``K``,
    ``nf``, ``nb``, ``stacked_blocks``, ``split_after_levels`` …); ``options`` is :func:`option_values`
    of the user's option file; ``flags`` the values given by flag or API keyword (``stack_blocks``,
    ``std_steps``, ``fs_ncsr``, ``affine_eps``, ``scale``). Raises :class:`ModelError` naming the key or
    flag when two sources disagree, or when a value that changes the outputs is in none of them.
    Each warning is one defaulted value; :func:`warning_line` joins them.
    """
    options = dict(options or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    fam_file = options.get("family")
    for name in flags:
        if name not in _RULE or _RULE[name].flag is None:
            raise ModelError(f"no official-checkpoint option {name!r}; options: {', '.join(sorted(_FLAG_NAMES))}")
    said_flags = {n: Provenance(_norm(n, v), "flag", _RULE[n].flag) for n, v in flags.items()}

    # a flag and the file must agree where both speak
    for n, f in said_flags.items():
        o = options.get(n)
        if o is not None and _norm(n, o.value) != f.value:
            raise ModelError(
                f"{f.key} {_show(f.value)} contradicts the option file's {o.key} = {_show(o.value)}"
                + ("" if o.stated else " (absent: the official default)")
            )
    _checks_against_weights(layout, {**options, **said_flags}, weights)

    fam = fam_file.value if fam_file is not None else _family_of(layout, said_flags.get("fs_ncsr"))
    for n, f in said_flags.items():
        if fam not in _RULE[n].families:
            raise ModelError(
                f"{f.key} applies to {', '.join(_RULE[n].families)} checkpoints; these weights are {fam}'s"
            )
    out = {k: Provenance(v, "weights", _WEIGHTS_KEYS.get(k, k)) for k, v in weights.items()}
    out["layout"] = Provenance(layout, "weights", "layout")
    warnings: list[str] = []
    for rule in RULES:
        if fam not in rule.families:
            continue
        name = rule.name
        if name == "scale" and weights.get("scale") in (1, 8):
            continue  # settled by the weights (LLFlow; RRDB.upconv3 for ×8)
        if name == "stack_blocks" and weights.get("stacked_blocks") == 0:
            out[name] = Provenance([], "weights", "conditioning_channels")
            continue
        got = said_flags.get(name) or options.get(name)
        if name == "spline_bounds" and got is not None and tuple(got.value) != _SPLINE_BOUNDS:
            raise ModelError(
                f"option file: {got.key} gives the interval {_show(list(got.value))}; flowaudit builds the official "
                f"spline on {_show(list(_SPLINE_BOUNDS))}"
            )
        if got is not None:
            out[name] = got
        elif rule.changes_outputs:
            how = f"give {rule.flag} or {rule.key} in the option file (--official-config)"
            raise ModelError(f"the {layout} weights do not say {name}, and another value changes the outputs: {how}")
        else:
            out[name] = Provenance(rule.default, "default", rule.flag or rule.key)
            warnings.append(f"{name}={_show(rule.default)} ({' / '.join(filter(None, (rule.flag, rule.key)))})")
    for name in ("family", "coupling", *_LLFLOW_SUPPORTED, "correct_splits", "split", "n_transition"):
        if name in options and name not in out:
            out[name] = options[name]
    out["family"] = Provenance(
        fam,
        fam_file.source if fam_file else "flag" if "fs_ncsr" in said_flags else "weights",
        fam_file.key if fam_file else "--fs-ncsr" if "fs_ncsr" in said_flags else "layout",
    )
    return out, warnings


_FLAG_NAMES = {r.name for r in RULES if r.flag is not None}


def _norm(name: str, value: Any) -> Any:
    if name == "stack_blocks" or name == "std_steps":
        return [int(v) for v in value]
    if name == "fs_ncsr":
        return bool(value)
    if name == "affine_eps":
        return float(value)
    if name == "scale":
        return int(value)
    return value


def _family_of(layout: str, fs: Provenance | None) -> str:
    if layout == "ncsr" and fs is not None and fs.value:
        return "fs-ncsr"
    return layout


def warning_line(warnings: list[str]) -> str | None:
    """The one warning line for defaulted values (``None`` when nothing was defaulted)."""
    if not warnings:
        return None
    return "official checkpoint: not in the weights or the option file, defaults used: " + "; ".join(warnings)


def infer_options(resolved: Mapping[str, Provenance]) -> dict[str, Any]:
    """Keyword options for :func:`flowaudit.adapters.official.infer` from :func:`resolve`'s result."""
    out: dict[str, Any] = {}
    for name in ("stack_blocks", "std_steps", "fs_ncsr", "affine_eps", "scale"):
        p = resolved.get(name)
        if p is not None and p.source in ("option file", "flag"):  # infer's own defaults are the official ones
            out[name] = p.value
    return out
