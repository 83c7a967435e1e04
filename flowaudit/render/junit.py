"""A report as JUnit XML, so that CI systems show the audit like a test run.

Two test suites: ``remark2`` holds one test case per site (a violating site fails, with its verdict in
words as the reason; an unproven one is skipped, or fails when the gate is ``unproven``), and ``gates``
one test case per ``--fail-on`` rule that applies to the report (``violation``, ``unproven``, ``risk``
for scans and inspections, ``broken`` for attacks), failing exactly when that rule would exit 1. The
chosen rule is recorded as the property ``fail_on``.
"""

from __future__ import annotations

from typing import Protocol
from xml.etree import ElementTree as ET

from ..utils.format import fmt
from .diagnosis import site_words

__all__ = ["junit_xml", "Gated"]


class Gated(Protocol):
    """What the XML reads of a report (:class:`flowaudit.report.Report` is one): its dict and its gates."""

    data: dict

    def passed(self, fail_on: str = ...) -> bool: ...

    def failures(self, fail_on: str) -> list[str]: ...

_RULES = {
    "violation": "no site violates Remark 2",
    "unproven": "every site is compliant on evidence and the model is certified",
    "risk": "no input had a non-finite sample or a pixel error",
    "broken": "the attack broke no start",
}


def _rules(report: Gated) -> list[str]:
    kind = report.data.get("kind")
    if kind == "attack":
        return ["broken"]
    rules = ["violation"]
    if hasattr(report, "unproven"):
        rules.append("unproven")
    if kind == "scan":
        rules.append("risk")
    return rules


def _case(suite: ET.Element, name: str, classname: str) -> ET.Element:
    return ET.SubElement(suite, "testcase", name=name, classname=classname, time="0")


def junit_xml(report: Gated, fail_on: str = "never") -> str:
    """The JUnit XML text of ``report`` (see module docstring)."""
    data = report.data
    m = data.get("model", {})
    model = str(m.get("name", "model"))
    root = ET.Element("testsuites", name=f"flowaudit {data.get('kind')} {model}")
    props_of: list[ET.Element] = []

    sites = m.get("sites") or []
    suite = ET.SubElement(root, "testsuite", name="remark2")
    props_of.append(suite)
    for s in sites:
        r2 = s["remark2"]
        case = _case(suite, s["name"], f"{model}.remark2")
        words = site_words(s)
        reason = f"{words} (kind {s['kind']}, tail ratio {fmt(r2.get('tail_ratio'))}): {r2.get('words', '')}"
        if r2["verdict"] == "violates":
            ET.SubElement(case, "failure", message=words, type="violates").text = reason
        elif r2["verdict"] == "inconclusive":
            if fail_on == "unproven":
                ET.SubElement(case, "failure", message=words, type="unproven").text = reason
            else:
                ET.SubElement(case, "skipped", message=words).text = reason

    gates = ET.SubElement(root, "testsuite", name="gates")
    props_of.append(gates)
    for rule in _rules(report):
        case = _case(gates, f"fail-on {rule}", f"{model}.gates")
        hits = report.failures(rule)
        if hits:
            shown = ", ".join(map(str, hits[:5])) + (f" and {len(hits) - 5} more" if len(hits) > 5 else "")
            msg = f"{_RULES[rule]}: fails on {len(hits)} ({shown})"
            ET.SubElement(case, "failure", message=msg, type=rule).text = msg

    for suite in props_of:
        cases = suite.findall("testcase")
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
        suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
        suite.set("errors", "0")
        props = ET.Element("properties")
        ET.SubElement(props, "property", name="fail_on", value=fail_on)
        ET.SubElement(props, "property", name="passed", value=str(report.passed(fail_on)).lower())
        suite.insert(0, props)
    for key in ("tests", "failures", "skipped", "errors"):
        root.set(key, str(sum(int(s.get(key)) for s in props_of)))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
