"""Observing inverse passes: per-site inverse gains, per-layer statistics, parameter reservoirs.

The tracer is the observer an adapter calls during sampling; its compiled loops live in
:mod:`.host_kernels`.
"""
