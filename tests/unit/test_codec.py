"""The node-to-node codec: registered messages round-trip; malformed bytes are CodecError."""

from __future__ import annotations

import msgpack
import pytest

from kvcluster.net import codec
from kvcluster.net.codec import CodecError
from kvcluster.net.messages import ReplicaRead, ReplicaWrite, ReplicaWriteReply, WriteItem

ITEMS = (
    WriteItem(b"\x00\x01a", b"\x01rec-a", None, b"\x07" * 16),
    WriteItem(b"\x00\x02b", b"\x01rec-b", "n3", b""),
    WriteItem(b"\x00\x03c", b"\x01rec-c", None),  # base None: repair / handoff
)


@pytest.mark.parametrize(
    "msg",
    [
        ReplicaWrite(ITEMS),
        ReplicaWrite(()),
        ReplicaRead((b"\x00\x01a", b"\x00\x02b")),
        ReplicaWriteReply((None, "corrupt record")),
        (ReplicaWrite(ITEMS[:1]), ReplicaRead(())),  # tuples of messages
    ],
)
def test_messages_round_trip(msg: object) -> None:
    assert codec.decode(codec.encode(msg)) == msg


def test_a_replica_write_is_one_array_of_plain_tuples() -> None:
    """No nested extension object per item (each would cost a Python call)."""
    outer = msgpack.unpackb(codec.encode(ReplicaWrite(ITEMS)), use_list=False, raw=False)
    assert isinstance(outer, msgpack.ExtType) and outer.code == 19
    fields = msgpack.unpackb(outer.data, use_list=False, raw=False)  # no ext_hook needed
    assert fields == (tuple((i.pkey, i.record, i.hint_for, i.base) for i in ITEMS),)


def _ext(tag: int, fields: object) -> bytes:
    inner = msgpack.packb(fields, use_bin_type=True)
    data: bytes = msgpack.packb(msgpack.ExtType(tag, inner), use_bin_type=True)
    return data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_ext(19, (((b"k",),),)), "malformed ReplicaWrite"),  # an item of 1 field
        (_ext(19, ((b"k", b"r", None, None, 5),)), "malformed ReplicaWrite"),  # 5 fields
        (_ext(19, (7,)), "malformed ReplicaWrite"),  # items not an array
        (_ext(19, ()), "malformed ReplicaWrite"),  # no field at all
        (_ext(17, (1, 2)), "malformed ReplicaRead"),  # default unflatten: too many fields
        (_ext(99, ()), "unknown message tag 99"),
        (b"\xc1", "undecodable"),
    ],
)
def test_malformed_messages_are_codec_errors(data: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        codec.decode(data)


def test_flatten_needs_unflatten() -> None:
    with pytest.raises(ValueError, match="both"):
        codec.message(120, flatten=lambda m: ())
