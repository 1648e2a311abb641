"""Dotted version vector sets: a key's sibling values with their causal history.

A Python port of the semantics of Riak's ``dvvset.erl`` (Gonçalves, Almeida et
al., "Dotted Version Vectors: Logical Clocks for Optimistic Replication"),
immutable and generic over the value type.

Model
-----
Every write is an *event* with a unique *dot* ``(actor, n)``: the ``n``-th
event coordinated by ``actor`` for this key. A :class:`Clock` stores, per
actor, an :class:`Entry` ``(actor, counter, values)`` meaning "every dot
``(actor, 1..counter)`` is known; the ``len(values)`` newest of them still
hold a value": ``values[i]`` has the implicit dot ``(actor, counter - i)``
and older dots were superseded. The *anonymous* values of a clock have no dot
yet; they only occur in a client's clock (from :func:`new` /
:func:`new_with_context`) before :func:`update` / :func:`update_with` turns
the value into an event, and in the result of :func:`lww`.

How the database uses it::

    coordinator put(v, context vv):  update_with(new_with_context(vv, v), local, actor)
    coordinator put(v) w/o context:  update_with(new(v), local, actor)
    any other replica:               sync(local, incoming)
    read:                            merged = sync_all(replies); values(merged), join(merged)

Invariants the caller must keep (the store does, with per-key actor epochs):
a dot names one value everywhere, so an actor never creates a dot it has
already used, and it creates ``(actor, n + 1)`` only on a clock that already
covers ``(actor, n)``. :func:`sync` is commutative, associative and idempotent
on clocks produced that way; it is not on arbitrary clocks (two clocks giving
one dot different values, or holding anonymous values, see :func:`sync`).

Like the Erlang original, comparisons (:func:`less`, :func:`equal`) look only
at causal histories, never at values. Unlike it, an actor that is missing from
a clock counts as counter 0, so an entry ``(actor, 0, ())`` is causally the
same as no entry (``dvvset.erl`` would call such a clock greater).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

__all__ = [
    "Actor",
    "Clock",
    "Entry",
    "VersionVector",
    "empty",
    "equal",
    "join",
    "less",
    "lww",
    "new",
    "new_with_context",
    "prune",
    "size",
    "sync",
    "sync_all",
    "unchecked_clock",
    "unchecked_entry",
    "update",
    "update_with",
    "validate_vector",
    "values",
]


class Orderable(Protocol):
    """What a sort key must support (``<``)."""

    def __lt__(self, other: Any, /) -> bool: ...


class Value(Orderable, Protocol):
    """What a clock's values must support: ordering (canonical form) and hashing."""

    def __hash__(self) -> int: ...


V = TypeVar("V", bound=Value)

Actor: TypeAlias = str
#: ``((actor, counter), ...)`` sorted by actor, unique actors: a causal context.
VersionVector: TypeAlias = tuple[tuple[Actor, int], ...]


@dataclass(frozen=True, slots=True)
class Entry(Generic[V]):
    """The dots of one actor: ``(actor, 1..counter)`` are known, and
    ``values[i]`` (newest first) is the value of dot ``(actor, counter - i)``."""

    actor: Actor
    counter: int
    values: tuple[V, ...] = ()

    # unchecked_entry skips these checks: its callers (here and in
    # kvcluster.core.record.decode_record) ensure them. Keep them in step.
    def __post_init__(self) -> None:
        if self.counter < 0:
            raise ValueError(f"negative counter {self.counter} for actor {self.actor!r}")
        if len(self.values) > self.counter:
            raise ValueError(
                f"actor {self.actor!r} has {len(self.values)} values but counter {self.counter}"
            )


@dataclass(frozen=True, slots=True)
class Clock(Generic[V]):
    """A set of sibling values with their causal history, in canonical form:
    entries sorted by actor with unique actors, anonymous values sorted and
    unique. Equal clocks are therefore ``==`` (and encode to equal bytes)."""

    entries: tuple[Entry[V], ...] = ()
    anonymous: tuple[V, ...] = ()

    # unchecked_clock skips these checks: its callers (here and in
    # kvcluster.core.record.decode_record) ensure them. Keep them in step.
    def __post_init__(self) -> None:
        entries = self.entries
        for i in range(1, len(entries)):
            if not entries[i - 1].actor < entries[i].actor:
                raise ValueError("clock entries must be sorted by actor with unique actors")
        anonymous = self.anonymous
        for i in range(1, len(anonymous)):
            if not anonymous[i - 1] < anonymous[i]:
                raise ValueError("anonymous values must be sorted and unique")


_EMPTY: Clock[Any] = Clock()

# Building entries and clocks whose invariants the caller has just checked,
# without __init__ / __post_init__ (frozen dataclass construction is a third
# of a microsecond; hot paths build several per key).
_new = object.__new__
_set_actor = Entry.__dict__["actor"].__set__
_set_counter = Entry.__dict__["counter"].__set__
_set_values = Entry.__dict__["values"].__set__
_set_entries = Clock.__dict__["entries"].__set__
_set_anonymous = Clock.__dict__["anonymous"].__set__


def unchecked_entry(actor: Actor, counter: int, values: tuple[V, ...] = ()) -> Entry[V]:
    """``Entry(actor, counter, values)`` for a caller that has checked
    ``0 <= len(values) <= counter`` itself."""
    entry: Entry[V] = _new(Entry)
    _set_actor(entry, actor)
    _set_counter(entry, counter)
    _set_values(entry, values)
    return entry


def unchecked_clock(entries: tuple[Entry[V], ...], anonymous: tuple[V, ...] = ()) -> Clock[V]:
    """``Clock(entries, anonymous)`` for a caller that has checked the canonical
    order itself (entries by actor, unique; anonymous values sorted, unique)."""
    clock: Clock[V] = _new(Clock)
    _set_entries(clock, entries)
    _set_anonymous(clock, anonymous)
    return clock


# -- construction ---------------------------------------------------------------------


def empty() -> Clock[V]:
    """The clock of a key that was never written."""
    return _EMPTY


def new(value: V) -> Clock[V]:
    """A client clock for a write without context: one anonymous value, no history."""
    return Clock((), (value,))


def new_with_context(vv: VersionVector, value: V) -> Clock[V]:
    """A client clock for a write with causal context ``vv`` (a :func:`join` result).

    Raises ValueError if ``vv`` is not sorted by actor with unique actors or has
    a negative counter. Zero counters carry no history and are dropped.
    """
    validate_vector(vv)  # sorted, unique actors, counters >= 0: the entries below are valid
    return unchecked_clock(tuple([unchecked_entry(actor, n) for actor, n in vv if n]), (value,))


def validate_vector(vv: VersionVector) -> None:
    """Raise ValueError unless ``vv`` is sorted by actor, with unique actors and
    non-negative integer counters."""
    previous: str | None = None
    for actor, n in vv:
        if type(actor) is not str or type(n) is not int:
            raise ValueError(f"version vector item ({actor!r}, {n!r}) is not (str, int)")
        if n < 0:
            raise ValueError(f"negative counter {n} for actor {actor!r}")
        if previous is not None and not previous < actor:
            raise ValueError("version vector must be sorted by actor with unique actors")
        previous = actor


# -- events ---------------------------------------------------------------------------


def update(clock: Clock[V], actor: Actor) -> Clock[V]:
    """Make the single anonymous value of a client clock an event of ``actor``.

    ``clock`` must come from :func:`new` / :func:`new_with_context` (ValueError
    otherwise). Use it only when the clock's history already contains all that
    ``actor`` has done for the key; a coordinator normally wants :func:`update_with`.
    """
    value = _single_anonymous(clock)
    return Clock(_event(clock.entries, actor, value), ())


def update_with(new_clock: Clock[V], local: Clock[V], actor: Actor) -> Clock[V]:
    """Apply a client write at the coordinator ``actor`` whose stored clock is ``local``.

    ``new_clock`` comes from :func:`new` / :func:`new_with_context`. Its history
    (without the value) is synced with ``local``, which discards exactly the
    local values that the client's context had seen; then the value becomes
    the next event of ``actor``. The result is newer than both arguments.
    Anonymous values of the sync remain (Riak's ``update/3``).
    """
    value = _single_anonymous(new_clock)
    # new_clock's entries, sync and _event all keep the canonical order: unchecked
    synced = sync(unchecked_clock(new_clock.entries), local)
    return unchecked_clock(_event(synced.entries, actor, value), synced.anonymous)


def _single_anonymous(clock: Clock[V]) -> V:
    if len(clock.anonymous) != 1:
        raise ValueError(
            f"a client clock holds exactly one anonymous value, got {len(clock.anonymous)}"
        )
    return clock.anonymous[0]


def _event(entries: tuple[Entry[V], ...], actor: Actor, value: V) -> tuple[Entry[V], ...]:
    """``entries`` with ``value`` recorded as the next dot of ``actor``."""
    # len(values) <= counter holds for ``entry``, so also with one more of each
    for i, entry in enumerate(entries):
        if entry.actor == actor:
            bumped = unchecked_entry(actor, entry.counter + 1, (value, *entry.values))
            return (*entries[:i], bumped, *entries[i + 1 :])
        if actor < entry.actor:
            return (*entries[:i], unchecked_entry(actor, 1, (value,)), *entries[i:])
    return (*entries, unchecked_entry(actor, 1, (value,)))


# -- merging --------------------------------------------------------------------------


def sync(a: Clock[V], b: Clock[V]) -> Clock[V]:
    """Merge two replicas' clocks: the union of their histories, keeping each
    value that neither clock has superseded.

    Anonymous values follow ``dvvset.erl``: if one clock's history is strictly
    older, its anonymous values are dropped, otherwise both sets are kept. That
    rule makes sync non-associative on clocks holding anonymous values, which
    stored clocks never do (except after the unsafe :func:`lww`).
    """
    if a.anonymous or b.anonymous:
        if less(a, b):
            anonymous = b.anonymous
        elif less(b, a):
            anonymous = a.anonymous
        else:
            anonymous = tuple(sorted({*a.anonymous, *b.anonymous}))
    else:
        anonymous = ()
    # a sorted merge of canonical entries, and canonical anonymous values
    return unchecked_clock(_sync_entries(a.entries, b.entries), anonymous)


def sync_all(clocks: Iterable[Clock[V]]) -> Clock[V]:
    """:func:`sync` of any number of clocks (:func:`empty` for none)."""
    result: Clock[V] = _EMPTY
    for clock in clocks:
        result = sync(result, clock)
    return result


def _sync_entries(a: tuple[Entry[V], ...], b: tuple[Entry[V], ...]) -> tuple[Entry[V], ...]:
    """Merge two actor-sorted entry tuples (a sorted-merge walk)."""
    if not a:
        return b
    if not b:
        return a
    out: list[Entry[V]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        x, y = a[i], b[j]
        if x.actor < y.actor:
            out.append(x)
            i += 1
        elif y.actor < x.actor:
            out.append(y)
            j += 1
        else:
            out.append(_merge_entry(x, y))
            i += 1
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return tuple(out)


def _merge_entry(x: Entry[V], y: Entry[V]) -> Entry[V]:
    """Merge two entries of one actor.

    The merged entry knows dots up to the larger counter; a dot keeps its
    value only if neither side has superseded it, that is if it lies above
    both sides' superseded prefixes ``counter - len(values)``.
    """
    if x.counter < y.counter:
        x, y = y, x
    superseded = max(x.counter - len(x.values), y.counter - len(y.values))
    keep = x.counter - superseded  # 0 <= keep <= len(x.values) <= x.counter
    if keep == len(x.values):
        return x
    return unchecked_entry(x.actor, x.counter, x.values[:keep])


# -- queries --------------------------------------------------------------------------


def join(clock: Clock[Any]) -> VersionVector:
    """The clock's causal history as a version vector: the context handed to clients."""
    return tuple((e.actor, e.counter) for e in clock.entries)


def values(clock: Clock[V]) -> list[V]:
    """All sibling values: the anonymous ones (in sorted order) first, then per
    entry in actor order, each actor's newest first. Deterministic for a clock."""
    return [*clock.anonymous, *(v for e in clock.entries for v in e.values)]


def size(clock: Clock[Any]) -> int:
    """The number of sibling values (``len(values(clock))``)."""
    return len(clock.anonymous) + sum(len(e.values) for e in clock.entries)


def less(a: Clock[Any], b: Clock[Any]) -> bool:
    """True if ``a``'s history is strictly older than ``b``'s (every counter
    ``<=``, one ``<``), so ``b`` supersedes all of ``a``'s values. Values are
    not compared."""
    return _descends(b, a) and not _descends(a, b)


def _descends(a: Clock[Any], b: Clock[Any]) -> bool:
    """Every counter of ``b`` is at most ``a``'s (missing actors count as 0)."""
    counters = {e.actor: e.counter for e in a.entries}
    return all(e.counter <= counters.get(e.actor, 0) for e in b.entries)


def equal(a: Clock[Any], b: Clock[Any]) -> bool:
    """True if both clocks have the same causal history: per actor the same
    counter and the same number of values (values themselves are not compared)."""
    return _shape(a) == _shape(b)


def _shape(clock: Clock[Any]) -> dict[Actor, tuple[int, int]]:
    return {e.actor: (e.counter, len(e.values)) for e in clock.entries if e.counter}


# -- rewriting values -----------------------------------------------------------------


def prune(clock: Clock[V], keep: Callable[[V], bool]) -> Clock[V]:
    """Drop the values for which ``keep`` is false, keeping the causal history.

    A dropped value counts as superseded, so syncing with a replica that still
    holds it does not bring it back. Because an entry's values must be its
    newest dots, a value can only be dropped from an entry together with all
    older values of that entry: a value that is newer than a kept value of the
    same actor stays (check :func:`values` of the result). Anonymous values are
    dropped freely. A clock left without values may be discarded by the caller.
    """
    entries = tuple(_prune_entry(e, keep) for e in clock.entries)
    anonymous = tuple(v for v in clock.anonymous if keep(v))
    return Clock(entries, anonymous)


def _prune_entry(entry: Entry[V], keep: Callable[[V], bool]) -> Entry[V]:
    n = len(entry.values)
    while n and not keep(entry.values[n - 1]):
        n -= 1
    if n == len(entry.values):
        return entry
    return Entry(entry.actor, entry.counter, entry.values[:n])


def lww(clock: Clock[V], key: Callable[[V], Orderable]) -> Clock[V]:
    """Keep only the value that is greatest by ``key`` (the first such one in
    :func:`values` order), with the whole causal history. UNSAFE: it discards
    concurrent writes; meant only for a deliberately unsafe test mode.

    The winner keeps its dot when it is the newest value of its actor; otherwise
    (it is anonymous, or an older value of an actor, which ``dvvset.erl`` does
    not consider) it becomes the single anonymous value of the clock.
    """
    best: tuple[Orderable, int, int] | None = None  # (key, entry index or -1, position)
    for pos, value in enumerate(clock.anonymous):
        k = key(value)
        if best is None or best[0] < k:
            best = (k, -1, pos)
    for index, entry in enumerate(clock.entries):
        for pos, value in enumerate(entry.values):
            k = key(value)
            if best is None or best[0] < k:
                best = (k, index, pos)
    if best is None:
        return clock
    _, index, pos = best
    if index >= 0 and pos == 0:
        winner = clock.entries[index].values[0]
        entries = tuple(
            Entry(e.actor, e.counter, (winner,) if i == index else ())
            for i, e in enumerate(clock.entries)
        )
        return Clock(entries, ())
    winner = clock.anonymous[pos] if index < 0 else clock.entries[index].values[pos]
    return Clock(tuple(Entry(e.actor, e.counter) for e in clock.entries), (winner,))
