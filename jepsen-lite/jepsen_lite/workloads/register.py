"""The ``register`` workload: several writers per key, siblings expected.

Every operation picks one of a few active keys (``active_keys``, default 3; a key
rotates out after ``writes_per_key`` writes, default 200) and does one of:

- *read, then write with the read's context* (50 %): the read is recorded, the
  write records ``extra["seen"]`` = the values that read returned (the versions
  its context supersedes);
- *blind write* (15 %): no context, so it supersedes nothing and must survive as
  a sibling until some later write sees it;
- *read, then delete with the read's context* (5 %): ``extra["seen"]`` likewise;
- *read* (30 %).

Written values are unique integers. After healing and repair every key is read
once more (``extra["final"] = True``, r = all).

Checked (see :mod:`jepsen_lite.checkers.register`): no acknowledged write lost
unless a write or delete that saw it exists; nothing phantom, failed-but-visible
or read from the future; no value returned together with one that superseded it;
nothing superseded comes back. With strict quorums (default) also
read-your-writes per process (:mod:`jepsen_lite.checkers.session`; monotonic reads
are *not* expected: read repair is asynchronous, so a write in flight may be seen
by one read and not by the next). And every replica converged.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

from jepsen_lite.backends.base import ReplicaStates
from jepsen_lite.checkers.register import SEEN, check_register
from jepsen_lite.checkers.session import check_session
from jepsen_lite.history import Op, Validity, merge_validity
from jepsen_lite.workloads.base import (
    CheckOutcome,
    WorkerContext,
    Workload,
    WorkloadOptions,
    convergence_outcome,
    slim,
)
from kvcluster import ReadResult

__all__ = ["RegisterWorkload", "decode_values"]


def decode_values(r: ReadResult) -> list[int]:
    """The sibling values of a read, as sorted integers (duplicates kept)."""
    return sorted(int(v) for v in r.values)


class RegisterWorkload(Workload):
    name: ClassVar[str] = "register"
    description: ClassVar[str] = "multi-writer registers with contexts, blind writes and deletes"
    key_prefix: ClassVar[str] = "reg"

    def __init__(self, options: WorkloadOptions) -> None:
        super().__init__(options)
        self.active_keys = int(options.extra.get("active_keys", 3))
        self.per_key = int(options.extra.get("writes_per_key", 200))
        self._alloc = threading.Lock()
        self._slots = [self._new_key() for _ in range(self.active_keys)]
        self._count: Counter[str] = Counter()  # writes per key

    def decode_read(self, read: ReadResult) -> list[int]:
        return decode_values(read)

    def _key(self, slot: int) -> str:
        with self._alloc:
            return self._slots[slot]

    def _value(self, key: str) -> int:
        """A new value to write to ``key``; the key rotates out after ``per_key`` writes."""
        with self._alloc:
            self._count[key] += 1
            if self._count[key] >= self.per_key:
                for i, k in enumerate(self._slots):
                    if k == key:
                        self._slots[i] = self._new_key()
            return self._new_value()

    def run_worker(self, ctx: WorkerContext) -> None:
        strict = self.options.strict
        while not ctx.stop.is_set():
            key = self._key(ctx.rng.randrange(self.active_keys))
            roll = ctx.rng.random()
            if roll < 0.30:
                self._read(ctx, key, strict=strict)
            elif roll < 0.45:
                value = self._value(key)
                ctx.call(
                    "write",
                    key,
                    value,
                    partial(ctx.client.put, key, str(value), strict=strict),
                    write=True,
                )
            elif roll < 0.95:
                read = self._read(ctx, key, strict=strict)
                if read is None:
                    continue
                value, context = self._value(key), read.context
                ctx.call(
                    "write",
                    key,
                    value,
                    partial(ctx.client.put, key, str(value), context=context, strict=strict),
                    write=True,
                    extra={SEEN: decode_values(read)},
                )
            else:
                read = self._read(ctx, key, strict=strict)
                if read is None or not read.found:
                    continue
                context = read.context
                ctx.call(
                    "delete",
                    key,
                    None,
                    partial(ctx.client.delete, key, context=context, strict=strict),
                    write=True,
                    extra={SEEN: decode_values(read)},
                )

    @staticmethod
    def check(
        history: Sequence[Op], replicas: ReplicaStates | None, options: WorkloadOptions
    ) -> CheckOutcome:
        result = check_register(history)
        checkers: dict[str, dict[str, Any]] = {
            "register": slim(result.to_dict(), keep=("lost_values", "keys_without_final_read"))
        }
        anomalies: list[dict[str, Any]] = [
            {"checker": "register", **a.to_dict()} for a in result.anomalies
        ]
        parts: list[Validity] = [result.valid]
        session_violations = 0
        if options.strict:
            # Only read-your-writes is guaranteed (strict R + W > N); monotonic reads
            # are not (a write in flight may be seen by one read, not by the next).
            session = check_session(history, read_your_writes=True, monotonic_reads=False)
            checkers["session"] = slim(session.to_dict())
            anomalies += [{"checker": "session", **v.to_dict()} for v in session.read_your_writes]
            session_violations = len(session.read_your_writes)
            parts.append(session.valid)
        conv_valid, conv, conv_anomalies = convergence_outcome(replicas)
        checkers["convergence"] = conv
        anomalies += conv_anomalies
        parts.append(conv_valid)
        summary = {
            "writes": result.write_count,
            "acknowledged_writes": result.acknowledged_count,
            "failed_writes": result.failed_count,
            "indeterminate_writes": result.indeterminate_count,
            "superseded": result.superseded_count,
            "present_in_final_reads": result.present_count,
            "reads": result.read_count,
            "final_reads": result.final_read_count,
            "keys": result.key_count,
            "lost": len(result.lost),
            "lost_values": [a.value for a in result.lost],
            "anomalies": len(result.anomalies),
            "read_your_writes_violations": session_violations,
        }
        return CheckOutcome(merge_validity(parts), checkers, anomalies, summary)
