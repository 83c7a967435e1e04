"""The one-screen terminal summary of a report dict (about 40 lines)."""

from __future__ import annotations

import math
from typing import Any

from .format import fmt, num, text_table

__all__ = ["terminal_summary", "site_table_rows"]


def _pct(v: Any) -> str:
    return "–" if v is None else f"{num(v):.1f}%"


def site_table_rows(model: dict) -> list[tuple[str, ...]]:
    """(name, kind, verdict, tail ratio, bound ratio, 1/c' p50, p99, max) per site."""
    rows = []
    for s in model.get("sites", []):
        g = s.get("inverse_gain", {})
        rows.append((s["name"], s["kind"], s["remark2"]["verdict"], fmt(s["remark2"]["tail_ratio"]),
                     fmt(s["remark2"].get("bound_ratio")), fmt(g.get("p50")), fmt(g.get("p99")), fmt(g.get("max"))))
    return rows


def terminal_summary(data: dict, max_sites: int = 12) -> str:
    """A summary that fits one screen (about 40 lines)."""
    m = data.get("model", {})
    out = [f"flowaudit {data.get('flowaudit_version')} · {data.get('kind')} · {m.get('name')} "
           f"({m.get('adapter')}, {m.get('task')}, {m.get('n_parameters', 0):,} parameters)"]
    sites = site_table_rows(m)
    if sites:
        n_bad = sum(r[2] == "violates" for r in sites)
        out.append(f"Remark 2: {len(sites)} sites, {n_bad} violate (threshold {fmt(m['sites'][0]['remark2']['threshold'])})")
        shown = sites[:max_sites]
        out += ["  " + line for line in text_table(shown, ("site", "kind", "remark2", "tail", "bound", "1/c' p50", "p99", "max"))]
        if len(sites) > max_sites:
            out.append(f"  … {len(sites) - max_sites} more in report.json")
    ood = data.get("ood")
    if ood and data.get("kind") == "fit":
        skipped = f" ({ood['n_nonfinite']} skipped: NaN/Inf)" if ood.get("n_nonfinite") else ""
        out.append(f"Gaussian: {ood['estimator']} on {ood['n_inputs']} inputs{skipped}, D = {ood['dim']}, shrinkage {fmt(ood['shrinkage'])}"
                   + (f" → {ood['out']}" if ood.get("out") else ""))
    elif ood:
        means = ", ".join(f"{k} {fmt(v)}" for k, v in ood["mean"].items())
        auroc = f", AUROC in vs OOD {fmt(ood['auroc_in_vs_ood'])}" if ood.get("auroc_in_vs_ood") is not None else ""
        out.append(f"s_OOD ({ood['estimator']}, D = {ood['dim']}, layers {', '.join(ood['layers'][:4])}{'…' if len(ood['layers']) > 4 else ''}): mean {means}{auroc}")
    risk = data.get("risk")
    if risk:
        out.append(f"Risk (K = {risk['samples_per_input']}, τ = {risk['temperature']}):")
        rows = []
        for name, r in risk.get("by_set", {}).items():
            psnr = f"{fmt(r.get('lr_psnr_min'))} / {fmt(r.get('lr_psnr_std'))}" if "lr_psnr_min" in r else "–"
            rows.append((name, str(r["n_inputs"]), _pct(r["pct_inf"]), _pct(r["pct_pixel_err"]), psnr))
        out += ["  " + line for line in text_table(rows, ("set", "inputs", "%Inf", "%PixelErr", "LR-PSNR min/σ"))]
        bad = {k: d.get("n_nonfinite") for k, d in data.get("data", {}).items() if d.get("n_nonfinite")}
        if bad:
            out.append(f"  NaN/Inf conditions, reported but not sampled (s_OOD = inf): {', '.join(f'{k} {n}' for k, n in bad.items())}")
        fit = risk.get("logistic")
        fit_s = f"P(err) = σ({fmt(fit['intercept'])} + {fmt(fit['coef'])}·s_OOD)" if fit else "logistic fit: one class only"
        out.append(f"  AUROC(s_OOD → error) {fmt(risk.get('auroc'))}, Spearman {fmt(risk.get('spearman'))}, {fit_s}")
        if risk.get("ranked"):
            out.append(f"  riskiest inputs: {', '.join(risk['ranked'][:5])}")
    if data.get("layers"):
        ex = data.get("explosion_layer")
        ratios = [r for r in data["layers"] if "variance_ratio" in r]
        if ratios:
            top = max(ratios, key=lambda r: num(r["variance_ratio"]) if not math.isnan(num(r["variance_ratio"])) else -1)
            out.append(f"Layer trace: explosion layer {ex or 'none'} (threshold ×{fmt(data['settings']['explosion_threshold'])}); "
                       f"largest OOD/in variance ratio ×{fmt(top['variance_ratio'])} at {top['name']}")
    return "\n".join(out)
