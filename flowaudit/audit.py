"""The audit: fit the feature Gaussian, sample under traces, probe Remark 2, measure risk.

:func:`fit`, :func:`scan` and :func:`inspect` are the Python API behind the
CLI. Each takes a model (anything :func:`flowaudit.adapt` accepts) and returns
a :class:`~flowaudit.report.Report`. The model is observed, never altered:
its ``training`` flag and device are restored, gradients are off and TF32 is
disabled while auditing so that GPU figures match CPU ones.
"""

from __future__ import annotations

import contextlib
import json
import datetime as _dt
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._version import __version__
from .adapters import Adapter, adapt
from .datasets import ConditionSet, load_conditions
from .gaussian import GaussianOOD
from .features import capture_features, pool
from .remark2 import probe_site
from .report import Report, jsonable
from .risk import aggregate, lr_psnr, sample_checks
from .trace import Tracer

__all__ = ["AuditError", "resolve_device", "auditing", "features", "fit", "scan", "inspect"]


class AuditError(ValueError):
    """A problem with what the user asked for (bad stats file, layer names, …): exit code 2."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise AuditError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AuditError(f"device {device!r} requested but CUDA is not available")
    return dev


@contextlib.contextmanager
def auditing(adapter: Adapter, device: torch.device) -> Iterator[None]:
    """Eval mode, no grad, TF32 off, model on ``device``; everything restored on exit."""
    model = adapter.model
    was_training, was_device = model.training, adapter.device
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model.to(device).eval()
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        model.to(was_device)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _as_set(data: Any, what: str) -> ConditionSet | None:
    if data is None or isinstance(data, ConditionSet):
        return data
    if isinstance(data, (str, Path)):
        return load_conditions(data)
    y = torch.as_tensor(data, dtype=torch.float32)
    return ConditionSet(y=y, x=None, ids=[f"{what}{i}" for i in range(len(y))], description={"kind": "tensor", "n": len(y), "shape": list(y.shape[1:])})


def _check_shape(adapter: Adapter, cs: ConditionSet, what: str) -> None:
    want = tuple(adapter.condition_shape)
    got = tuple(cs.y.shape[1:])
    # image models accept any spatial size with the right channel count
    same = got == want or (len(got) == len(want) == 3 and got[0] == want[0])
    if not same:
        raise AuditError(f"{what}: conditions have shape {got}, the model expects {want}")


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=0.5)


def features(adapter: Adapter, y: Tensor, layers: Sequence[str], pooling: str, batch_size: int, device: torch.device, progress: bool = False) -> Tensor:
    """Encoder features (N, D) in float64: hooked ``layers`` pooled, or the condition itself."""
    out = []
    with _progress(len(y), "features", progress) as bar:
        if not layers:
            for sl in _batches(len(y), batch_size):
                out.append(pool(y[sl], pooling).flatten(1).cpu())
                bar.update(sl.stop - sl.start)
            return torch.cat(out)
        with contextlib.ExitStack() as stack:
            try:  # only an unknown layer name is the user's mistake; a KeyError inside the encoder is not
                cap = stack.enter_context(capture_features(adapter.model, layers, pooling))
            except KeyError as exc:
                raise AuditError(str(exc.args[0])) from None
            for sl in _batches(len(y), batch_size):
                adapter.encode(y[sl].to(device))
                out.append(cap.take().cpu())
                bar.update(sl.stop - sl.start)
    return torch.cat(out)


def _layers(adapter: Adapter, layers: Sequence[str] | None) -> list[str]:
    return list(adapter.feature_layers() if layers is None else layers)


def fit(
    model: Any,
    data: Any,
    *,
    layers: Sequence[str] | None = None,
    pooling: str = "avg",
    estimator: str = "ledoit-wolf",
    batch_size: int = 256,
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool = False,
) -> Report:
    """Fit the encoder-feature Gaussian on ``data``; write ``out`` (stats.h5) when given.

    The report's ``gaussian`` attribute is the fitted :class:`GaussianOOD`.
    """
    adapter = adapt(model)
    cs = _as_set(data, "fit")
    _check_shape(adapter, cs, "--data")
    dev = resolve_device(device)
    names = _layers(adapter, layers)
    if pooling == "spatial":
        raise AuditError("spatial pooling scores locations, fit the per-input Gaussian with avg or avgstd")
    with auditing(adapter, dev):
        v = features(adapter, cs.y, names, pooling, batch_size, dev, progress)
    try:
        gauss = GaussianOOD(estimator=estimator, device=dev).fit(v)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    entry = _model_entry(adapter)  # hashes the weights once for the report and the stats file
    meta = {
        "model": adapter.name, "adapter": adapter.family, "fingerprint": entry["fingerprint"],
        "layers": names or ["<condition>"], "pooling": pooling, "data": json.dumps(jsonable(cs.description)),
    }
    if out is not None:
        gauss.save(out, **meta)
    report = Report({
        "flowaudit_version": __version__, "kind": "fit", **_stamp(),
        "model": entry, "ood": {**meta, "dim": int(v.shape[1]), "n_inputs": int(gauss.n_), "n_nonfinite": int(gauss.n_nonfinite_),
                                                "estimator": estimator, "shrinkage": float(gauss.shrinkage_), "out": str(out) if out else None},
    })
    report.gaussian = gauss
    return report


def _stamp() -> dict:
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _model_entry(adapter: Adapter) -> dict:
    return {
        "name": adapter.name, "adapter": adapter.family, "task": adapter.task,
        "n_parameters": adapter.n_parameters(), "fingerprint": adapter.fingerprint(),
        "condition_shape": list(adapter.condition_shape), "output_range": list(adapter.output_range),
        "error_band": list(adapter.error_band), "encoder_layers": adapter.feature_layers() or ["<condition>"],
    }


def _load_stats(adapter: Adapter, stats: Any, names: list[str], pooling: str) -> GaussianOOD:
    if isinstance(stats, GaussianOOD):
        return stats
    try:
        gauss = GaussianOOD.load(stats)
    except (OSError, ValueError) as exc:
        raise AuditError(f"{stats}: cannot read stats ({exc})") from None
    meta = gauss.metadata_
    fp = adapter.fingerprint()
    if meta.get("fingerprint") != fp:
        raise AuditError(f"{stats} was fitted on weights {meta.get('fingerprint')}, this model's are {fp}: refit with `flowaudit fit`")
    if list(meta.get("layers", [])) != (names or ["<condition>"]) or meta.get("pooling") != pooling:
        raise AuditError(f"{stats} was fitted on layers {meta.get('layers')} ({meta.get('pooling')}), the scan uses {names or ['<condition>']} ({pooling})")
    return gauss


def _latents(adapter: Adapter, y: Tensor, k: int, temperature: float, seed: int, offset: int, device: torch.device) -> list[Tensor]:
    """K latents per input from a generator seeded by (seed, input index): batch-size independent."""
    per_input = []
    g = torch.Generator()
    for i in range(len(y)):
        g.manual_seed(seed * 1_000_003 + offset + i)
        per_input.append(adapter.sample_latents(y[i : i + 1].cpu().repeat_interleave(k, 0), temperature, g))
    return [torch.cat(parts).to(device) for parts in zip(*per_input)]


def _scan_set(adapter: Adapter, cs: ConditionSet, set_name: str, offset: int, gauss: GaussianOOD | None, names: list[str],
              pooling: str, samples: int, temperature: float, seed: int, batch_size: int, device: torch.device, progress: bool) -> tuple[Tracer, list[dict], np.ndarray]:
    tracer = Tracer(samples)
    band = adapter.error_band
    records: list[dict] = []
    feats = features(adapter, cs.y, names, pooling, batch_size, device) if gauss is not None else None
    s_ood = gauss.score(feats) if gauss is not None else np.full(len(cs.y), np.nan)
    with _progress(len(cs.y), f"scan {set_name}", progress) as bar:
        for sl in _batches(len(cs.y), max(1, batch_size // samples)):
            y = cs.y[sl].to(device)
            yk = y.repeat_interleave(samples, 0)
            x = adapter.sample(yk, _latents(adapter, y, samples, temperature, seed, offset + sl.start, device), observer=tracer)
            tracer.layer("output", x)
            tracer.end_batch(len(y))
            checks = {k: v.cpu().tolist() for k, v in sample_checks(x, samples, band).items()}
            psnr = lr_psnr(x, y, adapter.scale, samples).cpu() if adapter.task == "sr" else None
            recon = _reconstruction(adapter, cs.x[sl].to(device), y) if cs.x is not None else None
            for j in range(len(y)):
                i = sl.start + j
                rec = {"id": cs.ids[i], "set": set_name, "s_ood": None if math.isnan(s_ood[i]) else float(s_ood[i]),
                       "n_inf": int(checks["n_inf"][j]), "n_pixel_err": int(checks["n_pixel_err"][j]), "max_abs": float(checks["max_abs"][j])}
                if psnr is not None:
                    rec["lr_psnr_min"], rec["lr_psnr_std"] = float(psnr[j].min()), float(psnr[j].std(unbiased=False))
                if recon is not None:
                    rec["reconstruction_error"] = float(recon[j])
                records.append(rec)
            bar.update(len(y))
    for rec, g in zip(records, tracer.input_gain):
        rec["max_inverse_gain"] = g["max"]
        rec["inverse_gain"] = g
    return tracer, records, s_ood


def _reconstruction(adapter: Adapter, x: Tensor, y: Tensor) -> Tensor:
    """‖f⁻¹(f(x; y); y) − x‖∞ per input (Behrmann et al. 2021); inf when non-finite."""
    latents, _ = adapter.forward(x, y)
    err = (adapter.sample(y, latents) - x).flatten(1).abs().to(torch.float64)
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    return err.amax(1).cpu()


def _default_conditions(adapter: Adapter, n: int, seed: int) -> ConditionSet:
    """Conditions drawn for the model's condition shape when no data is given (images: uniform [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(adapter.condition_shape)
    lo, hi = adapter.output_range
    if len(shape) == 3:
        y = torch.rand((n, *shape), generator=g) * (hi - lo) + lo
    else:
        y = torch.randn((n, *shape), generator=g)
    return ConditionSet(y=y, x=None, ids=[f"drawn{i}" for i in range(n)], description={"kind": "drawn", "n": n, "shape": list(shape)})


def _site_entries(adapter: Adapter, tracers: list[Tracer], threshold: float) -> list[dict]:
    entries = []
    for site in adapter.sites():
        params = [p for t in tracers for p in t.params.get(site.name, [])]
        gains = [t.gains[site.name] for t in tracers if site.name in t.gains]
        entry = {"name": site.name, "kind": site.kind, "remark2": probe_site(site, params, threshold)}
        if gains:
            total = gains[0]
            for gs in gains[1:]:
                total = total.merge(gs)
            entry["inverse_gain"] = total.to_dict()
            entry["inverse_gain_by_set"] = {name: gs.to_dict() for name, gs in zip(("in", "ood"), gains)}
        entries.append(entry)
    return entries


def scan(
    model: Any,
    data: Any = None,
    *,
    ood: Any = None,
    stats: Any = None,
    fit_data: Any = None,
    samples: int = 10,
    temperature: float = 0.9,
    seed: int = 0,
    batch_size: int = 500,
    device: str = "auto",
    layers: Sequence[str] | None = None,
    pooling: str = "avg",
    estimator: str = "ledoit-wolf",
    remark2_threshold: float = 0.5,
    explosion_threshold: float = 100.0,
    progress: bool = False,
) -> Report:
    """The full audit of ``model`` on conditions ``data`` (and ``ood``); see DESIGN.md §4.

    ``stats`` (a stats.h5 path or fitted :class:`GaussianOOD`) or ``fit_data``
    gives ``s_OOD``; with neither, inputs carry no score. ``batch_size``
    counts samples (inputs × K) per inverse pass.
    """
    if samples < 1:
        raise AuditError("--samples must be at least 1")
    if temperature < 0:
        raise AuditError("--temperature must be ≥ 0")
    adapter = adapt(model)
    dev = resolve_device(device)
    names = _layers(adapter, layers)
    sets: list[tuple[str, ConditionSet]] = []
    main = _as_set(data, "in") if data is not None else _default_conditions(adapter, 64, seed)
    sets.append(("in", main))
    if ood is not None:
        sets.append(("ood", _as_set(ood, "ood")))
    for name, cs in sets:
        _check_shape(adapter, cs, "--data" if name == "in" else "--ood-data")
    gauss = spatial = None
    if stats is not None:
        gauss = _load_stats(adapter, stats, names, pooling)
    elif fit_data is not None:
        gauss = fit(adapter, fit_data, layers=names, pooling=pooling, estimator=estimator, device=device).gaussian
        if names and len(adapter.condition_shape) == 3:
            spatial = _fit_spatial(adapter, _as_set(fit_data, "fit"), names, estimator, batch_size, dev)
    tracers, records, scores = [], [], {}
    with auditing(adapter, dev):
        for offset, (name, cs) in enumerate(sets):
            t, recs, s = _scan_set(adapter, cs, name, offset * 10**9, gauss, names, pooling, samples, temperature, seed, batch_size, dev, progress)
            tracers.append(t)
            records += recs
            scores[name] = s
        sites = _site_entries(adapter, tracers, remark2_threshold)
    risk = aggregate(records, samples, temperature)
    risk["by_set"] = {name: {k: v for k, v in aggregate([dict(r) for r in records if r["set"] == name], samples, temperature).items() if k != "ranked"} for name, _ in sets}
    layers_out, explosion = _layer_table(adapter, tracers, explosion_threshold)
    ood_entry = None
    if gauss is not None:
        ood_entry = {
            "layers": names or ["<condition>"], "pooling": pooling, "dim": int(gauss.n_features_in_),
            "estimator": gauss.estimator, "n_fit": int(gauss.n_), "s_ood": {k: [None if not np.isfinite(v) else float(v) for v in s] for k, s in scores.items()},
            "mean": {k: float(np.mean(s[np.isfinite(s)])) if np.isfinite(s).any() else None for k, s in scores.items()},
            "n_nonfinite": {k: int((~np.isfinite(s)).sum()) for k, s in scores.items()},
        }
        if "ood" in scores:
            from sklearn.metrics import roc_auc_score

            a, b = scores["in"], scores["ood"]
            lab = np.r_[np.zeros(len(a)), np.ones(len(b))]
            sc = np.nan_to_num(np.r_[a, b], nan=np.inf, posinf=1e300)
            ood_entry["auroc_in_vs_ood"] = float(roc_auc_score(lab, sc))
    model_entry = _model_entry(adapter)
    model_entry["sites"] = sites
    data = {
        "flowaudit_version": __version__, "kind": "scan", **_stamp(),
        "settings": {"samples": samples, "temperature": temperature, "seed": seed, "device": str(dev), "batch_size": batch_size,
                     "remark2_threshold": remark2_threshold, "explosion_threshold": explosion_threshold},
        "data": {name: cs.description for name, cs in sets},
        "model": model_entry, "ood": ood_entry, "risk": risk, "layers": layers_out, "explosion_layer": explosion,
        "inputs": records,
    }
    report = Report(data)
    if len(adapter.condition_shape) == 3:
        report.images = _worst_images(adapter, sets, records, spatial, names, samples, temperature, seed, dev)
    return report


def _fit_spatial(adapter: Adapter, cs: ConditionSet, names: list[str], estimator: str, batch_size: int, device: torch.device) -> GaussianOOD:
    """Gaussian of per-location feature vectors (every location of every fit input), streamed."""
    gauss = GaussianOOD(estimator=estimator, device=device)
    with auditing(adapter, device), capture_features(adapter.model, names, "spatial") as cap:
        for sl in _batches(len(cs.y), max(1, batch_size // 10)):
            adapter.encode(cs.y[sl].to(device))
            v = cap.take()
            gauss.partial_fit(v.reshape(-1, v.shape[-1]))
    return gauss.finalize()


def spatial_map(adapter: Adapter, gauss: GaussianOOD, y: Tensor, names: Sequence[str]) -> np.ndarray:
    """Per-location ``s_OOD`` (B, H', W') at the resolution of the first hooked layer: where will the artifact be?"""
    with capture_features(adapter.model, names, "spatial") as cap:
        adapter.encode(y)
        v = cap.take()
    return gauss.score(v.reshape(-1, v.shape[-1])).reshape(v.shape[:-1])


def _worst_images(adapter: Adapter, sets, records: list[dict], spatial: GaussianOOD | None, names: list[str],
                  samples: int, temperature: float, seed: int, device: torch.device, n: int = 6, shown: int = 3) -> list[dict]:
    """Inputs, a few samples and the spatial s_OOD map of the riskiest inputs, for the HTML report only."""
    order = sorted(range(len(records)), key=lambda i: (-records[i]["n_inf"], -records[i]["n_pixel_err"],
                                                       -(records[i]["s_ood"] or 0.0), -records[i]["max_abs"]))[:n]
    by_set = dict(sets)
    offsets = {name: k * 10**9 for k, (name, _) in enumerate(sets)}
    start = {name: next(i for i, r in enumerate(records) if r["set"] == name) for name, _ in sets}
    out = []
    shown = min(shown, samples)
    with auditing(adapter, device):
        for i in order:
            rec = records[i]
            j = i - start[rec["set"]]
            y = by_set[rec["set"]].y[j : j + 1].to(device)
            lat = [z[:shown] for z in _latents(adapter, y, samples, temperature, seed, offsets[rec["set"]] + j, device)]
            x = adapter.sample(y.repeat_interleave(shown, 0), lat).cpu()  # the first samples of the scan, again
            item = {"id": rec["id"], "set": rec["set"], "y": y[0].cpu(), "samples": x, "record": rec}
            if spatial is not None:
                item["map"] = spatial_map(adapter, spatial, y, names)[0]
            out.append(item)
    return out


def _layer_table(adapter: Adapter, tracers: list[Tracer], threshold: float) -> tuple[list[dict], str | None]:
    names = adapter.layer_names() + ["output"]
    rows, explosion = [], None
    for name in names:
        row: dict[str, Any] = {"name": name}
        for set_name, t in zip(("in", "ood"), tracers):
            if name in t.layers:
                row[set_name] = t.layers[name].to_dict()
        if "in" in row and "ood" in row:
            vi, vo = row["in"]["variance"], row["ood"]["variance"]
            ratio = vo / vi if vi > 0 else (math.inf if vo > 0 else 1.0)
            if row["ood"]["n_nonfinite"] and not row["in"]["n_nonfinite"]:
                ratio = math.inf
            row["variance_ratio"] = ratio
            if explosion is None and ratio > threshold:
                explosion = name
        rows.append(row)
    return rows, explosion


def inspect(model: Any, data: Any = None, *, samples: int = 4, temperature: float = 0.9, seed: int = 0, device: str = "auto",
            remark2_threshold: float = 0.5, batch_size: int = 500) -> Report:
    """Sites, kinds and Remark 2 verdicts; probes under ``data`` or under conditions drawn for the model."""
    adapter = adapt(model)
    dev = resolve_device(device)
    cs = _as_set(data, "in") if data is not None else _default_conditions(adapter, 64, seed)
    _check_shape(adapter, cs, "--data")
    cs = ConditionSet(y=cs.y[:256], x=None, ids=cs.ids[:256], description=cs.description)
    with auditing(adapter, dev):
        tracer, _, _ = _scan_set(adapter, cs, "in", 0, None, [], "avg", samples, temperature, seed, batch_size, dev, False)
        sites = _site_entries(adapter, [tracer], remark2_threshold)
    entry = _model_entry(adapter)
    entry["sites"] = sites
    return Report({"flowaudit_version": __version__, "kind": "inspect", **_stamp(), "model": entry,
                   "data": {"in": cs.description}})
