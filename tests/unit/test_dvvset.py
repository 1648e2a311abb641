"""Unit tests of kvcluster.core.dvvset on hand-written clocks.

Most examples are the eunit tests of Riak's ``dvvset.erl`` translated to
Python (``{[{a,2,[v2]}],[]}`` is ``clock(("a", 2, "v2"))`` here); where this
port deliberately differs from the Erlang original the test says so.
"""

from __future__ import annotations

import pytest

from kvcluster.core.dvvset import (
    Clock,
    Entry,
    empty,
    equal,
    join,
    less,
    lww,
    new,
    new_with_context,
    prune,
    size,
    sync,
    sync_all,
    update,
    update_with,
    validate_vector,
    values,
)


def clock(
    *entries: tuple[str, int, *tuple[str, ...]], anonymous: tuple[str, ...] = ()
) -> Clock[str]:
    """``clock(("a", 2, "v2", "v1"), ("b", 1))``: (actor, counter, *values newest first)."""
    return Clock(tuple(Entry(a, n, tuple(vs)) for a, n, *vs in entries), anonymous)


# -- the data types ---------------------------------------------------------------------


def test_entry_rejects_negative_counter() -> None:
    with pytest.raises(ValueError, match="negative counter"):
        Entry("a", -1)


def test_entry_rejects_more_values_than_dots() -> None:
    with pytest.raises(ValueError, match="2 values but counter 1"):
        Entry("a", 1, ("v2", "v1"))


def test_entry_counter_zero_without_values_is_valid() -> None:
    assert Entry("a", 0).values == ()


@pytest.mark.parametrize(
    "entries",
    [
        (Entry("b", 1), Entry("a", 1)),  # unsorted
        (Entry("a", 1), Entry("a", 2)),  # duplicate actor
    ],
)
def test_clock_rejects_unsorted_or_duplicate_actors(entries: tuple[Entry[str], ...]) -> None:
    with pytest.raises(ValueError, match="sorted by actor"):
        Clock(entries)


@pytest.mark.parametrize("anonymous", [("v2", "v1"), ("v1", "v1")])
def test_clock_rejects_non_canonical_anonymous_values(anonymous: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="sorted and unique"):
        Clock((), anonymous)


def test_clocks_are_values() -> None:
    assert clock(("a", 2, "v2")) == clock(("a", 2, "v2"))
    assert hash(clock(("a", 2, "v2"))) == hash(clock(("a", 2, "v2")))
    assert clock(("a", 2, "v2")) != clock(("a", 2))


# -- construction -----------------------------------------------------------------------


def test_empty_has_no_history_and_no_values() -> None:
    assert empty() == Clock((), ())
    assert join(empty()) == ()
    assert values(empty()) == []


def test_new_holds_one_anonymous_value() -> None:
    assert new("v1") == clock(anonymous=("v1",))


def test_new_with_context_turns_the_vector_into_history() -> None:
    assert new_with_context((("a", 2), ("b", 1)), "v") == clock(
        ("a", 2), ("b", 1), anonymous=("v",)
    )


def test_new_with_context_drops_zero_counters() -> None:
    assert new_with_context((("a", 0), ("b", 1)), "v") == clock(("b", 1), anonymous=("v",))


@pytest.mark.parametrize(
    ("vv", "message"),
    [
        ((("b", 1), ("a", 1)), "sorted by actor"),
        ((("a", 1), ("a", 2)), "sorted by actor"),
        ((("a", -1),), "negative counter"),
        ((("a", True),), "not \\(str, int\\)"),
        (((1, 1),), "not \\(str, int\\)"),
    ],
)
def test_new_with_context_rejects_invalid_vectors(vv: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        new_with_context(vv, "v")  # type: ignore[arg-type]


def test_validate_vector_accepts_a_join_result() -> None:
    validate_vector(join(clock(("a", 3, "v3"), ("b", 0), ("c", 1))))


# -- dvvset.erl eunit: join, update, sync ------------------------------------------------


def test_join() -> None:
    a = new("v1")
    a1 = update(a, "a")
    b = new_with_context(join(a1), "v2")
    b1 = update_with(b, a1, "b")
    assert join(a) == ()
    assert join(a1) == (("a", 1),)
    assert join(b1) == (("a", 1), ("b", 1))


def test_update() -> None:
    a0 = update(new("v1"), "a")
    a1 = update_with(new_with_context(join(a0), "v2"), a0, "a")
    a2 = update_with(new_with_context(join(a1), "v3"), a1, "b")
    a3 = update_with(new_with_context(join(a0), "v4"), a1, "b")
    a4 = update_with(new_with_context(join(a0), "v5"), a1, "a")
    assert a0 == clock(("a", 1, "v1"))
    assert a1 == clock(("a", 2, "v2"))
    assert a2 == clock(("a", 2), ("b", 1, "v3"))
    assert a3 == clock(("a", 2, "v2"), ("b", 1, "v4"))  # v4 saw only v1: v2 stays
    assert a4 == clock(("a", 3, "v5", "v2"))


def test_update_inserts_a_new_actor_in_order() -> None:
    base = clock(("a", 1, "v1"), ("c", 1, "v2"))
    assert update_with(new("v3"), base, "b") == clock(
        ("a", 1, "v1"), ("b", 1, "v3"), ("c", 1, "v2")
    )
    assert update_with(new("v3"), base, "0") == clock(
        ("0", 1, "v3"), ("a", 1, "v1"), ("c", 1, "v2")
    )
    assert update_with(new("v3"), base, "d") == clock(
        ("a", 1, "v1"), ("c", 1, "v2"), ("d", 1, "v3")
    )


def test_event_on_an_existing_actor_keeps_its_siblings() -> None:
    # dvvset.erl event_test
    a = update(new("v1"), "a")
    assert update_with(new("v2"), a, "a") == clock(("a", 2, "v2", "v1"))
    assert update_with(new("v2"), a, "b") == clock(("a", 1, "v1"), ("b", 1, "v2"))


def test_sync() -> None:
    x = clock(("x", 1))
    a = update(new("v1"), "a")
    y = update(new("v2"), "b")
    a1 = update(new_with_context(join(a), "v2"), "a")
    a3 = update(new_with_context(join(a1), "v3"), "b")
    a4 = update(new_with_context(join(a1), "v3"), "c")
    w = clock(("a", 1))
    z = clock(("a", 2, "v2", "v1"))
    assert sync_all([w, z]) == clock(("a", 2, "v2"))  # w superseded dot a1 (v1)
    assert sync_all([w, z]) == sync_all([z, w])
    assert sync_all([a, a1]) == sync_all([a1, a])
    assert sync_all([a4, a3]) == sync_all([a3, a4])
    assert sync_all([a4, a3]) == clock(("a", 2), ("b", 1, "v3"), ("c", 1, "v3"))
    assert sync_all([x, a]) == clock(("a", 1, "v1"), ("x", 1))
    assert sync_all([x, a]) == sync_all([a, x])
    assert sync_all([a, y]) == clock(("a", 1, "v1"), ("b", 1, "v2"))
    assert sync_all([y, a]) == sync_all([a, y])
    assert lww(a4, str) == sync(a4, lww(a4, str))


def test_sync_keeps_values_that_neither_side_superseded() -> None:
    # One side saw a1..a3 and superseded a1; the other saw a1..a2 and superseded a1..a2.
    left = clock(("a", 3, "v3", "v2"))
    right = clock(("a", 2))
    assert sync(left, right) == clock(("a", 3, "v3"))
    assert sync(right, left) == clock(("a", 3, "v3"))
    # A side that has not seen a3 cannot have superseded it.
    assert sync(clock(("a", 3, "v3", "v2", "v1")), clock(("a", 2, "v2"))) == clock(
        ("a", 3, "v3", "v2")
    )


def test_sync_with_empty_is_identity() -> None:
    c = clock(("a", 2, "v2"), ("b", 1, "v3"))
    assert sync(empty(), c) == c
    assert sync(c, empty()) == c


def test_sync_all_of_nothing_is_empty() -> None:
    assert sync_all([]) == empty()
    assert sync_all(iter([clock(("a", 1, "v1"))])) == clock(("a", 1, "v1"))


def test_mary_and_peter() -> None:
    # dvvset.erl syn_update_test: a context supersedes only what it saw.
    a0 = update(new("v1"), "a")  # Mary writes v1 without context
    vv1 = join(a0)  # Peter reads v1
    a1 = update_with(new("v2"), a0, "a")  # Mary writes v2 without context
    a2 = update_with(new_with_context(vv1, "v3"), a1, "a")  # Peter writes v3 with v1's context
    assert vv1 == (("a", 1),)
    assert a0 == clock(("a", 1, "v1"))
    assert a1 == clock(("a", 2, "v2", "v1"))
    assert a2 == clock(("a", 3, "v3", "v2"))  # v1 superseded, v2 kept


def test_context_newer_than_the_coordinator_supersedes_its_values() -> None:
    # The client read a3 elsewhere; the coordinator only has a1..a2.
    local = clock(("a", 2, "v2", "v1"))
    result = update_with(new_with_context((("a", 3),), "v4"), local, "b")
    assert result == clock(("a", 3), ("b", 1, "v4"))
    # Never reuses a dot the context already covers.
    assert update_with(new_with_context((("a", 3),), "v4"), local, "a") == clock(("a", 4, "v4"))


@pytest.mark.parametrize("client", [empty(), clock(anonymous=("v1", "v2"))])
def test_update_needs_exactly_one_anonymous_value(client: Clock[str]) -> None:
    with pytest.raises(ValueError, match="exactly one anonymous value"):
        update(client, "a")
    with pytest.raises(ValueError, match="exactly one anonymous value"):
        update_with(client, empty(), "a")


def test_update_with_keeps_local_anonymous_values_unless_superseded() -> None:
    local = clock(("a", 1, "v1"), anonymous=("x",))
    assert update_with(new("v2"), local, "b") == clock(
        ("a", 1, "v1"), ("b", 1, "v2"), anonymous=("x",)
    )
    # A context strictly newer than the local history supersedes its anonymous values.
    assert update_with(new_with_context((("a", 2),), "v2"), local, "b") == clock(
        ("a", 2), ("b", 1, "v2")
    )


# -- anonymous values in sync -----------------------------------------------------------


def test_sync_of_concurrent_anonymous_values_keeps_both_sorted() -> None:
    a = clock(("a", 1), anonymous=("y",))
    b = clock(("b", 1), anonymous=("x", "z"))
    assert sync(a, b) == clock(("a", 1), ("b", 1), anonymous=("x", "y", "z"))
    assert sync(b, a) == sync(a, b)


def test_sync_drops_anonymous_values_of_the_older_clock() -> None:
    older = clock(("a", 1), anonymous=("x",))
    newer = clock(("a", 2, "v2"))
    assert sync(older, newer) == newer
    assert sync(newer, older) == newer


def test_sync_is_not_associative_with_anonymous_values() -> None:
    # Why the sync laws are stated only for clocks the database produces
    # (which never hold anonymous values): dvvset.erl's rule for them depends
    # on which clock is older, and that changes with the grouping.
    a = clock(("a", 1), anonymous=("x",))
    b = clock(("b", 1), anonymous=("y",))
    c = clock(("a", 1), ("b", 1))
    assert sync(sync(a, b), c) == clock(("a", 1), ("b", 1), anonymous=("x", "y"))
    assert sync(a, sync(b, c)) == c


# -- dvvset.erl eunit: less, equal, size, values ----------------------------------------


def test_less() -> None:
    a = update(new("v1"), "a")
    b = update(new_with_context(join(a), "v2"), "a")
    b2 = update(new_with_context(join(a), "v2"), "b")
    b3 = update(new_with_context(join(a), "v2"), "z")
    c = update_with(new_with_context(join(b), "v3"), a, "c")
    d = update_with(new_with_context(join(c), "v4"), b2, "d")
    assert less(a, b)
    assert less(a, c)
    assert less(b, c)
    assert less(b, d)
    assert less(b2, d)
    assert less(a, d)
    assert not less(b2, c)
    assert not less(b, b2)
    assert not less(b2, b)
    assert not less(a, a)
    assert not less(c, c)
    assert not less(d, b2)
    assert not less(b3, d)


def test_less_ignores_values_and_zero_counters() -> None:
    assert not less(clock(("a", 2, "v2")), clock(("a", 2)))
    assert not less(clock(("a", 2)), clock(("a", 2, "v2")))
    # dvvset.erl would call the second clock greater; an actor at 0 is no history.
    assert not less(clock(("a", 1)), clock(("a", 1), ("b", 0)))
    assert less(clock(("b", 0)), clock(("a", 1)))


def test_equal() -> None:
    a = clock(("a", 4, "v5", "v0"), ("b", 0), ("c", 1, "v3"), anonymous=("v0",))
    b = clock(("a", 4, "v555", "v0"), ("b", 0), ("c", 1, "v3"))
    c = clock(("a", 4, "v5", "v0"), ("b", 0), anonymous=("v1", "v6"))
    # Only causal histories are compared.
    assert equal(a, b)
    assert equal(b, a)
    assert not equal(a, c)
    assert not equal(b, c)


def test_equal_compares_the_number_of_values_per_actor() -> None:
    assert not equal(clock(("a", 4, "v5", "v0")), clock(("a", 4, "v5")))
    assert equal(clock(("a", 1, "v1")), clock(("a", 1, "v1"), ("b", 0)))


def test_size() -> None:
    assert size(new("v1")) == 1
    assert size(clock(("a", 4, "v5", "v0"), ("b", 0), ("c", 1, "v3"), anonymous=("v1", "v4"))) == 5
    assert size(empty()) == 0


def test_values_order_anonymous_first_then_actors_newest_first() -> None:
    a = clock(("a", 4, "v0", "v5"), ("b", 0), ("c", 1, "v3"), anonymous=("v1",))
    b = clock(("a", 4, "v0", "v555"), ("b", 0), ("c", 1, "v3"))
    c = clock(("a", 4), ("b", 0), anonymous=("v1", "v6"))
    assert values(a) == ["v1", "v0", "v5", "v3"]
    assert values(b) == ["v0", "v555", "v3"]
    assert values(c) == ["v1", "v6"]


# -- lww ------------------------------------------------------------------------------


def test_lww() -> None:
    # dvvset.erl lww_last_test with integer values
    x: Clock[int] = Clock((Entry("a", 4, (5, 2)), Entry("b", 1), Entry("c", 1, (3,))))
    y: Clock[int] = Clock(x.entries, (0, 10))
    z: Clock[int] = Clock((Entry("a", 4, (5, 2)), Entry("b", 1, (1,))), (3,))
    assert lww(x, int) == Clock((Entry("a", 4, (5,)), Entry("b", 1), Entry("c", 1)))
    assert lww(y, int) == Clock((Entry("a", 4), Entry("b", 1), Entry("c", 1)), (10,))
    assert lww(z, int) == Clock((Entry("a", 4, (5,)), Entry("b", 1)))


def test_lww_by_key() -> None:
    timed: Clock[tuple[int, int]] = Clock(
        (Entry("a", 4, ((5, 1002345), (7, 1002340))), Entry("b", 1, ((4, 1001340),))),
        ((2, 1001140),),
    )
    assert lww(timed, lambda v: v[1]) == Clock((Entry("a", 4, ((5, 1002345),)), Entry("b", 1)), ())


def test_lww_winner_older_than_its_actors_newest_becomes_anonymous() -> None:
    # dvvset.erl only considers each actor's newest value; this port considers
    # all of them and cannot give 9 the dot a2, so 9 loses its dot instead.
    c: Clock[int] = Clock((Entry("a", 2, (1, 9)), Entry("b", 1, (4,))))
    assert lww(c, int) == Clock((Entry("a", 2), Entry("b", 1)), (9,))
    assert sync(c, lww(c, int)) == lww(c, int)


def test_lww_ties_pick_the_first_in_values_order() -> None:
    c: Clock[int] = Clock((Entry("a", 1, (7,)), Entry("b", 1, (17,))))
    assert lww(c, lambda v: v % 10) == Clock((Entry("a", 1, (7,)), Entry("b", 1)))


def test_lww_of_a_clock_without_values_is_itself() -> None:
    c: Clock[int] = Clock((Entry("a", 3),))
    assert lww(c, int) is c


# -- prune ------------------------------------------------------------------------------


def is_kept(v: str) -> bool:
    return not v.startswith("t")  # "t..." values play tombstones


def test_prune_drops_old_values_and_keeps_the_history() -> None:
    c = clock(("a", 3, "v3", "t2", "t1"), ("b", 2, "t2"), anonymous=("t0", "v0"))
    assert prune(c, is_kept) == clock(("a", 3, "v3"), ("b", 2), anonymous=("v0",))


def test_prune_cannot_drop_a_value_newer_than_a_kept_one() -> None:
    # Dropping t3 would give v2 the dot a3: not representable, so t3 stays.
    c = clock(("a", 3, "t3", "v2"))
    assert prune(c, is_kept) == c


def test_prune_everything_leaves_an_empty_history() -> None:
    c = clock(("a", 2, "t2", "t1"), ("b", 1, "t1"))
    pruned = prune(c, is_kept)
    assert pruned == clock(("a", 2), ("b", 1))
    assert values(pruned) == []
    assert join(pruned) == join(c)


def test_pruned_values_do_not_come_back_from_a_replica_that_still_has_them() -> None:
    c = clock(("a", 3, "v3", "t2"), ("b", 1, "t1"))
    pruned = prune(c, is_kept)
    assert sync(pruned, c) == pruned
    assert sync(c, pruned) == pruned
    # Nor from a replica that has seen less.
    assert sync(pruned, clock(("a", 2, "t2"), ("b", 1, "t1"))) == pruned


def test_unchecked_constructors_build_what_the_checked_ones_build() -> None:
    from kvcluster.core.dvvset import Clock, Entry, unchecked_clock, unchecked_entry

    entry = unchecked_entry("a", 3, ("v2", "v1"))
    assert entry == Entry("a", 3, ("v2", "v1")) and hash(entry) == hash(Entry("a", 3, ("v2", "v1")))
    assert unchecked_entry("b", 1) == Entry("b", 1)
    built = unchecked_clock((entry,), ("w",))
    assert built == Clock((Entry("a", 3, ("v2", "v1")),), ("w",))
    assert unchecked_clock(()) == Clock()
    with pytest.raises(AttributeError):
        built.anonymous = ()  # type: ignore[misc]  # still frozen
