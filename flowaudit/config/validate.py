"""Validators of numeric command-line options: finite values, a range per option, seeds the generator takes.

Click's ``FloatRange`` lets ``nan`` through (every comparison with NaN is false) and ``inf`` through an
open upper end; an ``int`` seed of ``2**64`` reaches ``torch.Generator.manual_seed`` and fails there
as an internal error; ``-k 10**12`` asks for more latents than any memory holds. The types here refuse
each of these where the option is parsed, so a bad value is one line and exit code 2,
and a value that gets past them is one the engine can use.
"""

from __future__ import annotations

import math
import re
from typing import Any

import click

__all__ = [
    "SEED_MAX",
    "MAX_SAMPLES",
    "MAX_BATCH",
    "FiniteFloat",
    "BoundedInt",
    "SEED",
    "SAMPLES",
    "BATCH",
    "finite",
    "check_seed",
]

#: Seeds feed ``torch.Generator.manual_seed`` and NumPy's ``default_rng``: 0 … 2**63 - 1 is what both take.
SEED_MAX = 2**63 - 1
#: Samples (latents) per input: far above the paper's K = 10, far below what exhausts memory at once.
MAX_SAMPLES = 100_000
#: Batch sizes, starts and counts of inputs: a bound on what one pass may be asked to hold.
MAX_BATCH = 2**31 - 1


def finite(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite float inside ``[lo, hi]``; ``ValueError`` naming ``name`` otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: {value!r} is not a finite number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name}: {value!r} is not in the range [{lo}, {hi}]")
    return v


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as an integer seed in ``0 … 2**63 - 1``; ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: {value!r} is not an integer")
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name}: {value} is outside the generator's range 0..2**63-1")
    return value


class FiniteFloat(click.FloatRange):
    """A ``FloatRange`` that also refuses ``nan`` and ``±inf``."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


class BoundedInt(click.IntRange):
    """An ``IntRange`` with both ends given; also reads ``1e3``-style integral values, and refuses the rest."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+(\.\d*)?[eE][+-]?\d+\s*", value):
            f = float(value)
            if not (math.isfinite(f) and f == int(f)):
                self.fail(f"{value!r} is not an integer.", param, ctx)
            value = int(f)
        return super().convert(value, param, ctx)


SEED = BoundedInt(0, SEED_MAX)
SAMPLES = BoundedInt(1, MAX_SAMPLES)
BATCH = BoundedInt(1, MAX_BATCH)
