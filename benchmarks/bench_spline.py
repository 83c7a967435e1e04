"""Spline cost: modified-RQ-spline (and rq-spline) over affine, same architecture, as ratios within one run.

Two workloads per architecture, each timed on every coupling kind in turn
(affine, modified-rq-spline, rq-spline, affine, …: interleaved, so a neighbour's
load hits all kinds alike), after a warm-up, on one thread; the figure is the
best of ``--repeats`` and the ratios are taken between those bests:

* sampling: the reverse pass ``model.reverse(latents, y)`` under ``no_grad``;
* training step: ``-log_prob(x, y).mean()`` forward, backward and one Adam step
  (``zero_grad`` included), as :func:`~flowaudit.reference_models.training.train`
  does it.

Architectures: the bundled SR flow (``sr-affine`` / ``sr-modified-rq-spline``
checkpoints, their config with the coupling swapped for rq-spline, which ships
no checkpoint) with LR inputs of 8×8 (HR 32×32) — sampling a batch of 32,
training a batch of 8 (the recipe's); and the bundled toy (``toy-*``
checkpoints) — sampling 10 000, training a batch of 1 000 (paper S1.2).

Run: ``python benchmarks/bench_spline.py [--repeats 15] [--runs 2]``. ``--sites``
adds the site-only times (the elementwise maps alone, on the SR injector's
shape) that show where a gap comes from.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from flowaudit.reference_models import CHECKPOINT_DIR, build, load, load_checkpoint
from flowaudit.reference_models.couplings import make_elementwise
from flowaudit.reference_models.toy import toy_data

KINDS = ("affine", "modified-rq-spline", "rq-spline")


def models(family: str) -> dict[str, torch.nn.Module]:
    """The three kinds of one architecture: bundled weights where shipped, else built (seed 0)."""
    out = {k: load(f"{family}-{k}") for k in ("affine", "modified-rq-spline")}
    config = dict(load_checkpoint(CHECKPOINT_DIR / f"{family}-affine.pt")["config"], coupling="rq-spline")
    torch.manual_seed(0)
    out["rq-spline"] = build(family, config).eval()
    return out


def sampling(model, y: torch.Tensor) -> Callable[[], object]:
    latents = model.sample_latents(y, 0.9, torch.Generator().manual_seed(0))

    def run():
        with torch.no_grad():
            return model.reverse(latents, y)

    return run


def training(model, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    model = copy.deepcopy(model).train()  # the bundled one stays as loaded
    opt = torch.optim.Adam(model.parameters(), lr=1e-6, betas=(0.9, 0.999))  # tiny lr: the weights barely move

    def run():
        opt.zero_grad(set_to_none=True)
        loss = -model.log_prob(x, y).mean()
        loss.backward()
        opt.step()
        return loss

    return run


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each function, run A, B, C, A, B, C, … after one warm-up each."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = clock()
            fn()
            best[k] = min(best[k], clock() - t)
    return best


def workloads() -> dict[tuple[str, str], dict[str, Callable[[], object]]]:
    g = torch.Generator().manual_seed(0)
    sr = models("sr")
    x_sr = torch.rand(8, 3, 32, 32, generator=g)
    y_sr = F.avg_pool2d(x_sr, 4)
    y_sr_sample = F.avg_pool2d(torch.rand(32, 3, 32, 32, generator=g), 4)
    toy = models("toy")
    x_toy, y_toy = toy_data(1000, seed=0)
    y_toy_sample = toy_data(10_000, seed=1)[1]
    return {
        ("sr", "sampling"): {k: sampling(m, y_sr_sample) for k, m in sr.items()},
        ("sr", "training"): {k: training(m, x_sr, y_sr) for k, m in sr.items()},
        ("toy", "sampling"): {k: sampling(m, y_toy_sample) for k, m in toy.items()},
        ("toy", "training"): {k: training(m, x_toy, y_toy) for k, m in toy.items()},
    }


def site_workloads() -> dict[tuple[str, str], dict[str, Callable[[], object]]]:
    """The elementwise maps alone on the SR level-1 injector's shape (32 × 12 × 16 × 16), forward and reverse."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 12, 16, 16, generator=g)
    out = {}
    for direction in ("forward", "reverse"):
        fns = {}
        for kind in KINDS:
            site = make_elementwise(kind)
            h = torch.randn(32, 12 * site.params_per_dim, 16, 16, generator=g)

            def run(site=site, h=h, reverse=direction == "reverse"):
                with torch.no_grad():
                    return site(x, h, reverse=reverse)

            fns[kind] = run
        out["site", direction] = fns
    fns = {}  # forward + backward through value and log-det, as training does
    for kind in KINDS:
        site = make_elementwise(kind)
        h = torch.randn(32, 12 * site.params_per_dim, 16, 16, generator=g).requires_grad_(True)
        xg = x.clone().requires_grad_(True)

        def run(site=site, h=h, xg=xg):
            y, ladj = site(xg, h)
            (y.sum() + ladj.sum()).backward()

        fns[kind] = run
    out["site", "fwd+bwd"] = fns
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per kind (best of)")
    ap.add_argument("--runs", type=int, default=2, help="repeat the whole benchmark to show the spread")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sites", action="store_true", help="also time the elementwise maps alone")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (on a shared box, leaves out the waits)",
    )
    ap.add_argument("--only", default="", help="comma-separated MODEL:WORKLOAD rows to run, e.g. sr:training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), best of {args.repeats}, {args.clock} clock, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    work = workloads()
    if args.sites:
        work.update(site_workloads())
    if args.only:
        work = {key: fns for key, fns in work.items() if ":".join(key) in args.only.split(",")}
    header = f"{'run':>3} {'model':<5} {'workload':<9} " + " ".join(f"{k + ' ms':>21}" for k in KINDS)
    header += f" {'modified/affine':>16} {'rq/affine':>10}"
    print(header)
    for run in range(1, args.runs + 1):
        for (family, what), fns in work.items():
            best = interleaved(fns, args.repeats, time.perf_counter if args.clock == "wall" else time.process_time)
            ms = " ".join(f"{1e3 * best[k]:21.2f}" for k in KINDS)
            print(
                f"{run:>3} {family:<5} {what:<9} {ms} {best['modified-rq-spline'] / best['affine']:16.2f}"
                f" {best['rq-spline'] / best['affine']:10.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
