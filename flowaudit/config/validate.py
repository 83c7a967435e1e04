"""Validators of numeric command-line options: finite values, a range per option, seeds the generator takes.

Click's ``FloatRange`` lets ``nan`` through (every comparison with NaN is false) and ``inf`` through an
open upper end; an ``int`` seed of ``2**64`` reaches ``torch.Generator.manual_seed`` and fails there
as an internal error; ``-k 10**12`` asks for more latents than any memory holds. The types here refuse
each of these where the option is parsed, so a bad value is one line and exit code 2,
and a value that gets past them is one the engine can use.
"""

from __future__ import annotations

import decimal
import math
import re
from typing import Any

import click

__all__ = [
    "SEED_MAX",
    "MAX_SAMPLES",
    "MAX_BATCH",
    "MAX_INDEX",
    "FiniteFloat",
    "BoundedInt",
    "MemorySize",
    "SEED",
    "SAMPLES",
    "BATCH",
    "THREADS",
    "ITERS",
    "PATCH",
    "COUNT",
    "TRAIN_BATCH",
    "SCALE",
    "WIDTH",
    "MEMORY",
    "MAX_MEMORY",
    "finite",
    "check_seed",
]

#: Seeds feed ``torch.Generator.manual_seed`` and NumPy's ``default_rng``: 0 … 2**63 - 1 is what both take.
SEED_MAX = 2**63 - 1
#: Samples (latents) per input: far above the paper's K = 10, far below what exhausts memory at once.
MAX_SAMPLES = 100_000
#: Batch sizes, starts and counts of inputs: a bound on what one pass may be asked to hold.
MAX_BATCH = 2**31 - 1
#: Block and step indices of official options (a trunk has tens of blocks, a level tens of steps).
MAX_INDEX = 9999
#: A memory budget above an exbibyte is no budget; the sizes derived from it would overflow 64-bit counts.
MAX_MEMORY = 2**60


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


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_UNITS.update({u + "B": 10 ** (3 * i) for i, u in enumerate("KMGTP", 1)})
_UNITS.update({u + "IB": 2 ** (10 * i) for i, u in enumerate("KMGTP", 1)})


class MemorySize(click.ParamType):
    """A memory size (``2GB``, ``512MiB``, ``1.5G``, a number of bytes) as bytes, between 1 byte and ``hi``.

    Parsed where the option is read, so ``nan``, ``-1GB``, ``0`` or ``1e400GB`` are one line before the
    run starts, and a size no machine has does not reach the batch arithmetic.
    """

    name = "size"

    def __init__(self, hi: int = MAX_MEMORY) -> None:
        self.hi = hi

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        else:
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
            unit = m.group(2).upper() if m else None
            if m is None or unit not in _UNITS:
                self.fail(f"{value!r} is not a memory size (e.g. 2GB, 512MiB or a number of bytes).", param, ctx)
            size = int(decimal.Decimal(m.group(1)) * _UNITS[unit])  # exact: 2**60 + 1 bytes is not 2**60
        if not 1 <= size <= self.hi:
            self.fail(f"{value!r} is not between 1 byte and {self.hi:,} bytes.", param, ctx)
        return size


SEED = BoundedInt(0, SEED_MAX)
SAMPLES = BoundedInt(1, MAX_SAMPLES)
BATCH = BoundedInt(1, MAX_BATCH)
#: CPU threads: torch keeps the count in a C ``int``; far above any machine's cores.
THREADS = BoundedInt(1, 4096)
#: Training iterations: the paper trains 8000; a billion is days of work, more is a typo.
ITERS = BoundedInt(1, 10**9)
#: Patch sizes cut from the embedded corpus, whose smallest image side is 300 pixels.
PATCH = BoundedInt(4, 256)
#: Counts of generated pairs or patches, and training batches: what memory holds at once.
COUNT = BoundedInt(1, 10**7)
#: Training batches of image patches: 4096 patches of 256² pixels already take gigabytes per step.
TRAIN_BATCH = BoundedInt(1, 4096)
#: Upscaling factors of official checkpoints (SR flows use 2, 4, 8; 64 leaves room and stays sane).
SCALE = BoundedInt(2, 64)
#: Layer widths given on the command line.
WIDTH = BoundedInt(0, 65536)
MEMORY = MemorySize()
