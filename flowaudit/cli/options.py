"""What every ``flowaudit`` command shares: the context object and the options declared once.

``--device``, ``--json`` and the sampling options are declared here once; their callbacks store the
values in the context object (:class:`CommandState`), so commands read ``obj.device``, ``obj.json``
and ``obj.sampling`` instead of taking them as parameters. The run's
:class:`~flowaudit.config.settings.Settings` is built from them once, by :func:`run_settings`.

Interruption: :func:`install_signal_handlers` makes SIGTERM raise
``KeyboardInterrupt`` like SIGINT does, so one path unwinds both: the atomic
writers remove their temporary files and folders, the claim on ``--out`` is
released, and the group prints :func:`interrupted` (one line) and exits 130
(128 + SIGINT, the shell's convention).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..config import validate as V

__all__ = [
    "CommandState",
    "UserError",
    "claim_output",
    "check_apart",
    "was_interrupted",
    "run_options",
    "run_context",
    "finish_run",
    "discard_fresh_work",
    "install_signal_handlers",
    "interrupted",
    "max_parameters_option",
    "device_option",
    "threads_option",
    "sampling_options",
    "run_settings",
    "leads",
    "json_option",
    "overwrite_option",
    "batch_option",
    "layers_option",
    "pooling_option",
    "estimator_option",
    "threshold_option",
]


@dataclass
class CommandState:
    """The context object every command receives: what the command line said, and what the command claimed."""

    debug: bool = False
    quiet: bool = False
    device: str = "auto"  # as given; parsed once, into the run's Settings
    json: bool = False
    sampling: dict = field(default_factory=dict)  # --samples, --temperature, --seed, --batch-size, --threads
    command: str | None = None  # "flowaudit scan", "flowaudit train sr": set when a command claims its output
    out: str | None = None  # what the running command writes (claimed), for the interruption message
    keeps_partial: bool = False  # ``train``: a periodic checkpoint at ``out`` is complete, not partial
    work: str | None = None  # the work folder of completed shards of fit / scan / attack (``--resume``)
    work_fresh: bool = False  # this run started the work folder (no --resume): a user error removes it
    official: dict = field(default_factory=dict)  # what an official checkpoint's weights cannot say (--fs-ncsr, …)
    junit: str | None = None  # --junit FILE: also write the gate's decision as JUnit XML

    @property
    def progress(self) -> bool:
        return not self.quiet and not self.json


class UserError(ValueError):
    """Bad input found inside a command (exit code 2, one line)."""


def _setting(name: str):
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        setattr(ctx.ensure_object(CommandState), name, value)
        return value

    return store


def _sampling(name: str):
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        ctx.ensure_object(CommandState).sampling[name] = value
        return value

    return store


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    expose_value=False,
    callback=_setting("device"),
    help="auto, cpu, cuda or cuda:N.",
)
json_option = click.option(
    "--json", is_flag=True, expose_value=False, callback=_setting("json"), help="Print machine-readable JSON on stdout."
)
threads_option = click.option(
    "--threads",
    type=V.THREADS,
    default=None,
    expose_value=False,
    callback=_sampling("threads"),
    help="CPU threads for torch (default: the free cores shared by the processes, so threads × processes never "
    "exceeds them; a lower OMP_NUM_THREADS is kept).",
)
BATCH_HELP = "Samples per inverse pass (default: as many as --max-memory allows; exact passes: K)."
batch_option = click.option("--batch-size", type=V.BATCH, default=None, help=BATCH_HELP)


def sampling_options(samples: int, samples_help: str, seed_help: str, batch: int | None = None, batch_help: str = ""):
    """``--samples``, ``--temperature``, ``--seed``, ``--batch-size``, ``--device`` and ``--threads``.

    All but ``--device`` are kept in ``obj.sampling``.
    """
    options = [
        click.option(
            "--samples",
            "-k",
            type=V.SAMPLES,
            default=samples,
            show_default=True,
            help=samples_help,
            expose_value=False,
            callback=_sampling("samples"),
        ),
        click.option(
            "--temperature",
            "-t",
            type=V.FiniteFloat(0, 100),
            default=0.9,
            show_default=True,
            help="Temperature τ of the latents.",
            expose_value=False,
            callback=_sampling("temperature"),
        ),
        click.option(
            "--seed",
            type=V.SEED,
            default=0,
            show_default=True,
            help=seed_help,
            expose_value=False,
            callback=_sampling("seed"),
        ),
        click.option(
            "--batch-size",
            type=V.BATCH,
            default=batch,
            show_default=batch is not None,
            help=batch_help or BATCH_HELP,
            expose_value=False,
            callback=_sampling("batch_size"),
        ),
        device_option,
        threads_option,
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def run_settings(obj: CommandState, run: Any = None, batched: bool = False, exact: bool = False, **more: Any) -> Any:
    """The run's :class:`~flowaudit.config.settings.Settings`, built once from the command line.

    ``run`` is the command's :class:`~flowaudit.runs.runner.Context`: a process group decides the device.
    ``--exact`` and ``--batched`` set the passes; neither leaves them to the command (``exact=None``).
    """
    from ..config.settings import Settings

    group = getattr(run, "group", None)
    device = obj.device if group is None else group.device
    passes = True if exact else (False if batched else None)
    return Settings(**obj.sampling, device=device, exact=passes, progress=obj.progress and leads(run), **more)


def leads(run: Any) -> bool:
    """Whether this process writes the output: no process group, or its rank 0."""
    group = getattr(run, "group", None)
    return group is None or group.leader


layers_option = click.option("--layers", help="Comma-separated encoder module names to hook (default: the adapter's).")
pooling_option = click.option(
    "--pooling",
    type=click.Choice(["avg", "avgstd"]),
    default="avg",
    show_default=True,
    help="Per-channel pooling of hooked features.",
)
estimator_option = click.option(
    "--estimator",
    type=click.Choice(["ledoit-wolf", "oas", "empirical"]),
    default="ledoit-wolf",
    show_default=True,
    help="Covariance estimator.",
)
threshold_option = click.option(
    "--threshold", type=V.FiniteFloat(0, 1), default=0.5, show_default=True, help="Remark 2 tail-ratio threshold."
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing --out.")


max_parameters_option = click.option(
    "--max-parameters",
    type=V.FiniteFloat(1, 1e15),
    default=2e9,
    show_default=True,
    help="Refuse a checkpoint whose model has more parameters (checked before allocating).",
)

EXIT_INTERRUPTED = 130


def install_signal_handlers() -> None:
    """SIGTERM raises ``KeyboardInterrupt`` (as SIGINT does), so both unwind through the same cleanup.

    Both handlers also note that a signal came (:func:`was_interrupted`, kept by the atomic writers, which then
    publish nothing more: :func:`~flowaudit.utils.atomic.request_stop`): library code that turns
    the ``KeyboardInterrupt`` into another exception on its way up is still an interruption, not a bug, and one
    that swallows it does not let the command write its output. SIGINT keeps Python's behaviour (and stays
    ignored where the shell made it so). A finaliser that swallows the ``KeyboardInterrupt`` would have Python
    print it with a traceback; that one is dropped silently, since the command says in one line that it was
    interrupted.
    """
    from ..utils.atomic import request_stop

    def on_signal(signum, frame):
        request_stop(signal.Signals(signum).name)
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
        signal.signal(signal.SIGTERM, on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, on_signal)
        if not hasattr(sys.unraisablehook, "wrapped"):  # once a process
            sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)


def _quiet_interrupts(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """``hook`` for every unraisable exception but the ``KeyboardInterrupt`` of a signal already noted."""

    def quiet(unraisable: Any) -> None:
        if not (issubclass(unraisable.exc_type, KeyboardInterrupt) and was_interrupted()):
            hook(unraisable)

    quiet.wrapped = hook
    return quiet


def was_interrupted() -> bool:
    """Whether SIGINT or SIGTERM arrived since :func:`install_signal_handlers`."""
    from ..utils.atomic import stop_requested

    return stop_requested() is not None


def interrupted(ctx: click.Context) -> str:
    """The one line said on an interruption: what was stopped and what is left at ``--out``."""
    obj = ctx.obj if isinstance(ctx.obj, CommandState) else CommandState()
    what = obj.command or " ".join(filter(None, ["flowaudit", ctx.invoked_subcommand]))
    if obj.out is None:
        left = "nothing was written"
    elif obj.keeps_partial and Path(obj.out).exists():
        left = f"{obj.out} keeps its last complete checkpoint (--resume continues from it)"
    else:
        left = f"nothing was written to {obj.out}"
    if obj.work is not None and Path(obj.work).exists():
        left += f"; completed shards are kept in {obj.work}: rerun the same command with --resume {obj.work} to finish"
    from ..utils.atomic import stop_requested

    return f"flowaudit: interrupted ({stop_requested() or 'SIGINT'}): {what} stopped; {left}"


def claim_output(ctx: click.Context, out: str, overwrite: bool = True, *, keeps_partial: bool = False) -> None:
    """Claim ``out`` for the rest of the command (two runs never write one target), then refuse an existing one.

    The claim (:func:`flowaudit.utils.atomic.claim`) is released when the command ends,
    however it ends; a second run on the same ``out`` gets a one-line ``FileExistsError`` (exit 2).
    """
    from ..utils.atomic import claim

    ctx.with_resource(claim(out))
    obj = ctx.find_object(CommandState)
    if obj is not None:
        obj.command, obj.out, obj.keeps_partial = ctx.command_path, str(out), keeps_partial
    check_apart(ctx, out)
    if not overwrite and os.path.lexists(out):
        raise FileExistsError(f"{out} exists (use --overwrite)")


#: Parameters that name what a command writes, or its own work folder: not inputs to keep apart from the output.
_WRITTEN = ("out", "junit", "resume")


def _inputs(ctx: click.Context) -> list[tuple[str, str]]:
    """``(option, path)`` of each parameter of the command whose value names an existing file or folder."""
    found = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        names_a_path = isinstance(p.type, click.Path) or isinstance(p, click.Argument)
        if p.name in _WRITTEN or not names_a_path or not isinstance(value, (str, os.PathLike)) or not value:
            continue
        with contextlib.suppress(OSError, ValueError):
            if os.path.lexists(value):
                name = next((o for o in p.opts if o.startswith("--")), p.human_readable_name)
                found.append((name, os.fspath(value)))
    return found


def _within(inner: str, outer: str) -> bool:
    """Whether path ``inner`` is ``outer`` or lies under it, symbolic links resolved."""
    a, b = os.path.realpath(inner), os.path.realpath(outer)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_apart(ctx: click.Context, out: str | os.PathLike[str]) -> None:
    """Refuse an output that is, or would replace a folder holding, one of the command's inputs.

    ``fit --data d.npz --out d.npz --overwrite`` would replace the data with statistics, ``scan --out DIR
    --overwrite`` over the image folder it reads would delete it, ``--junit`` onto ``--out`` or an input
    likewise; one line (exit 2) names both, before anything is read or written. An output *inside* an input
    folder is allowed: the readers take only the folder's own images and pair sub-folders.
    """
    inputs = _inputs(ctx)
    obj = ctx.find_object(CommandState)
    junit = obj.junit if obj is not None else None
    outputs = [("--out", os.fspath(out))] + ([("--junit", os.fspath(junit))] if junit else [])
    for option, path in outputs:
        for name, given in inputs:
            if _within(given, path):
                what = "is" if _within(path, given) else "holds"
                raise UserError(f"{option} {path} {what} {name} {given}: writing it would destroy the input")
    if junit and _within(os.fspath(junit), os.fspath(out)):
        raise UserError(f"--junit {junit} is inside --out {out}: write it beside the report")


# -- long runs: shards, resume, memory, ranks (flowaudit.runs.runner) ----------------------------------


def run_options(f):
    """``--resume``, ``--max-memory``, ``--batched`` and ``--distributed`` of ``fit``, ``scan`` and ``attack``."""
    f = click.option(
        "--distributed",
        is_flag=True,
        help="Share the inputs over the ranks of a torchrun (gloo on CPU, NCCL on GPU); rank 0 writes the output.",
    )(f)
    f = click.option(
        "--batched",
        is_flag=True,
        help="Several inputs per inverse pass (faster on small models; the "
        "figures may then change in the last bits with --batch-size on kernels that are not batch-invariant).",
    )(f)
    f = click.option(
        "--max-memory",
        metavar="SIZE",
        type=V.MEMORY,
        help="Memory budget that sizes the batches, e.g. 2GB "
        "(default: half the available RAM, or 80 %% of the free GPU memory).",
    )(f)
    f = click.option(
        "--resume",
        metavar="WORK",
        type=click.Path(),
        help="Finish an interrupted run from its work folder "
        "(.<out>.work beside --out); the options must be the original ones.",
    )(f)
    return f


def run_context(
    ctx: click.Context, out: str | None, overwrite: bool, resume: str | None, max_memory: str | None, distributed: bool
) -> tuple[Any, str]:
    """Join the ranks, claim ``out`` (rank 0) and name the work folder; ``(runner.Context, out)``.

    ``--resume`` takes the work folder (or the output it belongs to); ``--out`` may then be left out.
    """
    from ..runs.memory import steady_allocator
    from ..runs.runner import Context
    from ..runs.shards import work_path

    steady_allocator()  # the CLI owns its process: keep freed tensors from staying resident (flowaudit.runs.memory)
    if resume is not None:
        work = Path(resume)
        owner = (
            work.with_name(work.name[1 : -len(".work")])
            if work.name.startswith(".") and work.name.endswith(".work")
            else work
        )
        if out is not None and Path(os.path.abspath(out)) != Path(os.path.abspath(owner)):
            raise UserError(f"--resume {resume} is the work folder of {owner}, not of --out {out}")
        out = str(owner)
    if out is None:
        raise click.UsageError("give --out (or --resume WORK of an interrupted run)")
    group = None
    if distributed:
        from ..runs.distributed import init_group

        obj = ctx.find_object(CommandState)
        group = init_group(obj.device if obj is not None else "auto")
        ctx.call_on_close(group.close)
    work = work_path(out)
    refused = None
    if group is None or group.leader:
        try:
            claim_output(ctx, out, overwrite)
        except FileExistsError as exc:
            refused = exc
        if refused is None and overwrite and resume is None and work.exists():
            import shutil

            shutil.rmtree(work)  # --overwrite starts again
    if group is not None:  # every rank stops when rank 0 may not write --out
        said = next((m for m in group.all_gather(None if refused is None else str(refused)) if m), None)
        if said is not None and refused is None:
            refused = FileExistsError(said)
    if refused is not None:
        raise refused
    obj = ctx.find_object(CommandState)
    if obj is not None:
        obj.work, obj.work_fresh = str(work), resume is None and not work.exists()
    return Context(work_dir=work, resume=resume is not None, group=group, max_memory=max_memory), out


def discard_fresh_work(ctx: click.Context) -> None:
    """After a user error (exit 2), remove the work folder this run started: nothing is left behind.

    A resumed run's folder holds shards the user asked to keep; it stays. An interruption keeps either (the
    one line says how to resume), and so does an internal error, whose shards may help to reproduce it.
    """
    obj = ctx.find_object(CommandState)
    if obj is not None and obj.work_fresh and obj.work is not None:
        import shutil

        shutil.rmtree(obj.work, ignore_errors=True)


def finish_run(run: Any) -> None:
    """The output is in place: drop the work folder (rank 0, after every rank is done)."""
    if run.group is not None:
        run.group.barrier()
    if run.work is not None and (run.group is None or run.group.leader):
        run.work.remove()
