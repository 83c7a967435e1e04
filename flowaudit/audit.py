"""The audit's three entry points: :func:`fit`, :func:`scan` and :func:`inspect`.

Each takes a model (anything :func:`flowaudit.adapt` accepts) and returns a
:class:`~flowaudit.report.Report`; this module only orchestrates. Features and
the Gaussian come from :mod:`.features` and :mod:`.gaussian`, the sampling loop
from :mod:`.sampling`, per-site entries from :mod:`.sites`, the layer trace from
:mod:`.trace`, risk from :mod:`.risk` and the worst-input panel from :mod:`.panel`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._version import __version__
from .adapters import Adapter, adapt, small_flow
from .config.device import auditing, resolve_device
from .config.sampling import Sampling
from .errors import AuditError
from .evidence.attack import run_attack
from .evidence.budget import Budget, parse_budget
from .evidence.search import DetachedGains, Search
from .evidence.sites import model_evidence, site_entries
from .io.datasets import ConditionSet, load_conditions, nonfinite_records
from .render.panel import worst_inputs
from .report import Report
from .runs.passes import Run, sample_set
from .runs.runner import Context, attack_settings, fit_gaussian, run_facts, scan_sets, scan_settings, size_batches
from .runs.shards import FIT_SHARD_INPUTS, digest
from .stats.features import fit_spatial
from .stats.gaussian import GaussianOOD
from .stats.risk import aggregate
from .tracing.trace import layer_table
from .utils.format import jsonable

__all__ = ["fit", "scan", "inspect", "attack"]

SMALL_FLOW_SHARD = 1024  # inputs a shard and a pass of a small flow (flowaudit.adapters.small_flow)
SCAN_ATTACK_BATCH = 64  # samples per pass of scan --attack with --batched (the pass keeps its graph)


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
    context: Context | None = None,
) -> Report:
    """Fit the encoder-feature Gaussian on ``data``; write ``out`` (stats.h5) when given.

    The report's ``gaussian`` is the fitted :class:`GaussianOOD`. ``context`` (:class:`~flowaudit.runs.runner.Context`)
    keeps completed shards in a work folder (resume) and shares them over ranks.
    """
    adapter = adapt(model)
    cs = _as_set(data, "fit")
    _check_shape(adapter, cs, "--data")
    n_bad, cs = cs.n_nonfinite, cs.finite()  # NaN/Inf conditions never reach the Gaussian; counted below
    dev = resolve_device(device)
    names = _layers(adapter, layers)
    if pooling == "spatial":
        raise AuditError("spatial pooling scores locations, fit the per-input Gaussian with avg or avgstd")
    ctx = context or Context()
    dev = ctx.group.device if ctx.group is not None else dev
    if ctx.work is None and not ctx.opened:
        ctx.open(
            {
                "kind": "fit",
                "fingerprint": adapter.fingerprint(),
                "data": digest(cs.y),
                "layers": names,
                "pooling": pooling,
                "estimator": estimator,
                "fit_shard_inputs": FIT_SHARD_INPUTS,
                "device": dev.type,
            }
        )
    with auditing(adapter, dev):
        gauss = fit_gaussian(adapter, cs, names, pooling, estimator, batch_size, dev, ctx, progress)
    gauss.n_nonfinite_ += n_bad  # rows skipped for a non-finite value: the conditions' and the features'
    entry = _model_entry(adapter)  # hashes the weights once for the report and the stats file
    meta = {
        "model": adapter.name,
        "adapter": adapter.family,
        "fingerprint": entry["fingerprint"],
        "layers": names or ["<condition>"],
        "pooling": pooling,
        "data": json.dumps(jsonable(cs.description)),
    }
    if out is not None:
        gauss.save(out, **meta)
    return Report(
        {
            "flowaudit_version": __version__,
            "kind": "fit",
            **_stamp(),
            "model": entry,
            "ood": {
                **meta,
                "dim": int(gauss.n_features_in_),
                "n_inputs": int(gauss.n_),
                "n_nonfinite": int(gauss.n_nonfinite_),
                "estimator": estimator,
                "shrinkage": float(gauss.shrinkage_),
                "out": str(out) if out else None,
            },
        },
        gaussian=gauss,
    )


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
    batch_size: int | None = None,
    device: str = "auto",
    layers: Sequence[str] | None = None,
    pooling: str = "avg",
    estimator: str = "ledoit-wolf",
    remark2_threshold: float = 0.5,
    explosion_threshold: float = 100.0,
    progress: bool = False,
    attack: str | Budget | None = None,
    attack_starts: int = 16,
    attack_steps: int = 50,
    exact: bool | None = None,
    context: Context | None = None,
) -> Report:
    """The full audit of ``model`` on conditions ``data`` (and ``ood``); see DESIGN.md §4.

    ``stats`` (a stats.h5 path or fitted :class:`GaussianOOD`) or ``fit_data``
    gives ``s_OOD``; with neither, inputs carry no score. ``batch_size``
    counts samples (inputs × K) per inverse pass (default: what ``context.max_memory``
    allows); ``exact`` makes each pass one input's K samples, so the figures do not depend
    on it (:mod:`flowaudit.runs.runner`); ``False`` sizes passes by ``batch_size``; ``None`` (the
    default): exact, except for a small flow (:func:`~flowaudit.adapters.small_flow`), whose shards
    and passes hold :data:`SMALL_FLOW_SHARD` inputs whatever ``batch_size``: the figures of exact
    passes to float32 rounding, bit for bit where the model's kernels are batch-invariant
    (:func:`~flowaudit.adapters.rows_independent`). ``context`` keeps shards for a resume and
    shares them over ranks. ``attack`` (a budget) also
    attacks the first ``attack_starts`` in-distribution conditions (:func:`attack`)
    and adds each site's ``worst_case`` evidence and the report's ``attack``.
    """
    how = _search(attack, "logdet", attack_steps, None) if attack is not None else None
    if samples < 1:
        raise AuditError("--samples must be at least 1")
    if temperature < 0:
        raise AuditError("--temperature must be ≥ 0")
    adapter = adapt(model)
    ctx = context or Context()
    dev = ctx.group.device if ctx.group is not None else resolve_device(device)
    names = _layers(adapter, layers)
    sets: list[tuple[str, ConditionSet]] = [
        ("in", _as_set(data, "in") if data is not None else _default_conditions(adapter, 64, seed))
    ]
    if ood is not None:
        sets.append(("ood", _as_set(ood, "ood")))
    for name, cs in sets:
        _check_shape(adapter, cs, "--data" if name == "in" else "--ood-data")
    skipped = [
        rec for name, cs in sets for rec in nonfinite_records(cs, name)
    ]  # NaN/Inf conditions: reported, not sampled
    sets = [(name, cs.finite()) for name, cs in sets]
    gauss = spatial = None
    fit_set = _as_set(fit_data, "fit") if fit_data is not None else None
    if stats is not None:
        gauss = _load_stats(adapter, stats, names, pooling)
    small = exact is None and small_flow(adapter, sets[0][1].y[:1] if len(sets[0][1].y) else _zero(adapter))
    if small:  # one pass a shard, the same on every machine whatever batch_size: the calls cost, not their sums
        batch_size = SMALL_FLOW_SHARD * samples
    run = Run(
        Sampling(samples, temperature, seed),
        batch_size or samples,
        dev,
        progress,
        exact=not small and exact is not False,
        shard_inputs=SMALL_FLOW_SHARD if small else None,
    )
    with auditing(adapter, dev):
        run, budget = size_batches(adapter, sets[0][1], run, ctx, batch_size)
    attack_run = dataclasses.replace(run, batch_size=SCAN_ATTACK_BATCH, exact=run.exact or small)  # keeps its graph
    if not ctx.opened:  # the work folder checks everything the shards depend on before the first one
        more = (
            {"attack": attack_settings(how, len(_first(sets[0][1], attack_starts).y), attack_run)}
            if how is not None
            else {}
        )
        ctx.open(
            scan_settings(
                adapter,
                sets,
                run,
                layers=names,
                pooling=pooling,
                estimator=estimator,
                stats=_stats_digest(gauss),
                fit_data=digest(fit_set.y) if fit_set is not None else None,
                **more,
            )
        )
    if fit_set is not None:
        gauss = fit(
            adapter, fit_set, layers=names, pooling=pooling, estimator=estimator, device=str(dev), context=ctx
        ).gaussian
        if names and len(adapter.condition_shape) == 3:
            spatial = fit_spatial(adapter, fit_set.finite().y, names, estimator, run.batch_size, dev)
    with auditing(adapter, dev):
        tracers, records, scores = scan_sets(adapter, sets, gauss, names, pooling, run, ctx)
        hit = (
            _attack_set(adapter, sets[0][1], attack_starts, how, attack_run, ctx, fallback=True)
            if how is not None
            else None
        )
        sites = site_entries(adapter, tracers, remark2_threshold, **({"worst_case": hit.worst_case} if hit else {}))
    risk = aggregate(records, samples, temperature)
    risk["by_set"] = {
        name: {
            k: v
            for k, v in aggregate([dict(r) for r in records if r["set"] == name], samples, temperature).items()
            if k != "ranked"
        }
        for name, _ in sets
    }
    layers_out, explosion = layer_table(adapter.layer_names() + ["output"], tracers, explosion_threshold)
    model_entry = _model_entry(adapter)
    model_entry["sites"] = sites
    model_entry.update(model_evidence(adapter, sites))  # coverage, model verdict, certificate
    report = Report(
        {
            "flowaudit_version": __version__,
            "kind": "scan",
            **_stamp(),
            "settings": {
                "samples": samples,
                "temperature": temperature,
                "seed": seed,
                "device": str(dev),
                "exact": run.exact,
                "passes": {"inputs_per_pass": run.inputs_per_pass, "small_flow": small},
                "remark2_threshold": remark2_threshold,
                "explosion_threshold": explosion_threshold,
                **run_facts(run, budget, ctx),
            },
            "data": {name: cs.description for name, cs in sets},
            "model": model_entry,
            "ood": _ood_entry(gauss, names, pooling, scores),
            "risk": risk,
            "layers": layers_out,
            "explosion_layer": explosion,
            "inputs": records + skipped,
        }
    )
    if hit is not None:
        report.data["attack"], report.files = hit.entry, hit.files
    if len(adapter.condition_shape) == 3:
        report.panel = worst_inputs(adapter, sets, records, spatial, names, run)
    return report


def inspect(
    model: Any,
    data: Any = None,
    *,
    samples: int = 4,
    temperature: float = 0.9,
    seed: int = 0,
    device: str = "auto",
    remark2_threshold: float = 0.5,
    batch_size: int = 500,
) -> Report:
    """Sites, kinds and Remark 2 verdicts; probes under ``data`` or under conditions drawn for the model."""
    adapter = adapt(model)
    dev = resolve_device(device)
    cs = _as_set(data, "in") if data is not None else _default_conditions(adapter, 64, seed)
    _check_shape(adapter, cs, "--data")
    cs = cs.finite()
    cs = ConditionSet(y=cs.y[:256], x=None, ids=cs.ids[:256], description=cs.description)
    run = Run(
        Sampling(samples, temperature, seed), batch_size, dev, exact=False
    )  # a probe: speed over batch-invariance
    with auditing(adapter, dev):
        tracer, _ = sample_set(adapter, cs, 0, "in", np.full(len(cs.y), np.nan), run)
        sites = site_entries(adapter, [tracer], remark2_threshold)
    entry = _model_entry(adapter)
    entry["sites"] = sites
    entry.update(model_evidence(adapter, sites))  # coverage, model verdict, certificate
    return Report(
        {
            "flowaudit_version": __version__,
            "kind": "inspect",
            **_stamp(),
            "model": entry,
            "data": {"in": cs.description},
        }
    )


def attack(
    model: Any,
    data: Any = None,
    *,
    budget: str | Budget = "none",
    objective: str = "logdet",
    steps: int = 50,
    step_size: float | None = None,
    rule: str = "adam",
    starts: int | None = 16,
    samples: int = 4,
    temperature: float = 0.9,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
    context: Context | None = None,
    exact: bool = True,
) -> Report:
    """The worst case (DESIGN.md §4): projected gradient ascent on the first ``starts`` conditions of ``data``.

    See :mod:`flowaudit.evidence.search` for the search and :mod:`flowaudit.evidence.attack` for the report's
    ``attack`` entry; ``report.files`` holds the worst conditions and samples that :meth:`Report.save` writes.
    ``exact`` (the default) makes each inverse pass one start's K samples, so the result does not depend
    on ``batch_size`` (samples per pass, with its graph, when not ``exact``). ``context``
    (:class:`~flowaudit.runs.runner.Context`) keeps completed shards of starts for a resume and shares them over ranks.
    """
    if samples < 1:
        raise AuditError("--samples must be at least 1")
    if temperature < 0:
        raise AuditError("--temperature must be ≥ 0")
    if batch_size < 1:
        raise AuditError("--batch-size must be at least 1")
    how = _search(budget, objective, steps, step_size, rule)
    adapter = adapt(model)
    ctx = context or Context()
    dev = ctx.group.device if ctx.group is not None else resolve_device(device)
    cs = _as_set(data, "in") if data is not None else _default_conditions(adapter, starts or 16, seed)
    _check_shape(adapter, cs, "--data")
    cs = cs.finite()  # a NaN condition has no worst case to search for
    cs = _first(cs, starts)
    run = Run(Sampling(samples, temperature, seed), batch_size, dev, progress, exact)
    memory = ctx.budget(dev)  # a bad --max-memory is refused before any shard
    if not ctx.opened:  # the work folder checks everything the shards depend on before the first one
        ctx.open(
            {
                "kind": "attack",
                "fingerprint": adapter.fingerprint(),
                "data": [digest(cs.y)],
                "samples": samples,
                "temperature": temperature,
                "seed": seed,
                "exact": exact,
                "device": dev.type,
                **attack_settings(how, len(cs.y), run),
            }
        )
    with auditing(adapter, dev):
        hit = _attack_set(adapter, cs, None, how, run, ctx)
    return Report(
        {
            "flowaudit_version": __version__,
            "kind": "attack",
            **_stamp(),
            "settings": {
                "samples": samples,
                "temperature": temperature,
                "seed": seed,
                "device": str(dev),
                "exact": exact,
                **run_facts(run, memory, ctx),
            },
            "model": _model_entry(adapter),
            "data": {"in": cs.description},
            "attack": hit.entry,
        },
        files=hit.files,
    )


def _search(budget: str | Budget, objective: str, steps: int, step_size: float | None, rule: str = "adam") -> Search:
    try:
        b = budget if isinstance(budget, Budget) else parse_budget(budget)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    return Search(b, objective=objective, steps=steps, step_size=step_size, rule=rule)


def _first(cs: ConditionSet, starts: int | None) -> ConditionSet:
    """The first ``starts`` conditions of ``cs`` (all with ``None``)."""
    n = len(cs.y) if starts is None else min(starts, len(cs.y))
    return ConditionSet(y=cs.y[:n], x=None, ids=cs.ids[:n], description=cs.description)


def _attack_set(
    adapter: Adapter,
    cs: ConditionSet,
    starts: int | None,
    how: Search,
    run: Run,
    ctx: Context | None = None,
    fallback: bool = False,
):
    """Attack the first ``starts`` conditions in shards (``ctx``'s work folder and ranks; ``run``: sampling,
    samples per pass, exact passes); with ``fallback`` (scan --attack), an adapter that passes
    detached gains is attacked on ``max-abs`` instead (shards keyed apart), and the entry says why."""
    sub = _first(cs, starts)
    ctx = ctx or Context()
    kw = dict(
        batch_size=run.batch_size,
        device=run.device,
        progress=run.progress,
        exact=run.exact,
        work=ctx.work,
        group=ctx.group,
    )
    try:
        return run_attack(adapter, sub, how, run.sampling, key="attack", **kw)
    except DetachedGains as exc:
        if not fallback or how.objective == "max-abs":
            raise
        hit = run_attack(
            adapter, sub, dataclasses.replace(how, objective="max-abs"), run.sampling, key="attack-max-abs", **kw
        )
        hit.entry["fallback"] = f"{how.objective} → max-abs: {exc}"
        return hit


# -- pieces of the report -----------------------------------------------------------------------


def _stamp() -> dict:
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _model_entry(adapter: Adapter) -> dict:
    return {
        "name": adapter.name,
        "adapter": adapter.family,
        "task": adapter.task,
        "n_parameters": adapter.n_parameters(),
        "fingerprint": adapter.fingerprint(),
        "condition_shape": list(adapter.condition_shape),
        "output_range": list(adapter.output_range),
        "error_band": list(adapter.error_band),
        "encoder_layers": adapter.feature_layers() or ["<condition>"],
        **adapter.describe(),
    }


def _ood_entry(gauss: GaussianOOD | None, names: list[str], pooling: str, scores: dict[str, np.ndarray]) -> dict | None:
    if gauss is None:
        return None
    entry = {
        "layers": names or ["<condition>"],
        "pooling": pooling,
        "dim": int(gauss.n_features_in_),
        "estimator": gauss.estimator,
        "n_fit": int(gauss.n_),
        "n_fit_nonfinite": int(gauss.n_nonfinite_),
        "s_ood": {k: [None if not np.isfinite(v) else float(v) for v in s] for k, s in scores.items()},
        "mean": {k: float(np.mean(s[np.isfinite(s)])) if np.isfinite(s).any() else None for k, s in scores.items()},
        "n_nonfinite": {k: int((~np.isfinite(s)).sum()) for k, s in scores.items()},
    }
    if "ood" in scores:
        from sklearn.metrics import roc_auc_score

        a, b = scores["in"], scores["ood"]
        lab = np.r_[np.zeros(len(a)), np.ones(len(b))]
        sc = np.nan_to_num(np.r_[a, b], nan=np.inf, posinf=1e300)
        entry["auroc_in_vs_ood"] = float(roc_auc_score(lab, sc))
    return entry


# -- inputs -------------------------------------------------------------------------------------


def _as_set(data: Any, what: str) -> ConditionSet:
    if isinstance(data, ConditionSet):
        return data
    if isinstance(data, (str, Path)):
        return load_conditions(data)
    y = torch.as_tensor(data, dtype=torch.float32)
    return ConditionSet(
        y=y,
        x=None,
        ids=[f"{what}{i}" for i in range(len(y))],
        description={"kind": "tensor", "n": len(y), "shape": list(y.shape[1:])},
    )


def _check_shape(adapter: Adapter, cs: ConditionSet, what: str) -> None:
    """The adapter says, before any sampling, whether it can take conditions of this shape."""
    try:
        adapter.check_condition_shape(tuple(cs.y.shape[1:]))
    except ValueError as exc:
        where = f"{what} {cs.description['path']}" if cs.description.get("path") else what
        raise AuditError(f"{where}: {exc}") from None


def _layers(adapter: Adapter, layers: Sequence[str] | None) -> list[str]:
    return list(adapter.feature_layers() if layers is None else layers)


def _default_conditions(adapter: Adapter, n: int, seed: int) -> ConditionSet:
    """Conditions drawn for the model's condition shape when no data is given (images: uniform in the output range)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(adapter.condition_shape)
    lo, hi = adapter.output_range
    if len(shape) == 3:
        y = torch.rand((n, *shape), generator=g) * (hi - lo) + lo
    else:
        y = torch.randn((n, *shape), generator=g)
    return ConditionSet(
        y=y, x=None, ids=[f"drawn{i}" for i in range(n)], description={"kind": "drawn", "n": n, "shape": list(shape)}
    )


def _zero(adapter: Adapter) -> Tensor:
    return torch.zeros((1, *adapter.condition_shape))


def _stats_digest(gauss: GaussianOOD | None) -> str | None:
    return None if gauss is None else digest(np.concatenate([gauss.location_, gauss.cholesky_.ravel()]))


def _load_stats(adapter: Adapter, stats: Any, names: list[str], pooling: str) -> GaussianOOD:
    if isinstance(stats, GaussianOOD):
        return stats
    try:
        gauss = GaussianOOD.load(stats)
    except (OSError, ValueError) as exc:
        raise AuditError(str(exc) if str(stats) in str(exc) else f"{stats}: cannot read stats ({exc})") from None
    meta = gauss.metadata_
    fp = adapter.fingerprint()
    if meta.get("fingerprint") != fp:
        raise AuditError(
            f"{stats} was fitted on weights {meta.get('fingerprint')}, this model's are {fp}: refit with `flowaudit fit`"
        )
    if list(meta.get("layers", [])) != (names or ["<condition>"]) or meta.get("pooling") != pooling:
        raise AuditError(
            f"{stats} was fitted on layers {meta.get('layers')} ({meta.get('pooling')}), the scan uses {names or ['<condition>']} ({pooling})"
        )
    return gauss
