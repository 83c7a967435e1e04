"""Small flows at scale: a scan against the library's own loop, and inspect's fixed cost, in one run.

For each flow — a conditional RQ-spline flow built with nflows (4 couplings, 8 bins), zuko's NSF (4
transforms, 8 bins), normflows' coupled RQ-spline flow (4 couplings, 8 bins), a FrEIA flow of 4 GLOW
couplings (affine, 3-layer subnets of width 32), masked affine autoregressive flows of nflows, zuko and normflows
(4 transforms, hidden width 32) and the bundled 2-D toys — and 1000 conditions × K = 4 samples:

* *bare*: the library's own sampling of the 4000 samples (``Flow.sample``, ``flow(y).sample``,
  ``model.sample``, ``inn(z, c=[y], rev=True)``, ``ReferenceFlow.reverse``) plus one forward pass of the same
  samples (``log_prob``, or the INN's forward with its log-determinant): the least a hand-written loop pays to
  answer %Inf and read the log-determinants;
* *scan*: ``flowaudit.scan(model, y, samples=4)`` (default passes: a small flow puts 1024 inputs in a pass);
* *inspect*: ``flowaudit.inspect(model)`` (no data: 64 drawn conditions).

The arms take turns after a warm-up (imports, compiled loops); each figure is the median over ``--repeats``
rounds, and the ratio scan / bare is taken within each round (its range over the rounds in brackets). Goals:
scan ≤ 3 × bare, inspect ≤ 2 s.

``--parts`` adds where a scan's time goes, in the same clock (medians over the rounds): *sampling* (the
sampling loop: latents, observed inverse passes, per-input records), *evidence* (the per-site entries: the
condition sweep and the tail probes under the swept and the kept parameters) and the rest (on a GPU: host time,
nothing synchronises inside a scan for it).

Run: ``python benchmarks/bench_scale.py [--repeats 3] [--threads 1] [--clock cpu] [--device cpu|cuda] [--parts]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

N_INPUTS, SAMPLES = 1000, 4


def _nflows_loop(flow: torch.nn.Module) -> tuple[torch.nn.Module, Callable, Callable]:
    """An nflows ``Flow`` with its own sampling and log-density."""

    def sample(y):
        return flow.sample(SAMPLES, context=y).reshape(-1, 2)

    def forward(x, y):
        return flow.log_prob(x, context=y.repeat_interleave(SAMPLES, 0))

    return flow, sample, forward


def _nflows() -> tuple[torch.nn.Module, Callable, Callable]:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import ResidualNet
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
    from nflows.transforms.permutations import ReversePermutation

    torch.manual_seed(0)
    steps = []
    for _ in range(4):
        net = lambda a, b: ResidualNet(a, b, hidden_features=32, context_features=2, num_blocks=2)  # noqa: E731
        steps += [
            PiecewiseRationalQuadraticCouplingTransform([1, 0], net, num_bins=8, tails="linear", tail_bound=3.0),
            ReversePermutation(2),
        ]
    return _nflows_loop(Flow(CompositeTransform(steps), StandardNormal([2])).eval())


def _zuko_loop(flow: torch.nn.Module) -> tuple[torch.nn.Module, Callable, Callable]:
    """A zuko conditional flow with its own sampling and log-density."""

    def sample(y):
        return flow(y).sample((SAMPLES,)).transpose(0, 1).reshape(-1, 2)

    def forward(x, y):
        return flow(y.repeat_interleave(SAMPLES, 0)).log_prob(x)

    return flow, sample, forward


def _zuko() -> tuple[torch.nn.Module, Callable, Callable]:
    import zuko

    torch.manual_seed(0)
    return _zuko_loop(zuko.flows.NSF(2, 2, transforms=4, bins=8, hidden_features=(32, 32)).eval())


def _freia() -> tuple[torch.nn.Module, Callable, Callable]:
    import math

    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)

    def subnet(c_in: int, c_out: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(c_in, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, c_out),
        )

    inn = Ff.SequenceINN(2)
    for k in range(4):
        inn.append(Fm.GLOWCouplingBlock, cond=0, cond_shape=(2,), subnet_constructor=subnet, clamp=2.0)
        inn.append(Fm.PermuteRandom, seed=k)
    inn.eval()

    def sample(y):
        yk = y.repeat_interleave(SAMPLES, 0)
        return inn(torch.randn(len(yk), 2, device=y.device), c=[yk], rev=True)[0]

    def forward(x, y):
        z, logdet = inn(x, c=[y.repeat_interleave(SAMPLES, 0)])
        return -0.5 * (z**2 + math.log(2 * math.pi)).sum(1) + logdet

    return inn, sample, forward


def _normflows_loop(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable, Callable]:
    """A normflows ``ConditionalNormalizingFlow`` with its own sampling and log-density."""

    def sample(y):
        yk = y.repeat_interleave(SAMPLES, 0)
        return model.sample(len(yk), context=yk)[0]

    def forward(x, y):
        return model.log_prob(x, context=y.repeat_interleave(SAMPLES, 0))

    return model, sample, forward


def _normflows() -> tuple[torch.nn.Module, Callable, Callable]:
    import normflows as nf

    torch.manual_seed(0)
    flows = []
    for k in range(4):
        flows += [
            nf.flows.CoupledRationalQuadraticSpline(
                2, 2, 32, num_context_channels=2, num_bins=8, tail_bound=3.0, reverse_mask=bool(k % 2)
            ),
            nf.flows.LULinearPermute(2),
        ]
    return _normflows_loop(nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(2), flows).eval())


def _nflows_maf() -> tuple[torch.nn.Module, Callable, Callable]:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.permutations import ReversePermutation

    torch.manual_seed(0)
    steps = []
    for _ in range(4):
        steps += [MaskedAffineAutoregressiveTransform(2, 32, context_features=2), ReversePermutation(2)]
    return _nflows_loop(Flow(CompositeTransform(steps), StandardNormal([2])).eval())


def _zuko_maf() -> tuple[torch.nn.Module, Callable, Callable]:
    import zuko

    torch.manual_seed(0)
    return _zuko_loop(zuko.flows.MAF(2, 2, transforms=4, hidden_features=(32, 32)).eval())


def _normflows_maf() -> tuple[torch.nn.Module, Callable, Callable]:
    import normflows as nf

    torch.manual_seed(0)
    flows = []
    for _ in range(4):
        flows += [nf.flows.MaskedAffineAutoregressive(2, 32, context_features=2), nf.flows.Permute(2)]
    return _normflows_loop(nf.ConditionalNormalizingFlow(nf.distributions.DiagGaussian(2), flows).eval())


def _toy(coupling: str) -> Callable[[], tuple[torch.nn.Module, Callable, Callable]]:
    def build():
        from flowaudit.reference_models import load

        model = load(f"toy-{coupling}").eval()

        def sample(y):
            yk = y.repeat_interleave(SAMPLES, 0)
            return model.reverse(model.sample_latents(yk, 0.9, torch.Generator().manual_seed(0)), yk)

        def forward(x, y):
            return model.log_prob(x, y.repeat_interleave(SAMPLES, 0))

        return model, sample, forward

    return build


FLOWS = {
    "nflows-rqs": _nflows,
    "zuko-nsf": _zuko,
    "normflows-rqs": _normflows,
    "freia-glow": _freia,
    "nflows-maf": _nflows_maf,
    "zuko-maf": _zuko_maf,
    "normflows-maf": _normflows_maf,
    "toy-affine": _toy("affine"),
    "toy-mrqs": _toy("modified-rq-spline"),
}


def _timed_parts(clock: Callable[[], float]) -> dict[str, float]:
    """Time spent in a scan's sampling loop and in its per-site evidence, summed into the returned dict (the
    engine's functions are wrapped where the scan looks them up; nothing else changes)."""
    import flowaudit.audit as audit
    import flowaudit.runs.runner as runner

    spent: dict[str, float] = {}

    def wrap(module, name: str, part: str) -> None:
        fn = getattr(module, name)

        def timed(*args, **kwargs):
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] = spent.get(part, 0.0) + clock() - t

        setattr(module, name, timed)

    wrap(runner, "sample_range", "sampling")
    wrap(audit, "site_entries", "evidence")
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default=",".join(FLOWS), help="comma-separated rows")
    ap.add_argument("--parts", action="store_true", help="also time a scan's sampling and evidence")
    ap.add_argument("--inputs", type=int, default=N_INPUTS, help="conditions (the goal is stated at 1000)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dev = torch.device(args.device)

    import flowaudit

    def timed(fn: Callable[[], object]) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = clock()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return clock() - t

    parts = _timed_parts(clock) if args.parts else None
    y = torch.randn(args.inputs, 2, generator=torch.Generator().manual_seed(1))
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.clock} clock, device {dev}, {args.inputs} conditions x {SAMPLES} samples, {args.repeats} rounds"
    )
    extra = " sampling s | evidence s | rest s |" if parts is not None else ""
    print("| flow | bare s | scan s | scan / bare | goal ≤ 3 | inspect s | goal ≤ 2 s | passes |" + extra)
    print("| --- " * (8 + 3 * bool(extra)) + "|")
    for name in args.only.split(","):
        model, sample, forward = FLOWS[name]()
        model.to(dev)
        yd = y.to(dev)

        def bare():
            with torch.no_grad():
                forward(sample(yd), yd)

        def scan():
            return flowaudit.scan(model, yd, samples=SAMPLES, device=str(dev))

        report = scan()  # warm-up: imports, compiled loops, first calls
        bare()
        flowaudit.inspect(model, device=str(dev))
        ratios, b_s, s_s, i_s, split = [], [], [], [], []
        for _ in range(args.repeats):
            b = timed(bare)
            if parts is not None:
                parts.clear()
            s = timed(scan)
            if parts is not None:
                sampled, evidence = parts.get("sampling", 0.0), parts.get("evidence", 0.0)
                split.append((sampled, evidence, s - sampled - evidence))
            i = timed(lambda: flowaudit.inspect(model, device=str(dev)))
            ratios.append(s / b)
            b_s.append(b), s_s.append(s), i_s.append(i)
        r, ins = statistics.median(ratios), statistics.median(i_s)
        p = report.data["settings"]["passes"]
        print(
            f"| {name} | {statistics.median(b_s):.3f} | {statistics.median(s_s):.3f} | "
            f"**{r:.2f}** ({min(ratios):.2f}–{max(ratios):.2f}) | "
            f"{'met' if r <= 3 else 'not met'} | **{ins:.2f}** | {'met' if ins <= 2 else 'not met'} | "
            f"{p['inputs_per_pass']} inputs a pass |"
            + ("".join(f" {statistics.median(col):.3f} |" for col in zip(*split)) if split else "")
        )


if __name__ == "__main__":
    main()
