"""flowaudit: robustness audit of conditional normalizing flows (exploding inverses).

The Python API is the engine behind the CLI::

    import flowaudit
    report = flowaudit.scan(model, data, ood=ood_data, fit_data=train_conditions)
    report.to_json(); report.to_html()

``adapt``, ``fit``, ``scan``, ``inspect`` and ``attack`` are imported lazily so that
``import flowaudit`` (and ``flowaudit --help``) stays fast.
"""

from ._version import __version__

__all__ = ["__version__", "adapt", "fit", "scan", "quick", "inspect", "attack", "Report"]


def __getattr__(name: str):
    if name == "adapt":
        from .adapters import adapt

        return adapt
    if name in ("fit", "scan", "quick", "inspect", "attack"):
        from . import audit as _audit

        return getattr(_audit, name)
    if name == "Report":
        from .report import Report

        return Report
    raise AttributeError(f"module 'flowaudit' has no attribute {name!r}")
