"""decode_record against a plain reference decoder.

decode_record checks the invariants of Sibling, Entry and Clock inline and
builds those objects without running their ``__post_init__``.
:func:`reference_decode` is the decoder it replaced: helper calls plus the
checked constructors. For every input the two must agree: equal records, or
CorruptRecord with the same message (and the same kind of cause).
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcluster.core import dvvset
from kvcluster.core.dvvset import Clock, Entry
from kvcluster.core.record import (
    CorruptRecord,
    Record,
    Sibling,
    decode_record,
    encode_record,
    live,
    tombstone,
)
from tests.strategies import records as any_records

# -- the reference: decode_record as it was before the fast path ------------------------


def reference_decode(data: bytes) -> Record:
    if data[:1] != b"\x01":
        raise CorruptRecord(f"unknown record format {data[:1]!r}")
    try:
        body = msgpack.unpackb(memoryview(data)[1:], use_list=False, raw=False, strict_map_key=True)
    except ValueError as exc:
        raise CorruptRecord(f"undecodable msgpack: {exc}") from exc
    try:
        entries_raw, anonymous_raw = _ref_tuple(body, 2)
        entries = []
        for item in _ref_tuple(entries_raw):
            actor, counter, siblings_raw = _ref_tuple(item, 3)
            if type(actor) is not str or type(counter) is not int:
                raise ValueError("entry must start with actor (str) and counter (int)")
            entries.append(Entry(actor, counter, _ref_siblings(siblings_raw)))
        return Clock(tuple(entries), _ref_siblings(anonymous_raw))
    except ValueError as exc:
        raise CorruptRecord(f"invalid record: {exc}") from exc


def _ref_siblings(raw: object) -> tuple[Sibling, ...]:
    out = []
    for item in _ref_tuple(raw):
        timestamp_ms, deleted, data = _ref_tuple(item, 3)
        if type(timestamp_ms) is not int or type(deleted) is not bool or type(data) is not bytes:
            raise ValueError("sibling must be [timestamp_ms (int), deleted (bool), data (bin)]")
        out.append(Sibling(timestamp_ms, deleted, data))
    return tuple(out)


def _ref_tuple(value: object, length: int | None = None) -> tuple[Any, ...]:
    if type(value) is not tuple:
        raise ValueError(f"expected an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"expected an array of {length} items, got {len(value)}")
    return value


# -- comparing the two ------------------------------------------------------------------


def outcome(decode: Callable[[bytes], Record], data: bytes) -> tuple[object, ...]:
    """What ``decode`` makes of ``data``: the record, or the CorruptRecord's
    message and the type of its cause. Any other exception propagates."""
    try:
        return ("record", decode(data))
    except CorruptRecord as exc:
        return ("corrupt", str(exc), type(exc.__cause__))


def checked_copy(rec: Record) -> Record:
    """``rec`` rebuilt through the checked constructors (which raise ValueError
    if a decoded object breaks an invariant)."""

    def sibling(s: Sibling) -> Sibling:
        return Sibling(s.timestamp_ms, s.deleted, s.data)

    return Clock(
        tuple(Entry(e.actor, e.counter, tuple(map(sibling, e.values))) for e in rec.entries),
        tuple(map(sibling, rec.anonymous)),
    )


def assert_agrees(data: bytes) -> Record | None:
    """decode_record and reference_decode agree on ``data``; the record, if any."""
    got = outcome(decode_record, data)
    assert got == outcome(reference_decode, data)
    if got[0] != "record":
        return None
    rec = got[1]
    assert isinstance(rec, Clock)
    assert checked_copy(rec) == rec
    assert type(rec) is Clock
    assert all(type(e) is Entry for e in rec.entries)
    assert all(type(s) is Sibling for s in dvvset.values(rec))
    return rec


def packed(obj: object) -> bytes:
    """``obj`` in msgpack after a format byte 1."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return b"\x01" + body


def raw_body(rec: Record) -> list[Any]:
    """The msgpack body of ``rec`` as nested lists, to be damaged and packed."""

    def sibling(s: Sibling) -> list[Any]:
        return [s.timestamp_ms, s.deleted, s.data]

    entries = [[e.actor, e.counter, list(map(sibling, e.values))] for e in rec.entries]
    return [entries, list(map(sibling, rec.anonymous))]


# -- strategies -------------------------------------------------------------------------

#: record data: short, and past decode_record's _COPY_LIMIT (where it unpacks a memoryview)
data_values = st.one_of(st.binary(max_size=24), st.integers(4000, 5000).map(lambda n: b"y" * n))


def records() -> st.SearchStrategy[Record]:
    return any_records(data_values, max_counter=2**64 - 1)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=8)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)

#: A value of a neighbouring type, for a leaf of the body.
_NEAR: dict[type, Callable[[Any], object]] = {
    bool: int,  # True -> 1
    int: lambda n: bool(n % 2),
    bytes: lambda b: b.decode("latin-1"),
    str: lambda s: s.encode(),
}


def _paths(node: object, path: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    found = [path]
    if isinstance(node, list):
        for i, child in enumerate(node):
            found.extend(_paths(child, (*path, i)))
    return found


# -- valid records ----------------------------------------------------------------------


@given(records())
def test_round_trip_and_agreement(rec: Record) -> None:
    data = encode_record(rec)
    assert decode_record(data) == rec
    assert assert_agrees(data) == rec
    assert decode_record(bytearray(data)) == rec  # type: ignore[arg-type]
    assert decode_record(memoryview(data)) == rec  # type: ignore[arg-type]


@given(records())
def test_decoded_objects_behave_like_constructed_ones(rec: Record) -> None:
    decoded = decode_record(encode_record(rec))
    assert hash(decoded) == hash(rec)
    assert repr(decoded) == repr(rec)
    assert pickle.loads(pickle.dumps(decoded)) == rec
    assert copy.deepcopy(decoded) == rec
    for value in dvvset.values(decoded):
        assert dataclasses.replace(value) == value
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.data = b"changed"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.entries = ()  # type: ignore[misc]


def test_the_benchmark_records() -> None:
    one = dvvset.update_with(dvvset.new(live(b"x" * 1000, 1)), dvvset.empty(), "abc.1")
    a = dvvset.update(dvvset.new(live(b"a" * 1000, 1_000)), "n1.1")
    b = dvvset.update(dvvset.new(live(b"b" * 1000, 2_000)), "n2.7")
    c = dvvset.update(dvvset.new(tombstone(3_000)), "n3.2")
    three = dvvset.sync_all([a, b, c])
    for rec in (one, three, dvvset.empty()):
        assert assert_agrees(encode_record(rec)) == rec


def test_longer_msgpack_spellings_are_accepted() -> None:
    canonical = Clock((Entry("a", 1, (live(b"x", 5),)),))
    longer = (
        b"\x01"
        b"\xdc\x00\x02"  # array 16 [entries, anonymous]
        b"\xdd\x00\x00\x00\x01"  # array 32 of one entry
        b"\x93\xd9\x01a"  # [str 8 "a",
        b"\xcf\x00\x00\x00\x00\x00\x00\x00\x01"  #  uint 64 1,
        b"\x91\x93\xd0\x05\xc2\xc5\x00\x01x"  #  [[int 8 5, false, bin 16 "x"]]]
        b"\xdc\x00\x00"  # anonymous: array 16 of nothing
    )
    assert assert_agrees(longer) == canonical


# -- invalid records --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "unknown record format"),
        (b"\x00\x92\x90\x90", "unknown record format"),
        (b"\x02\x92\x90\x90", "unknown record format"),
        (b"\x01", "undecodable"),
        (b"\x01\x92\x90\x90\x90", "undecodable"),  # trailing bytes
        (b"\x01\x92\x90\x90\x00", "undecodable"),
        (b"\x01\x92\x90", "undecodable"),  # truncated
        (b"\x01\x92\x90\xc1", "undecodable"),  # the never-used byte
        (b"\x01\x81\x01\x02", "undecodable"),  # an int map key (strict_map_key)
        (b"\x01\xa1\xff", "undecodable"),  # invalid UTF-8
        (packed([[], []]) + b"x" * 5000, "undecodable"),  # past the copy limit
    ],
)
def test_malformed_bytes(data: bytes, reason: str) -> None:
    assert_agrees(data)
    with pytest.raises(CorruptRecord, match=reason):
        decode_record(data)


_X = [1, False, b"x"]
_T = [1, True, b""]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # the body and the entries array
        ([[]], "array of 2 items, got 1"),
        ([[], [], []], "array of 2 items, got 3"),
        ({"a": 1}, "expected an array, got dict"),
        ("ab", "expected an array, got str"),
        (msgpack.ExtType(1, b"ab"), "expected an array, got ExtType"),  # a tuple subclass
        (None, "expected an array, got NoneType"),
        ([{}, []], "expected an array, got dict"),
        (["a", []], "expected an array, got str"),
        ([b"", []], "expected an array, got bytes"),
        # entries
        ([[["a", 1]], []], "array of 3 items, got 2"),
        ([[["a", 1, [], []]], []], "array of 3 items, got 4"),
        ([["abc"], []], "expected an array, got str"),
        ([[msgpack.ExtType(0, b"")], []], "expected an array, got ExtType"),
        ([[["a", True, []]], []], "actor \\(str\\) and counter \\(int\\)"),  # bool counter
        ([[["a", 1.0, []]], []], "actor \\(str\\) and counter \\(int\\)"),
        ([[[b"a", 1, []]], []], "actor \\(str\\) and counter \\(int\\)"),
        ([[[None, 1, []]], []], "actor \\(str\\) and counter \\(int\\)"),
        ([[["a", 1, "x"]], []], "expected an array, got str"),
        ([[["a", 1, ""]], []], "expected an array, got str"),  # iterates to nothing
        ([[["a", 1, b""]], []], "expected an array, got bytes"),
        ([[["a", 1, {}]], []], "expected an array, got dict"),
        ([[["a", 1, None]], []], "expected an array, got NoneType"),
        ([[["a", -1, []]], []], "negative counter -1 for actor 'a'"),
        ([[["a", -1, [_X, _X]]], []], "negative counter"),  # checked before the length
        ([[["a", 0, [_X]]], []], "has 1 values but counter 0"),
        ([[["a", 1, [_X, _T]]], []], "has 2 values but counter 1"),
        ([[["b", 1, []], ["a", 1, []]], []], "sorted by actor"),
        ([[["a", 1, []], ["a", 1, []]], []], "sorted by actor"),  # duplicate actor
        ([[["a", 1, []], ["c", 1, []], ["b", 1, []]], []], "sorted by actor"),
        ([[["", 1, []], ["", 1, []]], []], "sorted by actor"),
        # siblings, in an entry and anonymous
        ([[["a", 1, [[1, False]]]], []], "array of 3 items, got 2"),
        ([[["a", 1, [[1, False, b"x", 0]]]], []], "array of 3 items, got 4"),
        ([[["a", 1, ["abc"]]], []], "expected an array, got str"),
        ([[["a", 1, [b"\x01\xc2x"]]], []], "expected an array, got bytes"),
        ([[["a", 1, [[1, False, "x"]]]], []], "sibling must be"),  # str data
        ([[["a", 1, [[True, False, b"x"]]]], []], "sibling must be"),  # bool timestamp
        ([[["a", 1, [[1.0, False, b"x"]]]], []], "sibling must be"),
        ([[["a", 1, [[1, 0, b"x"]]]], []], "sibling must be"),  # int deleted
        ([[["a", 1, [[1, None, b""]]]], []], "sibling must be"),
        ([[["a", 1, [[1, True, b"x"]]]], []], "tombstone"),
        ([[], [[1, True, b"x"]]], "tombstone"),
        ([[], [[1, False, "x"]]], "sibling must be"),
        ([[], [[1, False]]], "array of 3 items"),
        ([[], "x"], "expected an array, got str"),
        ([[], ""], "expected an array, got str"),  # falsy non-arrays
        ([[], b""], "expected an array, got bytes"),
        ([[], {}], "expected an array, got dict"),
        ([[], 0], "expected an array, got int"),
        ([[], False], "expected an array, got bool"),
        ([[], None], "expected an array, got NoneType"),
        ([[], [[2, False, b"x"], [1, False, b"x"]]], "sorted and unique"),
        ([[], [[1, False, b"x"], [1, False, b"x"]]], "sorted and unique"),  # duplicate
        ([[], [_T, _T]], "sorted and unique"),
        ([[], [[1, True, b""], [1, False, b""]]], "sorted and unique"),  # True > False
        # which error comes first: entries in order, then the anonymous values'
        # types, then the order of the entries, then that of the anonymous values
        ([[["a", 1, [[1, True, b"x"]]], ["b", "n", []]], []], "tombstone"),
        ([[["a", 1.5, []], ["a", 1, [[1, True, b"x"]]]], []], "actor \\(str\\)"),
        ([[["b", 1, []], ["a", 1, []]], [[1, False, "x"]]], "sibling must be"),
        ([[["b", 1, []], ["a", 1, []]], [_X, _X]], "sorted by actor"),
        ([[["a", 2, [_X]], ["a", 0, [_X]]], []], "has 1 values but counter 0"),
    ],
)
def test_invalid_records(body: object, reason: str) -> None:
    data = packed(body)
    assert_agrees(data)
    with pytest.raises(CorruptRecord, match=reason) as info:
        decode_record(data)
    assert isinstance(info.value.__cause__, ValueError)


def test_anonymous_values_and_unsorted_entries_take_the_checked_path() -> None:
    # valid records whose clock decode_record builds with Clock(...)
    rec = Clock((Entry("a", 1, (live(b"a", 1),)), Entry("b", 0)), (tombstone(1), live(b"", 2)))
    assert assert_agrees(encode_record(rec)) == rec


# -- damaged and arbitrary input --------------------------------------------------------


@settings(max_examples=400)
@given(records(), st.data())
def test_damaged_bytes(rec: Record, data: st.DataObject) -> None:
    damaged = bytearray(encode_record(rec))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, max(len(damaged) - 1, 0)))
        match data.draw(st.sampled_from(["flip", "cut", "insert", "set"])):
            case "flip" if damaged:
                damaged[position] ^= data.draw(st.integers(1, 255))
            case "cut":
                del damaged[position:]
            case "set" if damaged:
                damaged[position] = data.draw(st.sampled_from([0x00, 0x90, 0x91, 0x93, 0xC3]))
            case _:
                damaged[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    assert_agrees(bytes(damaged))


@settings(max_examples=400)
@given(records(), st.data())
def test_damaged_structure(rec: Record, data: st.DataObject) -> None:
    """One node of the body replaced, dropped, duplicated, retyped or reordered:
    close to valid, so the deeper checks get exercised."""
    body = raw_body(rec)
    path = data.draw(st.sampled_from(_paths(body)[1:]))
    *parent_path, index = path
    parent: Any = body
    for i in parent_path:
        parent = parent[i]
    node = parent[index]
    match data.draw(st.sampled_from(["replace", "drop", "duplicate", "retype", "reverse"])):
        case "replace":
            parent[index] = data.draw(msgpack_values)
        case "drop":
            del parent[index]
        case "duplicate":
            parent.insert(index, copy.deepcopy(node))
        case "retype" if type(node) in _NEAR:
            parent[index] = _NEAR[type(node)](node)
        case "reverse" if isinstance(node, list):
            node.reverse()
        case _:
            parent[index] = data.draw(msgpack_values)
    assert_agrees(packed(body))


@given(msgpack_values)
def test_arbitrary_msgpack(body: object) -> None:
    assert_agrees(packed(body))


@given(st.binary(max_size=64))
def test_arbitrary_bytes(data: bytes) -> None:
    assert_agrees(data)
    assert_agrees(b"\x01" + data)
