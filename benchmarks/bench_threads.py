"""Threads and the quick answer: two ratios, each measured within one run.

**threads**: a small scan (``flowaudit.scan``, exact passes, no fit) with the default thread count
(:func:`flowaudit.config.threads.default_threads`) against every explicit count from 1 to the usable cores;
the row is default / best. **quick**: ``flowaudit.quick`` (%Inf, %PixelErr, inverse-gain range) against
a bare loop written with plain PyTorch (the same latents and batches: sample K per input, count the
non-finite and out-of-band samples, keep the smallest and largest ``1/c'`` a site reports); the row is
quick / bare. Arms take turns, round by round, after a warm-up; median [quartiles] of the per-round ratio.

    python benchmarks/bench_threads.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from flowaudit.adapters import load_model

import flowaudit
from flowaudit.config.sampling import Sampling
from flowaudit.config.threads import default_threads, usable_cores
from flowaudit.demo import demo_sets


def _quartiles(v: list[float]) -> str:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return f"**{q[1]:.2f}** [{q[0]:.2f}, {q[2]:.2f}]"


def bare_loop(adapter, y: torch.Tensor, k: int, tau: float, seed: int, per: int, band=(-0.5, 1.5)) -> dict:
    """What a user writes by hand: K samples per input, non-finite and out-of-band counts, the 1/c' range."""
    sampling = Sampling(k, tau, seed)

    class Range:
        low, high = float("inf"), 0.0

        def layer(self, name, x):
            pass

        def site(self, name, gain, params):
            g = gain.abs()
            g = g[torch.isfinite(g)]
            if g.numel():
                self.low, self.high = min(self.low, float(g.min())), max(self.high, float(g.max()))

    seen, n_inf, n_err = Range(), 0, 0
    with torch.no_grad():
        for start in range(0, len(y), per):
            yb = y[start : start + per]
            x = adapter.sample(sampling.repeat(yb), sampling.latents(adapter, yb, 0, start, torch.device("cpu")), seen)
            flat = x.flatten(1).reshape(len(yb), -1)
            n_inf += int((~torch.isfinite(flat)).any(1).sum())
            n_err += int((~((flat >= band[0]) & (flat <= band[1]))).any(1).sum())
    return {"pct_inf": 100 * n_inf / len(y), "pct_pixel_err": 100 * n_err / len(y), "gain": (seen.low, seen.high)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sr-affine")
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="threads,quick")
    args = ap.parse_args()
    adapter = load_model(args.model)
    _, test, _ = demo_sets(adapter.task, n_fit=8, n_test=args.inputs)
    y = test.y
    only = set(args.only.split(","))
    print(
        f"{args.model}, {len(y)} inputs, K = {args.samples}, usable cores {usable_cores()}, "
        f"default threads now {default_threads()}, torch {torch.__version__}"
    )

    if "threads" in only:
        counts = list(range(1, usable_cores() + 1))
        arms = {"default": None, **{str(n): n for n in counts}}
        times: dict[str, list[float]] = {a: [] for a in arms}

        def scan(threads):
            t = time.perf_counter()
            flowaudit.scan(adapter, y, samples=args.samples, device="cpu", threads=threads)
            return time.perf_counter() - t

        scan(1)  # warm-up (numba compile, caches)
        for r in range(args.rounds):
            order = list(arms)[r % len(arms) :] + list(arms)[: r % len(arms)]
            for a in order:
                times[a].append(scan(arms[a]))
        ratios = [times["default"][r] / min(times[str(n)][r] for n in counts) for r in range(args.rounds)]
        best = min(counts, key=lambda n: statistics.median(times[str(n)]))
        med = {a: statistics.median(v) for a, v in times.items()}
        print("| arm | median s |\n| --- | --- |")
        for a in arms:
            print(f"| threads {a} | {med[a]:.2f} |")
        print(f"threads: default / best (best median: {best}) = {_quartiles(ratios)}")

    if "quick" in only:
        torch.set_num_threads(1)
        per = 8

        def quick():
            t = time.perf_counter()
            out = flowaudit.quick(
                adapter, y, samples=args.samples, device="cpu", batch_size=per * args.samples, threads=1
            )
            return time.perf_counter() - t, out

        def bare():
            t = time.perf_counter()
            adapter.model.eval()
            out = bare_loop(adapter, y, args.samples, 0.9, 0, per)
            return time.perf_counter() - t, out

        (_, q), (_, b) = quick(), bare()
        qi, bi = q["by_set"]["in"], b
        assert (qi["pct_inf"], qi["pct_pixel_err"]) == (bi["pct_inf"], bi["pct_pixel_err"]), (qi, bi)
        ratios = []
        for r in range(args.rounds):
            if r % 2:
                tb, _ = bare()
                tq, _ = quick()
            else:
                tq, _ = quick()
                tb, _ = bare()
            ratios.append(tq / tb)
        print(f"quick: %Inf {qi['pct_inf']:.1f}, %PixelErr {qi['pct_pixel_err']:.1f} (bare loop: the same)")
        print(f"quick / bare loop = {_quartiles(ratios)}")


if __name__ == "__main__":
    main()
