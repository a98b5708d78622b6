"""Benchmarks: plain functions printing Markdown tables with same-run baselines (``python -m tests.bench``)."""
