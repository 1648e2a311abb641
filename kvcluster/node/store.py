"""How a node lays out its state in the Storage tables.

DATA
    ``pkey`` (2-byte partition + user key) -> ``epoch (8 bytes) + record``.
    ``record`` is the replicated dvvset (:mod:`kvcluster.core.record`), the
    same bytes on every replica. ``epoch`` is local: it names the *actor* this
    node uses when it coordinates a write to the key (see below); it is never
    replicated and is not part of any hash.
MERKLE
    ``partition (2) + segment (2)`` -> 16-byte segment hash, kept up to date on
    every change of DATA (XOR of leaf hashes, :mod:`kvcluster.core.merkle`).
HINTS
    ``target node id + 0x00 + pkey`` -> ``created_ms (8 bytes)``: this node
    holds data for ``pkey`` that ``target`` must receive. The data itself is
    the local record, read at delivery time, so many writes to one key make
    one hint.
META
    identity, cluster metadata, agreement state, actor epoch counter, and the
    Merkle leaf-hash format.

Actors. A dvvset dot ``(actor, n)`` must be unique for a key, and an actor
may only create dot ``n + 1`` if it has seen all its earlier dots for that
key. A node therefore never reuses an actor across *local lifetimes* of a key:
whenever a key comes into existence in this store (first write, or again after
it was removed locally by handoff cleanup or tombstone removal), it is given a
fresh epoch from a counter in META, and the node's actor for that key is
``<incarnation>.<epoch>``. The incarnation is random per store, so a wiped
data directory can never reuse an old actor either. This is the fix Riak 2.x
made with per-key actor epochs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from kvcluster.core import merkle
from kvcluster.core.hashing import key_hash
from kvcluster.storage.base import ReadView, Table, WriteView

_EPOCH = struct.Struct(">Q")
_SEGMENT_KEY = struct.Struct(">HH")

META_INCARNATION = b"incarnation"
META_NODE_ID = b"node_id"
META_ACTOR_EPOCH = b"actor_epoch"
META_CLUSTER = b"cluster_meta"
META_AGREEMENT = b"agreement"
META_MERKLE_FORMAT = b"merkle_format"
#: Names the leaf hash of the stored segment hashes; a store holding another
#: (or none: made before it was recorded) has its trees rebuilt at start.
MERKLE_FORMAT = b"xxh3-128"

SEGMENTS = merkle.DEFAULT_SEGMENTS
_SEGMENT_MASK = SEGMENTS - 1


def stored_epoch(raw: bytes) -> int:
    """The actor epoch of a raw DATA value."""
    epoch: int = _EPOCH.unpack_from(raw)[0]
    return epoch


def stored_record(raw: bytes) -> bytes:
    """The record bytes of a raw DATA value."""
    return raw[_EPOCH.size :]


def read_record(view: ReadView, pkey: bytes) -> bytes | None:
    raw = view.get(Table.DATA, pkey)
    return None if raw is None else stored_record(raw)


def next_actor_epoch(view: WriteView) -> int:
    """Allocate a fresh actor epoch (durable with the enclosing write)."""
    raw = view.get(Table.META, META_ACTOR_EPOCH)
    epoch = (int.from_bytes(raw, "big") if raw else 0) + 1
    view.put(Table.META, META_ACTOR_EPOCH, epoch.to_bytes(8, "big"))
    return epoch


def actor_name(incarnation: str, epoch: int) -> str:
    return f"{incarnation}.{epoch:x}"


def segment_key(partition: int, segment: int) -> bytes:
    return _SEGMENT_KEY.pack(partition, segment)


def write_record(view: WriteView, pkey: bytes, record: bytes | None, epoch: int = 0) -> None:
    """Store (or with ``None`` remove) a key's record, updating its Merkle segment.

    ``epoch`` is used only when the key is new locally; 0 means "allocate one".
    """
    replace_record(view, pkey, view.get(Table.DATA, pkey), record, epoch)


def replace_record(
    view: WriteView,
    pkey: bytes,
    old: bytes | None,
    record: bytes | None,
    epoch: int = 0,
    old_leaf: int | None = None,
) -> None:
    """:func:`write_record` for a caller that has just read ``old``, the key's raw
    DATA value in this same write (saves reading it again on the hot path), and
    may have computed ``old_leaf = leaf_of(pkey, its record)`` already."""
    old_record = None if old is None else stored_record(old)
    if old_record == record:
        return
    if record is None:
        view.delete(Table.DATA, pkey)
    else:
        if old is not None:
            epoch = stored_epoch(old)
        elif epoch == 0:
            epoch = next_actor_epoch(view)
        view.put(Table.DATA, pkey, _EPOCH.pack(epoch) + record)
    if old_leaf is None:
        old_leaf = leaf_of(pkey, old_record)
    _update_segment(view, pkey, old_leaf, leaf_of(pkey, record))


def leaf_of(pkey: bytes, record: bytes | None) -> int | None:
    """The Merkle leaf hash of ``pkey`` holding ``record`` (None when absent)."""
    return None if record is None else merkle.leaf_hash(pkey, record)


def _update_segment(
    view: WriteView, pkey: bytes, old_leaf: int | None, new_leaf: int | None
) -> None:
    # segment_key(partition, merkle.segment_of(key_hash(key), SEGMENTS)), inlined: hot path
    skey = pkey[:2] + (key_hash(pkey[2:]) & _SEGMENT_MASK).to_bytes(2, "big")
    raw = view.get(Table.MERKLE, skey)
    current = int.from_bytes(raw, "big") if raw else 0
    updated = merkle.replace_leaf(current, old_leaf, new_leaf)
    if updated:
        view.put(Table.MERKLE, skey, updated.to_bytes(16, "big"))
    elif raw is not None:
        view.delete(Table.MERKLE, skey)


def segment_hashes(view: ReadView, partition: int) -> list[int]:
    """The partition's segment hashes (0 for empty segments)."""
    hashes = [0] * SEGMENTS
    for key, value in view.scan(Table.MERKLE, prefix=partition.to_bytes(2, "big")):
        hashes[_SEGMENT_KEY.unpack(key)[1]] = int.from_bytes(value, "big")
    return hashes


def partition_items(view: ReadView, partition: int) -> Iterator[tuple[bytes, bytes]]:
    """(pkey, record) of every key stored for ``partition``, in key order."""
    for key, raw in view.scan(Table.DATA, prefix=partition.to_bytes(2, "big")):
        yield key, raw[_EPOCH.size :]


# -- hints ------------------------------------------------------------------------


def hint_key(target: str, pkey: bytes) -> bytes:
    return target.encode() + b"\x00" + pkey


def split_hint_key(key: bytes) -> tuple[str, bytes]:
    target, _, pkey = key.partition(b"\x00")
    return target.decode(), pkey


def rebuilt_segment_hashes(view: ReadView, partition: int) -> list[int]:
    """The partition's segment hashes recomputed from DATA (the recovery path).

    Must equal :func:`segment_hashes`, which writes maintain incrementally;
    tests check that they do.
    """
    return merkle.rebuild_segments(
        (
            (merkle.segment_of(key_hash(pkey[2:]), SEGMENTS), pkey, record)
            for pkey, record in partition_items(view, partition)
        ),
        SEGMENTS,
    )


def rebuild_merkle(view: WriteView, partition: int) -> int:
    """Replace the partition's stored segment hashes by a rebuild from DATA.

    Returns how many segments had to change (0 when the incremental tree was right).
    """
    stored = segment_hashes(view, partition)
    rebuilt = rebuilt_segment_hashes(view, partition)
    changed = 0
    for segment, (old, new) in enumerate(zip(stored, rebuilt, strict=True)):
        if old == new:
            continue
        changed += 1
        key = segment_key(partition, segment)
        if new:
            view.put(Table.MERKLE, key, new.to_bytes(16, "big"))
        else:
            view.delete(Table.MERKLE, key)
    return changed


def upgrade_merkle_format(view: WriteView) -> int:
    """Rebuild every partition's segment hashes if they were made with another
    leaf hash than :data:`MERKLE_FORMAT`, and record it. Returns the number of
    partitions rebuilt (0 when the format was current or the store is empty)."""
    if view.get(Table.META, META_MERKLE_FORMAT) == MERKLE_FORMAT:
        return 0
    partitions = _partitions(view, Table.DATA) | _partitions(view, Table.MERKLE)
    for partition in sorted(partitions):
        rebuild_merkle(view, partition)
    view.put(Table.META, META_MERKLE_FORMAT, MERKLE_FORMAT)
    return len(partitions)


def _partitions(view: ReadView, table: Table) -> set[int]:
    """The 2-byte partition prefixes present in ``table``, one seek per partition."""
    found: set[int] = set()
    start: bytes | None = None
    while True:
        first = next(iter(view.scan(table, start=start, limit=1)), None)
        if first is None:
            return found
        partition = int.from_bytes(first[0][:2], "big")
        found.add(partition)
        if partition == 0xFFFF:
            return found
        start = (partition + 1).to_bytes(2, "big")
