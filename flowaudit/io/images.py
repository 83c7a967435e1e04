"""Image files as conditions: PNG/JPEG read with Pillow into H×W×3 float32 in [0, 1].

A folder is either flat (every PNG/JPEG directly in it, sorted by file name)
or paired: ``low/`` + ``high/`` or ``lr/`` + ``hr/`` sub-folders whose files
pair by stem (condition folder first). Errors are ``ValueError`` with one line
``"<file>: <problem>"``.

Sizes come from the file's header before any pixel is decoded (:func:`image_size`): an image above
:data:`MAX_PIXELS` is refused as a decompression bomb (a few kilobytes of PNG can declare
gigapixels), and a folder's decoded size can be checked against a memory budget first.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "image_size",
    "image_files",
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


#: Largest image accepted, in pixels (8192 × 8192, 768 MiB decoded as float32 RGB): a decompression-bomb limit.
MAX_PIXELS = 8192 * 8192


def _open(path: str | Path):  # noqa: ANN202 - a PIL.Image.Image, imported lazily
    from PIL import Image

    with warnings.catch_warnings():  # Pillow's own bomb warning: our limit below is stricter and says it in one line
        warnings.simplefilter("ignore")
        return Image.open(path)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file's header, without decoding; ``ValueError`` above :data:`MAX_PIXELS`."""
    try:
        with _open(path) as im:
            w, h = im.size
    except Exception as e:  # not an image Pillow knows, or one Pillow's own bomb check refuses outright
        if type(e).__name__ == "DecompressionBombError":  # its header declares over 2x Pillow's limit
            raise ValueError(
                f"{path}: the image declares more than {MAX_PIXELS / 1e6:.0f} MP (decompression-bomb guard; "
                f"{' '.join(str(e).split()).split(',')[0]}); crop or downscale it"
            ) from None
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if w * h > MAX_PIXELS:
        raise ValueError(
            f"{path}: {w}×{h} image ({w * h / 1e6:.0f} MP) is above the {MAX_PIXELS / 1e6:.0f} MP limit "
            "(decompression-bomb guard); crop or downscale it"
        )
    return w, h


def read_image(path: str | Path) -> np.ndarray:
    """One PNG/JPEG as H×W×3 float32 in [0, 1] (gray → RGB, alpha dropped, 16-bit scaled)."""
    image_size(path)  # the header first: no pixel is decoded for an image above the limit
    try:
        with _open(path) as im:
            if im.mode.startswith("I"):  # 16-bit gray PNG
                a = np.asarray(im, dtype=np.float32) / 65535
                return np.repeat(a[..., None], 3, axis=2).clip(0, 1)
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    except Exception as e:  # Pillow fails on hostile bytes in many ways (SyntaxError, struct.error, …)
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {' '.join(str(e).split())})") from None


def image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def read_image_folder(path: str | Path) -> list[Named]:
    """``(stem, image)`` for every PNG/JPEG directly in ``path``, sorted by file name."""
    return [(p.stem, read_image(p)) for p in image_files(Path(path))]


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
    cond, targ = ({p.stem: p for p in image_files(Path(path) / d)} for d in layout)
    if cond.keys() != targ.keys():
        only = [
            f"only in {d}/: {', '.join(sorted(a.keys() - b.keys())[:3])}"
            for d, a, b in ((layout[0], cond, targ), (layout[1], targ, cond))
            if a.keys() - b.keys()
        ]
        raise ValueError(f"{path}: files do not pair by name ({'; '.join(only)})")
    return [(s, read_image(cond[s]), read_image(targ[s])) for s in sorted(cond)]
