"""Reproduce (or fail to reproduce) the 2D-toy exploding inverse of Hong et al. 2023 (§3.2.1, Fig. 2/3b).

Trains the toy flow of ``flowaudit.reference_models.toy`` with affine and
modified-RQ-spline couplings in two variants and prints, per trained model:

* the share of samples outside [-1, 1]² for in-distribution and OOD
  conditions (``y_OOD = y + [0.8, -0.8]``; 1000 test conditions, one
  ``z ~ N(0, I)`` each, τ = 1),
* the largest inverse gain 1/c' of each coupling in the inverse pass (OOD),
* the ratio OOD / in-distribution of the feature variance after every layer
  of the inverse pass (variance over the 1000 samples, summed over the two
  dimensions), in the order the inverse pass visits them: Aff4, IC4, AN4, …,
  Aff1, IC1, AN1 (numbers are the forward step index, as in ``trace_layers``).

Variants:

``default``
    ``Toy2D()`` as bundled: 16-d MLP encoder g(y), coupling NN of 4 hidden
    ReLU layers with PyTorch's default init and a zero-initialised last layer.
``official``
    The conditioner of the authors' 2D-toy modules (smhongok/robustNF,
    ``models/modules/FlowAffineCouplingsAblation2dToy.py`` and
    ``FlowRQsplineCouplingsAblation2dToy.py``): the raw 2-d condition y is
    concatenated with x_a (no encoder); every layer is a bias-free Linear with
    N(0, 0.05²) weights followed by a data-initialised ActNorm; 1 + 4 hidden
    ReLU layers of width 64; the affine output layer is again Linear + ActNorm
    (so the raw scale starts with unit spread, not at zero), the spline's is a
    zero Linear with gain exp(3·logs) (Glow's ``LinearZeros``).
``official-zeroout``
    Ablation: ``official`` with a zero-initialised affine output layer.

Checkpoints are cached in ``--out-dir`` (one file per variant/coupling/seed/
iters) so the table can be built over several calls, one training each.

Usage::

    python examples/toy_reproduction.py --iters 8000 --seeds 0 1 --out-dir runs/toy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from flowaudit.reference_models import build, load_checkpoint
from flowaudit.reference_models.recipes import TOY_SEED_TEST, TOY_TRAIN_SIZE
from flowaudit.reference_models.toy import Toy2D, toy_data
from flowaudit.reference_models.training import train
from torch import Tensor, nn

VARIANTS = ("default", "official", "official-zeroout")
COUPLINGS = ("affine", "modified-rq-spline")


# --------------------------------------------------------------------------- the official-style conditioner


class LinearActNorm(nn.Module):
    """Bias-free Linear (weights N(0, 0.05²)) followed by ActNorm: ``(W x + b) · exp(l)``.

    ``b`` and ``l`` are initialised on the first training batch so that every
    output unit has zero mean and unit variance (Glow's data-dependent init).
    """

    def __init__(self, d_in: int, d_out: int, weight_std: float = 0.05):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * weight_std)
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.logs = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.weight.T
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.bias.copy_(-h.mean(0))
                self.logs.copy_(-torch.log(h.std(0, unbiased=False) + 1e-6))
                self.initialized.fill_(True)
        return (h + self.bias) * torch.exp(self.logs)


class LinearZeros(nn.Module):
    """Zero-initialised Linear with a learnable output gain ``exp(3 · logs)`` (Glow)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.logs = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) * torch.exp(3 * self.logs)


def official_conditioner(
    d_in: int, d_out: int, hidden: int = 64, extra_hidden: int = 4, zero_out: bool = False
) -> nn.Sequential:
    """Linear+ActNorm → ReLU, then ``extra_hidden`` × (Linear+ActNorm → ReLU), then the output layer."""
    layers: list[nn.Module] = [LinearActNorm(d_in, hidden), nn.ReLU()]
    for _ in range(extra_hidden):
        layers += [LinearActNorm(hidden, hidden), nn.ReLU()]
    layers.append(LinearZeros(hidden, d_out) if zero_out else LinearActNorm(hidden, d_out))
    return nn.Sequential(*layers)


def make_model(variant: str, coupling: str) -> Toy2D:
    """A toy flow of the given variant (see module docstring)."""
    if variant == "default":
        return build("toy", dict(coupling=coupling))
    model = build("toy", dict(coupling=coupling, feature_dim=0))  # the condition enters raw
    zero_out = coupling != "affine" or variant == "official-zeroout"
    for step in model.flow:
        step.coupling.net = official_conditioner(1 + 2, step.coupling.site.params_per_dim, zero_out=zero_out)
    return model


# --------------------------------------------------------------------------- training and evaluation


def train_or_load(variant: str, coupling: str, seed: int, iters: int, out_dir: Path) -> Toy2D:
    """Train with the paper's recipe (Adam 5e-4, batch 1000, constant lr) or load the cached result."""
    path = out_dir / f"{variant}-{coupling}-s{seed}-it{iters}.pt"
    torch.manual_seed(seed)  # the same init whether trained now or rebuilt for loading
    model = make_model(variant, coupling)
    if path.exists():
        model.load_state_dict(load_checkpoint(path)["state_dict"])
        return model.eval()
    x_all, y_all = toy_data(TOY_TRAIN_SIZE, seed=seed)

    def batches(step: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, TOY_TRAIN_SIZE, (1000,), generator=gen)
        return x_all[idx], y_all[idx]

    print(f"training {path.name} ...", flush=True)
    train(
        model, batches, iters=iters, lr=5e-4, out=path, seed=seed, milestones=(), checkpoint_every=iters, progress=False
    )
    return model.eval()


@torch.no_grad()
def inverse_pass(model: Toy2D, y: Tensor, z: Tensor) -> tuple[Tensor, list[str], list[float], list[float]]:
    """Sample x = f⁻¹(z; y) layer by layer; return x, layer names, variances, max gain per coupling."""
    cond = model.encode(y)
    x, names, variances, gains = z, [], [], []
    for i in reversed(range(len(model.flow))):
        step = model.flow[i]
        x, log_gain = step.coupling(x, cond, reverse=True)
        names.append(f"Aff{i + 1}")
        variances.append(x.var(0).sum().item())
        gains.append(log_gain.exp().max().item())
        x, _ = step.invconv(x, reverse=True)
        names.append(f"IC{i + 1}")
        variances.append(x.var(0).sum().item())
        x, _ = step.actnorm(x, reverse=True)
        names.append(f"AN{i + 1}")
        variances.append(x.var(0).sum().item())
    return x, names, variances, gains


def evaluate(model: Toy2D, n: int = 1000) -> dict:
    """The measurements of the table for one model (fixed test conditions and latents)."""
    _, y_in = toy_data(n, seed=TOY_SEED_TEST)
    _, y_ood = toy_data(n, seed=TOY_SEED_TEST, ood=True)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    x_in, names, var_in, _ = inverse_pass(model, y_in, z)
    x_ood, _, var_ood, gains_ood = inverse_pass(model, y_ood, z)
    outside = lambda x: 100 * (x.abs() > 1).any(1).float().mean().item()  # noqa: E731
    return dict(
        out_in=outside(x_in),
        out_ood=outside(x_ood),
        max_gain=max(gains_ood),
        names=names,
        ratio=[o / i for o, i in zip(var_ood, var_in)],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=8000, help="training iterations (paper S1.2: 8000)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out-dir", type=Path, default=Path("runs/toy_reproduction"))
    ap.add_argument("--variants", nargs="+", default=["default", "official"], choices=VARIANTS)
    ap.add_argument("--couplings", nargs="+", default=list(COUPLINGS), choices=COUPLINGS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small MLPs run best on one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for variant in args.variants:
        for coupling in args.couplings:
            for seed in args.seeds:
                model = train_or_load(variant, coupling, seed, args.iters, args.out_dir)
                rows.append((variant, coupling, seed, evaluate(model)))

    names = rows[0][3]["names"]
    head = f"{'variant':<17}{'coupling':<19}{'seed':>4} {'%out in':>8} {'%out OOD':>9} {'max 1/s':>9}  "
    print(f"\niters={args.iters}; variance ratio OOD/in after each layer of the inverse pass:")
    print(head + " ".join(f"{n:>8}" for n in names))
    for variant, coupling, seed, r in rows:
        print(
            f"{variant:<17}{coupling:<19}{seed:>4} {r['out_in']:>8.1f} {r['out_ood']:>9.1f} {r['max_gain']:>9.3g}  "
            + " ".join(f"{v:>8.3g}" for v in r["ratio"])
        )


if __name__ == "__main__":
    main()
