"""How models plug in: one adapter per family behind one small protocol (:mod:`.base`).

:func:`adapt` picks the adapter for a model object; :func:`load_model` turns
what a user types (a bundled name, a checkpoint path, ``module:factory`` plus
weights) into an adapter. Optional libraries are imported lazily, so a
missing one disables its adapter, not the tool.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from .base import Adapter, Observer, Site, widen

__all__ = ["Adapter", "Observer", "Site", "widen", "adapt", "load_model", "ModelError"]


class ModelError(ValueError):
    """The model spec cannot be loaded (unknown name, unreadable checkpoint, …)."""


# One module per family, tried in this order. Each defines ``matches(model) -> bool`` (cheap, and
# without importing its optional library) and ``make(model, name) -> Adapter``.
FAMILIES = ("reference", "freia", "normflows", "nflows", "zuko")


def adapt(model: Any, name: str | None = None) -> Adapter:
    """The adapter for a supported model object (an :class:`Adapter` is returned as is)."""
    if isinstance(model, Adapter):
        return model
    for family in FAMILIES:
        module = importlib.import_module(f".{family}", __name__)
        if module.matches(model):
            return module.make(model, name)
    raise TypeError(f"no flowaudit adapter for {type(model).__module__}.{type(model).__name__}")


def _load_weights(path: Path, trust: bool) -> Any:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:
        hint = "" if trust else " (it may hold pickled code: pass --trust-checkpoint if you trust its source)"
        raise ModelError(f"{path}: cannot load checkpoint: {str(exc).splitlines()[0]}{hint}") from None


def load_model(spec: str, *, weights: str | None = None, trust: bool = False) -> Adapter:
    """Adapter for a bundled name, a checkpoint path, or ``package.module:factory`` (+ ``weights``)."""
    from flowaudit import reference_models as rm

    names = {b["name"] for b in rm.bundled()}
    if spec in names:
        path = rm.CHECKPOINT_DIR / f"{spec}.pt"
        if not path.exists():
            raise ModelError(f"bundled model {spec!r} is not shipped in this build (train it with `flowaudit train`)")
        return adapt(rm.load(path), spec)
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"cannot import {spec!r}: {exc}") from None
        model = factory()
        if weights is not None and isinstance(model, nn.Module):
            state = _load_weights(Path(weights), trust)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise ModelError(f"{weights}: weights do not fit {spec}: {str(exc).splitlines()[0]}") from None
        try:
            return adapt(model, attr)
        except TypeError as exc:
            raise ModelError(f"{spec}: {exc}") from None
    path = Path(spec)
    if not path.exists():
        raise ModelError(f"{spec!r} is neither a bundled model ({', '.join(sorted(names))}) nor an existing checkpoint")
    state = _load_weights(path, trust)
    if isinstance(state, dict) and state.get("format") == "flowaudit-reference/1":
        state = rm.upgrade_config(state)
        model = rm.build(state["task"], state["config"])
        model.load_state_dict(state["state_dict"])
        model.name = path.stem
        return adapt(model.eval(), path.stem)
    raise ModelError(f"{path}: checkpoint layout not recognised by any adapter")
