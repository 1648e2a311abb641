"""Unit tests of kvcluster.core.ring on concrete rings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from kvcluster.core.ring import Ring, add_member, new_ring, remove_member

SIX = ("a", "b", "c", "d", "e", "f")


def level(counts: dict[str, int], total: int) -> bool:
    """Every count is floor or ceil of total / len(counts)."""
    lo, hi = total // len(counts), math.ceil(total / len(counts))
    return all(lo <= c <= hi for c in counts.values())


def seconds(ring: Ring, first: str) -> Counter[str]:
    """Second owners of the partitions ``first`` leads (they coordinate when it is down)."""
    return Counter(row[1] for row in ring.owners if row[0] == first)


def co_owners(ring: Ring, node: str) -> Counter[str]:
    """How many partitions ``node`` shares with each other member."""
    return Counter(y for row in ring.owners if node in row for y in row if y != node)


# -- new_ring --------------------------------------------------------------------------


def test_new_ring_fields_and_shape() -> None:
    ring = new_ring(["c", "a", "b", "d"], q=8, n=3)
    assert ring.epoch == 1
    assert (ring.q, ring.n, ring.replicas) == (8, 3, 3)
    assert ring.members == ("a", "b", "c", "d")
    assert len(ring.owners) == 8
    for row in ring.owners:
        assert len(row) == 3
        assert len(set(row)) == 3
        assert set(row) <= set(ring.members)


def test_new_ring_defaults_to_64_partitions_and_3_replicas() -> None:
    ring = new_ring(SIX)
    assert (ring.q, ring.n, ring.epoch) == (64, 3, 1)


def test_new_ring_is_level_in_slots_and_primaries() -> None:
    ring = new_ring(["a", "b", "c", "d", "e"], q=64, n=3)
    assert sorted(set(ring.ownership_counts().values())) == [38, 39]  # 192 slots / 5
    assert sorted(set(ring.primary_counts().values())) == [12, 13]  # 64 partitions / 5


@pytest.mark.parametrize("members", [1, 2, 3, 4, 5, 7, 9, 12, 16])
@pytest.mark.parametrize(("q", "n"), [(8, 3), (64, 3), (64, 5), (256, 2), (1024, 3)])
def test_new_ring_is_level_for_many_sizes(members: int, q: int, n: int) -> None:
    ring = new_ring([f"node-{i}" for i in range(members)], q=q, n=n)
    assert level(ring.ownership_counts(), q * ring.replicas)
    assert level(ring.primary_counts(), q)


def test_new_ring_does_not_depend_on_member_order() -> None:
    assert new_ring(SIX, q=64) == new_ring(reversed(SIX), q=64)
    assert new_ring(SIX, q=64) != new_ring(SIX, q=32)
    assert new_ring(SIX, q=64, n=3) != new_ring(SIX, q=64, n=2)


def test_new_ring_uses_the_given_epoch() -> None:
    assert new_ring(SIX, epoch=7).epoch == 7


_SCRIPT = """
import json
from kvcluster.core.ring import add_member, new_ring, remove_member
ring = new_ring(["n1", "n2", "n3", "n4", "n5"], q=64, n=3)
ring = remove_member(add_member(ring, "n6"), "n2")
print(json.dumps(ring.to_dict()))
"""


def test_rings_do_not_depend_on_the_interpreters_hash_seed() -> None:
    def run(seed: str) -> Any:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", _SCRIPT], env=env, check=True, capture_output=True, text=True
        )
        return json.loads(out.stdout)

    assert run("1") == run("2")


def test_a_single_node_owns_everything() -> None:
    ring = new_ring(["solo"], q=8, n=3)
    assert ring.replicas == 1
    assert ring.owners == (("solo",),) * 8


def test_fewer_members_than_n_means_every_member_owns_every_partition() -> None:
    ring = new_ring(["a", "b"], q=16, n=3)
    assert ring.replicas == 2
    assert all(set(row) == {"a", "b"} for row in ring.owners)
    assert ring.primary_counts() == {"a": 8, "b": 8}


def test_members_owning_nothing_are_counted_as_zero() -> None:
    ring = new_ring([f"n{i:02d}" for i in range(12)], q=8, n=1)
    counts = ring.ownership_counts()
    assert len(counts) == 12
    assert sorted(counts.values()) == [0] * 4 + [1] * 8


def test_a_failed_nodes_partitions_are_coordinated_by_many_nodes() -> None:
    # With successor placement, one neighbour would take over all of them.
    ring = new_ring([f"n{i}" for i in range(6)], q=64, n=3)
    for node in ring.members:
        second = seconds(ring, node)
        assert len(second) == 5, (node, second)
        assert max(second.values()) <= 3, (node, second)


def test_each_node_shares_partitions_with_every_other_node_about_equally() -> None:
    ring = new_ring([f"n{i}" for i in range(8)], q=256, n=3)
    # 96 slots per node, 2 co-owners each: 192 / 7 = 27.4 per other node.
    for node in ring.members:
        shared = co_owners(ring, node)
        assert len(shared) == 7
        assert 24 <= min(shared.values()) <= max(shared.values()) <= 31, (node, shared)


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([], "at least one member"),
        (["a", "a"], "duplicate member"),
        (["a", ""], "non-empty string"),
        (["a", 3], "non-empty string"),
    ],
)
def test_new_ring_rejects_bad_members(members: list[Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        new_ring(members)


def test_new_ring_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="power of two"):
        new_ring(SIX, q=48)
    with pytest.raises(ValueError, match="n must be at least 1"):
        new_ring(SIX, n=0)
    with pytest.raises(ValueError, match="epoch must be at least 0"):
        new_ring(SIX, epoch=-1)


# -- queries ---------------------------------------------------------------------------


def test_owner_queries() -> None:
    ring = new_ring(SIX, q=16, n=3)
    for p, row in enumerate(ring.owners):
        assert ring.owners_of(p) == row
        assert ring.primary_of(p) == row[0]
    for node in SIX:
        mine = ring.partitions_of(node)
        assert mine == tuple(p for p in range(16) if node in ring.owners[p])
        assert len(mine) == ring.ownership_counts()[node]
    assert ring.partitions_of("stranger") == ()
    assert sum(ring.ownership_counts().values()) == 16 * 3
    assert sum(ring.primary_counts().values()) == 16


@pytest.mark.parametrize("partition", [-1, 16, 1000])
def test_owners_of_rejects_partitions_out_of_range(partition: int) -> None:
    ring = new_ring(SIX, q=16)
    with pytest.raises(ValueError, match=r"out of range 0\.\.15"):
        ring.owners_of(partition)


# -- add_member ------------------------------------------------------------------------


def test_add_member_only_moves_slots_to_the_new_node() -> None:
    old = new_ring(["a", "b", "c"], q=64, n=3)
    new = add_member(old, "d")
    assert new.epoch == old.epoch + 1
    assert new.members == ("a", "b", "c", "d")
    moved = 0
    for before, after in zip(old.owners, new.owners, strict=True):
        for x, y in zip(before, after, strict=True):
            assert y in (x, "d")
            moved += x != y
    # The new node takes its fair share (64 * 3 / 4 slots), each old node gives a quarter.
    assert moved == new.ownership_counts()["d"] == 48
    assert new.ownership_counts() == {"a": 48, "b": 48, "c": 48, "d": 48}
    assert new.primary_counts() == {"a": 16, "b": 16, "c": 16, "d": 16}


def test_add_member_to_a_ring_below_n_joins_every_partition() -> None:
    old = new_ring(["a", "b"], q=64, n=3)
    new = add_member(old, "c")
    assert new.replicas == 3
    for before, after in zip(old.owners, new.owners, strict=True):
        assert set(after) == {"a", "b", "c"}
        # Old places keep their node or now hold the new node; the displaced
        # node (if any) moved to the new last place.
        assert all(y in (x, "c") for x, y in zip(before, after[:2], strict=True))
    assert level(new.primary_counts(), 64)
    for c in range(3):
        assert level(Counter(row[c] for row in new.owners), 64)


def test_add_member_rejects_existing_members_and_bad_ids() -> None:
    ring = new_ring(SIX)
    with pytest.raises(ValueError, match="already a member"):
        add_member(ring, "a")
    with pytest.raises(ValueError, match="non-empty string"):
        add_member(ring, "")


# -- remove_member ---------------------------------------------------------------------


def test_remove_member_only_reassigns_the_leaving_nodes_slots() -> None:
    old = new_ring(["a", "b", "c", "d", "e"], q=64, n=3)
    new = remove_member(old, "c")
    assert new.epoch == old.epoch + 1
    assert new.members == ("a", "b", "d", "e")
    for before, after in zip(old.owners, new.owners, strict=True):
        if "c" not in before:
            assert after == before
        else:
            assert set(before) - set(after) == {"c"}
            assert len(set(after) - set(before)) == 1
    assert new.ownership_counts() == {"a": 48, "b": 48, "d": 48, "e": 48}
    assert new.primary_counts() == {"a": 16, "b": 16, "d": 16, "e": 16}


def test_remove_member_spreads_the_leaving_nodes_slots() -> None:
    old = new_ring([f"n{i}" for i in range(8)], q=256, n=3)
    new = remove_member(old, "n0")
    gained = Counter(new.ownership_counts()) - Counter(old.ownership_counts())
    assert sorted(gained) == [f"n{i}" for i in range(1, 8)]
    assert level(new.ownership_counts(), 256 * 3)


def test_remove_member_below_n_shortens_every_owner_list() -> None:
    old = new_ring(["a", "b", "c"], q=64, n=3)
    new = remove_member(old, "b")
    assert new.replicas == 2
    assert all(set(row) == {"a", "c"} for row in new.owners)
    assert new.primary_counts() == {"a": 32, "c": 32}


def test_remove_member_rejects_strangers_and_the_last_member() -> None:
    with pytest.raises(ValueError, match="not a member"):
        remove_member(new_ring(SIX), "z")
    with pytest.raises(ValueError, match="only member"):
        remove_member(new_ring(["a"]), "a")


def test_leave_then_join_returns_to_a_level_ring() -> None:
    ring = new_ring(SIX, q=64, n=3)
    ring = add_member(remove_member(ring, "c"), "c")
    assert ring.epoch == 3
    assert level(ring.ownership_counts(), 192)
    assert level(ring.primary_counts(), 64)


# -- serialisation ---------------------------------------------------------------------


def test_to_dict_round_trips_through_json() -> None:
    ring = remove_member(add_member(new_ring(SIX, q=16), "g"), "b")
    d = ring.to_dict()
    assert d == {
        "epoch": 3,
        "q": 16,
        "n": 3,
        "members": ["a", "c", "d", "e", "f", "g"],
        "owners": [list(row) for row in ring.owners],
    }
    assert Ring.from_dict(json.loads(json.dumps(d))) == ring


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"epoch": None}, "missing keys \\['epoch'\\]"),
        ({"extra": 1}, "unknown keys \\['extra'\\]"),
        ({"epoch": "1"}, "epoch must be an int"),
        ({"epoch": -1}, "epoch must be at least 0"),
        ({"q": 3}, "power of two"),
        ({"n": 0}, "n must be at least 1"),
        ({"members": "ab"}, "members must be a list"),
        ({"members": []}, "no members"),
        ({"members": ["b", "a"]}, "sorted and distinct"),
        ({"members": ["a", "a", "b"]}, "sorted and distinct"),
        ({"owners": "x"}, "owners must be a list of lists"),
        ({"owners": [["a", "b"], "ab"]}, "owners must be a list of lists"),
        ({"owners": [["a", "b"]]}, "1 owner lists for 2 partitions"),
        ({"owners": [["a", "b"], ["a"]]}, "partition 1 has 1 owners, expected"),
        ({"owners": [["a", "b"], ["a", "a"]]}, "partition 1 lists an owner twice"),
        ({"owners": [["a", "z"], ["a", "b"]]}, "unknown member 'z'"),
        ({"owners": [["a", ["b"]], ["a", "b"]]}, "partition 0 has an owner that is not a node id"),
        ({"owners": [["a", 2], ["a", "b"]]}, "partition 0 has an owner that is not a node id"),
        ({"members": ["a", 2]}, "non-empty string"),
        ({"members": ["a", "b\ud800"]}, "valid unicode"),
        ({"q": 2.0}, "partition count must be an int"),
    ],
)
def test_from_dict_rejects_malformed_rings(change: dict[str, Any], match: str) -> None:
    d: dict[str, Any] = {"epoch": 1, "q": 2, "n": 2, "members": ["a", "b"]}
    d["owners"] = [["a", "b"], ["b", "a"]]
    for key, value in change.items():
        if value is None:
            del d[key]
        else:
            d[key] = value
    with pytest.raises(ValueError, match=match):
        Ring.from_dict(d)


def test_from_dict_rejects_non_mappings() -> None:
    with pytest.raises(ValueError, match="mapping"):
        Ring.from_dict([])  # type: ignore[arg-type]


def test_a_ring_cannot_be_constructed_invalid() -> None:
    with pytest.raises(ValueError, match="partition 0 has 3 owners, expected"):
        Ring(1, 1, 2, ("a", "b"), (("a", "b", "a"),))
    with pytest.raises(ValueError, match="non-empty string"):
        Ring(1, 1, 1, ("",), (("",),))
    with pytest.raises(ValueError, match="members must be a tuple"):
        Ring(1, 1, 1, ["a"], (("a",),))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="owners must be a tuple of tuples"):
        Ring(1, 1, 1, ("a",), (["a"],))  # type: ignore[arg-type]


def test_validate_accepts_a_valid_ring() -> None:
    ring = Ring(4, 2, 2, ("a", "b", "c"), (("a", "b"), ("c", "a")))
    ring.validate()
    assert ring.owners_of(1) == ("c", "a")
