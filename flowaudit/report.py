"""Reports: the audit's result object and its renderers (JSON, HTML with plots, terminal).

Computing is kept apart from rendering: :class:`Report` wraps the plain dict
the audit built; renderers only read it. JSON has no Inf/NaN, so non-finite
floats are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"``.
``report.html`` is one self-contained file: plots are PNGs embedded as
base64, no external URL, so it opens offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

from .atomic import atomic_path

__all__ = ["Report", "jsonable"]


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings and numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _flat(record: dict, prefix: str = "") -> dict:
    """One CSV row: nested dicts become dotted columns (``inverse_gain.p99``)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _num(v: Any) -> float:
    if isinstance(v, str):
        return float(v)
    return math.nan if v is None else float(v)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


class Report:
    """The result of :func:`flowaudit.fit`, :func:`~flowaudit.scan` or :func:`~flowaudit.inspect`.

    ``data`` is the plain dict written to ``report.json``; ``report["risk"]``
    reads it. ``to_json``, ``to_html`` and ``summary`` render it;
    :meth:`save` writes a report folder.
    """

    def __init__(self, data: dict):
        self.data = data
        self.images: list[dict] = []  # image models: worst inputs, samples, s_OOD maps (HTML only)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    # -- verdicts used for CI gating ---------------------------------------------
    def violations(self) -> list[str]:
        """Names of sites whose Remark 2 verdict is ``violates``."""
        return [s["name"] for s in self.data.get("model", {}).get("sites", []) if s["remark2"]["verdict"] == "violates"]

    def at_risk(self) -> list[str]:
        """Ids of inputs with at least one sample with a non-finite value or a pixel error."""
        return [r["id"] for r in self.data.get("inputs", []) if r["n_inf"] or r["n_pixel_err"]]

    # -- renderers ----------------------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(jsonable(self.data), indent=indent, allow_nan=False)

    def summary(self) -> str:
        from .render import terminal_summary

        return terminal_summary(self.data)

    def to_html(self) -> str:
        from .render import html_report

        return html_report(self.data, self.images)

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write ``report.json``, ``report.html`` and ``inputs.csv`` into a new folder.

        The folder is built beside its target and renamed at the end, so a
        failure leaves nothing behind; an existing folder needs ``overwrite``.
        """
        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists (use --overwrite)")
        tmp = out.with_name(f".{out.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            (tmp / "report.json").write_text(self.to_json())
            (tmp / "report.html").write_text(self.to_html())
            inputs = self.data.get("inputs")
            if inputs:
                rows = [_flat(r) for r in jsonable(inputs)]
                keys = list(dict.fromkeys(k for r in rows for k in r))
                with open(tmp / "inputs.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=keys)
                    w.writeheader()
                    w.writerows(rows)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def save_json(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(self.to_json())

    def __repr__(self) -> str:
        name = self.data.get("model", {}).get("name", "?")
        return f"Report(kind={self.data.get('kind')!r}, model={name!r})"


def png_data_uri(fig) -> str:
    """Render a matplotlib figure to an embedded PNG data URI and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def esc(x: Any) -> str:
    return html.escape(_fmt(x) if not isinstance(x, str) else x)
