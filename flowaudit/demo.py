"""``flowaudit demo``: the audit on the embedded default, side by side.

For each bundled checkpoint that is shipped, fit the encoder-feature Gaussian
on its training conditions, scan in-distribution test conditions and their OOD
counterparts (toy: the paper's ``y + [0.8, -0.8]``; images: the generated
OOD sets), and print one comparison table. Nothing is downloaded.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import torch

from .io.datasets import ConditionSet
from .utils.format import fmt, jsonable, text_table

__all__ = ["run_demo", "demo_sets"]


def _set(
    y: torch.Tensor, name: str, x: torch.Tensor | None = None, ids: list[str] | None = None, **desc
) -> ConditionSet:
    ids = ids if ids is not None else [f"{name}{i}" for i in range(len(y))]
    return ConditionSet(y=y, x=x, ids=ids, description={"kind": "bundled", "name": name, "n": len(y), **desc})


def _patch_set(ds, ykey: str, xkey: str, name: str, **desc) -> ConditionSet:
    items = [ds[i] for i in range(len(ds))]
    y = torch.stack([it[ykey] for it in items])
    x = torch.stack([it[xkey] for it in items])
    return _set(y, name, x, ids=[f"{name}:{n}" for n in ds.names], **desc)


def demo_sets(task: str, n_fit: int = 128, n_test: int = 32) -> tuple[ConditionSet, ConditionSet, ConditionSet]:
    """(fit, in-distribution, OOD) condition sets of the embedded default for ``task``.

    Toy: 5000 training conditions, 1000 test pairs and their ``y + [0.8, -0.8]`` shift.
    SR: LR patches of the training images; of the test images; of the test images enhanced
    with the paper's kernel H (EUrban, eq. S1). Low-light: LOL-like darkening of training and
    test images; the VE-LOL-like darkening of the test images as OOD.
    """
    if task == "toy":
        from .reference_models.recipes import TOY_SEED_TEST
        from .reference_models.toy import toy_data

        _, y_fit = toy_data(5000, seed=0)
        x_in, y_in = toy_data(1000, seed=TOY_SEED_TEST)
        x_ood, y_ood = toy_data(1000, seed=TOY_SEED_TEST, ood=True)
        return (
            _set(y_fit, "train", seed=0),
            _set(y_in, "test", x_in, seed=TOY_SEED_TEST),
            _set(y_ood, "ood", x_ood, seed=TOY_SEED_TEST, shift=[0.8, -0.8]),
        )
    from .reference_models import data as d

    if task == "sr":
        test = d.corpus("test")
        enhanced = [
            (n, d.eurban(torch.from_numpy(a.copy()).permute(2, 0, 1)).permute(1, 2, 0).numpy()) for n, a in test
        ]

        def sr(images, n, seed, name, **desc):
            return _patch_set(
                d.SRPatches(images, patch=32, scale=4, n=n, seed=seed, augment=False), "lr", "hr", name, **desc
            )

        return (
            sr(d.corpus("train"), n_fit, 101, "train", split="train"),
            sr(test, n_test, 102, "test", split="test"),
            sr(enhanced, n_test, 102, "eurban", split="test", transform="eurban (eq. S1)"),
        )
    if task == "lowlight":

        def ll(images, darkening, n, seed, name, **desc):
            pairs = d.lowlight_pairs(images, darkening, seed=seed)
            return _patch_set(
                d.LowLightPatches(pairs, patch=32, n=n, seed=seed, augment=False), "low", "high", name, **desc
            )

        return (
            ll(d.corpus("train"), d.LOL_LIKE, n_fit, 101, "train", preset="LOL_LIKE"),
            ll(d.corpus("test"), d.LOL_LIKE, n_test, 102, "test", preset="LOL_LIKE"),
            ll(d.corpus("test"), d.VELOL_LIKE, n_test, 102, "velol", preset="VELOL_LIKE"),
        )
    raise ValueError(f"no demo data for task {task!r}")


def _row(name: str, report) -> dict:
    sites = report["model"]["sites"]
    ratios = [s["remark2"]["tail_ratio"] for s in sites if not math.isnan(s["remark2"]["tail_ratio"])]
    gains = [s["inverse_gain"]["max"] for s in sites if "inverse_gain" in s]
    by = report["risk"]["by_set"]
    return {
        "model": name,
        "sites": len(sites),
        "violating": len(report.violations()),
        "min_tail_ratio": min(ratios) if ratios else math.nan,
        "max_inverse_gain": max(gains) if gains else math.nan,
        "pct_pixel_err_in": by["in"]["pct_pixel_err"],
        "pct_pixel_err_ood": by["ood"]["pct_pixel_err"],
        "pct_inf_in": by["in"]["pct_inf"],
        "pct_inf_ood": by["ood"]["pct_inf"],
        "auroc_s_ood": report["ood"]["auroc_in_vs_ood"] if report["ood"] else None,
        "explosion_layer": report["explosion_layer"],
    }


def _text(rows: list[dict]) -> str:
    head = (
        "model",
        "Remark 2",
        "min tail",
        "max 1/c'",
        "%PixErr in→OOD",
        "%Inf in→OOD",
        "AUROC s_OOD",
        "explosion layer",
    )
    body = [
        (
            r["model"],
            f"{r['violating']}/{r['sites']} violate",
            fmt(r["min_tail_ratio"]),
            fmt(r["max_inverse_gain"]),
            f"{r['pct_pixel_err_in']:.1f} → {r['pct_pixel_err_ood']:.1f}",
            f"{r['pct_inf_in']:.1f} → {r['pct_inf_ood']:.1f}",
            fmt(r["auroc_s_ood"]),
            r["explosion_layer"] or "none",
        )
        for r in rows
    ]
    return "\n".join(text_table(body, head))


def run_demo(out: str | Path, device: str = "auto", progress: bool = True, overwrite: bool = False) -> dict:
    """Run the demo, write ``out`` (one report folder per model, ``index.html``, ``summary.txt``)."""
    from . import reference_models as rm
    from .adapters import load_model
    from .audit import scan
    from .utils.atomic import atomic_dir

    rows, reports = [], {}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for entry in rm.bundled():
            if not entry["available"]:
                continue
            adapter = load_model(entry["name"])
            fit_set, in_set, ood_set = demo_sets(adapter.task)
            report = scan(adapter, in_set, ood=ood_set, fit_data=fit_set, device=device, progress=progress)
            report.save(tmp / entry["name"])
            reports[entry["name"]] = report
            rows.append(_row(entry["name"], report))
        table = _text(rows)
        details = "\n\n".join(r.summary() for r in reports.values())
        text = f"{table}\n\n{details}\n\nreports: {out}/index.html"
        (tmp / "summary.txt").write_text(text + "\n")
        links = "".join(f"<li><a href='{html.escape(n)}/report.html'>{html.escape(n)}</a></li>" for n in reports)
        (tmp / "index.html").write_text(
            f"<!doctype html><meta charset='utf-8'><title>flowaudit demo</title><h1>flowaudit demo</h1>"
            f"<pre>{html.escape(table)}</pre><ul>{links}</ul>"
        )
    return {"text": text, "json": jsonable({"models": rows, "out": str(out)})}
