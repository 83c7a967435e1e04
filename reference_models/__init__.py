"""The bundled reference flows: 2D toy, SRFlow/FS-NCSR-style SR, LLFlow-style low-light.

Each flow is a :class:`ReferenceFlow` with selectable coupling kinds; its
checkpoint is a dict of tensors and numbers (``training.CHECKPOINT_FORMAT``)
that :func:`load` rebuilds from ``task`` and ``config``. The small pretrained
checkpoints shipped in ``checkpoints/`` are listed by :func:`bundled`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .base import ReferenceFlow

__all__ = [
    "ReferenceFlow",
    "CheckpointError",
    "CHECKPOINT_DIR",
    "model_class",
    "build",
    "load",
    "load_checkpoint",
    "upgrade_config",
    "bundled",
]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

# name -> what it is; the file is CHECKPOINT_DIR / f"{name}.pt"
_BUNDLED = {
    "toy-affine": "2D toy, affine couplings (paper §3.2.1)",
    "toy-modified-rq-spline": "2D toy, modified RQ-spline couplings (the paper's remedy)",
    "sr-affine": "SR ×4, SRFlow/FS-NCSR-style, affine couplings",
    "sr-affine-bounded": "SR ×4, FS-NCSR† (scale in (0.1, 1.1))",
    "sr-modified-rq-spline": "SR ×4, modified RQ-spline couplings",
    "lowlight-affine": "low-light, LLFlow-style, affine couplings",
    "lowlight-modified-rq-spline": "low-light, LLFlow-style, modified RQ-spline couplings",
}


def model_class(task: str) -> type[ReferenceFlow]:
    """The reference flow class of ``task`` (``toy``, ``sr``, ``lowlight``)."""
    if task == "toy":
        from .toy import Toy2D as cls
    elif task == "sr":
        from .sr import SRFlow as cls
    elif task == "lowlight":
        from .lowlight import LLFlow as cls
    else:
        raise ValueError(f"unknown reference task {task!r} (toy, sr, lowlight)")
    return cls


def build(task: str, config: dict) -> ReferenceFlow:
    """Construct a reference flow of ``task`` from its constructor ``config``."""
    return model_class(task)(**config)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, not ours, keys missing); one line naming the file."""


def load_checkpoint(path: str | Path) -> dict:
    """Read a reference checkpoint dict; tensors only (``weights_only``), never pickled code.

    Raises :class:`CheckpointError` (one line) for a file that is empty, unreadable, not a
    reference checkpoint or without ``task``, ``config`` or ``state_dict``.
    """
    from .training import CHECKPOINT_FORMAT

    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():  # what torch warns about on a broken file adds nothing to the one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, random bytes, pickled code: never loaded, never our bug
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__).split(". ")[
            0
        ]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a flowaudit reference checkpoint")
    missing = [k for k in ("task", "config", "state_dict") if k not in state]
    if missing or not isinstance(state["config"], dict):
        raise CheckpointError(
            f"{path}: reference checkpoint without {', '.join(map(repr, missing)) or 'a config dict'}"
        )
    try:
        return upgrade_config(state)
    except ValueError as exc:  # unknown task
        raise CheckpointError(f"{path}: {exc}") from None


def upgrade_config(state: dict) -> dict:
    """Fill in config keys added after a checkpoint was saved with the behaviour it was trained with
    (the class's ``LEGACY_CONFIG``, e.g. ``official_features=False``); returns ``state``."""
    legacy = getattr(model_class(state["task"]), "LEGACY_CONFIG", {})
    state["config"] = {**legacy, **state["config"]}
    return state


def load(path_or_name: str | Path) -> ReferenceFlow:
    """Rebuild a reference flow from a checkpoint path or a bundled name, in eval mode."""
    path = Path(path_or_name)
    if str(path_or_name) in _BUNDLED:
        path = CHECKPOINT_DIR / f"{path_or_name}.pt"
    state = load_checkpoint(path)
    model = build(state["task"], state["config"])
    model.load_state_dict(state["state_dict"])
    model.name = path.stem
    return model.eval()


def bundled() -> list[dict]:
    """The bundled checkpoints: name, description and whether the file is present."""
    return [
        {
            "name": n,
            "description": d,
            "path": str(CHECKPOINT_DIR / f"{n}.pt"),
            "available": (CHECKPOINT_DIR / f"{n}.pt").exists(),
        }
        for n, d in _BUNDLED.items()
    ]
