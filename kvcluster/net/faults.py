"""In-process fault injection for node-to-node traffic (no root needed).

This machine's kernel has no ``netem`` and libfaketime hangs threaded Python,
so jepsen-lite's ``local`` backend and ``kvctl dev fault`` inject faults
inside each node instead:

- ``blocked``: peers this node neither sends to nor accepts messages from
  (a partition is a set of blocked pairs, installed on both sides);
- ``loss``: probability that any outgoing message is lost;
- ``delay_ms``: extra latency range added to every outgoing message;
- ``clock_offset_ms``: skew of this node's wall clock.

A lost or blocked message behaves like a real one on a cut network: the
caller hears nothing and its call times out. Client traffic is not affected,
as in Jepsen where partitions cut the links between database nodes.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

from kvcluster.clock import SystemClock
from kvcluster.net.transport import NodeId, Transport, TransportError


@dataclass
class Faults:
    blocked: frozenset[NodeId] = frozenset()
    loss: float = 0.0
    delay_ms: tuple[float, float] = (0.0, 0.0)
    clock_offset_ms: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError("loss must be within 0..1")
        lo, hi = self.delay_ms
        if lo < 0 or hi < lo:
            raise ValueError("delay must be a range min..max with 0 <= min <= max")

    @property
    def active(self) -> bool:
        return bool(self.blocked or self.loss or self.delay_ms[1] or self.clock_offset_ms)


@dataclass
class FaultState:
    """The faults in force on one node, shared by its transport, server and clock."""

    clock: SystemClock
    rng: random.Random = field(default_factory=random.Random)
    faults: Faults = field(default_factory=Faults)

    def set(self, faults: Faults) -> None:
        faults.validate()
        self.faults = faults
        self.clock.offset_ms = faults.clock_offset_ms

    def drops_from(self, src: NodeId) -> bool:
        """Whether an incoming message from ``src`` is lost."""
        return src in self.faults.blocked


class FaultyTransport:
    """Wraps a Transport and applies the node's :class:`FaultState` to every call."""

    def __init__(self, inner: Transport, state: FaultState) -> None:
        self.inner = inner
        self.state = state

    async def call(self, dst: NodeId, msg: Any, timeout: float) -> Any:
        faults = self.state.faults
        if not faults.active:
            return await self.inner.call(dst, msg, timeout)
        lost = dst in faults.blocked or (faults.loss and self.state.rng.random() < faults.loss)
        if lost:
            await asyncio.sleep(timeout)
            raise TransportError(dst, f"no reply within {timeout:.3g}s (injected fault)")
        lo, hi = faults.delay_ms
        if hi > 0:
            delay = self.state.rng.uniform(lo, hi) / 1000.0
            if delay >= timeout:
                await asyncio.sleep(timeout)
                raise TransportError(dst, f"no reply within {timeout:.3g}s (injected delay)")
            await asyncio.sleep(delay)
            timeout -= delay
        return await self.inner.call(dst, msg, timeout)

    def set_address(self, node: NodeId, address: str) -> None:
        self.inner.set_address(node, address)

    async def close(self) -> None:
        await self.inner.close()
