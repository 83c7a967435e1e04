"""Sampling runs: the per-input loop under a tracer, shards, resume, process groups and memory sizing."""
