"""The loader behind ``--data``, ``--fit-data`` and ``--ood-data``.

Accepted inputs, all giving conditions ``y`` (N×…) and optional targets ``x``:

- a folder of PNG/JPEG images → ``y`` (N, 3, H, W) in [0, 1], ids = file stems, sorted by file
  name (one image file is read as N = 1); a folder of several sizes gives a
  :class:`~flowaudit.io.ragged.Ragged` ``y``, its images grouped by size (file-name order inside a size);
- a paired folder, ``low/`` + ``high/`` (``y`` = low, ``x`` = high) or ``lr/`` +
  ``hr/`` (``y`` = lr, ``x`` = hr), paired by file stem;
- ``.npy``: the conditions; ``.npz`` / ``.h5`` / ``.hdf5``: an array ``y`` and
  optionally ``x`` with as many rows; ids ``row0``, ``row1``, ….

Every problem raises :class:`DataError` (a ``ValueError``) with one line naming
the path and what is wrong; the CLI turns it into exit code 2.

Conditions with NaN or ±Inf are *not* refused: they are loaded, marked in
:attr:`ConditionSet.nonfinite` and counted in ``description["n_nonfinite"]``.
The audit scores them ``s_OOD = inf``, keeps them out of the Gaussian's fit,
and does not sample them: a flow fed NaN returns NaN, which says nothing about
its inverse, so counting those samples in %Inf would blame the flow for broken
data (and give the risk fit a free, meaningless hit). They appear in the report
as inputs flagged ``nonfinite_condition`` with no sample figures
(:func:`nonfinite_records`). A set whose every condition is non-finite leaves
nothing to audit and is refused. Targets ``x`` must be finite.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .images import (
    IMAGE_EXTENSIONS,
    find_pair_dirs,
    image_files,
    image_size,
    read_image,
    read_image_folder,
    read_paired_folder,
)
from .ragged import Ragged, by_size, condition_shapes
from .untrusted import ForeignStorage, ReaderCrashed, h5_dataset, survives

__all__ = ["DataError", "ConditionSet", "load_conditions", "nonfinite_records", "ARRAY_EXTENSIONS"]

ARRAY_EXTENSIONS = (".npy", ".npz", ".h5", ".hdf5")


def _err(path: str | Path, problem: object) -> DataError:
    return DataError(f"{path}: {_one_line(problem)}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass
class ConditionSet:
    """Conditions ``y`` (float32, N×…), optional targets ``x``, one id per row, and a JSON-able description.

    ``nonfinite`` (bool, N) marks the rows of ``y`` holding a NaN or ±Inf; computed when not given.
    """

    y: Tensor | Ragged
    x: Tensor | Ragged | None
    ids: list[str]
    description: dict[str, Any] = field(default_factory=dict)
    nonfinite: Tensor | None = None

    def __post_init__(self) -> None:
        if self.nonfinite is None and isinstance(self.y, Ragged):
            self.nonfinite = self.y.nonfinite()
        elif self.nonfinite is None:
            self.nonfinite = (
                ~torch.isfinite(self.y.reshape(len(self.y), -1)).all(1)
                if len(self.y)
                else torch.zeros(0, dtype=torch.bool)
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The distinct shapes of one condition (several for a folder of mixed image sizes)."""
        return condition_shapes(self.y)

    @property
    def mixed(self) -> bool:
        """Whether the conditions come in more than one shape (then read one input at a time)."""
        return len(self.shapes) > 1

    def prefixed(self, set_name: str) -> ConditionSet:
        """The same set with ids ``set_name/id``: unique across the sets of one report (``in/row3``, ``ood/row3``)."""
        return ConditionSet(
            y=self.y,
            x=self.x,
            ids=[f"{set_name}/{i}" for i in self.ids],
            description=self.description,
            nonfinite=self.nonfinite,
        )

    @property
    def n_nonfinite(self) -> int:
        return int(self.nonfinite.sum())

    def finite(self) -> ConditionSet:
        """The rows whose conditions are all finite (``self`` when there is no other kind).

        The description is the whole set's (``n``, ``n_nonfinite``). Raises :class:`DataError`
        when no row is finite: there is nothing to audit.
        """
        if not self.n_nonfinite:
            return self
        keep = ~self.nonfinite
        if not keep.any():
            where = self.description.get("path", "conditions")
            raise DataError(
                f"{where}: every condition has NaN or Inf values ({len(self)} of {len(self)}); nothing to audit"
            )
        idx = keep.nonzero().flatten()
        return ConditionSet(
            y=self.y[idx],
            x=None if self.x is None else self.x[idx],
            ids=[self.ids[i] for i in idx.tolist()],
            description=self.description,
            nonfinite=torch.zeros(len(idx), dtype=torch.bool),
        )


def _stack(named: list[tuple[str, np.ndarray]]) -> Tensor | Ragged:
    """H×W×3 images as (N, 3, H, W); images of several sizes as a :class:`Ragged` of 3×H×W (same order)."""
    if len({a.shape for _, a in named}) > 1:
        return Ragged([torch.from_numpy(a.transpose(2, 0, 1).copy()) for _, a in named])
    return torch.from_numpy(np.stack([a for _, a in named]).transpose(0, 3, 1, 2).copy())


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _budget(max_bytes: int | None) -> int | None:
    """The memory a loaded set may take: ``max_bytes``, else half the available RAM (``--max-memory``'s default)."""
    if max_bytes is not None:
        return int(max_bytes)
    free = _available_bytes()
    return None if free is None else free // 2


def _check_memory(path: Path, what: str, nbytes: int, max_bytes: int | None) -> None:
    """Refuse before allocating when ``nbytes`` (decoded, float32, with the stacked copy) passes the budget."""
    budget = _budget(max_bytes)
    if budget is not None and nbytes > budget:
        raise _err(
            path,
            f"{what} take {_size(nbytes)} once decoded, above the memory budget of "
            f"{_size(budget)} (--max-memory); use fewer or smaller inputs",
        )


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps a number ≥ 1 (``16.0 KiB``, ``9.6 GiB``)."""
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 2**power:
            return f"{nbytes / 2**power:.1f} {unit}"
    return f"{nbytes} bytes"


def _check_images(path: Path, files: list[Path], max_bytes: int | None) -> None:
    """Header sizes of every image (no pixel decoded): the bomb limit, then the memory the set needs."""
    total = sum(2 * 3 * 4 * w * h for w, h in (image_size(f) for f in files))  # float32 RGB, decoded + stacked
    _check_memory(path, f"{len(files)} images", total, max_bytes)


def _from_folder(path: Path, max_bytes: int | None = None) -> tuple[Tensor, Tensor | None, list[str], str]:
    layout = find_pair_dirs(path)
    files = [f for d in (layout or ("",)) for f in image_files(path / d)]
    _check_images(path, files, max_bytes)
    if layout is not None:
        pairs = read_paired_folder(path)
        if not pairs:
            raise _err(path, f"no PNG/JPEG image pairs in {layout[0]}/ and {layout[1]}/")
        pairs = [(s, c, t) for s, (c, t) in by_size([(s, (c, t)) for s, c, t in pairs], key=lambda p: p[0].shape)]
        y = _stack([(s, c) for s, c, _ in pairs])
        x = _stack([(s, t) for s, _, t in pairs])
        return y, x, [s for s, _, _ in pairs], f"paired {layout[0]}/{layout[1]}"
    named = read_image_folder(path)
    if not named:
        raise _err(path, "no PNG/JPEG images in folder (nor low/+high/ or lr/+hr/ sub-folders)")
    named = by_size(named)
    return _stack(named), None, [s for s, _ in named], "images"


def _array(path: Path, name: str, a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise _err(path, f"array {name!r} has dtype {a.dtype}, not numeric")
    if a.ndim < 2:
        raise _err(path, f"array {name!r} has shape {a.shape}; expected N×… (a row per input)")
    if len(a) == 0:
        raise _err(path, f"array {name!r} has no rows")
    if a.size == 0:
        raise _err(path, f"array {name!r} has shape {a.shape}: its rows are empty")
    if name != "y" and not np.isfinite(a).all():  # conditions may be non-finite (counted); targets may not
        raise _err(path, f"array {name!r} has non-finite values")
    return a


def _npy_bytes(fp: Any) -> int:
    """Bytes of the array a ``.npy`` stream declares in its header (read without touching the data)."""
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fp)
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _declared_bytes(path: Path, kind: str) -> int:
    """What loading ``y`` and ``x`` of an array file allocates, from headers and shapes only."""
    if kind == "npy":
        with open(path, "rb") as fp:
            declared = _npy_bytes(fp)
            held = path.stat().st_size - fp.tell()
        if declared > held:  # a header that promises more than the file holds: truncated or hostile
            raise _err(path, f"unreadable .npy file (its header declares {declared:,} bytes, it holds {held:,})")
        return declared
    if kind == "npz":
        with zipfile.ZipFile(path) as z:
            total = 0
            for name in ("y.npy", "x.npy"):
                if name in z.namelist():
                    with z.open(name) as fp:
                        total += _npy_bytes(fp)
            return total
    import h5py

    with h5py.File(path, "r") as f:
        found = [f.get(k) for k in ("y", "x")]
        return sum(int(np.prod(d.shape, dtype=object)) * d.dtype.itemsize for d in found if isinstance(d, h5py.Dataset))


def _from_arrays(path: Path, max_bytes: int | None = None) -> tuple[Tensor, Tensor | None, list[str], str]:
    suffix = path.suffix.lower()
    kind = {".npy": "npy", ".npz": "npz"}.get(suffix, "h5")
    try:
        if kind == "h5":
            survives(_read_h5, path, True)  # a corrupt file can crash the HDF5 library itself
        _check_memory(path, "the arrays", 2 * _declared_bytes(path, kind), max_bytes)  # as read, then as float32
        if kind == "npy":
            y, x = np.load(path, allow_pickle=False), None
        elif kind == "npz":
            with np.load(path, allow_pickle=False) as f:
                if "y" not in f.files:
                    raise _err(path, f"no array 'y' (has: {', '.join(f.files) or 'nothing'})")
                y, x = f["y"], (f["x"] if "x" in f.files else None)
        else:
            y, x = _read_h5(path)
    except DataError:
        raise
    except ReaderCrashed as e:
        raise _err(path, f"corrupt {suffix} file ({e})") from None
    except (
        Exception
    ) as e:  # numpy's and h5py's parsers fail on hostile bytes in many ways (TokenError, SyntaxError, KeyError, …)
        raise _err(path, f"unreadable {suffix} file ({type(e).__name__}: {e})") from None
    y = _array(path, "y", y)
    if x is not None:
        x = _array(path, "x", x)
        if len(x) != len(y):
            raise _err(path, f"'x' has {len(x)} rows but 'y' has {len(y)}")
    return _tensor(y), None if x is None else _tensor(x), [f"row{i}" for i in range(len(y))], kind


def _read_h5(path: Path, probe: bool = False) -> tuple[Any, Any]:
    """Arrays ``y`` and ``x`` (or ``None``) of an HDF5 file; ``probe``: only their first rows (the child's check)."""
    import h5py

    rows = slice(0, 1) if probe else ()
    with h5py.File(path, "r") as f:
        try:
            y, x = h5_dataset(f, "y"), h5_dataset(f, "x")
        except ForeignStorage as e:
            raise _err(path, e) from None
        if y is None:
            raise _err(path, f"no dataset 'y' at the top level (has: {', '.join(f.keys()) or 'nothing'})")
        y = y[rows] if y.ndim else y[()]
        return y, (None if x is None else (x[rows] if x.ndim else x[()]))


def _tensor(a: np.ndarray) -> Tensor:
    """float32; magnitudes beyond float32's range (1e300) become ±Inf, counted as non-finite, without a warning."""
    with np.errstate(over="ignore", invalid="ignore"):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def load_conditions(path: str | Path, max_bytes: int | None = None) -> ConditionSet:
    """Read conditions (and targets where present) from an image folder or an array file.

    ``description`` holds ``path``, ``kind`` (``images``, ``image``, ``paired low/high``,
    ``paired lr/hr``, ``npy``, ``npz``, ``h5``), ``n``, ``shape`` (one condition's shape; of mixed
    sizes, the first, and ``shapes`` lists them all) and, with targets, ``target_shape``.
    Raises :class:`DataError` on any problem. Sizes are read
    from headers first (images, ``.npy``/``.npz`` headers, HDF5 shapes) and checked against
    ``max_bytes`` (default: half the available RAM) before anything that large is allocated.
    """
    p = Path(path)
    if not p.exists():
        raise _err(p, "no such file or folder")
    if not (p.is_dir() or p.is_file()):  # a FIFO, socket or device: reading it could block or never end
        raise _err(p, "not a regular file or folder (a pipe, socket or device)")
    try:
        if p.is_dir():
            y, x, ids, kind = _from_folder(p, max_bytes)
        elif p.suffix.lower() in ARRAY_EXTENSIONS:
            y, x, ids, kind = _from_arrays(p, max_bytes)
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            _check_images(p, [p], max_bytes)
            y, x, ids, kind = torch.from_numpy(read_image(p).transpose(2, 0, 1).copy())[None], None, [p.stem], "image"
        else:
            raise _err(
                p,
                f"unknown data format {p.suffix or '(no extension)'!r}; expected an image folder, "
                f"a PNG/JPEG, {', '.join(ARRAY_EXTENSIONS)}",
            )
    except DataError:
        raise
    except (OSError, ValueError) as e:  # reader errors: "<file>: <problem>", a file at or under p
        msg = _one_line(e)
        raise (DataError(msg) if msg.startswith(str(p)) else _err(p, msg)) from e
    cs = ConditionSet(y=y, x=x, ids=ids)
    cs.description = {
        "path": str(p),
        "kind": kind,
        "n": len(ids),
        "shape": list(cs.shapes[0]),
        "n_nonfinite": cs.n_nonfinite,
    }
    if cs.mixed:
        cs.description["shapes"] = [list(s) for s in cs.shapes]
    if x is not None:
        cs.description["target_shape"] = list(condition_shapes(x)[0])
    return cs


def nonfinite_records(cs: ConditionSet, set_name: str) -> list[dict]:
    """Report records of the inputs whose conditions are non-finite: ``s_ood`` inf, no sample figures, no risk."""
    return [
        {
            "id": cs.ids[i],
            "set": set_name,
            "nonfinite_condition": True,
            "s_ood": math.inf,
            "n_inf": None,
            "n_pixel_err": None,
            "max_abs": None,
            "risk": None,
        }
        for i in cs.nonfinite.nonzero().flatten().tolist()
    ]
