"""Shared test settings."""

import json

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads cost far more than they bring on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def reports_follow_the_schema(request, monkeypatch):
    """Every report the suite writes follows the shipped JSON Schema: each ``to_json`` in this process, and
    each ``report.json`` left under the test's ``tmp_path`` (the CLI run as a subprocess writes those)."""
    from flowaudit.report import Report, validate

    to_json = Report.to_json

    def checked(self, *args, **kwargs):
        text = to_json(self, *args, **kwargs)
        if "kind" in self.data:  # an audit's report (a test may wrap a bare dict)
            validate(json.loads(text))
        return text

    monkeypatch.setattr(Report, "to_json", checked)
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    for path in tmp.rglob("report.json") if tmp is not None else ():
        validate(json.loads(path.read_text()))
