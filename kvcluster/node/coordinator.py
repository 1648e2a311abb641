"""Coordinates client requests across a key's replicas (Dynamo's coordinator).

Reads ask every replica in the preference list, answer once R of them replied
(merging their versions with dvvset sync), then keep listening in the
background and write the merged version back to replicas that were stale
(read repair). Writes are applied by a replica of the key (this node, or the
one the request is forwarded to): the dvvset event is created against the
local copy, stored durably, and the resulting record is sent to the other
replicas; the write is acknowledged once W of them (this node included) have
it durably. Replicas that miss a write get a hint on this node, so handoff
brings them up to date without waiting for anti-entropy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from kvcluster import errors
from kvcluster.clock import Clock
from kvcluster.core import dvvset
from kvcluster.core.hashing import partition_of, pkey
from kvcluster.core.preflist import Target, preference_list_for_partition
from kvcluster.core.quorum import Outcome, Tally, parse_quorum
from kvcluster.core.record import (
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
from kvcluster.node.replica import LocalReplica
from kvcluster.node.settings import MAX_KEY_BYTES, NodeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
Spawn = Callable[[Coroutine[Any, Any, None]], None]


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

    # -- placement ----------------------------------------------------------------

    def place(self, key: bytes, strict: bool) -> Placement:
        self.check_key(key)
        ring = self.membership.ring()
        partition = partition_of(key, ring.q)
        targets = preference_list_for_partition(
            partition, ring, ring.n, self.membership.up_nodes(), strict=strict
        )
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

    def _deadline(self, timeout: float | None) -> float:
        t = self.settings.request_timeout if not timeout or timeout <= 0 else timeout
        return asyncio.get_running_loop().time() + t

    # -- reads ----------------------------------------------------------------------

    async def get(
        self,
        key: bytes,
        r: int | str | None = None,
        strict: bool = False,
        timeout: float | None = None,
    ) -> ReadResult:
        deadline = self._deadline(timeout)
        place = self.place(key, strict)
        n = place.ring.replicas
        required = parse_quorum(r, n, min(self.settings.r, n), "r")
        if len(place.targets) < required:
            raise errors.Unavailable(required, len(place.targets))
        calls = self._read_calls(place, deadline)
        tally = Tally(required, [t.node for t in place.targets])
        replies = await _await_quorum(calls, tally, deadline)
        if tally.outcome is not Outcome.WON:
            raise errors.Timeout(required, tally.acks)
        merged = dvvset.sync_all(decode_record(r) for r in replies.values() if r is not None)
        self.spawn(self._repair_after(place, calls, deadline))
        values = live_values(merged)
        return ReadResult(bool(values), values, encode_context(dvvset.join(merged)))

    def _read_calls(
        self, place: Placement, deadline: float
    ) -> list[tuple[NodeId, asyncio.Future[bytes | None]]]:
        loop = asyncio.get_running_loop()
        calls: list[tuple[NodeId, asyncio.Future[bytes | None]]] = []
        for target in place.targets:
            if target.node == self.node_id:
                fut: asyncio.Future[bytes | None] = loop.create_future()
                fut.set_result(self.replica.read(place.pkey))
            else:
                fut = _submit(self.links[target.node].read, place.pkey, deadline)
            calls.append((target.node, fut))
        return calls

    async def _repair_after(
        self,
        place: Placement,
        calls: list[tuple[NodeId, asyncio.Future[bytes | None]]],
        deadline: float,
    ) -> None:
        """Read repair: once every replica answered (or the deadline passed),
        send the merged version to those whose copy was older."""
        pending = [f for _, f in calls if not f.done()]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.gather(*pending, return_exceptions=True)
        answered = {
            node: f.result()
            for node, f in calls
            if f.done() and not f.cancelled() and f.exception() is None
        }
        if len(set(answered.values())) <= 1:
            return
        merged = encode_record(
            dvvset.sync_all(decode_record(r) for r in answered.values() if r is not None)
        )
        by_node = {t.node: t for t in place.targets}
        stale = sorted(node for node, rec in answered.items() if rec != merged)
        later = asyncio.get_running_loop().time() + self.settings.request_timeout
        for node in stale:
            self.read_repairs += 1
            target = by_node[node]
            if node == self.node_id:
                item = WriteItem(place.pkey, merged, target.hint_for)
                await self.replica.merge([item], self.clock.wall_ms())
            else:
                with contextlib.suppress(errors.KVError, TransportError):
                    item = WriteItem(place.pkey, merged, target.hint_for)
                    await self.links[node].write(item, later)

    # -- writes -----------------------------------------------------------------------

    async def put(
        self,
        key: bytes,
        value: bytes,
        context: bytes = b"",
        w: int | str | None = None,
        strict: bool = False,
        timeout: float | None = None,
        deleted: bool = False,
        forwarded: bool = False,
    ) -> WriteResult:
        deadline = self._deadline(timeout)
        self.check_value(value)
        vv = decode_context(context)
        place = self.place(key, strict)
        n = place.ring.replicas
        required = parse_quorum(w, n, min(self.settings.w, n), "w")
        if len(place.targets) < required:
            raise errors.Unavailable(required, len(place.targets))
        mine = next((t for t in place.targets if t.node == self.node_id), None)
        if mine is None:
            if forwarded:
                raise errors.Unavailable(
                    required,
                    len(place.targets),
                    "forwarded write reached a node that is not a replica (ring views differ)",
                )
            return await self._forward(
                place, key, value, deleted, context, required, strict, deadline
            )

        if mine.hint_for and not self.replica.may_hint(mine.hint_for):
            # Standing in for a down owner needs a hint to hand the write back;
            # without one this copy would never reach an owner.
            raise errors.Overloaded(
                f"{self.node_id} holds too many hints for {mine.hint_for}: write refused",
                "hints",
            )
        now = self.clock.wall_ms()
        sibling = Sibling(now, deleted, b"" if deleted else value)
        hints = [mine.hint_for] if mine.hint_for else []
        hints += self._uncovered_owners(place)
        record, clock = await self.replica.coordinate(
            place.pkey, sibling, vv, hints, now, lww=self.settings.unsafe_lww
        )
        result = WriteResult(encode_context(dvvset.join(clock)), live_values(clock))
        tally = Tally(required, [t.node for t in place.targets])
        tally.ok(self.node_id)
        others = [t for t in place.targets if t.node != self.node_id]
        calls = [
            (
                t.node,
                _submit(
                    self.links[t.node].write, WriteItem(place.pkey, record, t.hint_for), deadline
                ),
            )
            for t in others
        ]
        self.spawn(self._hint_misses(place.pkey, others, calls, deadline))
        if self.settings.unsafe_ack_before_w:
            return result  # deliberately unsafe: acknowledged with one copy
        await _await_quorum(calls, tally, deadline)
        if tally.outcome is not Outcome.WON:
            raise errors.Timeout(required, tally.acks)
        return result

    def _uncovered_owners(self, place: Placement) -> list[NodeId]:
        """Owners that get no copy of this write: down, and no fallback stands in.

        The coordinator keeps a hint for each (Cassandra does the same), so a
        cluster with no spare node still hands the write off once they return.
        """
        owners = place.ring.owners_of(place.partition)
        covered = {t.node for t in place.targets} | {t.hint_for for t in place.targets}
        return [o for o in owners if o not in covered]

    async def delete(
        self,
        key: bytes,
        context: bytes = b"",
        w: int | str | None = None,
        r: int | str | None = None,
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
        self,
        place: Placement,
        key: bytes,
        value: bytes,
        deleted: bool,
        context: bytes,
        required: int,
        strict: bool,
        deadline: float,
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
            msg = ForwardPut(key, value, deleted, context, required, strict, remaining)
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

    async def _hint_misses(
        self,
        pkey_: bytes,
        targets: Sequence[Target],
        calls: list[tuple[NodeId, asyncio.Future[None]]],
        deadline: float,
    ) -> None:
        """Remember, as hints on this node, replicas that did not take the write."""
        pending = [f for _, f in calls if not f.done()]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline + 0.05):
                    await asyncio.gather(*pending, return_exceptions=True)
        for target, (_, fut) in zip(targets, calls, strict=True):
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                continue
            owner = target.hint_for or target.node
            await self.replica.add_hints(owner, [pkey_], self.clock.wall_ms())


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


async def _await_quorum(
    calls: Sequence[tuple[NodeId, asyncio.Future[T]]], tally: Tally, deadline: float
) -> dict[NodeId, T]:
    """Wait until ``tally`` is decided (won or lost) or the deadline passes.

    Returns the successful replies so far (the tally counts them). Futures are
    not cancelled: stragglers finish in the background (read repair, hints).
    """
    loop = asyncio.get_running_loop()
    replies: dict[NodeId, T] = {}
    decided: asyncio.Future[None] = loop.create_future()

    def on_done(node: NodeId, fut: asyncio.Future[T]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            tally.failed(node)
        else:
            replies[node] = fut.result()
            tally.ok(node)
        if tally.outcome is not Outcome.PENDING and not decided.done():
            decided.set_result(None)

    for node, fut in calls:
        if fut.done():
            on_done(node, fut)
        else:
            fut.add_done_callback(functools.partial(on_done, node))
    if tally.outcome is not Outcome.PENDING:
        return dict(replies)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await decided
    return dict(replies)
