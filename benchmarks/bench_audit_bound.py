r"""A lower bound of the audit overhead: the least any observer that bins every gain and sums every layer value pays.

``bench_audit.py`` times the scan's tracer. This benchmark asks what the cheapest observer doing the
core of the same work would cost on the same passes, to tell how far the tracer is from what is
possible at all. The *kernels* observer (compiled with numba, which this project does not depend on:
``pip install numba`` to run this) does, per call and with no copy:

* site: the inverse-gain bin of every gain (the tracer's own lookup, :class:`~flowaudit.binning.GainBins`'s
  table) counted into the site's histogram, and every row's largest and smallest gain;
* layer: per input, :math:`\sum v`, :math:`\sum v^2` and :math:`\max v^2` in float64, a chunk of 4096 at a time.

It leaves out what the tracer also does — per-input histograms and figures, the parameter reservoir,
non-finite values, mergeable state — so it is a bound, not a design. After the timed shards, its
site histograms are checked against the tracer's (equal counts, or the script fails), so the bound
times the real work.

Arms, in turn pass by pass (the order rotating), one thread, on the workloads of ``bench_audit.py``:
``bare``; ``floor`` (an observer that takes nothing: hooks and the adapter's reads); ``tracer``;
``kernels`` (hooks registered for every pass, as the adapters do); ``kernels, hooks once`` (on a copy of
the model whose hooks stay registered for the whole run and are removed at its end: what registering
hooks per pass costs). Per repeat (a shard of 32 inputs) each arm's total over bare; the median over
repeats and its quartiles.

Run: ``python benchmarks/bench_audit_bound.py [--only sr:affine:exact,…] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import copy
import platform
import statistics
import time

import numpy as np
import torch

try:
    import numba
except ImportError:  # an optional tool of this benchmark only
    print("bench_audit_bound.py: needs numba (pip install numba); flowaudit itself does not", file=sys.stderr)
    raise SystemExit(2) from None

from flowaudit.adapters import adapt
from flowaudit.adapters.hooks import first_tensor, hooked
from flowaudit.binning import GAIN_EDGES, GainBins
from flowaudit.layout import Sampling
from flowaudit.trace import Tracer

from bench_audit import BATCHED_INPUTS, Nothing, workloads

_TABLE = GainBins(GAIN_EDGES, torch.device("cpu")).table.numpy()


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _site(bits, rows, per, table, every, row_max, row_min):  # pragma: no cover - compiled
    for r in range(rows):
        top, low = np.int32(-2147483648), np.int32(2147483647)
        for j in range(r * per, (r + 1) * per):
            b = bits[j]
            every[np.int32(table[(b >> 16) & 0xFFFF] + b) >> 16] += 1  # flowaudit.binning's lookup (int32 wraps)
            top, low = max(top, b), min(low, b)  # positive float32 bits order like their values
        row_max[r], row_min[r] = top, low


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _layer(x, n, m, out):  # pragma: no cover - compiled
    for i in range(n):
        for c0 in range(i * m, (i + 1) * m, 4096):
            a0 = a1 = q0 = q1 = t0 = t1 = 0.0
            j, end = c0, min(c0 + 4096, (i + 1) * m)
            while j + 2 <= end:
                v0, v1 = np.float64(x[j]), np.float64(x[j + 1])
                a0, a1, q0, q1 = a0 + v0, a1 + v1, q0 + v0 * v0, q1 + v1 * v1
                t0, t1 = max(t0, v0 * v0), max(t1, v1 * v1)
                j += 2
            if j < end:
                v0 = np.float64(x[j])
                a0, q0, t0 = a0 + v0, q0 + v0 * v0, max(t0, v0 * v0)
            out[i, 0] += end - c0
            out[i, 1] += a0 + a1
            out[i, 2] += q0 + q1
            out[i, 3] = max(out[i, 3], t0, t1)


class Kernels:
    """Bins every gain and sums every layer value at the call (module docstring); keeps per site its histogram."""

    def __init__(self, samples: int):
        self.samples = samples
        self.every: dict[str, np.ndarray] = {}
        self.parts: dict[str, np.ndarray] = {}

    def site(self, name: str, gain: torch.Tensor, params: object) -> None:
        rows = gain.shape[0]
        every = self.every.get(name)
        if every is None:
            every = self.every[name] = np.zeros(len(GAIN_EDGES) + 1, np.int64)
        row_max, row_min = np.empty(rows, np.int32), np.empty(rows, np.int32)
        _site(gain.numpy().reshape(-1).view(np.int32), rows, gain.numel() // rows, _TABLE, every, row_max, row_min)

    def layer(self, name: str, x: torch.Tensor) -> None:
        n = max(1, x.shape[0] // self.samples)
        parts = self.parts.get(name)
        if parts is None or parts.shape[0] != n:
            parts = self.parts[name] = np.zeros((n, 4))
        _layer(x.numpy().reshape(-1), n, x.numel() // n, parts)


@contextlib.contextmanager
def hooked_once(model: torch.nn.Module, adapter, target: list):
    """A copy of ``model`` whose sites and layers report to ``target[0]`` while the block runs (reference flows),
    through the adapters' own :func:`~flowaudit.adapters.hooks.hooked`, registered once for the block."""
    twin = copy.deepcopy(model)
    sites = {s.name: s for s in adapter.sites()}

    def on_site(name, args, kwargs, output):
        got = sites[name].read(args, kwargs, output)
        if got is not None:
            target[0].site(name, *got)

    def on_layer(name, args, kwargs, output):
        target[0].layer(name, first_tensor(output).detach())

    with hooked(twin, list(sites), on_site), hooked(twin, adapter.layer_names(), on_layer):
        yield twin


def measure(model, y: torch.Tensor, k: int, inputs_per_pass: int, repeats: int) -> dict[str, list[float]]:
    """Per arm, its shard totals over bare per repeat (process CPU time), after a warm-up shard."""
    adapter = adapt(model)
    latents = adapter.sample_latents(y, 0.9, torch.Generator().manual_seed(0))
    rows = inputs_per_pass * k
    passes = [(y[i : i + rows], [z[i : i + rows] for z in latents]) for i in range(0, len(y), rows)]
    sampling = Sampling(k, 0.9, 0)
    target: list = [None]
    clock = time.process_time
    with torch.no_grad(), hooked_once(model, adapter, target) as twin:

        def run_twin(obs, yp, zp):
            target[0] = obs
            return twin.reverse(zp, yp)

        arms = {
            "bare": (lambda: None, lambda o, yp, zp: adapter.sample(yp, zp)),
            "floor": (Nothing, lambda o, yp, zp: adapter.sample(yp, zp, observer=o)),
            "tracer": (lambda: Tracer(sampling).start_at(0, 0), lambda o, yp, zp: adapter.sample(yp, zp, observer=o)),
            "kernels": (lambda: Kernels(k), lambda o, yp, zp: adapter.sample(yp, zp, observer=o)),
            "kernels, hooks once": (lambda: Kernels(k), run_twin),
        }
        names = list(arms)
        ratios: dict[str, list[float]] = {v: [] for v in names}
        for repeat in range(repeats + 1):
            total, obs = dict.fromkeys(names, 0.0), {}
            for v, (make, _) in arms.items():
                t = clock()
                obs[v] = make()
                total[v] += clock() - t
            for i, (yp, zp) in enumerate(passes):
                for v in names[i % len(names) :] + names[: i % len(names)]:
                    t = clock()
                    arms[v][1](obs[v], yp, zp)
                    if isinstance(obs[v], Tracer):
                        obs[v].end_batch(inputs_per_pass)
                    total[v] += clock() - t
            t = clock()
            state = obs["tracer"].state()
            total["tracer"] += clock() - t
            if repeat:  # the first shard warms up (and compiles the kernels)
                for v in names:
                    ratios[v].append(total[v] / total["bare"])
        for v in ("kernels", "kernels, hooks once"):  # the bound did the tracer's binning: the same counts per site
            for name, every in obs[v].every.items():
                kept = state["gains"][name]  # bins 1…B, and g ≤ 0 or +inf counted among the non-finite
                if not (np.array_equal(every[1:-1], kept["counts"].numpy()) and every[0] + every[-1] == kept["ext"][1]):
                    raise AssertionError(f"{v}: site {name}'s histogram differs from the tracer's")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed shards (median and quartiles over them)")
    ap.add_argument("--only", default="sr:affine:exact,lowlight:affine:exact,sr:affine:batched",
                    help="comma-separated family:coupling:mode")
    args = ap.parse_args()
    if args.repeats < 2:
        ap.error("--repeats: at least 2 (quartiles)")
    work = workloads()
    specs = [tuple(spec.split(":")) for spec in args.only.split(",")]
    for spec in specs:
        if len(spec) != 3 or spec[:2] not in work or spec[2] not in ("exact", "batched"):
            ap.error(f"--only: {':'.join(spec)!r} is not family:coupling:mode (e.g. sr:affine:exact)")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numba {numba.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
          f"{args.repeats} shards, cpu clock, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
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
