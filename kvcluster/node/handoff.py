"""Hinted handoff: deliver the data this node holds for other nodes.

A hint (``kvcluster.node.store``) says "``target`` must receive our copy of
``pkey``". Every ``handoff_interval`` the node takes the targets it holds hints
for that are up, reads a batch of the hinted records and sends them as one
``ReplicaWrite``. Once the target has them durably, each hint is removed unless
the record changed meanwhile (then the next round sends the newer version).
When this node is not an owner of the key's partition (it stood in as a
fallback) and no other hint names the key, its copy is removed too.

Bounds: hints older than ``hint_max_age`` are dropped undelivered, and a
target with ``hint_max_per_target`` hints gets no more (see
``LocalReplica``); anti-entropy repairs whatever a dropped hint would have.
Anti-entropy only runs between owners, so both bounds apply to owners only:
a fallback delivers its copy whatever its age (its copies may be the only
ones of an acknowledged write), and a fallback that may not add a hint
refuses the write instead of keeping a copy nobody would ever hand off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from kvcluster import errors
from kvcluster.clock import Clock
from kvcluster.core.hashing import split_pkey
from kvcluster.core.ring import Ring
from kvcluster.net.messages import ReplicaWrite, ReplicaWriteReply, WriteItem
from kvcluster.net.transport import NodeId, Transport, TransportError
from kvcluster.node import store
from kvcluster.node.replica import LocalReplica
from kvcluster.node.settings import NodeSettings
from kvcluster.storage.base import Table, WriteView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Batch:
    target: NodeId
    items: list[tuple[bytes, bytes | None, bytes]]  # (hint key, record or None, hint value)


class Handoff:
    def __init__(
        self,
        node_id: NodeId,
        settings: NodeSettings,
        replica: LocalReplica,
        transport: Transport,
        clock: Clock,
        is_up: Callable[[NodeId], bool],
        ring: Callable[[], Ring | None],
    ) -> None:
        self.node_id = node_id
        self.settings = settings
        self.replica = replica
        self.transport = transport
        self.clock = clock
        self.is_up = is_up
        self.ring = ring
        self.delivered = 0
        self.expired = 0

    def pending(self) -> dict[NodeId, int]:
        """Hints held per target."""
        return dict(sorted(self.replica.hint_counts.items()))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.handoff_interval)
            await self.deliver_all()

    async def deliver_all(self) -> int:
        """One round over every up target; returns hints delivered."""
        total = 0
        for target in sorted(self.replica.hint_counts):
            if target == self.node_id or not self.is_up(target):
                continue
            try:
                while True:
                    n = await self.deliver(target)
                    total += n
                    if n < self.settings.handoff_batch:
                        break
            except (TransportError, errors.KVError) as exc:
                log.info("handoff to %s paused: %s", target, exc)
        return total

    async def deliver(self, target: NodeId) -> int:
        """Send one batch of hinted records to ``target``; return how many were sent."""
        batch = self._next_batch(target)
        if not batch.items:
            return 0
        items = tuple(
            WriteItem(store.split_hint_key(hkey)[1], record, None)
            for hkey, record, _ in batch.items
            if record is not None
        )
        if items:
            reply = await self.transport.call(
                target, ReplicaWrite(items), self.settings.request_timeout
            )
            if not isinstance(reply, ReplicaWriteReply):
                raise errors.Internal(f"unexpected handoff reply from {target}")
            failed = {item.pkey for item, err in zip(items, reply.errors, strict=True) if err}
        else:
            failed = set()
        done = [(hkey, rec, hval) for hkey, rec, hval in batch.items if _pkey(hkey) not in failed]
        removed = await self._retire(target, done)
        self.delivered += len(items) - len(failed)
        self.replica.hints_removed(target, removed)
        return len(batch.items)

    def _next_batch(self, target: NodeId) -> _Batch:
        prefix = target.encode() + b"\x00"
        max_age_ms = int(self.settings.hint_max_age * 1000)
        now = self.clock.wall_ms()
        ring = self.ring()
        items: list[tuple[bytes, bytes | None, bytes]] = []
        with self.replica.storage.read() as view:
            for hkey, hval in view.scan(Table.HINTS, prefix=prefix):
                created = int.from_bytes(hval, "big")
                # Only an owner's hint may expire: anti-entropy still repairs from its
                # copy. A fallback's copy is outside anti-entropy and may be the only
                # one of an acknowledged write, so it is delivered whatever its age.
                expired = (
                    now - created > max_age_ms
                    and ring is not None
                    and _owns(ring, self.node_id, _pkey(hkey))
                )
                record = None if expired else store.read_record(view, _pkey(hkey))
                items.append((hkey, record, hval))
                if len(items) >= self.settings.handoff_batch:
                    break
        return _Batch(target, items)

    async def _retire(self, target: NodeId, done: list[tuple[bytes, bytes | None, bytes]]) -> int:
        """Remove delivered hints whose record is unchanged; drop fallback copies."""
        ring = self.ring()
        node_id = self.node_id
        others = [t for t in sorted(self.replica.hint_counts) if t != target]

        def apply(view: WriteView) -> tuple[int, int]:
            removed = expired = 0
            for hkey, record, hval in done:
                pkey = _pkey(hkey)
                if view.get(Table.HINTS, hkey) != hval:
                    continue  # re-hinted after we read it: deliver again next round
                if record is not None and store.read_record(view, pkey) != record:
                    continue  # changed since we sent it
                view.delete(Table.HINTS, hkey)
                removed += 1
                if record is None:
                    expired += 1
                if ring is not None and not _owns(ring, node_id, pkey):
                    still_hinted = any(
                        view.get(Table.HINTS, store.hint_key(t, pkey)) is not None for t in others
                    )
                    if not still_hinted:
                        store.write_record(view, pkey, None)
            return removed, expired

        removed, expired = await self.replica.storage.write(apply)
        self.expired += expired
        return removed


def _pkey(hint_key: bytes) -> bytes:
    return store.split_hint_key(hint_key)[1]


def _owns(ring: Ring, node: NodeId, pkey: bytes) -> bool:
    partition, _ = split_pkey(pkey)
    return node in ring.owners_of(partition)
