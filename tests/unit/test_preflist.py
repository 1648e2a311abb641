"""Unit tests of kvcluster.core.preflist on a hand-written ring."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import pytest

from kvcluster.core.hashing import partition_of
from kvcluster.core.preflist import (
    Target,
    fallback_order,
    preference_list,
    preference_list_for_partition,
)
from kvcluster.core.ring import Ring, new_ring

ALL = frozenset("abcdef")

# Four partitions, three owners each, over six nodes.
RING = Ring(
    epoch=1,
    q=4,
    n=3,
    members=("a", "b", "c", "d", "e", "f"),
    owners=(
        ("a", "b", "c"),
        ("d", "e", "f"),
        ("b", "d", "a"),
        ("f", "c", "e"),
    ),
)


def primary(node: str) -> Target:
    return Target(node, True)


def fallback(node: str, hint_for: str) -> Target:
    return Target(node, False, hint_for)


def plist(partition: int, up: Iterable[str], n: int = 3, strict: bool = False) -> list[Target]:
    return list(preference_list_for_partition(partition, RING, n, frozenset(up), strict=strict))


# -- fallback order --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("partition", "order"),
    [
        (0, ("d", "e", "f")),  # partition 1's owners
        (1, ("b", "a", "c")),  # partition 2's b, a (d owns 1), then partition 3's c
        (2, ("f", "c", "e")),  # partition 3's owners
        (3, ("a", "b", "d")),  # wraps around: partition 0's a, b, then partition 1's d
    ],
)
def test_fallbacks_are_taken_walking_the_ring_clockwise(
    partition: int, order: tuple[str, ...]
) -> None:
    assert fallback_order(RING, partition) == order


def test_members_owning_nothing_come_last_rotated_by_partition() -> None:
    ring = Ring(1, 2, 1, ("a", "b", "c", "d"), (("a",), ("b",)))
    assert fallback_order(ring, 0) == ("b", "c", "d")
    assert fallback_order(ring, 1) == ("a", "d", "c")


# -- preference lists ------------------------------------------------------------------


def test_all_up_gives_the_owners_in_order() -> None:
    assert plist(0, ALL) == [primary("a"), primary("b"), primary("c")]
    assert plist(2, ALL) == [primary("b"), primary("d"), primary("a")]


def test_a_down_owner_is_replaced_by_the_first_fallback() -> None:
    assert plist(0, ALL - {"b"}) == [primary("a"), primary("c"), fallback("d", "b")]


def test_a_down_first_owner_leaves_the_second_one_first() -> None:
    assert plist(0, ALL - {"a"}) == [primary("b"), primary("c"), fallback("d", "a")]


def test_fallbacks_stand_in_for_down_owners_in_owner_order() -> None:
    assert plist(0, ALL - {"a", "c"}) == [primary("b"), fallback("d", "a"), fallback("e", "c")]


def test_down_fallbacks_are_skipped() -> None:
    assert plist(0, ALL - {"a", "d"}) == [primary("b"), primary("c"), fallback("e", "a")]
    assert plist(1, ALL - {"e", "b"}) == [primary("d"), primary("f"), fallback("a", "e")]


def test_too_few_nodes_up_gives_a_shorter_list() -> None:
    assert plist(0, {"a", "f"}) == [primary("a"), fallback("f", "b")]
    assert plist(0, {"a"}) == [primary("a")]
    assert plist(0, frozenset()) == []


def test_strict_returns_only_the_up_primaries() -> None:
    assert plist(0, ALL - {"b"}, strict=True) == [primary("a"), primary("c")]
    assert plist(0, ALL, strict=True) == [primary("a"), primary("b"), primary("c")]
    assert plist(0, {"d", "e"}, strict=True) == []


def test_smaller_n_uses_the_first_owners_and_the_rest_as_first_fallbacks() -> None:
    assert plist(0, ALL, n=2) == [primary("a"), primary("b")]
    assert plist(0, ALL - {"a"}, n=2) == [primary("b"), fallback("c", "a")]
    assert plist(0, ALL - {"a", "c"}, n=2) == [primary("b"), fallback("d", "a")]


def test_unknown_nodes_in_up_nodes_are_ignored() -> None:
    assert plist(0, ALL - {"a"} | {"x", "y"}) == [primary("b"), primary("c"), fallback("d", "a")]
    assert plist(0, {"b", "x", "y"}) == [primary("b")]


@pytest.mark.parametrize("n", [0, 4, -1])
def test_n_must_be_between_1_and_the_rings_n(n: int) -> None:
    with pytest.raises(ValueError, match="n must be between 1 and the ring's n=3"):
        plist(0, ALL, n=n)


def test_partition_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="out of range"):
        plist(4, ALL)


def test_preference_list_routes_a_key_to_its_partition() -> None:
    ring = new_ring(["a", "b", "c", "d", "e"], q=64, n=3)
    up = frozenset({"a", "c", "e"})
    for key in (b"hello", b"user:42", b"a"):
        partition = partition_of(key, 64)
        expected = preference_list_for_partition(partition, ring, 3, up)
        assert preference_list(key, ring, 3, up) == expected
        assert preference_list(key, ring, 3, up, strict=True) == tuple(
            Target(x, True) for x in ring.owners_of(partition) if x in up
        )


def test_a_ring_smaller_than_n_has_no_fallbacks() -> None:
    ring = new_ring(["a", "b"], q=8, n=3)
    for p in range(8):
        assert [t.node for t in preference_list_for_partition(p, ring, 3, {"a", "b"})] == list(
            ring.owners_of(p)
        )
        assert preference_list_for_partition(p, ring, 3, {"a"}) == (Target("a", True),)


def test_a_failed_nodes_fallbacks_spread_over_the_cluster() -> None:
    ring = new_ring([f"n{i}" for i in range(8)], q=64, n=3)
    for down in ring.members:
        up = frozenset(ring.members) - {down}
        stand_ins = Counter(
            t.node
            for p in ring.partitions_of(down)
            for t in preference_list_for_partition(p, ring, 3, up)
            if not t.primary
        )
        assert sum(stand_ins.values()) == 24  # one fallback per slot of the down node
        # No single node takes the bulk (with successor placement one would take all).
        assert len(stand_ins) >= 6, (down, stand_ins)
        assert max(stand_ins.values()) <= 7, (down, stand_ins)


# -- Target ----------------------------------------------------------------------------


def test_target_invariants() -> None:
    with pytest.raises(ValueError, match="cannot hold a hint"):
        Target("a", True, "b")
    with pytest.raises(ValueError, match="must name the owner"):
        Target("a", False)
    with pytest.raises(ValueError, match="cannot stand in for itself"):
        Target("a", False, "a")
    assert Target("a", False, "b").hint_for == "b"
    assert Target("a", True).hint_for is None
