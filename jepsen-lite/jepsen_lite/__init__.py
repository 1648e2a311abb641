"""jepsen-lite: a Jepsen-style test harness for kvcluster.

This package holds the history model (:mod:`jepsen_lite.history`) and the checkers
(:mod:`jepsen_lite.checkers`); :mod:`jepsen_lite.corpus` reads the linearizability
test corpus.
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
