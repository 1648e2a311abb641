"""Benchmarks for kvcluster: a load generator, YCSB-style workloads and an etcd comparison.

Run from the repository root:

    .venv/bin/python -m benchmarks.load --concurrency 16       # quick put/get numbers
    .venv/bin/python -m benchmarks.ycsb --vs etcd              # the side-by-side comparison

Timing targets live here and never in the tests (DESIGN §6).
"""
