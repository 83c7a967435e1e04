"""The ``flowaudit`` command line: thin wrappers over the Python API.

Exit codes (the README's contract): 0 done, nothing to fail on; 1 the audit found what
``--fail-on`` asked to fail on; 2 bad input or usage (one line on stderr,
nothing half written); 3 an internal error (``--debug`` shows the traceback).
Heavy imports (torch) happen inside the commands so ``--help`` is instant.
Options every command shares live in :mod:`.options`; ``train`` and
``data`` in :mod:`.reference`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click

from .._version import __version__
from ..config import validate as V
from .options import (
    EXIT_INTERRUPTED,
    CommandState,
    UserError,
    batch_option,
    claim_output,
    device_option,
    discard_fresh_work,
    estimator_option,
    finish_run,
    install_signal_handlers,
    interrupted,
    json_option,
    layers_option,
    leads,
    max_parameters_option,
    overwrite_option,
    pooling_option,
    run_context,
    run_options,
    run_settings,
    sampling_options,
    threads_option,
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
        OutputError,
        AuditError,
        DataError,
        ModelError,
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
                discard_fresh_work(ctx)
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
    ctx.obj = CommandState(debug=debug, quiet=quiet)


# -- shared options ------------------------------------------------------------------------------


def _official(name: str, convert=lambda v: v):
    def store(ctx: click.Context, param: click.Parameter, value):
        if value is not None:
            ctx.ensure_object(CommandState).official[name] = convert(value)
        return value

    return store


def _blocks(value: str) -> list[int]:
    try:
        blocks = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated block indices, e.g. 1,8,15,22") from None
    if not all(0 <= b <= V.MAX_INDEX for b in blocks):
        raise click.BadParameter(f"{value!r}: each index must be in 0..{V.MAX_INDEX}")
    return blocks


def model_options(f):
    """MODEL argument, or --model module:factory with --weights; options for official checkpoints."""
    f = click.option(
        "--stack-blocks",
        metavar="I,J,…",
        expose_value=False,
        callback=_official("stack_blocks", _blocks),
        help="Official SRFlow, NCSR, FS-NCSR, spline, LLFlow checkpoints: trunk blocks whose outputs condition "
        "the flow (network_G.flow.stackRRDB.blocks; not in the weights).",
    )(f)
    f = click.option(
        "--std-steps",
        metavar="S1,S2,…",
        expose_value=False,
        callback=_official("std_steps", _blocks),
        help="Official NCSR, FS-NCSR, spline checkpoints: per level, how many last steps use the noise sub-net "
        "(network_G.flow.S; not in the weights).",
    )(f)
    f = click.option(
        "--fs-ncsr/--no-fs-ncsr",
        default=None,
        expose_value=False,
        callback=_official("fs_ncsr"),
        help="Official NCSR, FS-NCSR, spline checkpoints: the flow models HR minus bicubic LR (divide_freq; "
        "same keys either way, so it must be said).",
    )(f)
    f = click.option(
        "--affine-eps",
        type=V.FiniteFloat(0, 1, min_open=True),
        expose_value=False,
        callback=_official("affine_eps"),
        help="Official SRFlow, NCSR, FS-NCSR, LLFlow checkpoints: the affine coupling's eps "
        "(network_G.flow.CondAffineSeparatedAndCond.eps; default 1e-4).",
    )(f)
    f = click.option(
        "--scale",
        type=V.SCALE,
        expose_value=False,
        callback=_official("scale"),
        help="Official SRFlow, NCSR, FS-NCSR, spline checkpoints: the upscaling factor (×2 and ×4 have the "
        "same keys; default 4).",
    )(f)
    f = click.option(
        "--official-config",
        type=click.Path(exists=True, dir_okay=False),
        expose_value=False,
        callback=_official("official_config"),
        help="Official checkpoints (SRFlow, NCSR, FS-NCSR, spline, LLFlow): the repository's YAML option file "
        "they were trained with; settles what the weights do not say.",
    )(f)
    f = max_parameters_option(f)
    f = click.option(
        "--random-init",
        is_flag=True,
        expose_value=False,
        callback=lambda c, p, v: c.meta.__setitem__("flowaudit.random_init", v),
        help="Audit --model's factory output untrained (without --weights it is refused); reported as untrained.",
    )(f)
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
    ctx = click.get_current_context()
    official = dict(ctx.find_object(CommandState).official)
    config = official.pop("official_config", None)
    adapter = load_model(
        factory or model_spec,
        weights=weights,
        trust=trust,
        max_parameters=max_parameters,
        official=official or None,
        official_config=config,
        random_init=bool(ctx.meta.get("flowaudit.random_init")),
    )
    line = getattr(adapter, "warning_line", lambda: None)()
    if line:
        click.echo(f"flowaudit: warning: {line}", err=True)
    return adapter


def _output_range(value: str | None) -> tuple[float, float] | None:
    from ..stats.risk import parse_range

    try:
        return None if value is None else parse_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--output-range") from None


def _layers(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _refuse_existing(out: str, overwrite: bool) -> None:
    """Claim ``out`` for this command (a second run on it gets exit 2), then refuse an existing one."""
    claim_output(click.get_current_context(), out, overwrite)


def _feature_settings(kw: dict) -> dict:
    """The encoder-feature options as :class:`~flowaudit.config.settings.Settings` fields."""
    return {"layers": _layers(kw["layers"]), "pooling": kw["pooling"], "estimator": kw["estimator"]}


def _start(model_spec, factory, weights, trust: bool, max_parameters: float, out, overwrite: bool, kw: dict):
    """The head of ``fit``, ``scan`` and ``attack``: join the ranks, claim ``out``, load the model.

    Returns ``(run context, out, adapter)``.
    """
    ctx = click.get_current_context()
    run, out = run_context(ctx, out, overwrite, kw["resume"], kw["max_memory"], kw["distributed"])
    return run, out, _adapter(model_spec, factory, weights, trust, max_parameters)


def _finish(obj: CommandState, run, report, out: str, overwrite: bool, key: str | None, fail_on: str) -> None:
    """The tail of ``scan`` and ``attack``: save the report (rank 0), print it, gate on ``--fail-on``.

    Exit 1 prints one line on stderr naming the rule that fired and on what; a ``violation`` gate that passes an
    unproven model says so in one line.
    """
    if leads(run):
        report.save(out, overwrite=overwrite)
    finish_run(run)
    if not leads(run):
        return
    _emit(obj, report, key=key)
    if not obj.json:
        click.echo(f"report: {Path(out) / 'report.html'}")
    if obj.junit:
        report.save_junit(obj.junit, fail_on)
    fired = report.gate(fail_on)
    if fired:
        click.echo(fired, err=True)
        sys.exit(1)
    if fail_on == "violation" and report.unproven_note():
        click.echo(report.unproven_note(), err=True)


def _junit_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--junit FILE: refused before the audit runs when its folder does not exist."""
    if value is not None and not Path(value).resolve().parent.is_dir():
        raise click.BadParameter(f"folder {Path(value).parent} does not exist", param_hint="--junit")
    ctx.ensure_object(CommandState).junit = value
    return value


def _quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.ensure_object(CommandState).quiet = True
    return value


def report_options(f):
    """``--junit FILE`` and ``--quiet``, shared by the commands that write an audit report."""
    f = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_quiet, help="No progress bars.")(f)
    return click.option(
        "--junit",
        type=click.Path(dir_okay=False),
        expose_value=False,
        callback=_junit_path,
        help="Also write JUnit XML: a test case per site and per --fail-on rule, failures with the reason.",
    )(f)


def _emit(obj: CommandState, report, key: str | None = None) -> None:
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
@threads_option
@json_option
@click.pass_obj
def inspect(obj: CommandState, model_spec, factory, weights, trust_checkpoint, max_parameters, list_, data, threshold):
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
    threads = obj.sampling.get("threads")
    _emit(obj, run_inspect(adapter, data, remark2_threshold=threshold, device=obj.device, threads=threads), key="model")


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
@threads_option
@json_option
@click.pass_obj
def fit(obj: CommandState, model_spec, factory, weights, trust_checkpoint, max_parameters, data, out, overwrite, **kw):
    """Fit the encoder-feature Gaussian of MODEL on --data and write stats.h5."""
    from ..audit import fit as run_fit

    run, out, adapter = _start(model_spec, factory, weights, trust_checkpoint, max_parameters, out, overwrite, kw)
    options = {"batch_size": kw["batch_size"] or 256, **_feature_settings(kw)}
    report = run_fit(adapter, data, run_settings(obj, run, **options), out=out if leads(run) else None, context=run)
    finish_run(run)
    if leads(run):
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
@sampling_options(10, "Samples K per input.", "Seed of the latents (recorded in the report).")
@click.option(
    "--fail-on",
    type=click.Choice(["never", "violation", "unproven", "risk"]),
    default="never",
    show_default=True,
    help="Exit 1 when a site violates Remark 2 (violation), when any site is not compliant on evidence or the "
    "model not certified (unproven), or when an input had an Inf/pixel error (risk).",
)
@click.option(
    "--output-range",
    metavar="LO,HI",
    callback=lambda c, p, v: _output_range(v),
    help="The error band: a sample value outside [LO, HI] is a pixel error (default: the model's valid range "
    "widened by half, or the targets' range widened by half; printed with its source).",
)
@layers_option
@pooling_option
@estimator_option
@threshold_option
@click.option(
    "--attack",
    "attack_budget",
    metavar="BUDGET",
    callback=lambda c, p, v: _budget(c, p, v) if v else None,
    help="Also attack 16 in-distribution conditions within BUDGET (see `flowaudit attack`): "
    "worst-case evidence per site.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Only %Inf, %PixelErr and the inverse-gain range, several inputs a pass; skips s_OOD, Remark 2, the "
    "certificate, the layer trace, the panel, plots and HTML (writes OUT/quick.json and says what it skipped).",
)
@run_options
@click.option(
    "--exact",
    is_flag=True,
    help="One input's K samples per inverse pass even for a small flow (which otherwise puts up to 1024 inputs in "
    "a pass: the same figures to float32 rounding, bit for bit where its kernels are batch-invariant).",
)
@report_options
@json_option
@click.pass_obj
def scan(obj: CommandState, model_spec, factory, weights, trust_checkpoint, max_parameters, data, out, overwrite, **kw):
    """The full audit of MODEL: traces, Remark 2, s_OOD and exploding-inverse risk."""
    from ..audit import scan as run_scan

    if kw["stats"] and kw["fit_data"]:
        raise click.UsageError("give --stats or --fit-data, not both")
    if kw["quick"]:
        return _quick(obj, model_spec, factory, weights, trust_checkpoint, max_parameters, data, out, overwrite, kw)
    run, out, adapter = _start(model_spec, factory, weights, trust_checkpoint, max_parameters, out, overwrite, kw)
    options = {**_feature_settings(kw), "remark2_threshold": kw["threshold"], "attack": kw["attack_budget"]}
    if kw["exact"] and kw["batched"]:
        raise click.UsageError("give --exact or --batched, not both")
    settings = run_settings(obj, run, kw["batched"], kw["exact"], **options)
    ood, stats, fit_data = kw["ood_data"], kw["stats"], kw["fit_data"]
    report = run_scan(
        adapter, data, settings, ood=ood, stats=stats, fit_data=fit_data, context=run, output_range=kw["output_range"]
    )
    _finish(obj, run, report, out, overwrite, None, kw["fail_on"])


_QUICK_REFUSES = ("stats", "fit_data", "attack_budget", "resume", "distributed", "junit")


def _quick(obj: CommandState, model_spec, factory, weights, trust, max_parameters, data, out, overwrite, kw) -> None:
    """``scan --quick``: the quick answer printed and written to ``OUT/quick.json``; the gate is not evaluated."""
    from ..audit import quick
    from ..utils.atomic import atomic_dir

    given = [k for k in _QUICK_REFUSES if kw.get(k)] + (["junit"] if obj.junit else [])
    if given or kw["fail_on"] != "never":
        what = sorted(
            {f"--{k.replace('_budget', '').replace('_', '-')}" for k in given}
            | ({"--fail-on"} if kw["fail_on"] != "never" else set())
        )
        raise click.UsageError(f"--quick answers without {', '.join(what)}: drop them, or drop --quick")
    _refuse_existing(out, overwrite)
    adapter = _adapter(model_spec, factory, weights, trust, max_parameters)
    answer = quick(
        adapter,
        data,
        run_settings(obj),
        ood=kw["ood_data"],
        output_range=kw["output_range"],
        max_memory=kw["max_memory"],
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "quick.json").write_text(json.dumps(_json_safe(answer), indent=1, allow_nan=False) + "\n")
    if obj.json:
        click.echo(json.dumps(_json_safe(answer), indent=2))
        return
    for name, r in answer["by_set"].items():
        g = r["inverse_gain"]
        gains = "none seen" if g["max"] is None else f"[{_num(g['min'])}, {_num(g['max'])}]"
        bad = f", {g['n_nonfinite']} non-finite" if g["n_nonfinite"] else ""
        click.echo(
            f"{name}: {r['n_inputs']} inputs, K = {answer['settings']['samples']}: %Inf {r['pct_inf']:.1f}, "
            f"%PixelErr {r['pct_pixel_err']:.1f}, inverse gain 1/c' {gains}{bad}"
        )
    band = answer["error_band"]
    click.echo(f"error band [{band['lo']:.6g}, {band['hi']:.6g}] ({band['source']})")
    click.echo("skipped (--quick): " + "; ".join(answer["skipped"]))
    click.echo(f"answer: {Path(out) / 'quick.json'}")


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _json_safe(v):
    """NaN and infinities as null (quick.json is strict JSON)."""
    import math

    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


@cli.command()
@click.option(
    "--out", type=click.Path(file_okay=False), default="flowaudit-demo", show_default=True, help="Report folder."
)
@overwrite_option
@device_option
@threads_option
@click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_quiet, help="No progress bars.")
@json_option
@click.pass_obj
def demo(obj: CommandState, out, overwrite):
    """The main job on the embedded default: bundled models, bundled data, side-by-side summary."""
    from ..demo import run_demo

    _refuse_existing(out, overwrite)
    threads = obj.sampling.get("threads")
    result = run_demo(out, device=obj.device, progress=obj.progress, overwrite=overwrite, threads=threads)
    click.echo(json.dumps(result["json"], indent=2) if obj.json else result["text"])


# -- the worst case ------------------------------------------------------------------------------


def _budget(ctx: click.Context, param: click.Parameter, value: str):
    """Parse a budget option (``linf:EPS``, ``l2:EPS``, ``box:LO,HI``, ``none``); a bad one exits 2."""
    from ..config.settings import read_budget

    return read_budget(value, param.opts[0])


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
    help="linf:EPS, l2:EPS, box:LO,HI (absolute bounds of every condition value) or none "
    "(distance to the first break). EPS may be a fraction: linf:8/255.",
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
    type=V.FiniteFloat(0, 1e6, min_open=True),
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
@click.option("--starts", type=V.BATCH, default=16, show_default=True, help="Attack the first N conditions of --data.")
@sampling_options(
    4,
    "Samples K (latents) per start.",
    "Seed of the latents (the scan's seeding).",
    batch=64,
    batch_help="Samples per inverse pass with --batched (the pass keeps its graph, so it costs more memory than a "
    "scan's; at most one shard of 16 starts). Exact passes (the default) run one start's K samples, whatever this "
    "says.",
)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Report folder (must not exist).")
@overwrite_option
@click.option(
    "--fail-on",
    type=click.Choice(["never", "broken"]),
    default="never",
    show_default=True,
    help="Exit 1 when the attack broke at least one start.",
)
@run_options
@report_options
@json_option
@click.pass_obj
def attack(
    obj: CommandState, model_spec, factory, weights, trust_checkpoint, max_parameters, data, out, overwrite, **kw
):
    """The worst case: gradient search on MODEL's conditions, inside a budget, for an exploding inverse.

    The starts run in shards of 16 kept in .<out>.work/ (--resume finishes an interrupted attack,
    --distributed shares them over torchrun ranks); each inverse pass is one start's K samples, so the
    report does not depend on --batch-size (--batched: several starts per pass). --max-memory is
    recorded but does not size the attack's passes (they keep their graph: --batch-size does).
    """
    from ..audit import attack as run_attack
    from ..config.settings import Search

    run, out, adapter = _start(model_spec, factory, weights, trust_checkpoint, max_parameters, out, overwrite, kw)
    how = Search(kw["budget"], kw["objective"], kw["steps"], kw["step_size"], rule=kw["step_rule"])
    settings = run_settings(obj, run, kw["batched"], attack=how, attack_starts=kw["starts"])
    report = run_attack(adapter, data, settings, context=run)
    _finish(obj, run, report, out, overwrite, "attack", kw["fail_on"])


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
