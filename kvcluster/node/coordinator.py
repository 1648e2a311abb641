"""Coordinates client requests across a key's replicas (Dynamo's coordinator).

Every request is handled as part of a batch (a single get or put is a batch
of one), so ``PutMany`` / ``GetMany`` share one storage write and one wait,
and per-key work is a few callbacks rather than tasks.

Reads ask R replicas of the preference list (this node's own copy first, when
it holds one), answer once R replied (merging their versions with dvvset
sync), and write the merged version back to the replicas that were stale
(read repair). A replica that fails is replaced by the next one in the
preference list; replicas that are slow past ``speculative_read`` get a
speculative extra read.

Writes are applied by a replica of the key (this node, or the one the request
is forwarded to): the dvvset event is created against the local copy and
applied, and the resulting record is sent to the other replicas through the
per-peer batching links while this node syncs its own copy; the write is
acknowledged once W replicas (this node included, once its sync is done) have
it durably. Replicas that miss a write, and owners that are
down with no fallback, get a hint on this node, so handoff brings them up to
date without waiting for anti-entropy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kvcluster import errors
from kvcluster.clock import Clock
from kvcluster.core import dvvset
from kvcluster.core.hashing import partition_of, pkey
from kvcluster.core.preflist import Target, preference_list_for_partition
from kvcluster.core.quorum import Outcome, Tally, parse_quorum
from kvcluster.core.record import (
    Record,
    Sibling,
    decode_context,
    decode_record,
    encode_context,
    encode_record,
    live_values,
)
from kvcluster.core.ring import Ring
from kvcluster.net.messages import ForwardPut, PutReply, WriteItem
from kvcluster.net.transport import NodeId, Transport, TransportError
from kvcluster.node.peers import PeerLinks
from kvcluster.node.replica import Coordinated, Event, LocalReplica
from kvcluster.node.settings import MAX_KEY_BYTES, NodeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
Spawn = Callable[[Coroutine[Any, Any, None]], None]
Quorum = int | str | None


@dataclass(frozen=True, slots=True)
class ReadResult:
    found: bool
    values: list[bytes]  # live siblings
    context: bytes  # opaque causal context covering exactly ``values`` (and older)


@dataclass(frozen=True, slots=True)
class WriteResult:
    context: bytes
    values: list[bytes]  # the siblings the context covers, as stored by the coordinator


@dataclass(frozen=True, slots=True)
class ReadRequest:
    key: bytes
    r: Quorum = None
    strict: bool = False
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class WriteRequest:
    key: bytes
    value: bytes
    context: bytes = b""
    w: Quorum = None
    strict: bool = False
    timeout: float | None = None
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    ring: Ring
    partition: int
    pkey: bytes
    targets: tuple[Target, ...]


class MembershipView(Protocol):
    """What the coordinator needs from membership (see kvcluster.node.membership)."""

    def ring(self) -> Ring:
        """The agreed ring; raises errors.NotReady before there is one."""
        ...

    def up_nodes(self) -> frozenset[NodeId]: ...


# -- the state of one key's request ------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Read:
    place: Placement
    required: int
    deadline: float
    order: list[Target]  # targets in the order they are asked (own copy first)
    asked: int = 0  # how many of ``order`` were asked
    outstanding: int = 0
    replies: dict[NodeId, bytes | None] = field(default_factory=dict)
    decided: bool = False
    merged: bytes | None = None  # the merged record once decided (to repair late repliers)
    result: ReadResult | None = None


@dataclass(slots=True, eq=False)
class _Write:
    place: Placement
    deadline: float
    result: WriteResult
    tally: Tally  # this node's copy counts once durable
    decided: bool = False

    def settle(self, batch: _Batch, acknowledged: bool = False) -> None:
        """Mark the write decided (once) when its tally is, or when ``acknowledged``."""
        if not self.decided and (acknowledged or self.tally.outcome is not Outcome.PENDING):
            self.decided = True
            batch.done_one()


class _Batch:
    """Counts the undecided requests of a batch; :meth:`wait` returns when none is left."""

    __slots__ = ("future", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending = 0
        self.future: asyncio.Future[None] | None = None

    def done_one(self) -> None:
        self.pending -= 1
        if self.pending == 0 and self.future is not None and not self.future.done():
            self.future.set_result(None)

    async def wait(self, deadline: float) -> None:
        if self.pending <= 0:
            return
        self.future = self.loop.create_future()
        expire = self.loop.call_at(deadline, self._expire)
        try:
            await self.future
        finally:
            expire.cancel()

    def _expire(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


class Coordinator:
    def __init__(
        self,
        node_id: NodeId,
        settings: NodeSettings,
        replica: LocalReplica,
        links: PeerLinks,
        membership: MembershipView,
        transport: Transport,
        clock: Clock,
        spawn: Spawn,
    ) -> None:
        self.node_id = node_id
        self.settings = settings
        self.replica = replica
        self.links = links
        self.membership = membership
        self.transport = transport
        self.clock = clock
        self.spawn = spawn
        self.read_repairs = 0
        # preference lists for the current ring and up-set, by (partition, strict)
        self._preflists: dict[tuple[int, bool], tuple[Target, ...]] = {}
        self._preflists_for: tuple[Ring | None, frozenset[NodeId]] = (None, frozenset())
        # replicas that missed writes, waiting to become hints on this node
        self._misses: dict[NodeId, list[bytes]] = {}
        self._flushing_misses = False
        self._local_repairs: list[WriteItem] = []

    # -- placement ----------------------------------------------------------------

    def place(self, key: bytes, strict: bool) -> Placement:
        self.check_key(key)
        ring = self.membership.ring()
        up = self.membership.up_nodes()
        if self._preflists_for[0] is not ring or self._preflists_for[1] != up:
            self._preflists = {}
            self._preflists_for = (ring, up)
        partition = partition_of(key, ring.q)
        targets = self._preflists.get((partition, strict))
        if targets is None:
            targets = preference_list_for_partition(partition, ring, ring.n, up, strict=strict)
            self._preflists[(partition, strict)] = targets
        return Placement(ring, partition, pkey(partition, key), targets)

    def check_key(self, key: bytes) -> None:
        if not key:
            raise errors.InvalidArgument("key must not be empty", "key")
        if len(key) > MAX_KEY_BYTES:
            raise errors.InvalidArgument(
                f"key is {len(key)} bytes, the limit is {MAX_KEY_BYTES}", "key"
            )

    def check_value(self, value: bytes) -> None:
        if len(value) > self.settings.max_value_bytes:
            raise errors.InvalidArgument(
                f"value is {len(value)} bytes, the limit is {self.settings.max_value_bytes}",
                "value",
            )

    def _plan(
        self, key: bytes, strict: bool, quorum: Quorum, default: int, field: str
    ) -> tuple[Placement, int]:
        """The key's placement and how many replicas must answer (Unavailable if too few)."""
        place = self.place(key, strict)
        n = place.ring.replicas
        required = parse_quorum(quorum, n, min(default, n), field)
        if len(place.targets) < required:
            raise errors.Unavailable(required, len(place.targets))
        return place, required

    def _deadline(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> float:
        t = self.settings.request_timeout if not timeout or timeout <= 0 else timeout
        return loop.time() + t

    # -- reads ----------------------------------------------------------------------

    async def get(
        self,
        key: bytes,
        r: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
    ) -> ReadResult:
        return await self.read(ReadRequest(key, r, strict, timeout))

    async def read(self, request: ReadRequest) -> ReadResult:
        """One key's read (a batch of one); raises the KVError it met."""
        [result] = await self.get_many([request])
        if isinstance(result, errors.KVError):
            raise result
        return result

    async def get_many(self, requests: Sequence[ReadRequest]) -> list[ReadResult | errors.KVError]:
        """Read every key; per request its result or the error it met, in order."""
        loop = asyncio.get_running_loop()
        results: list[ReadResult | errors.KVError | None] = [None] * len(requests)
        batch = _Batch(loop)
        ops: list[tuple[int, _Read]] = []
        for i, req in enumerate(requests):
            try:
                deadline = self._deadline(loop, req.timeout)
                place, required = self._plan(req.key, req.strict, req.r, self.settings.r, "r")
            except errors.KVError as exc:
                results[i] = exc
                continue
            order = sorted(place.targets, key=lambda t: t.node != self.node_id)
            ops.append((i, _Read(place, required, deadline, order)))
            batch.pending += 1
        if ops:
            self._read_local_first(ops, batch)
            for _, op in ops:
                if not op.decided:
                    self._ask(op, batch, op.required - op.asked)
            speculate = loop.call_later(self.settings.speculative_read, self._speculate, ops, batch)
            await batch.wait(max(op.deadline for _, op in ops))
            speculate.cancel()
        for i, op in ops:
            results[i] = op.result or errors.Timeout(op.required, len(op.replies))
        return [r for r in results if r is not None]

    def _read_local_first(self, ops: list[tuple[int, _Read]], batch: _Batch) -> None:
        """Read this node's own copies of the batch in one snapshot."""
        local = [op for _, op in ops if op.order[0].node == self.node_id]
        if not local:
            return
        records = self.replica.read_many([op.place.pkey for op in local])
        for op, record in zip(local, records, strict=True):
            op.asked = 1
            op.outstanding += 1
            self._replied(op, batch, self.node_id, record)

    def _ask(self, op: _Read, batch: _Batch, count: int) -> None:
        """Ask the next ``count`` replicas of ``op`` for their copy."""
        for _ in range(count):
            if op.asked >= len(op.order):
                return
            target = op.order[op.asked]  # never this node: _read_local_first asked it
            op.asked += 1
            op.outstanding += 1
            fut = _submit(self.links[target.node].read, op.place.pkey, op.deadline)
            fut.add_done_callback(functools.partial(self._read_done, op, batch, target.node))

    def _read_done(
        self, op: _Read, batch: _Batch, node: NodeId, fut: asyncio.Future[bytes | None]
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            op.outstanding -= 1
            if op.decided:
                return
            if op.asked < len(op.order):
                self._ask(op, batch, 1)  # replace the failed replica with the next one
            elif op.outstanding == 0:
                op.decided = True  # every replica asked, too few answered
                batch.done_one()
            return
        self._replied(op, batch, node, fut.result())

    def _replied(self, op: _Read, batch: _Batch, node: NodeId, record: bytes | None) -> None:
        op.outstanding -= 1
        if op.decided:
            if op.merged is not None and record != op.merged:
                self._repair(op, node, op.merged)  # a late (speculative) reply was stale
            return
        op.replies[node] = record
        if len(op.replies) >= op.required:
            self._decide_read(op, batch)

    def _decide_read(self, op: _Read, batch: _Batch) -> None:
        op.decided = True
        batch.done_one()
        copies = list(op.replies.values())
        present = [r for r in copies if r is not None]
        merged: Record
        if not present:
            merged, merged_bytes = dvvset.empty(), None
        elif all(r == present[0] for r in copies):
            merged, merged_bytes = decode_record(present[0]), present[0]
        else:
            merged = dvvset.sync_all(decode_record(r) for r in present)
            merged_bytes = encode_record(merged)
        op.merged = merged_bytes
        values = live_values(merged)
        op.result = ReadResult(bool(values), values, encode_context(dvvset.join(merged)))
        if merged_bytes is not None:
            for node, record in op.replies.items():
                if record != merged_bytes:
                    self._repair(op, node, merged_bytes)

    def _speculate(self, ops: list[tuple[int, _Read]], batch: _Batch) -> None:
        """Reads still waiting after ``speculative_read`` ask one more replica."""
        for _, op in ops:
            if not op.decided:
                self._ask(op, batch, 1)

    def _repair(self, op: _Read, node: NodeId, merged: bytes) -> None:
        """Read repair: send the merged record to a replica whose copy was older."""
        self.read_repairs += 1
        target = next((t for t in op.place.targets if t.node == node), None)
        item = WriteItem(op.place.pkey, merged, None if target is None else target.hint_for)
        if node == self.node_id:
            self._local_repairs.append(item)
            if len(self._local_repairs) == 1:
                self.spawn(self._flush_local_repairs())
            return
        loop = asyncio.get_running_loop()
        fut = _submit(self.links[node].write, item, loop.time() + self.settings.request_timeout)
        fut.add_done_callback(_retrieve)

    async def _flush_local_repairs(self) -> None:
        await asyncio.sleep(0)
        items, self._local_repairs = self._local_repairs, []
        await self.replica.merge(items, self.clock.wall_ms())

    # -- writes -----------------------------------------------------------------------

    async def put(
        self,
        key: bytes,
        value: bytes,
        context: bytes = b"",
        w: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
        deleted: bool = False,
        forwarded: bool = False,
    ) -> WriteResult:
        return await self.write(
            WriteRequest(key, value, context, w, strict, timeout, deleted), forwarded
        )

    async def write(self, request: WriteRequest, forwarded: bool = False) -> WriteResult:
        """One key's write (a batch of one); raises the KVError it met."""
        [result] = await self.put_many([request], forwarded=forwarded)
        if isinstance(result, errors.KVError):
            raise result
        return result

    async def put_many(
        self, requests: Sequence[WriteRequest], forwarded: bool = False
    ) -> list[WriteResult | errors.KVError]:
        """Write every key; per request its result or the error it met, in order.

        The keys this node holds a replica of are coordinated together (one
        storage write); the others are forwarded to one of their replicas.
        """
        loop = asyncio.get_running_loop()
        results: list[WriteResult | errors.KVError | None] = [None] * len(requests)
        now = self.clock.wall_ms()
        events: list[Event] = []
        local: list[tuple[int, Placement, int, float]] = []
        remote: list[tuple[int, Coroutine[Any, Any, WriteResult]]] = []
        for i, req in enumerate(requests):
            try:
                deadline = self._deadline(loop, req.timeout)
                self.check_value(req.value)
                vv = decode_context(req.context)
                place, required = self._plan(req.key, req.strict, req.w, self.settings.w, "w")
                mine = next((t for t in place.targets if t.node == self.node_id), None)
                if mine is None:
                    if forwarded:
                        raise errors.Unavailable(
                            required,
                            len(place.targets),
                            "forwarded write reached a node that is not a replica "
                            "(ring views differ)",
                        )
                    remote.append((i, self._forward(place, req, required, deadline)))
                    continue
                if mine.hint_for and not self.replica.may_hint(mine.hint_for):
                    # Standing in for a down owner needs a hint to hand the write
                    # back; without one this copy would never reach an owner.
                    raise errors.Overloaded(
                        f"{self.node_id} holds too many hints for {mine.hint_for}: write refused",
                        "hints",
                    )
            except errors.KVError as exc:
                results[i] = exc
                continue
            hints = ([mine.hint_for] if mine.hint_for else []) + self._uncovered_owners(place)
            sibling = Sibling(now, req.deleted, b"" if req.deleted else req.value)
            events.append(Event(place.pkey, sibling, vv, hints))
            local.append((i, place, required, deadline))
        forwarding = (
            asyncio.gather(*(coro for _, coro in remote), return_exceptions=True)
            if remote
            else None
        )
        if events:
            await self._coordinate(events, local, results, loop)
        if forwarding is not None:
            for (i, _), outcome in zip(remote, await forwarding, strict=True):
                if isinstance(outcome, errors.KVError | WriteResult):
                    results[i] = outcome
                elif isinstance(outcome, BaseException):
                    raise outcome
        return [r for r in results if r is not None]

    async def _coordinate(
        self,
        events: list[Event],
        local: list[tuple[int, Placement, int, float]],
        results: list[WriteResult | errors.KVError | None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Apply ``events`` here, replicate them, and wait for W durable copies each.

        The records go to the peers as soon as they are applied here, so this
        node's synced commit and the peers' run at the same time; this node's
        copy counts toward W once it is durable (Dynamo's coordinator does the
        same: its own write is one of the W, not a step before them).
        """
        batch = _Batch(loop)
        ops: list[_Write | None] = [None] * len(local)  # per event, once applied here
        unsafe = self.settings.unsafe_ack_before_w

        def replicate(applied: list[Coordinated | errors.KVError]) -> None:
            # per peer: the items to send it, and the write and target of each
            sends: dict[NodeId, tuple[list[WriteItem], list[tuple[_Write, Target]]]] = {}
            for k, ((_, place, required, deadline), outcome) in enumerate(
                zip(local, applied, strict=True)
            ):
                if isinstance(outcome, errors.KVError):
                    continue  # not applied: the same error comes back as its outcome
                record, clock, base = outcome
                result = WriteResult(encode_context(dvvset.join(clock)), live_values(clock))
                tally = Tally(required, [t.node for t in place.targets])
                op = ops[k] = _Write(place, deadline, result, tally)
                batch.pending += 1
                item = WriteItem(place.pkey, record, None, base)  # for every primary
                for target in place.targets:
                    if target.node == self.node_id:
                        continue
                    items, owners = sends.setdefault(target.node, ([], []))
                    if target.hint_for is None:
                        items.append(item)
                    else:
                        items.append(WriteItem(place.pkey, record, target.hint_for, base))
                    owners.append((op, target))
            for node, (items, owners) in sends.items():
                deadline = max(op.deadline for op, _ in owners)
                sink = functools.partial(self._replicated, owners, batch)
                try:
                    self.links[node].write_many(items, deadline, sink)
                except (errors.KVError, TransportError) as exc:
                    sink(0, [exc] * len(items))

        outcomes = await self.replica.coordinate_many(
            events, self.clock.wall_ms(), lww=self.settings.unsafe_lww, on_applied=replicate
        )
        for op, outcome in zip(ops, outcomes, strict=True):
            if op is None:
                continue
            durable = not isinstance(outcome, errors.KVError)
            if durable:
                op.tally.ok(self.node_id)
            else:  # applied, then lost with its batch: the peers' copies decide
                op.tally.failed(self.node_id)
            op.settle(batch, acknowledged=unsafe and durable)  # unsafe: one copy is enough
        waiting = [op.deadline for op in ops if op is not None]
        if waiting:
            await batch.wait(max(waiting))
        for op, (i, *_), outcome in zip(ops, local, outcomes, strict=True):
            durable = not isinstance(outcome, errors.KVError)
            if op is None:  # never applied (every applied write was replicated)
                if not isinstance(outcome, errors.KVError):
                    raise AssertionError("a write became durable without being applied")
                results[i] = outcome
            elif op.tally.outcome is Outcome.WON or (unsafe and durable):
                results[i] = op.result
            else:
                results[i] = errors.Timeout(op.tally.required, op.tally.acks)

    def _replicated(
        self,
        owners: list[tuple[_Write, Target]],
        batch: _Batch,
        offset: int,
        replies: list[Exception | None],
    ) -> None:
        """A peer's replies to a run of replicated writes (None: stored durably)."""
        mine = owners[offset : offset + len(replies)]
        for (op, target), reply in zip(mine, replies, strict=True):
            if reply is None:
                op.tally.ok(target.node)
            else:
                op.tally.failed(target.node)
                self._missed(target.hint_for or target.node, op.place.pkey)
            op.settle(batch)

    def _missed(self, owner: NodeId, pkey_: bytes) -> None:
        """Remember that ``owner`` did not take a write: it becomes a hint here."""
        self._misses.setdefault(owner, []).append(pkey_)
        if not self._flushing_misses:
            self._flushing_misses = True
            self.spawn(self._flush_misses())

    async def _flush_misses(self) -> None:
        try:
            await asyncio.sleep(0)
            while self._misses:
                misses, self._misses = self._misses, {}
                for owner in sorted(misses):
                    await self.replica.add_hints(owner, misses[owner], self.clock.wall_ms())
        finally:
            self._flushing_misses = False

    def _uncovered_owners(self, place: Placement) -> list[NodeId]:
        """Owners that get no copy of this write: down, and no fallback stands in.

        The coordinator keeps a hint for each (Cassandra does the same), so a
        cluster with no spare node still hands the write off once they return.
        """
        owners = place.ring.owners_of(place.partition)
        if len(place.targets) == len(owners) and all(t.primary for t in place.targets):
            return []
        covered = {t.node for t in place.targets} | {t.hint_for for t in place.targets}
        return [o for o in owners if o not in covered]

    async def delete(
        self,
        key: bytes,
        context: bytes = b"",
        w: Quorum = None,
        r: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
    ) -> bool:
        """Write a tombstone. Without a context, first read the key (quorum R)
        and delete every version seen; False if there was nothing to delete."""
        if not context:
            seen = await self.get(key, r=r, strict=strict, timeout=timeout)
            if not seen.found:
                return False
            context = seen.context
        await self.put(key, b"", context, w=w, strict=strict, timeout=timeout, deleted=True)
        return True

    async def _forward(
        self, place: Placement, req: WriteRequest, required: int, deadline: float
    ) -> WriteResult:
        """Hand the write to a replica of the key (the client normally avoids this hop).

        The next replica is tried only while the write certainly reached none:
        after a failure that may have followed its application, trying again
        could apply it twice (two siblings of one write), so the caller gets
        a Timeout, i.e. "maybe applied".
        """
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        for target in place.targets:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            msg = ForwardPut(
                req.key, req.value, req.deleted, req.context, required, req.strict, remaining
            )
            try:
                reply = await self.transport.call(target.node, msg, remaining)
            except TransportError as exc:
                failures.append(str(exc))
                if exc.sent:
                    break
                continue
            if not isinstance(reply, PutReply):
                raise errors.Internal(f"unexpected reply to ForwardPut from {target.node}")
            return WriteResult(reply.context, list(reply.values))
        raise errors.Timeout(
            required, 0, "no replica accepted the forwarded write: " + "; ".join(failures)
        )


def _submit(
    submit: Callable[[I, float], asyncio.Future[T]], item: I, deadline: float
) -> asyncio.Future[T]:
    """Call a submit function; turn an immediate rejection into a failed future."""
    try:
        return submit(item, deadline)
    except (errors.KVError, TransportError) as exc:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        fut.set_exception(exc)
        return fut


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a fire-and-forget future's exception as seen (read repair is best effort)."""
    if not fut.cancelled():
        fut.exception()
