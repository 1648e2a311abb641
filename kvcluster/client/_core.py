"""What the sync and async clients share: validation, messages, routing, errors.

Nothing here performs I/O, so both clients are thin loops around it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvcluster import errors
from kvcluster.client.policies import LoadBalancingPolicy, NodeFailure, NodeHealth
from kvcluster.core.hashing import partition_of
from kvcluster.net.grpc_transport import never_connected
from kvcluster.net.transport import split_address
from kvcluster.node.settings import MAX_KEY_BYTES
from kvcluster.wire.v1 import admin_pb2, kv_pb2

ERROR_KEY = "kvcluster-error-bin"
#: grpc deadline = request timeout + this, so the server's own timeout error
#: (which says how many replicas answered) arrives before the client gives up.
DEADLINE_MARGIN = 0.5

Bytes = bytes | str
Quorum = int | str | None


@dataclass(frozen=True, slots=True)
class ReadResult:
    """The answer to a get: every sibling value and the causal context."""

    found: bool
    values: list[bytes]
    context: bytes

    @property
    def value(self) -> bytes | None:
        """The value when there is exactly one; None when not found.

        Raises ValueError when there are siblings: read ``values`` and write
        back a resolution with ``context``.
        """
        if not self.values:
            return None
        if len(self.values) > 1:
            raise ValueError(f"{len(self.values)} siblings: use .values and resolve them")
        return self.values[0]


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The answer to a put: the new causal context and the siblings it covers."""

    context: bytes
    values: list[bytes] = field(default_factory=list)


def to_bytes(data: Bytes, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise errors.InvalidArgument(f"{what} must be bytes or str, not {type(data).__name__}", what)


def check_key(key: Bytes) -> bytes:
    raw = to_bytes(key, "key")
    if not raw:
        raise errors.InvalidArgument("key must not be empty", "key")
    if len(raw) > MAX_KEY_BYTES:
        raise errors.InvalidArgument(
            f"key is {len(raw)} bytes, the limit is {MAX_KEY_BYTES}", "key"
        )
    return raw


def quorum(value: Quorum, what: str) -> kv_pb2.Quorum:
    if value is None:
        return kv_pb2.Quorum()
    if isinstance(value, bool):
        raise errors.InvalidArgument(f"{what} must be a number or one/quorum/all", what)
    if isinstance(value, int):
        if value < 1:
            raise errors.InvalidArgument(f"{what} must be at least 1, got {value}", what)
        return kv_pb2.Quorum(count=value)
    text = str(value).strip().lower()
    if text.isdigit():
        return quorum(int(text), what)
    levels = {
        "default": kv_pb2.Quorum.LEVEL_DEFAULT,
        "one": kv_pb2.Quorum.LEVEL_ONE,
        "quorum": kv_pb2.Quorum.LEVEL_QUORUM,
        "all": kv_pb2.Quorum.LEVEL_ALL,
    }
    if text not in levels:
        raise errors.InvalidArgument(
            f"{what} must be a number or one, quorum, all; got {value!r}", what
        )
    return kv_pb2.Quorum(level=levels[text])


def timeout_ms(timeout: float) -> int:
    return max(1, int(timeout * 1000))


def get_request(key: Bytes, r: Quorum, strict: bool, timeout: float) -> kv_pb2.GetRequest:
    return kv_pb2.GetRequest(
        key=check_key(key), r=quorum(r, "r"), strict=strict, timeout_ms=timeout_ms(timeout)
    )


def put_request(
    key: Bytes, value: Bytes, context: bytes | None, w: Quorum, strict: bool, timeout: float
) -> kv_pb2.PutRequest:
    return _put_request(key, value, context, quorum(w, "w"), strict, timeout_ms(timeout))


def _put_request(
    key: Bytes, value: Bytes, context: bytes | None, w: kv_pb2.Quorum, strict: bool, ms: int
) -> kv_pb2.PutRequest:
    return kv_pb2.PutRequest(
        key=check_key(key),
        value=to_bytes(value, "value"),
        context=context or b"",
        w=w,
        strict=strict,
        timeout_ms=ms,
    )


PutItem = tuple[Bytes, Bytes] | tuple[Bytes, Bytes, bytes | None]


def put_requests(
    items: Iterable[PutItem], w: Quorum, strict: bool, timeout: float
) -> list[kv_pb2.PutRequest]:
    """Requests for a batch of ``(key, value)`` or ``(key, value, context)`` items."""
    wq = quorum(w, "w")  # once per batch, not per item
    ms = timeout_ms(timeout)
    reqs = []
    for item in items:
        if len(item) not in (2, 3):
            raise errors.InvalidArgument(
                "batch items are (key, value) or (key, value, context)", "items"
            )
        key, value, *rest = item
        reqs.append(_put_request(key, value, rest[0] if rest else None, wq, strict, ms))
    return reqs


def delete_request(
    key: Bytes, context: bytes | None, w: Quorum, r: Quorum, strict: bool, timeout: float
) -> kv_pb2.DeleteRequest:
    return kv_pb2.DeleteRequest(
        key=check_key(key),
        context=context or b"",
        w=quorum(w, "w"),
        r=quorum(r, "r"),
        strict=strict,
        timeout_ms=timeout_ms(timeout),
    )


def read_result(resp: kv_pb2.GetResponse) -> ReadResult:
    return ReadResult(resp.found, list(resp.values), resp.context)


def write_result(resp: kv_pb2.PutResponse) -> WriteResult:
    return WriteResult(resp.context, list(resp.values))


def item_error(err: kv_pb2.ItemError) -> errors.KVError:
    try:
        details = json.loads(err.details_json) if err.details_json else {}
    except ValueError:
        details = {}
    return errors.from_wire(err.kind, err.message, details)


def _metadatum(item: Any) -> tuple[Any, Any]:
    """(key, value) of one metadata item: sync grpc gives objects with .key and
    .value, grpc.aio plain (key, value) tuples."""
    if hasattr(item, "key"):
        return item.key, item.value
    return item[0], item[1]


def translate(exc: grpc.RpcError, address: str) -> Exception:
    """A gRPC failure as a KVError (the server said why) or a NodeFailure."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:
        metadata = ()
    for item in metadata:
        key, value = _metadatum(item)
        if key == ERROR_KEY:
            try:
                obj = json.loads(value)
                kind, message = str(obj.pop("kind")), str(obj.pop("message"))
            except (ValueError, KeyError, TypeError, AttributeError):
                break
            return errors.from_wire(kind, message, obj)
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        # Only a connection that never formed proves the request was not applied;
        # a reset mid-call (a node killed while it worked) may follow the write.
        sent = not never_connected(details or "")
        return NodeFailure(address, f"unreachable ({details})", sent=sent)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return NodeFailure(address, "no answer before the deadline", sent=True)
    if code == grpc.StatusCode.CANCELLED:
        return NodeFailure(address, "call cancelled", sent=True)
    if code == grpc.StatusCode.INTERNAL:
        # A node's own internal errors always carry the error metadata above, so a
        # bare INTERNAL is gRPC's: e.g. grpc.aio's "Internal error from Core" when a
        # write meets a stream whose connection just died. Maybe applied.
        return NodeFailure(address, f"call failed ({details})", sent=True)
    name = code.name if code is not None else "UNKNOWN"
    return errors.KVError(f"{address}: {name}: {details}")


def final_error(op: str, last: Exception | None, tried: list[str], timeout: float) -> Exception:
    """The exception a caller sees once the retry policy gives up."""
    if isinstance(last, NodeFailure):
        if last.sent:
            return errors.Timeout(0, 0, f"{op}: no answer from {last.address} within {timeout:g}s")
        return errors.Unreachable(tried)
    if last is None:
        return errors.Unreachable(tried)
    return last


@dataclass(frozen=True, slots=True)
class RingView:
    """The client's copy of the ring: where each partition's replicas listen."""

    epoch: int
    q: int
    owners: tuple[tuple[str, ...], ...]  # per partition: replica addresses, first owner first
    addresses: tuple[str, ...]  # every member

    @staticmethod
    def from_response(
        resp: admin_pb2.RingResponse, aliases: Mapping[str, str] | None = None
    ) -> RingView:
        """The ring as this client reaches it: ``aliases`` maps advertised
        addresses to the addresses the client must use instead (see Router)."""
        aliases = aliases or {}
        where = {m.id: aliases.get(m.address, m.address) for m in resp.members}
        owners = tuple(tuple(where[o] for o in p.owners if o in where) for p in resp.owners)
        return RingView(resp.epoch, resp.partitions, owners, tuple(sorted(where.values())))

    def replicas(self, key: bytes) -> tuple[str, ...]:
        return self.owners[partition_of(key, self.q)]


class Router:
    """Chooses the nodes to try for a request."""

    def __init__(
        self, seeds: Sequence[str], policy: LoadBalancingPolicy, health: NodeHealth
    ) -> None:
        if not seeds:
            raise errors.InvalidArgument("at least one node address is required", "nodes")
        self.seeds = tuple(seeds)
        self.policy = policy
        self.health = health
        self.ring: RingView | None = None
        self.ring_fetched_at = float("-inf")
        #: advertised address -> the seed address the same node answered on.
        #: Behind NAT or published container ports the addresses in the ring
        #: (what nodes use among themselves) may not be reachable from here;
        #: the seeds are, so members that are seeds are reached through them
        #: (Cassandra drivers' AddressTranslator, learned instead of configured).
        self.aliases: dict[str, str] = {}
        self.batches = itertools.count()  # rotates batch calls over equally good nodes

    def seeds_to_identify(self, resp: admin_pb2.RingResponse) -> list[str]:
        """Seeds that are no member's advertised address and not yet identified.

        The caller asks each for its advertised address (Admin.Status) and
        calls :meth:`learn_alias`; on a cluster reached at its advertised
        addresses this list is empty and nothing is asked."""
        advertised = {m.address for m in resp.members}
        known = set(self.aliases.values())
        return [s for s in self.seeds if s not in advertised and s not in known]

    def learn_alias(self, advertised: str, seed: str) -> None:
        if advertised and advertised != seed:
            self.aliases.setdefault(advertised, seed)

    def nodes(self) -> tuple[str, ...]:
        if self.ring is None:
            return self.seeds
        extra = tuple(a for a in self.seeds if a not in self.ring.addresses)
        return self.reachable_first(self.ring.addresses + extra)

    def reachable_first(self, addresses: Sequence[str]) -> tuple[str, ...]:
        """Behind NAT (some seed answered as another advertised address), the
        addresses of members not identified through a seed are probably not
        reachable from here (a seed that was down when asked): try them last.
        Without NAT the order is kept."""
        if not self.aliases:
            return tuple(addresses)
        vouched = set(self.seeds) | set(self.aliases.values())
        return tuple(
            [a for a in addresses if a in vouched] + [a for a in addresses if a not in vouched]
        )

    def plan(self, key: bytes | None) -> list[str]:
        replicas: tuple[str, ...] = ()
        if key is not None and self.ring is not None:
            replicas = self.ring.replicas(key)
        return self.plan_for(replicas)

    def plan_for(self, replicas: Sequence[str]) -> list[str]:
        """The plan for a key whose replicas are ``replicas`` (empty: not known)."""
        plan = self.reachable_first(self.policy.plan(replicas, self.nodes()))
        return self.health.order(plan)


def parse_nodes(nodes: Sequence[str] | str) -> list[str]:
    """``"a:1,b:2"`` or a list of addresses -> a clean list (errors are InvalidArgument)."""
    items = nodes.split(",") if isinstance(nodes, str) else list(nodes)
    out: list[str] = []
    for item in items:
        address = item.strip()
        if not address:
            continue
        try:
            port = split_address(address)[1]
        except ValueError:
            port = 0
        if port == 0:  # not host:port, or port 0 (nothing to dial)
            raise errors.InvalidArgument(f"{address!r} is not host:port", "nodes")
        out.append(address)
    if not out:
        raise errors.InvalidArgument("at least one node address is required", "nodes")
    return out


def group_by_coordinator(router: Router, reqs: Sequence[Any]) -> dict[str, list[int]]:
    """Indices of batch items grouped by the node each goes to first: as few groups
    (calls) as one-hop routing allows.

    An item may go to any of the replicas its plan puts first (with the
    token-aware policy: all its healthy replicas), since each coordinates the
    write itself; with no replica at the head of its plan, only to the plan's
    first node.
    Groups are then chosen greedily, the node that can take the most remaining
    items first (in a cluster of N nodes every node takes the whole batch).
    Ties go to the nodes in turn, so successive batches spread evenly over
    them.
    """
    ring = router.ring
    if ring is None:
        return {router.plan(None)[0]: list(range(len(reqs)))} if reqs else {}
    # one plan per replica list: every key of a partition has the same replicas,
    # and partitions share replica lists (with N = nodes, a few orders of them all)
    per_partition: dict[int, list[str]] = {}
    per_replicas: dict[tuple[str, ...], list[str]] = {}
    choices: list[list[str]] = []
    for req in reqs:
        partition = partition_of(req.key, ring.q)
        found = per_partition.get(partition)
        if found is None:
            replicas = ring.owners[partition]
            found = per_replicas.get(replicas)
            if found is None:
                found = per_replicas[replicas] = _coordinators(router, replicas)
            per_partition[partition] = found
        choices.append(found)
    left = list(range(len(reqs)))
    groups: dict[str, list[int]] = {}
    turn = next(router.batches)
    while left:
        counts: dict[str, int] = {}
        for i in left:
            for a in choices[i]:
                counts[a] = counts.get(a, 0) + 1
        # the most items first; among equals, the next node in turn (max keeps the first)
        nodes = sorted(counts)
        start = turn % len(nodes)
        best = max(nodes[start:] + nodes[:start], key=counts.__getitem__)
        groups[best] = [i for i in left if best in choices[i]]
        left = [i for i in left if best not in choices[i]]
    return groups


def _coordinators(router: Router, replicas: tuple[str, ...]) -> list[str]:
    """The nodes a key with ``replicas`` may be sent to first, best first."""
    plan = router.plan_for(replicas)
    # plans put healthy nodes first, so this run is the healthy replicas (unless none is)
    lead = list(itertools.takewhile(lambda a: a in replicas, plan))
    return lead or plan[:1]
