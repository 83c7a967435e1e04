"""The ``flowaudit`` command line: thin wrappers over the Python API.

Exit codes (DESIGN.md §4): 0 done, nothing to fail on; 1 the audit found what
``--fail-on`` asked to fail on; 2 bad input or usage (one line on stderr,
nothing half written); 3 an internal error (``--debug`` shows the traceback).
Heavy imports (torch) happen inside the commands so ``--help`` is instant.
Options every command shares (``--device``, ``--json``) are declared once and
land in the context object, :class:`Settings`.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ._version import __version__

__all__ = ["cli", "main"]

KINDS = ("affine", "affine-bounded", "additive", "rq-spline", "modified-rq-spline")


@dataclass
class Settings:
    """The context object every command receives."""

    debug: bool = False
    quiet: bool = False
    device: str = "auto"
    json: bool = False

    @property
    def progress(self) -> bool:
        return not self.quiet and not self.json


class UserError(ValueError):
    """Bad input found inside a command (exit code 2, one line)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .adapters import ModelError
    from .errors import AuditError, DataError

    return (UserError, AuditError, DataError, ModelError, FileExistsError, FileNotFoundError)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class FlowauditGroup(click.Group):
    """Maps exceptions of subcommands onto the exit-code contract."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if isinstance(exc, _user_errors()):
                click.echo(f"flowaudit: error: {_one_line(exc)}", err=True)
                ctx.exit(2)
            if ctx.obj is not None and ctx.obj.debug:
                traceback.print_exc()
            click.echo(f"flowaudit: internal error ({type(exc).__name__}: {_one_line(exc)}); "
                       "this is a bug, rerun with --debug for the traceback", err=True)
            ctx.exit(3)


@click.group(cls=FlowauditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowaudit")
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Audit conditional normalizing flows for exploding inverses (Hong et al. 2023)."""
    ctx.obj = Settings(debug=debug, quiet=quiet)


# -- shared options ------------------------------------------------------------------------------

def _setting(name: str):
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        setattr(ctx.ensure_object(Settings), name, value)
        return value

    return store


device_option = click.option("--device", default="auto", show_default=True, expose_value=False, callback=_setting("device"),
                             help="auto, cpu, cuda or cuda:N.")
json_option = click.option("--json", is_flag=True, expose_value=False, callback=_setting("json"),
                           help="Print machine-readable JSON on stdout.")
batch_option = click.option("--batch-size", type=click.IntRange(1), default=500, show_default=True, help="Samples per inverse pass.")
layers_option = click.option("--layers", help="Comma-separated encoder module names to hook (default: the adapter's).")
pooling_option = click.option("--pooling", type=click.Choice(["avg", "avgstd"]), default="avg", show_default=True, help="Per-channel pooling of hooked features.")
estimator_option = click.option("--estimator", type=click.Choice(["ledoit-wolf", "oas", "empirical"]), default="ledoit-wolf", show_default=True, help="Covariance estimator.")
threshold_option = click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Remark 2 tail-ratio threshold.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing --out.")


def model_options(f):
    """MODEL argument, or --model module:factory with --weights."""
    f = click.option("--trust-checkpoint", is_flag=True, help="Allow pickled code in checkpoints (only for sources you trust).")(f)
    f = click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Weights for --model (state dict, .pt or .safetensors).")(f)
    f = click.option("--model", "factory", metavar="MODULE:FACTORY", help="Any architecture: a factory returning the model.")(f)
    f = click.argument("model_spec", metavar="MODEL", required=False)(f)
    return f


def _adapter(model_spec: str | None, factory: str | None, weights: str | None, trust: bool):
    from .adapters import load_model

    if bool(model_spec) == bool(factory):
        raise click.UsageError("give MODEL (bundled name or checkpoint) or --model MODULE:FACTORY, not both")
    return load_model(factory or model_spec, weights=weights, trust=trust)


def _layers(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _refuse_existing(out: str, overwrite: bool) -> None:
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite)")


def _emit(obj: Settings, report, key: str | None = None) -> None:
    if obj.json:
        payload = json.loads(report.to_json())
        click.echo(json.dumps(payload if key is None else {key: payload[key]}, indent=2))
    else:
        click.echo(report.summary())


# -- audit commands ------------------------------------------------------------------------------

@cli.command()
@model_options
@click.option("--list", "list_", is_flag=True, help="List the bundled models and exit.")
@click.option("--data", type=click.Path(exists=True), help="Conditions to probe under (default: drawn for the model's condition shape).")
@threshold_option
@device_option
@json_option
@click.pass_obj
def inspect(obj: Settings, model_spec, factory, weights, trust_checkpoint, list_, data, threshold):
    """Sites, kinds and Remark 2 verdicts of MODEL; no data needed."""
    if list_:
        from .reference_models import bundled

        items = bundled()
        if obj.json:
            click.echo(json.dumps({"models": items}, indent=2))
        else:
            for b in items:
                click.echo(f"{b['name']:<28} {'' if b['available'] else '(not shipped) '}{b['description']}")
        return
    from .audit import inspect as run_inspect

    adapter = _adapter(model_spec, factory, weights, trust_checkpoint)
    _emit(obj, run_inspect(adapter, data, remark2_threshold=threshold, device=obj.device), key="model")


@cli.command()
@model_options
@click.option("--data", type=click.Path(exists=True), required=True, help="Training conditions: image folder, .npy, .npz or .h5.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Where to write stats.h5.")
@overwrite_option
@layers_option
@pooling_option
@estimator_option
@batch_option
@device_option
@json_option
@click.pass_obj
def fit(obj: Settings, model_spec, factory, weights, trust_checkpoint, data, out, overwrite, layers, pooling, estimator, batch_size):
    """Fit the encoder-feature Gaussian of MODEL on --data and write stats.h5."""
    from .audit import fit as run_fit

    _refuse_existing(out, overwrite)
    adapter = _adapter(model_spec, factory, weights, trust_checkpoint)
    report = run_fit(adapter, data, layers=_layers(layers), pooling=pooling, estimator=estimator,
                     batch_size=batch_size, device=obj.device, out=out, progress=obj.progress)
    _emit(obj, report)


@cli.command()
@model_options
@click.option("--data", type=click.Path(exists=True), required=True, help="In-distribution (test) conditions, targets optional.")
@click.option("--ood-data", type=click.Path(exists=True), help="OOD conditions to compare with.")
@click.option("--stats", type=click.Path(exists=True, dir_okay=False), help="stats.h5 from `flowaudit fit`.")
@click.option("--fit-data", type=click.Path(exists=True), help="Training conditions to fit the Gaussian on the fly.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder (must not exist).")
@overwrite_option
@click.option("--samples", "-k", type=click.IntRange(1), default=10, show_default=True, help="Samples K per input.")
@click.option("--temperature", "-t", type=click.FloatRange(0), default=0.9, show_default=True, help="Temperature τ of the latents.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the latents (recorded in the report).")
@click.option("--fail-on", type=click.Choice(["never", "violation", "risk"]), default="never", show_default=True,
              help="Exit 1 when a site violates Remark 2 (violation) or an input had an Inf/pixel error (risk).")
@layers_option
@pooling_option
@estimator_option
@threshold_option
@batch_option
@device_option
@json_option
@click.pass_obj
def scan(obj: Settings, model_spec, factory, weights, trust_checkpoint, data, ood_data, stats, fit_data, out, overwrite, samples,
         temperature, seed, fail_on, layers, pooling, estimator, threshold, batch_size):
    """The full audit of MODEL: traces, Remark 2, s_OOD and exploding-inverse risk."""
    from .audit import scan as run_scan

    if stats and fit_data:
        raise click.UsageError("give --stats or --fit-data, not both")
    _refuse_existing(out, overwrite)
    adapter = _adapter(model_spec, factory, weights, trust_checkpoint)
    report = run_scan(adapter, data, ood=ood_data, stats=stats, fit_data=fit_data, samples=samples, temperature=temperature,
                      seed=seed, batch_size=batch_size, device=obj.device, layers=_layers(layers), pooling=pooling,
                      estimator=estimator, remark2_threshold=threshold, progress=obj.progress)
    report.save(out, overwrite=overwrite)
    _emit(obj, report)
    if not obj.json:
        click.echo(f"report: {Path(out) / 'report.html'}")
    if (fail_on == "violation" and report.violations()) or (fail_on == "risk" and report.at_risk()):
        sys.exit(1)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="flowaudit-demo", show_default=True, help="Report folder.")
@overwrite_option
@device_option
@json_option
@click.pass_obj
def demo(obj: Settings, out, overwrite):
    """The main job on the embedded default: bundled models, bundled data, side-by-side summary."""
    from .demo import run_demo

    _refuse_existing(out, overwrite)
    result = run_demo(out, device=obj.device, progress=obj.progress, overwrite=overwrite)
    click.echo(json.dumps(result["json"], indent=2) if obj.json else result["text"])


# -- training and data ---------------------------------------------------------------------------

@cli.group()
def train():
    """(Re)train the bundled reference models."""


def _report_training(obj: Settings, state: dict, out: str, coupling: str) -> None:
    from .reference_models.recipes import run_info

    info = run_info(state, out)
    click.echo(json.dumps(info, indent=2) if obj.json else f"wrote {out}: {info['task']} {coupling}, {info['iters']} iterations, "
               f"final NLL {info['final_nll']:.4f}, {info['skipped_steps']} skipped steps")


@train.command("toy")
@click.option("--coupling", type=click.Choice(KINDS), default="affine", show_default=True, help="Coupling kind.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Checkpoint to write (periodically, atomically).")
@click.option("--iters", type=click.IntRange(1), default=8000, show_default=True, help="Training iterations (paper: 8000).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data, init and batches.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint at --out.")
@click.option("--feature-dim", type=click.IntRange(0), default=16, show_default=True, help="Width of g(y); 0 feeds y raw.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads (default: torch's).")
@json_option
@click.pass_obj
def train_toy_cmd(obj: Settings, coupling, out, iters, seed, resume, feature_dim, threads):
    """Train the 2D toy flow of the paper (S1.2)."""
    import torch

    from .reference_models.recipes import train_toy

    if threads:
        torch.set_num_threads(threads)
    state = train_toy(coupling, out=out, iters=iters, seed=seed, resume=resume, progress=obj.progress, feature_dim=feature_dim)
    _report_training(obj, state, out, coupling)


def _image_train_options(f):
    for option in reversed([
        click.option("--coupling", type=click.Choice(KINDS), default="affine", show_default=True, help="Coupling kind."),
        click.option("--out", type=click.Path(dir_okay=False), required=True, help="Checkpoint to write (periodically, atomically)."),
        click.option("--iters", type=click.IntRange(1), default=3000, show_default=True, help="Training iterations."),
        click.option("--patch", type=click.IntRange(4), default=32, show_default=True, help="HR / high patch size."),
        click.option("--batch", type=click.IntRange(1), default=8, show_default=True, help="Batch size."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), help="Initial learning rate (halved at 50/75/90/95 %)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of data, init and batches."),
        click.option("--resume", is_flag=True, help="Continue from the checkpoint at --out."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), help="JSON file of model constructor options."),
        click.option("--from", "from_ckpt", type=click.Path(exists=True, dir_okay=False),
                     help="Start from this checkpoint: copy encoder and non-coupling weights, swap the couplings."),
        click.option("--freeze-encoder", is_flag=True, help="With --from: train the flow only, keep the encoder fixed."),
        device_option,
        click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
                     help="CPU threads (small convolutions run fastest on one; use the other core for a second run)."),
        json_option,
    ]):
        f = option(f)
    return f


def _train_image(obj: Settings, task: str, coupling: str, out: str, lr: float | None, config_file: str | None, threads: int, **options) -> None:
    import torch

    from .device import resolve_device
    from .reference_models import recipes

    torch.set_num_threads(threads)
    try:
        config = recipes.read_config(task, config_file) if config_file else {}
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if lr is not None:
        options["lr"] = lr
    fn = recipes.train_sr if task == "sr" else recipes.train_lowlight
    state = fn(coupling, out=out, progress=obj.progress, device=resolve_device(obj.device), **options, **config)
    _report_training(obj, state, out, coupling)


@train.command("sr")
@_image_train_options
@click.option("--scale", type=click.Choice(["2", "4", "8"]), default="4", show_default=True, help="Super-resolution factor.")
@click.pass_obj
def train_sr_cmd(obj: Settings, scale, **kw):
    """Train the SRFlow/FS-NCSR-style super-resolution flow on the embedded corpus."""
    _train_image(obj, "sr", scale=int(scale), **kw)


@train.command("lowlight")
@_image_train_options
@click.pass_obj
def train_lowlight_cmd(obj: Settings, **kw):
    """Train the LLFlow-style low-light flow on synthetic LOL-like pairs."""
    _train_image(obj, "lowlight", **kw)


@cli.group()
def data():
    """Write the bundled data sets as files, to reproduce or reuse them."""


@data.command("toy")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help=".npz file with arrays y (conditions) and x (targets).")
@click.option("--n", type=click.IntRange(1), default=1000, show_default=True, help="Number of pairs.")
@click.option("--seed", type=int, default=10_001, show_default=True, help="Seed (training runs use 0).")
@click.option("--ood", is_flag=True, help="Shift the conditions by [0.8, -0.8] (the paper's y_OOD).")
def data_toy(out, n, seed, ood):
    """Pairs of the 2D toy (eq. S2, eq. 7) as .npz."""
    import numpy as np

    from .reference_models.atomic import atomic_path
    from .reference_models.toy import toy_data

    if not out.endswith(".npz"):
        raise UserError(f"--out {out}: must end in .npz")
    x, y = toy_data(n, seed=seed, ood=ood)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x=x.numpy(), y=y.numpy())
    click.echo(f"wrote {out}: {n} {'OOD ' if ood else ''}toy pairs (seed {seed})")


@data.command("sr")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write (hr/ and lr/ PNGs).")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True, help="Images of the embedded corpus.")
@click.option("--eurban", is_flag=True, help="Enhance high frequencies with the paper's kernel H (eq. S1): the OOD set.")
@click.option("--patch", type=click.IntRange(4), default=32, show_default=True, help="HR patch size.")
@click.option("--scale", type=click.Choice(["2", "4", "8"]), default="4", show_default=True, help="Down-scaling factor.")
@click.option("--n", type=click.IntRange(1), default=64, show_default=True, help="Number of patches.")
@click.option("--seed", type=int, default=102, show_default=True, help="Seed of the crops.")
def data_sr(out, split, eurban, patch, scale, n, seed):
    """SR patches of the embedded corpus as an image folder (optionally the EUrban-style OOD set)."""
    from .reference_models import data as d

    fn = d.eurban if eurban else None
    d.write_sr_set(out, d.corpus(split), patch=patch, scale=int(scale), n=n, seed=seed, transform=fn)
    click.echo(f"wrote {out}: {n} {'EUrban-enhanced ' if eurban else ''}{split} patches (hr/, lr/)")


@data.command("lowlight")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write (low/ and high/ PNGs).")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True, help="Images of the embedded corpus.")
@click.option("--preset", type=click.Choice(["lol", "velol"]), default="lol", show_default=True,
              help="Darkening: LOL-like (training distribution) or the VE-LOL-like OOD stand-in.")
@click.option("--patch", type=click.IntRange(4), default=32, show_default=True, help="Patch size.")
@click.option("--n", type=click.IntRange(1), default=64, show_default=True, help="Number of patches.")
@click.option("--seed", type=int, default=102, show_default=True, help="Seed of noise and crops.")
def data_lowlight(out, split, preset, patch, n, seed):
    """Synthetic low-light pairs of the embedded corpus as a low/ + high/ folder."""
    from .reference_models import data as d

    p = d.LOL_LIKE if preset == "lol" else d.VELOL_LIKE
    d.write_lowlight_set(out, d.corpus(split), preset=p, patch=patch, n=n, seed=seed)
    click.echo(f"wrote {out}: {n} {preset} {split} pairs (low/, high/)")


def main() -> None:
    cli(prog_name="flowaudit")
