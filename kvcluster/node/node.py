"""A kvcluster node: the components wired together, and message dispatch.

The node touches the world only through the :class:`Transport`,
:class:`Clock` and :class:`Storage` it is given (plus a seeded
``random.Random``), so the same class runs behind the gRPC server and inside
the deterministic simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from kvcluster import __version__, errors
from kvcluster.clock import Clock
from kvcluster.metrics import Metrics
from kvcluster.net import messages as m
from kvcluster.net.transport import NodeId, Transport
from kvcluster.node import store
from kvcluster.node.antientropy import AntiEntropy, RepairProgress
from kvcluster.node.coordinator import Coordinator
from kvcluster.node.handoff import Handoff
from kvcluster.node.membership import Membership
from kvcluster.node.peers import PeerLinks
from kvcluster.node.replica import HintLimits, LocalReplica
from kvcluster.node.settings import NodeSettings
from kvcluster.storage.base import Storage, Table

log = logging.getLogger(__name__)

#: How long a node remembers a forwarded write it coordinated, to recognise a
#: repeated delivery of it (far longer than any message stays in flight).
_FORWARD_MEMORY = 120.0


@dataclass(frozen=True, slots=True)
class MemberStatus:
    node_id: NodeId
    address: str
    state: str
    phi: float
    partitions: int
    primaries: int
    hints_pending: int


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: NodeId
    address: str
    ready: bool
    ring_epoch: int
    partitions: int
    n_val: int
    r: int
    w: int
    members: list[MemberStatus]
    hints_pending: int
    hints_dropped: int
    keys: int
    uptime_seconds: float
    version: str
    last_repaired: dict[int, float] = field(default_factory=dict)


class Node:
    def __init__(
        self,
        node_id: NodeId,
        address: str,
        settings: NodeSettings,
        storage: Storage,
        transport: Transport,
        clock: Clock,
        rng: random.Random,
        seeds: dict[NodeId, str],
        metrics: Metrics | None = None,
    ) -> None:
        settings.validate()
        self.node_id = node_id
        self.address = address
        self.settings = settings
        self.storage = storage
        self.transport = transport
        self.clock = clock
        self.rng = rng
        self.metrics = metrics
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started_at = 0.0
        # Forwarded writes recently coordinated, by (sender, request): see _forwarded_put.
        self._forwarded: dict[tuple[NodeId, m.ForwardPut], asyncio.Future[m.PutReply]] = {}
        incarnation = self._incarnation()
        self.replica = LocalReplica(storage, incarnation, HintLimits(settings.hint_max_per_target))
        self.links = PeerLinks(transport, settings.replication_batch, settings.replication_queue)
        self.membership = Membership(
            node_id, address, settings, storage, transport, clock, rng, seeds, self.spawn
        )
        self.coordinator = Coordinator(
            node_id,
            settings,
            self.replica,
            self.links,
            self.membership,
            transport,
            clock,
            self.spawn,
        )
        self.handoff = Handoff(
            node_id,
            settings,
            self.replica,
            transport,
            clock,
            self.membership.is_up,
            self.membership.ring_or_none,
        )
        self.antientropy = AntiEntropy(
            node_id, settings, self.replica, transport, clock, self.membership, self.spawn
        )
        if metrics is not None:
            metrics.on_scrape(self._refresh_metrics)
            metrics.watch_storage(storage.stats)

    def _incarnation(self) -> str:
        """This store's random incarnation (created with the store, never reused)."""
        with self.storage.read() as view:
            raw = view.get(Table.META, store.META_INCARNATION)
        if raw is not None:
            return raw.decode()
        return f"{self.node_id}-{self.rng.getrandbits(32):08x}"

    async def start(self) -> None:
        self._started_at = asyncio.get_running_loop().time()
        incarnation = self.replica.incarnation
        node_id = self.node_id

        def remember(view: Any) -> int:
            if view.get(Table.META, store.META_INCARNATION) is None:
                view.put(Table.META, store.META_INCARNATION, incarnation.encode())
                view.put(Table.META, store.META_NODE_ID, node_id.encode())
            return store.upgrade_merkle_format(view)

        rebuilt = await self.storage.write(remember)
        if rebuilt:
            log.warning(
                "%s: Merkle trees of %d partitions rebuilt (stored with an older leaf hash)",
                node_id,
                rebuilt,
            )
        self.replica.load_hint_counts()
        await self.membership.start()
        self.spawn(self.handoff.run())
        self.spawn(self.antientropy.run())

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.links.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, owned by this node (cancelled on stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- incoming node-to-node messages ---------------------------------------------

    async def handle(self, src: NodeId, msg: Any) -> Any:
        if isinstance(msg, m.ReplicaWrite):
            results = await self.replica.merge(msg.items, self.clock.wall_ms())
            return m.ReplicaWriteReply(tuple(results))
        if isinstance(msg, m.ReplicaRead):
            return m.ReplicaReadReply(tuple(self.replica.read_many(msg.pkeys)))
        if isinstance(msg, m.ForwardPut):
            return await self._forwarded_put(src, msg)
        reply = await self.membership.handle(src, msg)
        if reply is not None:
            return reply
        reply = await self.antientropy.handle(src, msg)
        if reply is not None:
            return reply
        raise errors.InvalidArgument(f"unexpected message {type(msg).__name__}")

    async def _forwarded_put(self, src: NodeId, msg: m.ForwardPut) -> m.PutReply:
        """Coordinate a forwarded write once, however often the request is delivered.

        ForwardPut is the one node-to-node message that is not idempotent: each
        application is a new dvvset event. Applied twice, it would leave a second
        sibling with the same value that a later context (which saw only one)
        cannot supersede, so the value would come back after being replaced. A
        request is recognised by its sender and content (which includes the
        sender's remaining timeout) for ``_FORWARD_MEMORY`` seconds after it
        completed; a repeat gets the first one's outcome.
        """
        key = (src, msg)
        first = self._forwarded.get(key)
        if first is not None:
            return await asyncio.shield(first)
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[m.PutReply] = loop.create_future()
        self._forwarded[key] = outcome
        try:
            result = await self.coordinator.put(
                msg.key,
                msg.value,
                msg.context,
                w=msg.w,
                strict=msg.strict,
                timeout=msg.timeout,
                deleted=msg.deleted,
                forwarded=True,
            )
            reply = m.PutReply(result.context, tuple(result.values))
            outcome.set_result(reply)
            return reply
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except Exception as exc:
            outcome.set_exception(exc)
            outcome.exception()  # retrieved: a repeat may never come to await it
            raise
        finally:
            loop.call_later(_FORWARD_MEMORY, self._forwarded.pop, key, None)

    # -- operator views ----------------------------------------------------------------

    def repair(self, partition: int | None = None) -> AsyncIterator[RepairProgress]:
        return self.antientropy.repair(partition)

    def status(self) -> NodeStatus:
        meta = self.membership.meta
        hints = self.handoff.pending()
        members: list[MemberStatus] = []
        if meta is not None:
            counts = meta.ring.ownership_counts()
            primaries = {node: 0 for node in meta.ring.members}
            for owners in meta.ring.owners:
                if owners:
                    primaries[owners[0]] += 1
            for node in meta.ring.members:
                members.append(
                    MemberStatus(
                        node_id=node,
                        address=meta.address_of(node),
                        state=self.membership.state_of(node),
                        phi=self.membership.phi_of(node),
                        partitions=counts.get(node, 0),
                        primaries=primaries[node],
                        hints_pending=hints.get(node, 0),
                    )
                )
        with self.storage.read() as view:
            keys = sum(1 for _ in view.scan(Table.DATA))
        now = asyncio.get_running_loop().time()
        return NodeStatus(
            node_id=self.node_id,
            address=self.address,
            ready=meta is not None,
            ring_epoch=0 if meta is None else meta.ring.epoch,
            partitions=self.settings.partitions if meta is None else meta.ring.q,
            n_val=self.settings.n_val if meta is None else meta.ring.n,
            r=self.settings.r,
            w=self.settings.w,
            members=members,
            hints_pending=sum(hints.values()),
            hints_dropped=self.replica.hints_dropped + self.handoff.expired,
            keys=keys,
            uptime_seconds=now - self._started_at,
            version=__version__,
            last_repaired=self.antientropy.last_repaired(),
        )

    def _refresh_metrics(self) -> None:
        assert self.metrics is not None
        self.metrics.hints_pending.clear()
        for target, count in self.handoff.pending().items():
            self.metrics.hints_pending.labels(target).set(count)
        self.metrics.hints_dropped.set(self.replica.hints_dropped + self.handoff.expired)
        meta = self.membership.meta
        self.metrics.ring_epoch.set(0 if meta is None else meta.ring.epoch)
        states: dict[str, int] = {"up": 0, "suspect": 0, "down": 0}
        if meta is not None:
            for node in meta.ring.members:
                state = self.membership.state_of(node)
                key = "up" if state == "self" else state
                states[key] = states.get(key, 0) + 1
        for state, count in states.items():
            self.metrics.members_up.labels(state).set(count)
