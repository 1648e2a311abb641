"""Hypothesis laws of kvcluster.core.merkle.

* the exchange finds exactly the keys whose values differ, classified right;
* it reads only differing segments and descends only into differing nodes;
* incremental updates, in any order, equal a rebuild from the final data;
* identical trees cost one request (the root) and report nothing.

Small shapes (few segments, small fan-out) make segment sharing, deep trees
and ragged last nodes common; the default shape is covered as well.
"""

from __future__ import annotations

import hashlib
import random

from hypothesis import given
from hypothesis import strategies as st

from kvcluster.core.merkle import (
    Diff,
    Exchange,
    NeedLevel,
    NeedSegments,
    Tree,
    diff_trees_locally,
)

SHAPES = [(1, 2), (2, 2), (4, 3), (16, 4), (64, 4), (64, 32), (1024, 32)]


def key_hash(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"test").digest(), "big")


shapes = st.sampled_from(SHAPES)
keys = st.binary(min_size=1, max_size=6)
values = st.binary(max_size=6)
maps = st.dictionaries(keys, values, max_size=60)


@st.composite
def map_pairs(draw: st.DrawFn) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """Two maps that mostly agree: a common base, each side then edited."""
    base = draw(maps)
    pair = []
    for _ in range(2):
        side = dict(base)
        for key, value in draw(st.dictionaries(keys, st.none() | values, max_size=10)).items():
            if value is None:
                side.pop(key, None)
            else:
                side[key] = value
        pair.append(side)
    return pair[0], pair[1]


def differing(a: dict[bytes, bytes], b: dict[bytes, bytes]) -> set[bytes]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def tree(data: dict[bytes, bytes], shape: tuple[int, int]) -> Tree:
    segments, fanout = shape
    return Tree(data, segments=segments, fanout=fanout, key_hash=key_hash)


def checked_exchange(local: Tree, remote: Tree) -> Diff:
    """Drive an exchange, asserting it only ever asks about differing branches."""
    ex = Exchange(local.segment_hashes(), fanout=local.fanout)
    mine, theirs = local.levels(), remote.levels()
    f = local.fanout
    differing_parents: set[int] | None = None  # nodes that differed one level up
    while (req := ex.request) is not None:
        if isinstance(req, NeedLevel):
            if differing_parents is None:
                assert req == NeedLevel(0, (0,))
            else:
                # exactly the children of the nodes that differed
                below = len(mine[req.level])
                expected = [
                    c
                    for p in sorted(differing_parents)
                    for c in range(p * f, min(p * f + f, below))
                ]
                assert list(req.indices) == expected
            answer = remote.level(req.level, req.indices)
            differing_parents = {
                i for i, h in zip(req.indices, answer, strict=True) if mine[req.level][i] != h
            }
            ex.answer_level(answer)
        elif isinstance(req, NeedSegments):
            wanted = {
                s for s, (x, y) in enumerate(zip(mine[-1], theirs[-1], strict=True)) if x != y
            }
            assert set(req.segment_ids) == wanted
            ex.answer_segments(remote.segment_entries(req.segment_ids))
        else:
            ex.answer_local_segments(local.segment_entries(req.segment_ids))
    return ex.result()


@given(map_pairs(), shapes)
def test_exchange_finds_exactly_the_differing_keys(
    pair: tuple[dict[bytes, bytes], dict[bytes, bytes]], shape: tuple[int, int]
) -> None:
    a, b = pair
    diff = checked_exchange(tree(a, shape), tree(b, shape))
    assert set(diff.keys) == differing(a, b)
    assert set(diff.missing_locally) == b.keys() - a.keys()
    assert set(diff.missing_remotely) == a.keys() - b.keys()
    assert set(diff.different) == {k for k in a.keys() & b.keys() if a[k] != b[k]}
    assert list(diff.keys) == sorted(diff.keys)
    assert bool(diff) == (a != b)


@given(maps, maps, shapes)
def test_exchange_between_unrelated_maps(
    a: dict[bytes, bytes], b: dict[bytes, bytes], shape: tuple[int, int]
) -> None:
    diff = diff_trees_locally(tree(a, shape), tree(b, shape))
    assert set(diff.keys) == differing(a, b)


@given(map_pairs(), shapes)
def test_exchange_reads_only_the_keys_of_differing_segments(
    pair: tuple[dict[bytes, bytes], dict[bytes, bytes]], shape: tuple[int, int]
) -> None:
    a, b = pair
    local, remote = tree(a, shape), tree(b, shape)
    diff = diff_trees_locally(local, remote)
    segs = set(diff.segments)
    assert diff.stats.keys_received == sum(1 for k in b if remote.segment_for(k) in segs)
    assert diff.stats.local_keys_read == sum(1 for k in a if local.segment_for(k) in segs)
    assert diff.stats.keys_received <= len(b)
    # every differing key lies in a segment that was read
    assert {local.segment_for(k) for k in diff.keys} <= segs


@given(map_pairs(), shapes)
def test_exchange_is_symmetric(
    pair: tuple[dict[bytes, bytes], dict[bytes, bytes]], shape: tuple[int, int]
) -> None:
    a, b = pair
    ab = diff_trees_locally(tree(a, shape), tree(b, shape))
    ba = diff_trees_locally(tree(b, shape), tree(a, shape))
    assert ab.missing_locally == ba.missing_remotely
    assert ab.missing_remotely == ba.missing_locally
    assert ab.different == ba.different
    assert ab.segments == ba.segments


@given(maps, shapes)
def test_identical_trees_make_one_request_and_report_nothing(
    data: dict[bytes, bytes], shape: tuple[int, int]
) -> None:
    diff = diff_trees_locally(tree(data, shape), tree(dict(data), shape))
    assert not diff
    assert diff.keys == ()
    assert diff.stats.remote_requests == 1
    assert diff.stats.hashes_received == 1
    assert diff.stats.keys_received == diff.stats.local_keys_read == 0


# -- incremental == rebuild --------------------------------------------------------------

ops = st.lists(
    st.tuples(st.sampled_from([b"a", b"b", b"c", b"d", b"e"]) | keys, st.none() | values)
)


def apply(
    t: Tree, sequence: list[tuple[bytes, bytes | None]], start: dict[bytes, bytes] | None = None
) -> dict[bytes, bytes]:
    """Apply the writes (``None`` deletes) to ``t``; return the expected data."""
    model = dict(start or {})
    for key, value in sequence:
        if value is None:
            t.delete(key)
            model.pop(key, None)
        else:
            t.put(key, value)
            model[key] = value
    return model


@given(maps, ops, shapes)
def test_incremental_updates_equal_a_rebuild_from_the_final_data(
    start: dict[bytes, bytes], sequence: list[tuple[bytes, bytes | None]], shape: tuple[int, int]
) -> None:
    t = tree(start, shape)
    model = apply(t, sequence, start)
    assert t.data() == model
    rebuilt = tree(model, shape)
    assert t.segment_hashes() == rebuilt.segment_hashes()
    assert t.levels() == rebuilt.levels()
    hashes = t.segment_hashes()
    t.rebuild()
    assert t.segment_hashes() == hashes


@given(ops, st.randoms(use_true_random=False), shapes)
def test_update_order_does_not_matter(
    sequence: list[tuple[bytes, bytes | None]], rng: random.Random, shape: tuple[int, int]
) -> None:
    forward = tree({}, shape)
    final = apply(forward, sequence)
    # a different history reaching the same data: insert the final pairs shuffled,
    # after writing and deleting some garbage
    items = sorted(final.items())
    rng.shuffle(items)
    other = tree({b"garbage": b"x"}, shape)
    for key, value in items:
        other.put(key, b"stale" + value)
        other.put(key, value)
    if b"garbage" not in final:
        other.delete(b"garbage")
    else:
        other.put(b"garbage", final[b"garbage"])
    assert other.data() == final
    assert other.segment_hashes() == forward.segment_hashes()
    assert other.root() == forward.root()
