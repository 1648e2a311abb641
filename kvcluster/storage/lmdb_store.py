"""The LMDB store of a real node: snapshot reads inline, one group-committing writer.

Reads
    :meth:`LmdbStorage.read` opens a read-only LMDB transaction on the calling
    thread (the event loop). LMDB readers take no lock and never wait for the
    writer, so a ``get`` costs about a microsecond and is done inline. Values are
    returned as ``bytes`` copies, never buffers into the map. Keep a view open
    only briefly (never across a long ``await``): an old snapshot pins pages the
    writer would otherwise reuse, so the file grows.

Writes (group commit)
    :meth:`LmdbStorage.write` puts ``fn`` on a bounded queue and awaits a future.
    One writer thread takes everything queued (up to ``max_batch`` functions),
    opens one write transaction and runs each function in its own *nested*
    (child) transaction: a function that raises is rolled back alone and its
    exception goes to its caller, while the rest of the batch commits. The batch
    is committed once, with ``fsync``, and only then are all of its futures
    resolved, by a single ``loop.call_soon_threadsafe`` per event loop. Under
    concurrency many writes therefore share one ``fsync``.

    Commit window: a synced LMDB commit costs about 0.1 ms of CPU however few
    writes it holds (two ``fsync`` calls and the B-tree, meta and free-list pages),
    so under a steady stream of small writes the writer would commit them one or
    two at a time and spend a third of the node's CPU doing so. When writes are
    evidently concurrent -- the batch just committed held more than one, or more
    than one is queued -- and the writer is busy (its previous batch ended less
    than ``commit_window`` seconds ago), it waits ``commit_window`` before taking
    the batch, so more writes share the commit (PostgreSQL's ``commit_delay`` with
    ``commit_siblings``). A lone client's writes, one at a time, never wait.

    Cancellation: cancelling a coroutine that awaits :meth:`write` never harms
    the writer. If the writer has not started the function yet, it is skipped
    (not applied); once the writer has started it, it is applied (or fails) like
    any other and the result is discarded. A caller that is cancelled must
    therefore treat its write as "maybe applied".

Full map
    ``lmdb.MapFullError`` (and ``ENOSPC`` from the disk) becomes
    :class:`~kvcluster.errors.StorageFull` for the writes it affects; their
    changes are rolled back and later writes that fit still succeed.

Keys longer than LMDB's limit
    LMDB keys are at most 511 bytes, but a partition-prefixed user key may be
    1 KiB and more. A key of up to ``_DIRECT_MAX`` (495) bytes is stored as it
    is. A longer key is stored under ``key[:495] + blake2b-128(key)`` (511
    bytes) with the value ``len(tail) (4 bytes, big endian) + tail + value``,
    where ``tail = key[495:]``. This keeps LMDB's order correct except among
    long keys that share their first 495 bytes; those are adjacent in LMDB and
    :meth:`scan` sorts each such group by the full key before yielding it. All of
    this is invisible to callers: every key is just ordered bytes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar, cast

import lmdb

from kvcluster.errors import Internal, Overloaded, StorageFull
from kvcluster.storage.base import StorageStats, Table, WriteView

T = TypeVar("T")

DEFAULT_MAP_SIZE: Final = 1 << 30
DEFAULT_MAX_PENDING: Final = 50_000
DEFAULT_MAX_BATCH: Final = 1024
DEFAULT_COMMIT_WINDOW: Final = 0.002
#: A batch stops taking functions once they have written this much (LMDB caps
#: the dirty pages of one transaction; a batch of huge values must not hit it).
MAX_BATCH_BYTES: Final = 64 << 20
MAX_READERS: Final = 1024

_DIRECT_MAX: Final = 495  # longest key stored verbatim
_DIGEST: Final = 16
_LONG_LEN: Final = _DIRECT_MAX + _DIGEST  # every long key is stored as exactly this many bytes

_Outcome = tuple["asyncio.Future[Any]", BaseException | None, Any]


class _ViewClosed(RuntimeError):
    def __init__(self) -> None:
        super().__init__("storage view used after its transaction ended")


# -- long-key encoding ------------------------------------------------------------------------


def _digest(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=_DIGEST).digest()


def _long_key(key: bytes) -> bytes:
    return key[:_DIRECT_MAX] + _digest(key)


def _decode_long(stored_key: bytes, stored_value: bytes) -> tuple[bytes, bytes]:
    n = int.from_bytes(stored_value[:4], "big")
    return stored_key[:_DIRECT_MAX] + stored_value[4 : 4 + n], stored_value[4 + n :]


def _encode_long_value(key: bytes, value: bytes) -> bytes:
    tail = key[_DIRECT_MAX:]
    return len(tail).to_bytes(4, "big") + tail + value


# -- views ------------------------------------------------------------------------------------


class _View:
    """Reads of one LMDB transaction (a read snapshot or a writer's child txn)."""

    __slots__ = ("_dbs", "_open", "_txn")

    def __init__(self, txn: lmdb.Transaction[bytes], dbs: dict[Table, Any]) -> None:
        self._txn = txn
        self._dbs = dbs
        self._open = True

    def _fail(self, exc: lmdb.Error) -> BaseException:
        """The exception to raise for an LMDB error during an operation."""
        return exc if self._open else _ViewClosed()

    def get(self, table: Table, key: bytes) -> bytes | None:
        n = len(key)
        try:
            if 0 < n <= _DIRECT_MAX:  # positional: py-lmdb parses keywords slowly
                return self._txn.get(key, None, self._dbs[table])
            if n == 0:
                return None
            return _get_long(self._txn, self._dbs[table], key)
        except lmdb.Error as exc:
            raise self._fail(exc) from exc

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
        return self._scan(self._dbs[table], prefix, start, limit)

    def _scan(
        self, db: Any, prefix: bytes, start: bytes | None, limit: int | None
    ) -> Iterator[tuple[bytes, bytes]]:
        if limit == 0:
            return
        try:
            with self._txn.cursor(db=db) as cur:
                yield from _scan_cursor(cur, prefix, start, limit)
        except lmdb.Error as exc:
            raise self._fail(exc) from exc


class _ReadContext:
    """What :meth:`LmdbStorage.read` returns: begins the snapshot on entry, ends it on exit."""

    __slots__ = ("_store", "_view")

    def __init__(self, store: LmdbStorage) -> None:
        self._store = store
        self._view: _View | None = None

    def __enter__(self) -> _View:
        if self._view is not None:
            raise RuntimeError("a storage read context cannot be entered twice")
        self._view = _View(self._store._begin_read(), self._store._dbs)
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
            view._txn.abort()


class _WriteView(_View):
    """The view a write function gets: a child transaction of the batch's transaction.

    Any LMDB error leaves the child transaction unusable (and committing it would
    poison the whole batch), so the first one is remembered in ``failure`` and the
    writer aborts the child whatever the function did with the exception.
    """

    __slots__ = ("failure", "written")

    def __init__(self, txn: lmdb.Transaction[bytes], dbs: dict[Table, Any]) -> None:
        super().__init__(txn, dbs)
        self.failure: BaseException | None = None
        self.written = 0

    def _fail(self, exc: lmdb.Error) -> BaseException:
        if not self._open:
            return _ViewClosed()
        if self.failure is None:
            self.failure = _translate(exc)
        return self.failure

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
        n = len(key)
        if n == 0:
            raise ValueError("storage keys must be non-empty")
        txn = self._txn
        db = self._dbs[table]
        try:
            if n <= _DIRECT_MAX:
                txn.put(key, value, db=db)
            else:
                stored = _long_key(key)
                old = txn.get(stored, db=db)
                if old is not None and _decode_long(stored, old)[0] != key:
                    raise Internal(f"storage key digest collision for a {n}-byte key")
                txn.put(stored, _encode_long_value(key, value), db=db)
        except lmdb.Error as exc:
            raise self._fail(exc) from exc
        self.written += n + len(value)

    def delete(self, table: Table, key: bytes) -> bool:
        n = len(key)
        txn = self._txn
        db = self._dbs[table]
        try:
            if 0 < n <= _DIRECT_MAX:
                return txn.delete(key, db=db)
            if n == 0:
                return False
            stored = _long_key(key)
            old = txn.get(stored, db=db)
            if old is None or _decode_long(stored, old)[0] != key:
                return False
            return txn.delete(stored, db=db)
        except lmdb.Error as exc:
            raise self._fail(exc) from exc


def _get_long(txn: lmdb.Transaction[bytes], db: Any, key: bytes) -> bytes | None:
    stored = _long_key(key)
    raw = txn.get(stored, db=db)
    if raw is None:
        return None
    full, value = _decode_long(stored, raw)
    return value if full == key else None


def _scan_cursor(
    cur: lmdb.Cursor[bytes], prefix: bytes, start: bytes | None, limit: int | None
) -> Iterator[tuple[bytes, bytes]]:
    """Items with ``prefix``, ascending by real key, from ``max(prefix, start)``."""
    lo = prefix if start is None or start < prefix else start
    seek = lo[:_DIRECT_MAX]
    if not (cur.set_range(seek) if seek else cur.first()):
        return
    count = 0
    more = True
    while more:
        skey, svalue = cur.item()
        if len(skey) != _LONG_LEN:
            more = cur.next()
            if skey < lo:  # only the verbatim key lo[:495] when lo is long
                continue
            if not skey.startswith(prefix):
                return
            yield skey, svalue
            count += 1
            if count == limit:
                return
            continue
        # A group of long keys sharing their first _DIRECT_MAX bytes: sort by real key.
        head = skey[:_DIRECT_MAX]
        group = [_decode_long(skey, svalue)]
        while more := cur.next():
            skey, svalue = cur.item()
            if len(skey) != _LONG_LEN or skey[:_DIRECT_MAX] != head:
                break
            group.append(_decode_long(skey, svalue))
        group.sort()
        for key, value in group:
            if key < lo:
                continue
            if not key.startswith(prefix):
                return
            yield key, value
            count += 1
            if count == limit:
                return


def _translate(exc: BaseException) -> BaseException:
    """What a writer's caller sees for an exception raised while applying its write."""
    if isinstance(exc, lmdb.MapFullError | lmdb.DiskError):
        full = StorageFull(f"storage is full: {exc}")
        full.__cause__ = exc
        return full
    if isinstance(exc, lmdb.Error):
        failed = Internal(f"storage failure: {exc}")
        failed.__cause__ = exc
        return failed
    return exc


# -- the store --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Request:
    fn: Callable[[WriteView], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    on_applied: Callable[[Any], None] | None = None


_Result = tuple[_Request, BaseException | None, Any]


def _deliver(outcomes: list[_Outcome]) -> None:
    """Resolve a batch's futures (runs on their event loop)."""
    for future, exc, value in outcomes:
        if future.done():  # the caller was cancelled
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)


def check_commit_window(commit_window: float) -> None:
    """Raise ValueError unless ``commit_window`` is within 0..1 s (the node config uses it too)."""
    if not 0.0 <= commit_window <= 1.0:
        raise ValueError(f"commit_window: {commit_window} is outside 0..1 s")


class LmdbStorage:
    """A node's LMDB store (see the module documentation). Create with :meth:`open`."""

    def __init__(
        self,
        env: lmdb.Environment,
        dbs: dict[Table, Any],
        *,
        max_pending: int,
        max_batch: int,
        commit_window: float = DEFAULT_COMMIT_WINDOW,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_pending < 1 or max_batch < 1:
            raise ValueError("max_pending and max_batch must be at least 1")
        check_commit_window(commit_window)
        self._env = env
        self._dbs = dbs
        self._max_pending = max_pending
        self._max_batch = max_batch
        self._commit_window = commit_window
        self._sleep = sleep  # a seam: tests record the writer's waits instead of waiting
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._closed = False
        self._writes = 0
        self._batches = 0
        self._bytes_used = 0
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="lmdb-writer", daemon=True)
        self._thread.start()

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        map_size: int = DEFAULT_MAP_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch: int = DEFAULT_MAX_BATCH,
        commit_window: float = DEFAULT_COMMIT_WINDOW,
        sync: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ) -> LmdbStorage:
        """Open (creating if needed) the store in directory ``path``.

        ``commit_window``: seconds a busy writer waits to gather a batch (see the
        module documentation; 0 = commit whatever is queued at once).
        ``sync=False`` skips ``fsync`` at commit (a crash may then lose recent
        acknowledged writes): for benchmarks and throwaway stores only.
        """
        check_commit_window(commit_window)  # before anything is created on disk
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(
            str(directory),
            map_size=map_size,
            max_dbs=len(Table),
            max_readers=MAX_READERS,
            sync=sync,
            metasync=sync,
            writemap=False,  # nested transactions need it off
            readahead=False,
            max_spare_txns=1,
        )
        try:
            if env.max_key_size() < _LONG_LEN:
                raise Internal(f"LMDB max key size {env.max_key_size()} < {_LONG_LEN}")
            env.reader_check()  # free reader slots of processes that died
            dbs = {table: env.open_db(table.value) for table in Table}
            return cls(
                env,
                dbs,
                max_pending=max_pending,
                max_batch=max_batch,
                commit_window=commit_window,
                sleep=sleep,
            )
        except BaseException:
            env.close()
            raise

    # -- reads ----------------------------------------------------------------------------

    def read(self) -> _ReadContext:
        """A snapshot: ``with storage.read() as view: ...`` (a read-only transaction)."""
        return _ReadContext(self)

    def _begin_read(self) -> lmdb.Transaction[bytes]:
        if self._closed:
            raise Internal("storage is closed")
        return self._env.begin()

    # -- writes ---------------------------------------------------------------------------

    async def write(
        self, fn: Callable[[WriteView], T], on_applied: Callable[[T], None] | None = None
    ) -> T:
        """Apply ``fn`` in a write transaction; return its result once durable.

        See :meth:`kvcluster.storage.base.Storage.write`: ``on_applied`` is
        scheduled on the caller's loop once ``fn``'s child transaction has
        committed into the batch, before the batch's synced commit. Raises ``Overloaded``
        (nothing queued) when ``max_pending`` writes are already waiting and
        ``Internal`` once :meth:`close` has been called.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._closing:
                raise Internal("storage is closed: write rejected")
            if len(self._queue) >= self._max_pending:
                raise Overloaded(
                    f"storage write queue is full ({self._max_pending} pending)", queue="storage"
                )
            self._queue.append(_Request(fn, future, loop, on_applied))
            self._cond.notify()
        return cast(T, await future)

    def _run(self) -> None:
        """The writer thread: batch after batch until closed and drained."""
        window = self._commit_window
        idle_since = 0.0  # when the last batch ended (monotonic)
        last_size = 0  # writes in the last batch
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue:
                        return
                    queued = len(self._queue)
                    gather = (
                        window > 0.0
                        and not self._closing
                        and (queued > 1 or last_size > 1)  # concurrent writers
                        and queued < self._max_batch
                        and time.monotonic() - idle_since < window
                    )
                if gather:
                    self._sleep(window)  # busy: let more writes join this commit
                with self._cond:
                    n = min(len(self._queue), self._max_batch)
                    batch = [self._queue.popleft() for _ in range(n)]
                outcomes: list[_Result] = []
                try:
                    rest = self._apply_batch(batch, outcomes)
                except BaseException as exc:  # a bug or a broken environment: never die

                    def failure(exc: BaseException = exc) -> BaseException:
                        failed = Internal(f"storage writer failed: {exc!r}")
                        failed.__cause__ = exc
                        return failed

                    self._fail_successes(outcomes, failure)
                    seen = {id(req) for req, _, _ in outcomes}
                    outcomes += [(req, failure(), None) for req in batch if id(req) not in seen]
                    rest = []
                if rest:
                    with self._cond:
                        self._queue.extendleft(reversed(rest))
                self._resolve(outcomes)
                idle_since = time.monotonic()
                last_size = len(batch) - len(rest)
        finally:
            self._stopped.set_result(None)

    def _apply_batch(self, batch: list[_Request], outcomes: list[_Result]) -> list[_Request]:
        """Run ``batch`` in one synced transaction, appending to ``outcomes``.

        Returns the requests not started (to be queued again at the front).
        """
        txn = self._env.begin(write=True)
        try:
            rest, lost = self._run_functions(txn, batch, outcomes)
        except BaseException:
            txn.abort()
            raise
        if lost is not None:
            txn.abort()
            self._fail_successes(outcomes, functools.partial(_translate, lost))
            return rest
        if not any(exc is None for _, exc, _ in outcomes):
            txn.abort()  # nothing to commit
            return rest
        try:
            txn.commit()
        except lmdb.Error as exc:
            self._fail_successes(outcomes, functools.partial(_translate, exc))
        else:
            self._batches += 1
        return rest

    def _run_functions(
        self, txn: lmdb.Transaction[bytes], batch: list[_Request], outcomes: list[_Result]
    ) -> tuple[list[_Request], BaseException | None]:
        """Run each function in a child transaction of ``txn``.

        Returns the requests not started and, if ``txn`` became unusable, why.
        """
        written = 0
        for i, req in enumerate(batch):
            if written >= MAX_BATCH_BYTES:
                return batch[i:], None
            if req.future.cancelled():
                continue  # nobody waits for it and it has not started: skip it
            child = self._env.begin(write=True, parent=txn)
            view = _WriteView(child, self._dbs)
            failure: BaseException | None = None
            value: Any = None
            self._writes += 1
            try:
                value = req.fn(view)
                if inspect.isawaitable(value):
                    if inspect.iscoroutine(value):
                        value.close()
                    raise TypeError("a storage write function must not be async")
            except BaseException as exc:
                failure = exc
            view._open = False
            written += view.written
            if view.failure is not None:
                failure = view.failure  # an LMDB error, even if fn swallowed it
            if failure is not None:
                child.abort()
                outcomes.append((req, failure, None))
                continue
            try:
                child.commit()
            except lmdb.Error as exc:
                # A failed child commit leaves the batch transaction unusable: the caller
                # aborts it, failing every write applied in it so far.
                outcomes.append((req, _translate(exc), None))
                return batch[i + 1 :], exc
            outcomes.append((req, None, value))
            if req.on_applied is not None:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    req.loop.call_soon_threadsafe(req.on_applied, value)
        return [], None

    @staticmethod
    def _fail_successes(outcomes: list[_Result], failure: Callable[[], BaseException]) -> None:
        """The batch transaction was lost: its successful writes fail with ``failure()``."""
        for i, (req, exc, _) in enumerate(outcomes):
            if exc is None:
                outcomes[i] = (req, failure(), None)

    @staticmethod
    def _resolve(outcomes: list[_Result]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for req, exc, value in outcomes:
            by_loop.setdefault(req.loop, []).append((req.future, exc, value))
        for loop, items in by_loop.items():
            # RuntimeError: that loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)

    # -- the rest -------------------------------------------------------------------------

    def stats(self) -> StorageStats:
        if not self._closed:
            try:
                info = self._env.info()
                self._bytes_used = (info["last_pgno"] + 1) * self._env.stat()["psize"]
            except lmdb.Error:
                pass
        return StorageStats(
            writes=self._writes,
            batches=self._batches,
            pending=len(self._queue),
            bytes_used=self._bytes_used,
        )

    async def close(self) -> None:
        """Reject new writes, finish the queued ones, then close the environment.

        Read views still open are invalidated (using them raises).
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        await asyncio.wrap_future(self._stopped)
        if not self._closed:
            self.stats()  # remember the final size
            self._closed = True
            self._env.close()
