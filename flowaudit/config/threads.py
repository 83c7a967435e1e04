r"""How many CPU threads a run gives torch: never more than the cores it may use, shared by its processes.

torch starts as many intra-op threads as the machine has cores, in every process. Under ``torchrun`` each
rank does so, and on a machine that other jobs keep busy the threads of one operation wait for each other at
every barrier: a small scan then runs several times slower than on one thread. The default here keeps

.. math:: \text{threads} \times \text{processes} \le \text{free cores},

where the cores are those this process may run on (CPU affinity, capped by a cgroup CPU quota) and the
processes are the local ranks of a ``torchrun`` (``LOCAL_WORLD_SIZE``). The default never reads the
machine's load: some kernels (oneDNN convolutions) split their sums by thread count, so a count that
followed the load would move figures in their last float32 bits from one run to the next. On a machine that
other jobs keep busy, give ``--threads 1``. A lower count set before the run (``torch.set_num_threads``,
``OMP_NUM_THREADS``) is kept; ``--threads N`` (``threads=`` in the API) sets the count exactly.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["usable_cores", "local_processes", "default_threads", "using_threads"]

_depth = 0  # open using_threads blocks: an inner one without a count keeps the outer one's


def _quota() -> float | None:
    """The cgroup CPU quota in cores (v2 ``cpu.max``, v1 ``cfs_quota_us``), ``None`` when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by the cgroup quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _quota()
    return max(1, min(cores, math.floor(quota)) if quota else cores)


def local_processes() -> int:
    """Processes of this run on this machine: ``torchrun``'s ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_threads(cores: int | None = None, processes: int | None = None, busy: float = 0.0) -> int:
    """Threads per process such that threads × processes ≤ the free cores (at least 1).

    ``busy`` is the number of cores the caller knows other jobs keep busy (the default reads no load: see above).
    """
    cores = usable_cores() if cores is None else cores
    processes = local_processes() if processes is None else processes
    free = max(1, cores - int(busy))
    return max(1, min(cores, free) // processes)


@contextlib.contextmanager
def using_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads set to ``threads`` for the block, restored on exit.

    ``None``: inside another such block, the count that block set; else :func:`default_threads`, or
    torch's current count where that is lower.
    """
    global _depth
    before = torch.get_num_threads()
    if threads is None:
        n = before if _depth else min(before, default_threads())
    else:
        n = int(threads)
    if n < 1:
        raise ValueError(f"threads must be at least 1, not {n}")
    torch.set_num_threads(n)
    _depth += 1
    try:
        yield n
    finally:
        _depth -= 1
        torch.set_num_threads(before)
