"""Audit overhead: the inverse pass under the scan's tracer over the same pass bare, as ratios within one run.

For each model, bare (``adapter.sample(y, latents)``, no observer) and audited (the same call
with a :class:`~flowaudit.trace.Tracer` as observer — layer sums, inverse-gain histograms,
per-input gain figures, parameter reservoir — then ``tracer.end_batch``, as a scan does) run
alternately on the same latents under ``no_grad``, after one warm-up each, on one thread; the
figure is the best of ``--repeats`` each and the ratio is audited / bare (goal, issue 12:
≤ 1.05 on SR and low-light). As in a scan, one tracer takes the passes of a shard: it is made
once per model and mode and sees every audited pass.

Two modes, as a scan runs them:

* ``exact`` (the scan's default): one input's K samples a pass;
* ``batched`` (``--batched``): several inputs a pass.

Models (K samples per input; inputs per pass when batched):

* toy affine / modified-rq-spline (bundled): K = 10; 1 000 inputs (10 000 samples);
* SR affine / modified-rq-spline (built, seed 0, patch 32): LR inputs of 8×8, K = 8; 8 inputs
  (64 samples of 32×32);
* low-light affine / modified-rq-spline (bundled): inputs of 32×32, K = 8; 8 inputs (64 samples).

Run: ``python benchmarks/bench_audit.py [--repeats 10] [--runs 2] [--clock cpu] [--modes exact,batched]``.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from flowaudit.adapters import adapt
from flowaudit.layout import Sampling
from flowaudit.reference_models import build, load
from flowaudit.trace import Tracer

KINDS = ("affine", "modified-rq-spline")


def workloads() -> dict[tuple[str, str], tuple[torch.nn.Module, torch.Tensor, int]]:
    """(model, the batched pass's inputs already repeated K times, K) per (family, coupling)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    y_toy = torch.randn(10_000, 2, generator=g)
    for k in KINDS:
        out["toy", k] = (load(f"toy-{k}"), y_toy, 10)
    y_sr = torch.rand(8, 3, 8, 8, generator=g).repeat_interleave(8, 0)
    for k in KINDS:
        torch.manual_seed(0)
        out["sr", k] = (build("sr", dict(coupling=k, patch=32)).eval(), y_sr, 8)
    y_ll = torch.rand(8, 3, 32, 32, generator=g).repeat_interleave(8, 0)
    for k in KINDS:
        out["lowlight", k] = (load(f"lowlight-{k}"), y_ll, 8)
    return out


def measure(model, y: torch.Tensor, k: int, repeats: int, clock) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of bare and audited sampling, run alternately after a warm-up each.

    The audited pass is ``sample`` with the tracer as observer plus ``end_batch`` (where the
    CPU tracer summarizes the pass); one tracer sees every audited pass, as a scan shard's does.
    """
    adapter = adapt(model)
    latents = adapter.sample_latents(y, 0.9, torch.Generator().manual_seed(0))
    tracer = Tracer(Sampling(k, 0.9, 0))

    def audited():
        adapter.sample(y, latents, observer=tracer)
        tracer.end_batch(len(y) // k)

    fns = {"bare": lambda: adapter.sample(y, latents), "audited": audited}
    best = {name: float("inf") for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t = clock()
                fn()
                best[name] = min(best[name], clock() - t)
    return best["bare"], best["audited"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed runs of each (best of)")
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole benchmark to show the spread")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (on a shared box, leaves out the waits)")
    ap.add_argument("--only", default="", help="comma-separated families to run (toy, sr, lowlight)")
    ap.add_argument("--modes", default="exact,batched", help="exact (one input a pass, the scan's default), batched")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"best of {args.repeats}, {args.clock} clock, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    work = workloads()
    if args.only:
        work = {key: w for key, w in work.items() if key[0] in args.only.split(",")}
    print(f"{'run':>3} {'model':<9} {'coupling':<20} {'mode':<8} {'samples':>7} {'bare ms':>9} {'audited ms':>11} {'audit/bare':>11}")
    for run in range(1, args.runs + 1):
        for (family, kind), (model, y, k) in work.items():
            for mode in args.modes.split(","):
                ys = y[:k] if mode == "exact" else y
                bare, audited = measure(model, ys, k, args.repeats, clock)
                print(f"{run:>3} {family:<9} {kind:<20} {mode:<8} {len(ys):>7} {1e3 * bare:9.1f} {1e3 * audited:11.1f} "
                      f"{audited / bare:11.3f}", flush=True)


if __name__ == "__main__":
    main()
