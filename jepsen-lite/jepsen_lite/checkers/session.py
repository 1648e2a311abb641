"""Session guarantees per client process for the sibling store.

The workload is the one of :mod:`jepsen_lite.checkers.register` (unique write values,
``extra["seen"]`` for writes and deletes with a context, reads returning siblings).
A *session* is one process: its operations are sequential, so for two of its
operations A and B, A completed before B was invoked. Only ``ok`` operations count.

For a set ``R`` of values returned by a read and a value ``v``, the read *covers*
``v`` if ``R`` contains ``v`` or a descendant of ``v`` (a value whose write had ``v``
in its causal past, through a chain of ``seen`` lists), or if a delete that did not
fail superseded ``v`` or a descendant (then returning nothing of ``v``'s lineage is
fine). See :class:`~jepsen_lite.checkers.register.CausalGraph`.

Guarantees checked, per process and key:

- **read-your-writes**: after the process's ``ok`` write of ``v``, every later ``ok``
  read by the same process covers ``v``; after its ``ok`` delete with context ``S``,
  no later read by it returns a value of ``S``.
- **monotonic reads**: for consecutive ``ok`` reads ``r1`` then ``r2`` by the same
  process, ``r2`` covers every value of ``r1``. (Covering is transitive, so checking
  consecutive reads is equivalent to checking every pair.)

A Dynamo-style store only provides these with overlapping quorums (R + W > N) and
strict (primary-only) quorums; with sloppy quorums or R = 1 they may legitimately
fail. The checker reports what happened; the caller decides whether it applies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jepsen_lite.checkers.register import (
    DELETE_FS,
    READ_FS,
    WRITE_FS,
    CausalGraph,
    read_values,
)
from jepsen_lite.history import Op, Pair, Validity, freeze, pairs, sort_key, thaw

__all__ = ["SessionResult", "SessionViolation", "check_session"]


@dataclass(frozen=True)
class SessionViolation:
    """A broken guarantee: the earlier op, the read that broke it, the values involved."""

    kind: str  # read-your-writes | monotonic-reads
    key: str | None
    process: int
    earlier: Op  # the write/delete or first read (its completion)
    read: Op  # the offending read's completion
    values: list[Any]  # values the read should have covered (or must not have returned)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "process": self.process,
            "earlier": self.earlier.to_dict(),
            "read": self.read.to_dict(),
            "values": self.values,
        }


@dataclass(frozen=True)
class SessionResult:
    valid: Validity
    process_count: int = 0
    read_count: int = 0
    write_count: int = 0
    read_your_writes: list[SessionViolation] = field(default_factory=list)
    monotonic_reads: list[SessionViolation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checker": "session",
            "valid": self.valid,
            "process_count": self.process_count,
            "read_count": self.read_count,
            "write_count": self.write_count,
            "read_your_writes_count": len(self.read_your_writes),
            "monotonic_reads_count": len(self.monotonic_reads),
            "read_your_writes": [v.to_dict() for v in self.read_your_writes],
            "monotonic_reads": [v.to_dict() for v in self.monotonic_reads],
        }


def _done(p: Pair) -> Op:
    assert p.completion is not None
    return p.completion


def _sorted(values: Sequence[Hashable] | set[Hashable]) -> list[Any]:
    return sorted((thaw(v) for v in values), key=sort_key)


def check_session(
    history: Sequence[Op],
    *,
    read_your_writes: bool = True,
    monotonic_reads: bool = True,
) -> SessionResult:
    """Check read-your-writes and monotonic reads (see the module docstring)."""
    by_key: dict[str | None, list[Pair]] = defaultdict(list)
    for p in pairs(history):
        by_key[p.key].append(p)
    ryw: list[SessionViolation] = []
    mr: list[SessionViolation] = []
    processes: set[int] = set()
    reads = writes = 0
    for key in sorted(by_key, key=lambda k: (k is not None, k or "")):
        key_pairs = by_key[key]
        graph = CausalGraph(key_pairs)
        sessions: dict[int, list[Pair]] = defaultdict(list)
        for p in key_pairs:
            if p.is_ok and (p.f in READ_FS or p.f in WRITE_FS or p.f in DELETE_FS):
                sessions[p.process].append(p)
        for process, ops in sessions.items():
            processes.add(process)
            must_cover: list[tuple[Pair, Hashable]] = []  # own writes
            must_not: list[tuple[Pair, set[Hashable]]] = []  # own deletes' contexts
            last_read: tuple[Pair, set[Hashable]] | None = None
            for p in ops:
                if p.f in WRITE_FS:
                    writes += 1
                    must_cover.append((p, freeze(p.invoke.value)))
                    continue
                if p.f in DELETE_FS:
                    writes += 1
                    must_not.append((p, set(graph.seen.get(p.invoke.index, ()))))
                    continue
                reads += 1
                vals = set(read_values(p))
                if read_your_writes:
                    for w, v in must_cover:
                        if not graph.covers(vals, v):
                            ryw.append(
                                SessionViolation(
                                    "read-your-writes", key, process, _done(w), _done(p), [thaw(v)]
                                )
                            )
                    for d, ctx in must_not:
                        back = ctx & vals
                        if back:
                            ryw.append(
                                SessionViolation(
                                    "read-your-writes",
                                    key,
                                    process,
                                    _done(d),
                                    _done(p),
                                    _sorted(back),
                                )
                            )
                if monotonic_reads and last_read is not None:
                    prev, prev_vals = last_read
                    lost = {x for x in prev_vals if not graph.covers(vals, x)}
                    if lost:
                        mr.append(
                            SessionViolation(
                                "monotonic-reads",
                                key,
                                process,
                                _done(prev),
                                _done(p),
                                _sorted(lost),
                            )
                        )
                last_read = (p, vals)
    return SessionResult(
        valid=not (ryw or mr),
        process_count=len(processes),
        read_count=reads,
        write_count=writes,
        read_your_writes=ryw,
        monotonic_reads=mr,
    )
