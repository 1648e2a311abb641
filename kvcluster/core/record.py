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
from kvcluster.core.dvvset import Clock, Entry, VersionVector
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
    body = (
        [
            [e.actor, e.counter, [[s.timestamp_ms, s.deleted, s.data] for s in e.values]]
            for e in rec.entries
        ],
        [[s.timestamp_ms, s.deleted, s.data] for s in rec.anonymous],
    )
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack(RECORD_FORMAT)  # msgpack packs 1 as the single byte 0x01
    packer.pack(body)
    out: bytes = packer.bytes()
    return out


def decode_record(data: bytes) -> Record:
    """The record encoded in ``data``; CorruptRecord if it is not a valid
    encoding (unknown format, bad msgpack, trailing bytes, wrong shape or
    types, or a clock that breaks the dvvset invariants).

    msgpack's longer spellings of a value (an int in 8 bytes, say) are
    accepted; canonical bytes are what :func:`encode_record` produces, and a
    node only ever stores those."""
    if data[:1] != _RECORD_PREFIX:
        raise CorruptRecord(f"unknown record format {data[:1]!r}")
    body = _unpack(data, CorruptRecord)
    try:
        entries_raw, anonymous_raw = _tuple(body, 2)
        entries = []
        for item in _tuple(entries_raw):
            actor, counter, siblings_raw = _tuple(item, 3)
            if type(actor) is not str or type(counter) is not int:
                raise ValueError("entry must start with actor (str) and counter (int)")
            entries.append(Entry(actor, counter, _siblings(siblings_raw)))
        return Clock(tuple(entries), _siblings(anonymous_raw))
    except ValueError as exc:
        raise CorruptRecord(f"invalid record: {exc}") from exc


def _siblings(raw: object) -> tuple[Sibling, ...]:
    out = []
    for item in _tuple(raw):
        timestamp_ms, deleted, data = _tuple(item, 3)
        if type(timestamp_ms) is not int or type(deleted) is not bool or type(data) is not bytes:
            raise ValueError("sibling must be [timestamp_ms (int), deleted (bool), data (bin)]")
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
