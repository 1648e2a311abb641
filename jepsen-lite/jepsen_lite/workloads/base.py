"""What every workload shares: worker context, error classification, retry policy.

A workload drives ``concurrency`` worker threads, each a sequence of client
*processes* (Jepsen's convention: after an operation whose outcome is unknown the
process is considered crashed and the worker continues as a new process, number
``worker + k * concurrency``). Every operation is recorded in the shared
:class:`~jepsen_lite.history.HistoryRecorder` as an invocation and exactly one
completion:

- ``ok``: the database answered; for a read the value is what it returned;
- ``fail``: the database said the operation was **not** applied
  (``Unavailable``, ``InvalidArgument``, ``Overloaded``, ``NotReady``, ``StorageFull``,
  or any error of a read);
- ``info``: anything else (``Timeout``, a lost connection, ...): the write may or
  may not have been applied, now or later.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, TypeVar

from jepsen_lite.backends.base import ReplicaStates
from jepsen_lite.history import HistoryRecorder, Op, OpType, Validity
from kvcluster import Client, ReadResult, errors
from kvcluster.client.policies import Decision, NodeFailure

__all__ = [
    "DEFINITE_FAILURES",
    "CheckOutcome",
    "SafeRetryPolicy",
    "WorkerContext",
    "Workload",
    "WorkloadOptions",
    "classify",
    "error_text",
]

T = TypeVar("T")

#: Errors that mean "nothing was applied": the node refused before doing anything.
DEFINITE_FAILURES: tuple[type[errors.KVError], ...] = (
    errors.Unavailable,
    errors.InvalidArgument,
    errors.Overloaded,
    errors.NotReady,
    errors.StorageFull,
)


def classify(exc: BaseException, *, write: bool) -> OpType:
    """``fail`` if the operation certainly had no effect, else ``info``.

    A read has no effect either way, but a timed-out read is still ``info`` (Jepsen's
    convention: a timeout is never ``fail``); it constrains nothing in the checkers.
    """
    if isinstance(exc, DEFINITE_FAILURES):
        return "fail"
    if not write and not isinstance(exc, errors.Timeout | errors.Unreachable):
        return "fail"
    return "info"


def error_text(exc: BaseException) -> str:
    if isinstance(exc, errors.KVError):
        return f"{exc.kind}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _never_connected(failure: NodeFailure) -> bool:
    reason = failure.reason.lower()
    return not failure.sent and ("failed to connect" in reason or "connection refused" in reason)


class SafeRetryPolicy:
    """The client's retry policy for the harness.

    Reads are retried on another node like the client's default policy does. A write
    is retried only when the connection to the node could not even be made: gRPC
    reports ``UNAVAILABLE`` also when a connection breaks *after* the request was
    sent (a node killed mid-request), and retrying such a write elsewhere would
    apply it twice (two siblings of one write), which the checkers would rightly
    flag as an anomaly the database did not commit.
    """

    def __init__(self, max_attempts: int = 3) -> None:
        self.max_attempts = max_attempts

    def decide(self, op: str, error: Exception, attempt: int) -> Decision:
        if attempt >= self.max_attempts:
            return Decision.RAISE
        if isinstance(error, NodeFailure):
            if op in ("get", "get_many") or _never_connected(error):
                return Decision.RETRY_NEXT
            return Decision.RAISE
        if isinstance(error, errors.NotReady):
            return Decision.RETRY_NEXT
        return Decision.RAISE


@dataclass(frozen=True)
class WorkloadOptions:
    """Options every workload understands (stored in ``run.json``)."""

    concurrency: int = 8
    seed: int = 1
    strict: bool = True  # primary-only quorums (R + W > N holds: reads see acked writes)
    client_timeout: float = 2.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "seed": self.seed,
            "strict": self.strict,
            "client_timeout": self.client_timeout,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkloadOptions:
        return cls(
            concurrency=int(d.get("concurrency", 8)),
            seed=int(d.get("seed", 1)),
            strict=bool(d.get("strict", True)),
            client_timeout=float(d.get("client_timeout", 2.0)),
            extra=dict(d.get("extra", {})),
        )


@dataclass
class WorkerContext:
    """One worker thread: its client, random source and current process number."""

    worker: int
    concurrency: int
    recorder: HistoryRecorder
    client: Client
    rng: random.Random
    stop: threading.Event
    generation: int = 0
    base: int = 0  # process numbers of this context start here
    backoff: float = 0.1  # seconds to wait after an operation that did not succeed

    @property
    def process(self) -> int:
        return self.base + self.worker + self.generation * self.concurrency

    def crash(self) -> None:
        """The current process had an indeterminate operation: continue as a new one."""
        self.generation += 1

    def call(
        self,
        f: str,
        key: str,
        value: Any,
        action: Callable[[], T],
        *,
        write: bool,
        result: Callable[[Any], Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[bool, T | None]:
        """Record ``f`` on ``key``, run ``action`` and record its completion.

        Returns ``(True, result)`` on ``ok``. On an error the completion is ``fail`` or
        ``info`` (see :func:`classify`), with the error text in ``extra["error"]``; after
        ``info`` the worker continues as a new process.
        """
        p = self.process
        self.recorder.invoke(p, f, key, value, extra)
        try:
            out = action()
        except Exception as exc:
            outcome = classify(exc, write=write)
            self.recorder.complete(p, outcome, value, {"error": error_text(exc)})
            if outcome == "info":
                self.crash()
            self.stop.wait(self.backoff)  # do not spin on an unavailable cluster
            return False, None
        try:
            recorded = result(out) if result is not None else value
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            # The database returned something the workload never wrote: record it as
            # it came, so the checkers report it (an unexpected element, a phantom).
            recorded = [f"<undecodable: {exc}>"]
        self.recorder.ok(p, recorded)
        return True, out


@dataclass
class CheckOutcome:
    """A workload's verdict: overall validity, per-checker results, flat anomalies."""

    valid: Validity
    checkers: dict[str, dict[str, Any]]
    anomalies: list[dict[str, Any]]
    summary: dict[str, Any]


class Workload(ABC):
    """A workload: how workers call the database, how the result is checked."""

    name: ClassVar[str] = "workload"
    description: ClassVar[str] = ""
    key_prefix: ClassVar[str] = "key"  # keys are named <key_prefix>-0, <key_prefix>-1, ...

    def __init__(self, options: WorkloadOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._keys: list[str] = []
        self._values = itertools.count(1)

    def node_settings(self) -> dict[str, Any]:
        """Node settings this workload needs (merged under the user's)."""
        return {}

    def _new_key(self) -> str:
        """A key never used before (remembered for :meth:`keys`)."""
        with self._lock:
            name = f"{self.key_prefix}-{len(self._keys)}"
            self._keys.append(name)
        return name

    def _new_value(self) -> int:
        """A value never written before: 1, 2, ... across every key and worker."""
        with self._lock:
            return next(self._values)

    def keys(self) -> list[str]:
        """Every key the workload has used."""
        with self._lock:
            return list(self._keys)

    @abstractmethod
    def decode_read(self, read: ReadResult) -> Any:
        """What a read returned, as recorded in the history (its ``ok`` value)."""

    def _read(
        self, ctx: WorkerContext, key: str, *, final: bool = False, **options: Any
    ) -> ReadResult | None:
        """Record a read of ``key`` (``Client.get`` with these options); the result
        if it succeeded."""
        ok, read = ctx.call(
            "read",
            key,
            None,
            partial(ctx.client.get, key, **options),
            write=False,
            result=self.decode_read,
            extra={"final": True} if final else None,
        )
        return read if ok else None

    @abstractmethod
    def run_worker(self, ctx: WorkerContext) -> None:
        """Issue operations until ``ctx.stop`` is set."""

    def final_reads(self, ctx: WorkerContext, *, attempts: int = 10, pause: float = 0.5) -> None:
        """After healing and repair: read every key once more (``extra["final"]``,
        r = all), retrying each until it succeeds (at most ``attempts`` times)."""
        for key in self.keys():
            for _ in range(attempts):
                if self._read(ctx, key, final=True, r="all", strict=True) is not None:
                    break
                time.sleep(pause)

    @staticmethod
    @abstractmethod
    def check(
        history: Sequence[Op], replicas: ReplicaStates | None, options: WorkloadOptions
    ) -> CheckOutcome:
        """Check a history (and the replicas' final states) of this workload."""


def convergence_outcome(
    replicas: ReplicaStates | None,
) -> tuple[Validity, dict[str, Any], list[dict[str, Any]]]:
    """Run the convergence checker on the replicas' final states."""
    from jepsen_lite.checkers.convergence import check_convergence

    if replicas is None:
        return (
            "unknown",
            {"checker": "convergence", "valid": "unknown", "note": "no replica states"},
            [],
        )
    result = check_convergence(replicas.states, owners=replicas.owners)
    d = result.to_dict()
    if replicas.errors:
        d["read_errors"] = replicas.errors
    anomalies = [
        {"checker": "convergence", "kind": "divergent", "key": div.key, "values": div.values}
        for div in result.divergent
    ]
    return result.valid, d, anomalies


def slim(d: Mapping[str, Any], keep: Sequence[str] = ()) -> dict[str, Any]:
    """A checker's ``to_dict()`` without its long lists of operations (the anomalies
    list of the results carries those); lists named in ``keep`` stay."""
    return {k: v for k, v in d.items() if k in keep or not isinstance(v, list)}
