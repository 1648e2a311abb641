"""Properties of the ring claim and of preference lists, over random clusters.

Clusters have 1..12 members with arbitrary (unicode) ids, Q in {8, 16, 64,
256} and N in 1..5; membership histories are random sequences of joins and
leaves. Balance is checked against ``floor`` / ``ceil`` of the fair share:
exact for a new ring, within one either way after any history.
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from kvcluster.core.hashing import partition_of
from kvcluster.core.preflist import (
    fallback_order,
    preference_list,
    preference_list_for_partition,
)
from kvcluster.core.ring import Ring, add_member, new_ring, remove_member

MAX_MEMBERS = 12

node_ids = st.text(min_size=1, max_size=6)
member_sets = st.sets(node_ids, min_size=1, max_size=MAX_MEMBERS)
partition_counts = st.sampled_from([8, 16, 64, 256])
replica_counts = st.integers(1, 5)


def assert_balanced(ring: Ring, slack: int) -> None:
    """Slots and primaries per node within ``slack`` of floor / ceil of the fair share."""
    m = len(ring.members)
    for counts, total in (
        (ring.ownership_counts(), ring.q * ring.replicas),
        (ring.primary_counts(), ring.q),
    ):
        assert set(counts) == set(ring.members)
        assert sum(counts.values()) == total
        low, high = total // m - slack, math.ceil(total / m) + slack
        assert low <= min(counts.values()), (counts, low)
        assert max(counts.values()) <= high, (counts, high)


def assert_shape(ring: Ring) -> None:
    """Every partition has min(n, members) distinct owners, all members."""
    ring.validate()
    width = min(ring.n, len(ring.members))
    assert len(ring.owners) == ring.q
    for row in ring.owners:
        assert len(row) == width
        assert len(set(row)) == width
        assert set(row) <= set(ring.members)


def assert_join(old: Ring, new: Ring, node: str) -> None:
    """Only slots taken by ``node`` changed; every other slot kept its node and place."""
    assert new.epoch == old.epoch + 1
    assert new.members == tuple(sorted((*old.members, node)))
    grew = new.replicas > old.replicas
    taken = 0
    for before, after in zip(old.owners, new.owners, strict=True):
        for x, y in zip(before, after, strict=False):
            assert y in (x, node)
            taken += x != y
        if grew:  # below n members the new node joins every partition; nobody leaves
            assert set(after) == {*before, node}
    if not grew:
        assert taken == new.ownership_counts()[node]


def assert_leave(old: Ring, new: Ring, node: str) -> None:
    """Only partitions ``node`` owned changed, and in them only ``node`` was replaced."""
    assert new.epoch == old.epoch + 1
    assert new.members == tuple(x for x in old.members if x != node)
    shrank = new.replicas < old.replicas
    for before, after in zip(old.owners, new.owners, strict=True):
        if node not in before:
            assert after == before
        elif shrank:
            assert set(after) == set(before) - {node}
        else:
            assert set(before) - set(after) == {node}
            assert len(set(after) - set(before)) == 1


Step = tuple[bool, str]
"""(True, node): node joins; (False, node): node leaves."""
History = tuple[Ring, list[Step]]


def apply(ring: Ring, step: Step) -> Ring:
    join, node = step
    return add_member(ring, node) if join else remove_member(ring, node)


@st.composite
def histories(draw: st.DrawFn) -> History:
    """A new ring and a sequence of joins and leaves to apply to it."""
    ring = new_ring(draw(member_sets), q=draw(partition_counts), n=draw(replica_counts))
    steps: list[Step] = []
    members = set(ring.members)
    for _ in range(draw(st.integers(0, 8))):
        join = len(members) == 1 or (len(members) < MAX_MEMBERS and draw(st.booleans()))
        if join:
            node = draw(node_ids.filter(lambda x: x not in members))
            members.add(node)
        else:
            node = draw(st.sampled_from(sorted(members)))
            members.remove(node)
        steps.append((join, node))
    return ring, steps


# -- claim -----------------------------------------------------------------------------


@given(member_sets, partition_counts, replica_counts)
def test_new_rings_have_the_right_shape_and_are_exactly_level(
    members: set[str], q: int, n: int
) -> None:
    ring = new_ring(members, q=q, n=n)
    assert ring.members == tuple(sorted(members))
    assert_shape(ring)
    assert_balanced(ring, slack=0)


@given(member_sets, partition_counts, replica_counts, st.data())
def test_new_ring_is_deterministic(members: set[str], q: int, n: int, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(sorted(members)))
    assert new_ring(members, q=q, n=n) == new_ring(shuffled, q=q, n=n)
    assert new_ring(members, q=q, n=n) == new_ring(members, q=q, n=n)


@given(histories())
def test_any_history_keeps_rings_valid_balanced_and_moves_only_what_it_must(
    history: History,
) -> None:
    ring, steps = history
    for join, node in steps:
        new = apply(ring, (join, node))
        assert_shape(new)
        if join:
            assert_join(ring, new, node)
        else:
            assert_leave(ring, new, node)
        assert_balanced(new, slack=1)
        assert Ring.from_dict(new.to_dict()) == new
        ring = new


@given(histories())
def test_joins_and_leaves_are_deterministic(history: History) -> None:
    ring, steps = history
    for step in steps:
        new = apply(ring, step)
        assert apply(ring, step) == new
        ring = new


# -- preference lists ------------------------------------------------------------------


@st.composite
def placements(draw: st.DrawFn) -> tuple[Ring, int, int, frozenset[str]]:
    """A ring (possibly after a few joins / leaves), a partition, an n and the up nodes."""
    ring, steps = draw(histories())
    for step in steps[:3]:
        ring = apply(ring, step)
    partition = draw(st.integers(0, ring.q - 1))
    n = draw(st.integers(1, ring.n))
    up = draw(st.sets(st.sampled_from(ring.members))) | draw(st.sets(node_ids, max_size=2))
    return ring, partition, n, frozenset(up)


@given(placements())
def test_preference_lists(placement: tuple[Ring, int, int, frozenset[str]]) -> None:
    ring, partition, n, up = placement
    owners = ring.owners_of(partition)[:n]
    targets = preference_list_for_partition(partition, ring, n, up)
    nodes = [t.node for t in targets]
    live = up & set(ring.members)

    assert len(targets) == min(n, len(live))
    assert len(set(nodes)) == len(nodes)
    assert set(nodes) <= live  # never a down node

    primaries = [t for t in targets if t.primary]
    fallbacks = [t for t in targets if not t.primary]
    assert targets == (*primaries, *fallbacks)  # primaries first
    assert [t.node for t in primaries] == [x for x in owners if x in up]  # in owner order
    assert all(t.hint_for is None for t in primaries)

    down = [x for x in owners if x not in up]
    assert [t.hint_for for t in fallbacks] == down[: len(fallbacks)]  # only for down owners
    assert not {t.node for t in fallbacks} & set(owners)

    strict = preference_list_for_partition(partition, ring, n, up, strict=True)
    assert strict == tuple(primaries)


@given(placements(), st.binary(min_size=1, max_size=32))
def test_preference_list_of_a_key_is_that_of_its_partition(
    placement: tuple[Ring, int, int, frozenset[str]], key: bytes
) -> None:
    ring, _, n, up = placement
    partition = partition_of(key, ring.q)
    for strict in (False, True):
        assert preference_list(key, ring, n, up, strict=strict) == (
            preference_list_for_partition(partition, ring, n, up, strict=strict)
        )


@given(placements())
def test_fallback_order_is_every_non_owner_once(
    placement: tuple[Ring, int, int, frozenset[str]],
) -> None:
    ring, partition, _, _ = placement
    order = fallback_order(ring, partition)
    assert len(set(order)) == len(order)
    assert set(order) == set(ring.members) - set(ring.owners_of(partition))
