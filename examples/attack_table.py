"""The worst case for every bundled model: `flowaudit attack` at a few budgets, one table.

Images (SR ×4 and low-light): L∞ budgets of 2/255, 8/255 and 32/255 around test conditions, kept in
[0, 1]. Toy: boxes of 1×, 4× and 32× the range of its 1000 test conditions (centred on it), and
``none`` (no bound: the distance to the first break). Objective: the inverse log-determinant (the
toy also with the largest |x|); step rule Adam (the default). The first test conditions are the
starts; starts, samples and steps are kept small for a shared 2-core CPU and are printed with the table.

    python examples/attack_table.py > examples/attack_table.txt

Columns: broken (starts whose samples left the error band or went non-finite), non-finite (starts
with an Inf/NaN sample), the worst max |x| over
all starts and samples, the worst inverse gain 1/c' met along the pass, the median distance to the
first break (L∞, over the broken starts; – when none broke).
"""

from __future__ import annotations

import time

import torch
from flowaudit.adapters import load_model
from flowaudit.reference_models import bundled

from flowaudit import attack
from flowaudit.demo import demo_sets
from flowaudit.utils.format import fmt

TOY = dict(starts=16, samples=4, steps=100)
TOY_NONE_STEPS = 200
IMAGE = dict(starts=8, samples=2, steps=30)
IMAGE_BUDGETS = ("linf:2/255", "linf:8/255", "linf:32/255")


def toy_budgets(y: torch.Tensor) -> list[tuple[str, str]]:
    lo, hi = float(y.min()), float(y.max())
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    out = [(f"box {k}× range", f"box:{mid - k * half:.4g},{mid + k * half:.4g}") for k in (1, 4, 32)]
    return out + [("none", "none")]


def main() -> None:
    torch.set_num_threads(1)
    started = time.time()
    sets = {}
    print(
        f"# flowaudit attack on every bundled model (step rule adam, seed 0, τ = 0.9, CPU, torch {torch.__version__})"
    )
    print(
        f"# toy: {TOY['starts']} test conditions × K = {TOY['samples']}, {TOY['steps']} steps "
        f"({TOY_NONE_STEPS} for none); "
        f"images: {IMAGE['starts']} test conditions × K = {IMAGE['samples']}, {IMAGE['steps']} steps; "
        "default step sizes"
    )
    header = (
        "model",
        "objective",
        "budget",
        "spec",
        "broken",
        "non-finite",
        "worst max|x|",
        "worst 1/c'",
        "median dist. to break",
        "seconds",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for entry in bundled():
        if not entry["available"]:
            continue
        name = entry["name"]
        model = load_model(name)
        task = name.split("-")[0]
        if task not in sets:
            sets[task] = demo_sets(task, n_fit=2, n_test=max(TOY["starts"], IMAGE["starts"]))[1]
        cs = sets[task]
        budgets = toy_budgets(cs.y) if task == "toy" else [(f"L∞ {spec.split(':')[1]}", spec) for spec in IMAGE_BUDGETS]
        objectives = ("logdet", "max-abs") if task == "toy" else ("logdet",)
        for (label, budget), objective in ((b, o) for b in budgets for o in objectives):
            t0 = time.time()
            opts = dict(TOY if task == "toy" else IMAGE)
            if budget == "none":
                opts["steps"] = TOY_NONE_STEPS
            s = attack(model, cs, budget=budget, objective=objective, device="cpu", **opts)["attack"]["summary"]
            row = (
                name,
                objective,
                label,
                budget,
                f"{s['n_broken']}/{s['n_starts']}",
                f"{s['n_nonfinite_starts']}/{s['n_starts']}",
                fmt(s["worst_max_abs"]),
                fmt(s["worst_inverse_gain"]),
                fmt(s["median_distance_to_break"]),
                f"{time.time() - t0:.0f}",
            )
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"# total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
