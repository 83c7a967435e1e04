"""Plots of a report (matplotlib, Agg), each returned as an embedded PNG data URI.

The layer variance trace in-distribution vs OOD (paper Fig. 3b), inverse-gain
histograms of the riskiest sites, ``s_OOD`` distributions, ``s_OOD`` vs pixel errors with
the logistic curve (Fig. 4b), and the worst-input panel.
"""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING

from ..utils.format import fmt, num
from .diagnosis import riskiest_sites

if TYPE_CHECKING:
    from .panel import PanelItem

__all__ = ["layer_plot", "gain_plot", "gain_sites", "risk_plot", "panel_plot", "display_rgb", "NONFINITE_COLOUR"]

#: most inverse-gain histograms drawn: as many sites as the page's riskiest-sites table leads with
GAIN_PANELS = 8

#: The colour of a non-finite (Inf/NaN) pixel in the panel (magenta: no natural image is that flat).
NONFINITE_COLOUR = "#ff00ff"


def png_data_uri(fig) -> str:
    """Render a matplotlib figure to an embedded PNG data URI and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def layer_plot(layers: list[dict]) -> str | None:
    rows = [r for r in layers if "in" in r]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.4))
    xs = range(len(rows))
    for key, colour in (("in", "tab:blue"), ("ood", "tab:red")):
        ys = [num(r[key]["variance"]) if key in r else math.nan for r in rows]
        if not all(math.isnan(y) for y in ys):
            ax.plot(xs, ys, "o-", color=colour, label={"in": "in-distribution", "ood": "OOD"}[key])
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("variance of features")
    ax.set_title("Layer trace of the inverse pass (paper Fig. 3b)")
    ax.legend()
    return png_data_uri(fig)


def gain_sites(sites: list[dict], most: int = GAIN_PANELS) -> list[dict]:
    """The sites :func:`gain_plot` draws: of those with a histogram, the ``most`` riskiest (the order of the
    page's riskiest-sites table), in the given (inverse-pass) order."""
    drawn = [s for s in sites if s.get("inverse_gain", {}).get("histogram")]
    if len(drawn) <= most:
        return drawn
    keep = {id(s) for s in riskiest_sites(drawn)[:most]}
    return [s for s in drawn if id(s) in keep]


def gain_plot(sites: list[dict], most: int = GAIN_PANELS) -> str | None:
    """Histograms of log10 1/c' per set for the riskiest sites (:func:`gain_sites`): a panel costs a layout pass
    of its own, so a model of a hundred sites draws what the page leads with; every site is in its table."""
    total = sum(1 for s in sites if s.get("inverse_gain", {}).get("histogram"))
    sites = gain_sites(sites, most)
    if not sites:
        return None
    plt = _plt()
    n = len(sites)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    for ax, s in zip(axes.flat, sites):
        lo, hi = 0.0, 0.0  # always show gain 1 (log10 = 0)
        for key, colour in (("in", "tab:blue"), ("ood", "tab:red")):
            g = s.get("inverse_gain_by_set", {}).get(key, {})
            h = g.get("histogram")
            if h:
                edges, counts = h["log10_edges"], h["counts"]
                ax.stairs(counts, edges, color=colour, label=key, fill=True, alpha=0.4)
                used = [i for i, c in enumerate(counts) if c]
                lo, hi = min(lo, edges[used[0]]), max(hi, edges[used[-1] + 1])
        ax.set_xlim(lo - 0.25, hi + 0.25)
        ax.set_yscale("log")
        ax.axvline(0.0, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{s['name']} ({s['kind']})", fontsize=7)
        ax.set_xlabel("log10 1/c'", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    if total > n:
        fig.suptitle(f"the {n} riskiest of {total} sites; every site is in the table", fontsize=8)
    fig.tight_layout()
    return png_data_uri(fig)


def risk_plot(data: dict) -> str | None:
    inputs = [r for r in data.get("inputs", []) if r.get("s_ood") is not None]
    if not any(math.isfinite(num(r["s_ood"])) for r in inputs):  # only NaN/Inf conditions scored: nothing to plot
        return None
    plt = _plt()
    import numpy as np

    k = data["risk"]["samples_per_input"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    finite = np.array([num(r["s_ood"]) for r in inputs])
    finite = finite[np.isfinite(finite)]
    bins = np.linspace(finite.min(), finite.max(), 60) if len(finite) else 10  # one set of bins for both sets
    for key, colour in (("in", "tab:blue"), ("ood", "tab:red")):
        s = np.array([num(r["s_ood"]) for r in inputs if r["set"] == key])
        s = s[np.isfinite(s)]
        if len(s):
            a1.hist(s, bins=bins, alpha=0.6, color=colour, label=key)
            e = np.array([r["n_pixel_err"] / k for r in inputs if r["set"] == key and math.isfinite(num(r["s_ood"]))])
            a2.scatter(s, e, s=8, alpha=0.5, color=colour, label=key)
    a1.set_xlabel("s_OOD")
    a1.set_title("s_OOD distributions")
    a1.legend()
    fit = data["risk"].get("logistic")
    allx = np.array([num(r["s_ood"]) for r in inputs])
    allx = allx[np.isfinite(allx)]
    if fit and len(allx):
        xs = np.linspace(allx.min(), allx.max(), 200)
        a2.plot(xs, 1 / (1 + np.exp(-(fit["intercept"] + fit["coef"] * xs))), "k-", label="logistic P(error)")
    a2.set_xlabel("s_OOD")
    a2.set_ylabel("pixel-error rate over K samples")
    a2.set_title("Pixel errors vs s_OOD (paper Fig. 4b)")
    a2.legend()
    fig.tight_layout()
    return png_data_uri(fig)


def panel_plot(panel: list[PanelItem], band: tuple[float, float]) -> str | None:
    """Rows: the condition, its samples (clamped for display, out-of-band pixels marked) and the s_OOD map."""
    if not panel:
        return None
    plt = _plt()

    cols = 2 + max(len(it.samples) for it in panel)
    fig, axes = plt.subplots(len(panel), cols, figsize=(1.9 * cols, 2.0 * len(panel)), squeeze=False)

    def show(ax, t, title):
        rgb, n_bad = display_rgb(t.detach().float().numpy())
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(title + (f"\n{n_bad} px non-finite" if n_bad else ""), fontsize=6)

    for row, it in zip(axes, panel):
        rec = it.record
        show(row[0], it.y, f"{it.id} ({it.set})\ns_OOD {fmt(rec.get('s_ood'))}")
        for k, x in enumerate(it.samples):
            bad = int((~((x >= band[0]) & (x <= band[1]))).sum())
            show(row[1 + k], x, f"sample {k}: {bad} px out of band")
        if it.map is not None:
            im = row[-1].imshow(it.map, cmap="magma")
            row[-1].set_title("spatial s_OOD", fontsize=6)
            fig.colorbar(im, ax=row[-1], fraction=0.046)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    from matplotlib.patches import Patch

    fig.tight_layout()
    fig.legend(
        handles=[Patch(color=NONFINITE_COLOUR, label="non-finite pixel (Inf/NaN)")],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        fontsize=7,
        frameon=False,
    )
    return png_data_uri(fig)


def display_rgb(a):
    """A C×H×W image (C = 1 or 3) as H×W×3 in [0, 1] for display, and its count of non-finite pixels.

    Finite values are clamped to [0, 1] as a saved image would be; a pixel with any non-finite channel is
    drawn in :data:`NONFINITE_COLOUR`, so an exploded sample cannot pass for a dark one.
    """
    import numpy as np

    bad = ~np.isfinite(a).all(axis=0)
    rgb = np.clip(np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0), 0, 1)
    rgb = rgb.transpose(1, 2, 0) if rgb.shape[0] == 3 else np.repeat(rgb[0][..., None], 3, axis=2)
    rgb[bad] = [int(NONFINITE_COLOUR[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    return rgb, int(bad.sum())
