"""What every ``flowaudit`` command shares: the context object and the options declared once.

``--device`` and ``--json`` are declared here once; their callbacks store the
values in the context object (:class:`Settings`), so commands read
``obj.device`` and ``obj.json`` instead of taking them as parameters.

Interruption: :func:`install_signal_handlers` makes SIGTERM raise
``KeyboardInterrupt`` like SIGINT does, so one path unwinds both: the atomic
writers remove their temporary files and folders, the claim on ``--out`` is
released, and the group prints :func:`interrupted` (one line) and exits 130
(128 + SIGINT, the shell's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import contextlib
import os
import signal
from pathlib import Path

import click

__all__ = ["Settings", "UserError", "claim_output", "was_interrupted", "install_signal_handlers", "interrupted", "max_parameters_option", "device_option", "json_option", "overwrite_option", "batch_option", "layers_option",
           "pooling_option", "estimator_option", "threshold_option"]


@dataclass
class Settings:
    """The context object every command receives."""

    debug: bool = False
    quiet: bool = False
    device: str = "auto"
    json: bool = False
    command: str | None = None  # "flowaudit scan", "flowaudit train sr": set when a command claims its output
    out: str | None = None  # what the running command writes (claimed), for the interruption message
    keeps_partial: bool = False  # ``train``: a periodic checkpoint at ``out`` is complete, not partial

    @property
    def progress(self) -> bool:
        return not self.quiet and not self.json


class UserError(ValueError):
    """Bad input found inside a command (exit code 2, one line)."""


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


max_parameters_option = click.option("--max-parameters", type=click.FloatRange(1), default=2e9, show_default=True,
                                     help="Refuse a checkpoint whose model has more parameters (checked before allocating).")

EXIT_INTERRUPTED = 130
_SIGNAL: dict = {"name": "SIGINT", "received": False}


def install_signal_handlers() -> None:
    """SIGTERM raises ``KeyboardInterrupt`` (as SIGINT does), so both unwind through the same cleanup.

    Both handlers also note that a signal came (:func:`was_interrupted`): library code that turns the
    ``KeyboardInterrupt`` into another exception on its way up is still an interruption, not a bug.
    SIGINT keeps Python's behaviour (and stays ignored where the shell made it so).
    """

    def on_signal(signum, frame):
        _SIGNAL.update(name=signal.Signals(signum).name, received=True)
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
        signal.signal(signal.SIGTERM, on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, on_signal)


def was_interrupted() -> bool:
    """Whether SIGINT or SIGTERM arrived since :func:`install_signal_handlers`."""
    return bool(_SIGNAL["received"])


def interrupted(ctx: click.Context) -> str:
    """The one line said on an interruption: what was stopped and what is left at ``--out``."""
    obj = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    what = obj.command or " ".join(filter(None, ["flowaudit", ctx.invoked_subcommand]))
    if obj.out is None:
        left = "nothing was written"
    elif obj.keeps_partial and Path(obj.out).exists():
        left = f"{obj.out} keeps its last complete checkpoint (--resume continues from it)"
    else:
        left = f"nothing was written to {obj.out}"
    return f"flowaudit: interrupted ({_SIGNAL['name']}): {what} stopped; {left}"


def claim_output(ctx: click.Context, out: str, overwrite: bool = True, *, keeps_partial: bool = False) -> None:
    """Claim ``out`` for the rest of the command (two runs never write one target), then refuse an existing one.

    The claim (:func:`flowaudit.reference_models.atomic.claim`) is released when the command ends,
    however it ends; a second run on the same ``out`` gets a one-line ``FileExistsError`` (exit 2).
    """
    from .reference_models.atomic import claim

    ctx.with_resource(claim(out))
    obj = ctx.find_object(Settings)
    if obj is not None:
        obj.command, obj.out, obj.keeps_partial = ctx.command_path, str(out), keeps_partial
    if not overwrite and os.path.lexists(out):
        raise FileExistsError(f"{out} exists (use --overwrite)")
