"""The audit's entry points: :func:`fit`, :func:`scan`, :func:`inspect` and :func:`attack`.

Each takes a model (anything :func:`flowaudit.adapt` accepts) and the run's
:class:`~flowaudit.config.settings.Settings` (or its fields as keywords) and returns a
:class:`~flowaudit.report.Report`; this module only orchestrates the subpackages.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._version import __version__
from .adapters import Adapter, adapt, small_flow
from .config.budget import Budget
from .config.device import auditing
from .config.sampling import Phase
from .config.settings import Search, Settings, settings_from
from .config.threads import using_threads
from .errors import AuditError, DataError
from .evidence.attack import AttackResult, run_attack
from .evidence.search import DetachedGains
from .evidence.sites import model_evidence, site_entries
from .io.datasets import ConditionSet, load_conditions, nonfinite_records
from .io.shapes import check_condition_shapes
from .render.panel import worst_inputs
from .report import Report
from .runs.passes import Keeper, sample_range, sample_set
from .runs.quick import SKIPPED, quick_answer
from .runs.runner import Context, attack_settings, fit_gaussian, run_facts, scan_sets, scan_settings, size_batches
from .runs.shards import FIT_SHARD_INPUTS, digest
from .stats.features import fit_spatial
from .stats.risk import aggregate, band_misfit, error_band
from .tracing.trace import layer_table
from .utils.format import jsonable

if TYPE_CHECKING:  # scikit-learn is imported when a Gaussian is fitted or read, not by inspect
    from .stats.gaussian import GaussianOOD

__all__ = ["Settings", "fit", "scan", "quick", "inspect", "attack"]

FIT_BATCH = 256  # inputs per encoder pass of fit
INSPECT_BATCH = 500  # samples per inverse pass of inspect's probe
ATTACK_BATCH = 64  # samples per pass of attack --batched (the pass keeps its graph)
SMALL_FLOW_PASS = 1024  # inputs a pass of a small flow (flowaudit.adapters.small_flow)
#: inputs a shard of a small flow: 16 passes, under a second of work on a 2-D flow, so a resume loses little, while
#: its tracer's reservoirs take the passes' rows one by one instead of merging a shard's kept rows per pass
SMALL_FLOW_SHARD = 16 * SMALL_FLOW_PASS
SCAN_ATTACK_BATCH = 64  # samples per pass of scan --attack with --batched


def fit(
    model: Any,
    data: Any,
    settings: Settings | None = None,
    *,
    out: str | Path | None = None,
    context: Context | None = None,
    **options: Any,
) -> Report:
    """Fit the encoder-feature Gaussian on ``data``; write ``out`` (stats.h5) when given.

    Reads ``layers``, ``pooling``, ``estimator``, ``batch_size`` (default 256), ``device`` and ``progress``
    of ``settings`` (or of these keywords). The report's ``gaussian`` is the fitted :class:`GaussianOOD`;
    ``context`` keeps completed shards in a work folder (resume) and shares them over ranks.
    """
    ctx = context or Context()
    settings = ctx.place(settings_from(settings, options, batch_size=FIT_BATCH))
    if settings.batch_size is None:
        settings = settings.replace(batch_size=FIT_BATCH)
    adapter = adapt(model)
    cs = _as_set(data, "fit", ctx)
    _check_shape(adapter, cs, "--data", settings.threads)
    if cs.mixed:  # images of several sizes: one per pass
        settings = settings.replace(batch_size=1)
    n_bad, cs = cs.n_nonfinite, cs.finite()  # NaN/Inf conditions never reach the Gaussian; counted below
    names = _layers(adapter, settings.layers)
    if settings.pooling == "spatial":
        raise AuditError("spatial pooling scores locations, fit the per-input Gaussian with avg or avgstd")
    if ctx.work is None and not ctx.opened:
        ctx.open(
            {
                "kind": "fit",
                "fingerprint": adapter.fingerprint(),
                "data": digest(cs.y),
                "layers": names,
                "pooling": settings.pooling,
                "estimator": settings.estimator,
                "fit_shard_inputs": FIT_SHARD_INPUTS,
                "device": settings.device.type,
            }
        )
    with auditing(adapter, settings.device, settings.threads):
        gauss = fit_gaussian(adapter, cs, names, settings, ctx)
    gauss.n_nonfinite_ += n_bad  # rows skipped for a non-finite value: the conditions' and the features'
    entry = _model_entry(adapter)  # hashes the weights once for the report and the stats file
    meta = {
        "model": adapter.name,
        "adapter": adapter.family,
        "fingerprint": entry["fingerprint"],
        "layers": names or ["<condition>"],
        "pooling": settings.pooling,
        "data": json.dumps(jsonable(cs.description)),
    }
    if out is not None:
        gauss.save(out, **meta)
    ood = {
        **meta,
        "dim": int(gauss.n_features_in_),
        "n_inputs": int(gauss.n_),
        "n_nonfinite": int(gauss.n_nonfinite_),
        "estimator": settings.estimator,
        "shrinkage": float(gauss.shrinkage_),
        "out": str(out) if out else None,
    }
    body = {"flowaudit_version": __version__, "kind": "fit", **_stamp(), "model": entry, "ood": ood}
    return Report(body, gaussian=gauss)


def scan(
    model: Any,
    data: Any = None,
    settings: Settings | None = None,
    *,
    ood: Any = None,
    stats: Any = None,
    fit_data: Any = None,
    context: Context | None = None,
    output_range: tuple[float, float] | None = None,
    **options: Any,
) -> Report:
    """The full audit of ``model`` on conditions ``data`` (and ``ood``); keys in ``docs/report.md``.

    ``stats`` (a stats.h5 path or fitted :class:`GaussianOOD`) or ``fit_data`` gives ``s_OOD``; with
    neither, inputs carry no score. ``settings`` (or its fields as keywords: ``samples``, ``temperature``,
    ``seed``, ``batch_size``, ``device``, ``layers``, …; ``attack`` a budget with ``attack_starts`` and
    ``attack_steps``) say what to compute; ``context`` keeps shards for a resume and shares them over ranks.
    ``output_range`` sets the error band (:func:`~flowaudit.stats.risk.error_band`); ids read ``in/…``, ``ood/…``.
    ``exact=None`` (the default) makes each pass one input's K samples, except for a small flow, whose passes
    hold :data:`SMALL_FLOW_PASS` inputs and shards :data:`SMALL_FLOW_SHARD` whatever ``batch_size``: the same
    figures to float32 rounding, bit for bit where its kernels are batch-invariant.
    """
    ctx = context or Context()
    settings = ctx.place(settings_from(settings, options))
    adapter = adapt(model)
    names = _layers(adapter, settings.layers)
    sets, skipped = _scan_inputs(adapter, data, ood, settings.seed, settings.threads, ctx)
    settings, small = _scan_passes(adapter, settings, sets)
    fit_set = _as_set(fit_data, "fit", ctx) if fit_data is not None else None
    gauss = _load_stats(adapter, stats, names, settings.pooling) if stats is not None else None
    with auditing(adapter, settings.device, settings.threads):
        run, memory = size_batches(adapter, sets[0][1], settings, ctx)
    targets = sets[0][1].x if sets[0][1].x is not None else (fit_set.finite().x if fit_set is not None else None)
    band = error_band(adapter, output_range, targets)
    run = run.replace(band=band.bounds)
    attack_run = run.replace(batch_size=SCAN_ATTACK_BATCH, exact=run.exact or small)  # keeps its graph
    if not ctx.opened:  # the work folder checks everything the shards depend on before the first one
        ctx.open(_scan_work_settings(adapter, sets, run, attack_run, names, gauss, fit_set, band))
    spatial = None
    if fit_set is not None:
        gauss = fit(adapter, fit_set, run.replace(batch_size=FIT_BATCH), context=ctx).gaussian
        if names and len(adapter.condition_shape) == 3:
            batch = 1 if fit_set.mixed else run.batch_size
            spatial = fit_spatial(adapter, fit_set.finite().y, names, run.estimator, batch, run.device, run.threads)
    keep = Keeper() if len(adapter.condition_shape) == 3 else None  # the panel's samples, kept while sampling
    with auditing(adapter, run.device, run.threads):
        tracers, records, scores = scan_sets(adapter, sets, gauss, names, run, ctx, keep)
        hit = None
        if run.attack is not None:
            hit = _attack_set(adapter, sets[0][1], run.attack_starts, attack_run, ctx, fallback=True)
        worst = {"worst_case": hit.worst_case} if hit else {}
        with Phase(len(adapter.sites()), "probe", run.progress, unit="site") as probe:
            sites = site_entries(adapter, tracers, run.remark2_threshold, tick=lambda: probe.advance("sites"), **worst)
    risk = _risk(records, sets, run)
    risk["error_band"] = band.entry()
    risk["error_band"]["misfit"] = band_misfit(risk["error_band"], risk["by_set"]["in"]["pct_pixel_err"])
    model_entry = _model_entry(adapter, sites)
    model_entry["error_band"] = list(band.bounds)
    report = Report(
        {
            "flowaudit_version": __version__,
            "kind": "scan",
            **_stamp(),
            "settings": {**_sampling_entry(run), **_thresholds(run), **run_facts(run, memory, ctx)},
            "data": {name: cs.description for name, cs in sets},
            "model": model_entry,
            "ood": _ood_entry(gauss, names, run.pooling, scores),
            "risk": risk,
            **_layer_entries(adapter, tracers, run.explosion_threshold),
            "inputs": records + skipped,
        }
    )
    if hit is not None:
        report.data["attack"], report.files = hit.entry, hit.files
    if len(adapter.condition_shape) == 3:
        report.panel = worst_inputs(adapter, sets, records, spatial, names, run, kept=keep)
    return report


def quick(
    model: Any,
    data: Any = None,
    settings: Settings | None = None,
    *,
    ood: Any = None,
    output_range: tuple[float, float] | None = None,
    max_memory: int | str | None = None,
    **options: Any,
) -> dict:
    """The quick answer (:mod:`~flowaudit.runs.quick`): %Inf, %PixelErr and the inverse-gain range per set.

    Takes the scan's data, sampling keywords and error band; passes hold several inputs (batch size from
    ``batch_size`` or the memory budget ``max_memory``, bytes or a size like ``"2GB"``, the data read within
    it too). Returns a plain dict (not a report) that lists what it skipped.
    """
    ctx = Context(max_memory=max_memory)
    settings = settings_from(settings, options)
    adapter = adapt(model)
    sets, skipped = _scan_inputs(adapter, data, ood, settings.seed, settings.threads, ctx)
    with auditing(adapter, settings.device, settings.threads):
        run, _ = size_batches(adapter, sets[0][1], settings.replace(exact=False), ctx)
        band = error_band(adapter, output_range, sets[0][1].x)
        by_set = quick_answer(adapter, sets, run.replace(band=band.bounds))
    return {
        "kind": "quick",
        "flowaudit_version": __version__,
        "model": {"name": adapter.name, "adapter": adapter.family, "fingerprint": adapter.fingerprint()},
        "settings": _sampling_entry(run),
        "error_band": band.entry(),
        "by_set": by_set,
        "n_nonfinite_conditions": len(skipped),
        "skipped": list(SKIPPED),
    }


def _scan_passes(adapter: Adapter, settings: Settings, sets: list) -> tuple[Settings, bool]:
    """The scan's passes settled: one input a pass for mixed image sizes or exact runs, a small flow's passes of
    :data:`SMALL_FLOW_PASS` inputs in shards of :data:`SMALL_FLOW_SHARD` when ``exact`` was left open;
    ``(settings, small)``."""
    if any(cs.mixed for _, cs in sets):  # images of several sizes: one input per pass
        if settings.attack is not None and sets[0][1].mixed:
            raise AuditError("--attack needs in-distribution conditions of one size (this --data mixes image sizes)")
        settings = settings.replace(exact=True)
    small = settings.exact is None and small_flow(adapter, _first_condition(adapter, sets[0][1]))
    if small:  # the same passes on every machine whatever batch_size: the calls cost, not their sums
        batch = SMALL_FLOW_PASS * settings.samples
        shard = settings.shard_inputs or SMALL_FLOW_SHARD
        return settings.replace(exact=False, batch_size=batch, shard_inputs=shard), True
    return settings.replace(exact=settings.exact_passes), False


def _scan_work_settings(adapter, sets, run, attack_run, names, gauss, fit_set, band) -> dict:
    """Everything a scan's shards depend on, checked by the work folder before the first one (``--resume``)."""
    more = {}
    if run.attack is not None:
        starts = len(_first(sets[0][1], run.attack_starts).y)
        more["attack"] = attack_settings(run.attack, starts, attack_run)
    fitted = digest(fit_set.y) if fit_set is not None else None
    return scan_settings(
        adapter,
        sets,
        run,
        layers=names,
        pooling=run.pooling,
        estimator=run.estimator,
        stats=_stats_digest(gauss),
        fit_data=fitted,
        error_band=list(band.bounds),
        **more,
    )


def inspect(model: Any, data: Any = None, settings: Settings | None = None, **options: Any) -> Report:
    """Sites, kinds and Remark 2 verdicts; probes under ``data`` or under conditions drawn for the model.

    Reads ``samples`` (default 4), ``temperature``, ``seed``, ``device``, ``remark2_threshold`` and
    ``batch_size`` (default 500) of ``settings`` (or of these keywords); the probe favours speed over
    batch-invariance (no exact passes).
    """
    settings = settings_from(settings, options, samples=4, batch_size=INSPECT_BATCH)
    probe = settings.replace(batch_size=settings.batch_size or INSPECT_BATCH, exact=False, progress=False)
    adapter = adapt(model)
    cs = _as_set(data, "in") if data is not None else _probe_conditions(adapter, probe.seed)
    _check_shape(adapter, cs, "--data", settings.threads)
    cs = _first(cs.finite(), 256)
    with auditing(adapter, probe.device, probe.threads):
        # a few passes: read by tensor operations, without loading the tracer's compiled loops (time and memory)
        rows = slice(0, len(cs.y))
        tracer, _ = sample_range(adapter, cs, 0, "in", np.full(len(cs.y), np.nan), probe, rows, compiled=False)
        sites = site_entries(adapter, [tracer], probe.remark2_threshold)
    body = {"flowaudit_version": __version__, "kind": "inspect", **_stamp(), "model": _model_entry(adapter, sites)}
    return Report({**body, "data": {"in": cs.description}})


def attack(
    model: Any, data: Any = None, settings: Settings | None = None, *, context: Context | None = None, **options: Any
) -> Report:
    """The worst case: projected gradient ascent on the first ``attack_starts`` conditions.

    The attack's keywords are ``budget`` (default ``none``), ``objective``, ``steps``, ``step_size``, ``rule``
    and ``starts``, beside the sampling ones (``samples`` default 4, ``batch_size`` default 64: samples per
    pass with its graph when not ``exact``). See :mod:`flowaudit.evidence.search` and
    :mod:`flowaudit.evidence.attack`; ``report.files`` holds the worst conditions and samples.
    """
    ctx = context or Context()
    settings = ctx.place(settings_from(settings, options, samples=4, batch_size=ATTACK_BATCH, attack="none"))
    if settings.attack is None or settings.batch_size is None:
        attack = settings.attack or Search(Budget("none"))
        settings = settings.replace(attack=attack, batch_size=settings.batch_size or ATTACK_BATCH)
    adapter = adapt(model)
    starts = settings.attack_starts
    cs = _as_set(data, "in", ctx) if data is not None else _default_conditions(adapter, starts or 16, settings.seed)
    _check_shape(adapter, cs, "--data", settings.threads)
    if cs.mixed:
        raise AuditError("the attack needs conditions of one size (this --data mixes image sizes)")
    cs = _first(cs.finite(), starts)  # a NaN condition has no worst case to search for
    with auditing(adapter, settings.device, settings.threads):  # a --max-memory too small is refused before any shard
        _, memory = size_batches(adapter, cs, settings, ctx)
    if not ctx.opened:  # the work folder checks everything the shards depend on before the first one
        found = attack_settings(settings.attack, len(cs.y), settings)
        sampling = _sampling_entry(settings)
        sampling.pop("device")
        head = {"kind": "attack", "fingerprint": adapter.fingerprint(), "data": [digest(cs.y)], **sampling}
        ctx.open({**head, "device": settings.device.type, **found})
    with auditing(adapter, settings.device, settings.threads):
        hit = _attack_set(adapter, cs, None, settings, ctx)
        # the sites' evidence and the certificate, as scan gives them: the attacked conditions sampled once
        probe = settings.replace(batch_size=INSPECT_BATCH, exact=False, progress=False)
        tracer, _ = sample_set(adapter, cs, 0, "in", np.full(len(cs.y), np.nan), probe)
        sites = site_entries(adapter, [tracer], settings.remark2_threshold, worst_case=hit.worst_case)
    return Report(
        {
            "flowaudit_version": __version__,
            "kind": "attack",
            **_stamp(),
            "settings": {**_sampling_entry(settings), **run_facts(settings, memory, ctx)},
            "model": _model_entry(adapter, sites),
            "data": {"in": cs.description},
            "attack": hit.entry,
        },
        files=hit.files,
    )


def _first(cs: ConditionSet, starts: int | None) -> ConditionSet:
    """The first ``starts`` conditions of ``cs`` (all with ``None``)."""
    n = len(cs.y) if starts is None else min(starts, len(cs.y))
    return ConditionSet(y=cs.y[:n], x=None, ids=cs.ids[:n], description=cs.description)


def _attack_set(
    adapter: Adapter,
    cs: ConditionSet,
    starts: int | None,
    run: Settings,
    ctx: Context,
    fallback: bool = False,
) -> AttackResult:
    """Attack the first ``starts`` conditions with ``run.attack``, in shards kept in ``ctx``.

    With ``fallback`` (scan --attack), an adapter that passes detached gains is attacked on ``max-abs``
    instead (shards keyed apart), and the entry says why.
    """
    sub, how = _first(cs, starts), run.attack
    kw = dict(batch_size=run.batch_size, device=run.device, progress=run.progress, exact=run.exact_passes)
    kw.update(work=ctx.work, group=ctx.group)
    try:
        return run_attack(adapter, sub, how, run.sampling, key="attack", **kw)
    except DetachedGains as exc:
        if not fallback or how.objective == "max-abs":
            raise
        plain = dataclasses.replace(how, objective="max-abs")
        hit = run_attack(adapter, sub, plain, run.sampling, key="attack-max-abs", **kw)
        hit.entry["fallback"] = f"{how.objective} → max-abs: {exc}"
        return hit


# -- pieces of the report -----------------------------------------------------------------------


def _stamp() -> dict:
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _model_entry(adapter: Adapter, sites: list[dict] | None = None) -> dict:
    """The report's ``model``; with ``sites``, their entries, coverage, the model's verdict and certificate."""
    entry = {
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
        **({"weights": adapter.weights_source} if getattr(adapter, "weights_source", None) else {}),
    }
    if sites is not None:
        entry["sites"] = sites
        entry.update(model_evidence(adapter, sites))
    return entry


def _sampling_entry(settings: Settings) -> dict:
    """The sampling part of a report's ``settings``."""
    return {
        "samples": settings.samples,
        "temperature": settings.temperature,
        "seed": settings.seed,
        "device": str(settings.device),
        "exact": settings.exact_passes,
        "passes": {"inputs_per_pass": settings.inputs_per_pass, "small_flow": settings.shard_inputs is not None},
    }


def _thresholds(settings: Settings) -> dict:
    return {
        "remark2_threshold": settings.remark2_threshold,
        "explosion_threshold": settings.explosion_threshold,
    }


def _risk(records: list[dict], sets: Sequence[tuple[str, ConditionSet]], settings: Settings) -> dict:
    """The report's ``risk``: over all inputs, and ``by_set`` (without the ranking). A set that holds every input
    (a scan without OOD data) has the overall figures: they are not worked out twice."""
    k, tau = settings.samples, settings.temperature
    risk = aggregate(records, k, tau)
    risk["by_set"] = {}
    for name, _ in sets:
        rows = [r for r in records if r["set"] == name]
        if len(rows) == len(records):
            same = {key: v for key, v in risk.items() if key not in ("ranked", "by_set")}
            risk["by_set"][name] = {key: dict(v) if isinstance(v, dict) else v for key, v in same.items()}
        else:  # on copies: each record's ``risk`` is the overall fit's
            risk["by_set"][name] = aggregate([dict(r) for r in rows], k, tau, ranked=False)
    return risk


def _layer_entries(adapter: Adapter, tracers: list, explosion_threshold: float) -> dict:
    """The report's ``layers`` (the layer trace) and ``explosion_layer``."""
    layers, explosion = layer_table(adapter.layer_names() + ["output"], tracers, explosion_threshold)
    return {"layers": layers, "explosion_layer": explosion}


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


def _scan_inputs(
    adapter: Adapter, data: Any, ood: Any, seed: int, threads: int | None, ctx: Context | None = None
) -> tuple[list[tuple[str, ConditionSet]], list[dict]]:
    """The scan's finite condition sets (``in``, ``ood``) and the records of the non-finite ones (not sampled)."""
    sets = [("in", _as_set(data, "in", ctx) if data is not None else _default_conditions(adapter, 64, seed))]
    if ood is not None:
        sets.append(("ood", _as_set(ood, "ood", ctx)))
    for name, cs in sets:
        _check_shape(adapter, cs, "--data" if name == "in" else "--ood-data", threads)
    sets = [(name, cs.prefixed(name)) for name, cs in sets]  # ids unique across the report's sets
    skipped = [rec for name, cs in sets for rec in nonfinite_records(cs, name)]
    return [(name, cs.finite()) for name, cs in sets], skipped


def _as_set(data: Any, what: str, ctx: Context | None = None) -> ConditionSet:
    """``data`` as a condition set; a path is read within ``--max-memory`` (without it, half the free RAM)."""
    if isinstance(data, ConditionSet):
        return data
    if isinstance(data, (str, Path)):
        limit = None if ctx is None or ctx.max_memory is None else ctx.budget(torch.device("cpu"))
        return load_conditions(data, max_bytes=limit)
    y = torch.as_tensor(data, dtype=torch.float32)
    return ConditionSet(
        y=y,
        x=None,
        ids=[f"row{i}" for i in range(len(y))],
        description={"kind": "tensor", "n": len(y), "shape": list(y.shape[1:])},
    )


def _check_shape(adapter: Adapter, cs: ConditionSet, what: str, threads: int | None) -> None:
    """Before any sampling: whether the model can take conditions of these shapes (one line, the expected one);
    a trial pass runs on the run's ``threads``."""
    try:
        with using_threads(threads):
            check_condition_shapes(adapter, cs, what)
    except DataError as exc:
        raise AuditError(str(exc)) from None


def _layers(adapter: Adapter, layers: Sequence[str] | None) -> list[str]:
    return list(adapter.feature_layers() if layers is None else layers)


def _probe_conditions(adapter: Adapter, seed: int) -> ConditionSet:
    """Inspect's conditions when no data is given: 64 vectors, or 8 images of the adapter's
    :attr:`~flowaudit.adapters.Adapter.probe_shape` (each pixel is a visited point, so a few small images
    visit more points than the vectors, at a cost that does not grow with the model's training size)."""
    shape = tuple(adapter.probe_shape)
    return _default_conditions(adapter, 8 if len(shape) == 3 else 64, seed, shape)


def _default_conditions(adapter: Adapter, n: int, seed: int, shape: tuple[int, ...] | None = None) -> ConditionSet:
    """``n`` conditions drawn for ``shape`` (default: the model's condition shape) when no data is given
    (images: uniform in the output range)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(adapter.condition_shape) if shape is None else shape
    lo, hi = adapter.output_range
    if len(shape) == 3:
        y = torch.rand((n, *shape), generator=g) * (hi - lo) + lo
    else:
        y = torch.randn((n, *shape), generator=g)
    return ConditionSet(
        y=y, x=None, ids=[f"drawn{i}" for i in range(n)], description={"kind": "drawn", "n": n, "shape": list(shape)}
    )


def _first_condition(adapter: Adapter, cs: ConditionSet) -> torch.Tensor:
    """One condition of ``cs`` (a zero one when it is empty), to size a sample."""
    return cs.y[:1] if len(cs.y) else torch.zeros((1, *adapter.condition_shape))


def _stats_digest(gauss: GaussianOOD | None) -> str | None:
    return None if gauss is None else digest(np.concatenate([gauss.location_, gauss.cholesky_.ravel()]))


def _load_stats(adapter: Adapter, stats: Any, names: list[str], pooling: str) -> GaussianOOD:
    from .stats.gaussian import GaussianOOD

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
            f"{stats} was fitted on weights {meta.get('fingerprint')}, this model's are {fp}: "
            "refit with `flowaudit fit`"
        )
    if list(meta.get("layers", [])) != (names or ["<condition>"]) or meta.get("pooling") != pooling:
        raise AuditError(
            f"{stats} was fitted on layers {meta.get('layers')} ({meta.get('pooling')}), "
            f"the scan uses {names or ['<condition>']} ({pooling})"
        )
    return gauss
