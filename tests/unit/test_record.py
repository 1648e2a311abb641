"""Tests of kvcluster.core.record: siblings, the record and context codecs."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcluster.core import dvvset
from kvcluster.core.dvvset import Clock, Entry, VersionVector
from kvcluster.core.record import (
    CorruptRecord,
    Record,
    Sibling,
    decode_context,
    decode_record,
    encode_context,
    encode_record,
    is_deleted,
    live,
    live_values,
    newest_timestamp,
    tombstone,
)
from kvcluster.errors import InvalidArgument
from tests.strategies import actors, records

# -- strategies -------------------------------------------------------------------------

vectors = st.dictionaries(actors, st.integers(0, 2**64 - 1), max_size=5).map(
    lambda d: tuple(sorted(d.items()))
)


def rebuilt(rec: Record) -> Record:
    """An equal record made of fresh objects (no shared identity with ``rec``)."""

    def fresh(s: Sibling) -> Sibling:
        return Sibling(int(str(s.timestamp_ms)), s.deleted, bytes(bytearray(s.data)))

    return Clock(
        tuple(
            Entry(e.actor.encode().decode(), int(str(e.counter)), tuple(map(fresh, e.values)))
            for e in rec.entries
        ),
        tuple(map(fresh, rec.anonymous)),
    )


def two_writers() -> Record:
    a = dvvset.update(dvvset.new(live(b"alice", 1_000)), "n1.1")
    return dvvset.update_with(dvvset.new(tombstone(2_000)), a, "n2.7")


# -- siblings and helpers ---------------------------------------------------------------


def test_constructors() -> None:
    assert live(b"v", 5) == Sibling(timestamp_ms=5, deleted=False, data=b"v")
    assert tombstone(7) == Sibling(timestamp_ms=7, deleted=True, data=b"")


def test_a_tombstone_carries_no_data() -> None:
    with pytest.raises(ValueError, match="tombstone"):
        Sibling(1, True, b"x")


def test_siblings_order_by_timestamp_first() -> None:
    assert sorted([live(b"b", 2), tombstone(1), live(b"a", 2)]) == [
        tombstone(1),
        live(b"a", 2),
        live(b"b", 2),
    ]


def test_live_values_newest_first_without_tombstones() -> None:
    rec: Record = Clock(
        (
            Entry("a", 3, (live(b"x", 10), tombstone(30))),
            Entry("b", 2, (live(b"y", 20), live(b"w", 20))),
        ),
        (live(b"old", 5),),
    )
    assert live_values(rec) == [b"y", b"w", b"x", b"old"]


def test_live_values_keeps_equal_data_from_distinct_writes() -> None:
    rec: Record = Clock((Entry("a", 1, (live(b"x", 1),)), Entry("b", 1, (live(b"x", 1),))))
    assert live_values(rec) == [b"x", b"x"]


def test_is_deleted() -> None:
    assert is_deleted(dvvset.empty())
    assert is_deleted(Clock((Entry("a", 2, (tombstone(1),)),)))
    assert not is_deleted(two_writers())
    assert not is_deleted(Clock((), (live(b"", 1),)))  # an empty value is still a value


def test_newest_timestamp_includes_tombstones() -> None:
    assert newest_timestamp(two_writers()) == 2_000
    assert newest_timestamp(Clock((Entry("a", 4),), (live(b"v", -3),))) == -3
    assert newest_timestamp(Clock((Entry("a", 4),))) is None


# -- record codec -----------------------------------------------------------------------


def test_golden_encoding() -> None:
    # The stored format: changing these bytes requires a new format version.
    assert encode_record(two_writers()) == (
        b"\x01"
        b"\x92"  # [entries, anonymous]
        b"\x92"  # two entries
        b"\x93\xa4n1.1\x01\x91\x93\xcd\x03\xe8\xc2\xc4\x05alice"
        b"\x93\xa4n2.7\x01\x91\x93\xcd\x07\xd0\xc3\xc4\x00"
        b"\x90"  # no anonymous values
    )
    assert encode_record(dvvset.empty()) == b"\x01\x92\x90\x90"


@given(records())
def test_record_round_trip(rec: Record) -> None:
    assert decode_record(encode_record(rec)) == rec


@given(records(), records())
def test_equal_records_encode_identically_and_only_they_do(a: Record, b: Record) -> None:
    assert encode_record(rebuilt(a)) == encode_record(a)
    assert (encode_record(a) == encode_record(b)) == (a == b)


def test_replicas_that_merge_in_different_orders_store_identical_bytes() -> None:
    x = dvvset.update(dvvset.new(live(b"x", 1)), "a")
    y = dvvset.update(dvvset.new(live(b"y", 2)), "b")
    z = dvvset.update_with(dvvset.new_with_context(dvvset.join(x), live(b"z", 3)), x, "c")
    one = dvvset.sync(dvvset.sync(x, y), z)
    two = dvvset.sync(z, dvvset.sync(y, x))
    assert encode_record(one) == encode_record(two)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "unknown record format"),
        (b"\x02\x92\x90\x90", "unknown record format"),
        (b"\x01", "undecodable"),
        (b"\x01\x92\x90\x90\x90", "undecodable"),  # trailing data
        (b"\x01\x92\x90", "undecodable"),  # truncated
        (b"\x01\x91\x90", "array of 2 items"),
        (b"\x01\x80", "expected an array"),  # a map
    ],
)
def test_decode_rejects_malformed_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptRecord, match=reason):
        decode_record(data)


def packed(obj: object) -> bytes:
    """``obj`` in msgpack after a format byte 1."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return b"\x01" + body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([[["a", True, []]], []], "actor \\(str\\) and counter \\(int\\)"),
        ([[[b"a", 1, []]], []], "actor \\(str\\) and counter \\(int\\)"),
        ([[["a", -1, []]], []], "negative counter"),
        ([[["a", 0, [[1, False, b"x"]]]], []], "1 values but counter 0"),
        ([[["b", 1, []], ["a", 1, []]], []], "sorted by actor"),
        ([[["a", 1, []], ["a", 2, []]], []], "sorted by actor"),
        ([[], [[1, 0, b"x"]]], "sibling must be"),  # deleted as int
        ([[], [[1, False, "x"]]], "sibling must be"),  # data as str
        ([[], [[1.5, False, b"x"]]], "sibling must be"),
        ([[], [[1, False]]], "array of 3 items"),
        ([[], [[2, False, b"x"], [1, False, b"x"]]], "sorted and unique"),
        ([[], [[1, False, b"x"], [1, False, b"x"]]], "sorted and unique"),
        ([[], [[1, True, b"x"]]], "tombstone"),
    ],
)
def test_decode_rejects_invalid_records(body: object, reason: str) -> None:
    with pytest.raises(CorruptRecord, match=reason):
        decode_record(packed(body))


@given(st.binary())
def test_decode_of_arbitrary_bytes_only_raises_corrupt_record(data: bytes) -> None:
    for candidate in (data, b"\x01" + data):
        try:
            rec = decode_record(candidate)
        except CorruptRecord:
            continue
        assert decode_record(encode_record(rec)) == rec


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=20,
)


@given(msgpack_values)
def test_decode_of_arbitrary_msgpack_only_raises_corrupt_record(body: object) -> None:
    try:
        rec = decode_record(packed(body))
    except CorruptRecord:
        return
    assert decode_record(encode_record(rec)) == rec


@given(records(), st.data())
def test_decode_of_damaged_records_only_raises_corrupt_record(
    rec: Record, data: st.DataObject
) -> None:
    good = bytearray(encode_record(rec))
    position = data.draw(st.integers(0, len(good) - 1))
    match data.draw(st.sampled_from(["flip", "cut", "insert"])):
        case "flip":
            good[position] ^= data.draw(st.integers(1, 255))
        case "cut":
            del good[position:]
        case _:
            good[position:position] = data.draw(st.binary(min_size=1, max_size=4))
    try:
        damaged = decode_record(bytes(good))
    except CorruptRecord:
        return
    assert decode_record(encode_record(damaged)) == damaged


# -- context codec ----------------------------------------------------------------------


def test_empty_context_is_empty_bytes() -> None:
    assert encode_context(()) == b""
    assert decode_context(b"") == ()


def test_context_golden_encoding() -> None:
    assert encode_context((("n1.1", 3), ("n2.7", 1))) == b"\x01\x94\xa4n1.1\x03\xa4n2.7\x01"


@given(vectors)
def test_context_round_trip(vv: VersionVector) -> None:
    assert decode_context(encode_context(vv)) == vv


@given(records())
def test_context_of_a_record_round_trips(rec: Record) -> None:
    vv = dvvset.join(rec)
    assert decode_context(encode_context(vv)) == vv


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",
        b"\x02\x92\xa1a\x01",  # unknown format
        b"\x01",  # nothing after the format byte
        b"\x01\x90",  # an empty list is spelled b""
        b"\x01\x91\xa1a",  # odd length
        b"\x01\x92\xa1a\x01\x00",  # trailing data
        packed(["b", 1, "a", 1]),  # unsorted
        packed(["a", 1, "a", 2]),  # duplicate actor
        packed(["a", -1]),
        packed(["a", True]),
        packed(["a", 1.0]),
        packed([b"a", 1]),
        packed({"a": 1}),
        packed("a"),
    ],
)
def test_decode_context_rejects_malformed_bytes(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="malformed context") as info:
        decode_context(data)
    assert info.value.field == "context"


@given(st.binary(min_size=1))
def test_decode_context_of_arbitrary_bytes_only_raises_invalid_argument(data: bytes) -> None:
    for candidate in (data, b"\x01" + data):
        try:
            vv = decode_context(candidate)
        except InvalidArgument as exc:
            assert exc.field == "context"
            continue
        dvvset.validate_vector(vv)
        assert decode_context(encode_context(vv)) == vv
