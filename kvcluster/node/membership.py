"""Cluster membership: the agreed ring, heartbeats, failure detection.

Cluster metadata (:class:`ClusterMeta`: the ring and every member's address)
changes only by agreement: version ``e + 1`` must be accepted by a majority of
the members of version ``e`` (one Paxos instance per epoch,
:mod:`kvcluster.core.agreement`). The first version is agreed by a majority
of the configured seeds. A node on the minority side of a partition can
therefore never install a ring of its own: it keeps the last agreed one.

Every ``heartbeat_interval`` a node pings each member; pings and pongs feed a
phi-accrual detector per peer and carry the sender's epoch, so a node that
missed a change (it was down or cut off) notices and fetches the newer
metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from kvcluster import errors
from kvcluster.clock import Clock
from kvcluster.core import agreement as ag
from kvcluster.core.phi import FailureDetectors, Liveness
from kvcluster.core.ring import Ring, add_member, new_ring, remove_member
from kvcluster.net import messages as m
from kvcluster.net.transport import NodeId, Transport, TransportError
from kvcluster.node import store
from kvcluster.node.settings import NodeSettings
from kvcluster.storage.base import Storage, Table, WriteView

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass(frozen=True, slots=True)
class ClusterMeta:
    """The agreed cluster metadata: ring plus member addresses."""

    ring: Ring
    addresses: tuple[tuple[NodeId, str], ...]  # sorted by node id

    def address_of(self, node: NodeId) -> str:
        return dict(self.addresses).get(node, "")

    def encode(self) -> bytes:
        """Canonical bytes (agreement compares values byte for byte)."""
        obj = {"ring": self.ring.to_dict(), "addresses": dict(self.addresses)}
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def decode(data: bytes) -> ClusterMeta:
        obj = json.loads(data)
        ring = Ring.from_dict(obj["ring"])
        addresses = tuple(sorted((str(k), str(v)) for k, v in obj["addresses"].items()))
        return ClusterMeta(ring, addresses)


class Membership:
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
        spawn: Spawn,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.settings = settings
        self.storage = storage
        self.transport = transport
        self.clock = clock
        self.rng = rng
        self.seeds = dict(sorted((seeds or {node_id: address}).items()))
        self.spawn = spawn
        self.meta: ClusterMeta | None = None
        self.acceptor = ag.AcceptorState()
        self.detectors = FailureDetectors(
            threshold_suspect=settings.phi_suspect,
            threshold_down=settings.phi_down,
            first_interval_ms=settings.heartbeat_interval * 1000,
        )
        self._pinging: set[NodeId] = set()
        self._fetching = False
        self._up_cache: tuple[float, frozenset[NodeId]] = (-1.0, frozenset())
        self._agree_lock = asyncio.Lock()
        self._round = 0  # highest ballot round this node proposed with
        self.changed = asyncio.Event()  # set whenever new metadata is installed

    # -- start -------------------------------------------------------------------

    async def start(self) -> None:
        with self.storage.read() as view:
            raw_meta = view.get(Table.META, store.META_CLUSTER)
            raw_acceptor = view.get(Table.META, store.META_AGREEMENT)
        if raw_acceptor is not None:
            self.acceptor = ag.AcceptorState.decode(raw_acceptor)
        for node, address in self.seeds.items():
            if node != self.node_id:
                self.transport.set_address(node, address)
        self._watch(tuple(self.seeds))
        if raw_meta is not None:
            self._install(ClusterMeta.decode(raw_meta))
        self.spawn(self._heartbeat_loop())
        if self.meta is None:
            self.spawn(self._form())

    # -- what the coordinator, handoff and anti-entropy read --------------------------

    def ring(self) -> Ring:
        return self.require_meta().ring

    def ring_or_none(self) -> Ring | None:
        return None if self.meta is None else self.meta.ring

    def require_meta(self) -> ClusterMeta:
        if self.meta is None:
            raise errors.NotReady(
                f"node {self.node_id} has no agreed ring yet: waiting for a majority "
                f"of the seeds ({', '.join(self.seeds)})"
            )
        return self.meta

    def members(self) -> tuple[NodeId, ...]:
        return tuple(self.seeds) if self.meta is None else self.meta.ring.members

    def up_nodes(self) -> frozenset[NodeId]:
        """Members not considered down (this node always included)."""
        now = self.clock.monotonic()
        at, cached = self._up_cache
        if now - at < 0.02:
            return cached
        now_ms = now * 1000
        up = frozenset(
            node
            for node in self.members()
            if node == self.node_id or self.detectors.status(node, now_ms) is not Liveness.DOWN
        )
        self._up_cache = (now, up)
        return up

    def is_up(self, node: NodeId) -> bool:
        return node in self.up_nodes()

    def state_of(self, node: NodeId) -> str:
        if node == self.node_id:
            return "self"
        status = self.detectors.status(node, self.clock.monotonic() * 1000)
        # never heard of: routing presumes it up (see up_nodes), so say "unknown", not "down"
        return status.name.lower()

    def phi_of(self, node: NodeId) -> float:
        if node == self.node_id:
            return 0.0
        return float(self.detectors.phi(node, self.clock.monotonic() * 1000))

    # -- incoming messages --------------------------------------------------------------

    async def handle(self, src: NodeId, msg: Any) -> Any | None:
        if isinstance(msg, m.Ping):
            self._heard_from(src, msg.epoch)
            return m.Pong(self.epoch)
        if isinstance(msg, m.FetchMeta):
            if self.meta is None:
                return m.MetaReply(0, b"")
            return m.MetaReply(self.meta.ring.epoch, self.meta.encode())
        if isinstance(msg, m.Agreement):
            try:
                request = ag.decode_message(msg.body)
            except ValueError as exc:
                raise errors.InvalidArgument(f"malformed agreement message: {exc}") from None
            reply = await self._on_agreement(request)
            return m.Agreement(b"" if reply is None else ag.encode_message(reply))
        return None

    @property
    def epoch(self) -> int:
        return 0 if self.meta is None else self.meta.ring.epoch

    def _heard_from(self, node: NodeId, epoch: int) -> None:
        was_down = node not in self.up_nodes()
        self.detectors.heartbeat(node, self.clock.monotonic() * 1000)
        if was_down:
            self._up_cache = (-1.0, frozenset())
        if epoch > self.epoch and not self._fetching:
            self._fetching = True
            self.spawn(self._fetch_meta(node))

    async def _on_agreement(self, msg: ag.Message) -> ag.AcceptorReply | None:
        """Acceptor side; the new state is durable before the reply leaves."""
        if isinstance(msg, ag.Commit):
            if msg.epoch > self.epoch:
                await self._adopt(ClusterMeta.decode(msg.value))
            return None
        if not isinstance(msg, ag.Prepare | ag.Accept):
            raise errors.InvalidArgument(f"unexpected agreement message {type(msg).__name__}")
        state, reply = ag.handle(self.acceptor, msg)
        if state != self.acceptor:
            await self._persist_acceptor(state)
        return reply

    async def _persist_acceptor(self, state: ag.AcceptorState) -> None:
        raw = state.encode()

        def save(view: WriteView) -> None:
            view.put(Table.META, store.META_AGREEMENT, raw)

        await self.storage.write(save)
        self.acceptor = state

    # -- metadata changes -----------------------------------------------------------------

    def _watch(self, nodes: Sequence[NodeId]) -> None:
        """Start failure detection of ``nodes`` with one assumed heartbeat now,
        so a member that never answers is declared down after the usual silence
        instead of staying unknown (and presumed up) forever."""
        now_ms = self.clock.monotonic() * 1000
        for node in nodes:
            if node != self.node_id and node not in self.detectors:
                self.detectors.heartbeat(node, now_ms)

    def _install(self, meta: ClusterMeta) -> None:
        self.meta = meta
        self._watch(meta.ring.members)
        for node, address in meta.addresses:
            if node != self.node_id:
                self.transport.set_address(node, address)
        self._up_cache = (-1.0, frozenset())
        self.changed.set()
        self.changed = asyncio.Event()

    async def _adopt(self, meta: ClusterMeta) -> None:
        """Persist and install agreed metadata newer than ours."""
        if meta.ring.epoch <= self.epoch:
            return
        raw = meta.encode()
        acceptor = ag.on_commit(self.acceptor, meta.ring.epoch)

        def save(view: WriteView) -> None:
            view.put(Table.META, store.META_CLUSTER, raw)
            view.put(Table.META, store.META_AGREEMENT, acceptor.encode())

        await self.storage.write(save)
        if meta.ring.epoch > self.epoch:
            self.acceptor = acceptor
            log.info("%s: ring epoch %d installed", self.node_id, meta.ring.epoch)
            self._install(meta)

    async def _fetch_meta(self, node: NodeId) -> None:
        try:
            reply = await self.transport.call(node, m.FetchMeta(), self.settings.rpc_timeout)
            if isinstance(reply, m.MetaReply) and reply.meta and reply.epoch > self.epoch:
                await self._adopt(ClusterMeta.decode(reply.meta))
        except (TransportError, errors.KVError) as exc:
            log.debug("fetching metadata from %s failed: %s", node, exc)
        finally:
            self._fetching = False

    async def _form(self) -> None:
        """Agree on the first ring with a majority of the seeds."""
        voters = tuple(self.seeds)
        meta = ClusterMeta(
            new_ring(voters, q=self.settings.partitions, n=self.settings.n_val),
            tuple(self.seeds.items()),
        )
        while self.meta is None:
            with contextlib.suppress(TransportError, errors.KVError):
                await self.propose(meta, voters)
            if self.meta is None:
                await asyncio.sleep(self.settings.heartbeat_interval * (1 + self.rng.random()))

    async def change(self, update: Callable[[ClusterMeta], ClusterMeta]) -> ClusterMeta:
        """Agree on ``update(current)`` as the next metadata; retry while preempted."""
        for _ in range(20):
            current = self.require_meta()
            proposal = update(current)
            chosen = await self.propose(proposal, current.ring.members)
            if chosen is not None and chosen.encode() == proposal.encode():
                return chosen
            await asyncio.sleep(self.settings.heartbeat_interval * (1 + self.rng.random()))
        raise errors.Unavailable(
            ag.majority(len(self.require_meta().ring.members)),
            0,
            "could not get a majority of members to agree on the ring change",
        )

    async def join(self, node: NodeId, address: str) -> ClusterMeta:
        def update(meta: ClusterMeta) -> ClusterMeta:
            if node in meta.ring.members:
                raise errors.InvalidArgument(f"{node} is already a member", "node")
            addresses = tuple(sorted({**dict(meta.addresses), node: address}.items()))
            return ClusterMeta(add_member(meta.ring, node), addresses)

        return await self.change(update)

    async def leave(self, node: NodeId) -> ClusterMeta:
        def update(meta: ClusterMeta) -> ClusterMeta:
            if node not in meta.ring.members:
                raise errors.InvalidArgument(f"{node} is not a member", "node")
            if len(meta.ring.members) == 1:
                raise errors.InvalidArgument("the last member cannot leave", "node")
            addresses = tuple((n, a) for n, a in meta.addresses if n != node)
            return ClusterMeta(remove_member(meta.ring, node), addresses)

        return await self.change(update)

    async def propose(self, meta: ClusterMeta, voters: tuple[NodeId, ...]) -> ClusterMeta | None:
        """Run one Paxos attempt for epoch ``meta.ring.epoch``; install what is chosen."""
        async with self._agree_lock:
            if meta.ring.epoch <= self.epoch:
                return self.meta
            epoch = meta.ring.epoch
            self._round = ag.first_round(self.acceptor, epoch, at_least=self._round + 1)
            proposer = ag.Proposer(self.node_id, epoch, meta.encode(), voters, self._round)
            outcome = await self._drive(proposer, proposer.start())
        if isinstance(outcome, ag.Chosen):
            chosen = ClusterMeta.decode(outcome.value)
            await self._adopt(chosen)
            self._broadcast(ag.Commit(outcome.epoch, outcome.value), chosen.ring.members)
            return chosen
        if isinstance(outcome, ag.Retry):
            self._round = max(self._round, outcome.next_round - 1)
        if isinstance(outcome, ag.Stale):
            for node in voters:
                if node != self.node_id:
                    self._fetching = True
                    await self._fetch_meta(node)
                    if self.epoch >= meta.ring.epoch:
                        break
        return None

    async def _drive(self, proposer: ag.Proposer, outgoing: list[ag.Outgoing]) -> ag.Outcome | None:
        """Exchange messages until the proposer reaches an outcome (or gives up)."""
        deadline = self.clock.monotonic() + self.settings.rpc_timeout * 2
        queue: asyncio.Queue[tuple[NodeId, ag.AcceptorReply | None]] = asyncio.Queue()
        inflight = 0

        async def send(out: ag.Outgoing) -> None:
            reply: ag.Message | None = None
            try:
                if out.to == self.node_id:
                    reply = await self._on_agreement(out.msg)
                else:
                    remaining = max(0.01, deadline - self.clock.monotonic())
                    env = await self.transport.call(
                        out.to, m.Agreement(ag.encode_message(out.msg)), remaining
                    )
                    if isinstance(env, m.Agreement) and env.body:
                        reply = ag.decode_message(env.body)
            except (TransportError, errors.KVError, ValueError):
                reply = None
            if reply is not None and not isinstance(reply, ag.Promise | ag.Accepted | ag.Reject):
                reply = None
            await queue.put((out.to, reply))

        def launch(batch: Sequence[ag.Outgoing]) -> int:
            for out in batch:
                self.spawn(send(out))
            return len(batch)

        inflight += launch(outgoing)
        while inflight:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(remaining):
                    src, reply = await queue.get()
            except TimeoutError:
                return None
            inflight -= 1
            if reply is None:
                continue
            step = proposer.on_message(src, reply)
            inflight += launch(step.outgoing)
            if step.outcome is not None:
                return step.outcome
        return None

    def _broadcast(self, msg: ag.Commit, nodes: tuple[NodeId, ...]) -> None:
        body = ag.encode_message(msg)
        for node in nodes:
            if node == self.node_id:
                continue

            async def send(node: NodeId = node) -> None:
                with contextlib.suppress(TransportError, errors.KVError):
                    await self.transport.call(node, m.Agreement(body), self.settings.rpc_timeout)

            self.spawn(send())

    # -- heartbeats -------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            for node in self.members():
                if node != self.node_id and node not in self._pinging:
                    self._pinging.add(node)
                    self.spawn(self._ping(node))
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _ping(self, node: NodeId) -> None:
        try:
            reply = await self.transport.call(node, m.Ping(self.epoch), self.settings.rpc_timeout)
            if isinstance(reply, m.Pong):
                self._heard_from(node, reply.epoch)
        except (TransportError, errors.KVError):
            pass
        finally:
            self._pinging.discard(node)
