"""Renderers of a report dict: the one-screen terminal summary and the self-contained HTML page.

Plots (matplotlib, Agg): the layer variance trace in-distribution vs OOD
(paper Fig. 3b), inverse-gain histograms per site, ``s_OOD`` distributions,
``s_OOD`` vs pixel errors with the logistic curve (Fig. 4b).
"""

from __future__ import annotations

import math
from typing import Any

from .report import _fmt, _num, esc, png_data_uri

__all__ = ["terminal_summary", "html_report", "site_table_rows"]


def _pct(v: Any) -> str:
    return "–" if v is None else f"{_num(v):.1f}%"


def site_table_rows(model: dict) -> list[tuple[str, ...]]:
    """(name, kind, verdict, tail ratio, bound ratio, 1/c' p50, p99, max) per site."""
    rows = []
    for s in model.get("sites", []):
        g = s.get("inverse_gain", {})
        rows.append((s["name"], s["kind"], s["remark2"]["verdict"], _fmt(s["remark2"]["tail_ratio"]),
                     _fmt(s["remark2"].get("bound_ratio")), _fmt(g.get("p50")), _fmt(g.get("p99")), _fmt(g.get("max"))))
    return rows


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]


def terminal_summary(data: dict, max_sites: int = 12) -> str:
    """A summary that fits one screen (about 40 lines)."""
    m = data.get("model", {})
    out = [f"flowaudit {data.get('flowaudit_version')} · {data.get('kind')} · {m.get('name')} "
           f"({m.get('adapter')}, {m.get('task')}, {m.get('n_parameters', 0):,} parameters)"]
    sites = site_table_rows(m)
    if sites:
        n_bad = sum(r[2] == "violates" for r in sites)
        out.append(f"Remark 2: {len(sites)} sites, {n_bad} violate (threshold {_fmt(m['sites'][0]['remark2']['threshold'])})")
        shown = sites[:max_sites]
        out += ["  " + line for line in _table(shown, ("site", "kind", "remark2", "tail", "bound", "1/c' p50", "p99", "max"))]
        if len(sites) > max_sites:
            out.append(f"  … {len(sites) - max_sites} more in report.json")
    ood = data.get("ood")
    if ood and data.get("kind") == "fit":
        out.append(f"Gaussian: {ood['estimator']} on {ood['n_inputs']} inputs, D = {ood['dim']}, shrinkage {_fmt(ood['shrinkage'])}"
                   + (f" → {ood['out']}" if ood.get("out") else ""))
    elif ood:
        means = ", ".join(f"{k} {_fmt(v)}" for k, v in ood["mean"].items())
        auroc = f", AUROC in vs OOD {_fmt(ood['auroc_in_vs_ood'])}" if ood.get("auroc_in_vs_ood") is not None else ""
        out.append(f"s_OOD ({ood['estimator']}, D = {ood['dim']}, layers {', '.join(ood['layers'][:4])}{'…' if len(ood['layers']) > 4 else ''}): mean {means}{auroc}")
    risk = data.get("risk")
    if risk:
        out.append(f"Risk (K = {risk['samples_per_input']}, τ = {risk['temperature']}):")
        rows = []
        for name, r in risk.get("by_set", {}).items():
            psnr = f"{_fmt(r.get('lr_psnr_min'))} / {_fmt(r.get('lr_psnr_std'))}" if "lr_psnr_min" in r else "–"
            rows.append((name, str(r["n_inputs"]), _pct(r["pct_inf"]), _pct(r["pct_pixel_err"]), psnr))
        out += ["  " + line for line in _table(rows, ("set", "inputs", "%Inf", "%PixelErr", "LR-PSNR min/σ"))]
        fit = risk.get("logistic")
        fit_s = f"P(err) = σ({_fmt(fit['intercept'])} + {_fmt(fit['coef'])}·s_OOD)" if fit else "logistic fit: one class only"
        out.append(f"  AUROC(s_OOD → error) {_fmt(risk.get('auroc'))}, Spearman {_fmt(risk.get('spearman'))}, {fit_s}")
        if risk.get("ranked"):
            out.append(f"  riskiest inputs: {', '.join(risk['ranked'][:5])}")
    if data.get("layers"):
        ex = data.get("explosion_layer")
        ratios = [r for r in data["layers"] if "variance_ratio" in r]
        if ratios:
            top = max(ratios, key=lambda r: _num(r["variance_ratio"]) if not math.isnan(_num(r["variance_ratio"])) else -1)
            out.append(f"Layer trace: explosion layer {ex or 'none'} (threshold ×{_fmt(data['settings']['explosion_threshold'])}); "
                       f"largest OOD/in variance ratio ×{_fmt(top['variance_ratio'])} at {top['name']}")
    return "\n".join(out)


# -- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.violates{color:#b00020;font-weight:600}.compliant{color:#1b7f3b;font-weight:600}.inconclusive{color:#8a6d00}
img{max-width:100%}.note{color:#666;font-size:.9em}.grid{display:flex;flex-wrap:wrap;gap:1em}
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _layer_plot(layers: list[dict]) -> str | None:
    rows = [r for r in layers if "in" in r]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.4))
    xs = range(len(rows))
    for key, colour in (("in", "tab:blue"), ("ood", "tab:red")):
        ys = [_num(r[key]["variance"]) if key in r else math.nan for r in rows]
        if not all(math.isnan(y) for y in ys):
            ax.plot(xs, ys, "o-", color=colour, label={"in": "in-distribution", "ood": "OOD"}[key])
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("variance of features")
    ax.set_title("Layer trace of the inverse pass (paper Fig. 3b)")
    ax.legend()
    return png_data_uri(fig)


def _gain_plot(sites: list[dict]) -> str | None:
    sites = [s for s in sites if s.get("inverse_gain", {}).get("histogram")]
    if not sites:
        return None
    plt = _plt()
    n = len(sites)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    for ax, s in zip(axes.flat, sites):
        lo, hi = 0.0, 0.0  # always show gain 1 (log10 = 0)
        for key, colour in (("in", "tab:blue"), ("ood", "tab:red")):
            g = s.get("inverse_gain_by_set", {}).get(key, {})
            h = g.get("histogram")
            if h:
                edges, counts = h["log10_edges"], h["counts"]
                ax.stairs(counts, edges, color=colour, label=key, fill=True, alpha=0.4)
                used = [i for i, c in enumerate(counts) if c]
                lo, hi = min(lo, edges[used[0]]), max(hi, edges[used[-1] + 1])
        ax.set_xlim(lo - 0.25, hi + 0.25)
        ax.set_yscale("log")
        ax.axvline(0.0, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{s['name']} ({s['kind']})", fontsize=7)
        ax.set_xlabel("log10 1/c'", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return png_data_uri(fig)


def _risk_plot(data: dict) -> str | None:
    inputs = [r for r in data.get("inputs", []) if r.get("s_ood") is not None]
    if not inputs:
        return None
    plt = _plt()
    import numpy as np

    k = data["risk"]["samples_per_input"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    finite = np.array([_num(r["s_ood"]) for r in inputs])
    finite = finite[np.isfinite(finite)]
    bins = np.linspace(finite.min(), finite.max(), 60) if len(finite) else 10  # one set of bins for both sets
    for key, colour in (("in", "tab:blue"), ("ood", "tab:red")):
        s = np.array([_num(r["s_ood"]) for r in inputs if r["set"] == key])
        s = s[np.isfinite(s)]
        if len(s):
            a1.hist(s, bins=bins, alpha=0.6, color=colour, label=key)
            e = np.array([r["n_pixel_err"] / k for r in inputs if r["set"] == key and math.isfinite(_num(r["s_ood"]))])
            a2.scatter(s, e, s=8, alpha=0.5, color=colour, label=key)
    a1.set_xlabel("s_OOD")
    a1.set_title("s_OOD distributions")
    a1.legend()
    fit = data["risk"].get("logistic")
    allx = np.array([_num(r["s_ood"]) for r in inputs])
    allx = allx[np.isfinite(allx)]
    if fit and len(allx):
        xs = np.linspace(allx.min(), allx.max(), 200)
        a2.plot(xs, 1 / (1 + np.exp(-(fit["intercept"] + fit["coef"] * xs))), "k-", label="logistic P(error)")
    a2.set_xlabel("s_OOD")
    a2.set_ylabel("pixel-error rate over K samples")
    a2.set_title("Pixel errors vs s_OOD (paper Fig. 4b)")
    a2.legend()
    fig.tight_layout()
    return png_data_uri(fig)


def _img(uri: str | None, alt: str) -> str:
    return f'<p><img src="{uri}" alt="{esc(alt)}"></p>' if uri else ""


def _images_plot(images: list[dict], band: tuple[float, float]) -> str | None:
    """Rows: the condition, its samples (clamped for display, out-of-band pixels marked) and the s_OOD map."""
    if not images:
        return None
    plt = _plt()
    import numpy as np

    cols = 2 + max(len(it["samples"]) for it in images)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.9 * cols, 2.0 * len(images)), squeeze=False)

    def show(ax, t, title):
        a = t.detach().float().numpy()
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
        ax.imshow(np.clip(a.transpose(1, 2, 0), 0, 1) if a.shape[0] == 3 else a[0], interpolation="nearest")
        ax.set_title(title, fontsize=6)

    for row, it in zip(axes, images):
        rec = it["record"]
        show(row[0], it["y"], f"{it['id']} ({it['set']})\ns_OOD {_fmt(rec.get('s_ood'))}")
        for k, x in enumerate(it["samples"]):
            bad = int((~((x >= band[0]) & (x <= band[1]))).sum())
            show(row[1 + k], x, f"sample {k}: {bad} px out of band")
        if "map" in it:
            im = row[-1].imshow(it["map"], cmap="magma")
            row[-1].set_title("spatial s_OOD", fontsize=6)
            fig.colorbar(im, ax=row[-1], fraction=0.046)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return png_data_uri(fig)


def html_report(data: dict, images: list[dict] | None = None) -> str:
    m = data.get("model", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>flowaudit · {esc(m.get('name'))}</title><style>{_CSS}</style></head><body>",
             f"<h1>flowaudit {esc(data.get('kind'))} report · {esc(m.get('name'))}</h1>",
             f"<p class='note'>flowaudit {esc(data.get('flowaudit_version'))}, {esc(data.get('created'))}; adapter {esc(m.get('adapter'))}, "
             f"task {esc(m.get('task'))}, {m.get('n_parameters', 0):,} parameters, fingerprint {esc(m.get('fingerprint'))}, "
             f"error band {esc(str(m.get('error_band')))}</p>",
             f"<h2>Summary</h2><pre>{esc(terminal_summary(data, max_sites=0))}</pre>"]
    if m.get("sites"):
        parts.append("<h2>Remark 2 per site</h2><table><tr><th>site</th><th>kind</th><th>verdict</th><th>structural</th><th>tail ratio</th><th>bound ratio</th>"
                     "<th>c' min</th><th>c' max</th><th>1/c' p50</th><th>1/c' p99</th><th>1/c' max</th></tr>")
        for s in m["sites"]:
            r2, g = s["remark2"], s.get("inverse_gain", {})
            parts.append(f"<tr><td>{esc(s['name'])}</td><td>{esc(s['kind'])}</td><td class='{r2['verdict']}'>{r2['verdict']}</td>"
                         f"<td>{esc(r2['structural'])}</td><td>{esc(r2['tail_ratio'])}</td><td>{esc(r2.get('bound_ratio'))}</td><td>{esc(r2['derivative_min'])}</td><td>{esc(r2['derivative_max'])}</td>"
                         f"<td>{esc(g.get('p50'))}</td><td>{esc(g.get('p99'))}</td><td>{esc(g.get('max'))}</td></tr>")
        parts.append("</table><p class='note'>Tail ratio = min c' / max c' at |x| in [1, 10⁴] under the conditions met while sampling; "
                     "1 means identity tails (Remark 2 holds). Bound ratio: the same over every parameter the kind allows.</p>")
        parts.append("<h2>Inverse gain 1/c' per site</h2>" + _img(_gain_plot(m["sites"]), "inverse-gain histograms"))
    if data.get("layers"):
        parts.append("<h2>Layer trace</h2>" + _img(_layer_plot(data["layers"]), "layer variance trace"))
        parts.append(f"<p>Explosion layer: <b>{esc(data.get('explosion_layer') or 'none')}</b></p><table><tr><th>layer</th>"
                     "<th>var in</th><th>var OOD</th><th>ratio</th><th>max|x| in</th><th>max|x| OOD</th><th>non-finite OOD</th></tr>")
        for r in data["layers"]:
            i, o = r.get("in", {}), r.get("ood", {})
            parts.append(f"<tr><td>{esc(r['name'])}</td><td>{esc(i.get('variance'))}</td><td>{esc(o.get('variance'))}</td><td>{esc(r.get('variance_ratio'))}</td>"
                         f"<td>{esc(i.get('max_abs'))}</td><td>{esc(o.get('max_abs'))}</td><td>{esc(o.get('n_nonfinite'))}</td></tr>")
        parts.append("</table>")
    if data.get("risk"):
        parts.append("<h2>Exploding-inverse risk</h2>" + _img(_risk_plot(data), "s_OOD vs pixel errors"))
        worst = sorted(data.get("inputs", []), key=lambda r: -(r.get("risk") or 0) - r["n_pixel_err"])[:15]
        parts.append("<table><tr><th>input</th><th>set</th><th>s_OOD</th><th>risk</th><th>n_inf</th><th>n_pixel_err</th><th>max|x|</th><th>max 1/c'</th></tr>")
        for r in worst:
            parts.append(f"<tr><td>{esc(r['id'])}</td><td>{esc(r['set'])}</td><td>{esc(r.get('s_ood'))}</td><td>{esc(r.get('risk'))}</td><td>{r['n_inf']}</td>"
                         f"<td>{r['n_pixel_err']}</td><td>{esc(r['max_abs'])}</td><td>{esc(r.get('max_inverse_gain'))}</td></tr>")
        parts.append("</table>")
    if images:
        band = tuple(m.get("error_band", (0.0, 1.0)))
        parts.append("<h2>Riskiest inputs</h2>" + _img(_images_plot(images, band), "worst inputs with samples and s_OOD maps")
                     + "<p class='note'>Samples are clamped to [0, 1] for display, as a saved image would be; the map is the "
                     "Mahalanobis distance of each location's encoder features (fitted on every location of the fit data).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
