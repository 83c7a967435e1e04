"""Image files as conditions: PNG/JPEG read with Pillow into H×W×3 float32 in [0, 1].

A folder is either flat (every PNG/JPEG directly in it, sorted by file name)
or paired: ``low/`` + ``high/`` or ``lr/`` + ``hr/`` sub-folders whose files
pair by stem (condition folder first). Errors are ``ValueError`` with one line
``"<file>: <problem>"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "PAIR_LAYOUTS",
    "read_image",
    "read_image_folder",
    "find_pair_dirs",
    "read_paired_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
PAIR_LAYOUTS = (("low", "high"), ("lr", "hr"))  # (condition folder, target folder)

Named = tuple[str, np.ndarray]
Pair = tuple[str, np.ndarray, np.ndarray]


def read_image(path: str | Path) -> np.ndarray:
    """One PNG/JPEG as H×W×3 float32 in [0, 1] (gray → RGB, alpha dropped, 16-bit scaled)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):  # 16-bit gray PNG
                a = np.asarray(im, dtype=np.float32) / 65535
                return np.repeat(a[..., None], 3, axis=2).clip(0, 1)
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    except Exception as e:  # Pillow's decoders fail on hostile bytes in many ways (SyntaxError, struct.error, DecompressionBombError, …)
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def read_image_folder(path: str | Path) -> list[Named]:
    """``(stem, image)`` for every PNG/JPEG directly in ``path``, sorted by file name."""
    return [(p.stem, read_image(p)) for p in _image_files(Path(path))]


def find_pair_dirs(path: str | Path) -> tuple[str, str] | None:
    """The paired layout of ``path`` (``("low", "high")`` or ``("lr", "hr")``), or ``None``."""
    found = [lay for lay in PAIR_LAYOUTS if all((Path(path) / d).is_dir() for d in lay)]
    if len(found) > 1:
        raise ValueError(f"{path}: ambiguous, holds both low/+high/ and lr/+hr/")
    return found[0] if found else None


def read_paired_folder(path: str | Path) -> list[Pair]:
    """``(stem, condition, target)`` from ``low/``+``high/`` or ``lr/``+``hr/``, paired by file stem."""
    layout = find_pair_dirs(path)
    if layout is None:
        raise ValueError(f"{path}: no low/+high/ or lr/+hr/ sub-folders")
    cond, targ = ({p.stem: p for p in _image_files(Path(path) / d)} for d in layout)
    if cond.keys() != targ.keys():
        only = [
            f"only in {d}/: {', '.join(sorted(a.keys() - b.keys())[:3])}"
            for d, a, b in ((layout[0], cond, targ), (layout[1], targ, cond))
            if a.keys() - b.keys()
        ]
        raise ValueError(f"{path}: files do not pair by name ({'; '.join(only)})")
    return [(s, read_image(cond[s]), read_image(targ[s])) for s in sorted(cond)]
