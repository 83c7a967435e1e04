r"""The tail probe: :math:`c'` of a site over decades of :math:`|x|`, out to near the float limit.

Remark 2 asks what :math:`c'` does for large :math:`|x|`, and "large" means every :math:`|x|` a sample
can reach, i.e. up to the largest finite number of the model's dtype. The probe evaluates
:math:`c'(\pm|x|)` under every kept parameter point, decade by decade:

* from :math:`10\,B` when the site says its tails start at :math:`B` (``Site.tail_start()``), from
  :math:`|x| = 1` when every :math:`|x|` is a tail (:math:`B = 0`) or when the start is unknown;
* :data:`PER_DECADE` points a decade for the first :data:`NEAR_DECADES` decades, one point a decade
  beyond (at most :data:`FAR_POINTS` far decades, evenly strided), up to :math:`10^{e}` with
  :math:`10^{e+1}` below ``torch.finfo(dtype).max`` (float32: :math:`10^{37}`).

Per decade it keeps :math:`\min c'`, :math:`\max c'` and the count of non-finite :math:`c'` (a non-finite
derivative is evidence, never dropped). The trend of :math:`\log c'` against :math:`\log|x|` is *settled*
when every decade from some point on agrees with the last one within ``tol`` (in log) — over the whole
rest of the range, not two neighbours — and the fitted slopes of :math:`\log\min c'` and
:math:`\log\max c'` over that stretch are reported. The tail ratio is taken over the settled stretch;
when nothing settles, over the far half of the range, so a slope that keeps decaying shows as a tiny
ratio. With a known start the ratio is over the whole probed range (all of it is declared tail).

A map defined only on an interval (no tails) answers with non-finite values or raises outside it;
the probe then records ``domain`` and the values it could evaluate: "no tails" is a finding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["PER_DECADE", "NEAR_DECADES", "FAR_POINTS", "probe_limit", "probe_decades", "measured_evidence"]

PER_DECADE = 4
NEAR_DECADES = 4
FAR_POINTS = 12


def probe_limit(params: list[Any]) -> float:
    """The largest probe decade for the kept parameters' dtype: :math:`10^e`, :math:`10^{e+1}` < ``finfo.max``."""
    dtype = next((p.dtype for p in params if isinstance(p, Tensor) and p.is_floating_point()), torch.float32)
    dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32
    return 10.0 ** (math.floor(math.log10(torch.finfo(dtype).max)) - 1)


def probe_decades(low: float, limit: float) -> list[tuple[float, int]]:
    """(start of decade, points in it) from ``low`` up to ``limit``: dense near, strided far."""
    n = max(1, int(math.floor(math.log10(limit / low))) + 1)
    near = [(low * 10.0**k, PER_DECADE) for k in range(min(n, NEAR_DECADES))]
    far = list(range(NEAR_DECADES, n))
    if len(far) > FAR_POINTS:
        stride = math.ceil(len(far) / FAR_POINTS)
        far = far[::stride] + ([far[-1]] if (len(far) - 1) % stride else [])  # always the last decade
    return near + [(low * 10.0**k, 1) for k in far]


def finite_rows(params: list[Any]) -> tuple[list[Any], int]:
    """The parameter rows with every number finite, and how many rows were left out.

    A non-finite parameter row is the conditioner's output on values that had already blown up; where
    that happened is the gain reading's business (:func:`~flowaudit.evidence.sweep.nonfinite_origins`), so
    the probe does not count it as a non-finite tail of this site.
    """
    kept, dropped = [], 0
    for p in params:
        if isinstance(p, Tensor) and p.dim() >= 2 and p.is_floating_point():
            ok = torch.isfinite(p).flatten(1).all(1)
            dropped += int((~ok).sum())
            p = p[ok] if not bool(ok.all()) else p
            if not len(p):
                continue
        kept.append(p)
    return kept, dropped


PROBE_BLOCK = 1 << 22  # c' values one call evaluates at most (probe values × parameter numbers)


def _values(low: float, points: int) -> Tensor:
    """The decade's probe values ±|x|, ``points`` of them a side."""
    v = low * 10 ** (torch.arange(points, dtype=torch.float64) / PER_DECADE)
    return torch.cat([-v.flip(0), v])


def _numel(p: Any) -> int:
    return int(p.numel()) if isinstance(p, Tensor) else 1


def _decades(site: Any, params: list[Any], spans: list[tuple[float, int]]) -> list[dict]:
    """Each decade's min/max c', finite and non-finite counts over ±|x| (:func:`probe_decades` ``spans``).

    c' is asked once per parameter tensor for the values of many decades together (blocks of at most
    :data:`PROBE_BLOCK` numbers), and the figures are read back in one host transfer. A block the map refuses
    (one defined on an interval) is asked again decade by decade, so that the values it takes still count.
    """
    values = [_values(low, k) for low, k in spans]
    figures = torch.zeros((len(spans), 4), dtype=torch.float64)  # min, max, n finite, n non-finite
    figures[:, 0], figures[:, 1] = math.inf, -math.inf
    errors: dict[int, str] = {}
    for p in params:
        block = max(1, PROBE_BLOCK // max(1, _numel(p)) // (2 * PER_DECADE))  # decades a call
        for first in range(0, len(spans), block):
            part = range(first, min(first + block, len(spans)))
            try:
                _add(figures, part, values, site, p)
            except Exception:  # noqa: BLE001 - a map defined on an interval may refuse values outside it
                for i in part:
                    try:
                        _add(figures, range(i, i + 1), values, site, p)
                    except Exception as exc:  # noqa: BLE001
                        errors[i] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                        figures[i, 3] += len(values[i])
    rows = []
    for i, ((low, _), (lo, hi, n, bad)) in enumerate(zip(spans, figures.tolist(), strict=True)):
        row = {"abs_x": low, "top": float(values[i].max()), "min": lo if n else math.nan}
        row.update({"max": hi if n else math.nan, "n": int(n), "n_nonfinite": int(bad)})
        if i in errors:
            row["error"] = errors[i]
        rows.append(row)
    return rows


def _add(figures: Tensor, part: range, values: list[Tensor], site: Any, p: Any) -> None:
    """c' under ``p`` at the values of decades ``part``, folded into their rows of ``figures``."""
    v = torch.cat([values[i] for i in part])
    d = site.derivative_at(v.to(p.device) if isinstance(p, Tensor) else v, p).detach().to(torch.float64)
    d = d.reshape(len(v), -1)
    if not d.shape[1]:
        return
    ok = torch.isfinite(d)
    lo = torch.where(ok, d, math.inf).amin(1)
    hi = torch.where(ok, d, -math.inf).amax(1)
    stats = torch.stack([lo, hi, ok.sum(1).to(torch.float64), (~ok).sum(1).to(torch.float64)], 1).cpu()
    for i, chunk in zip(part, stats.split([len(values[i]) for i in part]), strict=True):
        figures[i, 0] = min(float(figures[i, 0]), float(chunk[:, 0].min()))
        figures[i, 1] = max(float(figures[i, 1]), float(chunk[:, 1].max()))
        figures[i, 2:] += chunk[:, 2:].sum(0)


def _agree(a: dict, b: dict, tol: float) -> bool:
    """Two decades' (min, max) within ``tol`` of each other in log; a c' of exactly 0 never agrees (it is
    where a decaying slope underflows, not a settled tail)."""
    for x, y in ((a["min"], b["min"]), (a["max"], b["max"])):
        if math.isnan(x) or math.isnan(y) or min(x, y) <= 0:
            return False
        if x == y:
            continue
        if abs(math.log(x / y)) > tol:
            return False
    return True


def _slope(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log c' (``key``: min or max) against log10 |x|; ``None`` under two usable rows."""
    pts = [(math.log10(r["abs_x"]), math.log(r[key])) for r in rows if r["n"] and r[key] > 0 and math.isfinite(r[key])]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else 0.0


def _ratio(lo: float, hi: float) -> float:
    if math.isnan(lo) or math.isnan(hi):
        return math.nan
    return lo / hi if hi > 0 else 0.0


def measured_evidence(site: Any, params: list[Any], threshold: float = 0.5, tol: float = 1e-3) -> dict:
    """The tail ratio under the kept parameters, probed over the whole range (module docstring).

    ``verdict``: ``violates`` when the ratio is below ``threshold`` or some tail :math:`c'` is non-finite
    (``nonfinite``); ``compliant`` when it is at least ``threshold`` over a declared tail or a settled
    trend; ``inconclusive`` otherwise (nothing probed, an unsettled trend that stays above ``threshold``,
    or a map with no tails).
    """
    start = site.tail_start()
    known = start is not None
    low = 10.0 * float(start) if known and start > 0 else 1.0
    limit = probe_limit(params)
    params, dropped = finite_rows(params)
    rows = _decades(site, params, probe_decades(low, limit)) if params else []
    usable = [r for r in rows if r["n"]]
    first = next(
        (k for k in range(len(rows)) if all(_agree(rows[j], rows[-1], tol) for j in range(k, len(rows)))), None
    )
    settled = first is not None and len(rows) - first >= 2
    if known:
        used = rows
    elif settled:
        used = rows[first:]
    else:
        used = rows[len(rows) // 2 :]
    used_ok = [r for r in used if r["n"]]
    lo = min((r["min"] for r in used_ok), default=math.nan)
    hi = max((r["max"] for r in used_ok), default=math.nan)
    n_bad = sum(r["n_nonfinite"] for r in rows)
    first_bad = next((r["abs_x"] for r in rows if r["n_nonfinite"]), None)
    no_tails = bool(rows) and not usable
    ratio = 0.0 if n_bad and usable else _ratio(lo, hi)
    if no_tails or math.isnan(ratio):
        v = "inconclusive"
    elif n_bad or ratio < threshold:
        v = "violates"
    else:
        v = "compliant" if (known or settled) else "inconclusive"
    errors = [r["error"] for r in rows if "error" in r]
    return {
        "verdict": v,
        "tail_ratio": ratio,
        "derivative_min": lo,
        "derivative_max": hi,
        "settled": settled if len(rows) > 1 else None,
        "nonfinite": {"count": n_bad, "first_abs_x": first_bad} if n_bad else None,
        "domain": (
            {"no_tails": True, "why": errors[0] if errors else "c' is non-finite at every probed |x|"}
            if no_tails
            else None
        ),
        "slope": {"log_min": _slope(used, "min"), "log_max": _slope(used, "max")} if used else None,
        "probe": {
            "abs_x_min": used[0]["abs_x"] if used else math.nan,
            "abs_x_max": rows[-1]["top"] if rows else math.nan,
            "abs_x_limit": limit,
            "start": "tail_start" if known else "settling",
            "tail_start": start,
            "decades": len(rows),
            "tolerance": tol,
            "n_values": 2 * sum(k for _, k in probe_decades(low, limit)) if params else 0,
            "n_points": sum(r["n"] for r in rows),
            "nonfinite_param_rows": dropped,
        },
    }
