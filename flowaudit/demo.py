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

__all__ = ["run_demo", "demo_sets", "HEADLINE"]

HEADLINE = (
    "Does the inverse explode out of distribution? Each bundled model, K = 10 samples per input at τ = 0.9, on\n"
    "its test inputs and on OOD inputs made by a fixed rule (toy: y + [0.8, -0.8]; images: each test patch through\n"
    "one of 10 transforms in turn: gamma, contrast, saturation, negative, noise, blur, kernel H, cartoon, texture)."
)


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


def _shifted(cs: ConditionSet, seed: int) -> ConditionSet:
    """``cs`` under the OOD rule (:mod:`~flowaudit.reference_models.ood`): input ``j`` through transform ``j mod T``."""
    from .reference_models.ood import SHIFTS, shift

    done = [shift(y, j, seed) for j, y in enumerate(cs.y)]
    ids = [f"shifted:{i.split(':', 1)[-1]}~{name}" for i, (name, _) in zip(cs.ids, done)]
    rule = "condition j through transform j mod T of the list, on what the model sees; targets untransformed"
    desc = {k: v for k, v in cs.description.items() if k not in ("kind", "name", "n")}
    return _set(torch.stack([t for _, t in done]), "shifted", cs.x, ids, rule=rule, transforms=list(SHIFTS), **desc)


def demo_sets(
    task: str, n_fit: int = 128, n_test: int = 32, n_ood: int = 40
) -> tuple[ConditionSet, ConditionSet, ConditionSet]:
    """(fit, in-distribution, OOD) condition sets of the embedded default for ``task``.

    Toy: 5000 training conditions, 1000 test pairs and their ``y + [0.8, -0.8]`` shift (paper, eq. 7).
    Images (SR: LR patches, bicubic ×4; low-light: LOL-like darkening): ``n_fit`` patches of the training
    images, ``n_test`` of the test images, and as OOD ``n_ood`` patches of the test images each put through
    one transform of :data:`~flowaudit.reference_models.ood.SHIFTS` in turn (gamma, contrast, saturation,
    negative, noise, blur, kernel H, cartoon, texture): a rule, not a choice of the inputs that explode.
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

        def patches(images, n, seed, name, **desc):
            return _patch_set(
                d.SRPatches(images, patch=32, scale=4, n=n, seed=seed, augment=False), "lr", "hr", name, **desc
            )

        train, test = d.corpus("train"), d.corpus("test")
    elif task == "lowlight":

        def patches(images, n, seed, name, **desc):
            pairs = d.lowlight_pairs(images, d.LOL_LIKE, seed=seed)
            return _patch_set(
                d.LowLightPatches(pairs, patch=32, n=n, seed=seed, augment=False),
                "low",
                "high",
                name,
                preset="LOL_LIKE",
                **desc,
            )

        train, test = d.corpus("train"), d.corpus("test")
    else:
        raise ValueError(f"no demo data for task {task!r}")
    return (
        patches(train, n_fit, 101, "train", split="train"),
        patches(test, n_test, 102, "test", split="test"),
        _shifted(patches(test, n_ood, 102, "test", split="test"), seed=102),
    )


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


def _first_nonfinite(report) -> str | None:
    """The first layer of the inverse pass whose OOD trace holds a non-finite value."""
    return next((r["name"] for r in report["layers"] if r.get("ood", {}).get("n_nonfinite")), None)


def _story(name: str, report) -> str:
    """Two lines on ``name``: did it blow up in and out of distribution, on which inputs, from which layer."""
    recs = report["inputs"]
    by = {s: [r for r in recs if r.get("set") == s] for s in ("in", "ood")}
    n_inf = {s: sum(1 for r in rs if r.get("n_inf")) for s, rs in by.items()}
    n_err = {s: sum(1 for r in rs if r.get("n_pixel_err")) for s, rs in by.items()}
    head = (
        f"{name}: Inf samples on {n_inf['in']}/{len(by['in'])} in-distribution and {n_inf['ood']}/{len(by['ood'])} "
        f"OOD inputs; pixel errors on {n_err['in']}/{len(by['in'])} and {n_err['ood']}/{len(by['ood'])}"
    )
    if not n_inf["ood"] and not n_err["ood"]:
        return head + ": no blow-up."
    hit: dict[str, list[int]] = {}
    for r in by["ood"]:
        cause = r["id"].rsplit("~", 1)[1] if "~" in r["id"] else "shifted"
        counts = hit.setdefault(cause, [0, 0, 0])
        counts[0] += 1
        counts[1] += bool(r.get("n_inf"))
        counts[2] += bool(r.get("n_pixel_err"))
    worst = sorted(((c, k) for k, c in hit.items() if c[1] or c[2]), key=lambda ck: (-ck[0][1], -ck[0][2], ck[1]))
    causes = ", ".join(f"{k} {c[1]}/{c[2]}/{c[0]}" for c, k in worst)
    where = _first_nonfinite(report)
    layer = f"first non-finite value at {where}" if where else "no non-finite value in the layer trace"
    explosion = report["explosion_layer"]
    layer += f"; variance ratio passes the threshold at {explosion}" if explosion else ""
    return f"{head}.\n  OOD inputs by transform (Inf/pixel error/inputs): {causes}.\n  {layer}."


def run_demo(
    out: str | Path,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    threads: int | None = None,
) -> dict:
    """Run the demo, write ``out`` (one report folder per model, ``index.html``, ``summary.txt``).

    The text's first screen is the comparison table and, per model, whether it blew up in and out of
    distribution, under which OOD transforms and from which layer; the full summaries go to ``summary.txt``.
    """
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
            report = scan(
                adapter, in_set, ood=ood_set, fit_data=fit_set, device=device, progress=progress, threads=threads
            )
            report.save(tmp / entry["name"])
            reports[entry["name"]] = report
            rows.append({**_row(entry["name"], report), "story": _story(entry["name"], report)})
        table = _text(rows)
        stories = "\n".join(r["story"] for r in rows)
        first = f"{HEADLINE}\n\n{table}\n\n{stories}"
        details = "\n\n".join(r.summary() for r in reports.values())
        (tmp / "summary.txt").write_text(f"{first}\n\n{details}\n")
        text = f"{first}\n\nper-model summaries: {out}/summary.txt; reports: {out}/index.html"
        links = "".join(f"<li><a href='{html.escape(n)}/report.html'>{html.escape(n)}</a></li>" for n in reports)
        (tmp / "index.html").write_text(
            f"<!doctype html><meta charset='utf-8'><title>flowaudit demo</title><h1>flowaudit demo</h1>"
            f"<pre>{html.escape(first)}</pre><ul>{links}</ul>"
        )
    return {"text": text, "json": jsonable({"models": rows, "out": str(out)})}
