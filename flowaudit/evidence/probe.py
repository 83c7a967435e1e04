r"""The tail probe: :math:`c'` of a site over decades of :math:`|x|`, out to near the float limit.

Remark 2 asks what :math:`c'` does for large :math:`|x|`, and "large" means every :math:`|x|` a sample
can reach, i.e. up to the largest finite number of the model's dtype. The probe evaluates
:math:`c'(\pm|x|)` decade by decade, the farthest decade under every kept parameter row and the others under
the rows that screen ranks first, within a budget (:func:`_decades`):

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

import functools
import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PER_DECADE",
    "NEAR_DECADES",
    "FAR_POINTS",
    "PROBE_BUDGET",
    "LADDER_MIN_ROWS",
    "probe_limit",
    "probe_decades",
    "measured_evidence",
]

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


#: c' values one call evaluates at most (probe values × parameter numbers): a map's temporaries in float64 are
#: tens of MB at this size, which bounds inspect's peak on a released checkpoint; larger blocks save no time.
PROBE_BLOCK = 1 << 20
#: Values × parameter numbers a site's ladder (every decade but the last) may spend past the screen.
PROBE_BUDGET = 1 << 14
#: Rows that get the whole ladder whatever the budget: a reservoir of large rows (images) keeps only a few.
LADDER_MIN_ROWS = 16


def _values(low: float, points: int) -> Tensor:
    """The decade's probe values ±|x|, ``points`` of them a side."""
    v = low * 10 ** (torch.arange(points, dtype=torch.float64) / PER_DECADE)
    return torch.cat([-v.flip(0), v])


@functools.lru_cache(maxsize=64)
def _ladder_values(spans: tuple[tuple[float, int], ...]) -> tuple[Tensor, ...]:
    """:func:`_values` of every decade of ``spans``, worked out once per ladder (a run probes a few ladders,
    one per tail start and dtype, many times); never written to."""
    return tuple(_values(low, k) for low, k in spans)


def _numel(p: Any) -> int:
    return int(p.numel()) if isinstance(p, Tensor) else 1


def _rows_of(params: list[Any]) -> list[Any]:
    """The parameter tensors with rows of one shape, dtype and device joined into one (in order): every kept row
    of a site, whichever set it came from, is ranked against the others."""
    out: list[Any] = []
    for p in params:
        last = out[-1] if out else None
        if (
            _splittable(p)
            and _splittable(last)
            and (p.shape[1:], p.dtype, p.device) == (last.shape[1:], last.dtype, last.device)
        ):
            out[-1] = torch.cat([last, p])
        else:
            out.append(p)
    return out


def _splittable(p: Any) -> bool:
    """A tensor of parameter rows (rows on the first axis), which the probe can take a subset of."""
    return isinstance(p, Tensor) and p.dim() >= 2 and p.is_floating_point()


def _decades(site: Any, params: list[Any], spans: list[tuple[float, int]], budget: int = PROBE_BUDGET) -> tuple:
    r"""Each decade's min/max c', finite and non-finite counts over ±|x| (:func:`probe_decades` ``spans``), and what
    was probed (``rows``, ``rows_screened``, ``rows_ladder``, ``cost``: values × parameter numbers evaluated).

    **Screen, then ladder.** Every kept row is probed at the last decade's values (the farthest tail,
    :math:`\pm 10^{e}`: 2 values a row). A row's screen ranks it: rows with a non-finite or non-positive c'
    first, then the rows holding the smallest and the largest c', then by how far their c' lies from the
    rows' median in log, :math:`\max(|\log(c'_{\min}/\bar c)|, |\log(c'_{\max}/\bar c)|)`. The whole ladder
    (every other decade) then goes to the rows in that order while it costs at most ``budget`` values × numbers,
    and to :data:`LADDER_MIN_ROWS` rows at least; rows that all fit get the whole ladder at once, unscreened.
    So the cost is at most :math:`2N + \max(\text{budget}, 16\,(V-2)\,m)` for :math:`N` kept numbers in rows of
    :math:`m` — in proportion to what sampling kept — instead of :math:`V N` (:math:`V = 56` values on float32).
    :data:`PROBE_BUDGET` (:math:`2^{14}`) ladders 75 rows of a 2-D spline coupling (m = 4 numbers) and the
    whole of an image reservoir (a few large rows).

    Why it keeps the verdict: the ratio rule reads :math:`\min c'` and :math:`\max c'` over the tail
    decades. The last decade is probed under every row, so a row whose c' decays, grows or blows up in the
    far tail is seen by the screen, and it is the first to get the ladder. Where c' does not depend on x in
    the tails (affine scales, identity tails), the rows that hold the extremes at the screen hold them at every
    decade, so each decade's min and max are those over all rows. Rows not laddered are counted
    (``rows`` − ``rows_ladder``), never hidden.

    c' is asked once per parameter tensor for the values of many decades together (blocks of at most
    :data:`PROBE_BLOCK` numbers), and the figures are read back in one host transfer. A block the map refuses
    (one defined on an interval) is asked again decade by decade, so that the values it takes still count.
    A site whose c' cannot be told apart by row (not (V, rows × elements)) gets the whole ladder on every row.

    **A c' that does not depend on x** (``site.derivative_constant``: affine, additive, a prior's scale) is
    evaluated under every row at four values only, the smallest and the largest ±|x| probed: where they agree
    row by row, each decade's figures are those four values' (every row laddered, at a cost of 4N); where they do
    not, the declaration is wrong and the site is probed as any other (:func:`_constant`).
    """
    values = list(_ladder_values(tuple(spans)))
    figures = torch.zeros((len(spans), 4), dtype=torch.float64)  # min, max, n finite, n non-finite
    figures[:, 0], figures[:, 1] = math.inf, -math.inf
    errors: dict[int, str] = {}
    done = {"rows": 0, "rows_screened": 0, "rows_ladder": 0, "cost": 0}
    units = _rows_of(params)
    share = max(1, budget // max(1, len(units)))
    last = len(spans) - 1
    ladder = range(last)
    n_ladder = sum(len(values[i]) for i in ladder)
    constant = bool(getattr(site, "derivative_constant", False))
    for p in units:
        rankable = _splittable(p) and len(p) >= 2 and n_ladder and p[0].numel()
        n, m = (len(p), int(p[0].numel())) if rankable else (len(p) if _splittable(p) else 1, 0)
        fits = max(LADDER_MIN_ROWS, share // (n_ladder * m)) if rankable else n
        done["rows"] += n
        if constant and _splittable(p) and _constant(figures, values, site, p):
            done["rows_ladder"] += n
            done["cost"] += 4 * _numel(p)
            continue
        if n <= fits:  # every row gets the ladder: nothing to rank them by, or no screen needed
            _ladder(figures, range(len(spans)), values, site, p, errors)
            done["rows_ladder"] += n
            done["cost"] += sum(len(v) for v in values) * _numel(p)
            continue
        order = _screen(figures, last, values[last], site, p, errors)
        done["cost"] += len(values[last]) * n * m
        take = n if order is None else min(n, fits)
        if order is not None:
            done["rows_screened"] += n
        rows = p if take == n else p.index_select(0, order[:take].to(p.device))
        _ladder(figures, ladder, values, site, rows, errors)
        done["rows_ladder"] += take
        done["cost"] += n_ladder * take * m
    out = []
    for i, ((low, _), (lo, hi, n, bad)) in enumerate(zip(spans, figures.tolist(), strict=True)):
        row = {"abs_x": low, "top": float(values[i].max()), "min": lo if n else math.nan}
        row.update({"max": hi if n else math.nan, "n": int(n), "n_nonfinite": int(bad)})
        if i in errors:
            row["error"] = errors[i]
        out.append(row)
    return out, done


def _constant(figures: Tensor, values: list[Tensor], site: Any, p: Tensor) -> bool:
    """c' under every row of ``p`` at the smallest and largest ±|x| probed, folded into every decade as if each
    had been probed at all its values: ``True`` where the four agree row by row (NaN with NaN), else ``False`` and
    nothing folded (a c' that moves with x, or a map that refuses a value, gets the screen and the ladder)."""
    near = len(values[0]) // 2
    v = torch.cat([values[0][[near - 1, near]], values[-1][[0, -1]]])  # ±(smallest |x|), ±(largest |x|)
    try:
        d = site.derivative_at(v.to(p.device), p).detach().to(torch.float64).reshape(len(v), -1)
    except Exception:  # noqa: BLE001 - probed decade by decade instead, where the refusal is recorded
        return False
    if not d.shape[1] or not bool(((d == d[:1]) | (d.isnan() & d[:1].isnan())).all()):
        return False
    c, ok = d[0], torch.isfinite(d[0])
    stats = torch.stack(
        [torch.where(ok, c, math.inf).amin(), torch.where(ok, c, -math.inf).amax(), ok.sum(), (~ok).sum()]
    )
    stats = stats.to(torch.float64).cpu()
    sizes = torch.tensor([float(len(x)) for x in values], dtype=torch.float64)
    figures[:, 0].clamp_(max=float(stats[0]))
    figures[:, 1].clamp_(min=float(stats[1]))
    figures[:, 2:] += sizes[:, None] * stats[None, 2:]
    return True


def _ladder(figures: Tensor, decades: range, values: list[Tensor], site: Any, p: Any, errors: dict) -> None:
    """c' under ``p`` at the values of ``decades``, in blocks, folded into ``figures`` (see :func:`_decades`)."""
    block = max(1, PROBE_BLOCK // max(1, _numel(p)) // (2 * PER_DECADE))  # decades a call
    for first in range(decades.start, decades.stop, block):
        part = range(first, min(first + block, decades.stop))
        try:
            _add(figures, part, values, site, p)
        except Exception:  # noqa: BLE001 - a map defined on an interval may refuse values outside it
            for i in part:
                try:
                    _add(figures, range(i, i + 1), values, site, p)
                except Exception as exc:  # noqa: BLE001
                    errors[i] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    figures[i, 3] += len(values[i])


def _screen(figures: Tensor, i: int, v: Tensor, site: Any, p: Tensor, errors: dict) -> Tensor | None:
    """c' under every row of ``p`` at the screen values ``v`` (decade ``i``), folded into ``figures``; the rows'
    order for the ladder (:func:`_decades`), ``None`` when c' cannot be told apart by row."""
    try:
        d = site.derivative_at(v.to(p.device), p).detach().to(torch.float64).reshape(len(v), -1)
    except Exception as exc:  # noqa: BLE001 - a map defined on an interval may refuse the far tail
        errors[i] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        figures[i, 3] += len(v)
        return None  # nothing to rank by: every row gets the ladder
    _fold(figures, range(i, i + 1), [len(v)], d)
    n = len(p)
    if not d.shape[1] or d.shape[1] % n:
        return None
    d = d.reshape(len(v), n, -1).transpose(0, 1).reshape(n, -1)  # a row's c' at every screen value
    ok = torch.isfinite(d)
    lo = torch.where(ok, d, math.inf).amin(1)
    hi = torch.where(ok, d, -math.inf).amax(1)
    odd = ~ok.all(1) | (lo <= 0)
    good = ~odd
    score = torch.zeros(n, dtype=torch.float64)
    if bool(good.any()):
        mid = float((lo[good].log() + hi[good].log()).div(2).median())
        score = torch.maximum((lo.clamp_min(1e-300).log() - mid).abs(), (hi.clamp_min(1e-300).log() - mid).abs())
        score[int(torch.where(good, lo, math.inf).argmin())] = math.inf
        score[int(torch.where(good, hi, -math.inf).argmax())] = math.inf
    score = torch.where(odd | score.isnan(), math.inf, score)
    # stable on ties (row order), and the non-finite rows ahead of the extremes of the finite ones
    order = torch.argsort(score, descending=True, stable=True)
    return torch.cat([order[odd[order]], order[~odd[order]]]).cpu()


def _add(figures: Tensor, part: range, values: list[Tensor], site: Any, p: Any) -> None:
    """c' under ``p`` at the values of decades ``part``, folded into their rows of ``figures``."""
    v = torch.cat([values[i] for i in part])
    d = site.derivative_at(v.to(p.device) if isinstance(p, Tensor) else v, p).detach().to(torch.float64)
    _fold(figures, part, [len(values[i]) for i in part], d.reshape(len(v), -1))


def _fold(figures: Tensor, part: range, sizes: list[int], d: Tensor) -> None:
    """Fold c' (values × points, the values of decades ``part`` in turn, ``sizes`` a decade) into ``figures``."""
    if not d.shape[1]:
        return
    ok = torch.isfinite(d)
    lo = torch.where(ok, d, math.inf).amin(1)
    hi = torch.where(ok, d, -math.inf).amax(1)
    counts = torch.stack([ok.sum(1), (~ok).sum(1)], 1).to(torch.float64)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device=d.device), torch.tensor(sizes, device=d.device))
    k = len(sizes)
    lo = torch.full((k,), math.inf, dtype=torch.float64, device=d.device).scatter_reduce(0, seg, lo, "amin")
    hi = torch.full((k,), -math.inf, dtype=torch.float64, device=d.device).scatter_reduce(0, seg, hi, "amax")
    counts = torch.zeros((k, 2), dtype=torch.float64, device=d.device).index_add(0, seg, counts)
    stats = torch.cat([lo[:, None], hi[:, None], counts], 1).cpu()
    rows = slice(part.start, part.stop)
    figures[rows, 0] = torch.minimum(figures[rows, 0], stats[:, 0])
    figures[rows, 1] = torch.maximum(figures[rows, 1], stats[:, 1])
    figures[rows, 2:] += stats[:, 2:]


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


def _settles_from(rows: list[dict], tol: float) -> int | None:
    """The first decade from which every decade agrees with the last (:func:`_agree`); ``None`` when even the
    last does not agree with itself (no decades, a NaN or a zero c'). One pass from the end: the stretch starts
    after the last decade that disagrees."""
    for j in range(len(rows) - 1, -1, -1):
        if not _agree(rows[j], rows[-1], tol):
            return None if j == len(rows) - 1 else j + 1
    return 0 if rows else None


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


def measured_evidence(
    site: Any, params: list[Any], threshold: float = 0.5, tol: float = 1e-3, budget: int = PROBE_BUDGET
) -> dict:
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
    rows, done = _decades(site, params, probe_decades(low, limit), budget) if params else ([], None)
    usable = [r for r in rows if r["n"]]
    first = _settles_from(rows, tol)
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
            "budget": budget,
            **(done or dict.fromkeys(("rows", "rows_screened", "rows_ladder", "cost"), 0)),
        },
    }
