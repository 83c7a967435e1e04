"""The HTML page's building blocks: style, table sorting, column explanations, and tables that cannot overflow.

Every table sits in its own ``div.scroll`` box (``overflow: auto``), so a wide or long table scrolls
inside the box and never widens the page; ``pre`` wraps; images shrink to the page. Each column header
carries its explanation as a ``title`` (shown on hover) and the same text is listed under the table.
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Sequence
from typing import Any

from ..utils.format import fmt, num

__all__ = ["CSS", "SORT_JS", "COLUMNS", "esc", "table", "keys_note"]

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}
.scroll{overflow:auto;max-width:100%;margin:.5em 0;border:1px solid #eee}.scroll.tall{max-height:30em}
table{border-collapse:collapse;font-size:.88em}td,th{border:1px solid #ddd;padding:.25em .55em;text-align:right}
th{background:#f5f5f5;position:sticky;top:0}th[title]{cursor:help;text-decoration:underline dotted}
table.sortable th{cursor:pointer}td,th{white-space:nowrap}td.name,th.name,td.text,th.text{text-align:left}
td.text{white-space:normal;min-width:14em}
.violates,.unsafe{color:#b00020;font-weight:600}.compliant,.safe{color:#1b7f3b;font-weight:600}
.inconclusive,.unproven{color:#8a6d00;font-weight:600}.no-sites-found{color:#b00020;font-weight:600}
img{max-width:100%;height:auto}.note{color:#555;font-size:.88em}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f7f7f7;padding:.5em;font-size:.85em}
.answer{font-size:1.1em;padding:.7em 1em;border-left:6px solid;margin:1em 0}
.answer.bad{border-color:#b00020;background:#fdecee}.answer.warn{border-color:#c08b00;background:#fff7e0}
.answer.good{border-color:#1b7f3b;background:#eaf6ee}
dl.keys{font-size:.85em;color:#444;display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em}
dl.keys dt{font-weight:600}dl.keys dd{margin:0}
ol.fixes>li{margin-bottom:1em}.fixes b{display:block}
.legend{display:inline-block;width:1em;height:1em;vertical-align:middle;border:1px solid #999}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var body=t.tBodies[0],rows=Array.from(body.rows),up=th.dataset.dir!=='up';
      t.querySelectorAll('th').forEach(function(h){delete h.dataset.dir});th.dataset.dir=up?'up':'down';
      function key(r){var c=r.cells[i],v=c.dataset.v;return v!==undefined&&v!==''?Number(v):c.textContent}
      rows.sort(function(a,b){var x=key(a),y=key(b);
        var d=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
        return up?d:-d});
      rows.forEach(function(r){body.appendChild(r)});
    });
  });
});
"""

#: What each column of the page means (its header's ``title`` and the list under its table).
COLUMNS = {
    "site": "a conditional elementwise map inside the flow (coupling, injector, conditional prior)",
    "kind": "the site's parametrisation: affine, affine-bounded, additive, rq-spline, modified-rq-spline, prior",
    "verdict": "Remark 2 in words: does the site's derivative have close lower and upper bounds for large |x|?",
    "remark 2": "the verdict as written in report.json: compliant, violates or inconclusive",
    "rests on": "the evidence the verdict rests on: structure (the parametrisation), data (measured), attack",
    "tail ratio": "min c' / max c' over large |x| under the conditions met while sampling; 1 = identity tails, "
    "below the threshold = the data reach unsafe tails",
    "probe |x|": "the range of |x| where the tail probe measured c'",
    "bound ratio": "lower / upper bound of c' that the parametrisation allows in its tails (structural)",
    "certificate": "the most the site's inverse moves a value (+ |t|: plus its bias); none when unbounded",
    "c' min": "smallest derivative c' measured in the tails",
    "c' max": "largest derivative c' measured in the tails",
    "1/c' p50": "median inverse gain 1/c' at the points visited while sampling",
    "1/c' p99": "99th percentile of the inverse gain 1/c' while sampling",
    "1/c' max": "largest inverse gain 1/c' while sampling; how much the site can multiply a value",
    "layer": "a layer of the inverse pass, in order",
    "var in": "variance of the layer's output over in-distribution inputs",
    "var OOD": "variance of the layer's output over OOD inputs",
    "ratio": "OOD variance / in-distribution variance; the first layer above the threshold is the explosion layer",
    "max|x| in": "largest absolute value of the layer's output, in-distribution",
    "max|x| OOD": "largest absolute value of the layer's output, OOD",
    "non-finite OOD": "count of Inf/NaN values in the layer's output, OOD",
    "input": "the input's id (set: its file or index)",
    "set": "in = in-distribution data, ood = OOD data",
    "s_OOD": "Mahalanobis distance of the input's encoder features from the training features (paper eq. 10-11)",
    "risk": "predicted probability of a pixel error, from s_OOD by the logistic fit (paper Fig. 4b); not a measurement",
    "n_inf": "how many of the K samples had a non-finite (Inf/NaN) pixel",
    "n_pixel_err": "how many of the K samples had a pixel outside the error band",
    "max|x|": "largest absolute value of any sample of the input",
    "max 1/c'": "largest inverse gain of any site while sampling the input",
    "inputs": "number of conditional inputs in the set",
    "%Inf": "percent of inputs with at least one non-finite sample among the K",
    "%PixelErr": "percent of inputs with at least one sample with a pixel outside the error band",
    "LR-PSNR min/σ": "SR only: PSNR of the downscaled sample against the LR input, min and σ over K, averaged (dB)",
}


def esc(x: Any) -> str:
    """A report value as escaped HTML text (numbers via :func:`~flowaudit.utils.format.fmt`)."""
    return _html.escape(fmt(x) if not isinstance(x, str) else x)


def _sort_value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return ""
    try:
        x = num(v)
    except ValueError:
        return ""
    if math.isnan(x):
        return ""
    return "Infinity" if x == math.inf else ("-Infinity" if x == -math.inf else repr(x))


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    sortable: bool = False,
    tall: bool = False,
    text_cols: Sequence[str] = (),
    classes: Sequence[Sequence[str]] | None = None,
) -> str:
    """A table in its own scrolling box; a header's explanation from :data:`COLUMNS` as its ``title``.

    Numeric cells carry their value in ``data-v`` so that sorting is numeric; ``classes`` gives a CSS
    class per cell (e.g. the verdict's colour).
    """
    left = {header[0], *text_cols}

    def th(h: str) -> str:
        title = f' title="{esc(COLUMNS[h])}"' if h in COLUMNS else ""
        cls = " class='name'" if h == header[0] else (" class='text'" if h in left else "")
        return f"<th{title}{cls}>{esc(h)}</th>"

    out = [
        f"<div class='scroll{' tall' if tall else ''}'><table{' class=sortable' if sortable else ''}>"
        "<thead><tr>" + "".join(th(h) for h in header) + "</tr></thead><tbody>"
    ]
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(r):
            cls = ["name" if j == 0 else ("text" if header[j] in left else "")]
            if classes is not None and classes[i][j]:
                cls.append(classes[i][j])
            c, sv = " ".join(x for x in cls if x), _sort_value(v)
            attrs = (f" class='{c}'" if c else "") + (f" data-v='{sv}'" if sv else "")
            cells.append(f"<td{attrs}>{esc(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def keys_note(header: Sequence[str]) -> str:
    """The explanations of ``header``'s columns, listed under a table."""
    items = "".join(f"<dt>{esc(h)}</dt><dd>{esc(COLUMNS[h])}</dd>" for h in header if h in COLUMNS)
    return f"<dl class='keys'>{items}</dl>" if items else ""
