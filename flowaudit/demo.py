"""``flowaudit demo``: the audit on the embedded default, side by side.

For each bundled checkpoint that is shipped, fit the encoder-feature Gaussian
on its training conditions, scan in-distribution test conditions and their OOD
counterparts (toy: the paper's ``y + [0.8, -0.8]``; images: the generated
OOD sets), and print one comparison table. Nothing is downloaded.
"""

from __future__ import annotations

import html
import math
import shutil
from pathlib import Path

import torch

from .datasets import ConditionSet

__all__ = ["run_demo", "demo_sets"]


def _set(y: torch.Tensor, name: str, x: torch.Tensor | None = None, **desc) -> ConditionSet:
    return ConditionSet(y=y, x=x, ids=[f"{name}{i}" for i in range(len(y))], description={"kind": "bundled", "name": name, "n": len(y), **desc})


def demo_sets(task: str) -> tuple[ConditionSet, ConditionSet, ConditionSet]:
    """(fit, in-distribution, OOD) condition sets of the embedded default for ``task``."""
    if task == "toy":
        from .reference_models.recipes import TOY_SEED_TEST
        from .reference_models.toy import toy_data

        _, y_fit = toy_data(5000, seed=0)
        x_in, y_in = toy_data(1000, seed=TOY_SEED_TEST)
        x_ood, y_ood = toy_data(1000, seed=TOY_SEED_TEST, ood=True)
        return (_set(y_fit, "train", seed=0), _set(y_in, "test", x_in, seed=TOY_SEED_TEST),
                _set(y_ood, "ood", x_ood, seed=TOY_SEED_TEST, shift=[0.8, -0.8]))
    from .reference_models.recipes import demo_image_sets

    return demo_image_sets(task)


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
    from .render import _table
    from .report import _fmt

    head = ("model", "Remark 2", "min tail", "max 1/c'", "%PixErr in→OOD", "%Inf in→OOD", "AUROC s_OOD", "explosion layer")
    body = [(r["model"], f"{r['violating']}/{r['sites']} violate", _fmt(r["min_tail_ratio"]), _fmt(r["max_inverse_gain"]),
             f"{r['pct_pixel_err_in']:.1f} → {r['pct_pixel_err_ood']:.1f}", f"{r['pct_inf_in']:.1f} → {r['pct_inf_ood']:.1f}",
             _fmt(r["auroc_s_ood"]), r["explosion_layer"] or "none") for r in rows]
    return "\n".join(_table(body, head))


def run_demo(out: str | Path, device: str = "auto", progress: bool = True, overwrite: bool = False) -> dict:
    """Run the demo, write ``out`` (one report folder per model, ``index.html``, ``summary.txt``)."""
    from . import reference_models as rm
    from .adapters import load_model
    from .audit import scan
    from .report import jsonable

    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows, reports = [], {}
    try:
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
        (tmp / "index.html").write_text(f"<!doctype html><meta charset='utf-8'><title>flowaudit demo</title><h1>flowaudit demo</h1>"
                                        f"<pre>{html.escape(table)}</pre><ul>{links}</ul>")
        if out.exists() and overwrite:
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"text": text, "json": jsonable({"models": rows, "out": str(out)})}
