r"""The run engine of ``fit``, ``scan`` and ``attack``: shards, resume, ranks and the memory budget.

:func:`fit_gaussian` and :func:`scan_sets` cut every input set into shards
(:mod:`.shards`), compute each shard's payload — a ``fit`` shard's Gaussian
sums, a ``scan`` shard's per-input records, scores and
:class:`~flowaudit.tracing.trace.Tracer` state — and merge the payloads in shard order,
whether they were just computed, loaded from the work folder of an interrupted
run, or computed by another rank (:mod:`.distributed`). Every float64 sum is
therefore formed in one fixed order, and a run gives the same figures for any
batch size, thread count, resume or number of ranks (the model's own float32
arithmetic is made batch-independent by exact passes,
:attr:`~flowaudit.config.settings.Settings.exact`).

An attack (:func:`~flowaudit.evidence.attack.run_attack`) runs on the same engine: shards of
starts (:data:`~flowaudit.runs.shards.ATTACK_SHARD_STARTS`), exact passes by default, the work
folder's settings from :func:`attack_settings`.

What a run computes comes in its :class:`~flowaudit.config.settings.Settings`; a :class:`Context`
carries where it runs: the work folder, process group and memory budget. :data:`RUN_FACTS` names
the ``settings`` entries of a report that describe the machine rather than the result (they differ
between equal runs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..adapters import Adapter
from ..config.sampling import Phase
from ..config.settings import Search, Settings
from ..errors import AuditError
from ..io.datasets import ConditionSet
from ..stats.features import EXACT_PASS_INPUTS, features
from ..tracing.trace import Tracer
from .memory import batch_for, default_budget, parse_size, peak_rss, probe_pass, release
from .passes import Keeper, sample_range
from .shards import (
    ATTACK_SHARD_STARTS,
    FIT_SHARD_INPUTS,
    SHARD_INPUTS,
    WorkFolder,
    digest,
    gaussian_from_state,
    gaussian_state,
    run_folded,
    shard_slices,
)

if TYPE_CHECKING:  # scikit-learn is imported when a Gaussian is fitted or read, not by inspect
    from ..stats.gaussian import GaussianOOD

__all__ = [
    "Context",
    "RUN_FACTS",
    "fit_gaussian",
    "scan_sets",
    "scan_settings",
    "attack_settings",
    "size_batches",
    "run_facts",
]

# settings entries that describe the machine or the course of the run, not its result
RUN_FACTS = ("batch_size", "max_memory_bytes", "peak_rss_bytes", "peak_gpu_bytes", "ranks", "resumed_shards")


@dataclass
class Context:
    """Where a run keeps its shards, which ranks share it, and its memory budget.

    Args:
        work_dir: the work folder (``None``: shards are merged in memory only, nothing to resume).
        resume: continue the run ``work_dir`` holds (its settings must match).
        group: the :class:`~flowaudit.runs.distributed.Group` of a ``torchrun`` (``None``: one process).
        max_memory: budget in bytes or a size like ``"2GB"`` (``None``: :func:`~flowaudit.runs.memory.default_budget`).
    """

    work_dir: str | Path | None = None
    resume: bool = False
    group: Any = None
    max_memory: int | str | None = None
    work: WorkFolder | None = field(default=None, init=False)
    opened: bool = field(default=False, init=False)

    def open(self, settings: dict) -> Context:
        """Open (or check, on resume) the work folder for a run computing ``settings``."""
        if self.work_dir is not None:
            self.work = WorkFolder(self.work_dir, settings, self.resume)
        elif self.resume:
            raise AuditError("resume needs the work folder of the interrupted run")
        if self.group is not None:
            self.group.barrier()  # every rank has checked the folder before any shard lands in it
        self.opened = True
        return self

    def place(self, settings: Settings) -> Settings:
        """``settings`` on this rank's device (a process group decides it)."""
        return settings if self.group is None else settings.replace(device=self.group.device)

    def budget(self, device: torch.device) -> int:
        """The memory budget in bytes (``--max-memory``, or the default for ``device``)."""
        try:
            return default_budget(device) if self.max_memory is None else parse_size(self.max_memory)
        except ValueError as exc:
            raise AuditError(f"--max-memory: {exc}") from None


def fit_gaussian(
    adapter: Adapter,
    cs: ConditionSet,
    names: list[str],
    settings: Settings,
    ctx: Context,
    key: str = "fit",
) -> GaussianOOD:
    """The feature Gaussian of ``cs``: per-shard sums (:meth:`GaussianOOD.partial_fit`) merged in shard order."""
    from ..stats.gaussian import GaussianOOD

    estimator, device = settings.estimator, settings.device
    slices = shard_slices(len(cs.y), FIT_SHARD_INPUTS)
    phase = Phase(len(cs.y), "fit", settings.progress)
    # exact: fixed encoder passes from each shard's start, features independent of --batch-size and ranks
    per_pass = EXACT_PASS_INPUTS if settings.exact_passes and not cs.mixed else settings.batch_size

    def shard(sl: slice) -> dict:
        v = features(adapter, cs.y[sl], names, settings.pooling, per_pass, device, False)
        return {"keep": None, "state": gaussian_state(GaussianOOD(estimator=estimator).partial_fit(v))}

    def fold(g: GaussianOOD, state: dict) -> GaussianOOD:
        part = gaussian_from_state(state, estimator)
        return g.merge(part) if hasattr(part, "n_") else g

    jobs = [(f"{key}-{k:05d}", functools.partial(shard, sl)) for k, sl in enumerate(slices)]
    with phase:
        gauss, _ = run_folded(
            jobs,
            fold,
            GaussianOOD(estimator=estimator, device=device),
            gaussian_state,
            lambda st: gaussian_from_state(st, estimator, device),
            ctx.work,
            ctx.group,
            name=key,
            done=lambda j: phase.settle(j, slices[j].stop - slices[j].start),
        )
        phase.finish()
    try:
        return gauss.finalize()
    except ValueError as exc:
        raise AuditError(str(exc)) from None


def scan_sets(
    adapter: Adapter,
    sets: Sequence[tuple[str, ConditionSet]],
    gauss: GaussianOOD | None,
    names: list[str],
    run: Settings,
    ctx: Context,
    keep: Keeper | None = None,
) -> tuple[list[Tracer], list[dict], dict[str, np.ndarray]]:
    """Sample every set shard by shard; ``(tracers, records, scores)`` with shards merged in order.

    ``keep`` retains the riskiest inputs' first samples of the shards sampled here (not of resumed shards
    or other ranks')."""
    feature_batch = 1 if run.exact_passes else run.inputs_per_batch  # the encoder too: one input per pass when exact

    def shard(index: int, name: str, cs: ConditionSet, sl: slice) -> dict:
        if gauss is not None:
            s = gauss.score(features(adapter, cs.y[sl], names, run.pooling, feature_batch, run.device))
        else:
            s = np.full(sl.stop - sl.start, np.nan)
        part = (name, sl.start)
        tracer, records = sample_range(adapter, cs, index, name, s, run, sl, phase=phase, part=part, keep=keep)
        payload = {
            "keep": {"records": records, "s_ood": torch.from_numpy(np.asarray(s, dtype=np.float64))},
            "state": tracer.state(),
        }
        del tracer
        release()
        return payload

    def fold(total: Tracer, state: dict) -> Tracer:
        return total.merge(Tracer.from_state(run.sampling, state, run.device))

    tracers, records, scores = [], [], {}
    phase = Phase(sum(len(cs.y) for _, cs in sets), "sample", run.progress)  # one bar: every set, every shard
    with phase:
        for index, (name, cs) in enumerate(sets):
            slices = shard_slices(len(cs.y), run.shard_inputs or SHARD_INPUTS)
            jobs = [(f"{name}-{k:05d}", functools.partial(shard, index, name, cs, sl)) for k, sl in enumerate(slices)]
            total, keeps = run_folded(
                jobs,
                fold,
                Tracer(run.sampling),
                lambda t: t.state(),
                lambda st: Tracer.from_state(run.sampling, st, run.device),
                ctx.work,
                ctx.group,
                name=name,
                done=lambda j, name=name, sl=slices: phase.settle((name, sl[j].start), sl[j].stop - sl[j].start),
            )
            tracers.append(total)
            records += [r for k in keeps for r in k["records"]]
            scores[name] = np.concatenate([k["s_ood"].numpy() for k in keeps]) if keeps else np.zeros(0)
        phase.finish()
    return tracers, records, scores


def size_batches(adapter: Adapter, cs: ConditionSet, run: Settings, ctx: Context) -> tuple[Settings, int]:
    """The settings with a batch size: given, or the largest ``--max-memory`` allows; ``(settings, budget)``."""
    budget = ctx.budget(run.device)
    if run.batch_size is not None or len(cs.y) == 0:
        if ctx.max_memory is not None and len(cs.y):  # a fixed batch still answers to an explicit --max-memory
            per_sample, base = probe_pass(adapter, cs.y, run.sampling, run.device)
            batch_for(budget, base, per_sample, run.sampling.samples, True)
        return run.replace(batch_size=run.batch_size or run.samples), budget
    per_sample, base = probe_pass(adapter, cs.y, run.sampling, run.device, extrapolate=run.exact_passes)
    size = batch_for(budget, base, per_sample, run.sampling.samples, run.exact_passes)
    if ctx.group is not None:  # one batch size for every rank: the same passes as one process
        size = min(ctx.group.all_gather(size))
    return run.replace(batch_size=size), budget


def run_facts(run: Settings, budget: int, ctx: Context) -> dict:
    """The report's :data:`RUN_FACTS` (peak memory read now, at the end of the run)."""
    facts = {
        "batch_size": run.batch_size,
        "max_memory_bytes": int(budget),
        "peak_rss_bytes": peak_rss(),
        "ranks": 1 if ctx.group is None else ctx.group.world,
        "resumed_shards": ctx.work.resumed if ctx.work else 0,
    }
    if run.device.type == "cuda":
        facts["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(run.device))
    return facts


def scan_settings(adapter: Adapter, sets: Sequence[tuple[str, ConditionSet]], run: Settings, **more: Any) -> dict:
    """What a scan's shards depend on: a resumed run must ask for the same."""
    return {
        "kind": "scan",
        "fingerprint": adapter.fingerprint(),
        "shard_inputs": run.shard_inputs or SHARD_INPUTS,
        "fit_shard_inputs": FIT_SHARD_INPUTS,
        "data": {name: [digest(cs.y), digest(cs.x)] for name, cs in sets},
        "samples": run.sampling.samples,
        "temperature": run.sampling.temperature,
        "seed": run.sampling.seed,
        "exact": run.exact_passes,
        "inputs_per_pass": run.inputs_per_pass,
        "device": run.device.type,
        **more,
    }


def attack_settings(how: Search, starts: int, run: Settings) -> dict:
    """What an attack's ``starts`` shards depend on beside the model, the data and the sampling.

    A resumed run must ask for the same.
    """
    return {
        "budget": how.budget.to_dict(),
        "objective": how.objective,
        "steps": how.steps,
        "step_size": how.step_size,
        "rule": how.rule,
        "layer_factor": how.layer_factor,
        "starts": starts,
        "attack_shard_starts": ATTACK_SHARD_STARTS,
        "starts_per_pass": 1 if run.exact_passes else min(run.inputs_per_batch, ATTACK_SHARD_STARTS),
    }
