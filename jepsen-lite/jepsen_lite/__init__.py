"""jepsen-lite: a Jepsen-style test harness for kvcluster.

- :mod:`jepsen_lite.history`: operations, histories as JSON lines, pairing;
- :mod:`jepsen_lite.checkers`: set, multi-value register, linearizability,
  session guarantees, convergence; :mod:`jepsen_lite.corpus` reads the
  linearizability test corpus;
- :mod:`jepsen_lite.backends`: where the cluster runs and how faults reach it
  (``local``, ``netns``; the :class:`~jepsen_lite.backends.base.Backend` protocol);
- :mod:`jepsen_lite.nemesis`: seeded fault schedules and the event log;
- :mod:`jepsen_lite.workloads`: ``set``, ``register``, ``lin-register``;
- :mod:`jepsen_lite.runner`, :mod:`jepsen_lite.report`, :mod:`jepsen_lite.cli`: one
  run end to end, ``report.html``, the ``jepsen-lite`` command.
"""

from __future__ import annotations

from jepsen_lite.history import (
    HistoryError,
    HistoryRecorder,
    Op,
    OpType,
    Pair,
    Validity,
    dump_jsonl,
    load_jsonl,
    merge_validity,
    pairs,
    validate,
)

__all__ = [
    "HistoryError",
    "HistoryRecorder",
    "Op",
    "OpType",
    "Pair",
    "Validity",
    "dump_jsonl",
    "load_jsonl",
    "merge_validity",
    "pairs",
    "validate",
]
