"""The TCP transport between nodes (kvcluster.net.tcp_transport) on real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kvcluster import errors
from kvcluster.net.messages import Ping, Pong, ReplicaRead
from kvcluster.net.tcp_transport import TcpServer, TcpTransport, peer_address
from kvcluster.net.transport import TransportError

OFFSET = 0  # tests give the transport the server's real address, unshifted


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))  # a hang guard, not a timing assertion


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def echo(src: str, msg: Any) -> Any:
    if isinstance(msg, Ping):
        return Pong(msg.epoch)
    raise errors.InvalidArgument(f"unexpected {type(msg).__name__}", "msg")


async def serve(
    handler: Callable[[str, Any], Awaitable[Any]] = echo, port: int = 0, **kw: Any
) -> TcpServer:
    server = TcpServer(handler, **kw)
    await server.start(f"127.0.0.1:{port}")
    return server


def client(server_port: int, node_id: str = "caller") -> TcpTransport:
    transport = TcpTransport(node_id, OFFSET)
    transport.set_address("peer", f"127.0.0.1:{server_port}")
    return transport


def test_peer_address_moves_the_port() -> None:
    assert peer_address("10.0.0.5:7101", 2000) == "10.0.0.5:9101"
    assert peer_address("[::1]:7101", 1) == "[::1]:7102"
    for bad in ("7101", "host:", "host:x", ":7101"):
        with pytest.raises(ValueError):
            peer_address(bad, 2000)
    with pytest.raises(ValueError):
        peer_address("h:65000", 2000)


def test_round_trip_and_source_id() -> None:
    seen: list[str] = []

    async def handler(src: str, msg: Any) -> Any:
        seen.append(src)
        return Pong(msg.epoch + 1)

    async def scenario() -> None:
        server = await serve(handler)
        transport = client(server.port, "n7")
        assert await transport.call("peer", Ping(41), 5.0) == Pong(42)
        await transport.close()
        await server.close()

    run(scenario())
    assert seen == ["n7"]


def test_concurrent_calls_complete_out_of_order_with_their_own_replies() -> None:
    async def handler(src: str, msg: Any) -> Any:
        await asyncio.sleep((50 - msg.epoch) / 2000)  # later requests answer first
        return Pong(msg.epoch)

    async def scenario() -> None:
        server = await serve(handler)
        transport = client(server.port)
        replies = await asyncio.gather(*(transport.call("peer", Ping(i), 5.0) for i in range(50)))
        assert replies == [Pong(i) for i in range(50)]
        assert len(server.connections) == 1  # all on one connection
        await transport.close()
        await server.close()

    run(scenario())


def test_handler_errors_reach_the_caller_with_their_class_and_data() -> None:
    async def handler(src: str, msg: Any) -> Any:
        if msg.epoch == 1:
            raise errors.Unavailable(3, 2)
        raise RuntimeError("boom")

    async def scenario() -> None:
        server = await serve(handler)
        transport = client(server.port)
        with pytest.raises(errors.Unavailable) as info:
            await transport.call("peer", Ping(1), 5.0)
        assert (info.value.required, info.value.alive) == (3, 2)
        with pytest.raises(errors.Internal, match="boom"):
            await transport.call("peer", Ping(2), 5.0)
        await transport.close()
        await server.close()

    run(scenario())


def test_unknown_node_and_refused_connection_are_unsent() -> None:
    async def scenario() -> None:
        transport = client(free_port())
        with pytest.raises(TransportError) as unknown:
            await transport.call("nobody", Ping(1), 1.0)
        assert unknown.value.sent is False
        with pytest.raises(TransportError) as refused:
            await transport.call("peer", Ping(1), 1.0)
        assert refused.value.sent is False
        await transport.close()

    run(scenario())


def test_silent_handler_times_out_as_maybe_sent() -> None:
    async def handler(src: str, msg: Any) -> Any:
        await asyncio.sleep(3600)

    async def scenario() -> None:
        server = await serve(handler)
        transport = client(server.port)
        with pytest.raises(TransportError, match="no reply") as info:
            await transport.call("peer", Ping(1), 0.2)
        assert info.value.sent is True
        await transport.close()
        await server.close()

    run(scenario())


def test_connection_lost_mid_call_fails_at_once_as_maybe_sent_then_reconnects() -> None:
    async def scenario() -> None:
        entered = asyncio.Event()

        async def handler(src: str, msg: Any) -> Any:
            if msg.epoch == 1:
                entered.set()
                await asyncio.sleep(3600)
            return Pong(msg.epoch)

        server = await serve(handler)
        port = server.port
        transport = client(port)
        call = asyncio.ensure_future(transport.call("peer", Ping(1), 60.0))
        await entered.wait()
        await server.close()  # drops the connection with the call in flight
        with pytest.raises(TransportError) as info:
            await call  # long before its 60 s timeout (the hang guard is 20 s)
        assert info.value.sent is True
        again = await serve(handler, port=port)  # the peer restarts on the same port
        assert await transport.call("peer", Ping(2), 5.0) == Pong(2)
        await transport.close()
        await again.close()

    run(scenario())


def test_dropped_sources_get_no_reply() -> None:
    async def scenario() -> None:
        server = await serve(drops_from=lambda src: src == "cut")
        cut, ok = client(server.port, "cut"), client(server.port, "ok")
        with pytest.raises(TransportError, match="no reply"):
            await cut.call("peer", Ping(1), 0.2)
        assert await ok.call("peer", Ping(1), 5.0) == Pong(1)
        await cut.close()
        await ok.close()
        await server.close()

    run(scenario())


def test_garbage_closes_only_that_connection() -> None:
    async def scenario() -> None:
        server = await serve()
        transport = client(server.port)
        assert await transport.call("peer", Ping(1), 5.0) == Pong(1)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\xc1" * 16)  # 0xc1 is never valid msgpack
        await writer.drain()
        assert await reader.read() == b""  # the server hung up on it
        writer.close()
        assert await transport.call("peer", Ping(2), 5.0) == Pong(2)
        await transport.close()
        await server.close()

    run(scenario())


def test_set_address_keeps_or_switches_the_connection() -> None:
    async def scenario() -> None:
        first = await serve()
        second = await serve(lambda src, msg: _pong(msg.epoch + 100))
        transport = client(first.port)
        assert await transport.call("peer", Ping(1), 5.0) == Pong(1)
        transport.set_address("peer", f"127.0.0.1:{first.port}")  # same: kept
        assert len(first.connections) == 1
        assert await transport.call("peer", Ping(2), 5.0) == Pong(2)
        transport.set_address("peer", f"127.0.0.1:{second.port}")  # moved
        assert await transport.call("peer", Ping(3), 5.0) == Pong(103)
        await transport.close()
        await first.close()
        await second.close()

    run(scenario())


async def _pong(epoch: int) -> Pong:
    return Pong(epoch)


def test_a_peer_that_stops_reading_bounds_the_send_buffer() -> None:
    async def scenario() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # holds the connection open and never reads

        server = await asyncio.start_server(never_read, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = TcpTransport("caller", OFFSET, max_buffer=256 * 1024)
        transport.set_address("peer", f"127.0.0.1:{port}")
        big = ReplicaRead((b"x" * 100_000,))
        outcomes: list[bool] = []
        for _ in range(2_000):  # bounded: 200 MB at most; kernel buffers hold a few MB
            try:
                await transport.call("peer", big, 0.001)
            except TransportError as exc:
                outcomes.append(exc.sent)
                if exc.sent is False:
                    break
        assert outcomes[-1] is False, "calls never failed fast on a full send buffer"
        await transport.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()

    run(scenario())
