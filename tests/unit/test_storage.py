"""Tests of the Storage contract, run against LmdbStorage and MemoryStorage alike.

Where a test needs several writes in flight at once it *holds the writer*
deterministically instead of relying on timing: for LMDB a write function that
blocks the writer thread on a ``threading.Event`` (everything written meanwhile
queues up behind it and forms the next batch); for the memory store a delay
hook that waits on an ``asyncio.Event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import lmdb
import pytest

from kvcluster.errors import Internal, Overloaded, StorageFull
from kvcluster.sim.loop import run_simulation
from kvcluster.storage import lmdb_store
from kvcluster.storage.base import ReadView, Storage, Table, WriteView
from kvcluster.storage.lmdb_store import LmdbStorage
from kvcluster.storage.memory import MemoryStorage

T = TypeVar("T")
KINDS = ["lmdb", "memory"]
HOLD_TIMEOUT = 30.0  # a safety net against hanging, never an assertion


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def put(table: Table, key: bytes, value: bytes) -> Callable[[WriteView], None]:
    def fn(view: WriteView) -> None:
        view.put(table, key, value)

    return fn


def items(view: ReadView, table: Table = Table.DATA, **kw: Any) -> list[tuple[bytes, bytes]]:
    return list(view.scan(table, **kw))


class Boom(Exception):
    """A write function's own failure."""


class Harness:
    """One store of either kind, plus a way to hold its writer and to reopen it."""

    def __init__(
        self,
        kind: str,
        path: Path,
        *,
        max_pending: int = 10_000,
        max_batch: int = 1024,
        map_size: int = 64 << 20,
        capacity: int | None = None,
        commit_window: float = lmdb_store.DEFAULT_COMMIT_WINDOW,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.kind = kind
        self.commit_window = commit_window
        self.sleep = sleep
        self.path = path
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.map_size = map_size
        self.capacity = capacity
        self._gate: asyncio.Event | None = None
        self.store: LmdbStorage | MemoryStorage = self._open()

    def _open(self) -> LmdbStorage | MemoryStorage:
        if self.kind == "lmdb":
            return LmdbStorage.open(
                self.path / "db",
                map_size=self.map_size,
                max_pending=self.max_pending,
                max_batch=self.max_batch,
                commit_window=self.commit_window,
                sleep=self.sleep,
            )
        return MemoryStorage(
            delay=self._delay, max_pending=self.max_pending, capacity_bytes=self.capacity
        )

    async def _delay(self) -> None:
        await asyncio.sleep(0)
        if self._gate is not None:
            await self._gate.wait()

    @property
    def batched(self) -> bool:
        return self.kind == "lmdb"

    async def reopen(self) -> None:
        """Close the store and open it again over the same data."""
        await self.store.close()
        if isinstance(self.store, MemoryStorage):
            self.store = self.store.reopen()
        else:
            self.store = self._open()

    @asynccontextmanager
    async def held(self) -> AsyncIterator[asyncio.Task[str]]:
        """Hold the writer: writes made inside the block wait, and are all pending at its end.

        Yields the task of the "gate" write (it puts META ``gate``), which the writer
        is busy with (LMDB) or which is waiting like the others (memory).
        """
        if self.kind == "lmdb":
            started, release = threading.Event(), threading.Event()

            def gate(view: WriteView) -> str:
                started.set()
                if not release.wait(HOLD_TIMEOUT):
                    raise RuntimeError("the test never released the writer")
                view.put(Table.META, b"gate", b"1")
                return "gate"

            task = asyncio.create_task(self.store.write(gate))
            await asyncio.sleep(0)  # the task queues its write
            assert await asyncio.to_thread(started.wait, HOLD_TIMEOUT)
            assert self.store.stats().pending == 0  # the writer took it: it is running
            try:
                yield task
                await asyncio.sleep(0)
            finally:
                release.set()
        else:
            self._gate = asyncio.Event()

            def mem_gate(view: WriteView) -> str:
                view.put(Table.META, b"gate", b"1")
                return "gate"

            task = asyncio.create_task(self.store.write(mem_gate))
            await asyncio.sleep(0)
            try:
                yield task
                await asyncio.sleep(0)
            finally:
                event, self._gate = self._gate, None
                event.set()


@asynccontextmanager
async def harness(kind: str, tmp_path: Path, **kw: Any) -> AsyncIterator[Harness]:
    h = Harness(kind, tmp_path, **kw)
    try:
        yield h
    finally:
        await h.store.close()


def start(coro: Awaitable[T]) -> asyncio.Task[T]:
    async def wrap() -> T:
        return await coro

    return asyncio.create_task(wrap())


# -- basic operations ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_put_get_delete_are_per_table(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            s = h.store

            def fill(view: WriteView) -> None:
                for table in Table:
                    view.put(table, b"k", table.value + b"-v")

            await s.write(fill)
            with s.read() as view:
                assert [view.get(t, b"k") for t in Table] == [t.value + b"-v" for t in Table]
                assert view.get(Table.DATA, b"missing") is None

            assert await s.write(lambda v: v.delete(Table.HINTS, b"k")) is True
            assert await s.write(lambda v: v.delete(Table.HINTS, b"k")) is False
            await s.write(put(Table.DATA, b"k", b"new"))
            with s.read() as view:
                assert view.get(Table.HINTS, b"k") is None
                assert view.get(Table.DATA, b"k") == b"new"
                assert view.get(Table.MERKLE, b"k") == b"merkle-v"
                assert view.get(Table.META, b"k") == b"meta-v"
                assert items(view, Table.HINTS) == []
                assert items(view, Table.DATA) == [(b"k", b"new")]

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_values_are_bytes_copies(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            key, value = bytearray(b"key"), bytearray(b"value" * 100)
            await h.store.write(lambda v: v.put(Table.DATA, bytes(key), bytes(value)))
            with h.store.read() as view:
                got = view.get(Table.DATA, b"key")
                scanned = items(view)
            assert type(got) is bytes
            assert got == bytes(value)
            assert all(type(k) is bytes and type(v) is bytes for k, v in scanned)

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_empty_key_cannot_be_stored(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            with pytest.raises(ValueError, match="non-empty"):
                await h.store.write(put(Table.DATA, b"", b"v"))
            with h.store.read() as view:
                assert view.get(Table.DATA, b"") is None
                assert items(view) == []
            assert await h.store.write(lambda v: v.delete(Table.DATA, b"")) is False

    run(main())


# -- scans --------------------------------------------------------------------------------

SCAN_KEYS = [b"a", b"b", b"b\x00", b"ba", b"bb", b"bba", b"bc", b"c", b"c\xff", b"\xff"]


@pytest.mark.parametrize("kind", KINDS)
def test_scan_prefix_start_limit_and_order(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            shuffled = list(SCAN_KEYS)
            random.Random(7).shuffle(shuffled)

            def fill(view: WriteView) -> None:
                for key in shuffled:
                    view.put(Table.DATA, key, b"v" + key)
                view.put(Table.META, b"b-other-table", b"x")

            await h.store.write(fill)

            def keys(**kw: Any) -> list[bytes]:
                with h.store.read() as view:
                    got = items(view, **kw)
                assert all(v == b"v" + k for k, v in got)
                return [k for k, _ in got]

            assert keys() == SCAN_KEYS
            assert keys(prefix=b"b") == [b"b", b"b\x00", b"ba", b"bb", b"bba", b"bc"]
            assert keys(prefix=b"bb") == [b"bb", b"bba"]
            assert keys(prefix=b"bz") == []
            assert keys(prefix=b"\xff") == [b"\xff"]
            assert keys(prefix=b"b", start=b"bb") == [b"bb", b"bba", b"bc"]
            assert keys(prefix=b"b", start=b"bab") == [b"bb", b"bba", b"bc"]
            assert keys(prefix=b"b", start=b"a") == keys(prefix=b"b")  # before the prefix
            assert keys(prefix=b"b", start=b"c") == []  # past the prefix
            assert keys(start=b"bc") == [b"bc", b"c", b"c\xff", b"\xff"]
            assert keys(start=b"") == SCAN_KEYS
            assert keys(prefix=b"b", limit=2) == [b"b", b"b\x00"]
            assert keys(prefix=b"b", start=b"bb", limit=1) == [b"bb"]
            assert keys(limit=0) == []
            assert keys(prefix=b"c", limit=99) == [b"c", b"c\xff"]
            with h.store.read() as view:
                assert items(view, Table.META) == [(b"b-other-table", b"x")]
                with pytest.raises(ValueError, match="limit"):
                    view.scan(Table.DATA, limit=-1)

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_scan_is_lazy_and_can_stop_early(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:

            def fill(view: WriteView) -> None:
                for i in range(1000):
                    view.put(Table.DATA, b"%04d" % i, b"v")

            await h.store.write(fill)
            with h.store.read() as view:
                it = view.scan(Table.DATA, prefix=b"0")
                assert next(it)[0] == b"0000"
                assert next(it)[0] == b"0001"
                assert [k for k, _ in view.scan(Table.DATA, start=b"0998")] == [b"0998", b"0999"]

    run(main())


def _long(head: bytes, n: int, tail: bytes) -> bytes:
    """A key of ``n`` bytes: ``head`` repeated, then ``tail``."""
    return (head * n)[: n - len(tail)] + tail


@pytest.mark.parametrize("kind", KINDS)
def test_keys_longer_than_lmdb_limit_keep_their_order(kind: str, tmp_path: Path) -> None:
    """Keys up to several KiB work like short ones (LMDB itself stops at 511 bytes)."""

    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            p = b"P" * 600  # long keys sharing their first 600 bytes
            keys = [
                p[:494],
                p[:495],
                p[:496],
                p[:511],
                p + b"\x00",
                p + b"a",
                p + b"a" + b"x" * 400,
                p + b"b",
                p + b"c" * 2000,
                p[:495] + b"Q",
                b"P" * 494 + b"Q" * 100,
                b"Q",
            ]
            shuffled = list(keys)
            random.Random(3).shuffle(shuffled)

            def fill(view: WriteView) -> None:
                for key in shuffled:
                    view.put(Table.DATA, key, len(key).to_bytes(4, "big"))

            await h.store.write(fill)
            expected = sorted(keys)
            with h.store.read() as view:
                for key in keys:
                    assert view.get(Table.DATA, key) == len(key).to_bytes(4, "big")
                assert view.get(Table.DATA, p + b"z") is None
                assert view.get(Table.DATA, p[:495] + b"z" * 100) is None
                assert [k for k, _ in items(view)] == expected
                assert [k for k, _ in items(view, prefix=p)] == [
                    k for k in expected if k[:600] == p
                ]
                assert [k for k, _ in items(view, prefix=p + b"a")] == [
                    p + b"a",
                    p + b"a" + b"x" * 400,
                ]
                assert [k for k, _ in items(view, prefix=b"P", start=p + b"a!")] == [
                    k for k in expected if k >= p + b"a!" and k.startswith(b"P")
                ]
                assert [k for k, _ in items(view, start=p[:497], limit=3)] == [
                    k for k in expected if k >= p[:497]
                ][:3]

            assert await h.store.write(lambda v: v.delete(Table.DATA, p + b"b")) is True
            assert await h.store.write(lambda v: v.delete(Table.DATA, p + b"b")) is False
            assert await h.store.write(lambda v: v.delete(Table.DATA, p + b"zz")) is False
            await h.store.write(put(Table.DATA, p + b"a", b"changed"))
            with h.store.read() as view:
                assert view.get(Table.DATA, p + b"b") is None
                assert view.get(Table.DATA, p + b"a") == b"changed"
                assert len(items(view, prefix=p)) == len([k for k in keys if k[:600] == p]) - 1

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_random_operations_match_a_sorted_dict_model(kind: str, tmp_path: Path) -> None:
    """A seeded differential test: puts, deletes and scans over short and long keys."""
    seed = 20240611
    rng = random.Random(seed)
    heads = [b"", b"a", b"ab", b"H" * 480, b"H" * 495, b"H" * 500]

    def random_key() -> bytes:
        head = rng.choice(heads)
        return head + bytes(rng.choice(b"abc") for _ in range(rng.choice([1, 2, 3, 20, 600])))

    async def main() -> None:
        model: dict[Table, dict[bytes, bytes]] = {t: {} for t in Table}
        async with harness(kind, tmp_path) as h:
            for _ in range(60):
                ops = [
                    (rng.choice([Table.DATA, Table.HINTS]), random_key(), rng.random() < 0.3)
                    for _ in range(rng.randrange(1, 12))
                ]
                value = rng.randbytes(rng.randrange(0, 40))

                def apply(view: WriteView, ops: Any = ops, value: bytes = value) -> list[bool]:
                    deleted = []
                    for table, key, delete in ops:
                        if delete:
                            deleted.append(view.delete(table, key))
                        else:
                            view.put(table, key, value)
                            deleted.append(False)
                    return deleted

                results = await h.store.write(apply)
                for (table, key, delete), result in zip(ops, results, strict=True):
                    if delete:
                        assert result == (key in model[table])
                        model[table].pop(key, None)
                    else:
                        model[table][key] = value
            with h.store.read() as view:
                for table in (Table.DATA, Table.HINTS):
                    ordered = sorted(model[table].items())
                    assert items(view, table) == ordered
                    for key, value in ordered:
                        assert view.get(table, key) == value
                    for _ in range(40):
                        prefix = random_key()[: rng.choice([0, 1, 2, 481, 496, 501])]
                        begin = rng.choice([None, random_key()])
                        limit = rng.choice([None, 0, 1, 5])
                        want = [
                            (k, v)
                            for k, v in ordered
                            if k.startswith(prefix) and (begin is None or k >= begin)
                        ][:limit]
                        got = items(view, table, prefix=prefix, start=begin, limit=limit)
                        assert got == want, (seed, prefix, begin, limit)

    run(main())


# -- write functions ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_write_fn_sees_its_own_changes_and_returns_its_result(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            await h.store.write(put(Table.DATA, b"old", b"1"))

            def fn(view: WriteView) -> list[object]:
                seen: list[object] = []
                view.put(Table.DATA, b"a", b"A")
                view.put(Table.DATA, b"b", b"B")
                seen.append(view.get(Table.DATA, b"a"))
                view.put(Table.DATA, b"a", b"A2")
                seen.append(view.get(Table.DATA, b"a"))
                seen.append(view.delete(Table.DATA, b"old"))
                seen.append(view.get(Table.DATA, b"old"))
                seen.append(items(view))
                for key, _ in view.scan(Table.DATA):  # changing the table while scanning
                    view.delete(Table.DATA, key)
                    view.put(Table.DATA, key + b"!", b"x")
                return seen

            seen = await h.store.write(fn)
            assert seen == [b"A", b"A2", True, None, [(b"a", b"A2"), (b"b", b"B")]]
            with h.store.read() as view:
                assert items(view) == [(b"a!", b"x"), (b"b!", b"x")]

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_failing_fn_is_rolled_back_alone_and_others_in_its_batch_commit(
    kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            await h.store.write(put(Table.DATA, b"keep", b"original"))
            boom = Boom("fn failed")

            def first(view: WriteView) -> str:
                view.put(Table.DATA, b"a", b"from-first")
                return "first"

            def failing(view: WriteView) -> str:
                view.put(Table.DATA, b"a", b"from-failing")  # over first's change
                view.put(Table.DATA, b"f", b"from-failing")
                view.delete(Table.DATA, b"keep")
                view.put(Table.HINTS, b"h", b"from-failing")
                raise boom

            def last(view: WriteView) -> str:
                assert view.get(Table.DATA, b"a") == b"from-first"
                assert view.get(Table.DATA, b"keep") == b"original"
                view.put(Table.DATA, b"c", b"from-last")
                return "last"

            before = h.store.stats()
            async with h.held() as gate:
                tasks = [start(h.store.write(fn)) for fn in (first, failing, last)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert await gate == "gate"
            assert results == ["first", boom, "last"]
            after = h.store.stats()
            assert after.writes - before.writes == 4  # the gate and the three
            if h.batched:
                assert after.batches - before.batches == 2  # the gate's, then all three
            with h.store.read() as view:
                assert items(view) == [
                    (b"a", b"from-first"),
                    (b"c", b"from-last"),
                    (b"keep", b"original"),
                ]
                assert items(view, Table.HINTS) == []

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_async_write_fn_is_rejected(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:

            async def fn(view: WriteView) -> None:
                view.put(Table.DATA, b"k", b"v")  # pragma: no cover - never runs

            with pytest.raises(TypeError, match="must not be async"):
                await h.store.write(cast(Callable[[WriteView], None], fn))  # a misuse
            with h.store.read() as view:
                assert items(view) == []

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_views_cannot_be_used_after_their_transaction(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            stash: list[WriteView] = []

            def keep(view: WriteView) -> None:
                view.put(Table.DATA, b"a", b"1")
                stash.append(view)

            await h.store.write(keep)
            with pytest.raises(RuntimeError, match="after its transaction"):
                stash[0].put(Table.DATA, b"b", b"2")
            with pytest.raises(RuntimeError, match="after its transaction"):
                stash[0].get(Table.DATA, b"a")
            with h.store.read() as view:
                it = view.scan(Table.DATA)
                assert next(it) == (b"a", b"1")
                lazy = view.scan(Table.DATA)
            with pytest.raises(RuntimeError, match="after its transaction"):
                view.get(Table.DATA, b"a")
            with pytest.raises(RuntimeError, match="after its transaction"):
                view.scan(Table.DATA)
            with pytest.raises(RuntimeError, match="after its transaction"):
                next(lazy)
            with h.store.read() as view:
                assert items(view) == [(b"a", b"1")]  # the stashed view changed nothing

    run(main())


# -- snapshots ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_read_is_a_snapshot(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            s = h.store
            await s.write(put(Table.DATA, b"k", b"v1"))
            await s.write(put(Table.DATA, b"gone", b"x"))
            with s.read() as old:
                it = old.scan(Table.DATA)
                assert next(it) == (b"gone", b"x")

                def change(view: WriteView) -> None:
                    view.put(Table.DATA, b"k", b"v2")
                    view.put(Table.DATA, b"new", b"n")
                    view.delete(Table.DATA, b"gone")

                await s.write(change)
                with s.read() as new:
                    assert items(new) == [(b"k", b"v2"), (b"new", b"n")]
                assert old.get(Table.DATA, b"k") == b"v1"
                assert old.get(Table.DATA, b"new") is None
                assert old.get(Table.DATA, b"gone") == b"x"
                assert list(it) == [(b"k", b"v1")]  # an open scan stays in its snapshot
                assert items(old) == [(b"gone", b"x"), (b"k", b"v1")]
            with s.read() as view:
                assert items(view) == [(b"k", b"v2"), (b"new", b"n")]

    run(main())


# -- backpressure and a full disk ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_overloaded_when_the_queue_is_full_and_nothing_is_applied(
    kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path, max_pending=4) as h:
            ran: list[bytes] = []

            def record(key: bytes) -> Callable[[WriteView], bytes]:
                def fn(view: WriteView) -> bytes:
                    ran.append(key)
                    view.put(Table.DATA, key, b"v")
                    return key

                return fn

            # LMDB's writer is busy with the gate write; the memory store counts it pending.
            fill = 4 if h.batched else 3
            async with h.held() as gate:
                queued = [start(h.store.write(record(b"q%d" % i))) for i in range(fill)]
                await asyncio.sleep(0)
                assert h.store.stats().pending == 4
                with pytest.raises(Overloaded) as info:
                    await h.store.write(record(b"rejected"))
                assert info.value.queue == "storage"
            done = await asyncio.gather(gate, *queued)
            assert b"rejected" not in ran
            assert await h.store.write(record(b"after")) == b"after"  # room again
            with h.store.read() as view:
                assert view.get(Table.DATA, b"rejected") is None
                assert [k for k, _ in items(view)] == [b"after", *done[1:]]

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_storage_full_changes_nothing_and_later_small_writes_work(
    kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path, map_size=256 << 10, capacity=128 << 10) as h:
            s = h.store
            await s.write(put(Table.DATA, b"small-0", b"v"))

            def big(view: WriteView) -> None:
                view.put(Table.DATA, b"before-big", b"x")
                view.put(Table.DATA, b"big", b"B" * (1 << 20))

            with pytest.raises(StorageFull):
                await s.write(big)

            def swallowing(view: WriteView) -> None:
                view.put(Table.DATA, b"before-swallowed", b"x")
                # The write must still fail: the store refused part of it.
                with contextlib.suppress(StorageFull):
                    view.put(Table.DATA, b"big", b"B" * (1 << 20))

            with pytest.raises(StorageFull):
                await s.write(swallowing)

            async with h.held():  # a full write among others in one batch
                tasks = [
                    start(s.write(put(Table.DATA, b"small-1", b"v"))),
                    start(s.write(big)),
                    start(s.write(put(Table.DATA, b"small-2", b"v"))),
                ]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert results[0] is None
            assert isinstance(results[1], StorageFull)
            assert results[2] is None
            await s.write(put(Table.DATA, b"small-3", b"v" * 1000))
            with s.read() as view:
                assert [k for k, _ in items(view)] == [
                    b"small-0",
                    b"small-1",
                    b"small-2",
                    b"small-3",
                ]
            assert s.stats().bytes_used <= (256 << 10)

    run(main())


# -- cancellation -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_write_cancelled_before_it_ran_is_not_applied(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            async with h.held():
                doomed = start(h.store.write(put(Table.DATA, b"doomed", b"x")))
                kept = start(h.store.write(put(Table.DATA, b"kept", b"x")))
                await asyncio.sleep(0)
                doomed.cancel()
            await kept
            with pytest.raises(asyncio.CancelledError):
                await doomed
            await h.store.write(put(Table.DATA, b"later", b"x"))
            with h.store.read() as view:
                assert [k for k, _ in items(view)] == [b"kept", b"later"]

    run(main())


def test_lmdb_write_cancelled_while_running_is_applied_and_writer_survives(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with harness("lmdb", tmp_path) as h:
            async with h.held() as gate:
                gate.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gate
            await h.store.write(put(Table.DATA, b"after", b"x"))
            with h.store.read() as view:
                assert view.get(Table.META, b"gate") == b"1"  # it was running: applied
                assert view.get(Table.DATA, b"after") == b"x"

    run(main())


# -- group commit (LMDB) ------------------------------------------------------------------


@pytest.mark.parametrize(("max_batch", "batches"), [(1024, 1), (100, 5), (7, 72)])
def test_lmdb_concurrent_writes_share_batches(tmp_path: Path, max_batch: int, batches: int) -> None:
    """500 writes queued while the writer is busy commit in ceil(500 / max_batch) batches."""

    async def main() -> None:
        async with harness("lmdb", tmp_path, max_batch=max_batch) as h:
            before = h.store.stats()
            async with h.held() as gate:
                tasks = [
                    start(h.store.write(put(Table.DATA, b"k%03d" % i, b"v%d" % i)))
                    for i in range(500)
                ]
                await asyncio.sleep(0)
                assert h.store.stats().pending == 500
            await asyncio.gather(gate, *tasks)
            after = h.store.stats()
            assert after.writes - before.writes == 501
            assert after.batches - before.batches == 1 + batches
            assert after.pending == 0
            with h.store.read() as view:
                assert len(items(view)) == 500
                assert view.get(Table.DATA, b"k499") == b"v499"

    run(main())


class RecordedSleep:
    """Stands in for the writer's ``time.sleep``: records each wait and returns at once,
    or, ``held``, only once ``wake`` is set (``sleeping`` tells the writer is waiting)."""

    def __init__(self, held: bool = False) -> None:
        self.calls: list[float] = []
        self.held = held
        self.sleeping = threading.Event()
        self.wake = threading.Event()

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.sleeping.set()
        if self.held and not self.wake.wait(HOLD_TIMEOUT):
            raise RuntimeError("the test never woke the writer")


def queue_writes(h: Harness, count: int, prefix: bytes = b"k") -> list[asyncio.Task[None]]:
    return [start(h.store.write(put(Table.DATA, prefix + b"%d" % i, b"v"))) for i in range(count)]


async def behind_the_gate(h: Harness, count: int) -> None:
    """Queue ``count`` writes while the writer is busy with a gate write; wait for all."""
    async with h.held() as gate:
        tasks = queue_writes(h, count)
        await asyncio.sleep(0)
    await asyncio.gather(gate, *tasks)


def test_lmdb_writer_idle_longer_than_the_window_does_not_wait(tmp_path: Path) -> None:
    """Commit window: even right after a concurrent batch, a write reaching a writer that
    has been idle for longer than the window is committed at once."""

    async def main() -> None:
        slept = RecordedSleep()
        async with harness("lmdb", tmp_path, commit_window=0.5, sleep=slept) as h:
            await behind_the_gate(h, 3)
            assert slept.calls == [0.5]  # the three found the writer busy
            await asyncio.sleep(0.6)  # idle for longer than the window
            await behind_the_gate(h, 3)
            # the second gate (after a batch of three, but an idle writer) did not wait;
            # the three behind it did
            assert slept.calls == [0.5, 0.5]
            assert h.store.stats().batches == 4

    run(main())


def test_lmdb_a_lone_write_right_after_a_concurrent_batch_waits(tmp_path: Path) -> None:
    """A batch of more than one says writers are concurrent: the next write, even alone
    in the queue, waits the window while the writer is busy."""

    async def main() -> None:
        slept = RecordedSleep()
        async with harness("lmdb", tmp_path, commit_window=0.9, sleep=slept) as h:
            await behind_the_gate(h, 3)
            assert slept.calls == [0.9]
            await h.store.write(put(Table.DATA, b"lone", b"v"))  # within 0.9 s of the three
            assert slept.calls == [0.9, 0.9]
            await h.store.write(put(Table.DATA, b"lone", b"w"))  # after a batch of one
            assert slept.calls == [0.9, 0.9]

    run(main())


def test_lmdb_writes_one_at_a_time_never_wait(tmp_path: Path) -> None:
    """A lone client (each write awaited before the next) is never delayed, however fast."""

    async def main() -> None:
        slept = RecordedSleep()
        async with harness("lmdb", tmp_path, commit_window=0.9, sleep=slept) as h:
            for i in range(20):
                await h.store.write(put(Table.DATA, b"k%d" % i, b"v"))
            assert slept.calls == []
            assert h.store.stats().batches == 20

    run(main())


def test_lmdb_busy_writer_waits_the_window_to_gather_a_batch(tmp_path: Path) -> None:
    """Writes queued while a batch commits make the writer wait ``commit_window`` once;
    the writes arriving during that wait join the same commit."""

    async def main() -> None:
        slept = RecordedSleep(held=True)
        async with harness("lmdb", tmp_path, commit_window=0.9, sleep=slept) as h:
            before = h.store.stats()
            async with h.held() as gate:
                early = queue_writes(h, 2)
                await asyncio.sleep(0)
            assert await asyncio.to_thread(slept.sleeping.wait, HOLD_TIMEOUT)
            try:
                late = queue_writes(h, 3, b"late")
                await asyncio.sleep(0)
                assert h.store.stats().pending == 5  # the waiting writer took none of them yet
            finally:
                slept.wake.set()
            await asyncio.gather(gate, *early, *late)
            # The gate reached an idle writer (no wait); the two found it busy.
            assert slept.calls == [0.9]
            assert h.store.stats().batches - before.batches == 2  # the gate, then all five

    run(main())


@pytest.mark.parametrize(("window", "max_batch"), [(0.0, 1024), (0.9, 5)])
def test_lmdb_writer_does_not_wait_with_no_window_or_a_full_batch(
    tmp_path: Path, window: float, max_batch: int
) -> None:
    async def main() -> None:
        slept = RecordedSleep()
        async with harness(
            "lmdb", tmp_path, commit_window=window, max_batch=max_batch, sleep=slept
        ) as h:
            await behind_the_gate(h, 5)
            assert slept.calls == []
            with h.store.read() as view:
                assert len(items(view)) == 5

    run(main())


def test_lmdb_writer_closing_does_not_wait_the_window(tmp_path: Path) -> None:
    """Writes still queued when the store closes are committed without a wait."""

    async def main() -> None:
        slept = RecordedSleep()
        async with harness("lmdb", tmp_path, commit_window=0.9, sleep=slept) as h:
            async with h.held() as gate:
                tasks = queue_writes(h, 5)
                closing = start(h.store.close())
                await asyncio.sleep(0)
            await asyncio.gather(gate, *tasks, closing)  # all five committed
            assert slept.calls == []

    run(main())


@pytest.mark.parametrize("window", [-0.001, 1.5])
def test_lmdb_commit_window_out_of_range_is_refused(tmp_path: Path, window: float) -> None:
    with pytest.raises(ValueError, match="commit_window"):
        LmdbStorage.open(tmp_path / "db", commit_window=window)
    assert not (tmp_path / "db").exists()


def test_lmdb_unqueued_concurrent_writes_all_complete(tmp_path: Path) -> None:
    """500 writes from concurrent tasks with no held writer: all durable, none lost."""

    async def main() -> None:
        async with harness("lmdb", tmp_path) as h:
            before = h.store.stats()
            await asyncio.gather(
                *(h.store.write(put(Table.DATA, b"k%03d" % i, b"v")) for i in range(500))
            )
            after = h.store.stats()
            assert after.writes - before.writes == 500
            assert 1 <= after.batches - before.batches <= 500
            await h.reopen()
            with h.store.read() as view:
                assert len(items(view)) == 500

    run(main())


# -- close --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_close_drains_pending_writes_then_rejects(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            async with h.held() as gate:
                tasks = [
                    start(h.store.write(put(Table.DATA, b"k%02d" % i, b"v"))) for i in range(20)
                ]
                await asyncio.sleep(0)
                closing = asyncio.create_task(h.store.close())
                await asyncio.sleep(0)
                assert not closing.done()
                with pytest.raises(Internal, match="closed"):
                    await h.store.write(put(Table.DATA, b"late", b"v"))
            await closing
            assert all(t.done() and t.exception() is None for t in [gate, *tasks])
            with pytest.raises(Internal, match="closed"):
                await h.store.write(put(Table.DATA, b"late", b"v"))
            with pytest.raises(Internal, match="closed"):
                h.store.read().__enter__()
            await h.store.close()  # twice is fine
            await h.reopen()
            with h.store.read() as view:
                assert [k for k, _ in items(view)] == [b"k%02d" % i for i in range(20)]
                assert view.get(Table.META, b"gate") == b"1"
                assert view.get(Table.DATA, b"late") is None

    run(main())


@pytest.mark.parametrize("kind", KINDS)
def test_stats_count_writes_and_size(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with harness(kind, tmp_path) as h:
            empty = h.store.stats()
            assert (empty.writes, empty.batches, empty.pending) == (0, 0, 0)
            await h.store.write(put(Table.DATA, b"k", b"v" * 100_000))

            def failing(view: WriteView) -> None:
                view.put(Table.DATA, b"x", b"x")
                raise Boom

            with pytest.raises(Boom):
                await h.store.write(failing)
            stats = h.store.stats()
            assert (stats.writes, stats.batches, stats.pending) == (2, 1, 0)
            assert stats.bytes_used >= 100_000
            assert stats.bytes_used > empty.bytes_used

    run(main())


class _FaultyEnv:
    """An LMDB environment whose next write transactions fail in a chosen way."""

    def __init__(self, env: Any) -> None:
        self._env = env
        self.faults: list[str] = []  # "begin", "commit" or "child-commit", one per batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def begin(self, *, write: bool = False, parent: Any = None) -> Any:
        if parent is not None:
            child = self._env.begin(write=write, parent=getattr(parent, "real", parent))
            return _FaultyTxn(child) if getattr(parent, "fault", "") == "child-commit" else child
        if not write or not self.faults:
            return self._env.begin(write=write)
        fault = self.faults.pop(0)
        if fault == "begin":
            raise lmdb.Error("mdb_txn_begin", 5)
        txn = _FaultyTxn(self._env.begin(write=True))
        txn.fault = fault
        return txn


class _FaultyTxn:
    def __init__(self, real: Any) -> None:
        self.real = real
        self.fault = "commit"

    def commit(self) -> None:
        self.real.abort()
        raise lmdb.MapFullError("mdb_txn_commit", -30792)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _faulty(h: Harness) -> _FaultyEnv:
    assert isinstance(h.store, LmdbStorage)
    env = _FaultyEnv(h.store._env)
    h.store._env = env  # type: ignore[assignment]
    return env


def test_lmdb_lost_batch_fails_its_writes_and_the_writer_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        async with harness("lmdb", tmp_path) as h:
            env = _faulty(h)
            boom = Boom()

            def failing(view: WriteView) -> None:
                view.put(Table.DATA, b"boom", b"x")
                raise boom

            before = h.store.stats()
            async with h.held():
                env.faults.append("commit")  # the batch after the gate's
                tasks = [
                    start(h.store.write(put(Table.DATA, b"a", b"x"))),
                    start(h.store.write(failing)),
                    start(h.store.write(put(Table.DATA, b"b", b"x"))),
                ]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(results[0], StorageFull)
            assert results[1] is boom
            assert isinstance(results[2], StorageFull)
            assert results[0] is not results[2]
            assert h.store.stats().batches - before.batches == 1  # only the gate's

            env.faults.append("begin")
            with pytest.raises(Internal, match="writer failed"):
                await h.store.write(put(Table.DATA, b"c", b"x"))

            await h.store.write(put(Table.DATA, b"d", b"x"))
            with h.store.read() as view:
                assert items(view) == [(b"d", b"x")]

    run(main())


def test_lmdb_failed_child_commit_loses_the_batch_so_far_and_requeues_the_rest(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with harness("lmdb", tmp_path) as h:
            env = _faulty(h)
            ran: list[bytes] = []

            def record(key: bytes) -> Callable[[WriteView], None]:
                def fn(view: WriteView) -> None:
                    ran.append(key)
                    view.put(Table.DATA, key, b"x")

                return fn

            async with h.held():
                env.faults.append("child-commit")  # every child of the next batch fails
                tasks = [start(h.store.write(record(b"k%d" % i))) for i in range(3)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(results[0], StorageFull)  # its child commit failed
            assert results[1:] == [None, None]  # never started in the lost batch: run next
            assert ran == [b"k0", b"k1", b"k2"]  # each function ran exactly once
            with h.store.read() as view:
                assert [k for k, _ in items(view)] == [b"k1", b"k2"]

    run(main())


def test_lmdb_data_survives_reopen(tmp_path: Path) -> None:
    async def main() -> None:
        async with harness("lmdb", tmp_path) as h:
            for table in Table:
                await h.store.write(put(table, b"k", table.value))
            await h.reopen()
            with h.store.read() as view:
                assert [view.get(t, b"k") for t in Table] == [t.value for t in Table]

    run(main())


def test_lmdb_long_key_digest_collision_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lmdb_store, "_digest", lambda key: b"\x00" * 16)
    first, second = b"L" * 600 + b"1", b"L" * 600 + b"2"

    async def main() -> None:
        async with harness("lmdb", tmp_path) as h:
            await h.store.write(put(Table.DATA, first, b"one"))
            with pytest.raises(Internal, match="collision"):
                await h.store.write(put(Table.DATA, second, b"two"))
            assert await h.store.write(lambda v: v.delete(Table.DATA, second)) is False
            with h.store.read() as view:
                assert view.get(Table.DATA, second) is None
                assert items(view) == [(first, b"one")]

    run(main())


def test_both_stores_satisfy_the_storage_protocol(tmp_path: Path) -> None:
    async def main() -> None:
        stores: list[Storage] = [LmdbStorage.open(tmp_path / "db"), MemoryStorage()]
        for store in stores:
            await store.write(put(Table.DATA, b"k", b"v"))
            with store.read() as view:
                assert view.get(Table.DATA, b"k") == b"v"
            await store.close()

    run(main())


# -- the memory store in the simulator ----------------------------------------------------


def test_memory_store_runs_in_virtual_time_on_the_simulator() -> None:
    async def main() -> tuple[float, float, list[bytes]]:
        loop = asyncio.get_running_loop()

        async def disk() -> None:
            await asyncio.sleep(0.005)

        store = MemoryStorage(delay=disk)
        for i in range(10):
            await store.write(put(Table.DATA, b"seq%d" % i, b"v"))
        sequential = loop.time()
        await asyncio.gather(
            *(store.write(put(Table.DATA, b"par%02d" % i, b"v")) for i in range(100))
        )
        parallel = loop.time() - sequential
        with store.read() as view:
            keys = [k for k, _ in view.scan(Table.DATA)]
        await store.close()
        return sequential, parallel, keys

    result = run_simulation(main, seed=1)
    sequential, parallel, keys = result.value
    assert sequential == pytest.approx(0.05)
    assert parallel == pytest.approx(0.005)
    assert keys == sorted([b"seq%d" % i for i in range(10)] + [b"par%02d" % i for i in range(100)])


def test_memory_crash_loses_exactly_the_unacknowledged_writes() -> None:
    """Cancel a node's writes mid-flight (a crash), reopen: acknowledged ones are all there."""

    async def main() -> tuple[list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        rng = random.Random(5)

        async def disk() -> None:
            await asyncio.sleep(rng.uniform(0.001, 0.01))

        store = MemoryStorage(delay=disk)
        acked: list[bytes] = []

        async def writer(w: int) -> None:
            for i in range(1000):
                key = b"w%d-%04d" % (w, i)
                await store.write(put(Table.DATA, key, b"v"))
                acked.append(key)

        tasks = [loop.create_task(writer(w)) for w in range(8)]
        await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert store.stats().pending == 0
        store = store.reopen()
        with store.read() as view:
            present = [k for k, _ in view.scan(Table.DATA)]
        return sorted(acked), present

    acked, present = run_simulation(main, seed=2).value
    assert acked  # the crash came mid-stream
    assert present == acked


def test_memory_reopen_retires_the_old_store() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        async def held() -> None:
            await gate.wait()

        old = MemoryStorage(delay=held)
        in_flight = asyncio.create_task(old.write(put(Table.DATA, b"lost", b"x")))
        await asyncio.sleep(0)
        new = old.reopen()
        gate.set()
        with pytest.raises(Internal, match="not applied"):
            await in_flight
        with pytest.raises(Internal, match="closed"):
            await old.write(put(Table.DATA, b"k", b"v"))
        with pytest.raises(Internal, match="closed"):
            old.read().__enter__()
        await new.write(put(Table.DATA, b"k", b"v"))
        with new.read() as view:
            assert items(view) == [(b"k", b"v")]

    run(main())


# -- on_applied ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_on_applied_gets_the_result_on_the_callers_loop_before_the_write_returns(
    kind: str, tmp_path: Path
) -> None:
    async def main() -> None:
        caller = threading.current_thread()  # the event loop's (not LMDB's writer thread)
        async with harness(kind, tmp_path) as h:
            seen: list[tuple[str, bool, bool]] = []

            def apply(view: WriteView) -> str:
                view.put(Table.DATA, b"k", b"v")
                return "value"

            def applied(result: str) -> None:
                seen.append((result, task.done(), threading.current_thread() is caller))

            task: asyncio.Task[str] = start(h.store.write(apply, applied))
            assert await task == "value"
            assert seen == [("value", False, True)]

            def failing(view: WriteView) -> None:
                view.put(Table.DATA, b"other", b"x")
                raise Boom()

            with pytest.raises(Boom):
                await h.store.write(failing, lambda result: seen.append(("failing", False, True)))
            assert seen == [("value", False, True)]  # a function that failed was never applied

    run(main())


def test_lmdb_on_applied_comes_before_the_synced_commit_which_may_still_fail(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with harness("lmdb", tmp_path) as h:
            env = _faulty(h)
            seen: list[str] = []

            def apply(view: WriteView) -> str:
                view.put(Table.DATA, b"k", b"v")
                return "applied"

            async with h.held():
                env.faults.append("commit")  # the batch after the gate's is lost
                task = start(h.store.write(apply, seen.append))
            with pytest.raises(StorageFull):
                await task
            assert seen == ["applied"]  # reported applied, then lost with its batch
            with h.store.read() as view:
                assert view.get(Table.DATA, b"k") is None

    run(main())
