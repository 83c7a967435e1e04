"""The self-contained HTML page of a report: summary, Remark 2 table, plots, layer trace, risk."""

from __future__ import annotations

import html as _html
from typing import TYPE_CHECKING, Any

from ..utils.format import fmt
from .plots import gain_plot, layer_plot, panel_plot, risk_plot
from .text import certificate_line, evidence_lines, no_sites_line, reservoir_line, terminal_summary

if TYPE_CHECKING:
    from .panel import PanelItem

__all__ = ["html_report", "attack_section"]


def esc(x: Any) -> str:
    return _html.escape(fmt(x) if not isinstance(x, str) else x)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.violates{color:#b00020;font-weight:600}.compliant{color:#1b7f3b;font-weight:600}.inconclusive{color:#8a6d00}.no-sites-found{color:#b00020;font-weight:600}
img{max-width:100%}.note{color:#666;font-size:.9em}.grid{display:flex;flex-wrap:wrap;gap:1em}
"""


def _img(uri: str | None, alt: str) -> str:
    return f'<p><img src="{uri}" alt="{esc(alt)}"></p>' if uri else ""


def html_report(data: dict, panel: list[PanelItem] | None = None, files: dict[str, bytes] | None = None) -> str:
    m = data.get("model", {})
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>flowaudit · {esc(m.get('name'))}</title><style>{_CSS}</style></head><body>",
        f"<h1>flowaudit {esc(data.get('kind'))} report · {esc(m.get('name'))}</h1>",
        f"<p class='note'>flowaudit {esc(data.get('flowaudit_version'))}, {esc(data.get('created'))}; adapter {esc(m.get('adapter'))}, "
        f"task {esc(m.get('task'))}, {m.get('n_parameters', 0):,} parameters, fingerprint {esc(m.get('fingerprint'))}, "
        f"error band {esc(str(m.get('error_band')))}</p>",
        f"<h2>Summary</h2><pre>{esc(terminal_summary(data, max_sites=0))}</pre>",
    ]
    parts += _evidence_section(m)
    if m.get("sites"):
        parts.append(
            "<h2>Remark 2 per site</h2><table><tr><th>site</th><th>kind</th><th>verdict</th><th>rests on</th><th>in words</th>"
            "<th>tail ratio</th><th>probe |x|</th><th>bound ratio</th><th>certificate</th>"
            "<th>c' min</th><th>c' max</th><th>1/c' p50</th><th>1/c' p99</th><th>1/c' max</th></tr>"
        )
        for s in m["sites"]:
            r2, g = s["remark2"], s.get("inverse_gain", {})
            st = r2["structural"] if isinstance(r2.get("structural"), dict) else {}
            cert = st.get("certificate") or {}
            cert_s = (
                (f"|Δ| ≤ {fmt(cert['displacement'])}" + (" + |t|" if cert.get("plus_bias") else ""))
                if cert.get("displacement") is not None
                else "none"
            )
            pr = r2.get("probe") or {}
            parts.append(
                f"<tr><td>{esc(s['name'])}</td><td>{esc(s['kind'])}</td><td class='{r2['verdict']}'>{r2['verdict']}</td>"
                f"<td>{esc(', '.join(r2.get('rests_on', [])) or '–')}</td><td style='text-align:left'>{esc(r2.get('words', ''))}</td>"
                f"<td>{esc(r2['tail_ratio'])}</td><td>{esc(pr.get('abs_x_min'))}–{esc(pr.get('abs_x_max'))}</td><td>{esc(r2.get('bound_ratio'))}</td>"
                f"<td>{esc(cert_s)}</td><td>{esc(r2['derivative_min'])}</td><td>{esc(r2['derivative_max'])}</td>"
                f"<td>{esc(g.get('p50'))}</td><td>{esc(g.get('p99'))}</td><td>{esc(g.get('max'))}</td></tr>"
            )
        parts.append(
            "</table><p class='note'>Structural: what the parametrisation allows whatever the condition (bound ratio, certificate). "
            "Measured: tail ratio = min c' / max c' where the tails are (from 10× the site's tail start to 10⁴× it, or until c' "
            "settles when the start is unknown) under the parameters kept while sampling the scanned conditions; 1 means identity "
            "tails. Worst case: what the attack reached. Certificate |Δ|: the most the site's inverse moves a value (+ |t|: plus its bias).</p>"
        )
        parts.append("<h2>Inverse gain 1/c' per site</h2>" + _img(gain_plot(m["sites"]), "inverse-gain histograms"))
    if data.get("layers"):
        parts.append("<h2>Layer trace</h2>" + _img(layer_plot(data["layers"]), "layer variance trace"))
        parts.append(
            f"<p>Explosion layer: <b>{esc(data.get('explosion_layer') or 'none')}</b></p><table><tr><th>layer</th>"
            "<th>var in</th><th>var OOD</th><th>ratio</th><th>max|x| in</th><th>max|x| OOD</th><th>non-finite OOD</th></tr>"
        )
        for r in data["layers"]:
            i, o = r.get("in", {}), r.get("ood", {})
            parts.append(
                f"<tr><td>{esc(r['name'])}</td><td>{esc(i.get('variance'))}</td><td>{esc(o.get('variance'))}</td><td>{esc(r.get('variance_ratio'))}</td>"
                f"<td>{esc(i.get('max_abs'))}</td><td>{esc(o.get('max_abs'))}</td><td>{esc(o.get('n_nonfinite'))}</td></tr>"
            )
        parts.append("</table>")
    if data.get("risk"):
        parts.append("<h2>Exploding-inverse risk</h2>" + _img(risk_plot(data), "s_OOD vs pixel errors"))
        worst = sorted(data.get("inputs", []), key=lambda r: -(r.get("risk") or 0) - (r["n_pixel_err"] or 0))[:15]
        parts.append(
            "<table><tr><th>input</th><th>set</th><th>s_OOD</th><th>risk</th><th>n_inf</th><th>n_pixel_err</th><th>max|x|</th><th>max 1/c'</th></tr>"
        )
        for r in worst:
            parts.append(
                f"<tr><td>{esc(r['id'])}</td><td>{esc(r['set'])}</td><td>{esc(r.get('s_ood'))}</td><td>{esc(r.get('risk'))}</td><td>{r['n_inf']}</td>"
                f"<td>{r['n_pixel_err']}</td><td>{esc(r['max_abs'])}</td><td>{esc(r.get('max_inverse_gain'))}</td></tr>"
            )
        parts.append("</table>")
    if panel:
        band = tuple(m.get("error_band", (0.0, 1.0)))
        parts.append(
            "<h2>Riskiest inputs</h2>"
            + _img(panel_plot(panel, band), "worst inputs with samples and s_OOD maps")
            + "<p class='note'>Samples are clamped to [0, 1] for display, as a saved image would be; the map is the "
            "Mahalanobis distance of each location's encoder features (fitted on every location of the fit data).</p>"
        )
    parts += attack_section(data, files or {})
    parts.append("</body></html>")
    return "\n".join(parts)


def _evidence_section(m: dict) -> list[str]:
    """The model's Remark 2 verdict in words, the certificate line and the probe's reservoir; no sites found first."""
    out = []
    if no_sites_line(m):
        out.append(
            f"<p class='violates' style='font-size:1.2em;border:2px solid #b00020;padding:.5em'>{esc(no_sites_line(m))}</p>"
        )
    mv = m.get("remark2")
    if mv:
        out.append(
            f"<h2>Remark 2 verdict</h2><p>Model: <span class='{esc(mv['verdict']).replace(' ', '-')}'>{esc(mv['verdict'])}</span>"
            f" (rests on {esc(', '.join(mv.get('rests_on', [])) or 'no evidence')})</p>"
        )
        lines = evidence_lines(m)
        if lines:
            out.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>")
    for line in (certificate_line(m), reservoir_line(m)):
        if line:
            out.append(f"<p>{esc(line)}</p>")
    return out


def attack_section(data: dict, files: dict[str, bytes], max_rows: int = 15, max_images: int = 4) -> list[str]:
    """The Attack section: settings, summary, the worst starts, and for images their conditions and samples."""
    import base64

    a = data.get("attack")
    if not a:
        return []
    s, st, b = a["summary"], a.get("settings", {}), a["budget"]
    out = [
        f"<h2>Attack (worst case)</h2><p>Objective <b>{esc(a['objective'])}</b> within <b>{esc(b['spec'])}</b> "
        f"({esc(st.get('steps'))} {esc(st.get('step_rule', ''))} steps of {esc(st.get('step_size'))}"
        + (f", growing ×{esc(st.get('step_growth'))} a step" if st.get("step_growth", 1) != 1 else "")
        + f"; {s['n_starts']} starts × K = {esc(st.get('samples'))} samples at τ = {esc(st.get('temperature'))}, seed {esc(st.get('seed'))}). "
        f"Broken: <b>{s['n_broken']}/{s['n_starts']}</b> ({esc(s['broken_rate'])}); median distance to break "
        f"<b>{esc(s['median_distance_to_break'])}</b> ({esc(b['norm'])}); worst max|x| <b>{esc(s['worst_max_abs'])}</b>; "
        f"worst 1/c' <b>{esc(s['worst_inverse_gain'])}</b>.</p>",
        "<table><tr><th>start</th><th>J before</th><th>J after</th><th>max|x|</th><th>max 1/c'</th><th>non-finite</th>"
        "<th>broken</th><th>distance to break</th><th>distance</th><th>layer</th></tr>",
    ]
    by_id = {r["id"]: r for r in a["starts"]}
    order = [by_id[i] for i in s.get("worst", [])] + [r for r in a["starts"] if r["id"] not in s.get("worst", [])]
    for r in order[:max_rows]:
        out.append(
            f"<tr><td>{esc(r['id'])}</td><td>{esc(r['objective_before'])}</td><td>{esc(r['objective_after'])}</td>"
            f"<td>{esc(r['max_abs'])}</td><td>{esc(r['max_inverse_gain'])}</td><td>{r['nonfinite']}</td>"
            f"<td class='{'violates' if r['broken'] else 'compliant'}'>{'yes' if r['broken'] else 'no'}</td>"
            f"<td>{esc(r.get('distance_to_break'))}</td><td>{esc(r['distance'])}</td><td>{esc(r['layer'] or '–')}</td></tr>"
        )
    out.append(
        "</table><p class='note'>Broken: a sample left the error band or went non-finite; distance to break: how far from "
        "the start that first happened. A broken start kept climbing inside the budget (one that went non-finite stopped there); "
        "each start is shown at its worst point, distance: how far that is from the start. Layer: the first layer of the inverse pass whose max |value| "
        f"grew ×{esc(st.get('layer_factor'))} over the start's and passed ×{esc(st.get('layer_factor'))} the error band (or went non-finite).</p>"
    )
    pngs = sorted(k for k in files if k.startswith("attack/") and k.endswith(".png"))
    stems = list(dict.fromkeys(k.rsplit("_", 1)[0] for k in pngs))[:max_images]
    if stems:

        def cell(key: str) -> str:
            if key not in files:
                return "<td></td>"
            uri = "data:image/png;base64," + base64.b64encode(files[key]).decode()
            return f"<td><img src='{uri}' alt='{esc(key)}' style='width:96px;image-rendering:pixelated'></td>"

        out.append(
            "<table><tr><th>start</th><th>condition</th><th>attacked</th><th>sample 0</th><th>sample 1</th></tr>"
        )
        for stem in stems:
            out.append(
                f"<tr><td>{esc(stem.split('/', 1)[1])}</td>"
                + "".join(cell(f"{stem}_{k}.png") for k in ("start", "attack", "sample0", "sample1"))
                + "</tr>"
            )
        out.append(
            "</table><p class='note'>Samples clamped to [0, 1] for display (non-finite values black); arrays in attack/worst.npz.</p>"
        )
    return out
