"""Tests of kvcluster.node.store: incremental Merkle segments, their rebuild, actor epochs.

Writes go through :func:`store.write_record` (directly, and through
:class:`LocalReplica.coordinate` / ``merge``) on a :class:`MemoryStorage`. The
segment hashes those writes maintain incrementally must always equal a
rebuild from the data (:func:`store.rebuilt_segment_hashes`), which is what
anti-entropy relies on when it compares trees between replicas.

Keys are chosen so that several share a Merkle segment (found once, by
brute force, below): a segment's hash is the XOR of its keys' leaf hashes, and
keys sharing a segment are where a wrong "old value" would show.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcluster.core import dvvset, merkle
from kvcluster.core.hashing import key_hash
from kvcluster.core.record import Sibling, decode_record, live, tombstone
from kvcluster.net.messages import WriteItem
from kvcluster.node import store
from kvcluster.node.replica import Event, HintLimits, LocalReplica
from kvcluster.storage.base import ReadView, Storage, Table, WriteView
from kvcluster.storage.memory import MemoryStorage

T = TypeVar("T")

PARTITIONS = (0, 5, 63)  # the partition prefixes the tests put keys under
OTHER_PARTITION = 9


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _colliding_keys(groups: int, per_group: int, singles: int) -> list[bytes]:
    """User keys: ``groups`` sets of ``per_group`` keys sharing a segment, plus singles."""
    by_segment: dict[int, list[bytes]] = {}
    i = 0
    while sum(len(v) >= per_group for v in by_segment.values()) < groups:
        key = b"key-%d" % i
        by_segment.setdefault(merkle.segment_of(key_hash(key), store.SEGMENTS), []).append(key)
        i += 1
    shared = [v[:per_group] for v in by_segment.values() if len(v) >= per_group][:groups]
    alone = [v[0] for v in by_segment.values() if len(v) == 1][:singles]
    return [k for group in shared for k in group] + alone


USER_KEYS = _colliding_keys(groups=3, per_group=3, singles=3)
PKEYS = [p.to_bytes(2, "big") + k for p in PARTITIONS for k in USER_KEYS]


def segment_table(view: ReadView) -> dict[bytes, bytes]:
    return dict(view.scan(Table.MERKLE))


def assert_tree_matches_data(storage: Storage, partitions: Sequence[int]) -> None:
    """Incremental segments == rebuild, and the table stores exactly the non-zero ones."""
    with storage.read() as view:
        for p in partitions:
            incremental = store.segment_hashes(view, p)
            rebuilt = store.rebuilt_segment_hashes(view, p)
            assert incremental == rebuilt, f"partition {p}"
            stored = {
                key: value
                for key, value in segment_table(view).items()
                if key[:2] == p.to_bytes(2, "big")
            }
            expected = {
                store.segment_key(p, s): h.to_bytes(16, "big") for s, h in enumerate(rebuilt) if h
            }
            assert stored == expected, f"partition {p}: zero segments must not be stored"


# -- write_record ------------------------------------------------------------------------

values = st.one_of(st.none(), st.sampled_from([b"", b"a", b"b", b"\x01\x02", b"x" * 40]))
op = st.tuples(st.integers(0, len(PKEYS) - 1), values)
# Each inner list is one transaction holding several writes.
transactions = st.lists(st.lists(op, min_size=1, max_size=6), min_size=1, max_size=25)


@settings(max_examples=150)
@given(transactions)
def test_incremental_segments_equal_rebuild_after_random_writes(
    txns: list[list[tuple[int, bytes | None]]],
) -> None:
    storage = MemoryStorage()
    model: dict[bytes, bytes] = {}

    async def scenario() -> None:
        for txn in txns:

            def apply(view: WriteView, txn: list[tuple[int, bytes | None]] = txn) -> None:
                for index, value in txn:
                    store.write_record(view, PKEYS[index], value)

            await storage.write(apply)
            for index, value in txn:
                if value is None:
                    model.pop(PKEYS[index], None)
                else:
                    model[PKEYS[index]] = value
            assert_tree_matches_data(storage, PARTITIONS)

    run(scenario())
    with storage.read() as view:
        stored = {k: store.read_record(view, k) for k, _ in view.scan(Table.DATA)}
    assert stored == model


def test_segment_hash_is_the_xor_of_the_leaves_in_it() -> None:
    storage = MemoryStorage()
    group = [b"\x00\x05" + k for k in USER_KEYS[:3]]  # three keys of one segment
    segment = merkle.segment_of(key_hash(USER_KEYS[0]), store.SEGMENTS)

    async def scenario() -> None:
        def apply(view: WriteView) -> None:
            for i, pk in enumerate(group):
                store.write_record(view, pk, b"v%d" % i)

        await storage.write(apply)

    run(scenario())
    expected = 0
    for i, pk in enumerate(group):
        expected ^= merkle.leaf_hash(pk, b"v%d" % i)
    with storage.read() as view:
        hashes = store.segment_hashes(view, 5)
    assert hashes[segment] == expected != 0
    assert sum(1 for h in hashes if h) == 1


def test_rewriting_the_same_record_changes_nothing() -> None:
    storage = MemoryStorage()
    pk = PKEYS[0]

    async def scenario() -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
        await storage.write(lambda view: store.write_record(view, pk, b"same"))
        with storage.read() as view:
            before = {**dict(view.scan(Table.DATA)), **segment_table(view)}
        await storage.write(lambda view: store.write_record(view, pk, b"same"))
        await storage.write(lambda view: store.write_record(view, PKEYS[1], None))  # absent
        with storage.read() as view:
            after = {**dict(view.scan(Table.DATA)), **segment_table(view)}
        return before, after

    before, after = run(scenario())
    assert before == after


def test_a_failed_transaction_leaves_data_and_segments_unchanged() -> None:
    storage = MemoryStorage()

    class Boom(Exception):
        pass

    async def scenario() -> None:
        await storage.write(lambda view: store.write_record(view, PKEYS[0], b"one"))

        def failing(view: WriteView) -> None:
            store.write_record(view, PKEYS[0], b"two")
            store.write_record(view, PKEYS[1], b"new")
            store.write_record(view, PKEYS[2], None)
            raise Boom

        with pytest.raises(Boom):
            await storage.write(failing)

    run(scenario())
    with storage.read() as view:
        assert store.read_record(view, PKEYS[0]) == b"one"
        assert store.read_record(view, PKEYS[1]) is None
    assert_tree_matches_data(storage, PARTITIONS)


def test_segments_of_one_partition_do_not_see_another() -> None:
    storage = MemoryStorage()
    key = USER_KEYS[0]

    async def scenario() -> None:
        await storage.write(lambda view: store.write_record(view, b"\x00\x00" + key, b"v"))

    run(scenario())
    with storage.read() as view:
        assert any(store.segment_hashes(view, 0))
        assert not any(store.segment_hashes(view, 5))
        assert list(store.partition_items(view, 5)) == []


# -- rebuild_merkle ------------------------------------------------------------------------


def _fill(storage: MemoryStorage, partition: int, count: int) -> None:
    async def scenario() -> None:
        def apply(view: WriteView) -> None:
            for i, key in enumerate(USER_KEYS[:count]):
                store.write_record(view, partition.to_bytes(2, "big") + key, b"value-%d" % i)

        await storage.write(apply)

    run(scenario())


def test_rebuild_merkle_repairs_a_corrupted_table_and_counts_the_segments() -> None:
    storage = MemoryStorage()
    _fill(storage, 5, len(USER_KEYS))
    _fill(storage, OTHER_PARTITION, 4)
    with storage.read() as view:
        good = store.segment_hashes(view, 5)
        good_other = store.segment_hashes(view, OTHER_PARTITION)
    nonempty = [s for s, h in enumerate(good) if h]
    empty = next(s for s, h in enumerate(good) if not h)
    assert len(nonempty) >= 2

    def corrupt(view: WriteView) -> None:
        # 1: a wrong hash; 2: a lost segment; 3: a stale leaf in an empty segment
        view.put(Table.MERKLE, store.segment_key(5, nonempty[0]), b"\xff" * 16)
        view.delete(Table.MERKLE, store.segment_key(5, nonempty[1]))
        view.put(Table.MERKLE, store.segment_key(5, empty), b"\x01" * 16)
        # and another partition, which a rebuild of partition 5 must not touch
        view.put(Table.MERKLE, store.segment_key(OTHER_PARTITION, empty), b"\x02" * 16)

    async def scenario() -> tuple[int, int, int]:
        await storage.write(corrupt)
        with storage.read() as view:
            assert store.segment_hashes(view, 5) != store.rebuilt_segment_hashes(view, 5)
        first = await storage.write(lambda view: store.rebuild_merkle(view, 5))
        again = await storage.write(lambda view: store.rebuild_merkle(view, 5))
        with storage.read() as view:
            assert store.segment_hashes(view, OTHER_PARTITION) != good_other  # untouched
        other = await storage.write(lambda view: store.rebuild_merkle(view, OTHER_PARTITION))
        return first, again, other

    first, again, other = run(scenario())
    assert (first, again, other) == (3, 0, 1)
    with storage.read() as view:
        assert store.segment_hashes(view, 5) == good
        assert store.segment_hashes(view, OTHER_PARTITION) == good_other
    assert_tree_matches_data(storage, (5, OTHER_PARTITION))


def test_rebuild_merkle_of_a_correct_or_empty_partition_changes_nothing() -> None:
    storage = MemoryStorage()
    _fill(storage, 5, 6)
    with storage.read() as view:
        before = (list(view.scan(Table.DATA)), segment_table(view))

    async def scenario() -> tuple[int, int]:
        return (
            await storage.write(lambda view: store.rebuild_merkle(view, 5)),
            await storage.write(lambda view: store.rebuild_merkle(view, 7)),
        )

    assert run(scenario()) == (0, 0)
    with storage.read() as view:
        assert (list(view.scan(Table.DATA)), segment_table(view)) == before
    assert_tree_matches_data(storage, (5, 7))


def test_rebuild_merkle_drops_segments_of_data_that_is_gone() -> None:
    """Data lost without its segments (e.g. a table restored separately)."""
    storage = MemoryStorage()
    _fill(storage, 5, 6)

    def lose_data(view: WriteView) -> None:
        for key, _ in list(view.scan(Table.DATA, prefix=b"\x00\x05")):
            view.delete(Table.DATA, key)

    async def scenario() -> int:
        await storage.write(lose_data)
        return await storage.write(lambda view: store.rebuild_merkle(view, 5))

    changed = run(scenario())
    assert changed == len({merkle.segment_of(key_hash(k), store.SEGMENTS) for k in USER_KEYS[:6]})
    with storage.read() as view:
        assert list(view.scan(Table.MERKLE)) == []


# -- through LocalReplica ----------------------------------------------------------------


def new_replica(storage: MemoryStorage, incarnation: str) -> LocalReplica:
    return LocalReplica(storage, incarnation, HintLimits(max_per_target=0))


def removal(pk: bytes) -> Callable[[WriteView], None]:
    """A write function that drops ``pk`` locally (as handoff cleanup or a purge do)."""

    def fn(view: WriteView) -> None:
        store.write_record(view, pk, None)

    return fn


def record_of(replica: LocalReplica, pkey: bytes) -> dvvset.Clock[Sibling] | None:
    raw = replica.read(pkey)
    return None if raw is None else decode_record(raw)


def sibling_data(replica: LocalReplica, pkey: bytes) -> list[bytes]:
    """The data of every sibling ``replica`` holds for ``pkey`` (which it must hold), sorted."""
    rec = record_of(replica, pkey)
    assert rec is not None
    return sorted(s.data for s in dvvset.values(rec))


# (kind, replica index, key index, payload)
#   coordinate: payload 0/1 = with / without the replica's current context
#   merge: copy replica i's record of the key into the other replica
#   remove: drop the key locally (as handoff cleanup or a tombstone purge do)
#   delete: coordinate a tombstone with the current context
replica_op = st.tuples(
    st.sampled_from(["coordinate", "merge", "remove", "delete"]),
    st.integers(0, 1),
    st.integers(0, len(PKEYS) - 1),
    st.integers(0, 1),
)


@settings(max_examples=100)
@given(st.lists(replica_op, min_size=1, max_size=40))
def test_segments_equal_rebuild_after_coordinate_and_merge(
    ops: list[tuple[str, int, int, int]],
) -> None:
    storages = [MemoryStorage(), MemoryStorage()]
    replicas = [new_replica(storages[0], "r0"), new_replica(storages[1], "r1")]

    async def scenario() -> None:
        for step, (kind, i, index, payload) in enumerate(ops):
            replica, other, pk = replicas[i], replicas[1 - i], PKEYS[index]
            current = record_of(replica, pk)
            context = dvvset.join(current) if current is not None and payload == 0 else ()
            if kind == "coordinate":
                await replica.coordinate(pk, live(b"v%d" % step, step), context, [], step)
            elif kind == "delete":
                await replica.coordinate(pk, tombstone(step), context, [], step)
            elif kind == "merge":
                raw = replica.read(pk)
                if raw is not None:
                    assert await other.merge([WriteItem(pk, raw, None)], step) == [None]
            else:
                await replica.storage.write(removal(pk))
            for s in storages:
                assert_tree_matches_data(s, PARTITIONS)

    run(scenario())


# -- actor epochs ------------------------------------------------------------------------


def actors(replica: LocalReplica, pkey: bytes) -> list[tuple[str, int]]:
    rec = record_of(replica, pkey)
    assert rec is not None
    return list(dvvset.join(rec))


def stored_epoch(replica: LocalReplica, pkey: bytes) -> int:
    with replica.storage.read() as view:
        raw = view.get(Table.DATA, pkey)
    assert raw is not None
    return store.stored_epoch(raw)


def coordinate(
    replica: LocalReplica, pkey: bytes, value: bytes, context: dvvset.VersionVector = ()
) -> None:
    run(replica.coordinate(pkey, live(value, 1), context, [], 1))


def test_each_key_gets_its_own_actor_epoch_and_keeps_it_while_it_exists() -> None:
    replica = new_replica(MemoryStorage(), "inc")
    a, b = PKEYS[0], PKEYS[1]
    coordinate(replica, a, b"a1")
    coordinate(replica, b, b"b1")
    coordinate(replica, a, b"a2", tuple(actors(replica, a)))
    coordinate(replica, a, b"a3")  # no context: a sibling, same actor
    assert actors(replica, a) == [("inc.1", 3)]
    assert actors(replica, b) == [("inc.2", 1)]
    assert (stored_epoch(replica, a), stored_epoch(replica, b)) == (1, 2)


def test_a_key_removed_locally_and_written_again_gets_a_new_actor() -> None:
    replica = new_replica(MemoryStorage(), "inc")
    a = PKEYS[0]
    coordinate(replica, a, b"old")
    coordinate(replica, PKEYS[1], b"other")
    run(replica.storage.write(removal(a)))
    coordinate(replica, a, b"new")
    assert actors(replica, a) == [("inc.3", 1)]
    assert stored_epoch(replica, a) == 3


def test_a_key_that_arrives_by_merge_gets_a_fresh_epoch_for_later_writes() -> None:
    source = new_replica(MemoryStorage(), "src")
    replica = new_replica(MemoryStorage(), "inc")
    coordinate(replica, PKEYS[1], b"mine")  # uses epoch 1
    coordinate(source, PKEYS[0], b"theirs")
    raw = source.read(PKEYS[0])
    assert raw is not None
    assert run(replica.merge([WriteItem(PKEYS[0], raw, None)], 1)) == [None]
    assert stored_epoch(replica, PKEYS[0]) == 2
    coordinate(replica, PKEYS[0], b"mine too", tuple(actors(replica, PKEYS[0])))
    assert actors(replica, PKEYS[0]) == [("inc.2", 1), ("src.1", 1)]


def test_the_epoch_counter_survives_a_restart() -> None:
    storage = MemoryStorage()
    replica = new_replica(storage, "inc")
    coordinate(replica, PKEYS[0], b"a")
    coordinate(replica, PKEYS[1], b"b")
    run(replica.storage.write(removal(PKEYS[0])))
    reopened = new_replica(storage.reopen(), "inc")
    coordinate(reopened, PKEYS[0], b"again")
    assert actors(reopened, PKEYS[0]) == [("inc.3", 1)]


def test_a_new_actor_after_local_removal_keeps_both_versions_on_a_peer() -> None:
    """Why epochs matter: the old dot (actor, 1) still lives on a peer. Had the
    rewritten key reused the actor, its new value would get the very same dot
    and one of the two values would silently vanish when the replicas merge."""
    mine, peer = new_replica(MemoryStorage(), "inc"), new_replica(MemoryStorage(), "peer")
    key = PKEYS[0]
    coordinate(mine, key, b"first")
    raw = mine.read(key)
    assert raw is not None
    assert run(peer.merge([WriteItem(key, raw, None)], 1)) == [None]
    run(mine.storage.write(removal(key)))  # local cleanup
    coordinate(mine, key, b"second")  # no context: concurrent with "first"
    raw = mine.read(key)
    assert raw is not None
    assert run(peer.merge([WriteItem(key, raw, None)], 1)) == [None]
    assert sibling_data(peer, key) == [b"first", b"second"]


# -- replicating a coordinated write: the base shortcut -------------------------------------


def coordinated(replica: LocalReplica, pkey: bytes, value: bytes, lww: bool = False) -> WriteItem:
    """Coordinate a write on ``replica`` (with the latest context) and return the
    WriteItem the coordinator would send to another replica."""
    context = tuple(actors(replica, pkey)) if replica.read(pkey) is not None else ()
    event = Event(pkey, live(value, 1), context)
    [outcome] = run(replica.coordinate_many([event], 1, lww=lww))
    assert not isinstance(outcome, Exception)
    return WriteItem(pkey, outcome.record, None, outcome.base)


def peer_holding_a_first_write(key: bytes) -> tuple[LocalReplica, WriteItem, WriteItem]:
    """A coordinator's first two writes of ``key`` (the second made from the copy the
    first left, so its base names it), and a peer that has stored only the first."""
    coordinator, peer = new_replica(MemoryStorage(), "c"), new_replica(MemoryStorage(), "p")
    first = coordinated(coordinator, key, b"v1")
    assert run(peer.merge([first], 1)) == [None]
    second = coordinated(coordinator, key, b"v2")
    return peer, first, second


def test_a_coordinated_write_names_the_copy_it_was_applied_to() -> None:
    replica = new_replica(MemoryStorage(), "inc")
    key = PKEYS[0]
    first = coordinated(replica, key, b"v1")
    assert first.base == b""  # no copy before
    second = coordinated(replica, key, b"v2")
    assert second.base == merkle.leaf_hash(key, first.record).to_bytes(16, "big")
    assert coordinated(replica, key, b"v3", lww=True).base is None  # lww: no shortcut


def test_a_replica_holding_the_base_stores_the_record_as_is_without_a_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = PKEYS[0]
    peer, _, second = peer_holding_a_first_write(key)

    def no_sync(*_: object) -> None:
        raise AssertionError("the base matched: no sync needed")

    monkeypatch.setattr(dvvset, "sync", no_sync)
    assert run(peer.merge([second], 1)) == [None]
    assert peer.read(key) == second.record
    assert_tree_matches_data(peer.storage, [PARTITIONS[0]])


def test_a_replica_whose_copy_differs_from_the_base_merges_and_keeps_its_sibling() -> None:
    """The shortcut must never drop a version the coordinator did not see."""
    key = PKEYS[0]
    peer, _, second = peer_holding_a_first_write(key)  # second supersedes v1 only
    coordinate(peer, key, b"concurrent")  # a write the coordinator never saw
    assert run(peer.merge([second], 1)) == [None]
    assert sibling_data(peer, key) == [b"concurrent", b"v2"]
    assert_tree_matches_data(peer.storage, [PARTITIONS[0]])


def test_a_new_key_with_an_empty_base_is_stored_as_is_only_where_it_is_new() -> None:
    coordinator, peer = new_replica(MemoryStorage(), "c"), new_replica(MemoryStorage(), "p")
    key = PKEYS[1]
    coordinate(peer, key, b"peer only")  # the coordinator has no copy: base b""
    item = coordinated(coordinator, key, b"coordinator")
    assert item.base == b""
    assert run(peer.merge([item], 1)) == [None]
    assert sibling_data(peer, key) == [b"coordinator", b"peer only"]
    fresh = new_replica(MemoryStorage(), "f")
    assert run(fresh.merge([item], 1)) == [None]
    assert fresh.read(key) == item.record


def test_a_corrupt_record_is_refused_even_when_the_base_matches() -> None:
    key = PKEYS[0]
    peer, first, second = peer_holding_a_first_write(key)
    bad = WriteItem(key, b"\x01\xc1garbage", None, second.base)
    [error] = run(peer.merge([bad], 1))
    assert error is not None and "corrupt" in error
    assert peer.read(key) == first.record


# -- the Merkle leaf-hash format ----------------------------------------------------------


def test_segments_stored_with_another_leaf_hash_are_rebuilt_once() -> None:
    storage = MemoryStorage()
    _fill(storage, 5, len(USER_KEYS))
    _fill(storage, OTHER_PARTITION, 4)

    def older_version(view: WriteView) -> None:
        # what a store written with the previous leaf hash looks like: no format
        # recorded, segment hashes that a rebuild with today's hash disagrees with,
        # and a segment left in a partition that no longer holds data
        for key, value in list(view.scan(Table.MERKLE)):
            view.put(Table.MERKLE, key, bytes(b ^ 0x5A for b in value))
        view.put(Table.MERKLE, store.segment_key(63, 7), b"\x03" * 16)

    async def scenario() -> tuple[int, int]:
        await storage.write(older_version)
        first = await storage.write(store.upgrade_merkle_format)
        again = await storage.write(store.upgrade_merkle_format)
        return first, again

    assert run(scenario()) == (3, 0)  # partitions 5, 9 and the stale 63
    assert_tree_matches_data(storage, [5, OTHER_PARTITION, 63])
    with storage.read() as view:
        assert view.get(Table.META, store.META_MERKLE_FORMAT) == store.MERKLE_FORMAT
        assert not list(view.scan(Table.MERKLE, prefix=(63).to_bytes(2, "big")))


def test_a_new_store_records_the_format_without_rebuilding() -> None:
    storage = MemoryStorage()
    assert run(storage.write(store.upgrade_merkle_format)) == 0
    with storage.read() as view:
        assert view.get(Table.META, store.META_MERKLE_FORMAT) == store.MERKLE_FORMAT
