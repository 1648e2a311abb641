"""Preference lists: the nodes a request for a key goes to (riak_core's ``apl``).

The preference list of a key is computed from its partition's owner list
(:class:`~kvcluster.core.ring.Ring`) and the set of nodes currently believed
up, as a pure function:

* each of the first ``n`` owners that is up is a **primary** target, in owner
  order;
* each of those owners that is down is replaced by the next unused up
  **fallback**, which stores the data with a hint naming the owner it stands
  in for (``hint_for``) and hands it back when the owner returns (hinted
  handoff, Dynamo's sloppy quorum);
* with ``strict=True`` (Riak's PR/PW) fallbacks are never used: only the up
  primaries are returned, and the caller fails if they are too few.

Fallbacks are taken in :func:`fallback_order`: walking the ring clockwise
from the partition (partition ``p + 1``, ``p + 2``, ...), each owner of
each partition in turn, skipping the partition's own owners and repeats —
Dynamo's "skip to the next distinct node on the ring", Riak's apl. Because
the claim (:mod:`kvcluster.core.ring`) lays owners out pseudo-randomly, the
walk reaches different nodes first from different partitions, so the
fallbacks for a failed node's partitions spread over the whole cluster.
Members that own no partition at all (possible only when ``Q * N`` is smaller
than the member count) come last, rotated by partition.

The walk is lazy: a preference list with every owner up never walks.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from itertools import chain

from kvcluster.core.hashing import partition_of
from kvcluster.core.ring import NodeId, Ring

__all__ = [
    "Target",
    "fallback_order",
    "preference_list",
    "preference_list_for_partition",
]


@dataclass(frozen=True, slots=True)
class Target:
    """One node a request goes to.

    ``primary`` targets are owners of the partition (``hint_for`` is None); a
    fallback (``primary=False``) stands in for the down owner ``hint_for``.
    """

    node: NodeId
    primary: bool
    hint_for: NodeId | None = None

    def __post_init__(self) -> None:
        if self.primary and self.hint_for is not None:
            raise ValueError(f"primary target {self.node!r} cannot hold a hint")
        if not self.primary and self.hint_for is None:
            raise ValueError(f"fallback target {self.node!r} must name the owner it stands in for")
        if self.hint_for == self.node:
            raise ValueError(f"fallback target {self.node!r} cannot stand in for itself")


def fallback_order(ring: Ring, partition: int) -> tuple[NodeId, ...]:
    """Every member that does not own ``partition``, in the order fallbacks are taken."""
    return tuple(_walk(ring, partition))


def preference_list(
    key: bytes,
    ring: Ring,
    n: int,
    up_nodes: Collection[NodeId],
    *,
    strict: bool = False,
) -> tuple[Target, ...]:
    """The targets for ``key``: see :func:`preference_list_for_partition`."""
    return preference_list_for_partition(
        partition_of(key, ring.q), ring, n, up_nodes, strict=strict
    )


def preference_list_for_partition(
    partition: int,
    ring: Ring,
    n: int,
    up_nodes: Collection[NodeId],
    *,
    strict: bool = False,
) -> tuple[Target, ...]:
    """The targets for ``partition``: up primaries in owner order, then fallbacks.

    The first ``n`` owners are the primaries (fewer if the ring has fewer
    members). Each up one is a primary target; for each down one (in owner
    order) the next up node in the fallback order becomes a target with
    ``hint_for`` set to that owner. The fallback order is the partition's
    owners after the first ``n`` (when ``n < ring.n``), then
    :func:`fallback_order`. No node appears twice; a down node never appears.
    If too few nodes are up the list is shorter than ``n``. With ``strict``
    only the up primaries are returned.

    Raises ValueError unless ``1 <= n <= ring.n`` or if ``partition`` is out of range.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= ring.n:
        raise ValueError(f"n must be between 1 and the ring's n={ring.n}, got {n!r}")
    owners = ring.owners_of(partition)
    primaries = owners[:n]
    targets = [Target(node, True) for node in primaries if node in up_nodes]
    down = [node for node in primaries if node not in up_nodes]
    if strict or not down:
        return tuple(targets)
    spares = (node for node in chain(owners[n:], _walk(ring, partition)) if node in up_nodes)
    for owner in down:
        spare = next(spares, None)
        if spare is None:
            break
        targets.append(Target(spare, False, owner))
    return tuple(targets)


def _walk(ring: Ring, partition: int) -> Iterator[NodeId]:
    """Members not owning ``partition``: owners clockwise from ``partition + 1``, then the rest."""
    own = ring.owners_of(partition)
    seen = set(own)
    wanted = len(ring.members)
    for i in range(1, ring.q):
        if len(seen) == wanted:
            return
        for node in ring.owners[(partition + i) % ring.q]:
            if node not in seen:
                seen.add(node)
                yield node
    rest = [node for node in ring.members if node not in seen]
    if rest:
        shift = partition % len(rest)
        yield from rest[shift:] + rest[:shift]
