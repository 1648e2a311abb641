"""The YCSB core workloads this suite runs, and the phase descriptions the runner executes.

| workload | mix                              | YCSB name                    |
|----------|----------------------------------|------------------------------|
| A        | 50% read, 50% update             | update heavy (session store) |
| B        | 95% read, 5% update              | read mostly (photo tagging)  |
| C        | 100% read                        | read only (profile cache)    |
| F        | 50% read, 50% read-modify-write  | read-modify-write            |

A read-modify-write is one operation to YCSB (its latency covers the read and
the write); the runner records it as ``rmw``. Keys are chosen with YCSB's
scrambled zipfian by default.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

WORKLOADS: Mapping[str, Mapping[str, float]] = {
    "A": {"read": 0.5, "update": 0.5},
    "B": {"read": 0.95, "update": 0.05},
    "C": {"read": 1.0},
    "F": {"read": 0.5, "rmw": 0.5},
}

#: Kinds of phase: ``load`` inserts every record once (keys in order); ``mix``
#: runs a workload's operation mix; ``put_many`` / ``get_many`` send batches
#: of ``batch_size`` consecutive distinct records.
PhaseKind = Literal["load", "mix", "put", "get", "put_many", "get_many"]
#: The kinds whose calls move ``batch_size`` keys each (their rate is reported in keys/s).
BATCH_KINDS: tuple[PhaseKind, ...] = ("put_many", "get_many")


@dataclass(frozen=True)
class Phase:
    """One measured phase. ``ops`` and ``duration`` both bound it: the first reached ends it.

    ``ops`` counts measured calls (a batch call is one op of ``batch_size`` keys);
    calls started during the first ``warmup`` seconds are not measured and come on top.
    With ``target_rate`` (calls/s over all workers) the phase is open-loop:
    calls start on a fixed schedule and latency is measured from each call's
    intended start, so a stalled server is charged for the calls it delayed
    (no coordinated omission). Without it the phase is closed-loop:
    ``concurrency`` callers each start their next call when the last ends.
    """

    name: str
    kind: PhaseKind
    ops: int
    duration: float
    concurrency: int
    records: int
    value_size: int = 1000
    mix: Mapping[str, float] = field(default_factory=dict)
    distribution: str = "zipfian"
    target_rate: float | None = None
    max_inflight: int = 1024
    warmup: float = 0.0
    batch_size: int = 100
    seed: int = 1

    def for_worker(self, index: int, workers: int) -> Phase:
        """This phase's share for worker ``index`` of ``workers`` (concurrency, ops, rate).

        Each worker batches only its own records (every ``workers``-th one, at least
        ``records // workers``), so ``batch_size`` is capped at that for every worker."""

        def share(total: int) -> int:
            return total // workers + (1 if index < total % workers else 0)

        return replace(
            self,
            ops=share(self.ops),
            concurrency=max(1, share(self.concurrency)),
            target_rate=None if self.target_rate is None else self.target_rate / workers,
            max_inflight=max(1, share(self.max_inflight)),
            batch_size=min(self.batch_size, self.records // workers),
            seed=self.seed * 1_000_003 + index,
        )

    @property
    def open_loop(self) -> bool:
        return self.target_rate is not None

    @property
    def keys_per_call(self) -> int:
        """``batch_size`` for batch phases, 1 otherwise."""
        return self.batch_size if self.kind in BATCH_KINDS else 1


class OpChooser:
    """Draws operation names with the workload's proportions (seeded)."""

    def __init__(self, mix: Mapping[str, float], rng: random.Random) -> None:
        total = sum(mix.values())
        if not mix or total <= 0:
            raise ValueError("an operation mix needs at least one positive proportion")
        self.names = sorted(mix)
        acc = 0.0
        self.bounds: list[float] = []
        for name in self.names:
            acc += mix[name] / total
            self.bounds.append(acc)
        self.rng = rng

    def next(self) -> str:
        u = self.rng.random()
        for name, bound in zip(self.names, self.bounds, strict=True):
            if u < bound:
                return name
        return self.names[-1]


def workload(name: str) -> Mapping[str, float]:
    try:
        return WORKLOADS[name.upper()]
    except KeyError:
        raise ValueError(
            f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})"
        ) from None
