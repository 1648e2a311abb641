"""Load balancing and retry as small policy objects (python-driver style).

A :class:`LoadBalancingPolicy` turns "the replicas of this key" and "every
known node" into the order in which nodes are tried. A :class:`RetryPolicy`
decides, after a failed attempt, whether to try the next node or raise.
:class:`NodeHealth` remembers nodes that recently refused connections or
timed out, so plans try them last until they have been quiet for a while.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from kvcluster import errors


class NodeHealth:
    """Addresses that failed recently are avoided for ``down_for`` seconds."""

    def __init__(self, down_for: float = 2.0, now: Callable[[], float] = time.monotonic) -> None:
        self.down_for = down_for
        self._now = now
        self._down_until: dict[str, float] = {}

    def failed(self, address: str) -> None:
        self._down_until[address] = self._now() + self.down_for

    def succeeded(self, address: str) -> None:
        self._down_until.pop(address, None)

    def is_healthy(self, address: str) -> bool:
        until = self._down_until.get(address)
        return until is None or until <= self._now()

    def order(self, addresses: Sequence[str]) -> list[str]:
        """Healthy addresses first (order kept), then the others."""
        healthy = [a for a in addresses if self.is_healthy(a)]
        return healthy + [a for a in addresses if not self.is_healthy(a)]


class LoadBalancingPolicy(Protocol):
    def plan(self, replicas: Sequence[str], nodes: Sequence[str]) -> list[str]:
        """Addresses to try, best first; ``replicas`` may be empty (no ring yet)."""
        ...


class RoundRobinPolicy:
    """Every node in turn, ignoring where the key lives."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def plan(self, replicas: Sequence[str], nodes: Sequence[str]) -> list[str]:
        if not nodes:
            return list(replicas)
        start = next(self._counter) % len(nodes)
        return list(nodes[start:]) + list(nodes[:start])


class TokenAwarePolicy:
    """The key's replicas first (rotated to spread load), then every other node.

    Sending a request straight to a replica saves the coordinator a hop: a
    replica coordinates a write itself instead of forwarding it.
    """

    def __init__(self, rotate: bool = True) -> None:
        self.rotate = rotate
        self._counter = itertools.count()

    def plan(self, replicas: Sequence[str], nodes: Sequence[str]) -> list[str]:
        first = list(replicas)
        if self.rotate and len(first) > 1:
            k = next(self._counter) % len(first)
            first = first[k:] + first[:k]
        seen = set(first)
        return first + [a for a in nodes if a not in seen]


class AllowListPolicy:
    """Only ever contact ``addresses`` (python-driver's WhiteListRoundRobinPolicy).

    For operators and tests that must talk to particular nodes, e.g. the
    minority side of a partition; the node coordinates or forwards itself.
    """

    def __init__(self, addresses: Sequence[str]) -> None:
        if not addresses:
            raise errors.InvalidArgument("the allow list is empty", "nodes")
        self.addresses = list(addresses)
        self._rr = RoundRobinPolicy()

    def plan(self, replicas: Sequence[str], nodes: Sequence[str]) -> list[str]:
        allowed = set(self.addresses)
        preferred = [a for a in replicas if a in allowed]
        rest = [a for a in self._rr.plan((), self.addresses) if a not in preferred]
        return preferred + rest


class Decision(enum.Enum):
    RETRY_NEXT = "retry_next"  # try the next node of the plan
    RAISE = "raise"


class RetryPolicy(Protocol):
    def decide(self, op: str, error: Exception, attempt: int) -> Decision:
        """``op`` is "get", "put", "delete", "put_many" or "get_many"; attempt counts from 1."""
        ...


class NodeFailure(Exception):
    """A node could not be reached or did not answer (client-side condition)."""

    def __init__(self, address: str, reason: str, sent: bool) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.reason = reason
        #: True when the request may have reached the node (deadline passed)
        self.sent = sent


class DefaultRetryPolicy:
    """Retry on another node when it is safe to.

    - connection failures (the request never reached the node): always;
    - a node without a ring yet (``NotReady``): always;
    - a node that did not answer in time: only reads (a write might have
      been applied, and retrying a write without context would add a sibling);
    - everything else (bad input, quorum not met, overload): raise.
    """

    def __init__(self, max_attempts: int = 3) -> None:
        self.max_attempts = max_attempts

    def decide(self, op: str, error: Exception, attempt: int) -> Decision:
        if attempt >= self.max_attempts:
            return Decision.RAISE
        if isinstance(error, NodeFailure):
            if not error.sent or op in ("get", "get_many"):
                return Decision.RETRY_NEXT
            return Decision.RAISE
        if isinstance(error, errors.NotReady):
            return Decision.RETRY_NEXT
        return Decision.RAISE


class FallthroughRetryPolicy:
    """Never retry: every failure reaches the caller."""

    def decide(self, op: str, error: Exception, attempt: int) -> Decision:
        return Decision.RAISE
