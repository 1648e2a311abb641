"""Pipelined single-key calls (``AsyncClient(pipeline=True)``, the ``KV.Stream`` RPC).

The same semantics as unary calls: values, siblings, contexts, the servers'
errors with their data, and failover when a node dies with requests in flight
on its stream.
"""

from __future__ import annotations

import asyncio
import functools
import socket

import grpc
import pytest

from kvcluster import AsyncClient, errors
from kvcluster.cli import dev
from kvcluster.client.pipeline import Pipe
from kvcluster.client.policies import AllowListPolicy
from kvcluster.wire.v1 import kv_pb2, kv_pb2_grpc
from tests.integration.conftest import Cluster, StartCluster
from tests.support import wait_until

pytestmark = pytest.mark.integration

PORT = 7470  # this module uses 7470-7479
TRIO_PORT = PORT  # 3 nodes: 7470-7472
KILL_PORT = PORT + 3  # 3 nodes: 7473-7475


@pytest.fixture(scope="module")
def trio(start_module_cluster: StartCluster) -> Cluster:
    return start_module_cluster(3, TRIO_PORT)


def test_many_concurrent_pipelined_calls_each_get_their_own_answer(
    trio: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []  # the address of each KV.Stream call the client opens
    real_open = Pipe._open

    def counting_open(pipe: Pipe) -> None:
        opened.append(pipe.address)
        real_open(pipe)

    monkeypatch.setattr(Pipe, "_open", counting_open)

    async def scenario() -> None:
        async with AsyncClient(trio.addresses, pipeline=True) as kv:
            keys = [f"pipe/{i}" for i in range(400)]
            written = await asyncio.gather(*(kv.put(k, k.encode() + b"!") for k in keys))
            assert [w.values for w in written] == [[k.encode() + b"!"] for k in keys]
            read = await asyncio.gather(*(kv.get(k) for k in keys))
            assert [r.values for r in read] == [[k.encode() + b"!"] for k in keys]
            # updates with the contexts just read replace; blind puts add siblings
            await asyncio.gather(
                *(
                    kv.put(k, b"new", context=r.context)
                    for k, r in zip(keys[:200], read[:200], strict=True)
                )
            )
            await asyncio.gather(*(kv.put(k, b"sibling") for k in keys[200:]))
            again = await asyncio.gather(*(kv.get(k, r="all") for k in keys))
            assert [r.values for r in again[:200]] == [[b"new"]] * 200
            assert all(sorted(r.values) == sorted([k.encode() + b"!", b"sibling"])
                       for k, r in zip(keys[200:], again[200:], strict=True))  # fmt: skip
            deleted = await asyncio.gather(*(kv.delete(k) for k in keys[:10]))
            assert deleted == [True] * 10
            assert not any([(await kv.get(k)).found for k in keys[:10]])
            # one stream per node carried all of it
            assert 1 <= len(kv._pipes) <= 3
            assert sorted(opened) == sorted(kv._pipes)

    asyncio.run(scenario())


def test_pipelined_errors_carry_their_data(trio: Cluster) -> None:
    async def scenario() -> None:
        async with AsyncClient(trio.addresses, pipeline=True) as kv:
            with pytest.raises(errors.InvalidArgument) as too_big:
                await kv.put("pipe/too-big", b"x" * (16 * 1024 * 1024))
            assert too_big.value.field == "value"
            assert too_big.value.message
            with pytest.raises(errors.InvalidArgument) as bad_quorum:
                await kv.get("pipe/bad-quorum", r=7)
            assert bad_quorum.value.field == "r"
            assert bad_quorum.value.message
            # the stream survives a rejected request
            await kv.put("pipe/after-error", b"ok")
            assert (await kv.get("pipe/after-error")).values == [b"ok"]

    asyncio.run(scenario())


def test_node_killed_with_requests_in_flight(start_cluster: StartCluster) -> None:
    cluster = start_cluster(3, KILL_PORT, settings={"request_timeout": 2})

    async def scenario() -> None:
        async with AsyncClient(cluster.addresses, pipeline=True) as kv:
            keys = [f"kill/{i}" for i in range(60)]
            await asyncio.gather(*(kv.put(k, b"v") for k in keys))

            async def reads(rounds: int) -> list[bool]:
                found = []
                for _ in range(rounds):
                    got = await asyncio.gather(*(kv.get(k) for k in keys))
                    found += [g.values == [b"v"] for g in got]
                return found

            running = asyncio.ensure_future(reads(5))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(dev.kill, cluster.dir, "n2")
            # reads are retried on another replica when n2's stream breaks
            assert all(await running)
            assert all(await reads(2))
            # strict W=3 once the others see n2 down: the node's Unavailable, through the stream
            for observer in ("n1", "n3"):
                await asyncio.to_thread(cluster.wait_state, observer, "n2", "down")
            with pytest.raises(errors.Unavailable) as info:
                await kv.put("kill/strict", b"v", w="all", strict=True)
            assert (info.value.required, info.value.alive) == (3, 2)

        # a client pinned to the dead node fails fast as unreachable, not as a timeout
        only_dead = AllowListPolicy([cluster.address("n2")])
        async with AsyncClient(
            cluster.address("n2"), pipeline=True, load_balancing=only_dead
        ) as kv:
            with pytest.raises(errors.Unreachable):
                await kv.put("kill/unreachable", b"v", timeout=1.0)

    asyncio.run(scenario())


GRPC_PEERS_PORT = PORT + 6  # 3 nodes: 7476-7478


def test_nodes_can_talk_over_grpc_instead_of_tcp(start_cluster: StartCluster) -> None:
    """``peer_port_offset = 0``: node-to-node messages over the gRPC Internal service."""
    cluster = start_cluster(3, GRPC_PEERS_PORT, settings={"peer_port_offset": 0})
    with cluster.client() as kv:
        kv.put("grpc-peers/k", b"v", w="all")
        assert kv.get("grpc-peers/k", r="all").values == [b"v"]
    for node_id in cluster.ids:
        state = dev.DevCluster.load(cluster.dir).node(node_id)
        port = int(state.address.rsplit(":", 1)[1]) + 2000
        with socket.socket() as sock:  # nothing listens on the TCP peer port
            assert sock.connect_ex(("127.0.0.1", port)) != 0


def peers_connected_to(port: int) -> bool:
    """Whether two TCP connections (the other two nodes') are established to local
    ``port``, counted on the accepting side (Linux)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(int(row[1].split(":")[1], 16) == port and row[3] == "01" for row in rows) >= 2


def test_by_default_nodes_listen_for_peers_on_the_offset_port(trio: Cluster) -> None:
    with trio.client() as kv:
        kv.put("pipe/tcp-peers", b"v", w="all")
    for node_id in trio.ids:
        port = int(trio.address(node_id).rsplit(":", 1)[1]) + 2000
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the TCP peer transport accepts
        # and the other two nodes talk to this one there
        wait_until(functools.partial(peers_connected_to, port), 10.0, f"peers on {port}")


def test_a_stream_request_without_an_operation_gets_an_error_reply(trio: Cluster) -> None:
    async def scenario() -> list[kv_pb2.StreamResponse]:
        async with grpc.aio.insecure_channel(trio.addresses[0]) as channel:
            call = kv_pb2_grpc.KVStub(channel).Stream(
                iter(
                    [
                        kv_pb2.StreamRequest(id=7),
                        kv_pb2.StreamRequest(id=8, get=kv_pb2.GetRequest(key=b"pipe/none")),
                    ]
                )
            )
            return [reply async for reply in call]

    replies = sorted(asyncio.run(scenario()), key=lambda r: r.id)
    assert [r.id for r in replies] == [7, 8]
    assert replies[0].WhichOneof("result") == "error"
    assert replies[0].error.kind == "invalid_argument"
    assert replies[1].WhichOneof("result") == "get" and not replies[1].get.found
