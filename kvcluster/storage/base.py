"""The Storage seam: what node logic may ask of a disk.

Node code never touches LMDB directly; it reads through a :class:`ReadView`
(a consistent snapshot, cheap enough to use inline on the event loop) and
changes state only through :meth:`Storage.write`, which runs a function inside
a write transaction. Writes from many callers are group-committed: one synced
transaction holds many of them, and each caller's ``await`` returns only once
its change is durable. Two implementations exist: LMDB (``lmdb_store``) for real
nodes and an in-memory store (``memory``) for the deterministic simulator.

A write function must be quick and pure apart from the view it is given: it
runs on the writer (a thread for LMDB) and may be retried never. If it raises,
its own changes are rolled back, the exception reaches its caller, and other
writes in the same batch are unaffected.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")


class Table(enum.Enum):
    """The sub-databases of a node's store. Keys in each are raw bytes, ordered."""

    DATA = b"data"  # partition(2 bytes, big endian) + user key -> encoded dvvset
    HINTS = b"hints"  # hinted-handoff entries (see kvcluster.node.handoff)
    MERKLE = b"merkle"  # per-partition Merkle segment hashes (see kvcluster.core.merkle)
    META = b"meta"  # node metadata: identity, ring, actor epochs, ...

    # Members are singletons, so identity hashing is exact, and it is C code:
    # Enum.__hash__ is a Python call on every table lookup of every storage access.
    __hash__ = object.__hash__


class ReadView(Protocol):
    """A consistent snapshot of the store."""

    def get(self, table: Table, key: bytes) -> bytes | None: ...

    def scan(
        self,
        table: Table,
        prefix: bytes = b"",
        start: bytes | None = None,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """Items whose key starts with ``prefix``, ascending, from ``start`` (inclusive)."""
        ...


class WriteView(ReadView, Protocol):
    """A view inside a write transaction; it sees its own changes."""

    def put(self, table: Table, key: bytes, value: bytes) -> None: ...

    def delete(self, table: Table, key: bytes) -> bool:
        """Remove ``key``; True if it existed."""
        ...


@dataclass(frozen=True, slots=True)
class StorageStats:
    """Counters for metrics and benchmarks."""

    writes: int  # write functions applied (committed or failed)
    batches: int  # synced transactions committed
    pending: int  # write functions queued now
    bytes_used: int  # approximate size of the store on disk


class Storage(Protocol):
    """A node's durable store."""

    def read(self) -> AbstractContextManager[ReadView]:
        """A snapshot; use as ``with storage.read() as view:``. Never blocks for long."""
        ...

    async def write(
        self, fn: Callable[[WriteView], T], on_applied: Callable[[T], None] | None = None
    ) -> T:
        """Apply ``fn`` atomically; return its result once the change is durable.

        ``on_applied``, if given, is called on the caller's event loop with the
        result as soon as ``fn`` has been applied, which may be before the change
        is durable (and, rarely, before it is lost after all: then ``write``
        raises). A caller can start work that does not need durability, e.g.
        sending the change to other replicas while this one syncs it.

        Raises :class:`kvcluster.errors.Overloaded` when the write queue is full
        and :class:`kvcluster.errors.StorageFull` when the disk (map) is full;
        in both cases nothing was changed.
        """
        ...

    def stats(self) -> StorageStats: ...

    async def close(self) -> None:
        """Finish queued writes, then release the store."""
        ...
