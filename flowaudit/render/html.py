"""The self-contained HTML page of a report.

Top to bottom: the answer in one sentence (:func:`~.diagnosis.answer`), the key figures, the riskiest
sites, the diagnosis and its fixes, then the evidence in full — every site (a sortable table scrolling
in its own box), the inverse-gain plots, the layer trace, the exploding-inverse risk, the riskiest inputs
and the attack. Columns are explained on hover and under each table; keys of ``report.json`` are
described in ``docs/report.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..utils.format import fmt
from .diagnosis import answer, diagnosis, riskiest_sites, site_words
from .page import CSS, SORT_JS, esc, keys_note, table
from .plots import NONFINITE_COLOUR, gain_plot, layer_plot, panel_plot, risk_plot
from .text import certificate_line, evidence_lines, no_sites_line, reservoir_line, terminal_summary

if TYPE_CHECKING:
    from .panel import PanelItem

__all__ = ["html_report", "attack_section"]

#: Sites shown in the summary table; the rest are in the full table.
TOP_SITES = 8


def _img(uri: str | None, alt: str) -> str:
    return f'<p><img src="{uri}" alt="{esc(alt)}"></p>' if uri else ""


def _tone(words: str) -> str:
    return words.split(" ", 1)[0].strip(" —;")


def html_report(data: dict, panel: list[PanelItem] | None = None, files: dict[str, bytes] | None = None) -> str:
    """The whole page (see module docstring); plots embedded as PNG data URIs, no external URL."""
    m = data.get("model", {})
    tone, headline, sentence = answer(data)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>flowaudit · {esc(m.get('name'))}</title><style>{CSS}</style></head><body>",
        f"<h1>flowaudit {esc(data.get('kind'))} report · {esc(m.get('name'))}</h1>",
        f"<p class='answer {tone}'><b>{esc(headline)}</b> — {esc(sentence)}.</p>",
        f"<p class='note'>flowaudit {esc(data.get('flowaudit_version'))}, {esc(data.get('created'))}; "
        f"adapter {esc(m.get('adapter'))}, task {esc(m.get('task'))}, {m.get('n_parameters', 0):,} parameters, "
        f"fingerprint {esc(m.get('fingerprint'))}, error band {esc(str(m.get('error_band')))}; "
        f"report.json schema {esc(data.get('schema_version'))}</p>",
    ]
    if no_sites_line(m):
        parts.append(f"<p class='answer bad'>{esc(no_sites_line(m))}</p>")
    parts += _figures(data)
    parts += _top_sites(m)
    parts += _diagnosis_section(data)
    parts += _evidence_section(m)
    parts += _all_sites(m)
    parts += _layers(data)
    parts += _risk(data)
    if panel:
        band = tuple(m.get("error_band", (0.0, 1.0)))
        parts.append(
            "<h2 id='inputs'>Riskiest inputs</h2>"
            + _img(panel_plot(panel, band), "worst inputs with samples and s_OOD maps")
            + f"<p class='note'><span class='legend' style='background:{NONFINITE_COLOUR}'></span> non-finite "
            "(Inf/NaN) pixel. Other pixels are clamped to [0, 1] for display, as a saved image would be; the map "
            "is the Mahalanobis distance of each location's encoder features (fitted on every location of the "
            "fit data).</p>"
        )
    parts += attack_section(data, files or {})
    parts.append(
        "<h2>Terminal summary</h2><details><summary>the text the command printed</summary>"
        f"<pre>{esc(terminal_summary(data))}</pre></details>"
    )
    parts.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(parts)


def _figures(data: dict) -> list[str]:
    """The key figures per set: inputs, %Inf, %PixelErr (and LR-PSNR for SR)."""
    risk = data.get("risk")
    if not risk:
        return []
    header = ["set", "inputs", "%Inf", "%PixelErr"]
    by_set = risk.get("by_set", {})
    sr = any("lr_psnr_min" in r for r in by_set.values())
    if sr:
        header.append("LR-PSNR min/σ")
    rows = []
    for name, r in by_set.items():
        row = [name, r["n_inputs"], r["pct_inf"], r["pct_pixel_err"]]
        if sr:
            row.append(f"{fmt(r.get('lr_psnr_min'))} / {fmt(r.get('lr_psnr_std'))}")
        rows.append(row)
    return [
        f"<h2>Key figures</h2><p>K = {esc(risk['samples_per_input'])} samples per input at τ = "
        f"{esc(risk['temperature'])}; AUROC of s_OOD for an error {esc(risk.get('auroc'))}.</p>",
        table(header, rows),
        keys_note(header),
    ]


def _site_row(s: dict) -> tuple[list, list]:
    r2, g = s["remark2"], s.get("inverse_gain") or {}
    words = site_words(s)
    return [s["name"], s["kind"], words, r2.get("tail_ratio"), g.get("max")], ["", "", _tone(words), "", ""]


def _top_sites(m: dict) -> list[str]:
    sites = m.get("sites") or []
    if not sites:
        return []
    top = riskiest_sites(sites)[:TOP_SITES]
    rows, classes = zip(*(_site_row(s) for s in top))
    rest = len(sites) - len(top)
    more = f" {rest} more in <a href='#sites'>the full table</a> and in report.json." if rest else ""
    mv = m.get("remark2") or {}
    head = ["site", "kind", "verdict", "tail ratio", "1/c' max"]
    css = esc(mv.get("verdict", "")).replace(" ", "-")
    return [
        f"<h2>Riskiest sites</h2><p>Remark 2 for the model: <span class='{css}'>{esc(mv.get('verdict', '–'))}</span>"
        f" — {mv.get('n_violates', 0)} of {len(sites)} sites violate, "
        f"{mv.get('n_inconclusive', 0)} unproven.{more}</p>",
        table(head, rows, text_cols=["verdict"], classes=classes),
        keys_note(head),
    ]


def _diagnosis_section(data: dict) -> list[str]:
    items = []
    for f in diagnosis(data):
        cmds = "".join(f"<pre>{esc(c)}</pre>" for c in f.commands)
        items.append(f"<li><b>{esc(f.title)}</b>{esc(f.evidence)}<br><i>Do:</i> {esc(f.action)}{cmds}</li>")
    note = (
        "<p class='note'>CKPT: the checkpoint file of this model (the bundled ones ship in "
        "flowaudit/reference_models/checkpoints/); DATA, OOD, TRAIN: your data folders or array files.</p>"
    )
    return ["<h2 id='diagnosis'>Diagnosis and fixes</h2><ol class='fixes'>" + "".join(items) + "</ol>" + note]


def _evidence_section(m: dict) -> list[str]:
    """The sites' evidence in words, the certificate line and the probe's reservoir."""
    out = []
    lines = evidence_lines(m)
    if lines:
        out.append("<h2>Remark 2 evidence</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>")
    for line in (certificate_line(m), reservoir_line(m)):
        if line:
            out.append(f"<p>{esc(line)}</p>")
    return out


def _all_sites(m: dict) -> list[str]:
    sites = m.get("sites") or []
    if not sites:
        return []
    head = [
        "site", "kind", "verdict", "remark 2", "rests on", "tail ratio", "probe |x|", "bound ratio", "certificate",
        "c' min", "c' max", "1/c' p50", "1/c' p99", "1/c' max",
    ]  # fmt: skip
    rows, classes = [], []
    for s in sites:
        r2, g = s["remark2"], s.get("inverse_gain") or {}
        st = r2["structural"] if isinstance(r2.get("structural"), dict) else {}
        cert = st.get("certificate") or {}
        cert_s = (
            (f"|Δ| ≤ {fmt(cert['displacement'])}" + (" + |t|" if cert.get("plus_bias") else ""))
            if cert.get("displacement") is not None
            else "none"
        )
        pr = r2.get("probe") or {}
        words = site_words(s)
        rows.append(
            [
                s["name"], s["kind"], words, r2["verdict"], ", ".join(r2.get("rests_on", [])) or "–",
                r2["tail_ratio"], f"{fmt(pr.get('abs_x_min'))}–{fmt(pr.get('abs_x_max'))}", r2.get("bound_ratio"),
                cert_s, r2.get("derivative_min"), r2.get("derivative_max"), g.get("p50"), g.get("p99"), g.get("max"),
            ]
        )  # fmt: skip
        classes.append(["", "", _tone(words), r2["verdict"]] + [""] * 10)
    return [
        f"<h2 id='sites'>All {len(sites)} sites</h2><p class='note'>Click a column header to sort; the table "
        "scrolls inside its box.</p>",
        table(head, rows, sortable=True, tall=True, text_cols=["verdict", "rests on"], classes=classes),
        keys_note(head),
        "<p class='note'>Structural: what the parametrisation allows whatever the condition. Measured: the tail "
        "ratio where the tails are (from 10× the site's tail start to 10⁴× it, or until c' settles when the start "
        "is unknown) under the parameters kept while sampling the scanned conditions. Worst case: what the attack "
        "reached.</p>",
        "<h2>Inverse gain 1/c' per site</h2>" + _img(gain_plot(sites), "inverse-gain histograms"),
    ]


def _layers(data: dict) -> list[str]:
    if not data.get("layers"):
        return []
    head = ["layer", "var in", "var OOD", "ratio", "max|x| in", "max|x| OOD", "non-finite OOD"]
    rows = []
    for r in data["layers"]:
        i, o = r.get("in", {}), r.get("ood", {})
        rows.append(
            [r["name"], i.get("variance"), o.get("variance"), r.get("variance_ratio"), i.get("max_abs"),
             o.get("max_abs"), o.get("n_nonfinite")]
        )  # fmt: skip
    return [
        "<h2>Layer trace</h2>" + _img(layer_plot(data["layers"]), "layer variance trace"),
        f"<p>Explosion layer: <b>{esc(data.get('explosion_layer') or 'none')}</b></p>",
        table(head, rows, sortable=True, tall=True),
        keys_note(head),
    ]


def _risk(data: dict) -> list[str]:
    if not data.get("risk"):
        return []
    worst = sorted(data.get("inputs", []), key=lambda r: -(r.get("risk") or 0) - (r["n_pixel_err"] or 0))[:15]
    head = ["input", "set", "s_OOD", "risk", "n_inf", "n_pixel_err", "max|x|", "max 1/c'"]
    rows = [
        [r["id"], r["set"], r.get("s_ood"), r.get("risk"), r["n_inf"], r["n_pixel_err"], r["max_abs"],
         r.get("max_inverse_gain")]
        for r in worst
    ]  # fmt: skip
    return [
        "<h2>Exploding-inverse risk</h2>" + _img(risk_plot(data), "s_OOD vs pixel errors"),
        table(head, rows, sortable=True, tall=True, text_cols=["set"]),
        keys_note(head),
    ]


def attack_section(data: dict, files: dict[str, bytes], max_rows: int = 15, max_images: int = 4) -> list[str]:
    """The Attack section: settings, summary, the worst starts, and for images their conditions and samples."""
    import base64

    a = data.get("attack")
    if not a:
        return []
    s, st, b = a["summary"], a.get("settings", {}), a["budget"]
    growth = f", growing ×{esc(st.get('step_growth'))} a step" if st.get("step_growth", 1) != 1 else ""
    out = [
        f"<h2>Attack (worst case)</h2><p>Objective <b>{esc(a['objective'])}</b> within <b>{esc(b['spec'])}</b> "
        f"({esc(st.get('steps'))} {esc(st.get('step_rule', ''))} steps of {esc(st.get('step_size'))}{growth}; "
        f"{s['n_starts']} starts × K = {esc(st.get('samples'))} samples at τ = {esc(st.get('temperature'))}, "
        f"seed {esc(st.get('seed'))}). Broken: <b>{s['n_broken']}/{s['n_starts']}</b> ({esc(s['broken_rate'])}); "
        f"median distance to break <b>{esc(s['median_distance_to_break'])}</b> ({esc(b['norm'])}); worst max|x| "
        f"<b>{esc(s['worst_max_abs'])}</b>; worst 1/c' <b>{esc(s['worst_inverse_gain'])}</b>.</p>",
    ]
    head = ["start", "J before", "J after", "max|x|", "max 1/c'", "non-finite", "broken", "to break", "distance",
            "layer"]  # fmt: skip
    by_id = {r["id"]: r for r in a["starts"]}
    order = [by_id[i] for i in s.get("worst", [])] + [r for r in a["starts"] if r["id"] not in s.get("worst", [])]
    rows, classes = [], []
    for r in order[:max_rows]:
        rows.append(
            [r["id"], r["objective_before"], r["objective_after"], r["max_abs"], r["max_inverse_gain"],
             r["nonfinite"], "yes" if r["broken"] else "no", r.get("distance_to_break"), r["distance"],
             r["layer"] or "–"]
        )  # fmt: skip
        classes.append([""] * 6 + ["violates" if r["broken"] else "compliant"] + [""] * 3)
    out.append(table(head, rows, sortable=True, tall=True, text_cols=["layer"], classes=classes))
    out.append(
        "<p class='note'>J: the attack's objective. Broken: a sample left the error band or went non-finite; to "
        "break: how far from the start that first happened. A broken start kept climbing inside the budget (one "
        "that went non-finite stopped there); each start is shown at its worst point, distance: how far that is "
        "from the start. Layer: the first layer of the inverse pass whose max |value| grew "
        f"×{esc(st.get('layer_factor'))} over the start's and passed ×{esc(st.get('layer_factor'))} the error band "
        "(or went non-finite).</p>"
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
            "<div class='scroll'><table><tr><th class='name'>start</th><th>condition</th><th>attacked</th>"
            "<th>sample 0</th><th>sample 1</th></tr>"
        )
        for stem in stems:
            out.append(
                f"<tr><td class='name'>{esc(stem.split('/', 1)[1])}</td>"
                + "".join(cell(f"{stem}_{k}.png") for k in ("start", "attack", "sample0", "sample1"))
                + "</tr>"
            )
        out.append(
            "</table></div><p class='note'>Samples clamped to [0, 1] for display (non-finite values black in these "
            "saved images); the arrays are in attack/worst.npz.</p>"
        )
    return out
