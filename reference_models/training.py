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


def _setup(
    model: ReferenceFlow,
    *,
    seed: int,
    lr: float,
    params: list[torch.nn.Parameter] | None,
    device: torch.device,
    resume: dict | None,
) -> tuple[torch.optim.Adam, torch.Generator, int, int, list]:
    """Seed, place the model, build Adam over ``params`` (all by default) and continue ``resume`` if given.

    Returns ``(optimiser, batch generator, first step, skipped steps, history)``; a resumed run continues the
    weights, optimiser, step and RNG of its checkpoint.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr, betas=(0.9, 0.999))
    if resume is None:
        return opt, gen, 0, 0, []
    model.load_state_dict(resume["state_dict"])
    opt.load_state_dict(resume["optimizer"])
    gen.set_state(resume["rng"])
    return opt, gen, int(resume["step"]), int(resume["skipped_steps"]), list(resume["history"])


def _checkpoint(
    out: str | Path, model: ReferenceFlow, opt: torch.optim.Optimizer, gen: torch.Generator, device: torch.device,
    **info: Any,
) -> dict:
    """Save ``out`` from CPU tensors (optimiser, RNG, then ``info``) and return the checkpoint dict."""
    extra = dict(optimizer=opt.state_dict(), rng=gen.get_state(), **info)
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


def _nll_step(
    model: ReferenceFlow, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor], device: torch.device
) -> tuple[float, bool]:
    """One Adam step on the mean NLL of ``batch``; ``(loss, applied)``.

    NaN-safe: a non-finite batch never reaches the model (ActNorm would initialise from it), and a step
    whose loss or gradient is not finite is not applied.
    """
    x, y = (t.to(device) for t in batch)
    opt.zero_grad(set_to_none=True)
    finite_batch = bool(torch.isfinite(x).all() and torch.isfinite(y).all())
    loss = -model.log_prob(x, y).mean() if finite_batch else torch.tensor(float("nan"))
    grads_ok = False
    if torch.isfinite(loss):
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grads_ok = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
    if grads_ok:
        opt.step()
    return float(loss.detach()), grads_ok


def _set_lr(opt: torch.optim.Optimizer, lr: float, step: int, halvings: list[int]) -> None:
    """Halve ``lr`` once per milestone passed: a function of the step alone, so resuming needs no scheduler."""
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 ** sum(step >= m for m in halvings)


def _postfix(nll: float, skipped: int, dims: int | None, bpd_offset: float) -> dict[str, Any]:
    """The progress bar's figures: NLL, bits/dim when ``dims`` is known, skipped steps."""
    bpd = {"bpd": f"{nll / (dims * math.log(2)) + bpd_offset:.3f}"} if dims else {}
    return {"nll": f"{nll:.4f}", **bpd, "skipped": skipped}


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
    """Train ``model`` on ``batches(step, generator) -> (x, y)`` and write ``out``; returns the final checkpoint.

    ``resume`` (a checkpoint of an earlier run of the same ``out``) continues its weights, optimiser, step and
    RNG; ``params`` restricts what is trained (e.g. a frozen encoder); ``dims`` (values per sample, plus
    ``bpd_offset``: 8 for dequantised 8-bit images in [0, 1]) shows the loss in bits/dim. Batches are drawn on
    the CPU (seeded) and moved to ``device``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    opt, gen, start, skipped, history = _setup(model, seed=seed, lr=lr, params=params, device=device, resume=resume)
    halvings = sorted({int(f * iters) for f in milestones})

    def checkpoint(step: int) -> dict:
        info = dict(step=step, iters=iters, seed=seed, lr=lr, data=data or {}, skipped_steps=skipped, history=history)
        return _checkpoint(out, model, opt, gen, device, **info)

    model.train()
    desc = f"train {model.task}"
    bar = tqdm(range(start, iters), initial=start, total=iters, disable=not progress, desc=desc, mininterval=1.0)
    for step in bar:
        _set_lr(opt, lr, step, halvings)
        value, applied = _nll_step(model, opt, batches(step, gen), device)
        skipped += 0 if applied else 1
        if step % 50 == 0 or step == iters - 1:
            history.append((step, value))
            bar.set_postfix(**_postfix(value, skipped, dims, bpd_offset))
        if (step + 1) % checkpoint_every == 0 and step + 1 < iters:
            checkpoint(step + 1)
    model.eval()
    return checkpoint(iters)
