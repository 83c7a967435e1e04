r"""The attack as an audit: shards of starts, per-start records, summary, per-site evidence, saved worst cases.

:func:`run_attack` runs :func:`~flowaudit.evidence.search.search` over a condition set cut into shards of
:data:`~flowaudit.runs.shards.ATTACK_SHARD_STARTS` starts, so an interrupted attack finishes with ``--resume`` and
ranks share the shards. Each start's latents are seeded as the scan seeds its inputs and every step is per start;
with exact passes (the default) each inverse pass holds one start's K samples, so the report is the same for any
``--batch-size``, resume or number of ranks (``--batched`` puts ``batch_size // K`` starts in a pass).

The merged shards build the report's ``attack`` entry (``objective``, ``budget``, ``settings``, ``starts``,
``summary``: ``broken_rate``, ``median_distance_to_break``, ``worst_max_abs``, ``worst_inverse_gain``), each
site's ``worst_case`` evidence (its largest inverse gain before and after, whether some broken start reached
:math:`1/c' \ge 10` through it, and per start the largest |value| and the non-finite count of the layer output
it feeds), and ``attack/worst.npz`` (PNGs for images). Call it inside
:func:`~flowaudit.config.device.auditing`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters import Adapter
from ..config.sampling import Sampling, batches, progress_bar
from ..io.datasets import ConditionSet
from ..runs.shards import ATTACK_SHARD_STARTS, WorkFolder, run_shards, shard_slices
from .search import Search, default_step, search

__all__ = ["AttackResult", "run_attack", "REACH_GAIN"]

#: A site took part in a blow-up the attack reached when its 1/c' was at least this on a broken start.
REACH_GAIN = 10.0


@dataclass
class AttackResult:
    """What :func:`run_attack` found: the report entry, per-site evidence and the files to save."""

    entry: dict
    worst_case: dict[str, dict]
    files: dict[str, bytes] = field(default_factory=dict)


def run_attack(
    adapter: Adapter,
    cs: ConditionSet,
    how: Search,
    sampling: Sampling,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    n_worst: int = 8,
    exact: bool = True,
    work: WorkFolder | None = None,
    group: Any = None,
    key: str = "attack",
) -> AttackResult:
    """Attack every condition of ``cs`` (see module docstring).

    ``batch_size`` counts samples per inverse pass when not ``exact``; ``work`` keeps the completed
    shards (keyed ``<key>-<k>``), ``group`` spreads them over ranks (every rank returns the whole result).
    """
    image = len(adapter.condition_shape) == 3
    valid = tuple(adapter.output_range) if image else None
    spread = float(cs.y.max() - cs.y.min()) if len(cs.y) else 1.0
    alpha, rho = default_step(how.budget, how.steps, spread or 1.0)
    if how.step_size is not None:
        alpha = how.step_size
    per_pass = 1 if exact else max(1, batch_size // sampling.samples)
    if group is not None and len(cs.y):
        # a search that cannot run fails on its first pass: find out on every rank before any rank waits for
        # another's shard
        search(
            adapter,
            cs.y[:1].to(device),
            sampling.latents(adapter, cs.y[:1], 0, 0, device),
            sampling,
            dataclasses.replace(how, steps=min(how.steps, 1)),
            (alpha, rho),
            valid,
        )

    def shard(sl: slice, bar) -> dict:
        parts = []
        for b in batches(sl.stop - sl.start, per_pass):
            b = slice(sl.start + b.start, sl.start + b.stop)
            y0 = cs.y[b].to(device)
            latents = sampling.latents(adapter, y0, 0, b.start, device)
            parts.append(search(adapter, y0, latents, sampling, how, (alpha, rho), valid, bar))
        return _concat(parts)

    with progress_bar(len(cs.y) * max(how.steps, 1), "attack", progress) as bar:
        jobs = [
            (f"{key}-{k:05d}", functools.partial(shard, sl, bar))
            for k, sl in enumerate(shard_slices(len(cs.y), ATTACK_SHARD_STARTS))
        ]
        res = _concat(list(run_shards(jobs, work, group)))
    parts = bool(res)
    layers, sites = (res.pop("_layers"), res.pop("_sites")) if parts else ([], [])
    starts = _records(cs, res, layers)
    summary = _summary(starts)
    order = sorted(
        range(len(starts)),
        key=lambda i: (
            -starts[i]["nonfinite"],
            -starts[i]["broken"],
            -_f(starts[i]["max_abs"]),
            -_f(starts[i]["objective_after"]),
        ),
    )[:n_worst]
    summary["worst"] = [starts[i]["id"] for i in order]
    entry = {
        "objective": how.objective,
        "budget": how.budget.to_dict(),
        "settings": {
            "steps": how.steps,
            "step_rule": how.rule,
            "step_size": alpha,
            "step_growth": rho,
            "samples": sampling.samples,
            "temperature": sampling.temperature,
            "seed": sampling.seed,
            "n_starts": len(starts),
            "layer_factor": how.layer_factor,
            "valid_range": list(valid) if valid else None,
            "distance_norm": how.budget.norm,
        },
        "starts": starts,
        "summary": summary,
    }
    evidence = _evidence(sites, res, starts, how) if parts else {}
    entry["sites"] = evidence
    files = _files(cs, res, order, image, starts) if parts else {}
    entry["saved"] = sorted(files)
    return AttackResult(entry=entry, worst_case=evidence, files=files)


def _concat(parts: list[dict]) -> dict:
    """Per-start results of consecutive passes or shards as one payload: CPU tensors in start order
    (``site_*`` are (sites, starts)) and the layer and site names; ``{}`` for none."""
    if not parts:
        return {}
    out: dict[str, Any] = {
        k: torch.cat([p[k].detach().cpu() for p in parts], 1 if k.startswith("site_") else 0)
        for k in parts[0]
        if not k.startswith("_")
    }
    out["_layers"], out["_sites"] = list(parts[0]["_layers"]), list(parts[0]["_sites"])
    return out


def _f(v: float) -> float:
    return -math.inf if v is None or math.isnan(v) else v


def _records(cs: ConditionSet, res: dict, layers: list[str]) -> list[dict]:
    out = []
    for i in range(len(res.get("y", []))):
        k = int(res["layer"][i])
        step = int(res["broken_step"][i])
        out.append(
            {
                "id": cs.ids[i],
                "objective_before": float(res["objective_before"][i]),
                "objective_after": float(res["objective_after"][i]),
                "max_abs": float(res["max_abs"][i]),
                "max_inverse_gain": float(res["max_inverse_gain"][i]),
                "nonfinite": int(res["nonfinite"][i]),
                "broken": bool(res["broken"][i]),
                "distance": float(res["distance"][i]),
                "layer": layers[k] if k >= 0 else None,
                "broken_at_step": step if step >= 0 else None,
                "distance_to_break": None if step < 0 else float(res["distance_to_break"][i]),
            }
        )
    return out


def _summary(starts: list[dict]) -> dict:
    n = len(starts)
    broken = [s for s in starts if s["broken"]]
    finite_gain = [s["max_inverse_gain"] for s in starts if not math.isnan(s["max_inverse_gain"])]
    return {
        "n_starts": n,
        "n_broken": len(broken),
        "broken_rate": len(broken) / n if n else math.nan,
        "median_distance_to_break": float(np.median([s["distance_to_break"] for s in broken])) if broken else None,
        "worst_max_abs": max((s["max_abs"] for s in starts), default=math.nan),
        "worst_inverse_gain": max(finite_gain, default=math.nan),
        "n_nonfinite_starts": sum(s["nonfinite"] > 0 for s in starts),
    }


def _evidence(sites: list[str], res: dict, starts: list[dict], how: Search) -> dict[str, dict]:
    broken = np.array([s["broken"] for s in starts], dtype=bool)
    dist = np.array([np.nan if s["distance_to_break"] is None else s["distance_to_break"] for s in starts])
    rate = float(broken.mean()) if len(broken) else math.nan
    out = {}
    for k, name in enumerate(sites):
        after = res["site_gain"][k].numpy()
        hit = broken & (after >= REACH_GAIN)
        out[name] = {
            "reached": bool(hit.any()),
            "max_inverse_gain": float(np.max(after)),
            "max_inverse_gain_before": float(np.max(res["site_gain_before"][k].numpy())),
            "distance": float(dist[hit].min()) if hit.any() else None,
            "broken_rate": rate,
            "budget": how.budget.spec(),
            "objective": how.objective,
            "n_starts": len(starts),
        }
        if "site_abs" in res:  # per start at its reported point: the largest |value| and non-finite count it fed
            out[name]["per_start"] = [
                {
                    "id": st["id"],
                    "max_abs": float(res["site_abs"][k][i]),
                    "nonfinite": int(res["site_nonfinite"][k][i]),
                    "max_inverse_gain": float(after[i]),
                }
                for i, st in enumerate(starts)
            ]
    return out


def _files(cs: ConditionSet, res: dict, order: list[int], image: bool, starts: list[dict]) -> dict[str, bytes]:
    """``attack/worst.npz`` (ids, start and attacked conditions, samples) and, for images, PNGs."""
    idx = torch.tensor(order, dtype=torch.long)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        ids=np.array([starts[i]["id"] for i in order]),
        y_start=cs.y[idx].numpy(),
        y_attack=res["y"][idx].numpy(),
        samples=res["x"][idx].numpy(),
        max_abs=res["max_abs"][idx].numpy(),
        distance=res["distance"][idx].numpy(),
        distance_to_break=res["distance_to_break"][idx].numpy(),
    )
    files = {"attack/worst.npz": buf.getvalue()}
    if image:
        for rank, i in enumerate(order):
            stem = f"attack/{rank:02d}_{_safe(starts[i]['id'])}"
            files[f"{stem}_start.png"] = _png(cs.y[i])
            files[f"{stem}_attack.png"] = _png(res["y"][i])
            for k in range(min(2, res["x"].shape[1])):
                files[f"{stem}_sample{k}.png"] = _png(res["x"][i, k])
    return files


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:60]


def _png(img: torch.Tensor) -> bytes:
    """A C×H×W image in [0, 1] as PNG bytes (clamped as a saved image would be; NaN shows black)."""
    from PIL import Image

    a = torch.nan_to_num(img.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    a = (a.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    if a.shape[2] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()
