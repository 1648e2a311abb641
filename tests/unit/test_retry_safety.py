"""A write is retried on another node only when it certainly was not applied."""

from __future__ import annotations

import asyncio
from typing import cast

import grpc
import pytest

from kvcluster import errors
from kvcluster.client._core import translate
from kvcluster.client.policies import Decision, DefaultRetryPolicy, NodeFailure
from kvcluster.clock import SystemClock
from kvcluster.core.hashing import pkey
from kvcluster.core.preflist import preference_list_for_partition
from kvcluster.core.ring import new_ring
from kvcluster.net.grpc_transport import never_connected
from kvcluster.net.messages import PutReply
from kvcluster.net.transport import Transport, TransportError
from kvcluster.node.coordinator import (
    Coordinator,
    MembershipView,
    Placement,
    WriteRequest,
    WriteResult,
)
from kvcluster.node.peers import PeerLinks
from kvcluster.node.replica import LocalReplica
from kvcluster.node.settings import NodeSettings


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


@pytest.mark.parametrize(
    ("details", "sent"),
    [
        ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7: "
         "Failed to connect to remote host: Connection refused", False),
        ("DNS resolution failed for nowhere.invalid:7101", False),
        ("Socket closed", True),
        ("recvmsg:Connection reset by peer", True),
        ("GOAWAY received", True),
    ],
)  # fmt: skip
def test_unavailable_is_unsent_only_without_a_connection(details: str, sent: bool) -> None:
    assert never_connected(details) is not sent
    err = translate(FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), "127.0.0.1:7")
    assert isinstance(err, NodeFailure)
    assert err.sent is sent


def test_writes_are_retried_only_when_unsent() -> None:
    policy = DefaultRetryPolicy(max_attempts=3)
    unsent = NodeFailure("a:1", "refused", sent=False)
    maybe = NodeFailure("a:1", "reset", sent=True)
    assert policy.decide("put", unsent, 1) is Decision.RETRY_NEXT
    assert policy.decide("put", maybe, 1) is Decision.RAISE
    assert policy.decide("delete", maybe, 1) is Decision.RAISE
    assert policy.decide("get", maybe, 1) is Decision.RETRY_NEXT


class _RecordingTransport:
    """Fails the first call with the given error, answers later ones."""

    def __init__(self, first_error: TransportError) -> None:
        self.first_error = first_error
        self.calls: list[str] = []

    async def call(self, dst: str, msg: object, timeout: float) -> object:
        self.calls.append(dst)
        if len(self.calls) == 1:
            raise self.first_error
        return PutReply(b"ctx", (b"v",))


def _forward_with(first_error: TransportError) -> tuple[list[str], object, list[str]]:
    """Forward a write from n4 (not a replica); returns the nodes called, the outcome
    and the key's replicas in preference order."""
    ring = new_ring(["n1", "n2", "n3", "n4"], q=8, n=2)
    partition = next(p for p in range(8) if "n4" not in ring.owners_of(p))
    targets = preference_list_for_partition(partition, ring, 2, frozenset(ring.members))
    place = Placement(ring, partition, pkey(partition, b"k"), targets)
    transport = _RecordingTransport(first_error)
    coordinator = Coordinator(
        "n4",
        NodeSettings(),
        cast(LocalReplica, None),
        cast(PeerLinks, None),
        cast(MembershipView, None),
        cast(Transport, transport),
        SystemClock(),
        lambda coro: None,
    )

    async def run() -> object:
        deadline = asyncio.get_running_loop().time() + 1.0
        try:
            request = WriteRequest(b"k", b"v")
            return await coordinator._forward(place, request, 2, deadline)
        except errors.KVError as exc:
            return exc

    return transport.calls, asyncio.run(run()), [t.node for t in targets]


def test_forward_tries_next_replica_only_when_unsent() -> None:
    calls, outcome, replicas = _forward_with(TransportError("x", "refused", sent=False))
    assert calls == replicas  # the first replica, then the next one
    assert len(set(calls)) == 2
    assert outcome == WriteResult(b"ctx", [b"v"])


def test_forward_after_a_maybe_applied_failure_is_a_timeout() -> None:
    calls, outcome, replicas = _forward_with(TransportError("x", "no reply", sent=True))
    assert calls == replicas[:1]  # not applied twice
    assert isinstance(outcome, errors.Timeout)
