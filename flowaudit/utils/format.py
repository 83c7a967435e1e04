"""Plain-value formatting shared by every renderer: JSON-safe values, numbers, text tables.

JSON has no Inf/NaN, so :func:`jsonable` writes non-finite floats as the
strings ``"inf"``, ``"-inf"`` and ``"nan"``; :func:`num` reads them back.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["jsonable", "num", "fmt", "flat", "text_table"]


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as strings and numpy/torch scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def num(v: Any) -> float:
    """A report value as a float (``None`` → NaN, ``"inf"`` → inf)."""
    if isinstance(v, str):
        return float(v)
    return math.nan if v is None else float(v)


def fmt(v: Any, digits: int = 3) -> str:
    """A report value for people: ``–`` for missing, ``digits`` significant digits, exponent when tiny or huge."""
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


def flat(record: dict, prefix: str = "") -> dict:
    """One CSV row: nested dicts become dotted columns (``inverse_gain.p99``)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def text_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    """Left-aligned columns, a dashed rule under the header; one string per line."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

    return [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]
