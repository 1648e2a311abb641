"""Active anti-entropy: Merkle-tree exchange between the replicas of a partition.

Each node keeps, per partition, the segment hashes of a Merkle tree in its
store, updated in the same transaction as every write (``node.store``). An
exchange with another owner of the partition runs the sans-I/O
:class:`kvcluster.core.merkle.Exchange`: compare roots, descend only into
differing branches, then fetch the (key, leaf hash) lists of the differing
segments. Only the keys that differ are then read from both sides, merged
with dvvset sync, and written back to whichever side was missing something.
Repair therefore moves data in both directions and never loses a version:
a merge can only add what one side had not seen.

Tombstones are removed here too, and only when it is safe (no zombies): the
tombstone is older than ``tombstone_grace`` and *every* owner of the
partition answers with the very same tombstone record. Then each owner drops
it, each only if its copy is still byte-for-byte that record.

``repair()`` runs on demand (``kvctl cluster repair``) and reports progress;
``run()`` is the background schedule, throttled by ``aae_pause`` after each
batch of keys and limited to ``aae_concurrency`` partitions at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvcluster import errors
from kvcluster.clock import Clock
from kvcluster.core import dvvset, merkle
from kvcluster.core.hashing import key_hash
from kvcluster.core.record import decode_record, encode_record, is_deleted, newest_timestamp
from kvcluster.core.ring import Ring
from kvcluster.net import messages as m
from kvcluster.net.transport import NodeId, Transport, TransportError
from kvcluster.node import store
from kvcluster.node.replica import LocalReplica
from kvcluster.node.settings import NodeSettings
from kvcluster.storage.base import WriteView

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]
BATCH = 256
_HASH = merkle.HASH_BYTES


class MembershipView(Protocol):
    def ring_or_none(self) -> Ring | None: ...

    def is_up(self, node: NodeId) -> bool: ...


@dataclass
class ExchangeResult:
    keys_compared: int = 0  # keys listed in the differing segments (both sides)
    keys_exchanged: int = 0  # records sent or received
    keys_repaired: int = 0  # records that changed on either side
    local_repaired: int = 0  # of those, records that changed on this node
    bytes_exchanged: int = 0  # hashes, key lists and records, both directions
    tombstones_purged: int = 0

    def add(self, other: ExchangeResult) -> None:
        self.keys_compared += other.keys_compared
        self.keys_exchanged += other.keys_exchanged
        self.keys_repaired += other.keys_repaired
        self.local_repaired += other.local_repaired
        self.bytes_exchanged += other.bytes_exchanged
        self.tombstones_purged += other.tombstones_purged


@dataclass
class RepairProgress:
    partitions_done: int = 0
    partitions_total: int = 0
    keys_compared: int = 0
    keys_exchanged: int = 0
    keys_repaired: int = 0
    bytes_exchanged: int = 0
    seconds: float = 0.0
    done: bool = False
    errors: list[str] = field(default_factory=list)


class AntiEntropy:
    def __init__(
        self,
        node_id: NodeId,
        settings: NodeSettings,
        replica: LocalReplica,
        transport: Transport,
        clock: Clock,
        membership: MembershipView,
        spawn: Spawn,
    ) -> None:
        self.node_id = node_id
        self.settings = settings
        self.replica = replica
        self.transport = transport
        self.clock = clock
        self.membership = membership
        self.spawn = spawn
        self._last: dict[int, float] = {}
        self.totals = ExchangeResult()

    def last_repaired(self) -> dict[int, float]:
        """Partition -> wall-clock seconds of its last complete exchange."""
        return dict(sorted(self._last.items()))

    # -- schedules ------------------------------------------------------------------

    async def run(self) -> None:
        """Background anti-entropy: every ``aae_interval``, each owned partition."""
        if self.settings.aae_interval <= 0:
            return
        limit = asyncio.Semaphore(max(1, self.settings.aae_concurrency))
        while True:
            await asyncio.sleep(self.settings.aae_interval)
            ring = self.membership.ring_or_none()
            if ring is None:
                continue

            async def one(partition: int, ring: Ring = ring) -> None:
                async with limit:
                    with contextlib.suppress(TransportError, errors.KVError):
                        await self.repair_partition(ring, partition, self.settings.aae_pause)

            await asyncio.gather(*(one(p) for p in ring.partitions_of(self.node_id)))

    async def repair(self, partition: int | None = None) -> AsyncIterator[RepairProgress]:
        """Exchange every partition this node owns (or one) with its other owners."""
        ring = self.membership.ring_or_none()
        if ring is None:
            raise errors.NotReady("no agreed ring yet")
        if partition is not None and not 0 <= partition < ring.q:
            raise errors.InvalidArgument(f"partition must be in 0..{ring.q - 1}", "partition")
        owned = ring.partitions_of(self.node_id)
        parts = owned if partition is None else tuple(p for p in owned if p == partition)
        if partition is not None and not parts:
            owners = ", ".join(ring.owners_of(partition))
            raise errors.InvalidArgument(
                f"{self.node_id} does not own partition {partition} (owners: {owners})",
                "partition",
            )
        started = self.clock.monotonic()
        progress = RepairProgress(partitions_total=len(parts))
        yield self._snapshot(progress, started)
        for p in parts:
            try:
                result = await self.repair_partition(ring, p, pause=0.0, any_owner=True)
            except (TransportError, errors.KVError) as exc:
                progress.errors.append(f"partition {p}: {exc}")
                result = ExchangeResult()
            progress.partitions_done += 1
            progress.keys_compared += result.keys_compared
            progress.keys_exchanged += result.keys_exchanged
            progress.keys_repaired += result.keys_repaired
            progress.bytes_exchanged += result.bytes_exchanged
            yield self._snapshot(progress, started)
        progress.done = True
        yield self._snapshot(progress, started)

    async def repair_partition(
        self, ring: Ring, partition: int, pause: float, any_owner: bool = False
    ) -> ExchangeResult:
        """Exchange ``partition`` with each other owner that is up; then collect
        tombstones (see :meth:`collect_tombstones` for ``any_owner``). Raises
        TransportError if an owner is down (repair incomplete).

        Peers are exchanged with one after another; when a later peer's
        exchange changed this node's copy, the earlier peers are exchanged with
        again, so that one run leaves every owner that is up identical.
        """
        total = ExchangeResult()
        peers = [n for n in ring.owners_of(partition) if n != self.node_id]
        down = [n for n in peers if not self.membership.is_up(n)]
        live = [n for n in peers if n not in down]
        last_changed = -1  # index of the last peer whose exchange changed our copy
        for i, peer in enumerate(live):
            result = await self.exchange(partition, peer, pause)
            total.add(result)
            if result.local_repaired:
                last_changed = i
        for peer in live[: max(0, last_changed)]:
            total.add(await self.exchange(partition, peer, pause))
        if down:
            raise TransportError(down[0], f"owner of partition {partition} is down")
        total.tombstones_purged += await self.collect_tombstones(ring, partition, any_owner)
        self._last[partition] = self.clock.wall_ms() / 1000.0
        self.totals.add(total)
        return total

    # -- one exchange -----------------------------------------------------------------

    async def exchange(self, partition: int, peer: NodeId, pause: float = 0.0) -> ExchangeResult:
        timeout = self.settings.request_timeout
        with self.replica.storage.read() as view:
            local_segments = store.segment_hashes(view, partition)
        ex = merkle.Exchange(local_segments)
        result = ExchangeResult()
        while not ex.done:
            req = ex.request
            if isinstance(req, merkle.NeedLevel):
                reply = await self.transport.call(
                    peer, m.TreeLevel(partition, req.level, req.indices), timeout
                )
                if not isinstance(reply, m.TreeLevelReply):
                    raise errors.Internal(f"bad TreeLevel reply from {peer}")
                ex.answer_level([int.from_bytes(h, "big") for h in reply.hashes])
            elif isinstance(req, merkle.NeedSegments):
                reply = await self.transport.call(
                    peer, m.SegmentKeys(partition, req.segment_ids), timeout
                )
                if not isinstance(reply, m.SegmentKeysReply):
                    raise errors.Internal(f"bad SegmentKeys reply from {peer}")
                hashes = [int.from_bytes(h, "big") for h in reply.hashes]
                ex.answer_segments(zip(reply.pkeys, hashes, strict=True))
            elif isinstance(req, merkle.NeedLocalSegments):
                ex.answer_local_segments(self._segment_entries(partition, req.segment_ids))
        diff = ex.result()
        result.keys_compared = diff.stats.keys_received + diff.stats.local_keys_read
        result.bytes_exchanged = diff.stats.bytes_received
        keys = diff.keys
        for start in range(0, len(keys), BATCH):
            batch = keys[start : start + BATCH]
            result.add(await self._reconcile(peer, batch, timeout))
            if pause > 0:
                await asyncio.sleep(pause)
        return result

    async def _reconcile(
        self, peer: NodeId, pkeys: Sequence[bytes], timeout: float
    ) -> ExchangeResult:
        """Merge ``pkeys`` between this node and ``peer``, in both directions."""
        reply = await self.transport.call(peer, m.ReplicaRead(tuple(pkeys)), timeout)
        if not isinstance(reply, m.ReplicaReadReply) or len(reply.records) != len(pkeys):
            raise errors.Internal(f"bad ReplicaRead reply from {peer}")
        local = self.replica.read_many(pkeys)
        result = ExchangeResult(keys_exchanged=sum(r is not None for r in reply.records))
        result.bytes_exchanged = sum(len(r) for r in reply.records if r is not None)
        to_local: list[m.WriteItem] = []
        to_peer: list[m.WriteItem] = []
        for pkey, mine, theirs in zip(pkeys, local, reply.records, strict=True):
            if mine == theirs:
                continue
            clocks = [decode_record(r) for r in (mine, theirs) if r is not None]
            merged = encode_record(dvvset.sync_all(clocks))
            if merged != mine:
                to_local.append(m.WriteItem(pkey, merged, None))
            if merged != theirs:
                to_peer.append(m.WriteItem(pkey, merged, None))
        if to_local:
            failures = await self.replica.merge(to_local, self.clock.wall_ms())
            result.local_repaired = sum(f is None for f in failures)
            result.keys_repaired += result.local_repaired
        if to_peer:
            sent = await self.transport.call(peer, m.ReplicaWrite(tuple(to_peer)), timeout)
            if not isinstance(sent, m.ReplicaWriteReply):
                raise errors.Internal(f"bad ReplicaWrite reply from {peer}")
            result.keys_repaired += sum(e is None for e in sent.errors)
            result.keys_exchanged += len(to_peer)
            result.bytes_exchanged += sum(len(i.record) for i in to_peer)
        return result

    def _segment_entries(self, partition: int, segments: Iterable[int]) -> list[tuple[bytes, int]]:
        wanted = set(segments)
        out: list[tuple[bytes, int]] = []
        with self.replica.storage.read() as view:
            for pkey, record in store.partition_items(view, partition):
                if merkle.segment_of(key_hash(pkey[2:]), store.SEGMENTS) in wanted:
                    out.append((pkey, merkle.leaf_hash(pkey, record)))
        return out

    # -- serving a peer's exchange ---------------------------------------------------------

    async def handle(self, src: NodeId, msg: Any) -> Any | None:
        if isinstance(msg, m.TreeLevel):
            with self.replica.storage.read() as view:
                levels = merkle.build_levels(store.segment_hashes(view, msg.partition))
            try:
                hashes = merkle.level_hashes(levels, msg.level, msg.indices)
            except (ValueError, IndexError) as exc:
                raise errors.InvalidArgument(f"bad tree level request: {exc}") from None
            return m.TreeLevelReply(tuple(h.to_bytes(_HASH, "big") for h in hashes))
        if isinstance(msg, m.SegmentKeys):
            entries = self._segment_entries(msg.partition, msg.segments)
            return m.SegmentKeysReply(
                tuple(k for k, _ in entries), tuple(h.to_bytes(_HASH, "big") for _, h in entries)
            )
        if isinstance(msg, m.PurgeTombstones):
            return m.PurgeReply(await self._purge(msg.items))
        return None

    # -- tombstones ----------------------------------------------------------------------

    async def collect_tombstones(self, ring: Ring, partition: int, any_owner: bool = False) -> int:
        """Remove tombstones every owner holds identically, once past the grace period.

        In the background schedule only the partition's first owner that is up
        runs this, so owners do not duplicate the work; an on-demand repair
        (``any_owner``) collects on whichever owner runs it, or a repair run on
        one node would leave the tombstones of most of its partitions behind.
        Concurrent collectors are safe: each owner purges only a byte-identical
        tombstone. It needs every owner to answer.
        """
        owners = ring.owners_of(partition)
        coordinator = next((n for n in owners if self.membership.is_up(n)), None)
        if not any_owner and coordinator != self.node_id:
            return 0
        cutoff = self.clock.wall_ms() - int(self.settings.tombstone_grace * 1000)
        candidates: list[tuple[bytes, bytes]] = []
        with self.replica.storage.read() as view:
            for pkey, record in store.partition_items(view, partition):
                rec = decode_record(record)
                ts = newest_timestamp(rec)
                if is_deleted(rec) and (ts is None or ts < cutoff):
                    candidates.append((pkey, record))
        purged = 0
        peers = [n for n in owners if n != self.node_id]
        timeout = self.settings.request_timeout
        for start in range(0, len(candidates), BATCH):
            batch = candidates[start : start + BATCH]
            agreed = [True] * len(batch)
            for peer in peers:
                reply = await self.transport.call(
                    peer, m.ReplicaRead(tuple(k for k, _ in batch)), timeout
                )
                if not isinstance(reply, m.ReplicaReadReply):
                    raise errors.Internal(f"bad ReplicaRead reply from {peer}")
                for i, ((_, record), theirs) in enumerate(zip(batch, reply.records, strict=True)):
                    agreed[i] = agreed[i] and theirs == record
            items = tuple(item for item, ok in zip(batch, agreed, strict=True) if ok)
            if not items:
                continue
            for peer in peers:
                await self.transport.call(peer, m.PurgeTombstones(items), timeout)
            purged += await self._purge(items)
        return purged

    def _snapshot(self, progress: RepairProgress, started: float) -> RepairProgress:
        progress.seconds = self.clock.monotonic() - started
        return RepairProgress(**{**progress.__dict__, "errors": list(progress.errors)})

    async def _purge(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        def apply(view: WriteView) -> int:
            count = 0
            for pkey, record in items:
                if store.read_record(view, pkey) == record and is_deleted(decode_record(record)):
                    store.write_record(view, pkey, None)
                    count += 1
            return count

        return await self.replica.storage.write(apply)
