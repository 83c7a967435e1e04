"""The ``flowaudit`` command line: thin wrappers over the Python API.

Exit codes (DESIGN.md §4): 0 done, nothing to fail on; 1 the audit found what
``--fail-on`` asked to fail on; 2 bad input or usage (one line on stderr,
nothing half written); 3 an internal error (``--debug`` shows the traceback).
Heavy imports (torch) happen inside the commands so ``--help`` is instant.
Options every command shares live in :mod:`.cli_options`; ``train`` and
``data`` in :mod:`.cli_reference`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click

from ..config import validate as V
from .._version import __version__
from .options import (
    EXIT_INTERRUPTED,
    Settings,
    UserError,
    batch_option,
    claim_output,
    device_option,
    estimator_option,
    finish_run,
    install_signal_handlers,
    interrupted,
    json_option,
    layers_option,
    max_parameters_option,
    overwrite_option,
    pooling_option,
    run_context,
    run_options,
    threshold_option,
    was_interrupted,
)
from .reference import data, train

__all__ = ["cli", "main"]


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..adapters import ModelError
    from ..errors import AuditError, DataError
    from ..utils.atomic import OutputError

    return (
        UserError,
        AuditError,
        DataError,
        ModelError,
        OutputError,
        FileExistsError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class FlowauditGroup(click.Group):
    """Maps exceptions of subcommands onto the exit-code contract (and Ctrl-C / SIGTERM onto 130)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # the group's own options (`flowaudit --bogus`): one line too
            click.echo(f"flowaudit: error: {_one_line(exc.format_message())} (see 'flowaudit --help')", err=True)
            sys.exit(exc.exit_code)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.exceptions.ClickException as exc:  # usage errors too: one line, not click's usage block
            where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "flowaudit"
            hint = f" (see '{where} --help')" if isinstance(exc, click.UsageError) else ""
            click.echo(f"flowaudit: error: {_one_line(exc.format_message())}{hint}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:  # SIGINT, or SIGTERM via install_signal_handlers; writers have cleaned up
            click.echo(interrupted(ctx), err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            if was_interrupted():  # a library turned our KeyboardInterrupt into its own error on the way up
                click.echo(interrupted(ctx), err=True)
                ctx.exit(EXIT_INTERRUPTED)
            if isinstance(exc, _user_errors()):
                click.echo(f"flowaudit: error: {_one_line(exc)}", err=True)
                ctx.exit(2)
            if ctx.obj is not None and ctx.obj.debug:
                traceback.print_exc()
            click.echo(
                f"flowaudit: internal error ({type(exc).__name__}: {_one_line(exc)}); "
                "this is a bug, rerun with --debug for the traceback",
                err=True,
            )
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


def _official(name: str, convert=lambda v: v):
    def store(ctx: click.Context, param: click.Parameter, value):
        if value:
            ctx.ensure_object(Settings).official[name] = convert(value)
        return value

    return store


def _blocks(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated block indices, e.g. 1,8,15,22") from None


def model_options(f):
    """MODEL argument, or --model module:factory with --weights; options for official checkpoints."""
    f = click.option(
        "--stack-blocks",
        metavar="I,J,…",
        expose_value=False,
        callback=_official("stack_blocks", _blocks),
        help="Official SR checkpoints: trunk blocks whose outputs condition the flow (not in the weights; "
        "default: the released configuration's).",
    )(f)
    f = click.option(
        "--fs-ncsr",
        is_flag=True,
        expose_value=False,
        callback=_official("fs_ncsr"),
        help="Official NCSR checkpoint trained as FS-NCSR (same keys; models HR minus bicubic LR).",
    )(f)
    f = max_parameters_option(f)
    f = click.option(
        "--trust-checkpoint", is_flag=True, help="Allow pickled code in checkpoints (only for sources you trust)."
    )(f)
    f = click.option(
        "--weights",
        type=click.Path(exists=True, dir_okay=False),
        help="Weights for --model (state dict, .pt or .safetensors).",
    )(f)
    f = click.option(
        "--model", "factory", metavar="MODULE:FACTORY", help="Any architecture: a factory returning the model."
    )(f)
    f = click.argument("model_spec", metavar="MODEL", required=False)(f)
    return f


def _adapter(model_spec: str | None, factory: str | None, weights: str | None, trust: bool, max_parameters: float):
    from ..adapters import load_model

    if bool(model_spec) == bool(factory):
        both = ", not both" if model_spec else ""
        raise click.UsageError(f"give MODEL (a bundled name or a checkpoint) or --model MODULE:FACTORY{both}")
    official = click.get_current_context().find_object(Settings).official
    return load_model(
        factory or model_spec, weights=weights, trust=trust, max_parameters=max_parameters, official=official or None
    )


def _layers(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _refuse_existing(out: str, overwrite: bool) -> None:
    """Claim ``out`` for this command (a second run on it gets exit 2), then refuse an existing one."""
    claim_output(click.get_current_context(), out, overwrite)


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
@click.option(
    "--data",
    type=click.Path(exists=True),
    help="Conditions to probe under (default: drawn for the model's condition shape).",
)
@threshold_option
@device_option
@json_option
@click.pass_obj
def inspect(obj: Settings, model_spec, factory, weights, trust_checkpoint, max_parameters, list_, data, threshold):
    """Sites, kinds and Remark 2 verdicts of MODEL; no data needed."""
    if list_:
        from ..reference_models import bundled

        items = bundled()
        if obj.json:
            click.echo(json.dumps({"models": items}, indent=2))
        else:
            for b in items:
                click.echo(f"{b['name']:<28} {'' if b['available'] else '(not shipped) '}{b['description']}")
        return
    from ..audit import inspect as run_inspect

    adapter = _adapter(model_spec, factory, weights, trust_checkpoint, max_parameters)
    _emit(obj, run_inspect(adapter, data, remark2_threshold=threshold, device=obj.device), key="model")


@cli.command()
@model_options
@click.option(
    "--data", type=click.Path(exists=True), required=True, help="Training conditions: image folder, .npy, .npz or .h5."
)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Where to write stats.h5.")
@overwrite_option
@layers_option
@pooling_option
@estimator_option
@batch_option
@run_options
@device_option
@json_option
@click.pass_obj
def fit(
    obj: Settings,
    model_spec,
    factory,
    weights,
    trust_checkpoint,
    max_parameters,
    data,
    out,
    overwrite,
    layers,
    pooling,
    estimator,
    batch_size,
    resume,
    max_memory,
    batched,
    distributed,
):
    """Fit the encoder-feature Gaussian of MODEL on --data and write stats.h5."""
    from ..audit import fit as run_fit

    run, out = run_context(click.get_current_context(), out, overwrite, resume, max_memory, distributed)
    leader = run.group is None or run.group.leader
    adapter = _adapter(model_spec, factory, weights, trust_checkpoint, max_parameters)
    report = run_fit(
        adapter,
        data,
        layers=_layers(layers),
        pooling=pooling,
        estimator=estimator,
        batch_size=batch_size or 256,
        device=obj.device,
        out=out if leader else None,
        progress=obj.progress and leader,
        context=run,
    )
    finish_run(run)
    if leader:
        _emit(obj, report)


@cli.command()
@model_options
@click.option(
    "--data", type=click.Path(exists=True), required=True, help="In-distribution (test) conditions, targets optional."
)
@click.option("--ood-data", type=click.Path(exists=True), help="OOD conditions to compare with.")
@click.option("--stats", type=click.Path(exists=True, dir_okay=False), help="stats.h5 from `flowaudit fit`.")
@click.option("--fit-data", type=click.Path(exists=True), help="Training conditions to fit the Gaussian on the fly.")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder (must not exist).")
@overwrite_option
@click.option("--samples", "-k", type=V.SAMPLES, default=10, show_default=True, help="Samples K per input.")
@click.option(
    "--temperature",
    "-t",
    type=V.FiniteFloat(0, 100),
    default=0.9,
    show_default=True,
    help="Temperature τ of the latents.",
)
@click.option("--seed", type=V.SEED, default=0, show_default=True, help="Seed of the latents (recorded in the report).")
@click.option(
    "--fail-on",
    type=click.Choice(["never", "violation", "risk"]),
    default="never",
    show_default=True,
    help="Exit 1 when a site violates Remark 2 (violation) or an input had an Inf/pixel error (risk).",
)
@layers_option
@pooling_option
@estimator_option
@threshold_option
@batch_option
@click.option(
    "--attack",
    "attack_budget",
    metavar="BUDGET",
    callback=lambda c, p, v: _budget(c, p, v) if v else None,
    help="Also attack 16 in-distribution conditions within BUDGET (see `flowaudit attack`): worst-case evidence per site.",
)
@click.option(
    "--exact",
    is_flag=True,
    help="One input's K samples per inverse pass even for a small flow (which otherwise puts 32 inputs in a "
    "pass: the same figures to float32 rounding, bit for bit where its kernels are batch-invariant).",
)
@run_options
@device_option
@json_option
@click.pass_obj
def scan(
    obj: Settings,
    model_spec,
    factory,
    weights,
    trust_checkpoint,
    max_parameters,
    data,
    ood_data,
    stats,
    fit_data,
    out,
    overwrite,
    samples,
    temperature,
    seed,
    fail_on,
    layers,
    pooling,
    estimator,
    threshold,
    batch_size,
    attack_budget,
    exact,
    resume,
    max_memory,
    batched,
    distributed,
):
    """The full audit of MODEL: traces, Remark 2, s_OOD and exploding-inverse risk."""
    from ..audit import scan as run_scan

    if stats and fit_data:
        raise click.UsageError("give --stats or --fit-data, not both")
    if exact and batched:
        raise click.UsageError("give --exact or --batched, not both")
    run, out = run_context(click.get_current_context(), out, overwrite, resume, max_memory, distributed)
    leader = run.group is None or run.group.leader
    adapter = _adapter(model_spec, factory, weights, trust_checkpoint, max_parameters)
    report = run_scan(
        adapter,
        data,
        ood=ood_data,
        stats=stats,
        fit_data=fit_data,
        samples=samples,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        device=obj.device,
        layers=_layers(layers),
        pooling=pooling,
        estimator=estimator,
        remark2_threshold=threshold,
        progress=obj.progress and leader,
        attack=attack_budget,
        exact=True if exact else (False if batched else None),
        context=run,
    )
    if leader:
        report.save(out, overwrite=overwrite)
    finish_run(run)
    if not leader:
        return
    _emit(obj, report)
    if not obj.json:
        click.echo(f"report: {Path(out) / 'report.html'}")
    if (fail_on == "violation" and report.violations()) or (fail_on == "risk" and report.at_risk()):
        sys.exit(1)


@cli.command()
@click.option(
    "--out", type=click.Path(file_okay=False), default="flowaudit-demo", show_default=True, help="Report folder."
)
@overwrite_option
@device_option
@json_option
@click.pass_obj
def demo(obj: Settings, out, overwrite):
    """The main job on the embedded default: bundled models, bundled data, side-by-side summary."""
    from ..demo import run_demo

    _refuse_existing(out, overwrite)
    result = run_demo(out, device=obj.device, progress=obj.progress, overwrite=overwrite)
    click.echo(json.dumps(result["json"], indent=2) if obj.json else result["text"])


# -- the worst case ------------------------------------------------------------------------------


def _budget(ctx: click.Context, param: click.Parameter, value: str):
    """Parse a budget option (``linf:EPS``, ``l2:EPS``, ``box:LO,HI``, ``none``); a bad one exits 2."""
    from ..evidence.budget import parse_budget

    try:
        return parse_budget(value)
    except ValueError as exc:
        raise UserError(f"{param.opts[0]}: {exc}") from None


@cli.command()
@model_options
@click.option(
    "--data",
    type=click.Path(exists=True),
    required=True,
    help="Conditions to start from: image folder, .npy, .npz or .h5.",
)
@click.option(
    "--budget",
    default="none",
    show_default=True,
    callback=_budget,
    metavar="BUDGET",
    help="linf:EPS, l2:EPS, box:LO,HI (absolute bounds of every condition value) or none (distance to the first break). "
    "EPS may be a fraction: linf:8/255.",
)
@click.option(
    "--objective",
    type=click.Choice(["logdet", "max-gain", "max-abs"]),
    default="logdet",
    show_default=True,
    help="Maximise the inverse log-determinant, the largest log inverse gain, or the largest |sample value|.",
)
@click.option("--steps", type=V.BoundedInt(0, 10**6), default=50, show_default=True, help="Gradient steps per start.")
@click.option(
    "--step-size",
    type=V.FiniteFloat(0, min_open=True),
    help="Step length in the budget's norm (default 2.5·EPS/steps; "
    "none: the first of geometrically growing steps, 1 % of the conditions' spread).",
)
@click.option(
    "--step-rule",
    type=click.Choice(["adam", "sign"]),
    default="adam",
    show_default=True,
    help="Step direction: Adam's m̂/√v̂ (sign with momentum) or the sign of the gradient (PGD).",
)
@click.option(
    "--starts", type=V.BATCH, default=16, show_default=True, help="Attack the first N conditions of --data."
)
@click.option(
    "--samples", "-k", type=V.SAMPLES, default=4, show_default=True, help="Samples K (latents) per start."
)
@click.option(
    "--temperature",
    "-t",
    type=V.FiniteFloat(0, 100),
    default=0.9,
    show_default=True,
    help="Temperature τ of the latents.",
)
@click.option("--seed", type=V.SEED, default=0, show_default=True, help="Seed of the latents (the scan's seeding).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder (must not exist).")
@overwrite_option
@click.option(
    "--fail-on",
    type=click.Choice(["never", "broken"]),
    default="never",
    show_default=True,
    help="Exit 1 when the attack broke at least one start.",
)
@click.option(
    "--batch-size",
    type=V.BATCH,
    default=64,
    show_default=True,
    help="Samples per inverse pass with --batched (the pass keeps its graph, so it costs more memory than a scan's; "
    "at most one shard of 16 starts). Exact passes (the default) run one start's K samples, whatever this says.",
)
@run_options
@device_option
@json_option
@click.pass_obj
def attack(
    obj: Settings,
    model_spec,
    factory,
    weights,
    trust_checkpoint,
    max_parameters,
    data,
    budget,
    objective,
    steps,
    step_size,
    step_rule,
    starts,
    samples,
    temperature,
    seed,
    out,
    overwrite,
    fail_on,
    batch_size,
    resume,
    max_memory,
    batched,
    distributed,
):
    """The worst case: gradient search on MODEL's conditions, inside a budget, for an exploding inverse.

    The starts run in shards of 16 kept in .<out>.work/ (--resume finishes an interrupted attack,
    --distributed shares them over torchrun ranks); each inverse pass is one start's K samples, so the
    report does not depend on --batch-size (--batched: several starts per pass). --max-memory is
    recorded but does not size the attack's passes (they keep their graph: --batch-size does).
    """
    from ..audit import attack as run_attack

    run, out = run_context(click.get_current_context(), out, overwrite, resume, max_memory, distributed)
    leader = run.group is None or run.group.leader
    adapter = _adapter(model_spec, factory, weights, trust_checkpoint, max_parameters)
    report = run_attack(
        adapter,
        data,
        budget=budget,
        objective=objective,
        steps=steps,
        step_size=step_size,
        rule=step_rule,
        starts=starts,
        samples=samples,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        device=obj.device,
        progress=obj.progress and leader,
        context=run,
        exact=not batched,
    )
    if leader:
        report.save(out, overwrite=overwrite)
    finish_run(run)
    if not leader:
        return
    _emit(obj, report, key="attack")
    if not obj.json:
        click.echo(f"report: {Path(out) / 'report.html'}")
    if fail_on == "broken" and report["attack"]["summary"]["n_broken"]:
        sys.exit(1)


cli.add_command(train)
cli.add_command(data)


def main() -> None:
    install_signal_handlers()
    try:
        cli(prog_name="flowaudit")
    except SystemExit as exc:
        if exc.code != EXIT_INTERRUPTED:
            raise
        # The writers have cleaned up and the message is out. Leave with 130 as said: CPython would turn this
        # exit into a death by SIGINT when the KeyboardInterrupt had crossed an exec() of source text
        # (e.g. inside dataclasses), a flag a Python program cannot clear.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
