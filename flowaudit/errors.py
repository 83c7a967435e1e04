"""The engine's user-facing errors: each is a user's mistake, exit code 2 with one line.

:class:`AuditError` covers what was asked of the audit (options, stats files,
layer names, devices); :class:`DataError` a ``--data`` input that cannot be
read. Model specs that cannot be loaded raise
:class:`flowaudit.adapters.ModelError`.
"""

from __future__ import annotations

__all__ = ["AuditError", "DataError"]


class AuditError(ValueError):
    """A problem with what the user asked for (bad stats file, layer names, …): exit code 2."""


class DataError(ValueError):
    """Bad ``--data`` input; ``str(err)`` is one line, ``"<path>: <problem>"``."""
