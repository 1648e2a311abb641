"""Tests of kvcluster.core.merkle: segment hashes, levels and the exchange."""

from __future__ import annotations

import hashlib
import random

import pytest

from kvcluster.core.hashing import key_hash
from kvcluster.core.merkle import (
    DEFAULT_FANOUT,
    DEFAULT_SEGMENTS,
    Diff,
    Exchange,
    ExchangeError,
    NeedLevel,
    NeedLocalSegments,
    NeedSegments,
    Request,
    Tree,
    build_levels,
    diff_trees_locally,
    inner_hash,
    leaf_hash,
    level_hashes,
    level_sizes,
    rebuild_segments,
    segment_after,
    segment_of,
)


def test_key_hash(key: bytes) -> int:
    """A 64-bit key hash for tests (the ring's own lives in kvcluster.core.hashing)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"test").digest(), "big")


test_key_hash.__test__ = False  # type: ignore[attr-defined]


def tree(data: dict[bytes, bytes] | None = None, **kwargs: int) -> Tree:
    return Tree(data, key_hash=test_key_hash, **kwargs)


def keys(n: int, prefix: bytes = b"k") -> dict[bytes, bytes]:
    return {prefix + b"%06d" % i: b"v%d" % i for i in range(n)}


def drive(local: Tree, remote: Tree) -> tuple[Diff, list[Request]]:
    """Like diff_trees_locally, but records every request."""
    ex = Exchange(local.segment_hashes(), fanout=local.fanout)
    seen: list[Request] = []
    while (req := ex.request) is not None:
        seen.append(req)
        if isinstance(req, NeedLevel):
            ex.answer_level(remote.level(req.level, req.indices))
        elif isinstance(req, NeedSegments):
            ex.answer_segments(remote.segment_entries(req.segment_ids))
        else:
            ex.answer_local_segments(local.segment_entries(req.segment_ids))
    return ex.result(), seen


# -- segment_of ---------------------------------------------------------------------------


def test_segment_of_uses_the_low_bits() -> None:
    assert segment_of(0xFFFF_0000_0000_0005, 1024) == 5
    assert segment_of(0x0000_0000_0000_07FF, 1024) == 0x3FF
    assert segment_of(2**64 - 1, 1) == 0
    assert segment_of(123) == 123 % DEFAULT_SEGMENTS


def test_segment_of_is_independent_of_the_partition_bits() -> None:
    # keys of one partition (same top bits) spread over all segments
    top = 0b101101 << 58
    assert {segment_of(top | low, 64) for low in range(64)} == set(range(64))


@pytest.mark.parametrize("segments", [0, 3, 1000, -4])
def test_segment_counts_must_be_powers_of_two(segments: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        segment_of(1, segments)
    with pytest.raises(ValueError, match="power of two"):
        rebuild_segments([], segments)
    with pytest.raises(ValueError, match="power of two"):
        Tree({}, segments=segments, key_hash=test_key_hash)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_segment_of_rejects_non_64_bit_hashes(value: int) -> None:
    with pytest.raises(ValueError, match="64-bit"):
        segment_of(value, 1024)


# -- leaf and segment hashes -----------------------------------------------------------------


def test_leaf_hash_is_a_stable_128_bit_value() -> None:
    # Pinned: segment hashes are persisted, so this function must not change
    # unless store.MERKLE_FORMAT changes with it (stores are then rebuilt at start).
    assert leaf_hash(b"key", b"value") == 0x6EE98B59C68013BF8F04AD7C081B4A37
    assert inner_hash([0, 1, 2**128 - 1]) == 0x4773989AE06E8AA82E335A042D9AB2C7
    assert 0 <= leaf_hash(b"", b"") < 2**128


def test_leaf_hash_separates_key_from_value() -> None:
    assert leaf_hash(b"ab", b"c") != leaf_hash(b"a", b"bc")
    assert leaf_hash(b"a", b"") != leaf_hash(b"", b"a")
    assert leaf_hash(b"k", b"v1") != leaf_hash(b"k", b"v2")


def test_segment_after_insert_overwrite_delete() -> None:
    h0 = 0
    h1 = segment_after(h0, b"a", None, b"1")
    assert h1 == leaf_hash(b"a", b"1")
    h2 = segment_after(h1, b"b", None, b"2")
    assert h2 == leaf_hash(b"a", b"1") ^ leaf_hash(b"b", b"2")
    h3 = segment_after(h2, b"a", b"1", b"9")
    assert h3 == leaf_hash(b"a", b"9") ^ leaf_hash(b"b", b"2")
    h4 = segment_after(h3, b"a", b"9", None)
    assert h4 == leaf_hash(b"b", b"2")
    assert segment_after(h4, b"b", b"2", None) == 0


def test_segment_after_without_a_change_is_the_identity() -> None:
    h = leaf_hash(b"a", b"1")
    assert segment_after(h, b"a", b"1", b"1") == h
    assert segment_after(h, b"zzz", None, None) == h


def test_segment_after_is_order_independent() -> None:
    ops = [(b"a", None, b"1"), (b"b", None, b"2"), (b"c", None, b"3")]
    forward = 0
    for key, old, new in ops:
        forward = segment_after(forward, key, old, new)
    backward = 0
    for key, old, new in reversed(ops):
        backward = segment_after(backward, key, old, new)
    assert forward == backward == rebuild_segments([(0, k, v) for k, _, v in ops], 1)[0]


def test_segment_after_rejects_hashes_out_of_range() -> None:
    with pytest.raises(ValueError, match="128-bit"):
        segment_after(2**128, b"a", None, b"1")
    with pytest.raises(ValueError, match="128-bit"):
        segment_after(-1, b"a", None, b"1")


def test_rebuild_segments_places_each_key_in_its_segment() -> None:
    hashes = rebuild_segments([(3, b"a", b"1"), (3, b"b", b"2"), (0, b"c", b"3")], 4)
    assert hashes == [leaf_hash(b"c", b"3"), 0, 0, leaf_hash(b"a", b"1") ^ leaf_hash(b"b", b"2")]
    with pytest.raises(ValueError, match="outside"):
        rebuild_segments([(4, b"a", b"1")], 4)


# -- levels -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segments", "fanout", "sizes"),
    [
        (1024, 32, [1, 32, 1024]),
        (1, 32, [1]),
        (8, 32, [1, 8]),
        (16, 4, [1, 4, 16]),
        (16, 3, [1, 2, 6, 16]),
        (4, 2, [1, 2, 4]),
    ],
)
def test_level_shapes(segments: int, fanout: int, sizes: list[int]) -> None:
    assert level_sizes(segments, fanout) == sizes
    levels = build_levels(list(range(segments)), fanout)
    assert [len(level) for level in levels] == sizes
    assert levels[-1] == list(range(segments))


def test_default_shape() -> None:
    assert level_sizes() == [1, DEFAULT_FANOUT, DEFAULT_SEGMENTS]


def test_inner_nodes_hash_their_children_in_order() -> None:
    segs = [leaf_hash(b"k%d" % i, b"v") for i in range(16)]
    levels = build_levels(segs, 4)
    assert levels[1][2] == inner_hash(segs[8:12])
    assert levels[0][0] == inner_hash(levels[1])
    # unlike an XOR, the root depends on where each segment hash sits
    swapped = [segs[1], segs[0], *segs[2:]]
    assert build_levels(swapped, 4)[0][0] != levels[0][0]


def test_a_single_segment_is_its_own_root() -> None:
    assert build_levels([42], 32) == [[42]]


@pytest.mark.parametrize(("segments", "fanout"), [([0] * 3, 2), ([0] * 4, 1), ([], 2)])
def test_build_levels_rejects_bad_shapes(segments: list[int], fanout: int) -> None:
    with pytest.raises(ValueError):
        build_levels(segments, fanout)


def test_build_levels_rejects_hashes_out_of_range() -> None:
    with pytest.raises(ValueError, match="128-bit"):
        build_levels([0, 2**128], 2)


def test_level_hashes_answers_in_request_order_and_checks_bounds() -> None:
    levels = build_levels(list(range(16)), 4)
    assert level_hashes(levels, 2, [5, 1, 5]) == [5, 1, 5]
    with pytest.raises(ValueError, match="level 3"):
        level_hashes(levels, 3, [0])
    with pytest.raises(ValueError, match="index 4"):
        level_hashes(levels, 1, [4])


# -- Tree ---------------------------------------------------------------------------------


def test_tree_put_get_delete() -> None:
    t = tree()
    assert len(t) == 0
    assert t.segment_hashes() == [0] * DEFAULT_SEGMENTS
    t.put(b"a", b"1")
    t.put(b"a", b"2")
    assert t.get(b"a") == b"2"
    seg = t.segment_for(b"a")
    assert t.segment_hashes()[seg] == leaf_hash(b"a", b"2")
    assert t.segment_entries([seg]) == [(b"a", leaf_hash(b"a", b"2"))]
    t.delete(b"a")
    t.delete(b"never-there")
    assert t.get(b"a") is None
    assert t.segment_hashes() == [0] * DEFAULT_SEGMENTS
    assert t.root() == tree().root()


def test_tree_incremental_updates_equal_a_rebuild() -> None:
    rng = random.Random(11)
    t = tree(segments=64, fanout=4)
    for _ in range(3000):
        key = b"k%d" % rng.randrange(300)
        if rng.random() < 0.3:
            t.delete(key)
        else:
            t.put(key, b"v%d" % rng.randrange(5))
    incremental = t.segment_hashes()
    root = t.root()
    t.rebuild()
    assert t.segment_hashes() == incremental
    assert t.root() == root
    fresh = tree(t.data(), segments=64, fanout=4)
    assert fresh.segment_hashes() == incremental


def test_tree_levels_follow_writes() -> None:
    t = tree(keys(10))
    before = t.root()
    t.put(b"new", b"x")
    assert t.root() != before
    t.delete(b"new")
    assert t.root() == before


def test_tree_segment_entries_check_bounds() -> None:
    with pytest.raises(ValueError, match="outside"):
        tree().segment_entries([DEFAULT_SEGMENTS])


def test_tree_uses_the_ring_hash_by_default() -> None:
    t = Tree({b"some key": b"v"})
    seg = segment_of(key_hash(b"some key"), DEFAULT_SEGMENTS)
    assert t.segment_for(b"some key") == seg
    assert t.segment_hashes()[seg] == leaf_hash(b"some key", b"v")


# -- Exchange ----------------------------------------------------------------------------------


def test_identical_trees_cost_exactly_one_request() -> None:
    a, b = tree(keys(500)), tree(keys(500))
    diff, seen = drive(a, b)
    assert seen == [NeedLevel(0, (0,))]
    assert not diff
    assert diff.keys == ()
    assert diff.segments == ()
    assert diff.stats.remote_requests == 1
    assert diff.stats.hashes_received == 1
    assert diff.stats.keys_received == 0
    assert diff.stats.local_keys_read == 0
    assert diff.stats.bytes_received == 16


def test_two_empty_trees_agree() -> None:
    diff, seen = drive(tree(), tree())
    assert not diff
    assert len(seen) == 1


def test_exchange_descends_only_into_the_differing_branch() -> None:
    a = tree(keys(2000))
    b = tree(keys(2000))
    b.put(b"k000123", b"changed")
    diff, seen = drive(a, b)
    seg = a.segment_for(b"k000123")
    parent = seg // DEFAULT_FANOUT
    assert seen == [
        NeedLevel(0, (0,)),
        NeedLevel(1, tuple(range(DEFAULT_FANOUT))),  # every child of the differing root
        NeedLevel(2, tuple(range(parent * 32, parent * 32 + 32))),  # one differing node
        NeedSegments((seg,)),
        NeedLocalSegments((seg,)),
    ]
    assert diff.different == (b"k000123",)
    assert diff.missing_locally == diff.missing_remotely == ()
    assert diff.segments == (seg,)
    # only the keys of that one segment travelled
    assert diff.stats.keys_received == len(b.segment_entries([seg]))
    assert diff.stats.hashes_received == 1 + 32 + 32


def test_exchange_classifies_the_differences() -> None:
    local = tree({b"both-same": b"1", b"both-diff": b"L", b"local-only": b"x"})
    remote = tree({b"both-same": b"1", b"both-diff": b"R", b"remote-only": b"y"})
    diff = diff_trees_locally(local, remote)
    assert diff.missing_locally == (b"remote-only",)
    assert diff.missing_remotely == (b"local-only",)
    assert diff.different == (b"both-diff",)
    assert diff.keys == (b"both-diff", b"local-only", b"remote-only")
    assert diff
    reverse = diff_trees_locally(remote, local)
    assert reverse.missing_locally == diff.missing_remotely
    assert reverse.missing_remotely == diff.missing_locally
    assert reverse.different == diff.different


def test_exchange_against_an_empty_tree_finds_every_key() -> None:
    data = keys(300)
    diff = diff_trees_locally(tree(), tree(data))
    assert set(diff.missing_locally) == set(data)
    assert diff.missing_remotely == diff.different == ()


def test_exchange_when_all_keys_share_one_segment() -> None:
    def same(_: bytes) -> int:
        return 7

    a = Tree(keys(50), segments=16, fanout=4, key_hash=same)
    b = Tree(keys(50), segments=16, fanout=4, key_hash=same)
    b.put(b"k000010", b"other")
    b.delete(b"k000020")
    diff, seen = drive(a, b)
    assert diff.different == (b"k000010",)
    assert diff.missing_remotely == (b"k000020",)
    assert seen[-2] == NeedSegments((7,))


def test_one_percent_difference_transfers_far_fewer_than_all_keys() -> None:
    n = 10_000
    data = keys(n)
    local, remote = tree(data), tree(data)
    rng = random.Random(5)
    changed = rng.sample(sorted(data), n // 100)
    for key in changed:
        remote.put(key, b"new")
    diff = diff_trees_locally(local, remote)
    assert set(diff.keys) == set(changed)
    # ~95 of 1024 segments differ, ~10 keys each: about a tenth of the keys
    assert diff.stats.keys_received < n * 0.15
    assert diff.stats.local_keys_read == diff.stats.keys_received
    # plus at most every segment hash (16 KiB): still a fraction of sending every
    # (key, leaf hash), the naive exchange
    naive_bytes = sum(len(k) + 16 for k in data)
    assert diff.stats.hashes_received <= 1 + 32 + 1024
    assert diff.stats.bytes_received < naive_bytes / 4
    assert diff.stats.remote_requests == 4  # root, level 1, segments, segment keys


def test_diff_trees_locally_requires_the_same_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        diff_trees_locally(tree(segments=64), tree(segments=128))
    with pytest.raises(ValueError, match="shape"):
        diff_trees_locally(tree(fanout=4), tree(fanout=8))


# -- Exchange protocol errors ---------------------------------------------------------------------


def fresh_exchange() -> tuple[Exchange, Tree]:
    local, remote = tree({b"a": b"1"}, segments=16, fanout=4), tree(segments=16, fanout=4)
    return Exchange(local.segment_hashes(), fanout=4), remote


def test_answer_of_the_wrong_kind_is_rejected() -> None:
    ex, _ = fresh_exchange()
    with pytest.raises(ExchangeError, match="NeedSegments"):
        ex.answer_segments([])
    with pytest.raises(ExchangeError, match="NeedLocalSegments"):
        ex.answer_local_segments([])
    assert ex.request == NeedLevel(0, (0,))


def test_answer_of_the_wrong_length_or_range_is_rejected_and_changes_nothing() -> None:
    ex, _ = fresh_exchange()
    for bad in ([], [1, 2], [2**128], [-1]):
        with pytest.raises(ExchangeError):
            ex.answer_level(bad)
    assert ex.request == NeedLevel(0, (0,))
    assert ex.stats.remote_requests == 0


def test_bad_segment_entries_are_rejected() -> None:
    ex, remote = fresh_exchange()
    while not isinstance(ex.request, NeedSegments):
        req = ex.request
        assert isinstance(req, NeedLevel)
        ex.answer_level(remote.level(req.level, req.indices))
    pending = ex.request
    with pytest.raises(ExchangeError, match="twice"):
        ex.answer_segments([(b"x", 1), (b"x", 2)])
    with pytest.raises(ExchangeError, match="128-bit"):
        ex.answer_segments([(b"x", 2**128)])
    with pytest.raises(ExchangeError, match="bytes"):
        ex.answer_segments([("x", 1)])  # type: ignore[list-item]
    assert ex.request == pending
    assert ex.stats.keys_received == 0


def test_result_before_done_and_answers_after_done_are_rejected() -> None:
    ex, remote = fresh_exchange()
    with pytest.raises(ExchangeError, match="not done"):
        ex.result()
    ex.answer_level(remote.level(0, [0]))
    ex.answer_level(remote.level(1, range(4)))
    req = ex.request
    assert isinstance(req, NeedLevel)
    ex.answer_level(remote.level(2, req.indices))
    assert isinstance(ex.request, NeedSegments)
    ex.answer_segments([])
    ex.answer_local_segments([(b"a", leaf_hash(b"a", b"1"))])
    assert ex.done
    assert ex.result().missing_remotely == (b"a",)
    with pytest.raises(ExchangeError):
        ex.answer_level([0])
