"""Write ``scan_figures.json``: the scan figures of the bundled toys (and one SR model) that ``test_regression.py`` pins.

Run once before a change that must keep outputs (``python tests/golden/make_scan_figures.py``);
the test then holds every later version to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).with_name("scan_figures.json")
MODELS = ("toy-affine", "toy-modified-rq-spline", "sr-affine-bounded")


def _sets(name: str):
    """Toys: fit 2000 train, scan 200 test + 200 OOD; SR: 32 / 16 / 16 demo patches."""
    if name.startswith("toy"):
        from flowaudit.reference_models.toy import toy_data

        return toy_data(2000, seed=0)[1], toy_data(200, seed=10_001)[1], toy_data(200, seed=10_001, ood=True)[1], 10
    import torch

    from flowaudit.demo import demo_sets
    from flowaudit.reference_models import data as d

    fit, test, _ = demo_sets("sr")
    # OOD: the test images enhanced with kernel H (EUrban, eq. S1), its own set whatever the demo shows
    chw = [(n, torch.from_numpy(a.copy()).permute(2, 0, 1)) for n, a in d.corpus("test")]
    enhanced = [(n, d.eurban(t).permute(1, 2, 0).numpy()) for n, t in chw]
    ood = d.SRPatches(enhanced, patch=32, scale=4, n=32, seed=102, augment=False)
    return fit.y[:32], test.y[:16], torch.stack([ood[i]["lr"] for i in range(16)]), 4


def figures(name: str) -> dict:
    """The pinned figures of one bundled model, seed 0, on CPU."""
    from flowaudit.adapters import load_model

    import flowaudit

    y_fit, y_in, y_ood, k = _sets(name)
    report = flowaudit.scan(load_model(name), y_in, ood=y_ood, fit_data=y_fit, samples=k, seed=0, device="cpu")
    data = json.loads(report.to_json())
    sites = [
        {
            "name": s["name"],
            "kind": s["kind"],
            "verdict": s["remark2"]["verdict"],
            "tail_ratio": s["remark2"]["tail_ratio"],
            "bound_ratio": s["remark2"]["bound_ratio"],
            "inverse_gain": {k: s["inverse_gain"][k] for k in ("min", "p50", "p99", "max")},
        }
        for s in data["model"]["sites"]
    ]
    by_set = data["risk"]["by_set"]
    s_ood = {
        k: np.quantile(np.asarray(v, dtype=float), [0, 0.25, 0.5, 0.75, 1]).tolist()
        for k, v in data["ood"]["s_ood"].items()
    }
    return {
        "sites": sites,
        "pct_pixel_err": {k: v["pct_pixel_err"] for k, v in by_set.items()},
        "pct_inf": {k: v["pct_inf"] for k, v in by_set.items()},
        "lr_psnr": {k: [v.get("lr_psnr_min"), v.get("lr_psnr_std")] for k, v in by_set.items()},
        "auroc_in_vs_ood": data["ood"]["auroc_in_vs_ood"],
        "s_ood_quantiles": s_ood,
        "layer_variance": {r["name"]: [r["in"]["variance"], r["ood"]["variance"]] for r in data["layers"]},
        "max_abs": [r["max_abs"] for r in data["inputs"][::8]],
        "explosion_layer": data["explosion_layer"],
    }


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps({name: figures(name) for name in MODELS}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
