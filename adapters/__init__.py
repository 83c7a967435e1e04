"""How models plug in: one adapter per family behind one small protocol (:mod:`.base`).

:func:`adapt` picks the adapter for a model object; :func:`load_model` turns
what a user types (a bundled name, a checkpoint path, ``module:factory`` plus
weights) into an adapter. Optional libraries are imported lazily, so a
missing one disables its adapter, not the tool.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from .base import Adapter, Observer, Site, widen
from .checkpoint import DEFAULT_MAX_PARAMETERS, ModelError, check_budget, first_line, fit_problems, read_weights
from .speedups import observing, rows_independent, small_flow

__all__ = [
    "Adapter",
    "Observer",
    "Site",
    "widen",
    "observing",
    "rows_independent",
    "small_flow",
    "adapt",
    "load_model",
    "ModelError",
    "DEFAULT_MAX_PARAMETERS",
]


# One module per family, tried in this order. Each defines ``matches(model) -> bool`` (cheap, and
# without importing its optional library) and ``make(model, name) -> Adapter``.
FAMILIES = ("custom", "reference", "official", "freia", "normflows", "nflows", "zuko")


def adapt(model: Any, name: str | None = None) -> Adapter:
    """The adapter for a supported model object (an :class:`Adapter` is returned as is)."""
    if isinstance(model, Adapter):
        return model
    for family in FAMILIES:
        module = importlib.import_module(f".{family}", __name__)
        if module.matches(model):
            return module.make(model, name)
    raise TypeError(
        f"no flowaudit adapter for {type(model).__module__}.{type(model).__name__} "
        "(a flow of one's own: declare it with flowaudit.adapters.custom.CustomAdapter)"
    )


def _import_factory(spec: str):
    """The callable named by ``package.module:factory`` (the working directory is importable, as for uvicorn)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"--model {spec!r}: expected package.module:factory")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except Exception as exc:  # an import error inside the user's module is theirs to fix: one line, exit 2
        raise ModelError(f"cannot import {spec!r}: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    if not callable(factory):
        raise ModelError(f"--model {spec}: {attr} is a {type(factory).__name__}, not a factory")
    return factory


def _apply_weights(target: nn.Module, weights: str, spec: str, trust: bool) -> None:
    """Load the state dict in ``weights`` into ``target`` (strict), or raise one ModelError line."""
    state = read_weights(Path(weights), trust, what="weights file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelError(f"--weights {weights}: holds a {type(state).__name__}, not a state dict of tensors")
    own = target.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    shapes = [
        k for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = [
        f"{what} {', '.join(keys[:3])}{', …' if len(keys) > 3 else ''} ({len(keys)})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch at", shapes))
        if keys
    ]
    if problems:
        raise ModelError(f"--weights {weights}: does not fit {spec}: {'; '.join(problems)}")
    try:
        target.load_state_dict(state)
    except Exception as exc:
        raise ModelError(f"--weights {weights}: does not fit {spec}: {first_line(exc)}") from None


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    trust: bool = False,
    official: dict | None = None,
    official_config: str | Path | None = None,
    max_parameters: int | float = DEFAULT_MAX_PARAMETERS,
    random_init: bool = False,
) -> Adapter:
    """Adapter for a bundled name, a checkpoint path, or ``package.module:factory`` (+ ``weights``).

    ``weights`` (a state dict: ``.pt`` or ``.safetensors``) goes only with a factory: into the
    module it returns, or into ``adapter.model`` when it returns an adapter. Wherever it cannot be
    used (a bundled name or a checkpoint carries its own weights; a factory result that is not a
    module), :class:`ModelError` says so in one line: it is never ignored.

    A checkpoint that is not a flowaudit reference checkpoint is tried as an official SRFlow / NCSR /
    spline / LLFlow state dict (:mod:`.official`). What its weights cannot say comes from
    ``official_config``, the official repository's YAML option file it was trained with, or from
    ``official`` (``stack_blocks``, ``std_steps``, ``fs_ncsr``, ``affine_eps``, ``scale``); a value whose
    other readings change the outputs and that neither gives is refused (:mod:`.official_options`).

    A factory without ``weights`` is refused (its model would be audited untrained) unless
    ``random_init``; the adapter's ``weights_source`` then reads ``"untrained (--random-init)"``
    (otherwise the weights file, or the checkpoint).

    Every file is untrusted (:mod:`.checkpoint`): a checkpoint's model is first built on the
    ``meta`` device and refused above ``max_parameters`` before anything is allocated.
    """
    from .. import reference_models as rm

    names = {b["name"] for b in rm.bundled()}
    is_factory = ":" in spec and not Path(spec).exists()
    given = [f"--{k.replace('_', '-')}" for k, v in (official or {}).items() if v is not None]
    given += ["--official-config"] if official_config is not None else []
    if given and (is_factory or spec in names):
        raise ModelError(f"{', '.join(given)}: only for official checkpoints, not {spec!r}")
    if random_init and (weights is not None or not is_factory):
        raise ModelError(
            f"--random-init goes with --model package.module:factory and no --weights ({spec!r} "
            + ("has --weights" if weights is not None else "carries its own weights")
            + ")"
        )
    if weights is not None and not is_factory:
        what = "bundled model" if spec in names else "checkpoint"
        raise ModelError(
            f"--weights {weights}: cannot be used with the {what} {spec!r}, which carries its own weights "
            "(--weights goes with --model package.module:factory)"
        )
    if spec in names:
        path = rm.CHECKPOINT_DIR / f"{spec}.pt"
        if not path.exists():
            raise ModelError(f"bundled model {spec!r} is not shipped in this build (train it with `flowaudit train`)")
        return adapt(rm.load(path), spec)
    if is_factory:
        return _from_factory(spec, weights, trust, random_init)
    path = Path(spec)
    if not path.exists():
        raise ModelError(f"{spec!r} is neither a bundled model ({', '.join(sorted(names))}) nor an existing checkpoint")
    return _from_checkpoint(path, trust, official, max_parameters, official_config)


def _from_factory(spec: str, weights: str | None, trust: bool, random_init: bool = False) -> Adapter:
    """The adapter of what ``package.module:factory`` returns, with ``weights`` loaded into its module."""
    factory = _import_factory(spec)
    try:
        model = factory()
    except Exception as exc:  # the user's factory failed: their input, not our bug
        raise ModelError(f"--model {spec}: the factory raised {type(exc).__name__}: {first_line(exc)}") from None
    if weights is not None:
        target = model.model if isinstance(model, Adapter) else model
        if not isinstance(target, nn.Module):
            got = (
                f"an adapter whose model is a {type(target).__name__}"
                if isinstance(model, Adapter)
                else f"a {type(model).__name__}"
            )
            raise ModelError(f"--weights {weights}: cannot be loaded: {spec} returned {got}, not an nn.Module")
        _apply_weights(target, weights, spec, trust)
    try:
        adapter = adapt(model, spec.partition(":")[2])
    except TypeError as exc:
        raise ModelError(f"--model {spec}: {exc}") from None
    if weights is None and not random_init:  # after the spec's own errors, which say more
        raise ModelError(
            f"--model {spec}: no --weights given, so the model would be audited with untrained weights; "
            "give --weights FILE, or --random-init to audit it untrained on purpose"
        )
    adapter.weights_source = "untrained (--random-init)" if weights is None else str(weights)
    return adapter


def _from_checkpoint(
    path: Path,
    trust: bool,
    official: dict | None,
    max_parameters: int | float,
    official_config: str | Path | None = None,
) -> Adapter:
    """The adapter of a checkpoint file: a flowaudit reference checkpoint, else an official state dict."""
    state = read_weights(path, trust)
    if isinstance(state, dict) and state.get("format") == "flowaudit-reference/1":
        if official_config is not None or any(v is not None for v in (official or {}).values()):
            raise ModelError(f"{path}: a flowaudit reference checkpoint carries its configuration; no official options")
        return adapt(_reference_model(path, state, max_parameters).eval(), path.stem)
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a checkpoint (a dict of tensors)")
    from . import official as off

    _state_budget(path, state, max_parameters)
    try:
        return off.build(state, path.stem, official_config=official_config, **(official or {}))
    except off.LayoutError as exc:
        raise ModelError(f"{path}: checkpoint layout not recognised: {exc}") from None


def _reference_model(path: Path, state: dict, max_parameters: int | float) -> nn.Module:
    """A flowaudit reference checkpoint rebuilt, its keys and configuration checked before anything is allocated."""
    from .. import reference_models as rm

    missing = [k for k in ("task", "config", "state_dict") if k not in state]
    if missing:
        raise ModelError(f"{path}: reference checkpoint without {', '.join(repr(k) for k in missing)}")
    task, config, weights = state["task"], state["config"], state["state_dict"]
    if task not in ("toy", "sr", "lowlight"):
        raise ModelError(f"{path}: unknown reference task {task!r} (toy, sr, lowlight)")
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise ModelError(f"{path}: 'config' is a {type(config).__name__}, not a dict of constructor options")
    if not isinstance(weights, dict):
        raise ModelError(f"{path}: 'state_dict' is a {type(weights).__name__}, not a dict of tensors")
    config = rm.upgrade_config(dict(state))["config"]
    check_budget(lambda: rm.build(task, config), max_parameters, str(path))
    try:
        model = rm.build(task, config)
    except Exception as exc:
        raise ModelError(f"{path}: invalid model configuration ({type(exc).__name__}: {first_line(exc)})") from None
    problems = fit_problems(model.state_dict(), weights)
    if problems:  # a different model than its config says
        raise ModelError(f"{path}: weights do not fit its config: {problems}")
    try:
        model.load_state_dict(weights)
    except Exception as exc:  # values that are not tensors, dtypes that do not convert
        raise ModelError(f"{path}: weights do not fit its config: {first_line(exc)}") from None
    model.name = path.stem
    return model


def _state_budget(path: Path, state: dict, max_parameters: int | float) -> None:
    """Refuse a state dict whose tensors alone hold more than ``max_parameters`` values."""
    n = sum(int(v.numel()) for v in _tensors(state))
    if n > max_parameters:
        raise ModelError(
            f"{path}: holds {n:,} values, more than --max-parameters {int(max_parameters):,}; "
            "raise the limit only if you trust this checkpoint"
        )


def _tensors(obj: Any, depth: int = 0):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict) and depth < 4:
        for v in obj.values():
            yield from _tensors(v, depth + 1)
