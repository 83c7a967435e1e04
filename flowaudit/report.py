"""The audit's result: a typed :class:`Report` that renderers read and :meth:`Report.save` writes.

Computing is kept apart from rendering: the audit builds the report, and the
terminal summary (:mod:`.render.text`), the HTML page (:mod:`.render.html`, plots from
:mod:`.render.plots`), the JUnit XML (:mod:`.render.junit`) and ``report.json`` only read it.
``report.html`` is one self-contained file (plots embedded as base64 PNGs, no external URL).

``report.json`` follows the JSON Schema shipped in the package (:func:`schema`, version
:data:`SCHEMA_VERSION`); every key, its unit and its meaning are listed in the repository's
``docs/report.md``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .utils.atomic import atomic_dir, atomic_path
from .utils.format import flat, jsonable

if TYPE_CHECKING:
    from .render.panel import PanelItem
    from .stats.gaussian import GaussianOOD

__all__ = ["Report", "SCHEMA_VERSION", "FAIL_ON", "schema", "validate"]

#: Version of the ``report.json`` layout; raised when a key changes meaning or goes away.
SCHEMA_VERSION = "1.0"

#: The ``--fail-on`` rules :meth:`Report.passed` knows (scan: never/violation/unproven/risk; attack: broken).
FAIL_ON = ("never", "violation", "unproven", "risk", "broken")


@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema (draft 2020-12) of ``report.json``, as shipped in ``flowaudit/schema/``."""
    return json.loads(resources.files("flowaudit").joinpath("schema", "report.schema.json").read_text())


def validate(data: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``data`` (a report dict, as written) follows :func:`schema`."""
    import jsonschema

    jsonschema.Draft202012Validator(schema()).validate(jsonable(data))


@dataclass
class Report:
    """The result of :func:`flowaudit.fit`, :func:`~flowaudit.scan` or :func:`~flowaudit.inspect`.

    Attributes:
        data: the plain dict written to ``report.json`` (``report["risk"]`` reads it).
        gaussian: the fitted feature Gaussian (``fit`` only).
        panel: the riskiest inputs with a few samples and their spatial ``s_OOD`` map (image scans).
        files: more files for the report folder, by relative path (the attack's worst cases).
    """

    data: dict
    gaussian: GaussianOOD | None = None
    panel: list[PanelItem] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # every report the audit builds (it carries a kind) says which layout it follows, first
        if "kind" in self.data and "schema_version" not in self.data:
            stamped = {"schema_version": SCHEMA_VERSION, **self.data}
            self.data.clear()
            self.data.update(stamped)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    # -- verdicts used for CI gating ---------------------------------------------
    def violations(self) -> list[str]:
        """Names of sites whose Remark 2 verdict is ``violates``; ``["no sites found"]`` when the adapter
        found no site (an audit that saw nothing must not pass a gate)."""
        model = self.data.get("model", {})
        if model.get("remark2", {}).get("verdict") == "no sites found":
            return ["no sites found"]
        return [s["name"] for s in model.get("sites", []) if s["remark2"]["verdict"] == "violates"]

    def unproven(self) -> list[str]:
        """What keeps the model from being proven safe: sites not ``compliant`` on evidence, sites never
        reached, and the model certificate when it was not issued (with the first thing blocking it).

        Empty only when every site is compliant and the model is certified; ``["no sites found"]`` when
        the adapter found no site.
        """
        model = self.data.get("model", {})
        if model.get("remark2", {}).get("verdict") == "no sites found":
            return ["no sites found"]
        out = [
            f"{s['name']} ({s['remark2']['verdict']})"
            for s in model.get("sites", [])
            if s["remark2"]["verdict"] != "compliant"
        ]
        out += [f"{n} (never reached)" for n in (model.get("coverage") or {}).get("unvisited") or []]
        cert = model.get("certificate") or {}
        if not cert.get("certified"):
            block = (cert.get("blocking") or [{}])[0]
            why = f": {block.get('site') or 'model'}: {block.get('why')}" if block else ""
            out.append(f"model not certified{why}")
        return list(dict.fromkeys(out))

    def gate(self, rule: str) -> str | None:
        """The one line that says why ``--fail-on rule`` fails this report, or ``None`` when it passes."""
        hits = self.failures(rule) if rule in FAIL_ON else None
        if hits is None:
            raise ValueError(f"unknown --fail-on rule {rule!r}")
        if not hits:
            return None
        shown = ", ".join(hits[:5]) + (f" and {len(hits) - 5} more" if len(hits) > 5 else "")
        what = {
            "violation": "Remark 2 violated by",
            "unproven": "not proven safe",
            "risk": "inputs at risk",
            "broken": "the attack broke starts",
        }[rule]
        return f"--fail-on {rule}: {what}: {shown}"

    def unproven_note(self) -> str | None:
        """One line for a gate that passed although the model is unproven (``None`` when it is proven)."""
        left = self.unproven()
        if not left or self.violations():
            return None
        return f"note: no violation, but the model is not proven safe ({left[0]}; --fail-on unproven fails on it)"

    def at_risk(self) -> list[str]:
        """Ids of inputs with at least one sample with a non-finite value or a pixel error."""
        return [r["id"] for r in self.data.get("inputs", []) if r["n_inf"] or r["n_pixel_err"]]

    def passed(self, fail_on: str = "violation") -> bool:
        """The CI decision: ``False`` exactly when ``flowaudit scan|attack --fail-on RULE`` exits 1.

        ``never`` always passes; ``violation`` fails on :meth:`violations`, ``unproven`` on
        :meth:`unproven`, ``risk`` on :meth:`at_risk`, ``broken`` when the attack broke a start.
        """
        if fail_on not in FAIL_ON:
            raise ValueError(f"fail_on must be one of {', '.join(FAIL_ON)}, not {fail_on!r}")
        return not self.failures(fail_on)

    def failures(self, fail_on: str) -> list[str]:
        """What makes the rule ``fail_on`` fire: site names, input ids or attack start ids (empty: it passes)."""
        if fail_on == "violation":
            return self.violations()
        if fail_on == "unproven":
            return self.unproven()
        if fail_on == "risk":
            return self.at_risk()
        if fail_on == "broken":
            return [r["id"] for r in (self.data.get("attack") or {}).get("starts", []) if r["broken"]]
        return []

    # -- renderers ----------------------------------------------------------------
    def to_json(self, indent: int | None = 2) -> str:
        """``report.json``'s text: non-finite floats as strings (see :mod:`flowaudit.utils.format`)."""
        return json.dumps(jsonable(self.data), indent=indent, allow_nan=False)

    def summary(self) -> str:
        from .render.text import terminal_summary

        return terminal_summary(self.data)

    def to_html(self) -> str:
        from .render.html import html_report

        return html_report(self.data, self.panel, files=self.files)

    def to_junit(self, fail_on: str = "never") -> str:
        """JUnit XML: one test case per site and per gate rule (:mod:`flowaudit.render.junit`)."""
        from .render.junit import junit_xml

        return junit_xml(self, fail_on)

    def save_junit(self, path: str | Path, fail_on: str = "never") -> None:
        """Write :meth:`to_junit` to ``path`` atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(self.to_junit(fail_on))

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write ``report.json``, ``report.html``, ``inputs.csv`` and :attr:`files` into a new folder, atomically.

        ``inputs.csv`` holds one row an input (nested keys dotted: ``inverse_gain.p99``).
        """
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            for rel, blob in self.files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(blob)
            (tmp / "report.json").write_text(self.to_json())
            (tmp / "report.html").write_text(self.to_html())
            inputs = self.data.get("inputs")
            if inputs:
                rows = [flat(r) for r in jsonable(inputs)]
                keys = list(dict.fromkeys(k for r in rows for k in r))
                with open(tmp / "inputs.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=keys)
                    w.writeheader()
                    w.writerows(rows)
        return Path(out_dir)

    def save_json(self, path: str | Path) -> None:
        """Write ``report.json``'s text to ``path`` atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(self.to_json())

    def __repr__(self) -> str:
        name = self.data.get("model", {}).get("name", "?")
        return f"Report(kind={self.data.get('kind')!r}, model={name!r})"
