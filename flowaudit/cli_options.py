"""What every ``flowaudit`` command shares: the context object and the options declared once.

``--device`` and ``--json`` are declared here once; their callbacks store the
values in the context object (:class:`Settings`), so commands read
``obj.device`` and ``obj.json`` instead of taking them as parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

__all__ = ["Settings", "UserError", "device_option", "json_option", "overwrite_option", "batch_option", "layers_option",
           "pooling_option", "estimator_option", "threshold_option"]


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


