"""Atomic file writes: a temporary sibling, renamed onto the target on success.

Every file flowaudit writes (stats, reports, checkpoints) goes through
:func:`atomic_path`, so a reader never sees a half-written file and a failed
write leaves nothing behind (DESIGN §5).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


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
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
