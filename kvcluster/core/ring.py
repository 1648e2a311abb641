"""The partition ring: which nodes own which partitions (riak_core's ``chash`` + claim).

Model
-----
Keys hash to one of ``Q`` partitions (:mod:`kvcluster.core.hashing`). Each
partition has an *owner list* of ``min(N, members)`` distinct nodes; its
order matters: index 0 is the partition's first primary, the default
coordinator of its keys, and the preference list (:mod:`kvcluster.core.preflist`)
takes owners in this order. The ring is versioned by an ``epoch`` and agreed
by a majority of members (:mod:`kvcluster.core.agreement`); this module only
computes rings, as pure functions.

Claim: how owner slots are assigned
-----------------------------------
Think of the owners as a ``Q x N`` table of *slots*; column 0 holds the
first primaries. With M members the claim keeps, in this order of priority:

1. **primaries level**: each node leads ``floor(Q/M)`` or ``ceil(Q/M)``
   partitions, so coordination load is even;
2. **slots level**: each node holds ``floor(Q*N/M)`` or ``ceil(Q*N/M)``
   slots, so storage and replication load are even;
3. **replicas spread**: the partitions a node leads have every other node
   second about equally often, and a node shares partitions with every other
   node about equally often. When a node fails, the coordination of its
   partitions (which moves to their second owner) and the reads and writes
   of its replicas then spread over the whole cluster. Successor placement
   ("the next N nodes on the ring", Dynamo's original scheme) would instead
   hand all of it to one or two ring neighbours, doubling their load.

:func:`new_ring` fills the table partition by partition, column by column,
giving each slot to the node not yet in that partition with the fewest slots
in that column, then the fewest slots in total, then the rarest (first,
second) owner pair, then the fewest partitions shared with the partition's
owners; the last ties go to the highest rendezvous weight ``blake2b(node,
partition)``. The layout thus looks random (no neighbour structure) but is a
pure function of (member set, Q, N). Finally, where greedy left slot counts
more than one apart, :func:`_level` moves non-primary slots along augmenting
chains (as in bipartite matching) until they are level.

Membership changes move as little data as possible (Dynamo's strategy 3:
fixed, equal partitions; only ownership moves):

* :func:`add_member` only *takes* slots for the new node: every slot keeps
  its node and position or now holds the new node. It takes primaries from
  the member with the most until primaries are level, then other slots from
  the member with the most slots until slots are level, each time picking
  among that member's slots (a window of candidates in rendezvous order) by
  the spread criteria above. Taking always from a busiest member keeps a
  level ring level. Below N members every member owns every partition, so
  the new node joins every partition: in some it takes the place of the
  member with the most slots in that column (which moves to the new last
  place), so that primaries stay level and the other columns nearly so.
* :func:`remove_member` only *gives away* the leaving node's slots:
  partitions it did not own are untouched and every other owner keeps its
  partitions. Each slot goes to a non-owner with the fewest slots (then the
  spread criteria), augmenting chains among those slots level the counts,
  and then owners of the affected partitions swap places (a role change, no
  data moves) along chains to level primaries and the other columns. When
  the ring drops below N members the owner lists get one shorter instead.

New rings are exactly level (checked for up to 16 members and 1024
partitions). After joins and leaves the greedy choice can be one off in
small corners (a slot's only eligible nodes are busy ones), so primaries and
slots stay within ``ceil + 1``, which the property tests check for any
sequence of joins and leaves. Computing a 64-partition ring takes about a
millisecond; 65536 partitions take seconds (joins and leaves weigh a bounded
window of candidate partitions per slot).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvcluster.core.hashing import check_partition_count

__all__ = [
    "NodeId",
    "Ring",
    "add_member",
    "new_ring",
    "remove_member",
]

NodeId = str
"""A node's stable, unique name (non-empty)."""

_WINDOW = 48
"""How many candidate partitions of a donor a join weighs per slot it takes."""

_RING_KEYS = frozenset({"epoch", "q", "n", "members", "owners"})


@dataclass(frozen=True, slots=True)
class Ring:
    """One version of the partition ring. Always valid: construction calls :meth:`validate`.

    ``owners[p]`` is the owner list of partition ``p``: ``min(n, len(members))``
    distinct members, first primary first.
    """

    epoch: int
    q: int
    n: int
    members: tuple[NodeId, ...]
    owners: tuple[tuple[NodeId, ...], ...]

    def __post_init__(self) -> None:
        self.validate()

    @property
    def replicas(self) -> int:
        """Owners per partition: ``min(n, len(members))``."""
        return min(self.n, len(self.members))

    def owners_of(self, partition: int) -> tuple[NodeId, ...]:
        """The owner list of ``partition``, first primary first."""
        self._check_partition(partition)
        return self.owners[partition]

    def primary_of(self, partition: int) -> NodeId:
        """The first owner of ``partition`` (its default coordinator)."""
        return self.owners_of(partition)[0]

    def partitions_of(self, node: NodeId) -> tuple[int, ...]:
        """The partitions ``node`` owns a slot of, ascending (empty for a non-member)."""
        return tuple(p for p, row in enumerate(self.owners) if node in row)

    def ownership_counts(self) -> dict[NodeId, int]:
        """Owner slots held by each member (every member present, possibly with 0)."""
        counts = dict.fromkeys(self.members, 0)
        for row in self.owners:
            for node in row:
                counts[node] += 1
        return counts

    def primary_counts(self) -> dict[NodeId, int]:
        """Partitions each member is first owner of (every member present)."""
        counts = dict.fromkeys(self.members, 0)
        for row in self.owners:
            counts[row[0]] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (for persistence and the admin API); see :meth:`from_dict`."""
        return {
            "epoch": self.epoch,
            "q": self.q,
            "n": self.n,
            "members": list(self.members),
            "owners": [list(row) for row in self.owners],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ring:
        """Rebuild a ring from :meth:`to_dict`; ValueError describes what is wrong."""
        if not isinstance(d, Mapping):
            raise ValueError(f"ring must be a mapping, got {type(d).__name__}")
        missing = sorted(_RING_KEYS - d.keys())
        if missing:
            raise ValueError(f"ring has missing keys {missing}")
        unknown = sorted(str(k) for k in d.keys() - _RING_KEYS)
        if unknown:
            raise ValueError(f"ring has unknown keys {unknown}")
        members = d["members"]
        owners = d["owners"]
        if not isinstance(members, list | tuple):
            raise ValueError("ring members must be a list of node ids")
        if not isinstance(owners, list | tuple) or not all(
            isinstance(row, list | tuple) for row in owners
        ):
            raise ValueError("ring owners must be a list of lists of node ids")
        return cls(
            epoch=d["epoch"],
            q=d["q"],
            n=d["n"],
            members=tuple(members),
            owners=tuple(tuple(row) for row in owners),
        )

    def validate(self) -> None:
        """Raise ValueError naming the first broken invariant of this ring."""
        _check_int("epoch", self.epoch, 0)
        check_partition_count(self.q)
        _check_int("n", self.n, 1)
        if not isinstance(self.members, tuple):
            raise ValueError(f"ring members must be a tuple, got {type(self.members).__name__}")
        if not self.members:
            raise ValueError("ring has no members")
        for node in self.members:
            _check_node_id(node)
        if list(self.members) != sorted(set(self.members)):
            raise ValueError(f"ring members must be sorted and distinct: {list(self.members)}")
        if not isinstance(self.owners, tuple) or not all(isinstance(r, tuple) for r in self.owners):
            raise ValueError("ring owners must be a tuple of tuples")
        if len(self.owners) != self.q:
            raise ValueError(f"ring has {len(self.owners)} owner lists for {self.q} partitions")
        known = frozenset(self.members)
        width = self.replicas
        for p, row in enumerate(self.owners):
            if not all(isinstance(node, str) for node in row):
                raise ValueError(f"partition {p} has an owner that is not a node id: {list(row)}")
            if len(row) != width:
                raise ValueError(
                    f"partition {p} has {len(row)} owners, expected min(n={self.n}, "
                    f"members={len(self.members)}) = {width}"
                )
            for node in row:
                if node not in known:
                    raise ValueError(f"partition {p} is owned by unknown member {node!r}")
            if len(set(row)) != len(row):
                raise ValueError(f"partition {p} lists an owner twice: {list(row)}")

    def _check_partition(self, partition: int) -> None:
        if isinstance(partition, bool) or not isinstance(partition, int):
            raise ValueError(f"partition must be an int, got {partition!r}")
        if not 0 <= partition < self.q:
            raise ValueError(f"partition {partition} out of range 0..{self.q - 1}")


# -- claim ---------------------------------------------------------------------------------


def new_ring(members: Iterable[NodeId], q: int = 64, n: int = 3, epoch: int = 1) -> Ring:
    """A balanced ring of ``q`` partitions with ``min(n, len(members))`` owners each.

    Deterministic: the same member set, ``q`` and ``n`` always give the same ring
    (the order ``members`` are given in does not matter).
    """
    given = list(members)
    for node in given:
        _check_node_id(node)
    nodes = tuple(sorted(given))
    if not nodes:
        raise ValueError("a ring needs at least one member")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"duplicate member ids: {list(nodes)}")
    check_partition_count(q)
    _check_int("n", n, 1)
    _check_int("epoch", epoch, 0)
    width = min(n, len(nodes))
    board = _Board(nodes, [[] for _ in range(q)], width)
    for p in range(q):
        weight = {x: _weight(x, p) for x in nodes}
        for c in range(width):
            board.put(p, c, _first_choice(board, p, c, weight))
    board.level(nodes, lambda p, c: c > 0)
    return Ring(epoch, q, n, nodes, board.freeze())


def add_member(ring: Ring, node: NodeId) -> Ring:
    """``ring`` with ``node`` added (epoch + 1), taking only the slots it must take.

    Every slot either keeps its node and position or now holds ``node``. Raises
    ValueError if ``node`` is already a member.
    """
    _check_node_id(node)
    if node in ring.members:
        raise ValueError(f"{node!r} is already a member of the ring")
    members = tuple(sorted((*ring.members, node)))
    if min(ring.n, len(members)) > ring.replicas:
        owners = _join_every_partition(ring, node)
    else:
        owners = _take_slots(ring, node, members)
    return Ring(ring.epoch + 1, ring.q, ring.n, members, owners)


def remove_member(ring: Ring, node: NodeId) -> Ring:
    """``ring`` without ``node`` (epoch + 1); only ``node``'s slots change hands.

    Partitions ``node`` did not own are unchanged. In each partition it owned,
    one node not yet owning it takes its slot and every other owner keeps the
    partition; the owners of such a partition may swap places (a role change,
    no data moves) to keep primaries level. When the ring drops below ``n``
    members the owner lists get one shorter instead. Raises ValueError for a
    non-member or the last member.
    """
    if node not in ring.members:
        raise ValueError(f"{node!r} is not a member of the ring")
    if len(ring.members) == 1:
        raise ValueError(f"cannot remove {node!r}: it is the ring's only member")
    members = tuple(x for x in ring.members if x != node)
    if min(ring.n, len(members)) < ring.replicas:
        owners = _leave_every_partition(ring, node, members)
    else:
        owners = _give_slots(ring, node, members)
    return Ring(ring.epoch + 1, ring.q, ring.n, members, owners)


# -- claim internals -----------------------------------------------------------------------

_Move = TypeVar("_Move")
_Slot = tuple[int, int]
"""(partition, column) of an owner slot."""


def _weight(node: NodeId, salt: int | str) -> int:
    """A pseudo-random but fixed 64-bit weight of ``node`` for ``salt`` (tie-breaks)."""
    data = f"{node}\x00{salt}".encode()
    digest = hashlib.blake2b(data, digest_size=8, person=b"kvcluster.claim").digest()
    return int.from_bytes(digest, "big")


class _Board:
    """A mutable working copy of an owner table and the counters claim decisions use.

    ``total[x]``: slots of x; ``column[c][x]``: slots of x in column c;
    ``pair[x][y]``: partitions owned by both x and y; ``after[x][y]``:
    partitions led by x with y second (y coordinates them when x is down);
    ``where[x]``: the slots of x (a dict as an insertion-ordered set, so
    iteration order is deterministic).
    """

    def __init__(self, members: Sequence[NodeId], rows: list[list[NodeId]], width: int) -> None:
        self.rows = rows
        self.total = dict.fromkeys(members, 0)
        self.column = [dict.fromkeys(members, 0) for _ in range(width)]
        self.pair = {x: dict.fromkeys(members, 0) for x in members}
        self.after = {x: dict.fromkeys(members, 0) for x in members}
        self.where: dict[NodeId, dict[_Slot, None]] = {x: {} for x in members}
        for p, row in enumerate(rows):
            self._follow(row, 1)
            for c, x in enumerate(row):
                self.total[x] += 1
                self.column[c][x] += 1
                self.where[x][p, c] = None
                for y in row:
                    if y != x:
                        self.pair[x][y] += 1

    def freeze(self) -> tuple[tuple[NodeId, ...], ...]:
        return tuple(tuple(row) for row in self.rows)

    def shared(self, node: NodeId, p: int, without: NodeId | None = None) -> int:
        """How many partitions ``node`` already shares with the owners of ``p``."""
        pair = self.pair[node]
        return sum(pair[y] for y in self.rows[p] if y not in (without, node))

    def follows(self, p: int, c: int, node: NodeId) -> int:
        """How often the (first, second) owner pair made by ``node`` at ``(p, c)`` exists."""
        row = self.rows[p]
        if c == 0:
            return self.after[node][row[1]] if len(row) > 1 else 0
        return self.after[row[0]][node] if c == 1 else 0

    def _follow(self, row: Sequence[NodeId], delta: int) -> None:
        if len(row) > 1:
            self.after[row[0]][row[1]] += delta

    def put(self, p: int, c: int, node: NodeId) -> None:
        """Give slot ``(p, c)`` to ``node``, replacing its holder (or appending column ``c``)."""
        row = self.rows[p]
        self._follow(row, -1)
        if c < len(row):
            old = row[c]
            self.total[old] -= 1
            self.column[c][old] -= 1
            del self.where[old][p, c]
            for y in row:
                if y != old:
                    self.pair[old][y] -= 1
                    self.pair[y][old] -= 1
            row[c] = node
        else:
            row.append(node)
        self.total[node] += 1
        self.column[c][node] += 1
        self.where[node][p, c] = None
        for y in row:
            if y != node:
                self.pair[node][y] += 1
                self.pair[y][node] += 1
        self._follow(row, 1)

    def swap(self, p: int, i: int, j: int) -> None:
        """Exchange the places of two owners of partition ``p`` (a role change only)."""
        row = self.rows[p]
        a, b = row[i], row[j]
        self._follow(row, -1)
        for node, old, new in ((a, i, j), (b, j, i)):
            self.column[old][node] -= 1
            self.column[new][node] += 1
            del self.where[node][p, old]
        row[i], row[j] = b, a
        self.where[a][p, j] = None
        self.where[b][p, i] = None
        self._follow(row, 1)

    def level(self, nodes: Sequence[NodeId], movable: Callable[[int, int], bool]) -> None:
        """Even out slot counts over ``nodes`` by handing ``movable`` slots on.

        A step moves a slot of ``x`` to a node not owning that partition yet.
        """

        def steps(x: NodeId) -> Iterator[tuple[_Slot, NodeId]]:
            for p, c in self.where[x]:
                if movable(p, c):
                    row = self.rows[p]
                    yield from (((p, c), y) for y in nodes if y not in row)

        def apply(slot: _Slot, y: NodeId) -> None:
            self.put(*slot, y)

        _level(self.total, nodes, steps, apply)

    def level_column(self, nodes: Sequence[NodeId], rows: frozenset[int], c: int) -> None:
        """Even out column ``c`` over ``nodes`` by swapping owners' places within ``rows``.

        A step swaps ``x`` at column ``c`` of a partition with an owner further
        back, so columns before ``c`` keep their counts.
        """

        def steps(x: NodeId) -> Iterator[tuple[int, NodeId]]:
            for p, col in self.where[x]:
                if col == c and p in rows:
                    yield from ((p, y) for y in self.rows[p][c + 1 :])

        def apply(p: int, y: NodeId) -> None:
            self.swap(p, c, self.rows[p].index(y))

        _level(self.column[c], nodes, steps, apply)


def _level(
    count: Mapping[NodeId, int],
    nodes: Sequence[NodeId],
    steps: Callable[[NodeId], Iterable[tuple[_Move, NodeId]]],
    apply: Callable[[_Move, NodeId], None],
) -> None:
    """Augmenting paths, as in bipartite matching: shift load until no chain remains.

    A chain ``x0 -> x1 -> ... -> xk`` starts at a node with the highest
    ``count`` and ends at one with at least two less; each step is a move
    (from ``steps``) that takes one unit from ``xi`` and gives it to
    ``xi+1``. Applying it lowers ``x0``, raises ``xk`` and leaves the nodes
    between unchanged. The shortest chain is found breadth-first; every chain
    lowers the sum of squared counts, so this ends.
    """
    while True:
        top = max(count[x] for x in nodes)
        if top - min(count[x] for x in nodes) <= 1:
            return
        came: dict[NodeId, tuple[_Move, NodeId] | None] = {
            x: None for x in nodes if count[x] == top
        }
        queue = deque(came)
        end: NodeId | None = None
        while queue and end is None:
            x = queue.popleft()
            for move, y in steps(x):
                if y not in came:
                    came[y] = (move, x)
                    if count[y] <= top - 2:
                        end = y
                        break
                    queue.append(y)
        if end is None:
            return
        step = came[end]
        while step is not None:
            apply(step[0], end)
            end = step[1]
            step = came[end]


class _Slots:
    """Each node's slots per column in a fixed pseudo-random order, pruned lazily."""

    def __init__(self, rows: Sequence[Sequence[NodeId]], order: Callable[[int], int]) -> None:
        self._lists: dict[tuple[NodeId, int], list[int]] = {}
        for p in sorted(range(len(rows)), key=order):
            for c, x in enumerate(rows[p]):
                self._lists.setdefault((x, c), []).append(p)

    def first(self, node: NodeId, c: int, usable: Callable[[int], bool], limit: int) -> list[int]:
        """Up to ``limit`` partitions with ``node`` at column ``c`` that are ``usable``.

        Entries found unusable are dropped: callers only ask for conditions
        that, once false, stay false for the rest of the claim.
        """
        entries = self._lists.get((node, c), [])
        found: list[int] = []
        i = 0
        while i < len(entries) and len(found) < limit:
            if usable(entries[i]):
                found.append(entries[i])
            i += 1
        entries[:i] = found
        return found


def _first_choice(board: _Board, p: int, c: int, weight: Mapping[NodeId, int]) -> NodeId:
    """new_ring's pick for slot ``(p, c)``, by the criteria in the module docstring."""
    row = board.rows[p]
    column, total = board.column[c], board.total

    def cost(x: NodeId) -> tuple[int, int, int, int, int]:
        return (column[x], total[x], board.follows(p, c, x), board.shared(x, p), -weight[x])

    return min((x for x in weight if x not in row), key=cost)


def _take_slots(
    ring: Ring, node: NodeId, members: tuple[NodeId, ...]
) -> tuple[tuple[NodeId, ...], ...]:
    """Join keeping the owner-list length: ``node`` takes slots from the busiest members."""
    board = _Board(members, [list(row) for row in ring.owners], ring.replicas)
    rows, total, first = board.rows, board.total, board.column[0]
    weight = {p: _weight(node, p) for p in range(ring.q)}
    slots = _Slots(rows, lambda p: -weight[p])
    tie = {x: _weight(x, node) for x in ring.members}

    def cost(slot: _Slot) -> tuple[int, int, int, int]:
        p, c = slot
        donor = rows[p][c]
        need = board.column[c][node] - board.column[c][donor]
        return (need, board.follows(p, c, node), board.shared(node, p, donor), -weight[p])

    def usable(donor: NodeId, c: int) -> Callable[[int], bool]:
        return lambda p: rows[p][c] == donor and node not in rows[p]

    # Primaries first, from the member with the most, until level. (The new
    # node holds only primaries meanwhile, so it is in none of the donor's rows.)
    while True:
        donor = max(ring.members, key=lambda x: (first[x], total[x], tie[x]))
        if first[donor] <= first[node] + 1:
            break
        candidates = [(p, 0) for p in slots.first(donor, 0, usable(donor, 0), _WINDOW)]
        board.put(*min(candidates, key=cost), node)

    # Then other slots, from the member with the most that has one to give, until level.
    while True:
        choice: _Slot | None = None
        for donor in sorted(ring.members, key=lambda x: (-total[x], -tie[x])):
            if total[donor] <= total[node] + 1:
                break
            candidates = [
                (p, c)
                for c in range(1, ring.replicas)
                for p in slots.first(donor, c, usable(donor, c), _WINDOW)
            ]
            if candidates:
                choice = min(candidates, key=cost)
                break
        if choice is None:
            return board.freeze()
        board.put(*choice, node)


def _join_every_partition(ring: Ring, node: NodeId) -> tuple[tuple[NodeId, ...], ...]:
    """Join when the ring had fewer than n members: ``node`` joins every partition.

    Column by column, in some partitions it takes the place of the member
    with the most slots in that column (which moves to the new last column;
    among equals, the one moved least so far), until the column is level; in
    the other partitions it takes the new last column.
    """
    rows = [list(row) for row in ring.owners]
    weight = {p: _weight(node, p) for p in range(ring.q)}
    slots = _Slots(rows, lambda p: -weight[p])
    tie = {x: _weight(x, node) for x in ring.members}
    moved = dict.fromkeys(ring.members, 0)
    joined = [False] * ring.q

    def free(p: int) -> bool:
        return not joined[p]

    for c in range(ring.replicas):
        column = dict.fromkeys(ring.members, 0)
        for row in rows:
            column[row[c]] += 1
        mine = 0
        donors = set(ring.members)
        while donors:
            donor = min(donors, key=lambda x: (-column[x], moved[x], -tie[x]))
            if column[donor] <= mine + 1:
                break
            found = slots.first(donor, c, free, 1)
            if not found:  # the partitions where it holds column c are all joined
                donors.remove(donor)
                continue
            p = found[0]
            rows[p].append(donor)
            rows[p][c] = node
            joined[p] = True
            column[donor] -= 1
            moved[donor] += 1
            mine += 1
    for p, row in enumerate(rows):
        if not joined[p]:
            row.append(node)
    return tuple(tuple(row) for row in rows)


def _give_slots(
    ring: Ring, node: NodeId, members: tuple[NodeId, ...]
) -> tuple[tuple[NodeId, ...], ...]:
    """Leave keeping the owner-list length: each slot goes to a least loaded non-owner."""
    board = _Board(ring.members, [list(row) for row in ring.owners], ring.replicas)
    mine = sorted(
        ((p, row.index(node)) for p, row in enumerate(ring.owners) if node in row),
        key=lambda slot: -_weight(node, slot[0]),
    )
    for p, c in mine:
        board.put(p, c, _heir(board, p, c, node, members))
    moved = frozenset(mine)
    board.level(members, lambda p, c: (p, c) in moved)
    touched = frozenset(p for p, _ in mine)
    for c in range(ring.replicas - 1):
        board.level_column(members, touched, c)
    return board.freeze()


def _heir(board: _Board, p: int, c: int, leaving: NodeId, members: Sequence[NodeId]) -> NodeId:
    """The member to take the leaving node's slot ``(p, c)``."""
    row = board.rows[p]

    def cost(x: NodeId) -> tuple[int, int, int, int]:
        spread = board.shared(x, p, leaving)
        return (board.total[x], board.follows(p, c, x), spread, -_weight(x, p))

    return min((x for x in members if x not in row), key=cost)


def _leave_every_partition(
    ring: Ring, node: NodeId, members: tuple[NodeId, ...]
) -> tuple[tuple[NodeId, ...], ...]:
    """Leave when the ring drops below n members: the owner lists get one shorter.

    The last owner of each partition takes ``node``'s place; then, as every
    remaining member owns every partition, owners swap places to level the columns.
    """
    rows: list[list[NodeId]] = []
    for row in ring.owners:
        rest = list(row)
        last = rest.pop()
        if last != node:
            rest[rest.index(node)] = last
        rows.append(rest)
    board = _Board(members, rows, len(members))
    everywhere = frozenset(range(ring.q))
    for c in range(len(members) - 1):
        board.level_column(members, everywhere, c)
    return board.freeze()


# -- validation helpers --------------------------------------------------------------------


def _check_node_id(node: object) -> None:
    if not isinstance(node, str) or not node:
        raise ValueError(f"a node id must be a non-empty string, got {node!r}")
    try:
        node.encode()
    except UnicodeEncodeError:
        raise ValueError(f"a node id must be valid unicode text, got {node!r}") from None


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
