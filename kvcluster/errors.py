"""Exceptions raised by kvcluster, each carrying the data that explains it.

Modelled on the DataStax driver (``Unavailable(required, alive)``) and h11: a
small hierarchy rooted at :class:`KVError`, every class with typed fields so a
caller can react without parsing messages. The server maps these to gRPC status
codes and the client maps them back, so the same class is raised on both sides
of the wire (see :func:`to_wire` and :func:`from_wire`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class KVError(Exception):
    """Base class of every kvcluster error."""

    #: Stable name used on the wire (trailing metadata) and in ``--json`` output.
    kind: ClassVar[str] = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, Any]:
        """The structured fields of this error (without the message)."""
        return {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.kind, self.message, self.details()))


class InvalidArgument(KVError):
    """The request is malformed: it was rejected and nothing was changed."""

    kind = "invalid_argument"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def details(self) -> dict[str, Any]:
        return {"field": self.field}


class Unavailable(KVError):
    """Fewer replicas are alive than the request requires; nothing was attempted."""

    kind = "unavailable"

    def __init__(self, required: int, alive: int, message: str = "") -> None:
        super().__init__(
            message or f"not enough replicas available: required {required}, alive {alive}"
        )
        self.required = required
        self.alive = alive

    def details(self) -> dict[str, Any]:
        return {"required": self.required, "alive": self.alive}


class Timeout(KVError):
    """The request was sent to replicas but too few answered in time.

    For a write this is like Cassandra's ``WriteTimeout``: the write may have been
    applied on some replicas (``received`` of them acknowledged it).
    """

    kind = "timeout"

    def __init__(self, required: int, received: int, message: str = "") -> None:
        super().__init__(
            message or f"timed out waiting for replicas: required {required}, received {received}"
        )
        self.required = required
        self.received = received

    def details(self) -> dict[str, Any]:
        return {"required": self.required, "received": self.received}


class Overloaded(KVError):
    """A bounded queue is full; the request was rejected (retry later)."""

    kind = "overloaded"

    def __init__(self, message: str = "node overloaded, request rejected", queue: str = "") -> None:
        super().__init__(message)
        self.queue = queue

    def details(self) -> dict[str, Any]:
        return {"queue": self.queue}


class StorageFull(KVError):
    """The node's store has no room for the write; nothing was changed."""

    kind = "storage_full"


class NotReady(KVError):
    """The node has not joined a cluster yet (no ring agreed by a majority)."""

    kind = "not_ready"


class Unreachable(KVError):
    """No node could be contacted (client side)."""

    kind = "unreachable"

    def __init__(self, addresses: list[str], message: str = "") -> None:
        joined = ", ".join(addresses) or "(none)"
        super().__init__(message or f"no node reachable at {joined}")
        self.addresses = list(addresses)

    def details(self) -> dict[str, Any]:
        return {"addresses": self.addresses}


class Internal(KVError):
    """An unexpected server-side failure (a bug): the message says what happened."""

    kind = "internal"


_KINDS: dict[str, type[KVError]] = {
    cls.kind: cls
    for cls in (
        KVError,
        InvalidArgument,
        Unavailable,
        Timeout,
        Overloaded,
        StorageFull,
        NotReady,
        Unreachable,
        Internal,
    )
}


def _rebuild(kind: str, message: str, details: dict[str, Any]) -> KVError:
    return from_wire(kind, message, details)


def to_wire(err: KVError) -> dict[str, Any]:
    """A JSON-able description of ``err``: ``{"kind", "message", **details}``."""
    return {"kind": err.kind, "message": err.message, **err.details()}


def from_wire(kind: str, message: str, details: dict[str, Any]) -> KVError:
    """Rebuild the exception described by :func:`to_wire`; unknown kinds become KVError."""
    cls = _KINDS.get(kind, KVError)
    try:
        if cls is Unavailable:
            return Unavailable(int(details["required"]), int(details["alive"]), message)
        if cls is Timeout:
            return Timeout(int(details["required"]), int(details["received"]), message)
        if cls is InvalidArgument:
            return InvalidArgument(message, str(details.get("field", "")))
        if cls is Overloaded:
            return Overloaded(message, str(details.get("queue", "")))
        if cls is Unreachable:
            return Unreachable([str(a) for a in details.get("addresses", [])], message)
    except (KeyError, TypeError, ValueError):
        return KVError(message)
    return cls(message)
