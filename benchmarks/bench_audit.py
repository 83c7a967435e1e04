"""Audit overhead and coupling cost, as ratios measured within one run.

* audit vs bare sampling: the inverse pass with the tracer's hooks (layer
  statistics, inverse-gain histograms, parameter samples) against the same
  pass on the same latents with no observer;
* spline vs affine: bare sampling time of the modified-RQ-spline model over
  the affine one of the same architecture.

For the bundled toys (batch of 10 000 samples) and a small SR flow (batch 64
at 8×8 → 32×32). Run: ``python benchmarks/bench_audit.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from flowaudit.adapters import adapt
from flowaudit.reference_models import build, load
from flowaudit.layout import Sampling
from flowaudit.trace import Tracer


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(model, y: torch.Tensor, k: int, repeats: int) -> tuple[float, float]:
    adapter = adapt(model)
    g = torch.Generator().manual_seed(0)
    latents = adapter.sample_latents(y, 0.9, g)
    with torch.no_grad():
        bare = best_of(lambda: adapter.sample(y, latents), repeats)
        audited = best_of(lambda: adapter.sample(y, latents, observer=Tracer(Sampling(k, 0.9, 0))), repeats)
    return bare, audited


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    y_toy = torch.randn(10_000, 2)
    toy = {k: load(f"toy-{k}") for k in ("affine", "modified-rq-spline")}
    torch.manual_seed(0)
    sr = {k: build("sr", dict(coupling=k, patch=32)).eval() for k in ("affine", "modified-rq-spline")}
    y_sr = torch.rand(64, 3, 8, 8)
    results = {}
    for family, models, y, k in (("toy", toy, y_toy, 10), ("sr", sr, y_sr, 8)):
        for kind, model in models.items():
            bare, audited = measure(model, y, k, args.repeats)
            results[family, kind] = bare
            rows.append((family, kind, bare, audited, audited / bare))
    print(f"{'model':<5} {'coupling':<20} {'bare s':>9} {'audited s':>10} {'audit/bare':>11}")
    for family, kind, bare, audited, ratio in rows:
        print(f"{family:<5} {kind:<20} {bare:9.4f} {audited:10.4f} {ratio:11.2f}")
    for family in ("toy", "sr"):
        ratio = results[family, "modified-rq-spline"] / results[family, "affine"]
        print(f"{family}: spline / affine bare sampling time = {ratio:.2f}")


if __name__ == "__main__":
    main()
