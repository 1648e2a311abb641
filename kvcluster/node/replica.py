"""This node's copy of the data: local reads, coordinated writes, merges.

Every change is one group-committed :meth:`Storage.write`, so it is durable
before anyone is told it happened, and the read-modify-write of a key's dvvset
runs inside the write transaction (one writer), never racing another update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kvcluster import errors
from kvcluster.core import dvvset, merkle
from kvcluster.core.record import (
    CorruptRecord,
    Record,
    Sibling,
    decode_record,
    encode_record,
)
from kvcluster.net.messages import WriteItem
from kvcluster.node import store
from kvcluster.storage.base import Storage, Table, WriteView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    """A client write to apply as this node's event (see LocalReplica.coordinate_many)."""

    pkey: bytes
    sibling: Sibling
    context: dvvset.VersionVector
    hint_for: Sequence[str] = ()


class Coordinated(NamedTuple):
    """A client write applied here: the new record, its clock, and its base (see
    :class:`~kvcluster.net.messages.WriteItem`) for the replicas it is sent to."""

    record: bytes
    clock: Record
    base: bytes | None


@dataclass(frozen=True, slots=True)
class HintLimits:
    """Hints per target beyond this are dropped (anti-entropy catches up)."""

    max_per_target: int


class LocalReplica:
    def __init__(self, storage: Storage, incarnation: str, hint_limits: HintLimits) -> None:
        self.storage = storage
        self.incarnation = incarnation
        self.hint_limits = hint_limits
        #: hints held per target, as counted in the store (kept in step by writes)
        self.hint_counts: dict[str, int] = {}
        self.hints_dropped = 0

    def load_hint_counts(self) -> None:
        counts: dict[str, int] = {}
        with self.storage.read() as view:
            for key, _ in view.scan(Table.HINTS):
                target, _pkey = store.split_hint_key(key)
                counts[target] = counts.get(target, 0) + 1
        self.hint_counts = counts

    # -- reads ------------------------------------------------------------------

    def read(self, pkey: bytes) -> bytes | None:
        """The stored record bytes for ``pkey`` (a snapshot read; ~1 µs)."""
        with self.storage.read() as view:
            return store.read_record(view, pkey)

    def read_many(self, pkeys: Sequence[bytes]) -> list[bytes | None]:
        with self.storage.read() as view:
            return [store.read_record(view, pk) for pk in pkeys]

    # -- writes -----------------------------------------------------------------

    async def coordinate(
        self,
        pkey: bytes,
        sibling: Sibling,
        context: dvvset.VersionVector,
        hint_for: Sequence[str],
        now_ms: int,
        lww: bool = False,
    ) -> tuple[bytes, Record]:
        """Apply one client write as this node's event (see :meth:`coordinate_many`)."""
        [outcome] = await self.coordinate_many(
            [Event(pkey, sibling, context, hint_for)], now_ms, lww
        )
        if isinstance(outcome, Exception):
            raise outcome
        return outcome.record, outcome.clock

    async def coordinate_many(
        self,
        events: Sequence[Event],
        now_ms: int,
        lww: bool = False,
        on_applied: Callable[[list[Coordinated | errors.KVError]], None] | None = None,
    ) -> list[Coordinated | errors.KVError]:
        """Apply client writes as this node's events, in one group-committed write.

        For each event: ``context`` empty means the write supersedes nothing;
        ``hint_for`` names the owners that must receive the record later (the
        one this node stands in for, and owners that are down with no
        fallback). Returns per event the new record (bytes and clock) or the
        error that event met, once durable. ``on_applied`` gets the same list as
        soon as the writes are applied, before they are durable (see
        :meth:`Storage.write`). ``lww`` (unsafe, for checker tests only)
        collapses siblings to the newest value.
        """
        incarnation = self.incarnation
        prepared: list[tuple[Event, Record, list[str]]] = []
        for event in events:
            new: Record = (
                dvvset.new_with_context(event.context, event.sibling)
                if event.context
                else dvvset.new(event.sibling)
            )
            hinted = [t for t in event.hint_for if self._may_hint(t)]
            self.hints_dropped += len(event.hint_for) - len(hinted)
            prepared.append((event, new, hinted))

        # per event, the new hints each target got (set by apply, read once durable)
        hints_added: list[list[int]] = [[] for _ in prepared]

        def apply(view: WriteView) -> list[Coordinated | errors.KVError]:
            out: list[Coordinated | errors.KVError] = []
            for k, (event, new, hinted) in enumerate(prepared):
                pkey = event.pkey
                raw = view.get(Table.DATA, pkey)
                current = None if raw is None else store.stored_record(raw)
                try:
                    local: Record = dvvset.empty() if current is None else decode_record(current)
                except CorruptRecord as exc:
                    out.append(errors.Internal(f"stored record of {pkey!r} is corrupt: {exc}"))
                    continue
                epoch = store.next_actor_epoch(view) if raw is None else store.stored_epoch(raw)
                updated = dvvset.update_with(new, local, store.actor_name(incarnation, epoch))
                if lww:
                    updated = dvvset.lww(updated, _newest)
                record = encode_record(updated)
                old_leaf = store.leaf_of(pkey, current)
                store.replace_record(view, pkey, raw, record, epoch, old_leaf)
                hints_added[k] = [_put_hint(view, target, pkey, now_ms) for target in hinted]
                # update_with's result descends from `local`; lww's need not (unsafe mode)
                base = None if lww else _base(old_leaf)
                out.append(Coordinated(record, updated, base))
            return out

        try:
            outcomes = await self.storage.write(apply, on_applied)
        except errors.KVError as exc:
            return [exc] * len(events)
        for (_, _, hinted), outcome, added in zip(prepared, outcomes, hints_added, strict=True):
            if not isinstance(outcome, errors.KVError):
                for target, count in zip(hinted, added, strict=True):
                    self.hint_counts[target] = self.hint_counts.get(target, 0) + count
        return outcomes

    async def merge(self, items: Sequence[WriteItem], now_ms: int) -> list[str | None]:
        """Merge replicated records (dvvset sync); per item None or an error text."""
        allowed = [self._may_hint(item.hint_for) for item in items]

        def apply(view: WriteView) -> list[tuple[str | None, int]]:
            results: list[tuple[str | None, int]] = []
            for item, allow_hint in zip(items, allowed, strict=True):
                if item.hint_for is not None and not allow_hint:
                    # A fallback that cannot remember the owner must not keep (and
                    # acknowledge) a copy that nobody would ever hand off.
                    results.append((f"hint limit for {item.hint_for} reached: not stored", 0))
                    continue
                try:
                    merge_into(view, item.pkey, item.record, item.base)
                except CorruptRecord as exc:
                    results.append((f"corrupt record: {exc}", 0))
                    continue
                added = 0
                if item.hint_for is not None and allow_hint:
                    added = _put_hint(view, item.hint_for, item.pkey, now_ms)
                results.append((None, added))
            return results

        try:
            results = await self.storage.write(apply)
        except errors.KVError as exc:
            return [exc.message] * len(items)
        for item, allow_hint, (error, added) in zip(items, allowed, results, strict=True):
            if error is None:
                self._note_hints(item.hint_for, allow_hint, added)
        return [error for error, _ in results]

    async def add_hints(self, target: str, pkeys: Sequence[bytes], now_ms: int) -> None:
        """Remember that ``target`` must receive our copy of ``pkeys``."""
        if not self._may_hint(target):
            self.hints_dropped += len(pkeys)
            return

        def apply(view: WriteView) -> int:
            added = 0
            for pkey in pkeys:
                added += _put_hint(view, target, pkey, now_ms)
            return added

        added = await self.storage.write(apply)
        self.hint_counts[target] = self.hint_counts.get(target, 0) + added

    def may_hint(self, target: str) -> bool:
        """Whether a hint for ``target`` can be stored now (its bound not reached)."""
        return self._may_hint(target)

    def _may_hint(self, target: str | None) -> bool:
        if target is None:
            return False
        return self.hint_counts.get(target, 0) < self.hint_limits.max_per_target

    def _note_hints(self, target: str | None, allowed: bool, added: int) -> None:
        if target is None:
            return
        if allowed:
            self.hint_counts[target] = self.hint_counts.get(target, 0) + added
        else:
            self.hints_dropped += 1

    def hints_removed(self, target: str, count: int) -> None:
        left = self.hint_counts.get(target, 0) - count
        if left > 0:
            self.hint_counts[target] = left
        else:
            self.hint_counts.pop(target, None)


def merge_into(view: WriteView, pkey: bytes, incoming: bytes, base: bytes | None = None) -> bool:
    """Sync ``incoming`` into the stored record; True if the stored bytes changed.

    ``base`` (see :class:`~kvcluster.net.messages.WriteItem`): when it names
    the copy stored here, ``incoming`` was made from this very copy and
    descends from it, so their sync is ``incoming`` itself: it is stored as it
    is, without decoding the stored copy or encoding the merge.
    """
    theirs = decode_record(incoming)  # never store what does not decode
    raw = view.get(Table.DATA, pkey)
    current = None if raw is None else store.stored_record(raw)
    if current == incoming:
        return False
    old_leaf = store.leaf_of(pkey, current)
    if base is not None and base == _base(old_leaf):
        store.replace_record(view, pkey, raw, incoming, old_leaf=old_leaf)
        return True
    merged = theirs if current is None else dvvset.sync(decode_record(current), theirs)
    record = encode_record(merged)
    if record == current:
        return False
    store.replace_record(view, pkey, raw, record, old_leaf=old_leaf)
    return True


def _base(leaf: int | None) -> bytes:
    """A WriteItem ``base``: the 16-byte leaf hash of a copy, b"" for no copy."""
    return b"" if leaf is None else leaf.to_bytes(merkle.HASH_BYTES, "big")


def _put_hint(view: WriteView, target: str, pkey: bytes, now_ms: int) -> int:
    key = store.hint_key(target, pkey)
    existed = view.get(Table.HINTS, key) is not None
    view.put(Table.HINTS, key, now_ms.to_bytes(8, "big"))
    return 0 if existed else 1


def _newest(value: Sibling) -> tuple[int, bool, bytes]:
    return (value.timestamp_ms, value.deleted, value.data)
