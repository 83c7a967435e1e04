"""The audit on image flows (tiny SR and low-light configurations) and the --from transplant."""

from __future__ import annotations

import torch
from flowaudit.reference_models import build
from flowaudit.reference_models.recipes import transplant

import flowaudit

TINY = dict(L=2, K=1, nf=8, nb=2, gc=4, hidden_channels=8, patch=16)


def _sr(coupling: str):
    torch.manual_seed(0)
    return build("sr", dict(TINY, L=3, scale=4, coupling=coupling)).eval()  # L = 3: one split prior


def test_sr_scan_reports_lr_psnr_sites_and_maps():
    model = _sr("affine")
    g = torch.Generator().manual_seed(0)
    fit_y, y, y_ood = (torch.rand(n, 3, 4, 4, generator=g) for n in (24, 6, 6))
    rep = flowaudit.scan(model, y, ood=y_ood.pow(4), fit_data=fit_y, samples=3, device="cpu")
    recs = rep["inputs"]
    assert all("lr_psnr_min" in r and r["lr_psnr_std"] >= 0 for r in recs)
    assert "lr_psnr_min" in rep["risk"]["by_set"]["in"]
    kinds = {s["kind"] for s in rep["model"]["sites"]}
    assert kinds == {"affine", "prior"}  # couplings + injectors, and the split prior
    assert rep["ood"]["layers"] == model.default_feature_layers()
    assert rep.panel and rep.panel[0].map.shape == (4, 4)
    assert "Riskiest inputs" in rep.to_html()


def test_lowlight_scan_runs_and_spline_sites_comply():
    torch.manual_seed(0)
    model = build("lowlight", dict(TINY, coupling="modified-rq-spline")).eval()
    y = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.2
    rep = flowaudit.inspect(model, y, device="cpu")
    verdicts = {s["kind"]: s["remark2"]["verdict"] for s in rep["model"]["sites"]}
    assert verdicts["modified-rq-spline"] == "compliant"
    assert verdicts["prior"] == "compliant"  # LLFlow's prior has σ = 1: c' ≡ 1


def test_from_checkpoint_swaps_exactly_the_conditional_maps():
    """--from copies encoder, ActNorms, 1×1s and split priors; only the coupling/injector conditioners start anew."""
    src = _sr("affine")
    dst = _sr("modified-rq-spline")
    copied, fresh = transplant(src.state_dict(), dst)
    assert fresh and all(".rqspline." in k for k in fresh)
    assert {k for k in dst.state_dict() if ".rqspline." in k} == set(fresh)
    state = dst.state_dict()
    for k in copied:
        assert torch.equal(state[k], src.state_dict()[k])
    assert any(k.startswith("RRDB.") for k in copied) and any(".invconv." in k for k in copied)
    # the same kind: everything is copied
    copied2, fresh2 = transplant(src.state_dict(), _sr("affine"))
    assert not fresh2 and len(copied2) == len(src.state_dict())
