"""Binary codec for node-to-node messages.

Internal messages are frozen dataclasses registered with :func:`message` under
a small integer tag. They are encoded with msgpack: a message becomes an
extension object (its tag, then its fields in declaration order), tuples stay
tuples, bytes stay bytes. The same codec is used by the gRPC transport and by
the simulator (which round-trips every message), so the simulation exercises
real serialization.

Field types are limited to what msgpack carries natively (None, bool, int,
float, str, bytes, tuples, dicts with str/bytes/int keys) and other registered
messages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

_BY_TAG: dict[int, type[Any]] = {}
_TAG_OF: dict[type[Any], int] = {}
_FLATTEN: dict[type[Any], Callable[[Any], tuple[Any, ...]]] = {}  # message -> its fields
_UNFLATTEN: dict[int, Callable[[tuple[Any, ...]], Any]] = {}  # tag: fields -> message

M = TypeVar("M")


class CodecError(ValueError):
    """The bytes are not a valid encoding of a registered message."""


def message(
    tag: int,
    *,
    flatten: Callable[[Any], tuple[Any, ...]] | None = None,
    unflatten: Callable[[tuple[Any, ...]], Any] | None = None,
) -> Callable[[type[M]], type[M]]:
    """Register a frozen dataclass as a wire message with a unique ``tag`` (1..127).

    By default its fields are encoded in declaration order, nested messages as
    extension objects of their own. A hot message may give ``flatten`` (the
    fields as plain msgpack values) and ``unflatten`` (the message back from
    them) instead: e.g. a batch of small messages as one array of tuples, which
    msgpack packs without a Python call per item. ``unflatten`` raises
    TypeError or ValueError on a malformed input.
    """
    if (flatten is None) != (unflatten is None):
        raise ValueError("give both flatten and unflatten, or neither")

    def register(cls: type[M]) -> type[M]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        if not 1 <= tag <= 127:
            raise ValueError(f"tag {tag} of {cls.__name__} is outside 1..127")
        if tag in _BY_TAG and _BY_TAG[tag] is not cls:
            raise ValueError(f"tag {tag} used by {_BY_TAG[tag].__name__} and {cls.__name__}")
        _BY_TAG[tag] = cls
        _TAG_OF[cls] = tag
        names = tuple(f.name for f in dataclasses.fields(cls))
        _FLATTEN[cls] = flatten or (lambda obj: tuple([getattr(obj, n) for n in names]))
        _UNFLATTEN[tag] = unflatten or (lambda fields: cls(*fields))
        return cls

    return register


def _default(obj: Any) -> Any:
    flatten = _FLATTEN.get(type(obj))
    if flatten is None:
        raise TypeError(f"cannot encode {type(obj).__name__}")
    fields = flatten(obj)
    return msgpack.ExtType(
        _TAG_OF[type(obj)], msgpack.packb(fields, default=_default, use_bin_type=True)
    )


def _ext_hook(tag: int, data: bytes) -> Any:
    unflatten = _UNFLATTEN.get(tag)
    if unflatten is None:
        raise CodecError(f"unknown message tag {tag}")
    fields = msgpack.unpackb(data, ext_hook=_ext_hook, use_list=False, raw=False)
    try:
        return unflatten(fields)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"malformed {_BY_TAG[tag].__name__}: {exc}") from exc


def encode(msg: object) -> bytes:
    """Encode a registered message (or a tuple of them) to bytes."""
    data: bytes = msgpack.packb(msg, default=_default, use_bin_type=True)
    return data


def decode(data: bytes) -> Any:
    """Decode bytes produced by :func:`encode`; raise :class:`CodecError` if malformed."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, use_list=False, raw=False)
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"undecodable message: {exc}") from exc


def stream_decoder(max_frame: int) -> msgpack.Unpacker:
    """An incremental decoder for a stream of encoded messages (``feed`` then iterate).

    msgpack values are self-delimiting, so a byte stream of :func:`encode`
    outputs needs no extra framing. A value larger than ``max_frame`` bytes, or
    malformed bytes, raise while iterating.
    """
    return msgpack.Unpacker(
        ext_hook=_ext_hook, use_list=False, raw=False, max_buffer_size=max_frame
    )
