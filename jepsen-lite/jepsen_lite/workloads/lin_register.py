"""The ``lin-register`` workload: single-writer registers checked for linearizability.

What can be linearizable in this store? kvcluster has no compare-and-set and keeps
concurrent writes as siblings, so a plain read/write register model does not fit;
the model that does is a *multi-value register*
(:class:`~jepsen_lite.checkers.mv_register.MultiValueRegisterModel`): the state is
the set of live values, a read returns it, and a write of ``v`` that passed the
context of a read returning ``S`` turns the state into ``(state - S) | {v}``.

Even with that model, two things make a Dynamo-style store non-linearizable by
design, and the workload is built to avoid them (so that what is left is a claim
the store does make):

1. *Partial reads.* With R < N, a write that has reached one replica can be seen
   by one read and missed by a later read that asked other replicas (read repair
   is asynchronous). Here every read uses **r = all, strict** (every primary
   answers; with a node down reads are unavailable). A version on any replica is
   then seen by every read that starts afterwards: a write becomes visible
   atomically, when it reaches its first replica (its coordinator).
2. *Several writes in flight.* Two in-flight writes reaching different replicas
   first can be observed in opposite orders by two concurrent reads, even with
   r = all. So each key has **one writer** at a time, whose writes follow each
   other (each passes the context of the writer's own preceding read, ``w = quorum,
   strict``). A write whose outcome is unknown (timeout, lost connection) may still
   land at any later time, e.g. from the socket of a paused node; the writer then
   **moves to a fresh key** and never writes the old one again, so at most one write
   per key is ever in flight. The client never retries a write that may have been
   sent (:class:`~jepsen_lite.workloads.base.SafeRetryPolicy`).

The claim checked: *for every key, the history is linearizable with respect to the
multi-value register* (Wing-Gong / Porcupine search per key). This implies every
acknowledged write is visible to every read that begins after it, values never go
back to an older state, and no sibling appears that the writes do not explain. The
:mod:`register checker <jepsen_lite.checkers.register>` (nothing lost after
healing) and replica convergence are checked too.

``writers`` (default ``concurrency // 3``, at least 1) workers write, the others read
random active keys. A key rotates after ``writes_per_key`` (default 60) writes to
keep each key's search small.

``read_quorum`` (default ``all``) exists to show that the checker catches a
violation: ``--option read_quorum=one`` (R + W = N: a deliberate misconfiguration)
lets a read that reaches the replica a write landed on first see it while a later
read that asks another replica does not, which the checker must report.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

from jepsen_lite.backends.base import ReplicaStates
from jepsen_lite.checkers.linearizable import check_linearizable
from jepsen_lite.checkers.mv_register import MultiValueRegisterModel
from jepsen_lite.checkers.register import SEEN, check_register
from jepsen_lite.history import Op, Validity, merge_validity
from jepsen_lite.workloads.base import (
    CheckOutcome,
    WorkerContext,
    Workload,
    WorkloadOptions,
    convergence_outcome,
    slim,
)
from jepsen_lite.workloads.register import decode_values
from kvcluster import ReadResult

__all__ = ["LinRegisterWorkload"]

PREFIX_SHOWN = 20  # operations of a counterexample's linearizable prefix kept in results


class LinRegisterWorkload(Workload):
    name: ClassVar[str] = "lin-register"
    description: ClassVar[str] = (
        "single-writer multi-value registers, r=all, checked for linearizability"
    )
    key_prefix: ClassVar[str] = "lin"

    def __init__(self, options: WorkloadOptions) -> None:
        super().__init__(options)
        self.writers = max(1, int(options.extra.get("writers", options.concurrency // 3)))
        self.per_key = int(options.extra.get("writes_per_key", 60))
        self.read_quorum = str(options.extra.get("read_quorum", "all"))
        self._alloc = threading.Lock()
        self._slots = [self._new_key() for _ in range(self.writers)]

    def decode_read(self, read: ReadResult) -> list[int]:
        return decode_values(read)

    def _rotate(self, slot: int) -> None:
        with self._alloc:
            self._slots[slot] = self._new_key()

    def _key(self, slot: int) -> str:
        with self._alloc:
            return self._slots[slot]

    def _read_key(self, ctx: WorkerContext, key: str) -> ReadResult | None:
        return self._read(ctx, key, r=self.read_quorum, strict=True)

    def run_worker(self, ctx: WorkerContext) -> None:
        if ctx.worker < self.writers:
            self._write_loop(ctx, ctx.worker)
        else:
            while not ctx.stop.is_set():
                self._read_key(ctx, self._key(ctx.rng.randrange(self.writers)))

    def _write_loop(self, ctx: WorkerContext, slot: int) -> None:
        writes = 0
        while not ctx.stop.is_set():
            key = self._key(slot)
            read = self._read_key(ctx, key)
            if read is None:
                ctx.stop.wait(0.05)
                continue
            value = self._new_value()
            context = read.context
            before = ctx.process
            ctx.call(
                "write",
                key,
                value,
                partial(ctx.client.put, key, str(value), context=context, w="quorum", strict=True),
                write=True,
                extra={SEEN: decode_values(read)},
            )
            writes += 1
            if ctx.process != before or writes >= self.per_key:
                # Unknown outcome: the write may land later; never write this key again.
                self._rotate(slot)
                writes = 0

    @staticmethod
    def check(
        history: Sequence[Op], replicas: ReplicaStates | None, options: WorkloadOptions
    ) -> CheckOutcome:
        limit = float(options.extra.get("lin_time_limit", 120.0))
        lin = check_linearizable(
            history, MultiValueRegisterModel(), time_limit_s=limit, stop_on_first_failure=False
        )
        reg = check_register(history)
        conv_valid, conv, conv_anomalies = convergence_outcome(replicas)
        lin_dict = lin.to_dict()
        anomalies: list[dict[str, Any]] = []
        for k in lin.invalid_keys:
            d = k.to_dict()
            cex = d.get("counterexample")
            if cex and len(cex.get("prefix", [])) > PREFIX_SHOWN:
                # the operations just before the one that cannot be linearized matter
                cex["prefix_length"] = len(cex["prefix"])
                cex["prefix"] = cex["prefix"][-PREFIX_SHOWN:]
            anomalies.append({"checker": "linearizable", "kind": "not-linearizable", **d})
        anomalies += [{"checker": "register", **a.to_dict()} for a in reg.anomalies]
        anomalies += conv_anomalies
        parts: list[Validity] = [lin.valid, reg.valid, conv_valid]
        summary = {
            "keys": lin.key_count,
            "operations": lin.op_count,
            "writes": reg.write_count,
            "acknowledged_writes": reg.acknowledged_count,
            "indeterminate_writes": reg.indeterminate_count,
            "reads": reg.read_count,
            "linearizable_keys": sum(1 for k in lin.keys if k.valid is True),
            "non_linearizable_keys": [k.key for k in lin.invalid_keys],
            "undecided_keys": [k.key for k in lin.unknown_keys],
            "lost": len(reg.lost),
            "lost_values": [a.value for a in reg.lost],
        }
        checkers = {
            "linearizable": {k: v for k, v in lin_dict.items() if k not in ("keys", "invalid")},
            "register": slim(reg.to_dict(), keep=("lost_values", "keys_without_final_read")),
            "convergence": conv,
        }
        return CheckOutcome(merge_validity(parts), checkers, anomalies, summary)
