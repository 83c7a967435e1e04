"""report.json's contract: a schema version, a JSON Schema shipped in the package, a key reference in docs/."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from flowaudit.reference_models.toy import Toy2D, toy_data

import flowaudit
from flowaudit.report import SCHEMA_VERSION, Report, schema, validate

DOCS = Path(__file__).resolve().parents[1] / "docs" / "report.md"


@pytest.fixture(scope="module")
def reports():
    torch.manual_seed(0)
    model = Toy2D(coupling="affine", hidden=16, depth=2, zero_init=False).eval()
    y_fit, y_in = toy_data(200, seed=0)[1], toy_data(24, seed=1)[1]
    y_ood = toy_data(24, seed=1, ood=True)[1]
    return {
        "scan": flowaudit.scan(model, y_in, ood=y_ood, fit_data=y_fit, samples=3, device="cpu", attack="linf:0.3"),
        "inspect": flowaudit.inspect(model, y_in, device="cpu"),
        "attack": flowaudit.attack(model, y_in, budget="linf:0.3", steps=3, starts=4, device="cpu"),
    }


def test_the_shipped_schema_is_valid_draft_2020_12_and_carries_the_version():
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["$schema"].endswith("2020-12/schema")
    assert s["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


@pytest.mark.parametrize("kind", ["scan", "inspect", "attack"])
def test_every_kind_of_report_follows_the_schema(reports, kind):
    rep = reports[kind]
    data = json.loads(rep.to_json())
    assert next(iter(data)) == "schema_version" and data["schema_version"] == SCHEMA_VERSION
    assert data["kind"] == kind
    validate(data)


def test_inspect_json_model_object_follows_the_model_definition(reports):
    s = schema()
    model = {"$defs": s["$defs"], "$ref": "#/$defs/model"}
    out = {"model": json.loads(reports["inspect"].to_json())["model"]}  # what `inspect --json` prints
    jsonschema.Draft202012Validator(model).validate(out["model"])


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.pop("schema_version"),
        lambda d: d.update(schema_version="0.9"),
        lambda d: d.pop("risk"),
        lambda d: d["model"]["sites"][0]["remark2"].update(verdict="fine"),
        lambda d: d["inputs"][0].update(n_inf=-1),
        lambda d: d["risk"].update(pct_inf=150.0),
        lambda d: d["inputs"][0].update(s_ood="Infinity"),
        lambda d: d["attack"]["summary"].pop("broken_rate"),
        lambda d: d["model"]["certificate"].pop("scope"),
    ],
)
def test_the_schema_rejects_a_broken_report(reports, change):
    data = copy.deepcopy(json.loads(reports["scan"].to_json()))
    validate(data)
    change(data)
    with pytest.raises(jsonschema.ValidationError):
        validate(data)


def test_the_suite_checks_every_report_it_writes(reports):
    """The conftest hook: a report that breaks the schema cannot be written by any test."""
    data = json.loads(reports["scan"].to_json())
    data["inputs"][0]["n_pixel_err"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        Report(data).to_json()


def _keys(node, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        out.update(node.get("properties", {}))
        for v in node.values():
            _keys(v, out)
    elif isinstance(node, list):
        for v in node:
            _keys(v, out)
    return out


def test_docs_describe_every_key_of_the_schema():
    text = DOCS.read_text()
    missing = sorted(k for k in _keys(schema(), set()) if f"`{k}`" not in text)
    assert not missing, f"docs/report.md lacks {missing}"


def test_docstrings_point_to_the_docs_not_to_design_notes():
    root = Path(flowaudit.__file__).parent
    for path in [root / "report.py", *sorted((root / "render").glob("*.py"))]:
        assert "DESIGN" not in path.read_text(), path
