"""Quorum levels and quorum tallies (Riak's R/W, Cassandra's consistency levels).

A request names how many of the key's N replicas must answer: a number
``1..N`` or a symbolic level. :func:`parse_quorum` turns the user's value into
that number, rejecting anything else with
:class:`~kvcluster.errors.InvalidArgument` naming the offending field.

A :class:`Tally` counts the answers of one request's targets and says when
the request is decided: **won** once ``required`` targets acknowledged,
**lost** once so many failed that ``required`` can no longer be reached
(Riak returns the error at that point rather than waiting for the timeout),
**pending** otherwise. Each target counts once: its first answer is the one
that counts, later ones are ignored (retries and duplicated messages cannot
inflate a quorum). Once decided, the outcome never changes. A tally is a
small mutable accumulator with no I/O or clock; the coordinator feeds it
replies and owns the deadline.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from kvcluster.core.ring import NodeId
from kvcluster.errors import InvalidArgument

__all__ = ["LEVELS", "Outcome", "Tally", "parse_quorum", "quorum_size"]

LEVELS = ("one", "quorum", "all", "default")
"""The symbolic quorum levels, accepted case-insensitively."""


def quorum_size(n: int) -> int:
    """A majority of ``n`` replicas: ``n // 2 + 1``."""
    return n // 2 + 1


def parse_quorum(value: int | str | None, n: int, default: int, field: str = "quorum") -> int:
    """The number of replicas ``value`` asks for, out of ``n``.

    ``None`` and ``"default"`` give ``default``; ``"one"`` 1; ``"quorum"``
    ``n // 2 + 1``; ``"all"`` ``n``; an int or a string of digits is taken as
    is. Names are case-insensitive and may carry surrounding spaces. The
    result must be between 1 and ``n``; anything else raises
    :class:`InvalidArgument` with ``field`` (e.g. ``"r"`` or ``"w"``).

    ``n`` and ``default`` come from configuration, not the request: if they are
    out of range it is a bug and raises ValueError.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(default, bool) or not isinstance(default, int) or not 1 <= default <= n:
        raise ValueError(f"default {field} must be between 1 and n={n}, got {default!r}")
    if value is None:
        return default
    if isinstance(value, bool):  # a bool is an int to Python, never a quorum to us
        raise InvalidArgument(f"{field} must be a number or a quorum level, got {value!r}", field)
    if isinstance(value, str):
        name = value.strip().lower()
        if name == "one":
            return 1
        if name == "quorum":
            return quorum_size(n)
        if name == "all":
            return n
        if name == "default":
            return default
        if not (name.isascii() and name.isdigit()):
            levels = ", ".join(LEVELS)
            raise InvalidArgument(
                f"{field} must be one of {levels} or a number from 1 to {n}, got {value!r}",
                field,
            )
        number = int(name)
    elif isinstance(value, int):
        number = value
    else:
        raise InvalidArgument(
            f"{field} must be a number or a quorum level, got {type(value).__name__}", field
        )
    if not 1 <= number <= n:
        raise InvalidArgument(f"{field} must be between 1 and n={n}, got {number}", field)
    return number


class Outcome(enum.Enum):
    """Where a :class:`Tally` stands."""

    WON = "won"
    PENDING = "pending"
    LOST = "lost"


class Tally:
    """Counts the acknowledgements and failures of one request's targets.

    ``Tally(required, targets)``: the request succeeds once ``required`` of the
    distinct ``targets`` (node ids) acknowledged. A target's first answer
    counts; later ``ok`` / ``failed`` calls for it are ignored. Answers from
    nodes that are not targets are a caller bug (ValueError).
    """

    __slots__ = ("_acked", "_failed", "required", "targets")

    def __init__(self, required: int, targets: Iterable[NodeId]) -> None:
        nodes = tuple(targets)
        if isinstance(required, bool) or not isinstance(required, int) or required < 1:
            raise ValueError(f"required must be a positive int, got {required!r}")
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"targets must be distinct, got {list(nodes)}")
        self.required = required
        self.targets: frozenset[NodeId] = frozenset(nodes)
        self._acked: set[NodeId] = set()
        self._failed: set[NodeId] = set()

    def ok(self, node: NodeId) -> Outcome:
        """Record that ``node`` acknowledged (ignored if it already answered)."""
        if self._first_answer(node):
            self._acked.add(node)
        return self.outcome

    def failed(self, node: NodeId) -> Outcome:
        """Record that ``node`` failed or refused (ignored if it already answered)."""
        if self._first_answer(node):
            self._failed.add(node)
        return self.outcome

    def _first_answer(self, node: NodeId) -> bool:
        if node not in self.targets:
            raise ValueError(f"{node!r} is not a target of this request")
        return node not in self._acked and node not in self._failed

    @property
    def acks(self) -> int:
        """How many targets acknowledged."""
        return len(self._acked)

    @property
    def failures(self) -> int:
        """How many targets failed."""
        return len(self._failed)

    @property
    def acked(self) -> frozenset[NodeId]:
        """The targets that acknowledged."""
        return frozenset(self._acked)

    @property
    def failed_nodes(self) -> frozenset[NodeId]:
        """The targets that failed."""
        return frozenset(self._failed)

    @property
    def waiting(self) -> frozenset[NodeId]:
        """The targets that have not answered yet."""
        return self.targets - self._acked - self._failed

    @property
    def outcome(self) -> Outcome:
        """WON once ``required`` acks; LOST once too few targets are left to get there."""
        if len(self._acked) >= self.required:
            return Outcome.WON
        if len(self.targets) - len(self._failed) < self.required:
            return Outcome.LOST
        return Outcome.PENDING

    def __repr__(self) -> str:
        return (
            f"Tally(required={self.required}, acks={self.acks}, failures={self.failures}, "
            f"targets={len(self.targets)}, outcome={self.outcome.name})"
        )
