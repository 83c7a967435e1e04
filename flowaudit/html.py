"""The self-contained HTML page of a report: summary, Remark 2 table, plots, layer trace, risk."""

from __future__ import annotations

import html as _html
from typing import TYPE_CHECKING, Any

from .format import fmt
from .plots import gain_plot, layer_plot, panel_plot, risk_plot
from .text import terminal_summary

if TYPE_CHECKING:
    from .panel import PanelItem

__all__ = ["html_report"]


def esc(x: Any) -> str:
    return _html.escape(fmt(x) if not isinstance(x, str) else x)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.violates{color:#b00020;font-weight:600}.compliant{color:#1b7f3b;font-weight:600}.inconclusive{color:#8a6d00}
img{max-width:100%}.note{color:#666;font-size:.9em}.grid{display:flex;flex-wrap:wrap;gap:1em}
"""


def _img(uri: str | None, alt: str) -> str:
    return f'<p><img src="{uri}" alt="{esc(alt)}"></p>' if uri else ""


def html_report(data: dict, panel: list[PanelItem] | None = None) -> str:
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
        parts.append("<h2>Inverse gain 1/c' per site</h2>" + _img(gain_plot(m["sites"]), "inverse-gain histograms"))
    if data.get("layers"):
        parts.append("<h2>Layer trace</h2>" + _img(layer_plot(data["layers"]), "layer variance trace"))
        parts.append(f"<p>Explosion layer: <b>{esc(data.get('explosion_layer') or 'none')}</b></p><table><tr><th>layer</th>"
                     "<th>var in</th><th>var OOD</th><th>ratio</th><th>max|x| in</th><th>max|x| OOD</th><th>non-finite OOD</th></tr>")
        for r in data["layers"]:
            i, o = r.get("in", {}), r.get("ood", {})
            parts.append(f"<tr><td>{esc(r['name'])}</td><td>{esc(i.get('variance'))}</td><td>{esc(o.get('variance'))}</td><td>{esc(r.get('variance_ratio'))}</td>"
                         f"<td>{esc(i.get('max_abs'))}</td><td>{esc(o.get('max_abs'))}</td><td>{esc(o.get('n_nonfinite'))}</td></tr>")
        parts.append("</table>")
    if data.get("risk"):
        parts.append("<h2>Exploding-inverse risk</h2>" + _img(risk_plot(data), "s_OOD vs pixel errors"))
        worst = sorted(data.get("inputs", []), key=lambda r: -(r.get("risk") or 0) - (r["n_pixel_err"] or 0))[:15]
        parts.append("<table><tr><th>input</th><th>set</th><th>s_OOD</th><th>risk</th><th>n_inf</th><th>n_pixel_err</th><th>max|x|</th><th>max 1/c'</th></tr>")
        for r in worst:
            parts.append(f"<tr><td>{esc(r['id'])}</td><td>{esc(r['set'])}</td><td>{esc(r.get('s_ood'))}</td><td>{esc(r.get('risk'))}</td><td>{r['n_inf']}</td>"
                         f"<td>{r['n_pixel_err']}</td><td>{esc(r['max_abs'])}</td><td>{esc(r.get('max_inverse_gain'))}</td></tr>")
        parts.append("</table>")
    if panel:
        band = tuple(m.get("error_band", (0.0, 1.0)))
        parts.append("<h2>Riskiest inputs</h2>" + _img(panel_plot(panel, band), "worst inputs with samples and s_OOD maps")
                     + "<p class='note'>Samples are clamped to [0, 1] for display, as a saved image would be; the map is the "
                     "Mahalanobis distance of each location's encoder features (fitted on every location of the fit data).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
