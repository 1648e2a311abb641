"""Batched replication to one peer: one batch in flight per peer and lane.

Coordinators hand single reads and writes to a :class:`PeerLink`; its sender
tasks gather whatever is queued into one ``ReplicaRead`` / ``ReplicaWrite``
message, so under load many requests share one RPC (the same idea as group
commit on disk). Reads and writes use separate lanes so reads never wait
behind a large write batch. Each lane's queue is bounded: when a peer falls
behind, new items fail at once with ``Overloaded`` instead of queueing forever,
and items whose deadline passed while queued are dropped unsent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kvcluster import errors
from kvcluster.net.messages import (
    ReplicaRead,
    ReplicaReadReply,
    ReplicaWrite,
    ReplicaWriteReply,
    WriteItem,
)
from kvcluster.net.transport import NodeId, Transport, TransportError

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 (item)
R = TypeVar("R")  # per-item result


#: Called with the offset of a run of submitted items and their results.
Sink = Callable[[int, list[Any]], None]


@dataclass(slots=True)
class _Pending(Generic[I]):
    """Items submitted together: one queue entry, one call of ``sink`` with their results."""

    items: list[I]
    deadline: float
    sink: Sink
    offset: int
    future: asyncio.Future[Any] | None  # single submissions: done means nobody waits

    def skip(self) -> bool:
        return self.future is not None and self.future.done()

    def deliver(self, results: list[Any]) -> None:
        try:
            self.sink(self.offset, results)
        except Exception:  # a caller's bug must not kill the lane that runs its sink
            log.exception("a replication result callback failed")


class _Lane(Generic[I, R]):
    """A bounded queue drained by one sender task, one batch at a time."""

    def __init__(
        self,
        name: str,
        send: Callable[[list[I], float], Coroutine[Any, Any, list[R | Exception]]],
        batch: int,
        limit: int,
    ) -> None:
        self._name = name
        self._send = send
        self._batch = batch
        self._limit = limit
        self._queue: deque[_Pending[I]] = deque()
        self._queued = 0  # items in the queue
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: I, deadline: float) -> asyncio.Future[R]:
        """One item; the future gets its result (or its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._enqueue(loop, [_Pending([item], deadline, _resolver(future), 0, future)])
        return future

    def submit_many(self, items: list[I], deadline: float, sink: Sink) -> None:
        """Items sent in as few messages as the batch size allows, in order: each
        run of them is passed to ``sink(offset, results)`` once its reply (or
        failure: an Exception per item) is in. Raises Overloaded, queueing
        nothing, when the lane cannot take them all."""
        step = self._batch
        runs = [
            _Pending(items[i : i + step], deadline, sink, i, None)
            for i in range(0, len(items), step)
        ]
        self._enqueue(asyncio.get_running_loop(), runs)

    def _enqueue(self, loop: asyncio.AbstractEventLoop, runs: list[_Pending[I]]) -> None:
        count = sum(len(p.items) for p in runs)
        if self._queued + count > self._limit and self._queued:
            raise errors.Overloaded(f"replication queue to {self._name} is full", self._name)
        self._queue.extend(runs)
        self._queued += count
        self._wakeup.set()
        if self._task is None:
            self._task = loop.create_task(self._run(), name=f"lane-{self._name}")

    def __len__(self) -> int:
        return self._queued

    def _take(self, now: float) -> list[_Pending[I]]:
        """The next batch: queued runs up to the batch size (a run is never split)."""
        batch: list[_Pending[I]] = []
        count = 0
        while self._queue:
            pending = self._queue[0]
            if batch and count + len(pending.items) > self._batch:
                break
            self._queue.popleft()
            self._queued -= len(pending.items)
            if pending.skip():
                continue
            if pending.deadline <= now:
                failure = TransportError(self._name, "deadline passed")
                pending.deliver([failure] * len(pending.items))
                continue
            batch.append(pending)
            count += len(pending.items)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            now = loop.time()
            batch = self._take(now)
            if not batch:
                continue
            items = [item for pending in batch for item in pending.items]
            timeout = max(p.deadline for p in batch) - now
            results: list[Any]
            try:
                results = await self._send(items, timeout)
            except (TransportError, errors.KVError) as exc:
                results = [exc] * len(items)
            except Exception as exc:  # a bug: fail the batch, keep the lane alive
                log.exception("replication to %s failed", self._name)
                results = [errors.Internal(str(exc))] * len(items)
            start = 0
            for pending in batch:
                end = start + len(pending.items)
                pending.deliver(results[start:end])
                start = end

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            pending = self._queue.popleft()
            self._queued -= len(pending.items)
            if not pending.skip():
                pending.deliver([TransportError(self._name, "link closed")] * len(pending.items))


def _resolver(future: asyncio.Future[Any]) -> Sink:
    """The sink of a single submission: settles ``future`` with the item's result."""

    def settle(_offset: int, results: list[Any]) -> None:
        if future.done():
            return
        [result] = results
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)

    return settle


class PeerLink:
    """Batched reads and writes to one peer."""

    def __init__(self, transport: Transport, peer: NodeId, batch: int, limit: int) -> None:
        self.peer = peer
        self._transport = transport
        self._reads: _Lane[bytes, bytes | None] = _Lane(peer, self._send_reads, batch, limit)
        self._writes: _Lane[WriteItem, None] = _Lane(peer, self._send_writes, batch, limit)

    def read(self, pkey: bytes, deadline: float) -> asyncio.Future[bytes | None]:
        """The peer's record for ``pkey`` (None if absent)."""
        return self._reads.submit(pkey, deadline)

    def write(self, item: WriteItem, deadline: float) -> asyncio.Future[None]:
        """Resolves once the peer stored ``item`` durably."""
        return self._writes.submit(item, deadline)

    def write_many(self, items: list[WriteItem], deadline: float, sink: Sink) -> None:
        """Send ``items`` (see :meth:`_Lane.submit_many`); a result is None once
        the peer stored its item durably, else the Exception it met."""
        self._writes.submit_many(items, deadline, sink)

    def queued(self) -> int:
        return len(self._reads) + len(self._writes)

    async def _send_reads(
        self, pkeys: list[bytes], timeout: float
    ) -> list[bytes | Exception | None]:
        reply = await self._transport.call(self.peer, ReplicaRead(tuple(pkeys)), timeout)
        if not isinstance(reply, ReplicaReadReply) or len(reply.records) != len(pkeys):
            raise errors.Internal(f"bad ReplicaRead reply from {self.peer}")
        return list(reply.records)

    async def _send_writes(self, items: list[WriteItem], timeout: float) -> list[Exception | None]:
        reply = await self._transport.call(self.peer, ReplicaWrite(tuple(items)), timeout)
        if not isinstance(reply, ReplicaWriteReply) or len(reply.errors) != len(items):
            raise errors.Internal(f"bad ReplicaWrite reply from {self.peer}")
        return [None if e is None else errors.Internal(f"{self.peer}: {e}") for e in reply.errors]

    async def close(self) -> None:
        await self._reads.close()
        await self._writes.close()


class PeerLinks:
    """One :class:`PeerLink` per peer, created on first use."""

    def __init__(self, transport: Transport, batch: int, limit: int) -> None:
        self._transport = transport
        self._batch = batch
        self._limit = limit
        self._links: dict[NodeId, PeerLink] = {}

    def __getitem__(self, peer: NodeId) -> PeerLink:
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = PeerLink(self._transport, peer, self._batch, self._limit)
        return link

    def queued(self) -> dict[NodeId, int]:
        return {peer: link.queued() for peer, link in sorted(self._links.items())}

    async def close(self) -> None:
        for peer in sorted(self._links):
            await self._links[peer].close()
        self._links.clear()
