"""``flowaudit train`` and ``flowaudit data``: retrain the bundled reference models, write their data sets.

Thin wrappers over :mod:`flowaudit.reference_models.recipes` and
:mod:`flowaudit.reference_models.data`; the training configuration is checked
by the recipes, not here.
"""

from __future__ import annotations

import contextlib
import json

import click

from ..config import validate as V
from .options import CommandState, UserError, claim_output, device_option, json_option

__all__ = ["train", "data"]

KINDS = ("affine", "affine-bounded", "additive", "rq-spline", "modified-rq-spline")


@click.group()
def train():
    """(Re)train the bundled reference models."""


@contextlib.contextmanager
def _checkpoint_errors(*paths: str | None):
    """A ``--from`` / ``--resume`` checkpoint that cannot be used is the user's one-line error (exit 2).

    One that holds pickled code says so (read, never run), rather than "unreadable".
    """
    from ..adapters.checkpoint import pickled_code
    from ..reference_models import CheckpointError

    try:
        yield
    except CheckpointError as exc:
        for path in filter(None, paths):
            if code := pickled_code(path):
                raise UserError(f"{path}: holds pickled code ({code}); refused, training loads tensors only") from None
        raise UserError(str(exc)) from None


def _report_training(obj: CommandState, state: dict, out: str, coupling: str) -> None:
    from ..reference_models.recipes import run_info

    info = run_info(state, out)
    click.echo(
        json.dumps(info, indent=2)
        if obj.json
        else f"wrote {out}: {info['task']} {coupling}, {info['iters']} iterations, "
        f"final NLL {info['final_nll']:.4f}, {info['skipped_steps']} skipped steps"
    )


@train.command("toy")
@click.option("--coupling", type=click.Choice(KINDS), default="affine", show_default=True, help="Coupling kind.")
@click.option(
    "--out", type=click.Path(dir_okay=False), required=True, help="Checkpoint to write (periodically, atomically)."
)
@click.option("--iters", type=V.ITERS, default=8000, show_default=True, help="Training iterations (paper: 8000).")
@click.option("--seed", type=V.SEED, default=0, show_default=True, help="Seed of data, init and batches.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint at --out.")
@click.option("--feature-dim", type=V.WIDTH, default=16, show_default=True, help="Width of g(y); 0 feeds y raw.")
@click.option("--threads", type=V.THREADS, help="CPU threads (default: torch's).")
@json_option
@click.pass_obj
def train_toy_cmd(obj: CommandState, coupling, out, iters, seed, resume, feature_dim, threads):
    """Train the 2D toy flow of the paper (S1.2)."""
    import torch

    from ..reference_models.recipes import train_toy

    if threads:
        torch.set_num_threads(threads)
    claim_output(click.get_current_context(), out, keeps_partial=True)
    with _checkpoint_errors(out):
        state = train_toy(
            coupling, out=out, iters=iters, seed=seed, resume=resume, progress=obj.progress, feature_dim=feature_dim
        )
    _report_training(obj, state, out, coupling)


def _image_train_options(f):
    for option in reversed(
        [
            click.option(
                "--coupling", type=click.Choice(KINDS), default="affine", show_default=True, help="Coupling kind."
            ),
            click.option(
                "--out",
                type=click.Path(dir_okay=False),
                required=True,
                help="Checkpoint to write (periodically, atomically).",
            ),
            click.option("--iters", type=V.ITERS, default=3000, show_default=True, help="Training iterations."),
            click.option("--patch", type=V.PATCH, default=32, show_default=True, help="HR / high patch size."),
            click.option("--batch", type=V.TRAIN_BATCH, default=8, show_default=True, help="Batch size."),
            click.option(
                "--lr",
                type=V.FiniteFloat(0, 10, min_open=True),
                help="Initial learning rate (halved at 50/75/90/95 %).",
            ),
            click.option("--seed", type=V.SEED, default=0, show_default=True, help="Seed of data, init and batches."),
            click.option("--resume", is_flag=True, help="Continue from the checkpoint at --out."),
            click.option(
                "--config",
                "config_file",
                type=click.Path(exists=True, dir_okay=False),
                help="JSON file of model constructor options.",
            ),
            click.option(
                "--from",
                "from_ckpt",
                type=click.Path(exists=True, dir_okay=False),
                help="Start from this checkpoint: copy encoder and non-coupling weights, swap the couplings.",
            ),
            click.option(
                "--freeze-encoder", is_flag=True, help="With --from: train the flow only, keep the encoder fixed."
            ),
            device_option,
            click.option(
                "--threads",
                type=V.THREADS,
                default=1,
                show_default=True,
                help="CPU threads (small convolutions run fastest on one; use the other core for a second run).",
            ),
            json_option,
        ]
    ):
        f = option(f)
    return f


def _train_image(
    obj: CommandState,
    task: str,
    coupling: str,
    out: str,
    lr: float | None,
    config_file: str | None,
    threads: int,
    **options,
) -> None:
    import torch

    from ..config.device import resolve_device
    from ..reference_models import recipes

    torch.set_num_threads(threads)
    claim_output(click.get_current_context(), out, keeps_partial=True)
    try:
        config = recipes.read_config(task, config_file) if config_file else {}
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if lr is not None:
        options["lr"] = lr
    fn = recipes.train_sr if task == "sr" else recipes.train_lowlight
    with _checkpoint_errors(out, options.get("from_ckpt")):
        state = fn(coupling, out=out, progress=obj.progress, device=resolve_device(obj.device), **options, **config)
    _report_training(obj, state, out, coupling)


@train.command("sr")
@_image_train_options
@click.option(
    "--scale", type=click.Choice(["2", "4", "8"]), default="4", show_default=True, help="Super-resolution factor."
)
@click.pass_obj
def train_sr_cmd(obj: CommandState, scale, **kw):
    """Train the SRFlow/FS-NCSR-style super-resolution flow on the embedded corpus."""
    _train_image(obj, "sr", scale=int(scale), **kw)


@train.command("lowlight")
@_image_train_options
@click.pass_obj
def train_lowlight_cmd(obj: CommandState, **kw):
    """Train the LLFlow-style low-light flow on synthetic LOL-like pairs."""
    _train_image(obj, "lowlight", **kw)


@click.group()
def data():
    """Write the bundled data sets as files, to reproduce or reuse them."""


@data.command("toy")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    required=True,
    help=".npz file with arrays y (conditions) and x (targets).",
)
@click.option("--n", type=V.COUNT, default=1000, show_default=True, help="Number of pairs.")
@click.option("--seed", type=V.SEED, default=10_001, show_default=True, help="Seed (training runs use 0).")
@click.option("--ood", is_flag=True, help="Shift the conditions by [0.8, -0.8] (the paper's y_OOD).")
def data_toy(out, n, seed, ood):
    """Pairs of the 2D toy (eq. S2, eq. 7) as .npz."""
    import numpy as np

    from ..reference_models.toy import toy_data
    from ..utils.atomic import atomic_path

    if not out.endswith(".npz"):
        raise UserError(f"--out {out}: must end in .npz")
    x, y = toy_data(n, seed=seed, ood=ood)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=x.numpy(), y=y.numpy())
    click.echo(f"wrote {out}: {n} {'OOD ' if ood else ''}toy pairs (seed {seed})")


@data.command("sr")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write (hr/ and lr/ PNGs).")
@click.option(
    "--split",
    type=click.Choice(["train", "test"]),
    default="test",
    show_default=True,
    help="Images of the embedded corpus.",
)
@click.option(
    "--eurban", is_flag=True, help="Enhance high frequencies with the paper's kernel H (eq. S1): the OOD set."
)
@click.option("--patch", type=V.PATCH, default=32, show_default=True, help="HR patch size.")
@click.option(
    "--scale", type=click.Choice(["2", "4", "8"]), default="4", show_default=True, help="Down-scaling factor."
)
@click.option("--n", type=V.COUNT, default=64, show_default=True, help="Number of patches.")
@click.option("--seed", type=V.SEED, default=102, show_default=True, help="Seed of the crops.")
def data_sr(out, split, eurban, patch, scale, n, seed):
    """SR patches of the embedded corpus as an image folder (optionally the EUrban-style OOD set)."""
    from ..reference_models import data as d

    fn = d.eurban if eurban else None
    d.write_sr_set(out, d.corpus(split), patch=patch, scale=int(scale), n=n, seed=seed, transform=fn)
    click.echo(f"wrote {out}: {n} {'EUrban-enhanced ' if eurban else ''}{split} patches (hr/, lr/)")


@data.command("lowlight")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write (low/ and high/ PNGs).")
@click.option(
    "--split",
    type=click.Choice(["train", "test"]),
    default="test",
    show_default=True,
    help="Images of the embedded corpus.",
)
@click.option(
    "--preset",
    type=click.Choice(["lol", "velol"]),
    default="lol",
    show_default=True,
    help="Darkening: LOL-like (training distribution) or the VE-LOL-like OOD stand-in.",
)
@click.option("--patch", type=V.PATCH, default=32, show_default=True, help="Patch size.")
@click.option("--n", type=V.COUNT, default=64, show_default=True, help="Number of patches.")
@click.option("--seed", type=V.SEED, default=102, show_default=True, help="Seed of noise and crops.")
def data_lowlight(out, split, preset, patch, n, seed):
    """Synthetic low-light pairs of the embedded corpus as a low/ + high/ folder."""
    from ..reference_models import data as d

    p = d.LOL_LIKE if preset == "lol" else d.VELOL_LIKE
    d.write_lowlight_set(out, d.corpus(split), preset=p, patch=patch, n=n, seed=seed)
    click.echo(f"wrote {out}: {n} {preset} {split} pairs (low/, high/)")
