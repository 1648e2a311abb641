"""The client's I/O-free core and policies, and its retry loop against fake stubs.

Covers quorum parsing, request building, error translation from gRPC errors
(with and without the ``kvcluster-error-bin`` trailing metadata, for both the
sync and the asyncio flavours of grpc), load-balancing and retry policies,
node health, that :class:`RingView` routes a key to exactly the nodes the
server's preference list would pick, and how a pipeline (``KV.Stream``) fails
its requests, against a fake stream.
"""

from __future__ import annotations

import asyncio
import json
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import grpc
import pytest
from grpc import aio

from kvcluster import AsyncClient, Client, errors
from kvcluster.client import _core as core
from kvcluster.client.pipeline import Pipe
from kvcluster.client.policies import (
    AllowListPolicy,
    Decision,
    DefaultRetryPolicy,
    FallthroughRetryPolicy,
    NodeFailure,
    NodeHealth,
    RoundRobinPolicy,
    TokenAwarePolicy,
)
from kvcluster.core.hashing import partition_of
from kvcluster.core.preflist import preference_list
from kvcluster.core.ring import new_ring
from kvcluster.node.settings import MAX_KEY_BYTES
from kvcluster.wire.v1 import admin_pb2, kv_pb2

# -- quorum parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, kv_pb2.Quorum()),
        (1, kv_pb2.Quorum(count=1)),
        (3, kv_pb2.Quorum(count=3)),
        ("2", kv_pb2.Quorum(count=2)),
        (" 5 ", kv_pb2.Quorum(count=5)),
        ("one", kv_pb2.Quorum(level=kv_pb2.Quorum.LEVEL_ONE)),
        ("QUORUM", kv_pb2.Quorum(level=kv_pb2.Quorum.LEVEL_QUORUM)),
        (" All ", kv_pb2.Quorum(level=kv_pb2.Quorum.LEVEL_ALL)),
        ("default", kv_pb2.Quorum(level=kv_pb2.Quorum.LEVEL_DEFAULT)),
    ],
)
def test_quorum_accepts_numbers_and_levels(value: Any, expected: kv_pb2.Quorum) -> None:
    assert core.quorum(value, "w") == expected


def test_absent_quorum_means_the_node_default() -> None:
    assert core.quorum(None, "r").WhichOneof("value") is None


@pytest.mark.parametrize("value", [0, -1, "0", "lots", "", "1.5", True, False, "one two"])
@pytest.mark.parametrize("what", ["r", "w"])
def test_quorum_rejects_nonsense_naming_the_field(value: Any, what: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        core.quorum(value, what)
    assert info.value.field == what


# -- keys, values and requests ------------------------------------------------------------------


def test_keys_and_values_bytes_or_utf8() -> None:
    assert core.check_key("ключ") == "ключ".encode()
    assert core.check_key(b"k") == b"k"
    assert core.to_bytes(bytearray(b"ab"), "value") == b"ab"  # type: ignore[arg-type]
    assert core.to_bytes(memoryview(b"cd"), "value") == b"cd"  # type: ignore[arg-type]
    assert core.check_key(b"k" * MAX_KEY_BYTES) == b"k" * MAX_KEY_BYTES


@pytest.mark.parametrize(
    ("key", "field"),
    [
        (b"", "key"),
        ("", "key"),
        (b"k" * (MAX_KEY_BYTES + 1), "key"),
        ("é" * (MAX_KEY_BYTES // 2 + 1), "key"),  # the limit counts UTF-8 bytes
        (42, "key"),
        (None, "key"),
    ],
)
def test_bad_keys(key: Any, field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        core.check_key(key)
    assert info.value.field == field


def test_value_of_wrong_type() -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        core.put_request(b"k", 3.5, None, None, False, 1.0)  # type: ignore[arg-type]
    assert info.value.field == "value"


def test_request_building() -> None:
    get = core.get_request("k", "all", True, 2.5)
    assert (get.key, get.strict, get.timeout_ms) == (b"k", True, 2500)
    assert get.r.level == kv_pb2.Quorum.LEVEL_ALL

    put = core.put_request(b"k", "v", None, 2, False, 0.0001)
    assert (put.key, put.value, put.context, put.w.count, put.timeout_ms) == (
        b"k",
        b"v",
        b"",
        2,
        1,  # never 0, which would mean "the node's default"
    )
    with_ctx = core.put_request(b"k", b"v", b"\x01ctx", None, True, 1.0)
    assert with_ctx.context == b"\x01ctx"
    assert with_ctx.strict

    delete = core.delete_request("k", None, "one", "quorum", False, 5.0)
    assert (delete.key, delete.context, delete.timeout_ms) == (b"k", b"", 5000)
    assert delete.w.level == kv_pb2.Quorum.LEVEL_ONE
    assert delete.r.level == kv_pb2.Quorum.LEVEL_QUORUM


def test_batch_requests() -> None:
    reqs = core.put_requests([("a", "1"), (b"b", b"2", b"\x01c")], "all", False, 1.0)
    assert [(r.key, r.value, r.context) for r in reqs] == [
        (b"a", b"1", b""),
        (b"b", b"2", b"\x01c"),
    ]
    assert all(r.w.level == kv_pb2.Quorum.LEVEL_ALL for r in reqs)
    for bad in ([("a",)], [("a", "b", None, "d")]):
        with pytest.raises(errors.InvalidArgument) as info:
            core.put_requests(bad, None, False, 1.0)  # type: ignore[arg-type]
        assert info.value.field == "items"
    with pytest.raises(errors.InvalidArgument) as info:
        core.put_requests([("", "v")], None, False, 1.0)
    assert info.value.field == "key"


def test_results() -> None:
    read = core.read_result(kv_pb2.GetResponse(found=True, values=[b"a", b"b"], context=b"c"))
    assert (read.found, read.values, read.context) == (True, [b"a", b"b"], b"c")
    with pytest.raises(ValueError, match="2 siblings"):
        _ = read.value
    assert core.read_result(kv_pb2.GetResponse(found=True, values=[b"a"])).value == b"a"
    assert core.read_result(kv_pb2.GetResponse()).value is None
    write = core.write_result(kv_pb2.PutResponse(context=b"c", values=[b"v"]))
    assert (write.context, write.values) == (b"c", [b"v"])


def test_item_error() -> None:
    err = core.item_error(
        kv_pb2.ItemError(
            kind="unavailable", message="m", details_json='{"required": 3, "alive": 1}'
        )
    )
    assert isinstance(err, errors.Unavailable)
    assert (err.required, err.alive, err.message) == (3, 1, "m")
    field = core.item_error(
        kv_pb2.ItemError(kind="invalid_argument", message="m", details_json='{"field": "value"}')
    )
    assert isinstance(field, errors.InvalidArgument)
    assert field.field == "value"
    # broken details still give an error, never an exception while decoding it
    broken = core.item_error(kv_pb2.ItemError(kind="unavailable", message="m", details_json="{"))
    assert isinstance(broken, errors.KVError)
    assert broken.message == "m"


# -- error translation ---------------------------------------------------------------------------

Metadatum = namedtuple("Metadatum", ["key", "value"])  # what sync grpc yields


class FakeRpcError(grpc.RpcError):
    """A sync-grpc-like failure: code, details and trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str = "", trailing: Sequence[Any] = ()
    ) -> None:
        super().__init__(details)
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._trailing


class BrokenMetadataError(FakeRpcError):
    def trailing_metadata(self) -> tuple[Any, ...]:
        raise RuntimeError("no metadata")


def wire(err: errors.KVError) -> bytes:
    return json.dumps(errors.to_wire(err)).encode()


KINDS: list[tuple[errors.KVError, grpc.StatusCode]] = [
    (errors.Unavailable(3, 2), grpc.StatusCode.UNAVAILABLE),
    (errors.Timeout(2, 1), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.InvalidArgument("too big", "value"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Overloaded("full", "n2"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StorageFull("disk full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotReady("no ring"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Internal("bug"), grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("err", "code"), KINDS, ids=[type(e).__name__ for e, _ in KINDS])
def test_translate_sync_error_with_detail(err: errors.KVError, code: grpc.StatusCode) -> None:
    exc = FakeRpcError(
        code,
        err.message,
        [Metadatum("other", "x"), Metadatum(core.ERROR_KEY, wire(err))],
    )
    got = core.translate(exc, "h:1")
    assert type(got) is type(err)
    assert isinstance(got, errors.KVError)
    assert got.message == err.message
    assert got.details() == err.details()


@pytest.mark.parametrize(("err", "code"), KINDS, ids=[type(e).__name__ for e, _ in KINDS])
def test_translate_aio_error_with_detail(err: errors.KVError, code: grpc.StatusCode) -> None:
    """grpc.aio yields metadata as plain (key, value) tuples (this used to raise
    AttributeError out of the AsyncClient instead of the server's error)."""
    exc = aio.AioRpcError(
        code,
        aio.Metadata(),
        aio.Metadata(("other", "x"), (core.ERROR_KEY, wire(err))),
        err.message,
    )
    got = core.translate(exc, "h:1")
    assert type(got) is type(err)
    assert isinstance(got, errors.KVError)
    assert got.message == err.message
    assert got.details() == err.details()


def test_translate_specific_fields() -> None:
    got = core.translate(
        FakeRpcError(
            grpc.StatusCode.UNAVAILABLE,
            "",
            [Metadatum(core.ERROR_KEY, wire(errors.Unavailable(3, 2)))],
        ),
        "h:1",
    )
    assert isinstance(got, errors.Unavailable)
    assert (got.required, got.alive) == (3, 2)
    unknown = core.translate(
        FakeRpcError(
            grpc.StatusCode.UNKNOWN,
            "",
            [Metadatum(core.ERROR_KEY, b'{"kind": "martian", "message": "hi"}')],
        ),
        "h:1",
    )
    assert type(unknown) is errors.KVError
    assert unknown.message == "hi"


@pytest.mark.parametrize(
    ("code", "sent"),
    [
        (grpc.StatusCode.UNAVAILABLE, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.CANCELLED, True),
        # grpc.aio's own status when a write meets a call whose connection died
        (grpc.StatusCode.INTERNAL, True),
    ],
)
@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_translate_without_detail_is_a_node_failure(
    code: grpc.StatusCode, sent: bool, flavour: str
) -> None:
    exc: grpc.RpcError = (
        FakeRpcError(code, "connection refused")
        if flavour == "sync"
        else aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), "connection refused")
    )
    got = core.translate(exc, "h:1")
    assert isinstance(got, NodeFailure)
    assert (got.address, got.sent) == ("h:1", sent)


@pytest.mark.parametrize(
    "trailing",
    [
        [],
        [Metadatum(core.ERROR_KEY, b"not json")],
        [Metadatum(core.ERROR_KEY, b'{"kind": "unavailable"}')],  # no message
        [Metadatum(core.ERROR_KEY, b"[1, 2]")],
    ],
    ids=["none", "not json", "no message", "not an object"],
)
def test_translate_other_codes_without_usable_detail(trailing: list[Any]) -> None:
    got = core.translate(FakeRpcError(grpc.StatusCode.UNKNOWN, "boom", trailing), "h:1")
    assert type(got) is errors.KVError
    assert "h:1" in got.message
    assert "UNKNOWN" in got.message
    assert "boom" in got.message


def test_translate_survives_unreadable_metadata() -> None:
    got = core.translate(
        BrokenMetadataError(grpc.StatusCode.UNAVAILABLE, "connection refused"), "h:1"
    )
    assert isinstance(got, NodeFailure)
    assert not got.sent


def test_final_error() -> None:
    timeout = core.final_error("put", NodeFailure("a:1", "slow", sent=True), ["a:1"], 2.0)
    assert isinstance(timeout, errors.Timeout)
    assert "a:1" in timeout.message
    unreachable = core.final_error(
        "get", NodeFailure("b:1", "down", sent=False), ["a:1", "b:1"], 2.0
    )
    assert isinstance(unreachable, errors.Unreachable)
    assert unreachable.addresses == ["a:1", "b:1"]
    nothing = core.final_error("get", None, [], 2.0)
    assert isinstance(nothing, errors.Unreachable)
    server = errors.Unavailable(3, 1)
    assert core.final_error("put", server, ["a:1"], 2.0) is server


# -- policies ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_node_health() -> None:
    clock = FakeClock()
    health = NodeHealth(down_for=2.0, now=clock)
    nodes = ["a", "b", "c", "d"]
    assert health.order(nodes) == nodes
    health.failed("b")
    health.failed("a")
    assert not health.is_healthy("a")
    assert health.order(nodes) == ["c", "d", "a", "b"]  # unhealthy last, order kept
    clock.now += 1.9
    assert health.order(nodes) == ["c", "d", "a", "b"]
    health.succeeded("b")
    assert health.order(nodes) == ["b", "c", "d", "a"]
    clock.now += 0.2
    assert health.is_healthy("a")
    assert health.order(nodes) == nodes


def test_round_robin_rotates_over_every_node() -> None:
    policy = RoundRobinPolicy()
    nodes = ["a", "b", "c"]
    plans = [policy.plan(["c"], nodes) for _ in range(4)]
    assert plans == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert policy.plan(["x"], []) == ["x"]


def test_token_aware_puts_replicas_first_and_rotates_them() -> None:
    policy = TokenAwarePolicy()
    nodes = ["a", "b", "c", "d", "e"]
    plans = [policy.plan(["d", "b", "e"], nodes) for _ in range(3)]
    assert [p[:3] for p in plans] == [["d", "b", "e"], ["b", "e", "d"], ["e", "d", "b"]]
    for plan in plans:
        assert plan[3:] == ["a", "c"]  # then the others, in order, once each
        assert sorted(plan) == nodes
    fixed = TokenAwarePolicy(rotate=False)
    assert [fixed.plan(["d", "b"], nodes) for _ in range(2)] == [["d", "b", "a", "c", "e"]] * 2
    assert TokenAwarePolicy().plan([], nodes) == nodes  # no ring yet: every node


def test_allow_list_never_leaves_the_list() -> None:
    policy = AllowListPolicy(["b", "d"])
    for replicas in (["a", "b", "c"], ["d"], [], ["x", "y"]):
        for _ in range(3):
            plan = policy.plan(replicas, ["a", "b", "c", "d", "e"])
            assert sorted(plan) == ["b", "d"]
            allowed_replicas = [r for r in replicas if r in ("b", "d")]
            assert plan[: len(allowed_replicas)] == allowed_replicas
    with pytest.raises(errors.InvalidArgument) as info:
        AllowListPolicy([])
    assert info.value.field == "nodes"


def test_allow_list_round_robins_when_no_replica_is_allowed() -> None:
    policy = AllowListPolicy(["a", "b", "c"])
    firsts = [policy.plan([], ["z"])[0] for _ in range(3)]
    assert sorted(firsts) == ["a", "b", "c"]


NOT_SENT = NodeFailure("a", "refused", sent=False)
SENT = NodeFailure("a", "no answer", sent=True)


@pytest.mark.parametrize(
    ("op", "error", "decision"),
    [
        ("get", NOT_SENT, Decision.RETRY_NEXT),
        ("put", NOT_SENT, Decision.RETRY_NEXT),
        ("delete", NOT_SENT, Decision.RETRY_NEXT),
        ("put_many", NOT_SENT, Decision.RETRY_NEXT),
        ("get", SENT, Decision.RETRY_NEXT),
        ("get_many", SENT, Decision.RETRY_NEXT),
        ("put", SENT, Decision.RAISE),  # it may have been applied: no duplicate sibling
        ("delete", SENT, Decision.RAISE),
        ("put_many", SENT, Decision.RAISE),
        ("put", errors.NotReady("no ring"), Decision.RETRY_NEXT),
        ("get", errors.NotReady("no ring"), Decision.RETRY_NEXT),
        ("put", errors.InvalidArgument("bad", "key"), Decision.RAISE),
        ("get", errors.Unavailable(2, 1), Decision.RAISE),
        ("put", errors.Timeout(2, 1), Decision.RAISE),
        ("put", errors.Overloaded(), Decision.RAISE),
        ("get", errors.KVError("?"), Decision.RAISE),
    ],
)
def test_default_retry_policy(op: str, error: Exception, decision: Decision) -> None:
    assert DefaultRetryPolicy().decide(op, error, 1) is decision


def test_default_retry_policy_stops_after_max_attempts() -> None:
    policy = DefaultRetryPolicy(max_attempts=3)
    assert policy.decide("get", NOT_SENT, 2) is Decision.RETRY_NEXT
    assert policy.decide("get", NOT_SENT, 3) is Decision.RAISE
    assert DefaultRetryPolicy(max_attempts=1).decide("get", NOT_SENT, 1) is Decision.RAISE


def test_fallthrough_never_retries() -> None:
    for error in (NOT_SENT, SENT, errors.NotReady("x")):
        assert FallthroughRetryPolicy().decide("get", error, 1) is Decision.RAISE


# -- ring view and routing -----------------------------------------------------------------------

MEMBERS = ["n1", "n2", "n3", "n4", "n5"]


def address(node: str) -> str:
    return f"10.0.0.{node[1:]}:7101"


def ring_response(q: int = 64, n: int = 3) -> tuple[admin_pb2.RingResponse, Any]:
    ring = new_ring(MEMBERS, q=q, n=n, epoch=7)
    resp = admin_pb2.RingResponse(
        epoch=ring.epoch,
        partitions=ring.q,
        n_val=ring.n,
        members=[admin_pb2.RingMember(id=m, address=address(m)) for m in ring.members],
        owners=[admin_pb2.PartitionOwners(owners=list(o)) for o in ring.owners],
    )
    return resp, ring


@pytest.mark.parametrize("q", [1, 8, 64, 256])
def test_ring_view_routes_like_the_server(q: int) -> None:
    resp, ring = ring_response(q=q)
    view = core.RingView.from_response(resp)
    assert (view.epoch, view.q) == (7, q)
    assert view.addresses == tuple(sorted(address(m) for m in MEMBERS))
    for i in range(2000):
        key = b"key-%d" % i
        p = partition_of(key, q)
        assert view.replicas(key) == tuple(address(o) for o in ring.owners[p])
        # exactly the nodes, in the order, the server's preference list uses when all are up
        targets = preference_list(key, ring, ring.n, set(MEMBERS))
        assert view.replicas(key) == tuple(address(t.node) for t in targets)


def test_router_plans() -> None:
    seeds = ["s:1", "s:2"]
    router = core.Router(seeds, TokenAwarePolicy(rotate=False), NodeHealth())
    assert router.plan(b"k") == seeds  # no ring yet
    resp, ring = ring_response()
    router.ring = core.RingView.from_response(resp)
    plan = router.plan(b"k")
    replicas = [address(o) for o in ring.owners[partition_of(b"k", ring.q)]]
    assert plan[:3] == replicas
    assert sorted(plan) == sorted([address(m) for m in MEMBERS] + seeds)
    router.health.failed(replicas[0])
    assert router.plan(b"k")[0] == replicas[1]
    assert router.plan(b"k")[-1] == replicas[0]
    with pytest.raises(errors.InvalidArgument) as info:
        core.Router([], TokenAwarePolicy(), NodeHealth())
    assert info.value.field == "nodes"


def _batch(n: int = 100) -> list[kv_pb2.GetRequest]:
    return [core.get_request(b"k%d" % i, None, False, 1.0) for i in range(n)]


def _replicas(ring: Any, key: bytes) -> list[str]:
    return [address(o) for o in ring.owners[partition_of(key, ring.q)]]


def test_group_by_coordinator_sends_each_item_once_to_one_of_its_replicas() -> None:
    router = core.Router(["s:1"], TokenAwarePolicy(rotate=False), NodeHealth())
    resp, ring = ring_response()  # 5 members, N=3
    router.ring = core.RingView.from_response(resp)
    reqs = _batch()
    groups = core.group_by_coordinator(router, reqs)
    assert sorted(i for idx in groups.values() for i in idx) == list(range(100))
    for addr, indices in groups.items():
        for i in indices:
            assert addr in _replicas(ring, reqs[i].key)
    # fewer calls than one per first owner (every member leads some of 100 keys)
    firsts = {_replicas(ring, r.key)[0] for r in reqs}
    assert len(firsts) == 5
    assert len(groups) < len(firsts)
    # greedy: the first group is the node that is a replica of the most keys
    best = max(sum(address(m) in _replicas(ring, r.key) for r in reqs) for m in MEMBERS)
    assert len(next(iter(groups.values()))) == best


def test_group_by_coordinator_one_call_when_every_node_is_a_replica() -> None:
    router = core.Router(["s:1"], TokenAwarePolicy(), NodeHealth())
    resp, _ = ring_response(n=5)
    router.ring = core.RingView.from_response(resp)
    chosen = []
    for _ in range(10):
        groups = core.group_by_coordinator(router, _batch())
        assert len(groups) == 1
        [(addr, indices)] = groups.items()
        assert indices == list(range(100))
        chosen.append(addr)
    # successive batches take the nodes in turn
    assert sorted(chosen) == sorted(address(m) for m in MEMBERS for _ in range(2))
    assert chosen[:5] == chosen[5:]


def test_group_by_coordinator_avoids_unhealthy_replicas() -> None:
    router = core.Router(["s:1"], TokenAwarePolicy(), NodeHealth())
    resp, _ = ring_response(n=5)
    router.ring = core.RingView.from_response(resp)
    for m in MEMBERS[:4]:
        router.health.failed(address(m))
    for _ in range(5):
        assert core.group_by_coordinator(router, _batch()) == {address("n5"): list(range(100))}


def test_group_by_coordinator_without_a_ring() -> None:
    router = core.Router(["s:1", "s:2"], TokenAwarePolicy(rotate=False), NodeHealth())
    assert core.group_by_coordinator(router, _batch(3)) == {"s:1": [0, 1, 2]}
    assert core.group_by_coordinator(router, []) == {}


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ("a:1", ["a:1"]),
        ("a:1, b:2 ,", ["a:1", "b:2"]),
        (["a:1", " b:2"], ["a:1", "b:2"]),
        ("[::1]:7101", ["[::1]:7101"]),
    ],
)
def test_parse_nodes(nodes: Any, expected: list[str]) -> None:
    assert core.parse_nodes(nodes) == expected


@pytest.mark.parametrize("nodes", ["", ",", "a", "a:", ":1", "a:0", "a:65536", "a:x", ["a:1", "b"]])
def test_parse_nodes_rejects(nodes: Any) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        core.parse_nodes(nodes)
    assert info.value.field == "nodes"


# -- the clients' retry loops against fake stubs ---------------------------------------------------

Behaviour = Callable[[Any], Any]  # request -> response, or raises


class FakeKV:
    """Stands in for a node's KV stub: per-address behaviour, and a call log."""

    def __init__(
        self, behaviour: Mapping[str, Behaviour], log: list[tuple[str, str, float]]
    ) -> None:
        self.behaviour = behaviour
        self.log = log

    def stub(self, address: str) -> Any:
        fake = self

        class Stub:
            def __getattr__(self, method: str) -> Callable[..., Any]:
                def call(request: Any, timeout: float) -> Any:
                    fake.log.append((address, method, timeout))
                    return fake.behaviour[address](request)

                return call

        return Stub()

    def async_stub(self, address: str) -> Any:
        sync = self.stub(address)

        class Stub:
            def __getattr__(self, method: str) -> Callable[..., Any]:
                async def call(request: Any, timeout: float) -> Any:
                    return getattr(sync, method)(request, timeout)

                return call

        return Stub()


def refused(request: Any) -> Any:
    raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")


def silent(request: Any) -> Any:
    raise FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")


def rejects(err: errors.KVError) -> Behaviour:
    def call(request: Any) -> Any:
        raise FakeRpcError(
            grpc.StatusCode.UNKNOWN, err.message, [Metadatum(core.ERROR_KEY, wire(err))]
        )

    return call


def found(request: Any) -> Any:
    if isinstance(request, kv_pb2.GetRequest):
        return kv_pb2.GetResponse(found=True, values=[b"v"], context=b"\x01c")
    return kv_pb2.PutResponse(context=b"\x01c", values=[request.value])


def sync_client(
    behaviour: Mapping[str, Behaviour], monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> tuple[Client, list[tuple[str, str, float]]]:
    log: list[tuple[str, str, float]] = []
    fake = FakeKV(behaviour, log)
    client = Client(list(behaviour), load_balancing=TokenAwarePolicy(rotate=False), **kw)
    monkeypatch.setattr(client, "_kv", fake.stub)
    monkeypatch.setattr(client, "refresh_ring", lambda: None)
    return client, log


def test_client_retries_a_refused_connection_on_the_next_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, log = sync_client({"a:1": refused, "b:1": found}, monkeypatch)
    assert client.put("k", b"x").values == [b"x"]
    assert [(a, m) for a, m, _ in log] == [("a:1", "Put"), ("b:1", "Put")]
    assert not client._router.health.is_healthy("a:1")
    # the next request tries the healthy node first (a:1 is not even tried)
    assert client.get("k").values == [b"v"]
    assert [(a, m) for a, m, _ in log[2:]] == [("b:1", "Get")]
    assert all(t > 0 for _, _, t in log)


def test_client_does_not_retry_a_write_that_may_have_been_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, log = sync_client({"a:1": silent, "b:1": found}, monkeypatch, timeout=1.0)
    with pytest.raises(errors.Timeout):
        client.put("k", b"x")
    assert [a for a, _, _ in log] == ["a:1"]

    reader, read_log = sync_client({"a:1": silent, "b:1": found}, monkeypatch, timeout=1.0)
    assert reader.get("k").found  # a read is retried elsewhere
    assert [a for a, _, _ in read_log] == ["a:1", "b:1"]


def test_client_raises_the_servers_error_without_retrying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, log = sync_client({"a:1": rejects(errors.Unavailable(3, 2)), "b:1": found}, monkeypatch)
    with pytest.raises(errors.Unavailable) as info:
        client.put("k", b"x", w=3, strict=True)
    assert (info.value.required, info.value.alive) == (3, 2)
    assert [a for a, _, _ in log] == ["a:1"]


def test_client_retries_a_node_without_a_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    client, log = sync_client(
        {"a:1": rejects(errors.NotReady("no ring")), "b:1": found}, monkeypatch
    )
    assert client.put("k", b"x").values == [b"x"]
    assert [a for a, _, _ in log] == ["a:1", "b:1"]


def test_client_unreachable_when_every_node_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    client, log = sync_client({"a:1": refused, "b:1": refused, "c:1": refused}, monkeypatch)
    with pytest.raises(errors.Unreachable) as info:
        client.get("k")
    assert info.value.addresses == ["a:1", "b:1", "c:1"]
    assert len(log) == 3


def test_client_gives_up_after_max_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = {f"n{i}:1": refused for i in range(5)}
    client, log = sync_client(nodes, monkeypatch, retry=DefaultRetryPolicy(max_attempts=2))
    with pytest.raises(errors.Unreachable) as info:
        client.get("k")
    assert len(log) == 2
    assert info.value.addresses == ["n0:1", "n1:1"]


def test_client_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    client, log = sync_client(
        {"a:1": refused, "b:1": found}, monkeypatch, retry=FallthroughRetryPolicy()
    )
    with pytest.raises(errors.Unreachable):
        client.get("k")
    assert len(log) == 1


def test_client_bad_input_never_reaches_a_node(monkeypatch: pytest.MonkeyPatch) -> None:
    client, log = sync_client({"a:1": found}, monkeypatch)
    for call in (
        lambda: client.put("", b"x"),
        lambda: client.get(b"k" * 1025),
        lambda: client.put("k", b"x", w=0),
        lambda: client.delete("k", r="most"),
    ):
        with pytest.raises(errors.InvalidArgument):
            call()
    assert log == []


def test_client_session_sticks_to_its_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    client, log = sync_client({"a:1": refused, "b:1": found, "c:1": found}, monkeypatch)
    session = client.session()
    session.put("k1", b"x")
    assert session.coordinator == "b:1"
    client._router.health.succeeded("a:1")  # a:1 looks healthy again: the session stays
    session.get("k2")
    # straight to b:1: a client without a session would try a:1 first (and be refused)
    assert [(a, m) for a, m, _ in log] == [("a:1", "Put"), ("b:1", "Put"), ("b:1", "Get")]
    assert session.coordinator == "b:1"


def async_client(
    behaviour: Mapping[str, Behaviour], monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> tuple[AsyncClient, list[tuple[str, str, float]]]:
    log: list[tuple[str, str, float]] = []
    fake = FakeKV(behaviour, log)
    client = AsyncClient(list(behaviour), load_balancing=TokenAwarePolicy(rotate=False), **kw)

    async def no_refresh() -> None:
        return None

    monkeypatch.setattr(client, "_kv", fake.async_stub)
    monkeypatch.setattr(client, "refresh_ring", no_refresh)
    return client, log


def aio_rejects(err: errors.KVError) -> Behaviour:
    def call(request: Any) -> Any:
        raise aio.AioRpcError(
            grpc.StatusCode.UNKNOWN,
            aio.Metadata(),
            aio.Metadata((core.ERROR_KEY, wire(err))),
            err.message,
        )

    return call


def aio_refused(request: Any) -> Any:
    raise aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "connection refused"
    )


def test_async_client_retry_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    client, log = async_client({"a:1": aio_refused, "b:1": found}, monkeypatch)

    async def scenario() -> None:
        assert (await client.put("k", b"x")).values == [b"x"]
        assert [a for a, _, _ in log] == ["a:1", "b:1"]
        await client.close()

    asyncio.run(scenario())


def test_async_client_raises_the_servers_error(monkeypatch: pytest.MonkeyPatch) -> None:
    client, log = async_client(
        {"a:1": aio_rejects(errors.InvalidArgument("value too big", "value")), "b:1": found},
        monkeypatch,
    )

    async def scenario() -> errors.InvalidArgument:
        with pytest.raises(errors.InvalidArgument) as info:
            await client.put("k", b"x" * 10)
        await client.close()
        return info.value

    err = asyncio.run(scenario())
    assert err.field == "value"
    assert err.message == "value too big"
    assert [a for a, _, _ in log] == ["a:1"]


def test_async_client_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = async_client({"a:1": aio_refused, "b:1": aio_refused}, monkeypatch)

    async def scenario() -> errors.Unreachable:
        with pytest.raises(errors.Unreachable) as info:
            await client.get("k")
        await client.close()
        return info.value

    assert asyncio.run(scenario()).addresses == ["a:1", "b:1"]


# -- pipelining: the failures of one KV.Stream call ---------------------------------------------


class FakeStream:
    """A ``KV.Stream`` call: its first ``writes`` writes go through, later ones hang;
    it answers with whatever the test puts in ``replies``."""

    def __init__(self, writes: int) -> None:
        self.writes = writes
        self.written: list[kv_pb2.StreamRequest] = []
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False

    async def write(self, request: kv_pb2.StreamRequest) -> None:
        if len(self.written) >= self.writes:
            await asyncio.Event().wait()
        self.written.append(request)

    async def read(self) -> Any:
        return await self.replies.get()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeStreamStub:
    """Opens the given streams in turn."""

    def __init__(self, *streams: FakeStream) -> None:
        self.streams = list(streams)
        self.opened = 0

    def Stream(self) -> FakeStream:  # noqa: N802
        self.opened += 1
        return self.streams.pop(0)


async def settled() -> None:
    """Let the pipe's writer and reader tasks run until they block."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_pipe_broken_stream_fails_written_requests_as_maybe_applied_others_as_unsent() -> None:
    async def scenario() -> None:
        first, second = FakeStream(writes=1), FakeStream(writes=1)
        stub = FakeStreamStub(first, second)
        pipe = Pipe(cast(Any, stub), "a:1")
        written = asyncio.ensure_future(pipe.call("Put", kv_pb2.PutRequest(key=b"1"), 5.0))
        not_written = asyncio.ensure_future(pipe.call("Put", kv_pb2.PutRequest(key=b"2"), 5.0))
        await settled()
        assert [r.put.key for r in first.written] == [b"1"]  # the second write hangs
        first.replies.put_nowait(aio.EOF)  # the node closes the stream
        with pytest.raises(NodeFailure) as maybe_applied:
            await written
        with pytest.raises(NodeFailure) as unsent:
            await not_written
        assert (maybe_applied.value.sent, unsent.value.sent) == (True, False)
        assert first.cancelled

        # the next call opens a new stream
        call = asyncio.ensure_future(pipe.call("Get", kv_pb2.GetRequest(key=b"k"), 5.0))
        await settled()
        (request,) = second.written
        reply = kv_pb2.GetResponse(found=True, values=[b"v"])
        second.replies.put_nowait(kv_pb2.StreamResponse(id=request.id, get=reply))
        assert await call == reply
        assert stub.opened == 2
        await pipe.close()

    asyncio.run(asyncio.wait_for(scenario(), 10.0))


def test_pipe_request_without_an_answer_by_its_deadline_is_maybe_applied() -> None:
    async def scenario() -> None:
        stream = FakeStream(writes=1)
        pipe = Pipe(cast(Any, FakeStreamStub(stream)), "a:1")
        with pytest.raises(NodeFailure) as info:
            await pipe.call("Put", kv_pb2.PutRequest(key=b"k"), 0.05)
        assert info.value.sent is True
        assert len(stream.written) == 1
        await pipe.close()

    asyncio.run(asyncio.wait_for(scenario(), 10.0))
