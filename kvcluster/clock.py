"""The Clock seam: node logic reads time only through a :class:`Clock`.

Monotonic time is the event loop's (``loop.time()``), so under the simulator's
virtual-time loop every timer, timeout and sleep is virtual as well. Wall-clock
time (used for value timestamps and tombstone grace periods) comes from
:meth:`Clock.wall_ms` and carries a settable offset, which is how jepsen-lite
and the simulator inject clock skew in-process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch, as this node believes."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (the event loop's clock)."""
        ...


class SystemClock:
    """Real time, optionally skewed by ``offset_ms`` (for fault injection)."""

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def wall_ms(self) -> int:
        return int(time.time() * 1000) + self.offset_ms

    def monotonic(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()


class LoopClock:
    """Wall time derived from the running loop's clock, for the simulator.

    ``wall_ms`` is ``epoch_ms + loop.time()`` plus a per-node skew, so it is
    virtual and deterministic under the simulator's loop.
    """

    def __init__(self, epoch_ms: int = 1_700_000_000_000, offset_ms: int = 0) -> None:
        self.epoch_ms = epoch_ms
        self.offset_ms = offset_ms

    def wall_ms(self) -> int:
        return self.epoch_ms + int(asyncio.get_running_loop().time() * 1000) + self.offset_ms

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()
