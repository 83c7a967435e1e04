"""The one-screen terminal summary of a report dict (about 40 lines)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from typing import Any

from ..utils.format import fmt, num, text_table

__all__ = [
    "terminal_summary",
    "site_table_rows",
    "evidence_lines",
    "certificate_line",
    "reservoir_line",
    "no_sites_line",
    "attack_lines",
    "configuration_lines",
    "band_lines",
]


def _pct(v: Any) -> str:
    return "–" if v is None else f"{num(v):.1f}%"


_SHORT = {"structural": "structure", "measured": "data", "worst_case": "attack"}


def site_table_rows(model: dict) -> list[tuple[str, ...]]:
    """(name, kind, verdict, evidence it rests on, tail ratio, bound ratio, 1/c' p50, p99, max) per site."""
    rows = []
    for s in model.get("sites", []):
        g, r2 = s.get("inverse_gain", {}), s["remark2"]
        on = "+".join(_SHORT.get(e, e) for e in r2.get("rests_on", [])) or "–"
        rows.append(
            (
                s["name"],
                s["kind"],
                r2["verdict"],
                on,
                fmt(r2["tail_ratio"]),
                fmt(r2.get("bound_ratio")),
                fmt(g.get("p50")),
                fmt(g.get("p99")),
                fmt(g.get("max")),
            )
        )
    return rows


def _span(values: list[float], form: Callable[[float], str] = fmt) -> str:
    """The range of ``values`` (NaN left out) as ``form`` writes its ends; one end if they read alike."""
    v = sorted(x for x in values if not math.isnan(x))
    if not v:
        return "–"
    return form(v[0]) if form(v[0]) == form(v[-1]) else f"{form(v[0])}–{form(v[-1])}"


def _whole(n: int) -> str:
    """A count, whole (20,000, not 2e+04)."""
    return f"{n:,}"


def evidence_lines(model: dict) -> list[str]:
    """The sites' evidence in words, sites that read alike grouped (their tail ratios as a range)."""
    groups: dict[tuple, list[dict]] = {}
    for s in model.get("sites", []):
        r2 = s["remark2"]
        if "structural" not in r2:
            continue
        words = r2.get("words", "")
        # group on the words without the numbers in brackets
        key = (r2["verdict"], s["kind"], tuple(w.split(" (")[0].split(" at distance")[0] for w in words.split("; ")))
        groups.setdefault(key, []).append(s)
    out = []
    for (verdict, kind, parts), sites in groups.items():
        r2s = [s["remark2"] for s in sites]
        ratio = _span([num(r["tail_ratio"]) for r in r2s])
        text = "; ".join(f"{p} (tail ratio {ratio})" if p.endswith("on your data") else p for p in parts)
        dists = [
            num(r["worst_case"]["distance"])
            for r in r2s
            if r.get("worst_case") and r["worst_case"].get("distance") is not None
        ]
        if dists and "reached by the attack" in parts:
            text = text.replace("reached by the attack", f"reached by the attack at distance {_span(dists)}")
        who = sites[0]["name"] if len(sites) == 1 else f"{len(sites)} {kind} sites"
        out.append(f"{who}: {_LEAD.get(verdict, verdict)} — {_plain(text)}")
    return out


_LEAD = {"violates": "violates Remark 2", "compliant": "complies with Remark 2", "inconclusive": "unproven"}

# "violates by structure; not reached on your data" reads like a contradiction: say what each part means
_PLAIN = (
    ("violates by structure", "unsafe by design"),
    ("complies by structure", "safe by design"),
    ("not reached on your data", "not triggered by your data"),
    ("reached on your data", "triggered by your data"),
    ("not reached by the attack", "not triggered by the attack"),
    ("reached by the attack", "triggered by the attack"),
)


def _plain(words: str) -> str:
    """A site's evidence words (``remark2.words``) as a person reads them: "unsafe by design; not triggered…"."""
    parts = words.split("; ")
    for i, p in enumerate(parts):
        for raw, plain in _PLAIN:
            if p.startswith(raw):
                parts[i] = plain + p[len(raw) :]
                break
    return "; ".join(parts)


def certificate_line(model: dict) -> str | None:
    """ "no blow-up beyond X" when the whole model is certified; else which sites prevent it."""
    c = model.get("certificate")
    if not c:
        return None
    if c.get("certified"):
        return (
            f"Certificate: no blow-up beyond {fmt(c['bound'])} (|x|∞ ≤ {fmt(c.get('gain'))}·|z|∞ + "
            f"{fmt(c.get('offset'))} over the whole inverse pass, stated for |z|∞ ≤ {fmt(c.get('latent_abs'))})"
        )
    blocking = c.get("blocking", [])
    if not blocking:
        return "Certificate: none (no sites found)"
    names = ", ".join(b["site"] for b in blocking[:3]) + (f" and {len(blocking) - 3} more" if len(blocking) > 3 else "")
    scanned = (
        "; at the parameters kept from the scanned conditions the whole inverse is bounded by "
        f"{fmt(c['bound_scanned'])}"
        if c.get("bound_scanned") is not None
        else ""
    )
    n = len(blocking)
    return f"Certificate: none — {n} layer(s) or site(s) prevent it ({names}: {blocking[0]['why']}){scanned}"


def reservoir_line(model: dict) -> str | None:
    """What the tail probe's parameter reservoir held."""
    probes = [s["remark2"]["probe"] for s in model.get("sites", []) if isinstance(s["remark2"].get("probe"), dict)]
    res = [r for r in (p.get("reservoir") for p in probes) if r]
    if not res:
        return None
    screened = [p for p in probes if p.get("rows_screened")]
    ladder = (
        f"; {len(screened)} site(s) screened every kept row at the farthest |x| and probed the whole |x| range under "
        f"{_span([p['rows_ladder'] for p in screened], _whole)} of {_span([p['rows'] for p in screened], _whole)} "
        "rows, the ones the screen ranks most extreme"
        if screened
        else ""
    )
    return (
        f"Tail probe: reservoir of {res[0]['budget']:,} parameter numbers per site "
        "(half by largest gain, half at random); "
        f"kept {_span([r['rows'] for r in res], _whole)} sample rows "
        f"from {_span([r['inputs'] for r in res], _whole)} inputs "
        f"in {_span([r['batches'] for r in res], _whole)} inverse passes{ladder}"
    )


def no_sites_line(model: dict) -> str | None:
    """The prominent line of a model whose adapter found no site."""
    if model.get("remark2", {}).get("verdict") != "no sites found":
        return None
    reason = (model.get("coverage") or {}).get("reason") or "no sites found"
    return f"!! NO SITES FOUND — nothing was audited for Remark 2, this is not a clean result: {reason}"


def configuration_lines(model: dict, width: int = 118) -> list[str]:
    """An official checkpoint's configuration, every value with where it came from: weights, option file,
    flag or default (what the model entry's ``configuration`` holds; nothing for other models)."""
    conf = model.get("configuration")
    if not conf:
        return []
    out = [f"Configuration ({model.get('layout')}), by source:"]
    for source in ("weights", "option file", "flag", "default"):
        items = [(n, p) for n, p in conf.items() if p.get("source") == source]
        if not items:
            continue

        def one(name: str, p: dict) -> str:
            value = p["value"]
            shown = "[" + ", ".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else str(value)
            return f"{name}={shown}" if source == "weights" else f"{name}={shown} ({p.get('key')})"

        text = f"{source}: " + ", ".join(one(n, p) for n, p in items)
        out += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)
    return out


def band_lines(band: dict | None) -> list[str]:
    """The error band with its source, then its warnings (a guessed band, a band the outputs do not fit)."""
    if not band:
        return []
    lines = [f"  error band [{fmt(band['lo'])}, {fmt(band['hi'])}] from {band['source']}: {band['detail']}"]
    return lines + [f"  warning: {band[k]}" for k in ("warning", "misfit") if band.get(k)]


def terminal_summary(data: dict, max_sites: int = 12) -> str:
    """A summary that fits one screen (about 40 lines)."""
    m = data.get("model", {})
    out = [
        f"flowaudit {data.get('flowaudit_version')} · {data.get('kind')} · {m.get('name')} "
        f"({m.get('adapter')}, {m.get('task')}, {m.get('n_parameters', 0):,} parameters)"
    ]
    if str(m.get("weights", "")).startswith("untrained"):
        out.append(f"!! untrained weights: {m['weights']} — the figures describe a model that was never trained")
    out += configuration_lines(m)
    if no_sites_line(m):
        out.append(no_sites_line(m))
    sites = site_table_rows(m)
    if sites:
        n_bad = sum(r[2] == "violates" for r in sites)
        mv = m.get("remark2", {})
        model_v = f"model {mv['verdict']} (on {', '.join(mv.get('rests_on', [])) or '–'}); " if mv else ""
        out.append(
            f"Remark 2: {model_v}{len(sites)} sites, {n_bad} violate "
            f"(threshold {fmt(m['sites'][0]['remark2']['threshold'])})"
        )
        shown = sites[:max_sites]
        out += [
            "  " + line
            for line in text_table(shown, ("site", "kind", "remark2", "on", "tail", "bound", "1/c' p50", "p99", "max"))
        ]
        if len(sites) > max_sites:
            out.append(f"  … {len(sites) - max_sites} more in report.json")
        out += ["  " + line for line in evidence_lines(m)[:6]]
    for line in (certificate_line(m), reservoir_line(m)):
        if line:
            out.append(line)
    ood = data.get("ood")
    if ood and data.get("kind") == "fit":
        skipped = f" ({ood['n_nonfinite']} skipped: NaN/Inf)" if ood.get("n_nonfinite") else ""
        out.append(
            f"Gaussian: {ood['estimator']} on {ood['n_inputs']} inputs{skipped}, D = {ood['dim']}, "
            f"shrinkage {fmt(ood['shrinkage'])}" + (f" → {ood['out']}" if ood.get("out") else "")
        )
    elif ood:
        means = ", ".join(f"{k} {fmt(v)}" for k, v in ood["mean"].items())
        auroc = f", AUROC in vs OOD {fmt(ood['auroc_in_vs_ood'])}" if ood.get("auroc_in_vs_ood") is not None else ""
        out.append(
            f"s_OOD ({ood['estimator']}, D = {ood['dim']}, layers {', '.join(ood['layers'][:4])}"
            f"{'…' if len(ood['layers']) > 4 else ''}): mean {means}{auroc}"
        )
    risk = data.get("risk")
    if risk:
        out.append(f"Risk (K = {risk['samples_per_input']}, τ = {risk['temperature']}):")
        rows = []
        for name, r in risk.get("by_set", {}).items():
            psnr = f"{fmt(r.get('lr_psnr_min'))} / {fmt(r.get('lr_psnr_std'))}" if "lr_psnr_min" in r else "–"
            rows.append((name, str(r["n_inputs"]), _pct(r["pct_inf"]), _pct(r["pct_pixel_err"]), psnr))
        out += ["  " + line for line in text_table(rows, ("set", "inputs", "%Inf", "%PixelErr", "LR-PSNR min/σ"))]
        out += band_lines(risk.get("error_band"))
        bad = {k: d.get("n_nonfinite") for k, d in data.get("data", {}).items() if d.get("n_nonfinite")}
        if bad:
            out.append(
                "  NaN/Inf conditions, reported but not sampled (s_OOD = inf): "
                + ", ".join(f"{k} {n}" for k, n in bad.items())
            )
        fit = risk.get("logistic")
        fit_s = "logistic fit: one class only"
        if fit:
            fit_s = f"P(err) = σ({fmt(fit['intercept'])} + {fmt(fit['coef'])}·s_OOD)"
        out.append(f"  AUROC(s_OOD → error) {fmt(risk.get('auroc'))}, Spearman {fmt(risk.get('spearman'))}, {fit_s}")
        if risk.get("ranked"):
            out.append(f"  riskiest inputs: {', '.join(risk['ranked'][:5])}")
    if data.get("layers"):
        ex = data.get("explosion_layer")
        ratios = [r for r in data["layers"] if "variance_ratio" in r]
        if ratios:
            top = max(
                ratios, key=lambda r: num(r["variance_ratio"]) if not math.isnan(num(r["variance_ratio"])) else -1
            )
            out.append(
                f"Layer trace: explosion layer {ex or 'none'} "
                f"(threshold ×{fmt(data['settings']['explosion_threshold'])}); "
                f"largest OOD/in variance ratio ×{fmt(top['variance_ratio'])} at {top['name']}"
            )
    out += attack_lines(data)
    return "\n".join(out)


def attack_lines(data: dict, max_starts: int = 5) -> list[str]:
    """The Attack section: budget, objective, broken rate, distance to break, worst figures and starts."""
    a = data.get("attack")
    if not a:
        return []
    s, st = a["summary"], a.get("settings", {})
    lines = [
        f"Attack ({a['objective']} within {a['budget']['spec']}, {st.get('steps')} {st.get('step_rule', '')} steps, "
        f"{s['n_starts']} starts × K = {st.get('samples')}): "
        f"{s['n_broken']}/{s['n_starts']} broken ({_pct(100 * num(s['broken_rate']))}), "
        f"median distance to break {fmt(s['median_distance_to_break'])} ({a['budget']['norm']}), "
        f"worst max|x| {fmt(s['worst_max_abs'])}, worst 1/c' {fmt(s['worst_inverse_gain'])}"
    ]
    if a.get("fallback"):
        lines.append(f"  objective {a['fallback']}")
    by_id = {r["id"]: r for r in a["starts"]}
    rows = [
        (
            r["id"],
            fmt(r["objective_before"]),
            fmt(r["objective_after"]),
            fmt(r["max_abs"]),
            fmt(r["max_inverse_gain"]),
            "yes" if r["broken"] else "no",
            fmt(r.get("distance_to_break")),
            fmt(r["distance"]),
            r["layer"] or "–",
        )
        for r in (by_id[i] for i in s.get("worst", [])[:max_starts])
    ]
    if rows:
        lines += [
            "  " + line
            for line in text_table(
                rows,
                ("worst start", "J before", "J after", "max|x|", "max 1/c'", "broken", "to break", "distance", "layer"),
            )
        ]
    return lines
