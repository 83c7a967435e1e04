"""What a report means, in words: the one-sentence answer, each site's verdict, and what to do about it.

The answer says whether the model is safe for the data it saw, on what evidence, and where it breaks.
The diagnosis ties each finding to an action and the commands that carry it out. Both read the report
dict only (keys in ``docs/report.md``), so the HTML page and the JUnit XML say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..utils.format import fmt, num

__all__ = ["Finding", "site_words", "riskiest_sites", "answer", "diagnosis"]

_AFFINE = ("affine", "affine-bounded")


def _pct(v: object) -> str:
    x = num(v)
    return "–" if math.isnan(x) else f"{x:.1f} %"


def _on_data(r2: dict) -> bool:
    """The measured tail ratio is below the threshold: the scanned conditions reach the unsafe tails."""
    ratio = num(r2.get("tail_ratio"))
    return not math.isnan(ratio) and ratio < r2.get("threshold", 0.5)


def _attacked(r2: dict) -> bool:
    return bool((r2.get("worst_case") or {}).get("reached"))


def site_words(site: dict) -> str:
    """A site's Remark 2 verdict as a person reads it ("unsafe by design — not triggered by your data")."""
    r2 = site["remark2"]
    structural = (r2.get("structural") or {}).get("verdict")
    attack_ran = r2.get("worst_case") is not None
    if r2["verdict"] == "violates":
        by = [w for w, hit in (("your data", _on_data(r2)), ("the attack", _attacked(r2))) if hit]
        if by:
            return "unsafe — triggered by " + " and ".join(by)
        if structural == "violates":
            return "unsafe by design — not triggered by your data" + (" or the attack" if attack_ran else "")
        return "unsafe"
    if r2["verdict"] == "compliant":
        if structural == "compliant":
            return "safe by design" + ("; confirmed on your data" if "measured" in r2.get("rests_on", []) else "")
        return "safe — measured on your data (c' does not depend on x)"
    if math.isnan(num(r2.get("tail_ratio"))):
        return "unproven — never visited while sampling"
    return "unproven — no structure to read and no blow-up seen"


def riskiest_sites(sites: list[dict]) -> list[dict]:
    """Sites riskiest first: violating, reached by the data or the attack, largest inverse gain, lowest tail ratio."""

    def key(s: dict) -> tuple:
        r2 = s["remark2"]
        gain = num((s.get("inverse_gain") or {}).get("max"))
        ratio = num(r2.get("tail_ratio"))
        return (
            {"violates": 0, "inconclusive": 1}.get(r2["verdict"], 2),
            not (_on_data(r2) or _attacked(r2)),
            -(gain if not math.isnan(gain) else -1.0),
            ratio if not math.isnan(ratio) else math.inf,
        )

    return sorted(sites, key=key)


def _failing_sets(data: dict) -> list[tuple[str, dict]]:
    by_set = (data.get("risk") or {}).get("by_set", {})
    return [(k, r) for k, r in by_set.items() if num(r.get("pct_inf")) > 0 or num(r.get("pct_pixel_err")) > 0]


def _evidence(data: dict) -> str:
    """On what evidence: samples, sites probed, attack starts."""
    m, risk, a = data.get("model", {}), data.get("risk"), data.get("attack")
    parts = []
    if risk:
        parts.append(f"{risk['samples_per_input']} samples × {risk['n_inputs']} inputs")
    if m.get("sites"):
        parts.append(f"{len(m['sites'])} sites probed")
    if a:
        parts.append(f"{a['summary']['n_starts']} attack starts within {a['budget']['spec']}")
    return ", ".join(parts) or "the model's structure"


def _where(data: dict) -> str:
    """Where it breaks: the explosion layer and the riskiest violating site."""
    m = data.get("model", {})
    bad = [s for s in riskiest_sites(m.get("sites", [])) if s["remark2"]["verdict"] == "violates"]
    parts = []
    if data.get("explosion_layer"):
        parts.append(f"from layer {data['explosion_layer']}")
    if bad:
        s = bad[0]
        parts.append(
            f"through {len(bad)} of {len(m['sites'])} sites that violate Remark 2 (worst {s['name']}, "
            f"1/c' up to {fmt((s.get('inverse_gain') or {}).get('max'))})"
        )
    return " ".join(parts)


_SET = {"in": "in-distribution", "ood": "OOD"}


def _broke(failing: list[tuple[str, dict]], band: list[float]) -> str:
    """ "8.3 % of in-distribution inputs gave a sample outside [-0.5, 1.5] (0 % non-finite)"."""
    out = []
    for k, r in failing:
        inf, err = num(r.get("pct_inf")), num(r.get("pct_pixel_err"))
        what = f"{_pct(err)} of {_SET.get(k, k)} inputs gave a sample outside [{fmt(band[0])}, {fmt(band[1])}]"
        out.append(what + (f", {_pct(inf)} a non-finite one" if inf > 0 else " (none non-finite)"))
    return " and ".join(out)


def answer(data: dict) -> tuple[str, str, str]:
    """``(tone, headline, sentence)``: the answer at the top of the page, tone ``bad``, ``warn`` or ``good``."""
    m = data.get("model", {})
    verdict = (m.get("remark2") or {}).get("verdict")
    cert = m.get("certificate") or {}
    sites = m.get("sites", [])
    n_bad = sum(s["remark2"]["verdict"] == "violates" for s in sites)
    evidence, where = _evidence(data), _where(data)
    if verdict == "no sites found":
        return "bad", "Not audited", "the adapter found no conditional site, so nothing here shows the model is safe"
    if data.get("kind") == "attack":
        s = data["attack"]["summary"]
        if s["n_broken"]:
            return (
                "bad",
                "Breaks under attack",
                f"{s['n_broken']} of {s['n_starts']} starts broke within {data['attack']['budget']['spec']} "
                f"(median distance to break {fmt(s['median_distance_to_break'])}), on {evidence}"
                + (f"; first layer to blow up {_first_layer(data)}" if _first_layer(data) else ""),
            )
        return (
            "warn" if n_bad or verdict != "compliant" else "good",
            "Held under attack",
            f"none of {s['n_starts']} starts broke within {data['attack']['budget']['spec']} "
            f"(worst max|x| {fmt(s['worst_max_abs'])}, worst 1/c' {fmt(s['worst_inverse_gain'])})",
        )
    failing = _failing_sets(data)
    band = m.get("error_band", [-0.5, 1.5])
    where = f"; it breaks {where}" if where else ""
    if failing:
        return "bad", "Not safe for this data", f"{_broke(failing, band)}, on {evidence}{where}"
    if data.get("risk"):
        saw = f"no sample went non-finite or left the error band (on {evidence})"
    else:
        saw = f"no data were sampled for errors (evidence: {evidence}; `flowaudit scan` samples your data)"
    if n_bad:
        why = "inputs further from the training data can make the inverse blow up"
        return "warn", "Unsafe by design", f"{saw}, but {n_bad} of {len(sites)} sites violate Remark 2 — {why}"
    if verdict == "compliant" and cert.get("certified"):
        bound = fmt(cert["bound"])
        safe = "Safe for this data and by design" if data.get("risk") else "Safe by design"
        return "good", safe, f"{saw}; every site complies with Remark 2 and the certificate bounds blow-up by {bound}"
    if verdict == "compliant":
        return "good", "Safe by Remark 2, not certified", f"{saw}; every site complies, but {_blocking(m)}"
    n_open = sum(s["remark2"]["verdict"] == "inconclusive" for s in sites)
    return "warn", "Not proven safe", f"{saw}, but {n_open} of {len(sites)} sites are unproven"


def _first_layer(data: dict) -> str | None:
    """The layer where the attack's worst broken start blew up."""
    a = data["attack"]
    by_id = {r["id"]: r for r in a["starts"]}
    return next((by_id[i]["layer"] for i in a["summary"].get("worst", []) if by_id[i].get("layer")), None)


def _blocking(m: dict) -> str:
    b = (m.get("certificate") or {}).get("blocking") or []
    return f"no certificate: {b[0]['site']} prevents it ({b[0]['why']})" if b else "no certificate"


@dataclass
class Finding:
    """One diagnosis item: what was found, why it matters, what to do, and the commands that do it."""

    title: str
    evidence: str
    action: str
    commands: list[str] = field(default_factory=list)


def _ckpt(m: dict) -> str:
    name = str(m.get("name", ""))
    return name if name.endswith((".pt", ".pth", ".ckpt", ".safetensors")) else "CKPT"


def _train_command(m: dict, coupling: str, suffix: str) -> str:
    """``flowaudit train`` with another coupling; an image model starts ``--from`` the audited checkpoint."""
    task = m.get("task") or "sr"
    start = f" --from {_ckpt(m)}" if task in ("sr", "lowlight") else ""
    return f"flowaudit train {task}{start} --coupling {coupling} --out {task}-{suffix}.pt"


def _affine_violations(m: dict) -> list[dict]:
    """The sites that violate Remark 2 through an affine (or unreadable) coupling, riskiest first."""
    bad = [s for s in riskiest_sites(m.get("sites", [])) if s["remark2"]["verdict"] == "violates"]
    return [s for s in bad if s["kind"] in _AFFINE or s["kind"] == "unknown"]


def _no_sites(data: dict) -> Finding | None:
    """The adapter found nothing to probe: an empty audit must not read as a clean one."""
    m = data.get("model", {})
    if (m.get("remark2") or {}).get("verdict") != "no sites found":
        return None
    return Finding(
        "No conditional site was found",
        (m.get("coverage") or {}).get("reason") or "no sites found",
        "Name the sites in the adapter (or pass --model pkg:factory with an adapter that declares them); "
        "an audit that saw nothing is not a clean result.",
        [f"flowaudit inspect {m.get('name', 'MODEL')}"],
    )


def _affine_tails(data: dict) -> Finding | None:
    """Affine sites violate Remark 2: the remedy is retraining with modified RQ-spline couplings."""
    m = data.get("model", {})
    affine = _affine_violations(m)
    if not affine:
        return None
    task = m.get("task") or "sr"
    hit = [s for s in affine if _on_data(s["remark2"]) or _attacked(s["remark2"])]
    return Finding(
        f"{len(affine)} {'/'.join(sorted({s['kind'] for s in affine}))} sites have tails whose derivative "
        "bounds do not meet (Remark 2)",
        f"{len(hit)} of them are triggered by your data or the attack; largest inverse gain "
        f"{fmt((affine[0].get('inverse_gain') or {}).get('max'))} at {affine[0]['name']}. An affine site "
        "computes c' = s(y): when the conditioning network meets an unfamiliar input, s can fall towards 0 "
        "and 1/s explodes.",
        "Retrain with modified RQ-spline couplings (identity tails: c' = 1 for large |x|, so the inverse "
        "cannot blow up); --from keeps the encoder and every non-coupling weight. Then scan again.",
        [
            _train_command(m, "modified-rq-spline", "spline"),
            f"flowaudit scan {task}-spline.pt --data DATA --ood-data OOD --out report-spline",
        ],
    )


def _unbounded_scale(data: dict) -> Finding | None:
    """Plain affine sites (not clamped): a quicker, weaker fix is to bound their scale."""
    m = data.get("model", {})
    if not any(s["kind"] == "affine" for s in _affine_violations(m)):
        return None
    return Finding(
        "The scale of the affine sites is unbounded below",
        "c' = s ∈ (10⁻⁴, 1]: one site alone may multiply a value by up to 10⁴ on the inverse pass.",
        "A quicker, weaker fix: clamp the scale to (0.1, 1.1) (FS-NCSR†). It caps each site's inverse "
        "gain at 10 but still violates Remark 2, so a stack of sites can still multiply it.",
        [_train_command(m, "affine-bounded", "clamped")],
    )


def _unfamiliar_inputs(data: dict) -> Finding | None:
    """Errors on scored inputs: gate inputs by s_OOD (with the threshold the data suggest) and widen training."""
    risk, ood = data.get("risk") or {}, data.get("ood") or {}
    if not (_failing_sets(data) and ood.get("s_ood")):
        return None
    fit = risk.get("logistic")
    s_in = [num(v) for v in ood["s_ood"].get("in", [])]
    s_in = [v for v in s_in if math.isfinite(v)]
    gate = f"largest in-distribution s_OOD {fmt(max(s_in))}" if s_in else "an s_OOD threshold"
    if fit and fit["coef"] > 0:
        gate += f"; the logistic fit puts P(error) = 1/2 at s_OOD = {fmt(-fit['intercept'] / fit['coef'])}"
    return Finding(
        "Inputs unlike the training data break it",
        f"AUROC of s_OOD for predicting an error {fmt(risk.get('auroc'))}; riskiest inputs "
        f"{', '.join((risk.get('ranked') or [])[:3]) or '–'}.",
        f"Tighter conditioning: refuse or flag inputs whose s_OOD passes a threshold ({gate}), and train "
        "on data that cover the inputs you expect.",
        [f"flowaudit fit {data.get('model', {}).get('name', 'MODEL')} --data TRAIN --out stats.h5"],
    )


def _blow_up_layer(data: dict) -> Finding | None:
    """The first layer of the inverse pass whose variance explodes on OOD inputs: where to look first."""
    if not data.get("explosion_layer"):
        return None
    return Finding(
        f"The blow-up starts at layer {data['explosion_layer']}",
        "the first layer of the inverse pass whose OOD/in-distribution variance ratio passes "
        f"×{fmt((data.get('settings') or {}).get('explosion_threshold'))}.",
        "Look at the sites in and just before this layer first (the layer trace below).",
    )


def _unproven(data: dict) -> Finding | None:
    """Sites with an inconclusive verdict: declare their tails, or let the attack search them."""
    m = data.get("model", {})
    open_ = [s for s in m.get("sites", []) if s["remark2"]["verdict"] == "inconclusive"]
    if not open_:
        return None
    return Finding(
        f"{len(open_)} sites are unproven",
        f"{open_[0]['name']}: {site_words(open_[0])}.",
        "Declare their tail bounds in the adapter, or search for a worst case with the attack.",
        [f"flowaudit attack {m.get('name', 'MODEL')} --data DATA --budget linf:0.05 --out attack-report"],
    )


def _attack_breaks(data: dict) -> Finding | None:
    """The attack broke some starts: small changes of the condition suffice, so the fixes above apply."""
    a = data.get("attack")
    if not (a and a["summary"]["n_broken"]):
        return None
    return Finding(
        f"The attack breaks {a['summary']['n_broken']} of {a['summary']['n_starts']} starts",
        f"within {a['budget']['spec']}, median distance to break {fmt(a['summary']['median_distance_to_break'])}.",
        "Small changes of the condition are enough: the fixes above apply; rerun the attack after them.",
    )


def _nothing_to_fix(data: dict) -> Finding:
    """The one item of a clean report: keep holding retrained models to the same rule in CI."""
    m = data.get("model", {})
    certified = " and the model is certified" if (m.get("certificate") or {}).get("certified") else ""
    return Finding(
        "Nothing to fix",
        f"every site complies with Remark 2{certified}.",
        "Keep the audit in CI so that a retrained model is held to the same rule.",
        [f"flowaudit scan {m.get('name', 'MODEL')} --data DATA --out report --fail-on unproven --junit audit.xml"],
    )


# One function per finding, in the order the page lists them; each returns its Finding or None.
_FINDINGS: tuple[Callable[[dict], Finding | None], ...] = (
    _no_sites,
    _affine_tails,
    _unbounded_scale,
    _unfamiliar_inputs,
    _blow_up_layer,
    _unproven,
    _attack_breaks,
)


def diagnosis(data: dict) -> list[Finding]:
    """The findings of a report, each tied to a fix (see module docstring); a clean model gets one item."""
    found = [f for f in (find(data) for find in _FINDINGS) if f is not None]
    return found or [_nothing_to_fix(data)]
