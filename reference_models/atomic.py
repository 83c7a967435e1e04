"""Atomic writes of files and folders: a temporary sibling, renamed onto the target on success.

Everything flowaudit writes (checkpoints, data sets, stats, reports) goes
through :func:`atomic_path` (one file) or :func:`atomic_dir` (one folder), so a
reader never sees a half-written result and a failure leaves nothing behind
(DESIGN §5). It lives in the bottom layer so that every layer can use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_dir"]


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.{tag}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; ``os.replace`` it onto ``path`` on success.

    The temporary path lives in the same directory (so the rename is atomic on
    POSIX) and is named ``.<name>.<random>.tmp``. On any exception, the
    temporary file is removed and the exception re-raised; an existing
    ``path`` is then left untouched.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    target = Path(path)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; rename it onto ``path`` on success.

    An existing ``path`` raises :class:`FileExistsError` unless ``overwrite``;
    with ``overwrite`` it is replaced only once the new folder is complete
    (moved aside, the new one renamed in, the old one deleted). On any
    exception the temporary folder is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "report"
        >>> with atomic_dir(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> sorted(p.name for p in target.iterdir())
        ['a.txt']
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (use --overwrite)")
    tmp = _sibling(target, "tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            old = _sibling(target, "old")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
