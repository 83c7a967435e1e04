"""The loader behind ``--data``, ``--fit-data`` and ``--ood-data`` (DESIGN.md §4).

Accepted inputs, all giving conditions ``y`` (N×…) and optional targets ``x``:

- a folder of PNG/JPEG images, all the same size → ``y`` (N, 3, H, W) in [0, 1],
  ids = file stems, sorted by file name (one image file is read as N = 1);
- a paired folder, ``low/`` + ``high/`` (``y`` = low, ``x`` = high) or ``lr/`` +
  ``hr/`` (``y`` = lr, ``x`` = hr), paired by file stem;
- ``.npy``: the conditions; ``.npz`` / ``.h5`` / ``.hdf5``: an array ``y`` and
  optionally ``x`` with as many rows; ids ``row0``, ``row1``, ….

Every problem raises :class:`DataError` (a ``ValueError``) with one line naming
the path and what is wrong; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .images import IMAGE_EXTENSIONS, find_pair_dirs, read_image, read_image_folder, read_paired_folder

__all__ = ["DataError", "ConditionSet", "load_conditions", "ARRAY_EXTENSIONS"]

ARRAY_EXTENSIONS = (".npy", ".npz", ".h5", ".hdf5")


def _err(path: str | Path, problem: object) -> DataError:
    return DataError(f"{path}: {_one_line(problem)}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass
class ConditionSet:
    """Conditions ``y`` (float32, N×…), optional targets ``x``, one id per row, and a JSON-able description."""

    y: Tensor
    x: Tensor | None
    ids: list[str]
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def _stack(path: Path, named: list[tuple[str, np.ndarray]], what: str = "images") -> Tensor:
    first_name, first = named[0]
    for name, a in named[1:]:
        if a.shape != first.shape:
            raise _err(path, f"{what} differ in size: {first_name} is {first.shape[1]}×{first.shape[0]}, "
                                  f"{name} is {a.shape[1]}×{a.shape[0]} (crop or resize them to one size)")
    return torch.from_numpy(np.stack([a for _, a in named]).transpose(0, 3, 1, 2).copy())


def _from_folder(path: Path) -> tuple[Tensor, Tensor | None, list[str], str]:
    layout = find_pair_dirs(path)
    if layout is not None:
        pairs = read_paired_folder(path)
        if not pairs:
            raise _err(path, f"no PNG/JPEG image pairs in {layout[0]}/ and {layout[1]}/")
        y = _stack(path / layout[0], [(s, c) for s, c, _ in pairs])
        x = _stack(path / layout[1], [(s, t) for s, _, t in pairs])
        return y, x, [s for s, _, _ in pairs], f"paired {layout[0]}/{layout[1]}"
    named = read_image_folder(path)
    if not named:
        raise _err(path, "no PNG/JPEG images in folder (nor low/+high/ or lr/+hr/ sub-folders)")
    return _stack(path, named), None, [s for s, _ in named], "images"


def _array(path: Path, name: str, a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise _err(path, f"array {name!r} has dtype {a.dtype}, not numeric")
    if a.ndim < 2:
        raise _err(path, f"array {name!r} has shape {a.shape}; expected N×… (a row per input)")
    if len(a) == 0:
        raise _err(path, f"array {name!r} has no rows")
    if not np.isfinite(a).all():
        raise _err(path, f"array {name!r} has non-finite values")
    return a


def _from_arrays(path: Path) -> tuple[Tensor, Tensor | None, list[str], str]:
    suffix = path.suffix.lower()
    kind = {".npy": "npy", ".npz": "npz"}.get(suffix, "h5")
    try:
        if kind == "npy":
            y, x = np.load(path, allow_pickle=False), None
        elif kind == "npz":
            with np.load(path, allow_pickle=False) as f:
                if "y" not in f.files:
                    raise _err(path, f"no array 'y' (has: {', '.join(f.files) or 'nothing'})")
                y, x = f["y"], (f["x"] if "x" in f.files else None)
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if not isinstance(f.get("y"), h5py.Dataset):
                    raise _err(path, f"no dataset 'y' at the top level (has: {', '.join(f.keys()) or 'nothing'})")
                y = f["y"][()]
                x = f["x"][()] if isinstance(f.get("x"), h5py.Dataset) else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise _err(path, f"unreadable {suffix} file ({e})") from e
    y = _array(path, "y", y)
    if x is not None:
        x = _array(path, "x", x)
        if len(x) != len(y):
            raise _err(path, f"'x' has {len(x)} rows but 'y' has {len(y)}")
    return _tensor(y), None if x is None else _tensor(x), [f"row{i}" for i in range(len(y))], kind


def _tensor(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def load_conditions(path: str | Path) -> ConditionSet:
    """Read conditions (and targets where present) from an image folder or an array file.

    ``description`` holds ``path``, ``kind`` (``images``, ``image``, ``paired low/high``,
    ``paired lr/hr``, ``npy``, ``npz``, ``h5``), ``n``, ``shape`` (one condition's shape)
    and, with targets, ``target_shape``. Raises :class:`DataError` on any problem.
    """
    p = Path(path)
    if not p.exists():
        raise _err(p, "no such file or folder")
    try:
        if p.is_dir():
            y, x, ids, kind = _from_folder(p)
        elif p.suffix.lower() in ARRAY_EXTENSIONS:
            y, x, ids, kind = _from_arrays(p)
        elif p.suffix.lower() in IMAGE_EXTENSIONS:
            y, x, ids, kind = torch.from_numpy(read_image(p).transpose(2, 0, 1).copy())[None], None, [p.stem], "image"
        else:
            raise _err(p, f"unknown data format {p.suffix or '(no extension)'!r}; expected an image folder, "
                               f"a PNG/JPEG, {', '.join(ARRAY_EXTENSIONS)}")
    except DataError:
        raise
    except (OSError, ValueError) as e:  # reader errors: "<file>: <problem>", a file at or under p
        msg = _one_line(e)
        raise (DataError(msg) if msg.startswith(str(p)) else _err(p, msg)) from e
    desc: dict[str, Any] = {"path": str(p), "kind": kind, "n": len(ids), "shape": list(y.shape[1:])}
    if x is not None:
        desc["target_shape"] = list(x.shape[1:])
    return ConditionSet(y=y, x=x, ids=ids, description=desc)
