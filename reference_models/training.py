r"""Maximum-likelihood training of the reference flows, resumable and NaN-safe.

Minimises the negative log-likelihood :math:`-\log q(x \mid y)` (paper eq. 2)
with Adam; the learning rate is halved at the given fractions of the run
(paper S1.3: 50/75/90/95 %). A step whose loss is not finite is skipped and
counted, never applied. Checkpoints are plain dicts of tensors and numbers,
written atomically, loadable with ``torch.load(weights_only=True)``:
``format``, ``task``, ``config``, ``state_dict``, ``optimizer``, ``step``,
``iters``, ``seed``, ``data``, ``skipped_steps``, ``history``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..utils.atomic import atomic_path
from .base import ReferenceFlow

__all__ = ["CHECKPOINT_FORMAT", "train", "save_checkpoint", "export_checkpoint"]

CHECKPOINT_FORMAT = "flowaudit-reference/1"

Batch = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


def save_checkpoint(path: str | Path, model: ReferenceFlow, **extra: Any) -> None:
    """Write a checkpoint dict atomically (see module docstring for the keys)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "task": model.task,
        "config": dict(model.config),
        "state_dict": model.state_dict(),
    }
    state.update(extra)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def export_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Copy a finished checkpoint without its optimiser and RNG state (what the package ships)."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    for key in ("optimizer", "rng"):
        state.pop(key, None)
    with atomic_path(dst) as tmp:
        torch.save(state, tmp)


def train(
    model: ReferenceFlow,
    batches: Batch,
    *,
    iters: int,
    lr: float,
    out: str | Path,
    seed: int = 0,
    milestones: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95),
    checkpoint_every: int = 1000,
    resume: dict | None = None,
    data: dict | None = None,
    params: list[torch.nn.Parameter] | None = None,
    progress: bool = True,
    dims: int | None = None,
    bpd_offset: float = 0.0,
    device: str | torch.device = "cpu",
) -> dict:
    """Train ``model`` on ``batches(step, generator) -> (x, y)`` and write ``out``.

    ``resume`` is a checkpoint dict from an earlier run of the same ``out``: the
    weights, optimiser, step and RNG continue from it. ``params`` restricts the
    trained parameters (e.g. a frozen encoder). ``dims`` (values per sample)
    turns the loss into bits/dim for the progress bar, plus ``bpd_offset`` (8 for
    dequantised 8-bit images in [0, 1]). Batches are drawn on the CPU (seeded) and
    moved to ``device``; checkpoints are always saved from CPU tensors. Returns the final
    checkpoint dict.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    model.to(device)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr, betas=(0.9, 0.999))
    halvings = sorted({int(f * iters) for f in milestones})
    start, skipped, history = 0, 0, []
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["rng"])
        start, skipped, history = int(resume["step"]), int(resume["skipped_steps"]), list(resume["history"])

    def checkpoint(step: int) -> dict:
        extra = dict(
            optimizer=opt.state_dict(),
            rng=gen.get_state(),
            step=step,
            iters=iters,
            seed=seed,
            lr=lr,
            data=data or {},
            skipped_steps=skipped,
            history=history,
        )
        model.cpu()
        save_checkpoint(out, model, **extra)
        model.to(device)
        return {
            "format": CHECKPOINT_FORMAT,
            "task": model.task,
            "config": model.config,
            "state_dict": model.state_dict(),
            **extra,
        }

    model.train()
    bar = tqdm(
        range(start, iters),
        initial=start,
        total=iters,
        disable=not progress,
        desc=f"train {model.task}",
        mininterval=1.0,
    )
    for step in bar:
        for group in opt.param_groups:  # a function of the step alone, so resuming needs no scheduler state
            group["lr"] = lr * 0.5 ** sum(step >= m for m in halvings)
        x, y = (t.to(device) for t in batches(step, gen))
        opt.zero_grad(set_to_none=True)
        # a non-finite batch never reaches the model: ActNorm would initialise from it
        finite_batch = bool(torch.isfinite(x).all() and torch.isfinite(y).all())
        loss = -model.log_prob(x, y).mean() if finite_batch else torch.tensor(float("nan"))
        if torch.isfinite(loss):
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grads_ok = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        else:
            grads_ok = False
        if grads_ok:
            opt.step()
        else:  # NaN-safe: a non-finite loss or gradient never reaches the weights
            skipped += 1
        value = float(loss.detach())
        if step % 50 == 0 or step == iters - 1:
            history.append((step, value))
            bpd = value / (dims * math.log(2)) + bpd_offset if dims else None
            bar.set_postfix(nll=f"{value:.4f}", **({"bpd": f"{bpd:.3f}"} if bpd is not None else {}), skipped=skipped)
        if (step + 1) % checkpoint_every == 0 and step + 1 < iters:
            checkpoint(step + 1)
    model.eval()
    return checkpoint(iters)
