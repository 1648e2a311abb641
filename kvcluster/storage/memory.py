"""An in-memory :class:`~kvcluster.storage.base.Storage` for the deterministic simulator.

Same contract as the LMDB store, with no threads and no real time:

* Each table is a sorted list of keys (``bisect``) plus a dict of values, so
  scans are ordered and nothing iterates a set.
* :meth:`MemoryStorage.read` is a true snapshot, by copy-on-write: a write that
  changes a table some open snapshot still holds copies that table first. (The
  simulator's stores are small; the copy is O(table).)
* :meth:`MemoryStorage.write` first awaits the ``delay`` hook (by default
  ``asyncio.sleep(0)``; the simulator passes one that sleeps in virtual time to
  model the disk), then applies ``fn`` atomically: if ``fn`` raises, an undo log
  rolls its changes back. Applying and returning happen with no ``await`` in
  between, so a write is acknowledged exactly when it is applied. A write whose
  awaiting coroutine is cancelled during the delay is never applied: that is
  how a crashed simulated node loses its unacknowledged writes.
* Every applied write is its own "batch" (``stats().batches`` counts the writes
  that committed); there is no group commit to model.
* ``max_pending`` bounds the writes waiting in the delay (``Overloaded``
  beyond it) and ``capacity_bytes`` (sum of key and value lengths over all
  tables) simulates a full disk (``StorageFull``, raised by the ``put`` that
  would overflow it; the write is rolled back even if ``fn`` swallows it).

To restart a simulated node, call :meth:`MemoryStorage.reopen`: it returns a
new store over the same data and retires this one (its unapplied writes fail
and are never applied, its reads raise), like reopening a directory after the
process that held it died.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TypeVar

from kvcluster.errors import Internal, Overloaded, StorageFull
from kvcluster.storage.base import StorageStats, Table, WriteView

T = TypeVar("T")

DelayHook = Callable[[], Awaitable[None]]

DEFAULT_MAX_PENDING = 50_000


async def _no_delay() -> None:
    await asyncio.sleep(0)


class _ViewClosed(RuntimeError):
    def __init__(self) -> None:
        super().__init__("storage view used after its transaction ended")


class _TableData:
    """One table: sorted keys and their values; ``readers`` snapshots share it."""

    __slots__ = ("keys", "readers", "values")

    def __init__(self, keys: list[bytes], values: dict[bytes, bytes]) -> None:
        self.keys = keys
        self.values = values
        self.readers = 0

    def copy(self) -> _TableData:
        return _TableData(list(self.keys), dict(self.values))


class _Data:
    """The durable state: what survives :meth:`MemoryStorage.reopen`."""

    __slots__ = ("bytes_used", "tables")

    def __init__(self) -> None:
        self.tables = {table: _TableData([], {}) for table in Table}
        self.bytes_used = 0

    def writable(self, table: Table) -> _TableData:
        """The table, copied first if a snapshot still holds it."""
        data = self.tables[table]
        if data.readers:
            data = data.copy()
            self.tables[table] = data
        return data


class _View:
    """Reads over a fixed set of tables (a snapshot, or the live tables of a write)."""

    __slots__ = ("_open", "_tables")

    def __init__(self, tables: dict[Table, _TableData]) -> None:
        self._tables = tables
        self._open = True

    def get(self, table: Table, key: bytes) -> bytes | None:
        if not self._open:
            raise _ViewClosed()
        return self._tables[table].values.get(key)

    def scan(
        self,
        table: Table,
        prefix: bytes = b"",
        start: bytes | None = None,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        if limit is not None and limit < 0:
            raise ValueError(f"scan limit must be >= 0, got {limit}")
        if not self._open:
            raise _ViewClosed()
        return self._scan(self._tables[table], prefix, start, limit)

    def _scan(
        self, data: _TableData, prefix: bytes, start: bytes | None, limit: int | None
    ) -> Iterator[tuple[bytes, bytes]]:
        lo = prefix if start is None or start < prefix else start
        keys, values = data.keys, data.values
        i = bisect.bisect_left(keys, lo)
        count = 0
        while i < len(keys) and count != limit:
            if not self._open:
                raise _ViewClosed()
            key = keys[i]
            if not key.startswith(prefix):
                return
            yield key, values[key]
            count += 1
            i += 1


class _ReadContext:
    """What :meth:`MemoryStorage.read` returns: pins a snapshot on entry, unpins on exit."""

    __slots__ = ("_store", "_view")

    def __init__(self, store: MemoryStorage) -> None:
        self._store = store
        self._view: _View | None = None

    def __enter__(self) -> _View:
        if self._view is not None:
            raise RuntimeError("a storage read context cannot be entered twice")
        self._store._check_open()
        tables = dict(self._store._data.tables)
        for data in tables.values():
            data.readers += 1
        self._view = _View(tables)
        return self._view

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        view = self._view
        if view is not None and view._open:
            view._open = False
            for data in view._tables.values():
                data.readers -= 1


class _WriteView(_View):
    """The live tables, changed in place with an undo log (copy-on-write for snapshots)."""

    __slots__ = ("_capacity", "_data", "_undo", "full")

    def __init__(self, data: _Data, capacity: int | None) -> None:
        super().__init__(data.tables)
        self._data = data
        self._capacity = capacity
        self._undo: list[tuple[Table, bytes, bytes | None]] = []
        self.full: StorageFull | None = None

    def scan(
        self,
        table: Table,
        prefix: bytes = b"",
        start: bytes | None = None,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        # Materialised, so the function may change the table while it iterates.
        return iter(list(super().scan(table, prefix, start, limit)))

    def put(self, table: Table, key: bytes, value: bytes) -> None:
        if not self._open:
            raise _ViewClosed()
        if not key:
            raise ValueError("storage keys must be non-empty")
        key, value = bytes(key), bytes(value)
        old = self._tables[table].values.get(key)
        grow = len(value) - len(old) if old is not None else len(key) + len(value)
        if self._capacity is not None and self._data.bytes_used + grow > self._capacity:
            self.full = StorageFull(
                f"storage is full: {self._data.bytes_used} of {self._capacity} bytes used,"
                f" a write needs {grow} more"
            )
            raise self.full
        self._set(table, key, value)

    def delete(self, table: Table, key: bytes) -> bool:
        if not self._open:
            raise _ViewClosed()
        if key not in self._tables[table].values:
            return False
        self._set(table, bytes(key), None)
        return True

    def _set(self, table: Table, key: bytes, value: bytes | None) -> bytes | None:
        """Store (or with None remove) ``key``; return the old value. No undo record."""
        data = self._data.writable(table)
        old = data.values.get(key)
        if old is None:
            if value is not None:
                bisect.insort(data.keys, key)
                self._data.bytes_used += len(key) + len(value)
        elif value is None:
            del data.keys[bisect.bisect_left(data.keys, key)]
            self._data.bytes_used -= len(key) + len(old)
        else:
            self._data.bytes_used += len(value) - len(old)
        if value is None:
            data.values.pop(key, None)
        else:
            data.values[key] = value
        if self._open:
            self._undo.append((table, key, old))
        return old

    def rollback(self) -> None:
        self._open = False
        for table, key, old in reversed(self._undo):
            self._set(table, key, old)
        self._undo.clear()


class MemoryStorage:
    """The in-memory store (see the module documentation)."""

    def __init__(
        self,
        *,
        delay: DelayHook = _no_delay,
        max_pending: int = DEFAULT_MAX_PENDING,
        capacity_bytes: int | None = None,
        _data: _Data | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._delay = delay
        self._max_pending = max_pending
        self._capacity = capacity_bytes
        self._data = _data if _data is not None else _Data()
        self._pending = 0
        self._writes = 0
        self._batches = 0
        self._closing = False
        self._retired = False
        self._drained: asyncio.Future[None] | None = None

    def _check_open(self) -> None:
        if self._retired:
            raise Internal("storage is closed")

    # -- reads ----------------------------------------------------------------------------

    def read(self) -> _ReadContext:
        """A snapshot: ``with storage.read() as view: ...``."""
        return _ReadContext(self)

    # -- writes ---------------------------------------------------------------------------

    async def write(
        self, fn: Callable[[WriteView], T], on_applied: Callable[[T], None] | None = None
    ) -> T:
        """Await the delay hook, then apply ``fn`` atomically and return its result
        (applied is durable here: ``on_applied`` is called just before returning)."""
        if self._closing or self._retired:
            raise Internal("storage is closed: write rejected")
        if self._pending >= self._max_pending:
            raise Overloaded(
                f"storage write queue is full ({self._max_pending} pending)", queue="storage"
            )
        self._pending += 1
        try:
            await self._delay()
        finally:
            self._pending -= 1
            if self._pending == 0 and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
        if self._retired:
            raise Internal("storage was reopened before this write was applied: not applied")
        result = self._apply(fn)
        if on_applied is not None:
            on_applied(result)
        return result

    def _apply(self, fn: Callable[[WriteView], T]) -> T:
        self._writes += 1
        view = _WriteView(self._data, self._capacity)
        try:
            result = fn(view)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError("a storage write function must not be async")
            if view.full is not None:
                raise view.full  # fn swallowed it: the write still fails
        except BaseException:
            view.rollback()
            raise
        view._open = False
        self._batches += 1
        return result

    # -- the rest -------------------------------------------------------------------------

    def stats(self) -> StorageStats:
        return StorageStats(
            writes=self._writes,
            batches=self._batches,
            pending=self._pending,
            bytes_used=self._data.bytes_used,
        )

    async def close(self) -> None:
        """Reject new writes, wait for those already waiting to be applied, then close.

        Reads after this raise; :meth:`reopen` gives a working store over the same data.
        """
        self._closing = True
        if self._pending and not self._retired:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)
        self._retired = True

    def reopen(self) -> MemoryStorage:
        """A fresh store over this one's data; this one is retired (see the module docs)."""
        self._retired = True
        self._closing = True
        return MemoryStorage(
            delay=self._delay,
            max_pending=self._max_pending,
            capacity_bytes=self._capacity,
            _data=self._data,
        )
