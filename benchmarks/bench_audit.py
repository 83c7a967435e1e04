"""Audit overhead: a scan shard's inverse passes under the scan's tracer over the same passes bare, as ratios.

A scan audits its inputs in shards of :data:`~flowaudit.runs.shards.SHARD_INPUTS` (32), each under a fresh
:class:`~flowaudit.tracing.trace.Tracer`. This benchmark runs one such shard of 32 distinct inputs four ways on the
same latents under ``no_grad``, one thread: *bare* (``adapter.sample(y, latents)``, no observer), *audited* (as
:mod:`flowaudit.runs.passes` runs it, ``tracer.end_batch`` after each pass and ``tracer.state()`` at the end),
the *floor* (the same hooks with :class:`Nothing`, an observer that does nothing) and *bare again* (an A/A check).
Each way runs on its own copy of the model (:func:`shard_rounds`) and the ways take turns pass by pass, the order
rotating; a round is the whole shard each way, after one warm-up round. Two figures per ratio: best / best over
``--repeats`` rounds, and the median [quartiles] of the ratio within a round (which cancels a drift of the
machine). Ratios: audited / bare (goal ≤ 1.05 on SR and low-light), floor / bare and bare again / bare. The
process runs under the allocator setting every scan runs under (:func:`~flowaudit.runs.memory.steady_allocator`,
which the CLI and the memory probe set): how long a pass keeps its tensors alive costs differently under it.

Modes, as a scan runs them: ``exact`` (the default: one input's K samples a pass, 32 passes) and ``batched``
(``--batched``: 8 inputs a pass, 4 passes). Models: toy affine / modified-rq-spline (K = 10), SR affine /
modified-rq-spline (trained; LR 8×8 or ``--sr-size``, K = 8, samples 4× the LR side), low-light affine /
modified-rq-spline (32×32, K = 8).

Run: ``python benchmarks/bench_audit.py [--repeats 5] [--runs 2] [--clock cpu] [--modes exact,batched]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
from flowaudit.adapters import adapt
from flowaudit.reference_models import load

from flowaudit.config.sampling import Sampling
from flowaudit.runs.memory import steady_allocator
from flowaudit.runs.shards import SHARD_INPUTS
from flowaudit.tracing.trace import Tracer

KINDS = ("affine", "modified-rq-spline")
BATCHED_INPUTS = 8  # inputs a batched pass


def workloads(sr_size: int = 8) -> dict[tuple[str, str], tuple[torch.nn.Module, torch.Tensor, int]]:
    """(model, a shard's inputs each repeated K times, K) per (family, coupling); SR conditions of
    ``sr_size``×``sr_size``."""
    g = torch.Generator().manual_seed(0)
    out = {}
    y_toy = torch.randn(SHARD_INPUTS, 2, generator=g).repeat_interleave(10, 0)
    for k in KINDS:
        out["toy", k] = (load(f"toy-{k}"), y_toy, 10)
    y_sr = torch.rand(SHARD_INPUTS, 3, sr_size, sr_size, generator=g).repeat_interleave(8, 0)
    for k in KINDS:
        out["sr", k] = (load(f"sr-{k}"), y_sr, 8)
    y_ll = torch.rand(SHARD_INPUTS, 3, 32, 32, generator=g).repeat_interleave(8, 0)
    for k in KINDS:
        out["lowlight", k] = (load(f"lowlight-{k}"), y_ll, 8)
    return out


class Nothing:
    """An observer that takes nothing: the floor of any observer (hooks and the adapter's reads)."""

    def layer(self, name: str, x: torch.Tensor) -> None:
        pass

    def site(self, name: str, gain: torch.Tensor, params: object) -> None:
        pass

    def site_log(self, name: str, log_gain: torch.Tensor, params: object) -> None:
        pass


def shard_rounds(
    model,
    y: torch.Tensor,
    k: int,
    inputs_per_pass: int,
    repeats: int,
    clock,
    arms: dict[str, Callable[[], object] | None],
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Per arm, its shard time in each of ``repeats`` rounds after a warm-up round, and the last round's observers.

    ``arms[name]`` makes the arm's observer for a shard (``None``: bare passes). Every arm runs on its own
    copy of the model, so that an arm's ``observing`` block (its hooks held for the shard, as a scan holds
    them) leaves the other arms' passes unhooked; the arms take turns pass by pass, the order rotating.
    An arm's time counts making its observer, entering its block, its passes (and ``end_batch``, for an observer
    that has one) and ``state()`` for a tracer.
    """
    copies = {name: adapt(copy.deepcopy(model)) for name in arms}
    names = list(arms)
    latents = copies[names[0]].sample_latents(y, 0.9, torch.Generator().manual_seed(0))
    rows = inputs_per_pass * k
    passes = [(y[i : i + rows], [z[i : i + rows] for z in latents]) for i in range(0, len(y), rows)]
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            total, obs = dict.fromkeys(names, 0.0), {}
            with contextlib.ExitStack() as held:
                for name, make in arms.items():
                    t = clock()
                    obs[name] = None if make is None else make()
                    if obs[name] is not None:
                        held.enter_context(copies[name].observing(obs[name]))
                    total[name] += clock() - t
                for i, (y_pass, z_pass) in enumerate(passes):
                    for name in names[i % len(names) :] + names[: i % len(names)]:
                        t = clock()
                        copies[name].sample(y_pass, z_pass, observer=obs[name])
                        if hasattr(obs[name], "end_batch"):  # a tracer (or a bound's observer) closes the pass
                            obs[name].end_batch(inputs_per_pass)
                        total[name] += clock() - t
            for name, o in obs.items():
                if isinstance(o, Tracer):
                    t = clock()
                    o.state()
                    total[name] += clock() - t
            if round_:  # the first round warms up
                for name in names:
                    times[name].append(total[name])
    return times, obs


def measure(model, y: torch.Tensor, k: int, inputs_per_pass: int, repeats: int, clock) -> dict[str, list[float]]:
    """Per way (bare, audited, floor and bare again, an A/A check of the protocol), its shard seconds in each round."""
    sampling = Sampling(k, 0.9, 0)
    arms = {"bare": None, "audited": lambda: Tracer(sampling).start_at(0, 0), "floor": Nothing, "bare again": None}
    return shard_rounds(model, y, k, inputs_per_pass, repeats, clock, arms)[0]


def paired(times: dict[str, list[float]], name: str) -> str:
    """Median [quartiles] over rounds of ``name``'s shard time over bare's in the same round."""
    q1, med, q3 = statistics.quantiles([a / b for a, b in zip(times[name], times["bare"])], n=4)
    return f"{med:.3f} [{q1:.3f}, {q3:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (best of; and the median of per-round ratios)")
    ap.add_argument("--runs", type=int, default=1, help="repeat the whole benchmark to show the spread")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (on a shared box, leaves out the waits)",
    )
    ap.add_argument("--only", default="", help="comma-separated families to run (toy, sr, lowlight)")
    ap.add_argument("--modes", default="exact,batched", help="exact (one input a pass, the scan's default), batched")
    ap.add_argument("--sr-size", type=int, default=8, help="side of the SR rows' LR conditions (multiple of 8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steady_allocator()  # as in a scan (module docstring)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"best of {args.repeats}, {args.clock} clock, SR LR {args.sr_size}×{args.sr_size}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    work = workloads(args.sr_size)
    if args.only:
        work = {key: w for key, w in work.items() if key[0] in args.only.split(",")}
    print(
        f"{'run':>3} {'model':<9} {'coupling':<20} {'mode':<8} {'samples/pass':>12} "
        f"{'bare shard ms':>14} {'audited ms':>11} "
        f"{'audit/bare':>11} {'floor/bare':>11} {'bare/bare':>10}   per round, median [quartiles]: {'audit/bare':<22} "
        f"{'floor/bare':<22} bare/bare"
    )
    for run in range(1, args.runs + 1):
        for (family, kind), (model, y, k) in work.items():
            for mode in args.modes.split(","):
                per_pass = 1 if mode == "exact" else BATCHED_INPUTS
                times = measure(model, y, k, per_pass, args.repeats, clock)
                bare, audited, floor, again = (min(t) for t in times.values())
                print(
                    f"{run:>3} {family:<9} {kind:<20} {mode:<8} {per_pass * k:>12} "
                    f"{1e3 * bare:14.1f} {1e3 * audited:11.1f} "
                    f"{audited / bare:11.3f} {floor / bare:11.3f} {again / bare:10.3f}   {'':<31}"
                    f"{paired(times, 'audited'):<22} {paired(times, 'floor'):<22} {paired(times, 'bare again')}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
