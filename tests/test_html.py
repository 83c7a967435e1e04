"""The HTML page a person reads: the answer on top, riskiest sites, diagnosis, explained columns, no overflow."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from flowaudit.reference_models.toy import Toy2D, toy_data
from test_audit import Rigged, _conditions

import flowaudit
from flowaudit.render.diagnosis import riskiest_sites, site_words
from flowaudit.render.html import TOP_SITES
from flowaudit.render.page import COLUMNS, CSS
from flowaudit.render.plots import NONFINITE_COLOUR, display_rgb


class Tree(HTMLParser):
    """Each element with its ancestors' (tag, class) chain; the text of the answer paragraph."""

    def __init__(self):
        super().__init__()
        self.stack, self.elements = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a, list(self.stack)))
        if tag not in ("img", "meta", "br", "input"):
            self.stack.append((tag, a.get("class") or ""))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass


@pytest.fixture(scope="module")
def broken():
    """A scan where 3 of 12 inputs go to Inf: the answer must say so."""
    y = _conditions(n_bad=3)
    return flowaudit.scan(Rigged(), y, fit_data=torch.randn(200, 2) * 0.1 + 3.0, samples=4, device="cpu")


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = Toy2D(coupling="affine", hidden=16, depth=6, zero_init=False).eval()
    y = toy_data(32, seed=1)[1]
    return flowaudit.scan(model, y, ood=y + 3.0, fit_data=toy_data(200, seed=0)[1], samples=3, device="cpu")


def _answer(html: str) -> str:
    m = re.search(r"<p class='answer (\w+)'><b>(.*?)</b> — (.*?)</p>", html, re.S)
    assert m and html.index(m.group(0)) < html.index("<h2"), "the answer comes before any section"
    return m.group(1), m.group(2), m.group(3)


def test_the_top_answers_safe_or_not_on_what_evidence_and_where(broken):
    tone, headline, sentence = _answer(broken.to_html())
    assert (tone, headline) == ("bad", "Not safe for this data")
    assert "25.0 % a non-finite one" in sentence  # 3 of 12 inputs
    assert "4 samples × 12 inputs" in sentence and "sites probed" in sentence
    assert "through 1 of 1 sites that violate Remark 2 (worst site" in sentence


def test_a_clean_scan_of_an_affine_model_reads_unsafe_by_design_not_a_contradiction(toy):
    html = toy.to_html()
    if toy["risk"]["pct_pixel_err"] == 0:
        assert _answer(html)[1] == "Unsafe by design"
    assert "violates by structure; not reached" not in html
    words = {site_words(s) for s in toy["model"]["sites"]}
    assert all(w.startswith("unsafe") for w in words), words


def test_site_words_cover_each_case():
    def site(verdict, structural, ratio, wc=None, rests=()):
        return {"remark2": {"verdict": verdict, "structural": {"verdict": structural}, "tail_ratio": ratio,
                            "threshold": 0.5, "worst_case": wc, "rests_on": list(rests)}}  # fmt: skip

    assert site_words(site("violates", "violates", 0.8)) == "unsafe by design — not triggered by your data"
    assert site_words(site("violates", "violates", 0.8, {"reached": False})).endswith("your data or the attack")
    assert site_words(site("violates", "violates", 0.1)) == "unsafe — triggered by your data"
    assert site_words(site("violates", "n/a", 0.9, {"reached": True})) == "unsafe — triggered by the attack"
    assert site_words(site("compliant", "compliant", 1.0, rests=["structural", "measured"])).startswith("safe by")
    assert site_words(site("inconclusive", "n/a", "nan")).endswith("never visited while sampling")


def test_the_riskiest_sites_table_fits_and_ranks(toy):
    sites = toy["model"]["sites"]
    html = toy.to_html()
    top = html[html.index("<h2>Riskiest sites") : html.index("<h2 id='diagnosis'")]
    shown = re.findall(r"<tr><td class='name'>([^<]+)</td>", top)
    assert shown == [s["name"] for s in riskiest_sites(sites)][:TOP_SITES]
    assert len(re.findall(r"<th[ >]", top)) == 5  # five columns: fits the page
    assert "more in report.json" not in html or len(sites) > TOP_SITES


def test_diagnosis_ties_affine_sites_to_retraining_and_clamping(broken, toy):
    for rep in (broken, toy):
        html = rep.to_html()
        diag = html[html.index("<h2 id='diagnosis'>") :]
        assert "--coupling modified-rq-spline" in diag and "--coupling affine-bounded" in diag
    diag = broken.to_html().split("<h2 id='diagnosis'>")[1]
    assert "Tighter conditioning" in diag and "flowaudit fit" in diag  # s_OOD separates the broken inputs


def test_every_table_scrolls_in_its_own_box_and_every_column_is_explained(broken, toy):
    assert re.search(r"\.scroll\{overflow:auto", CSS) and "white-space:pre-wrap" in CSS
    assert "img{max-width:100%" in CSS
    for rep in (broken, toy):
        tree = Tree()
        tree.feed(rep.to_html())
        tables = [(a, chain) for tag, a, chain in tree.elements if tag == "table"]
        assert tables
        for _, chain in tables:
            assert chain[-1] == ("div", "scroll") or chain[-1] == ("div", "scroll tall"), chain[-3:]
        for tag, a, chain in tree.elements:
            if tag == "pre":
                assert any(t == "details" or "fixes" in c for t, c in chain)
        headers = re.findall(r"<th([^>]*)>([^<]+)</th>", rep.to_html())
        for attrs, text in headers:
            text = text.replace("&#x27;", "'")
            if text in COLUMNS:
                assert "title=" in attrs, text
        assert "logistic" in COLUMNS["risk"]


def test_the_full_site_table_is_sortable(toy):
    html = toy.to_html()
    assert "<table class=sortable>" in html[html.index("<h2 id='sites'>") :]
    assert "querySelectorAll('table.sortable')" in html
    assert re.search(r"data-v='[0-9.e+-]+'", html)


def test_non_finite_pixels_are_drawn_in_the_marked_colour():
    a = np.zeros((3, 4, 4), dtype=np.float32)
    a[:, 0, 0] = np.inf
    a[1, 2, 3] = np.nan
    a[:, 3, 3] = -np.inf
    rgb, n = display_rgb(a)
    marked = np.array([int(NONFINITE_COLOUR[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    assert n == 3
    for i, j in ((0, 0), (2, 3), (3, 3)):
        assert np.allclose(rgb[i, j], marked)
    assert np.allclose(rgb[1, 1], 0.0)  # a dark finite pixel stays dark
    grey, n = display_rgb(np.full((1, 2, 2), np.inf))
    assert n == 4 and grey.shape == (2, 2, 3)


@pytest.mark.skipif(not shutil.which("chromium"), reason="headless Chromium not installed")
def test_nothing_overflows_at_1280_px_in_chromium(broken, tmp_path):
    page = tmp_path / "page.html"
    html = broken.to_html().replace(
        "</body>", "<script>document.title='W='+document.documentElement.scrollWidth</script></body>"
    )
    page.write_text(html)
    out = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    width = int(re.search(r"<title>W=(\d+)", out.stdout).group(1))
    assert width <= 1280
