"""Throughput benchmarks of chartsum: numbers to read, never timed tests.

``chartsum bench`` (or ``python -m benchmarks.throughput``) runs them; see
docs/benchmark.md for what each phase measures and the latest results.
"""
