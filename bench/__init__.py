"""The benchmark suite: ``python -m bench`` (or ``make bench``) writes docs/benchmarks.md and its chart.

Every figure is measured on loopback against real processes (``pingtree-relay serve``, the sandbox,
a bare Flask baseline under the same gunicorn settings), side by side in the same run, so a noisy
machine moves both sides of each comparison together.
"""
