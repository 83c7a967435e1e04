"""The paper's Table 1 / Table 2 columns and Fig. 4b for the bundled image models, measured by the scan.

SR (Table 1): %Inf, %PixelErr, LR-PSNR min and σ over K = 10 samples at τ = 0.9, on in-distribution
test patches of the embedded corpus and on their EUrban-style enhancement (kernel H, eq. S1).
Low-light (Table 2): %Inf, %PixelErr, and PSNR / SSIM of the mean of 10 samples (the paper's S1.4
second scheme) against the normal-light patch, on LOL-like test pairs and the VE-LOL-like OOD pairs.
Fig. 4b: the logistic fit of "has a pixel error" on s_OOD over all scanned inputs of each model.

Only the bundled checkpoints that are shipped are measured. Run:
``python examples/reproduce_paper.py [--out docs/paper]`` (writes ``table.md`` and ``fig4b.png``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from flowaudit.adapters import load_model
from flowaudit.reference_models import bundled

import flowaudit
from flowaudit.demo import demo_sets


def lowlight_quality(adapter, cs, samples: int = 10, temperature: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """Mean PSNR and SSIM of the 10-sample mean against the normal-light target (non-finite → saturated)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(seed)
    psnr, ssim = [], []
    with torch.no_grad():
        for y, x in zip(cs.y, cs.x):
            yk = y[None].repeat_interleave(samples, 0)
            mean = adapter.sample(yk, adapter.sample_latents(yk, temperature, g)).mean(0)
            est = torch.nan_to_num(mean, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1).permute(1, 2, 0).numpy()
            ref = x.permute(1, 2, 0).numpy()
            psnr.append(peak_signal_noise_ratio(ref, est, data_range=1.0))
            ssim.append(structural_similarity(ref, est, channel_axis=2, data_range=1.0))
    return float(np.mean(psnr)), float(np.mean(ssim))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/paper"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    lines, fits = [], {}
    for entry in bundled():
        if not entry["available"] or entry["name"].startswith("toy"):
            continue
        adapter = load_model(entry["name"])
        fit_set, in_set, ood_set = demo_sets(adapter.task, n_fit=256, n_test=96)
        rep = flowaudit.scan(adapter, in_set, ood=ood_set, fit_data=fit_set, device="cpu")
        fits[entry["name"]] = rep
        for name, cs in (("in", in_set), ("ood", ood_set)):
            r = rep["risk"]["by_set"][name]
            row = f"| {entry['name']} | {cs.description['name']} | {r['pct_inf']:.1f} | {r['pct_pixel_err']:.1f} |"
            if adapter.task == "sr":
                row += f" {r['lr_psnr_min']:.2f} | {r['lr_psnr_std']:.3f} | – | – |"
            else:
                p, s = lowlight_quality(adapter, cs)
                row += f" – | – | {p:.2f} | {s:.3f} |"
            lines.append(row)
    head = [
        "| model | test set | %Inf | %PixelErr | LR-PSNR min | LR-PSNR σ | PSNR (mean of 10) | SSIM |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    extra = []
    for name, rep in fits.items():
        fit = rep["risk"]["logistic"]
        ood = rep["ood"]
        ratios = [r["variance_ratio"] for r in rep["layers"] if "variance_ratio" in r]
        gains = [s["inverse_gain"]["max"] for s in rep["model"]["sites"] if "inverse_gain" in s]
        extra.append(
            f"- {name}: mean s_OOD in {ood['mean']['in']:.2f}, OOD {ood['mean']['ood']:.2f} "
            f"(AUROC {ood['auroc_in_vs_ood']:.3f}); largest 1/c' {max(gains):.3g}; largest OOD/in variance ratio "
            f"{max(ratios):.3g}, explosion layer (×100) {rep['explosion_layer'] or 'none'}; "
            + (
                f"P(pixel error) = σ({fit['intercept']:.3f} + {fit['coef']:.4f}·s_OOD)"
                if fit
                else "no logistic fit (one class only)"
            )
        )
    text = "\n".join(head + lines) + "\n\n" + "\n".join(extra) + "\n"
    (args.out / "table.md").write_text(text)
    print(text)
    _figure(fits, args.out / "fig4b.png")


def _figure(fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(fits)), figsize=(4 * max(1, len(fits)), 3.2), squeeze=False)
    for ax, (name, rep) in zip(axes[0], fits.items()):
        k = rep["risk"]["samples_per_input"]
        for set_name, colour in (("in", "tab:blue"), ("ood", "tab:red")):
            rs = [r for r in rep["inputs"] if r["set"] == set_name and r["s_ood"] is not None]
            ax.scatter(
                [r["s_ood"] for r in rs],
                [r["n_pixel_err"] / k for r in rs],
                s=8,
                color=colour,
                alpha=0.6,
                label=set_name,
            )
        fit = rep["risk"]["logistic"]
        s = np.array([r["s_ood"] for r in rep["inputs"] if r["s_ood"] is not None and np.isfinite(r["s_ood"])])
        if fit and len(s):
            xs = np.linspace(s.min(), s.max(), 200)
            ax.plot(xs, 1 / (1 + np.exp(-(fit["intercept"] + fit["coef"] * xs))), "k-", label="logistic")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("s_OOD")
        ax.set_ylabel("pixel-error rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
