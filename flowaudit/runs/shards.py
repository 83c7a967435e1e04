r"""Shards of a long run, the work folder that keeps them, and the loop that resumes from it (issue 11).

A run splits each input set into **shards** of a fixed number of inputs
(:data:`SHARD_INPUTS` for a scan, :data:`FIT_SHARD_INPUTS` for a fit,
:data:`ATTACK_SHARD_STARTS` starts for an attack; a setting of the run, never
derived from the batch size or the memory budget). A shard's
result is a small *payload*: its per-input records and the mergeable state of
what it accumulated (a :class:`~flowaudit.tracing.trace.Tracer`'s sums, a
:class:`~flowaudit.stats.gaussian.GaussianOOD`'s sums). Payloads are merged in shard
order, so an uninterrupted run, a resumed one and a distributed one perform the
same float64 additions in the same order:

.. math:: S = (\cdots((S_0 + S_1) + S_2) + \cdots) + S_{m-1} .

The **work folder** ``.<out>.work/`` beside the output holds ``settings.json``
(what the run computes: model fingerprint, data digests, seed, samples, …) and
one ``<job>-<k>.pt`` per completed shard, each written atomically
(:func:`~flowaudit.utils.atomic.atomic_path`), so a SIGKILL loses at
most the shard in flight. :func:`run_shards` yields payloads in order, loading
completed ones and computing (and saving) the rest; with a process group it
spreads the shards over the ranks (:mod:`.distributed`).

Plugging another long loop in (as :func:`~flowaudit.evidence.attack.run_attack` does with its starts)::

    jobs = [(f"attack-{k:05d}", functools.partial(one_shard, sl)) for k, sl in enumerate(shard_slices(n, ATTACK_SHARD_STARTS))]
    for payload in run_shards(jobs, work, group):   # in job order, on every rank
        merge(payload)

An attack shard's payload is its starts' result tensors (CPU) and the layer and site
names; a scan's ``--attack`` keeps its shards (``attack-<k>``) in the scan's work folder.

A payload is anything ``torch.save`` writes and ``torch.load(weights_only=True)``
reads back: dicts, lists, str, int, float, bool, None and CPU tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AuditError
from ..utils.atomic import atomic_path
from ..utils.format import jsonable

__all__ = [
    "SHARD_INPUTS",
    "FIT_SHARD_INPUTS",
    "ATTACK_SHARD_STARTS",
    "WorkFolder",
    "work_path",
    "shard_slices",
    "run_shards",
    "run_folded",
    "digest",
    "gaussian_state",
    "gaussian_from_state",
]

SHARD_INPUTS = 32
FIT_SHARD_INPUTS = 512
ATTACK_SHARD_STARTS = 16  # starts per attack shard (each start runs its whole search inside one shard)


def work_path(out: str | Path) -> Path:
    """The work folder of output ``out``: ``.<name>.work`` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.work")


def shard_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` inputs (the last one shorter) covering ``range(n)``."""
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def digest(t: torch.Tensor | np.ndarray | None) -> str | None:
    """SHA-256 (first 16 hex digits) of an array's dtype, shape and bytes: which data a run used."""
    if t is None:
        return None
    a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
    h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


class WorkFolder:
    """The completed shards of one run (see module docstring).

    Args:
        path: the folder (``work_path(out)``).
        settings: what the run computes; a resumed run must ask for the same (JSON-compared).
        resume: continue the run the folder holds; without it an existing folder is refused,
            so two different runs are never mixed.
    """

    def __init__(self, path: str | Path, settings: dict, resume: bool = False):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(jsonable(settings)))
        self.resumed = 0  # shards loaded instead of computed
        if self.path.exists():
            if not resume:
                raise AuditError(
                    f"{self.path} holds {self.n_done()} completed shards of an interrupted run: "
                    f"add --resume {self.path} to finish it, or remove the folder to start again"
                )
            self._check()
        elif resume:
            raise AuditError(f"--resume {self.path}: no such work folder (nothing to resume)")

    def _check(self) -> None:
        try:
            stored = json.loads((self.path / "settings.json").read_text())
        except (OSError, ValueError):
            raise AuditError(f"{self.path}: not a flowaudit work folder (settings.json unreadable)") from None
        for key in sorted(set(stored) | set(self.settings)):
            if stored.get(key) != self.settings.get(key):
                raise AuditError(
                    f"--resume {self.path}: the interrupted run had {key}={_short(stored.get(key))}, "
                    f"this one asks {key}={_short(self.settings.get(key))}; rerun with the original options"
                )

    def n_done(self) -> int:
        return len([f for f in self.path.glob("*.pt") if not f.name.endswith(".fold.pt")]) if self.path.exists() else 0

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self._file(key).exists()

    def load(self, key: str) -> Any | None:
        """The payload of shard ``key``, or ``None`` when it was not completed."""
        f = self._file(key)
        if not f.exists():
            return None
        self.resumed += 1
        return torch.load(f, weights_only=True)

    def save(self, key: str, payload: Any, count: bool = True) -> None:
        """Write shard ``key`` atomically (the folder and its settings are created with the first shard)."""
        if not (self.path / "settings.json").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            # ranks may race here, writing the same bytes: each its own temporary file, then one rename
            tmp = self.path / f".settings.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self.settings, indent=1))
            os.replace(tmp, self.path / "settings.json")
        with atomic_path(self._file(key)) as tmp:
            torch.save(payload, tmp)

    def load_fold(self, name: str) -> dict | None:
        """The running fold ``name`` (``{"upto": jobs folded, "acc": state}``) of an interrupted run, if any."""
        f = self.path / f"{name}.fold.pt"
        return torch.load(f, weights_only=True) if f.exists() else None

    def save_fold(self, name: str, upto: int, acc: Any) -> None:
        """Replace the running fold ``name`` atomically: the state after the first ``upto`` jobs."""
        self.save(f"{name}.fold", {"upto": upto, "acc": acc}, count=False)

    def remove(self) -> None:
        """The run is complete: drop the shards."""
        shutil.rmtree(self.path, ignore_errors=True)


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def run_shards(
    jobs: Sequence[tuple[str, Callable[[], Any]]], work: WorkFolder | None = None, group: Any = None
) -> Iterator[Any]:
    """The payload of every job, in job order (see module docstring).

    ``jobs`` are ``(key, compute)`` pairs. A job completed in ``work`` is loaded, the others
    are computed and saved there. With a :class:`~flowaudit.runs.distributed.Group` of ``W`` ranks,
    job ``i`` runs on rank ``i mod W`` and every rank receives every payload, ``W`` at a time.
    """
    world = 1 if group is None else group.world
    rank = 0 if group is None else group.rank
    for first in range(0, len(jobs), world):
        mine = None
        if first + rank < len(jobs):
            key, compute = jobs[first + rank]
            mine = work.load(key) if work is not None else None
            if mine is None:
                mine = compute()
                if work is not None:  # ranks of one torchrun share the work folder's file system
                    work.save(key, mine)
        payloads = [mine] if group is None else group.all_gather(mine)
        for p in payloads[: len(jobs) - first]:
            yield p


def run_folded(
    jobs: Sequence[tuple[str, Callable[[], dict]]],
    fold: Callable[[Any, Any], Any],
    acc: Any,
    save: Callable[[Any], Any],
    load: Callable[[Any], Any],
    work: WorkFolder | None = None,
    group: Any = None,
    name: str = "fold",
) -> tuple[Any, list[Any]]:
    r"""Fold the jobs' mergeable states in job order and collect what each job keeps; ``(acc, keeps)``.

    A job returns ``{"keep": …, "state": …}``: ``keep`` (records: small) is saved per job,
    ``state`` (sums, reservoirs: bounded but not small) is folded, :math:`a \leftarrow
    \text{fold}(a, \text{state}_j)`, and only the running fold is saved (``save(acc)``,
    replaced after every round), so the work folder grows with the records alone. A resumed
    run restores the fold (``load``), reads the kept parts of the jobs it covers, and computes
    the rest. With ``W`` ranks, rounds of ``W`` jobs are computed side by side and all-gathered.
    """
    world = 1 if group is None else group.world
    rank = 0 if group is None else group.rank
    start = 0
    if work is not None and (saved := work.load_fold(name)) is not None:
        start, acc = saved["upto"], load(saved["acc"])
    keeps: list[Any] = []
    for key, _ in jobs[:start]:
        if not work.has(key):
            raise AuditError(f"{work.path}: shard {key} is missing; remove the folder and run again")
        keeps.append(work.load(key))
    for first in range(start, len(jobs), world):
        mine = None
        if first + rank < len(jobs):
            key, compute = jobs[first + rank]
            mine = compute()
            if work is not None:
                work.save(key, mine["keep"])
        payloads = [mine] if group is None else group.all_gather(mine)
        for p in payloads[: len(jobs) - first]:
            acc = fold(acc, p["state"])
            keeps.append(p["keep"])
        if work is not None and (group is None or group.leader):
            work.save_fold(name, min(first + world, len(jobs)), save(acc))
    return acc, keeps


def gaussian_state(g: Any) -> dict:
    """The sufficient statistics of a :class:`~flowaudit.stats.gaussian.GaussianOOD` (empty one: ``n = 0``)."""
    if not hasattr(g, "n_"):
        return {"n": 0}
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)).clone()
    return {
        "n": int(g.n_),
        "n_nonfinite": int(g.n_nonfinite_),
        "dim": int(g.n_features_in_),
        "reference": t(g.reference_),
        "sum": t(g.sum_),
        "sum_sq": t(g.sum_sq_),
        "sum_cubic": t(g.sum_cubic_),
        "sum_quartic": float(g.sum_quartic_),
    }


def gaussian_from_state(state: dict, estimator: str, device: Any = None) -> Any:
    """A :class:`~flowaudit.stats.gaussian.GaussianOOD` holding ``state``'s sums (to :meth:`~GaussianOOD.merge`)."""
    from ..stats.gaussian import GaussianOOD

    g = GaussianOOD(estimator=estimator, device=device)
    if state["n"] == 0 and "dim" not in state:
        return g
    g._init_state(state["dim"])
    g.n_, g.n_nonfinite_ = state["n"], state["n_nonfinite"]
    g.reference_ = None if state["reference"] is None else state["reference"].numpy()
    g.sum_, g.sum_sq_, g.sum_cubic_ = (state[k].numpy() for k in ("sum", "sum_sq", "sum_cubic"))
    g.sum_quartic_ = state["sum_quartic"]
    g._stale = True
    return g
