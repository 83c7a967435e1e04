"""The ``flowaudit`` command line: thin click commands over the Python API."""

from __future__ import annotations

import sys

__all__ = ["start"]


def start() -> None:
    """The console script: the command line, with Ctrl-C while it loads said in one line (exit 130).

    Until :func:`flowaudit.cli.main.main` installs its handlers, an interruption is a ``KeyboardInterrupt``
    raised inside an import; nothing has been read or written yet.
    """
    try:
        from .main import main as run
    except KeyboardInterrupt:
        sys.stderr.write("flowaudit: interrupted while starting; nothing was written\n")
        raise SystemExit(130) from None
    run()
