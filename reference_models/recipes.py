"""Training recipes of the bundled flows: data, hyper-parameters, one call each.

Kept apart from the model definitions; ``flowaudit train`` is a thin wrapper.
Toy recipe from the paper (S1.2): Adam (0.9, 0.999), lr 5e-4, batch 1000,
8000 iterations, on 100 000 pairs of eq. S2 / eq. 7.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from . import CheckpointError, build, load_checkpoint, model_class
from .toy import toy_data
from .training import train

__all__ = [
    "train_toy",
    "train_sr",
    "train_lowlight",
    "transplant",
    "read_config",
    "run_info",
    "TOY_TRAIN_SIZE",
    "TOY_SEED_TEST",
]

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
    torch.manual_seed(seed)  # the initial weights come from the seed too
    model = build("toy", dict(coupling=coupling, **config))
    previous = load_checkpoint(out) if resume and Path(out).exists() else None
    if previous is not None and previous["config"] != model.config:
        raise CheckpointError(f"{out}: cannot resume, it was trained with config {previous['config']}")

    def batches(step: int, gen: torch.Generator):
        idx = torch.randint(0, TOY_TRAIN_SIZE, (batch,), generator=gen)
        return x_all[idx], y_all[idx]

    data = {"name": "toy", "n": TOY_TRAIN_SIZE, "seed": seed, "noise": 0.01}
    return train(
        model,
        batches,
        iters=iters,
        lr=lr,
        out=out,
        seed=seed,
        resume=previous,
        data=data,
        milestones=(),
        checkpoint_every=1000,
        progress=progress,
        dims=2,
    )


# -- image models --------------------------------------------------------------------------------


def _dequantize(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform dequantisation of 8-bit images (Theis et al. 2016), as SRFlow trains."""
    return x + (torch.rand(x.shape, generator=gen) - 0.5) / 256


def transplant(source: dict, model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Copy every tensor of ``source`` whose name and shape exist in ``model``; return (copied, fresh) keys.

    Used by ``--from``: a model with other coupling kinds keeps the encoder, ActNorms, 1×1s,
    injectors and priors of an existing checkpoint, and only its coupling conditioners start anew.
    """
    own = model.state_dict()
    copied = [k for k, v in source.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({**own, **{k: source[k] for k in copied}})
    fresh = [k for k in own if k not in copied]
    return copied, fresh


def _image_training(
    task: str,
    batches,
    *,
    config: dict,
    out,
    iters,
    lr,
    seed,
    resume,
    from_ckpt,
    freeze_encoder,
    progress,
    data,
    pixels,
    device,
) -> dict:
    torch.manual_seed(seed)  # the initial weights come from the seed too
    model = build(task, config)
    previous = load_checkpoint(out) if resume and Path(out).exists() else None
    if previous is not None and previous["config"] != model.config:
        raise CheckpointError(f"{out}: cannot resume, it was trained with config {previous['config']}")
    if from_ckpt is not None and previous is None:
        source = load_checkpoint(from_ckpt)
        copied, fresh = transplant(source["state_dict"], model)
        data = {**data, "from": str(from_ckpt), "copied": len(copied), "fresh": fresh}
    params = None
    if freeze_encoder:
        enc = model.encoder_module()
        frozen = {id(p) for p in enc.parameters()} if enc is not None else set()
        params = [p for p in model.parameters() if id(p) not in frozen]
    return train(
        model,
        batches,
        iters=iters,
        lr=lr,
        out=out,
        seed=seed,
        resume=previous,
        data=data,
        params=params,
        checkpoint_every=max(50, iters // 20),
        progress=progress,
        dims=pixels,
        bpd_offset=8.0,
        device=device,
    )


def train_sr(
    coupling: str = "affine",
    *,
    out,
    iters: int = 3000,
    batch: int = 8,
    patch: int = 32,
    scale: int = 4,
    lr: float = 2e-4,
    seed: int = 0,
    resume: bool = False,
    from_ckpt=None,
    freeze_encoder: bool = False,
    progress: bool = True,
    n_patches: int = 20000,
    device: str = "cpu",
    **config,
) -> dict:
    """Train the SR flow (paper S1.3 recipe, shrunk for 2 CPU cores) on the embedded corpus."""
    from .data import SRPatches, corpus

    config = {**config, "coupling": coupling, "scale": scale, "patch": patch}
    ds = SRPatches(
        corpus("train"),
        patch=patch,
        scale=scale,
        n=n_patches,
        seed=seed,
        augment=True,
        residual=bool(config.get("residual", False)),
    )

    def batches(step: int, gen: torch.Generator):
        idx = torch.randint(0, len(ds), (batch,), generator=gen).tolist()
        items = [ds[i] for i in idx]
        hr = torch.stack([it["hr"] for it in items])
        return _dequantize(hr, gen), torch.stack([it["lr"] for it in items])

    data = {
        "name": "embedded-corpus",
        "split": "train",
        "patch": patch,
        "scale": scale,
        "n_patches": n_patches,
        "seed": seed,
    }
    return _image_training(
        "sr",
        batches,
        config=config,
        out=out,
        iters=iters,
        lr=lr,
        seed=seed,
        resume=resume,
        from_ckpt=from_ckpt,
        freeze_encoder=freeze_encoder,
        progress=progress,
        data=data,
        pixels=3 * patch * patch,
        device=device,
    )


def train_lowlight(
    coupling: str = "affine",
    *,
    out,
    iters: int = 3000,
    batch: int = 8,
    patch: int = 32,
    lr: float = 5e-4,
    seed: int = 0,
    resume: bool = False,
    from_ckpt=None,
    freeze_encoder: bool = False,
    progress: bool = True,
    n_patches: int = 20000,
    device: str = "cpu",
    **config,
) -> dict:
    """Train the low-light flow on synthetic LOL-like pairs of the embedded corpus."""
    from .data import LOL_LIKE, LowLightPatches, corpus, lowlight_pairs

    config = {**config, "coupling": coupling, "patch": patch}
    ds = LowLightPatches(lowlight_pairs(corpus("train"), LOL_LIKE, seed=seed), patch=patch, n=n_patches, seed=seed)

    def batches(step: int, gen: torch.Generator):
        idx = torch.randint(0, len(ds), (batch,), generator=gen).tolist()
        items = [ds[i] for i in idx]
        return _dequantize(torch.stack([it["high"] for it in items]), gen), torch.stack([it["low"] for it in items])

    data = {
        "name": "embedded-corpus",
        "split": "train",
        "preset": "LOL_LIKE",
        "patch": patch,
        "n_patches": n_patches,
        "seed": seed,
    }
    return _image_training(
        "lowlight",
        batches,
        config=config,
        out=out,
        iters=iters,
        lr=lr,
        seed=seed,
        resume=resume,
        from_ckpt=from_ckpt,
        freeze_encoder=freeze_encoder,
        progress=progress,
        data=data,
        pixels=3 * patch * patch,
        device=device,
    )


# -- what the command line hands over --------------------------------------------------------------


def read_config(task: str, path: str | Path) -> dict:
    """Model constructor options of ``task`` from a JSON file; ``ValueError`` (one line) on anything else.

    ``coupling``, ``patch`` and ``scale`` are not options here: the recipe sets them.
    """
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path}: not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a JSON object of constructor options")
    known = set(inspect.signature(model_class(task).__init__).parameters) - {"self", "coupling", "patch", "scale"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return config


def run_info(state: dict, out: str | Path) -> dict:
    """What a finished training run reports: where, task, config, iterations, final NLL, skipped steps."""
    return {
        "out": str(out),
        "task": state["task"],
        "config": state["config"],
        "iters": state["iters"],
        "seed": state["seed"],
        "final_nll": state["history"][-1][1] if state["history"] else None,
        "skipped_steps": state["skipped_steps"],
    }
