"""Laws of kvcluster.core.dvvset on clocks produced the way the database produces them.

Domain. The laws (sync commutative, associative, idempotent) hold on clocks
that respect dvvset's invariant that a dot names one value everywhere, and
that hold no anonymous values. Arbitrary random clocks break both: two random
clocks may give the dot ``(a, 3)`` different values (sync then keeps the
first argument's, so it is not commutative), and anonymous values make it
non-associative (see ``test_sync_is_not_associative_with_anonymous_values``
in tests/unit/test_dvvset.py). So clocks here come from random *histories*:

* ``Read(replicas)``: a client syncs some replicas' clocks (a quorum read)
  and keeps the context ``join(...)``;
* ``Put(coordinator, context_age)``: a client writes a fresh value through a
  coordinator, with the latest context read or an older (stale) one, or
  blind; the coordinator applies ``update_with`` with its own actor;
* ``Sync(target, source)``: replication / read repair / anti-entropy;
* ``Wipe(replica)``: a replica loses the key (handoff cleanup, tombstone
  removal, a wiped disk) and, like the store, takes a fresh actor for it.

Reference model. Alongside the clocks the test tracks, per replica, the set
of writes it has heard of (``known``) and, per write, the set of writes its
context had seen (``saw``). A write is superseded exactly when some write
whose context saw it is known; the values a replica must hold are the known
writes that are not superseded. ``values()`` must equal that, always: no write
is lost unless a context that saw it superseded it, and nothing superseded
survives. Values are write ids (ints), so every write is distinguishable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from kvcluster.core.dvvset import (
    Clock,
    Entry,
    VersionVector,
    empty,
    equal,
    join,
    less,
    lww,
    new,
    new_with_context,
    prune,
    sync,
    sync_all,
    update_with,
    values,
)

REPLICAS = 3


@dataclass(frozen=True)
class Read:
    replicas: frozenset[int]


@dataclass(frozen=True)
class Put:
    coordinator: int
    context_age: int | None  # 0: the latest context read, 1: the one before...; None: blind


@dataclass(frozen=True)
class Sync:
    target: int
    source: int


@dataclass(frozen=True)
class Wipe:
    replica: int


Op = Read | Put | Sync | Wipe

replica_ids = st.integers(0, REPLICAS - 1)
# Weighted so that histories pile up siblings, (stale) contexts and partial
# replication, with the occasional wipe.
KINDS = ("read", "read", "put", "put", "put", "put", "sync", "sync", "sync", "wipe")


@st.composite
def operations(draw: st.DrawFn) -> Op:
    kind = draw(st.sampled_from(KINDS))
    if kind == "read":
        return Read(draw(st.frozensets(replica_ids, min_size=1)))
    if kind == "put":
        blind = draw(st.integers(0, 2)) == 0
        return Put(draw(replica_ids), None if blind else draw(st.integers(0, 3)))
    if kind == "sync":
        return Sync(draw(replica_ids), draw(replica_ids))
    return Wipe(draw(replica_ids))


histories = st.lists(operations(), min_size=10, max_size=60)


@dataclass
class Run:
    """The outcome of a history: real clocks and the reference model side by side."""

    clocks: list[Clock[int]] = field(default_factory=lambda: [empty()] * REPLICAS)
    actors: list[str] = field(default_factory=lambda: [f"r{i}.0" for i in range(REPLICAS)])
    known: list[frozenset[int]] = field(default_factory=lambda: [frozenset()] * REPLICAS)
    contexts: list[tuple[VersionVector, frozenset[int]]] = field(default_factory=list)
    saw: dict[int, frozenset[int]] = field(default_factory=dict)  # write -> what its context saw
    dots: dict[int, tuple[str, int]] = field(default_factory=dict)  # write -> dot it was given
    pool: list[Clock[int]] = field(default_factory=list)  # every clock that ever existed

    def expected(self, known: Iterable[int]) -> list[int]:
        """The writes in ``known`` that no write in ``known`` superseded, sorted."""
        live = set(known)
        for w in set(live):
            live -= self.saw[w]
        return sorted(live)

    def covered(self, vv: VersionVector) -> frozenset[int]:
        """The writes whose dots the version vector covers."""
        counters = dict(vv)
        return frozenset(w for w, (a, n) in self.dots.items() if n <= counters.get(a, 0))


def run(history: list[Op]) -> Run:
    r = Run()
    for op in history:
        if isinstance(op, Read):
            merged = sync_all(r.clocks[i] for i in sorted(op.replicas))
            seen = frozenset[int]().union(*(r.known[i] for i in op.replicas))
            r.contexts.append((join(merged), seen))
            r.pool.append(merged)
        elif isinstance(op, Put):
            write = len(r.saw)
            c = op.coordinator
            if op.context_age is None or not r.contexts:
                client, seen = new(write), frozenset[int]()
            else:
                vv, seen = r.contexts[-1 - min(op.context_age, len(r.contexts) - 1)]
                client = new_with_context(vv, write)
            r.clocks[c] = update_with(client, r.clocks[c], r.actors[c])
            r.saw[write] = seen
            r.known[c] = r.known[c] | seen | {write}
            r.dots[write] = (r.actors[c], dict(join(r.clocks[c]))[r.actors[c]])
            r.pool.append(r.clocks[c])
        elif isinstance(op, Sync):
            r.clocks[op.target] = sync(r.clocks[op.target], r.clocks[op.source])
            r.known[op.target] = r.known[op.target] | r.known[op.source]
            r.pool.append(r.clocks[op.target])
        else:
            name, epoch = r.actors[op.replica].split(".")
            r.actors[op.replica] = f"{name}.{int(epoch) + 1}"
            r.clocks[op.replica] = empty()
            r.known[op.replica] = frozenset()
    r.pool.append(empty())
    return r


def pick(data: st.DataObject, r: Run) -> Clock[int]:
    return data.draw(st.sampled_from(r.pool))


# -- the reference model ----------------------------------------------------------------


@given(histories)
def test_every_replica_holds_exactly_the_unsuperseded_writes_it_knows(history: list[Op]) -> None:
    r = run(history)
    for i in range(REPLICAS):
        held = values(r.clocks[i])
        assert sorted(held) == r.expected(r.known[i]), f"replica {i}"
        assert r.covered(join(r.clocks[i])) == r.known[i], f"replica {i} history"


@given(histories)
def test_no_write_is_lost_once_all_replicas_are_synced(history: list[Op]) -> None:
    r = run(history)
    merged = sync_all(r.clocks)
    everywhere = frozenset[int]().union(*r.known)
    assert sorted(values(merged)) == r.expected(everywhere)


@given(histories)
def test_stored_clocks_have_unique_values_and_no_anonymous_ones(history: list[Op]) -> None:
    r = run(history)
    for c in r.pool:
        assert c.anonymous == ()
        assert max(Counter(values(c)).values(), default=1) == 1


@given(histories)
def test_every_clock_made_is_canonical(history: list[Op]) -> None:
    # update_with and sync build clocks without re-checking them (hot path); the
    # checked constructors must accept each one as it is.
    r = run(history)
    for c in r.pool:
        rebuilt = Clock(tuple(Entry(e.actor, e.counter, e.values) for e in c.entries), c.anonymous)
        assert rebuilt == c


@given(histories, st.data())
def test_a_context_supersedes_exactly_what_it_saw(history: list[Op], data: st.DataObject) -> None:
    r = run(history)
    i = data.draw(replica_ids)
    local, actor = r.clocks[i], r.actors[i]
    context = join(pick(data, r))
    write = len(r.saw)
    result = update_with(new_with_context(context, write), local, actor)
    saw = r.covered(context)
    assert sorted(values(result)) == sorted([write, *(v for v in values(local) if v not in saw)])
    assert less(local, result)
    assert all(n <= dict(join(result)).get(a, 0) for a, n in context)


@given(histories, st.data())
def test_an_update_absorbs_the_clock_it_was_applied_to(
    history: list[Op], data: st.DataObject
) -> None:
    """Why a replica holding the coordinator's copy may store the update as it is
    (WriteItem.base): syncing that copy with the update gives the update."""
    r = run(history)
    i = data.draw(replica_ids)
    local = r.clocks[i]
    client = new(-1) if data.draw(st.booleans()) else new_with_context(join(pick(data, r)), -1)
    updated = update_with(client, local, r.actors[i])
    assert sync(local, updated) == updated == sync(updated, local)


@given(histories, st.data())
def test_writes_without_context_are_all_kept(history: list[Op], data: st.DataObject) -> None:
    r = run(history)
    i = data.draw(replica_ids)
    j = data.draw(replica_ids)
    first = update_with(new(-1), r.clocks[i], r.actors[i])
    # the same coordinator again, and another coordinator concurrently
    again = update_with(new(-2), first, r.actors[i])
    assert sorted(values(again)) == sorted([-2, -1, *values(r.clocks[i])])
    if i != j:
        other = update_with(new(-2), r.clocks[j], r.actors[j])
        merged = sync(first, other)
        assert sorted(values(merged)) == sorted([-2, -1, *values(sync(r.clocks[i], r.clocks[j]))])


# -- sync laws --------------------------------------------------------------------------


@given(histories, st.data())
def test_sync_is_commutative(history: list[Op], data: st.DataObject) -> None:
    r = run(history)
    a, b = pick(data, r), pick(data, r)
    assert sync(a, b) == sync(b, a)


@given(histories, st.data())
def test_sync_is_associative(history: list[Op], data: st.DataObject) -> None:
    r = run(history)
    a, b, c = pick(data, r), pick(data, r), pick(data, r)
    assert sync(sync(a, b), c) == sync(a, sync(b, c))


@given(histories, st.data())
def test_sync_is_idempotent_and_empty_is_its_identity(
    history: list[Op], data: st.DataObject
) -> None:
    r = run(history)
    a, b = pick(data, r), pick(data, r)
    assert sync(a, a) == a
    assert sync(a, sync(a, b)) == sync(a, b)
    assert sync(empty(), a) == a == sync(a, empty())


@given(histories, st.data())
def test_sync_joins_histories_pointwise(history: list[Op], data: st.DataObject) -> None:
    r = run(history)
    a, b = pick(data, r), pick(data, r)
    ca, cb = dict(join(a)), dict(join(b))
    expected = {actor: max(ca.get(actor, 0), cb.get(actor, 0)) for actor in ca.keys() | cb.keys()}
    assert dict(join(sync(a, b))) == expected


@given(histories, st.data())
def test_less_is_a_strict_order_that_sync_respects(history: list[Op], data: st.DataObject) -> None:
    r = run(history)
    a, b = pick(data, r), pick(data, r)
    assert not less(a, a)
    assert not (less(a, b) and less(b, a))
    if less(a, b):
        assert sync(a, b) == b == sync(b, a)
    merged = sync(a, b)
    assert not less(merged, a)
    assert not less(merged, b)
    # On reachable clocks the history determines the values.
    assert equal(a, b) == (join(a) == join(b)) == (a == b)


# -- prune and lww on reachable clocks --------------------------------------------------


@given(histories, st.data())
def test_prune_drops_only_unkept_values_and_cannot_be_undone_by_sync(
    history: list[Op], data: st.DataObject
) -> None:
    r = run(history)
    c = pick(data, r)
    dropped = data.draw(
        st.frozensets(st.sampled_from(values(c))) if values(c) else st.just(frozenset[int]())
    )

    def keep(v: int) -> bool:
        return v not in dropped

    p = prune(c, keep)
    assert join(p) == join(c)
    assert set(values(p)) <= set(values(c))
    assert not any(keep(v) for v in set(values(c)) - set(values(p)))
    # maximal: an entry keeps a value to drop only above a value to keep
    for e in p.entries:
        assert not e.values or keep(e.values[-1])
    assert sync(p, c) == p == sync(c, p)


@given(histories, st.data())
def test_lww_keeps_the_greatest_value_and_the_history(
    history: list[Op], data: st.DataObject
) -> None:
    r = run(history)
    c = pick(data, r)
    collapsed = lww(c, lambda v: -v)  # the oldest write wins, to exercise non-newest winners
    assert join(collapsed) == join(c)
    assert values(collapsed) == ([min(values(c))] if values(c) else [])
    assert sync(c, collapsed) == collapsed
