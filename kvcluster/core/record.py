"""What the database stores per key, and the byte formats of records and contexts.

A key's :data:`Record` is a dotted version vector set (:mod:`kvcluster.core.dvvset`)
of :class:`Sibling` versions; a delete writes a tombstone sibling.

Record bytes (stored in LMDB, replicated, hashed into Merkle trees)::

    0x01  msgpack [entries, anonymous]
          entries   = [[actor: str, counter: uint, [sibling, ...]], ...]   (sorted by actor)
          anonymous = [sibling, ...]                                        (sorted)
          sibling   = [timestamp_ms: int, deleted: bool, data: bin]

The encoding is canonical: a record has one canonical form (the clock's
invariants) and msgpack writes every value in its shortest form, so equal
records give identical bytes, which replicas compare by hash.

Context bytes (opaque to clients): ``b""`` for no context, else
``0x01 msgpack [actor, counter, actor, counter, ...]`` (sorted by actor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

from kvcluster.core import dvvset
from kvcluster.core.dvvset import Clock, Entry, VersionVector, unchecked_clock, unchecked_entry
from kvcluster.errors import InvalidArgument

__all__ = [
    "CorruptRecord",
    "Record",
    "Sibling",
    "decode_context",
    "decode_record",
    "encode_context",
    "encode_record",
    "is_deleted",
    "live",
    "live_values",
    "newest_timestamp",
    "tombstone",
]

RECORD_FORMAT = 1
CONTEXT_FORMAT = 1
_RECORD_PREFIX = bytes([RECORD_FORMAT])
_CONTEXT_PREFIX = bytes([CONTEXT_FORMAT])
#: Up to this size decode_record unpacks a copy of the record's msgpack part,
#: which costs less than a memoryview of it.
_COPY_LIMIT = 4096


class CorruptRecord(ValueError):
    """Stored or replicated record bytes that do not decode to a valid record."""


@dataclass(frozen=True, slots=True, order=True)
class Sibling:
    """One version of a key's value: written at ``timestamp_ms`` (the
    coordinator's wall clock); a tombstone has ``deleted=True`` and no data."""

    timestamp_ms: int
    deleted: bool
    data: bytes

    def __post_init__(self) -> None:
        if self.deleted and self.data:
            raise ValueError("a tombstone carries no data")


Record: TypeAlias = Clock[Sibling]

# decode_record builds siblings without running __init__ and __post_init__
# (as dvvset.unchecked_entry does entries): object.__new__, then the slot
# descriptors' setters (which bypass the frozen __setattr__), after checking the
# invariants those would check.
_new = object.__new__
_set_timestamp = Sibling.__dict__["timestamp_ms"].__set__
_set_deleted = Sibling.__dict__["deleted"].__set__
_set_data = Sibling.__dict__["data"].__set__
_BAD_SIBLING = "sibling must be [timestamp_ms (int), deleted (bool), data (bin)]"


def live(data: bytes, timestamp_ms: int) -> Sibling:
    """A live version holding ``data``."""
    return Sibling(timestamp_ms, False, data)


def tombstone(timestamp_ms: int) -> Sibling:
    """A deletion marker."""
    return Sibling(timestamp_ms, True, b"")


# -- queries --------------------------------------------------------------------------


def live_values(rec: Record) -> list[bytes]:
    """The data of the record's non-deleted siblings, newest first (by
    timestamp, then by data, both descending); one item per sibling, so two
    concurrent writes of the same bytes appear twice."""
    found = [(s.timestamp_ms, s.data) for s in dvvset.values(rec) if not s.deleted]
    found.sort(reverse=True)
    return [data for _, data in found]


def is_deleted(rec: Record) -> bool:
    """True if the record holds no live value (only tombstones, or nothing)."""
    return all(s.deleted for s in dvvset.values(rec))


def newest_timestamp(rec: Record) -> int | None:
    """The latest ``timestamp_ms`` of any sibling, tombstones included (None if none)."""
    return max((s.timestamp_ms for s in dvvset.values(rec)), default=None)


# -- record codec ---------------------------------------------------------------------


def encode_record(rec: Record) -> bytes:
    """The canonical bytes of ``rec`` (see the module docstring)."""
    # Plain loops build the body faster than nested comprehensions; msgpack
    # packs tuples and lists alike, as arrays.
    entries = []
    for entry in rec.entries:
        siblings = []
        for s in entry.values:
            siblings.append((s.timestamp_ms, s.deleted, s.data))
        entries.append((entry.actor, entry.counter, siblings))
    anonymous = []
    for s in rec.anonymous:
        anonymous.append((s.timestamp_ms, s.deleted, s.data))
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack(RECORD_FORMAT)  # msgpack packs 1 as the single byte 0x01
    packer.pack((entries, anonymous))
    out: bytes = packer.bytes()
    return out


def decode_record(data: bytes) -> Record:
    """The record encoded in ``data``; CorruptRecord if it is not a valid
    encoding (unknown format, bad msgpack, trailing bytes, wrong shape or
    types, or a clock that breaks the dvvset invariants).

    msgpack's longer spellings of a value (an int in 8 bytes, say) are
    accepted; canonical bytes are what :func:`encode_record` produces, and a
    node only ever stores those."""
    # Every replicated write decodes records, so this is one flat loop: it
    # checks the invariants of Sibling, Entry and Clock itself and then builds
    # them without __init__/__post_init__ (the slot setters, unchecked_entry,
    # unchecked_clock). A check
    # that fails calls the checked code (_tuple, the constructors), which
    # raises the same error, with the same message, as the plain decoder would.
    if data[:1] != _RECORD_PREFIX:
        raise CorruptRecord(f"unknown record format {data[:1]!r}")
    try:
        # _unpack, inline; a small record is cheaper to copy than to view
        packed = data[1:] if len(data) <= _COPY_LIMIT else memoryview(data)[1:]
        body = msgpack.unpackb(packed, use_list=False, raw=False, strict_map_key=True)
    except ValueError as exc:
        raise CorruptRecord(f"undecodable msgpack: {exc}") from exc
    try:
        if type(body) is not tuple or len(body) != 2:
            _tuple(body, 2)  # raises
        entries_raw, anonymous_raw = body
        if type(entries_raw) is not tuple:
            _tuple(entries_raw)  # raises
        entries: list[Entry[Sibling]] = []
        previous = None
        in_order = True
        for item in entries_raw:
            if type(item) is not tuple or len(item) != 3:
                _tuple(item, 3)  # raises
            actor, counter, siblings_raw = item
            if type(actor) is not str or type(counter) is not int:
                raise ValueError("entry must start with actor (str) and counter (int)")
            if type(siblings_raw) is not tuple:
                _tuple(siblings_raw)  # raises
            siblings = []
            for raw in siblings_raw:
                if type(raw) is not tuple or len(raw) != 3:
                    _tuple(raw, 3)  # raises
                timestamp_ms, deleted, blob = raw
                if (
                    type(timestamp_ms) is not int
                    or type(deleted) is not bool
                    or type(blob) is not bytes
                ):
                    raise ValueError(_BAD_SIBLING)
                if deleted and blob:
                    Sibling(timestamp_ms, deleted, blob)  # raises: a tombstone carries no data
                sibling = _new(Sibling)
                _set_timestamp(sibling, timestamp_ms)
                _set_deleted(sibling, deleted)
                _set_data(sibling, blob)
                siblings.append(sibling)
            values = tuple(siblings)
            if len(values) > counter:  # or counter < 0
                Entry(actor, counter, values)  # raises
            entries.append(unchecked_entry(actor, counter, values))
            if previous is not None and not previous < actor:
                in_order = False
            previous = actor
        if anonymous_raw != () or not in_order:
            # anonymous values (rare: stored records have none) or misordered
            # entries: the checked constructor, which raises the order errors
            return Clock(tuple(entries), _siblings(anonymous_raw))
        return unchecked_clock(tuple(entries))
    except ValueError as exc:
        raise CorruptRecord(f"invalid record: {exc}") from exc


def _siblings(raw: object) -> tuple[Sibling, ...]:
    out = []
    for item in _tuple(raw):
        timestamp_ms, deleted, data = _tuple(item, 3)
        if type(timestamp_ms) is not int or type(deleted) is not bool or type(data) is not bytes:
            raise ValueError(_BAD_SIBLING)
        out.append(Sibling(timestamp_ms, deleted, data))
    return tuple(out)


def _tuple(value: object, length: int | None = None) -> tuple[Any, ...]:
    """``value`` as a msgpack array (unpacked as a tuple) of ``length`` items."""
    if type(value) is not tuple:
        raise ValueError(f"expected an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"expected an array of {length} items, got {len(value)}")
    return value


def _unpack(data: bytes, error: type[ValueError]) -> object:
    """Unpack the single msgpack object after the format byte, or raise ``error``."""
    try:
        # Every malformed input is a ValueError subclass here (ExtraData,
        # FormatError, StackError, UnicodeDecodeError...); strict_map_key rules
        # out the TypeError an unhashable map key would raise.
        return msgpack.unpackb(memoryview(data)[1:], use_list=False, raw=False, strict_map_key=True)
    except ValueError as exc:
        raise error(f"undecodable msgpack: {exc}") from exc


# -- context codec --------------------------------------------------------------------


def encode_context(vv: VersionVector) -> bytes:
    """Opaque client bytes for the causal context ``vv`` (``b""`` for the empty one)."""
    if not vv:
        return b""
    flat: list[str | int] = []
    for actor, counter in vv:
        flat.append(actor)
        flat.append(counter)
    packed: bytes = msgpack.packb(flat, use_bin_type=True)
    return _CONTEXT_PREFIX + packed


def decode_context(data: bytes) -> VersionVector:
    """The causal context in client bytes; ``b""`` is the empty context.

    Raises InvalidArgument (field ``context``) for anything that
    :func:`encode_context` could not have produced.
    """
    if not data:
        return ()
    if data[:1] != _CONTEXT_PREFIX:
        raise InvalidArgument("malformed context: unknown format", field="context")
    try:
        flat = _tuple(_unpack(data, ValueError))
        if len(flat) % 2 or not flat:
            raise ValueError("expected a non-empty list of actor, counter pairs")
        vv = tuple(zip(flat[0::2], flat[1::2], strict=True))
        dvvset.validate_vector(vv)
    except ValueError as exc:
        raise InvalidArgument(f"malformed context: {exc}", field="context") from exc
    return vv
