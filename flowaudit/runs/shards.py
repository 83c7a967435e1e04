r"""Shards of a long run, the work folder that keeps them, and the loop that resumes from it.

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
one ``<job>-<k>.npz`` per completed shard, each written atomically
(:func:`~flowaudit.utils.atomic.atomic_path`), so a SIGKILL loses at
most the shard in flight. :func:`run_shards` yields payloads in order, loading
completed ones and computing (and saving) the rest; with a process group it
spreads the shards over the ranks (:mod:`.distributed`).

Plugging another long loop in (as :func:`~flowaudit.evidence.attack.run_attack` does with its starts)::

    slices = shard_slices(n, ATTACK_SHARD_STARTS)
    jobs = [(f"attack-{k:05d}", functools.partial(one_shard, sl)) for k, sl in enumerate(slices)]
    for payload in run_shards(jobs, work, group):   # in job order, on every rank
        merge(payload)

An attack shard's payload is its starts' result tensors (CPU) and the layer and site
names; a scan's ``--attack`` keeps its shards (``attack-<k>``) in the scan's work folder.

A payload is plain data: dicts, lists, tuples, str, int, float, bool, None, CPU tensors and
NumPy arrays. A shard file is an ``.npz`` archive, never a pickle (:func:`pack` / :func:`unpack`):
the arrays, plus the payload's structure as JSON with the arrays replaced by references, and
the job's key and a digest of the run's settings. The work folder is untrusted on resume: a shard
that is truncated, foreign, of another run or another job is recomputed (its file replaced), and a
running fold that cannot be read restarts the fold from the first job, so a folder left in any
state resumes to the same result. A folder without a readable ``settings.json`` holds nothing a
run can trust and is started afresh.
"""

from __future__ import annotations

import hashlib
import io
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
    "pack",
    "unpack",
]

SHARD_INPUTS = 32
FIT_SHARD_INPUTS = 512
ATTACK_SHARD_STARTS = 16  # starts per attack shard (each start runs its whole search inside one shard)


def work_path(out: str | Path) -> Path:
    """The work folder of output ``out``: ``.<name>.work`` beside it."""
    out = Path(out)
    if len(os.fsencode(out.name)) > 240:  # ".<name>.work" must stay within the 255-byte limit on names
        short = hashlib.sha256(os.fsencode(out.name)).hexdigest()[:16]
        return out.with_name(f".{os.fsencode(out.name)[:100].decode(errors='ignore')}~{short}.work")
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
        self.tag = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]
        self.resumed = 0  # shards loaded instead of computed
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise AuditError(f"{self.path}: not a work folder (a file or a link); remove it to start again")
        cleaned = self.path.exists() and not self._settings_file_ok()
        if cleaned:  # empty, or killed before its settings landed: nothing in it can be trusted, nothing to keep
            shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            if not resume:
                raise AuditError(
                    f"{self.path} holds {self.n_done()} completed shards of an interrupted run: "
                    f"add --resume {self.path} to finish it, or remove the folder to start again"
                )
            self._check()
        elif resume and not cleaned:
            raise AuditError(f"--resume {self.path}: no such work folder (nothing to resume)")

    def _settings_file_ok(self) -> bool:
        try:
            return isinstance(json.loads((self.path / "settings.json").read_text()), dict)
        except (OSError, ValueError):
            return False

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
        if not self.path.exists():
            return 0
        return len([f for f in self.path.glob("*.npz") if not f.name.endswith(".fold.npz")])

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.npz"

    def has(self, key: str) -> bool:
        return self.load(key, count=False) is not None

    def load(self, key: str, count: bool = True) -> Any | None:
        """The payload of shard ``key``; ``None`` when it was not completed or its file is not a valid shard."""
        f = self._file(key)
        if not f.is_file():
            return None
        try:
            payload = unpack(f.read_bytes(), key, self.tag)
        except (OSError, ValueError):
            return None  # truncated, foreign, of another run: recomputed, and its file replaced
        if count:
            self.resumed += 1
        return payload

    def save(self, key: str, payload: Any, count: bool = True) -> None:
        """Write shard ``key`` atomically (the folder and its settings are created with the first shard)."""
        if not (self.path / "settings.json").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            # ranks may race here, writing the same bytes: each its own temporary file, then one rename
            tmp = self.path / f".settings.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self.settings, indent=1))
            os.replace(tmp, self.path / "settings.json")
        data = pack(payload, key, self.tag)
        with atomic_path(self._file(key)) as tmp:
            tmp.write_bytes(data)

    def load_fold(self, name: str) -> dict | None:
        """The running fold ``name`` (``{"upto": jobs folded, "acc": state}``) of an interrupted run, if any."""
        fold = self.load(f"{name}.fold", count=False)
        if not (isinstance(fold, dict) and isinstance(fold.get("upto"), int) and "acc" in fold):
            return None
        return fold

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
    done: Callable[[int], None] | None = None,
) -> tuple[Any, list[Any]]:
    r"""Fold the jobs' mergeable states in job order and collect what each job keeps; ``(acc, keeps)``.

    A job returns ``{"keep": …, "state": …}``: ``keep`` (records: small) is saved per job,
    ``state`` (sums, reservoirs: bounded but not small) is folded, :math:`a \leftarrow
    \text{fold}(a, \text{state}_j)`, and only the running fold is saved (``save(acc)``,
    replaced after every round), so the work folder grows with the records alone. A resumed
    run restores the fold (``load``), reads the kept parts of the jobs it covers, and computes
    the rest. With ``W`` ranks, rounds of ``W`` jobs are computed side by side and all-gathered.
    ``done(j)`` is called once job ``j`` is folded (or restored from the saved fold), in job order.
    """
    world = 1 if group is None else group.world
    rank = 0 if group is None else group.rank
    start, keeps = 0, []
    if work is not None and (saved := work.load_fold(name)) is not None and 0 < saved["upto"] <= len(jobs):
        kept = [work.load(key) for key, _ in jobs[: saved["upto"]]]
        if all(k is not None for k in kept):  # else a kept shard is gone or bad: fold again from the first job
            try:
                start, acc, keeps = saved["upto"], load(saved["acc"]), kept
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError):
                start, keeps = 0, []  # a fold of the wrong structure: recomputed
    for j in range(start if done is not None else 0):
        done(j)
    for first in range(start, len(jobs), world):
        mine = None
        if first + rank < len(jobs):
            key, compute = jobs[first + rank]
            mine = compute()
            if work is not None:
                work.save(key, mine["keep"])
        payloads = [mine] if group is None else group.all_gather(mine)
        for j, p in enumerate(payloads[: len(jobs) - first], first):
            acc = fold(acc, p["state"])
            keeps.append(p["keep"])
            if done is not None:
                done(j)
        if work is not None and (group is None or group.leader):
            work.save_fold(name, min(first + world, len(jobs)), save(acc))
    return acc, keeps


def gaussian_state(g: Any) -> dict:
    """The sufficient statistics of a :class:`~flowaudit.stats.gaussian.GaussianOOD` (empty one: ``n = 0``)."""
    if not hasattr(g, "n_"):
        return {"n": 0}

    def t(a):  # noqa: ANN001, ANN202 - an array or None, as a float64 tensor
        return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)).clone()

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


# -- the shard file: an .npz of arrays plus the payload's structure as JSON (no pickle anywhere) ---------------

_FORMAT = "flowaudit-shard/1"


def pack(payload: Any, key: str, tag: str) -> bytes:
    """The bytes of a shard file holding ``payload`` for job ``key`` of the run whose settings digest is ``tag``."""
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(payload, arrays)
    head = json.dumps({"format": _FORMAT, "key": key, "tag": tag, "tree": tree}, allow_nan=True)
    arrays["__head__"] = np.frombuffer(head.encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack(data: bytes, key: str, tag: str) -> Any:
    """The payload of a shard file written by :func:`pack`; ``ValueError`` when it is not job ``key`` of run ``tag``."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}  # reading each member checks its CRC
        head = json.loads(arrays.pop("__head__").tobytes().decode())
    except Exception as exc:  # zipfile and numpy fail on hostile bytes in many ways (NotImplementedError, …)
        raise ValueError(f"not a shard file ({type(exc).__name__})") from None
    if not isinstance(head, dict) or head.get("format") != _FORMAT:
        raise ValueError("not a shard file")
    if head.get("key") != key or head.get("tag") != tag:
        raise ValueError("a shard of another job or run")
    try:
        return _decode(head.get("tree"), arrays)
    except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"not a shard file ({type(exc).__name__})") from None


def _encode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        name = f"a{len(arrays)}"
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits travel as int16
            arrays[name] = t.view(torch.int16).numpy()
        else:
            arrays[name] = t.numpy()
        return {"__tensor__": name, "dtype": str(t.dtype).removeprefix("torch.")}
    if isinstance(obj, (np.ndarray, np.generic)):
        name = f"a{len(arrays)}"
        arrays[name] = np.asarray(obj)
        return {"__array__": name, "scalar": isinstance(obj, np.generic)}
    if isinstance(obj, list):
        return [_encode(v, arrays) for v in obj]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, arrays) for v in obj]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, arrays) for k, v in obj.items()}
        return {"__items__": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    raise TypeError(f"a shard payload holds plain data only, not {type(obj).__name__}")


def _decode(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [_decode(v, arrays) for v in tree]
    if not isinstance(tree, dict):
        raise ValueError("not a shard file (unknown node)")
    if "__tensor__" in tree:
        a, dtype = arrays[tree["__tensor__"]], getattr(torch, str(tree["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a shard file (dtype {tree['dtype']!r})")
        t = torch.from_numpy(a.copy())
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t.to(dtype)
    if "__array__" in tree:
        a = arrays[tree["__array__"]]
        return a[()] if tree.get("scalar") else a
    if "__tuple__" in tree:
        return tuple(_decode(v, arrays) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {_decode(k, arrays): _decode(v, arrays) for k, v in tree["__items__"]}
    return {k: _decode(v, arrays) for k, v in tree.items()}
