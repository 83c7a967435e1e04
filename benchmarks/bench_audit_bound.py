r"""A lower bound of the audit overhead: what the tracer's compiled loops cost with nothing around them.

The *kernels* observer calls only the tracer's own compiled loops (:mod:`flowaudit.tracing.host_kernels`):
:func:`~flowaudit.tracing.host_kernels.site_counts` (every gain binned and counted per site and per input, every
row's extremes) and :func:`~flowaudit.tracing.host_kernels.layer_sums` (per input the count of finite values,
:math:`\sum v`, :math:`\sum v^2`, :math:`\max |v|` and the non-finite count). It leaves out the parameter
reservoir, per-input figures and a call's checks and bookkeeping, so it is a bound, not a design; after the timed
shards its site histograms are checked against the tracer's (equal counts, or the script fails).

Arms, one thread, on the workloads and protocol of ``bench_audit.py`` (``shard_rounds``): ``bare``, ``floor`` (an
observer that does nothing), ``tracer`` (as the scan makes it) and ``kernels``. Per round (a shard of 32 inputs)
each arm's time over bare's; the median over rounds and its quartiles.

Run: ``python benchmarks/bench_audit_bound.py [--only sr:affine:exact,…] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from bench_audit import BATCHED_INPUTS, Nothing, shard_rounds, workloads

from flowaudit.config.sampling import Sampling
from flowaudit.tracing.host_kernels import KEY_START, NB, NI, layer_sums, memory_rows, site_counts
from flowaudit.tracing.trace import Tracer, _HostScratch


class Kernels:
    """The tracer's compiled loops at each call and nothing else (module docstring); keeps per site its counts."""

    def __init__(self, samples: int):
        self.samples = samples
        self.every: dict[str, np.ndarray] = {}
        self.ext: dict[str, np.ndarray] = {}
        self.acc: dict[str, np.ndarray] = {}
        self.work = _HostScratch()  # the tracer's own temporaries and bit table
        self.inputs: dict[
            int, tuple[np.ndarray, np.ndarray, np.ndarray]
        ] = {}  # per-input counts and extremes, by inputs a call

    def site(self, name: str, gain: torch.Tensor, params: object) -> None:
        self._count(name, gain, False)

    def site_log(self, name: str, log_gain: torch.Tensor, params: object) -> None:
        """The tracer's loop given log-gains, as the bundled flows report them."""
        self._count(name, log_gain, True)

    def _count(self, name: str, gain: torch.Tensor, log: bool) -> None:
        g = gain.reshape(-1).numpy()
        rows, w = gain.shape[0], self.work
        n = rows // self.samples
        if n not in self.inputs:
            self.inputs[n] = (np.zeros((n, NI + 2), dtype=np.int64), np.full(n, -np.inf), np.full(n, np.inf))
        if name not in self.every:
            self.every[name], self.ext[name] = (
                np.zeros(NB + 2, dtype=np.int64),
                np.array([KEY_START, 0], dtype=np.int64),
            )
        site_counts(
            g.view(np.int32),
            g,
            log,
            self.samples,
            w.table,
            w.first_bits,
            w.log_first,
            self.every[name],
            self.ext[name],
            *self.inputs[n],
            w.rows(rows),
            w.hist,
            w.idx(g.size // rows),
            w.first,
            w.conv,
            w.convf,
        )

    def layer(self, name: str, x: torch.Tensor) -> None:
        n = max(1, x.shape[0] // self.samples)
        acc = self.acc.get(name)
        if acc is None:
            acc = self.acc[name] = np.zeros(5)
        v, rows = memory_rows(x.numpy(), n)
        layer_sums(v, v.view(np.int32), rows, n, acc, self.work.conv, self.work.convf)


def measure(model, y: torch.Tensor, k: int, inputs_per_pass: int, repeats: int) -> dict[str, list[float]]:
    """Per arm, its shard time over bare's in each round (process CPU time; ``bench_audit.shard_rounds``)."""
    sampling = Sampling(k, 0.9, 0)
    arms = {
        "bare": None,
        "floor": Nothing,
        "tracer": lambda: Tracer(sampling).start_at(0, 0),
        "kernels": lambda: Kernels(k),
    }
    times, obs = shard_rounds(model, y, k, inputs_per_pass, repeats, time.process_time, arms)
    state = obs["tracer"].state()
    for name, every in obs["kernels"].every.items():  # the bound did the tracer's binning: the same counts per site
        counts = state["gains"][name]  # bins 1…B, and g ≤ 0 or +inf counted among the non-finite
        if not (np.array_equal(every[1:-1], counts["counts"].numpy()) and every[0] + every[-1] == counts["ext"][1]):
            raise AssertionError(f"kernels: site {name}'s histogram differs from the tracer's")
    return {name: [t / b for t, b in zip(times[name], times["bare"])] for name in arms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed shards (median and quartiles over them)")
    ap.add_argument(
        "--only",
        default="sr:affine:exact,lowlight:affine:exact,sr:affine:batched",
        help="comma-separated family:coupling:mode",
    )
    args = ap.parse_args()
    if args.repeats < 2:
        ap.error("--repeats: at least 2 (quartiles)")
    work = workloads()
    specs = [tuple(spec.split(":")) for spec in args.only.split(",")]
    for spec in specs:
        if len(spec) != 3 or spec[:2] not in work or spec[2] not in ("exact", "batched"):
            ap.error(f"--only: {':'.join(spec)!r} is not family:coupling:mode (e.g. sr:affine:exact)")
    torch.set_num_threads(1)
    import numba  # a dependency of flowaudit's CPU tracer

    print(
        f"torch {torch.__version__}, numba {numba.__version__}, "
        f"{platform.processor() or platform.machine()}, 1 thread, "
        f"{args.repeats} shards, cpu clock, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    for family, kind, mode in specs:
        model, y, k = work[family, kind]
        ratios = measure(model, y, k, 1 if mode == "exact" else BATCHED_INPUTS, args.repeats)
        cells = []
        for v, r in ratios.items():
            if v != "bare":
                q = statistics.quantiles(r, n=4)
                cells.append(f"{v} {statistics.median(r):.3f} [{q[0]:.3f}, {q[2]:.3f}]")
        print(f"{family:<9} {kind:<20} {mode:<8} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
