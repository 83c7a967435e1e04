"""Training recipes of the bundled flows: data, hyper-parameters, one call each.

Kept apart from the model definitions; ``flowaudit train`` is a thin wrapper.
Toy recipe from the paper (S1.2): Adam (0.9, 0.999), lr 5e-4, batch 1000,
8000 iterations, on 100 000 pairs of eq. S2 / eq. 7.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import build, load_checkpoint
from .toy import toy_data
from .training import train

__all__ = ["train_toy", "TOY_TRAIN_SIZE", "TOY_SEED_TEST"]

TOY_TRAIN_SIZE = 100_000
TOY_SEED_TEST = 10_001  # the test/OOD conditions use a seed no training run uses


def train_toy(
    coupling: str = "affine",
    *,
    out: str | Path,
    iters: int = 8000,
    batch: int = 1000,
    lr: float = 5e-4,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    **config,
) -> dict:
    """Train the 2D toy flow (paper S1.2) and write the checkpoint to ``out``."""
    x_all, y_all = toy_data(TOY_TRAIN_SIZE, seed=seed)
    model = build("toy", dict(coupling=coupling, **config))
    previous = load_checkpoint(out) if resume and Path(out).exists() else None
    if previous is not None and previous["config"] != model.config:
        raise ValueError(f"{out}: cannot resume, it was trained with config {previous['config']}")

    def batches(step: int, gen: torch.Generator):
        idx = torch.randint(0, TOY_TRAIN_SIZE, (batch,), generator=gen)
        return x_all[idx], y_all[idx]

    data = {"name": "toy", "n": TOY_TRAIN_SIZE, "seed": seed, "noise": 0.01}
    return train(model, batches, iters=iters, lr=lr, out=out, seed=seed, resume=previous, data=data,
                 milestones=(), checkpoint_every=1000, progress=progress, dims=2)
