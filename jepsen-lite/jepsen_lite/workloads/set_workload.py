"""The ``set`` workload: unique adds to a few shared sets; no acknowledged add may be lost.

Design. Each set is one key whose value is a JSON list of integers. An add of
element ``e`` is a read-modify-write: read the key (every sibling plus the causal
context), write the union of the siblings plus ``e`` with that context. The read
is recorded as a ``read`` operation (its value: the union it returned) and the
write as ``add e``. Several workers add to the same key at once, so writes race:
the store must keep racing writes as siblings, and the next add merges them.

Why not one key per element (a blind write per add)? Then no two writes ever
touch the same key, and the workload could only catch writes lost by replication
or durability bugs. With read-modify-writes on shared keys, an element survives
only if every later write either saw it (and carried it into its union) or was
concurrent with it (so it stays a sibling): the test also catches broken causal
contexts, sibling resolution (``--unsafe lww`` loses elements quickly), read repair,
hinted handoff and anti-entropy bugs. The invariant is exact: with correct
contexts, the union of the live siblings only grows.

Keys rotate: a key takes at most ``elements_per_key`` adds (default 100), then a
new key replaces it, so values and checker work stay bounded in long runs.
``active_keys`` (default 3) keys are written at any time.

Quorums are strict (primaries only) by default, R = W = 2 of N = 3: a read then sees
every add acknowledged before it began, so an acknowledged add missing from a
later read is an anomaly (``stale``, with ``stale_after_ack``), not only one missing
from the final read (``lost``). With ``--sloppy`` only final reads count.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

from jepsen_lite.backends.base import ReplicaStates
from jepsen_lite.checkers.set_checker import SetAnomaly, check_set
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

__all__ = ["SetWorkload", "decode_set"]


def decode_set(values: Sequence[bytes]) -> list[int]:
    """The union of the sibling values (each a JSON list of ints), sorted."""
    out: set[int] = set()
    for raw in values:
        items = json.loads(raw)
        if not isinstance(items, list):
            raise ValueError(f"set value is not a JSON list: {raw[:80]!r}")
        out.update(int(x) for x in items)
    return sorted(out)


def encode_set(items: Sequence[int]) -> bytes:
    return json.dumps(sorted(items), separators=(",", ":")).encode()


class SetWorkload(Workload):
    name: ClassVar[str] = "set"
    description: ClassVar[str] = "read-modify-write adds of unique elements to a few shared sets"
    key_prefix: ClassVar[str] = "set"

    def __init__(self, options: WorkloadOptions) -> None:
        super().__init__(options)
        self.active_keys = int(options.extra.get("active_keys", 3))
        self.per_key = int(options.extra.get("elements_per_key", 100))
        self._alloc = threading.Lock()
        self._slots = [self._new_key() for _ in range(self.active_keys)]
        self._count: Counter[str] = Counter()  # adds per key

    def decode_read(self, read: ReadResult) -> list[int]:
        return decode_set(read.values)

    def _allocate(self, slot: int) -> tuple[str, int]:
        """A key and a new unique element for it (rotating full keys)."""
        with self._alloc:
            key = self._slots[slot]
            if self._count[key] >= self.per_key:
                key = self._slots[slot] = self._new_key()
            self._count[key] += 1
            return key, self._new_value()

    def run_worker(self, ctx: WorkerContext) -> None:
        strict = self.options.strict
        while not ctx.stop.is_set():
            key, element = self._allocate(ctx.rng.randrange(self.active_keys))
            read = self._read(ctx, key, strict=strict)
            if read is None:
                continue
            context = read.context
            value = encode_set([*decode_set(read.values), element])
            ctx.call(
                "add",
                key,
                element,
                partial(ctx.client.put, key, value, context=context, strict=strict),
                write=True,
            )

    @staticmethod
    def check(
        history: Sequence[Op], replicas: ReplicaStates | None, options: WorkloadOptions
    ) -> CheckOutcome:
        strict = options.strict
        result = check_set(history, allow_stale=not strict, stale_after_ack=strict)
        conv_valid, conv, conv_anomalies = convergence_outcome(replicas)
        anomalies: list[dict[str, Any]] = []

        def add(kind: str, items: list[SetAnomaly], why: str) -> None:
            for a in items:
                anomalies.append(
                    {"checker": "set", "kind": kind, "explanation": why, **a.to_dict()}
                )

        add("lost", result.lost, "acknowledged (or seen) add missing from a final read")
        add("unexpected", result.unexpected, "a read returned an element never added")
        add("failed-visible", result.failed_visible, "a read returned a failed add")
        add("duplicated", result.duplicated, "a read returned an element twice")
        if strict:
            add(
                "stale",
                result.stale,
                "acknowledged add missing from a read that began after the acknowledgement "
                "(strict R + W > N: every such read must see it)",
            )
        anomalies.extend(conv_anomalies)
        set_dict = slim(result.to_dict(), keep=("lost_elements", "unread_keys"))
        valid: Validity = merge_validity([result.valid, conv_valid])
        summary = {
            "attempted_adds": result.attempt_count,
            "acknowledged_adds": result.acknowledged_count,
            "failed_adds": result.failed_count,
            "indeterminate_adds": result.indeterminate_count,
            "reads": result.read_count,
            "final_reads": result.final_read_count,
            "keys": result.key_count,
            "lost": len(result.lost),
            "stale": len(result.stale) if strict else 0,
            "stale_reads_allowed": 0 if strict else len(result.stale),
            "recovered": len(result.recovered),
            "lost_elements": result.lost_elements,
            "stale_elements": [a.element for a in result.stale] if strict else [],
        }
        return CheckOutcome(valid, {"set": set_dict, "convergence": conv}, anomalies, summary)
