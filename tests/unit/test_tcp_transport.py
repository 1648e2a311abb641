"""Node-to-node messaging over plain TCP (kvcluster.net.tcp_transport), on loopback.

Every test runs a real :class:`TcpServer` (or a raw asyncio server standing in
for a misbehaving peer) on ``127.0.0.1`` port 0 and talks to it through a
:class:`TcpTransport` whose offset is the production default, so the address
given to ``set_address`` is the peer's service address, ``offset`` below its
messaging port.

Ordering is forced with events, not by racing the clock (one test staggers
handler sleeps by 2 ms, after a barrier, to get replies out of order); the few
timeouts that must expire are short (0.2 s). Each scenario runs under a hang guard: a call that
ought to fail "at once" is given a long timeout (60 s), so a missing failure
shows up as the guard firing, and its elapsed time is also checked against a
bound far below that timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import pytest

from kvcluster import errors
from kvcluster.net import codec, tcp_transport
from kvcluster.net.messages import Ping, Pong, ReplicaRead, ReplicaReadReply
from kvcluster.net.tcp_transport import (
    ERROR,
    HELLO,
    MAX_FRAME,
    REPLY,
    REQUEST,
    TcpServer,
    TcpTransport,
    peer_address,
)
from kvcluster.net.transport import TransportError

OFFSET = 2000  # the config default: messaging port = service port + 2000
LONG = 60.0  # timeout of calls that must fail long before it
PROMPT = 5.0  # "at once": far below LONG, far above any loopback latency
GUARD = 20.0  # the hang guard of a whole scenario


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, GUARD))


async def echo(src: str, msg: Any) -> Any:
    return Pong(msg.epoch)


async def start_server(
    handler: Callable[[str, Any], Awaitable[Any]] = echo, **kw: Any
) -> TcpServer:
    server = TcpServer(handler, **kw)
    await server.start("127.0.0.1:0")
    return server


def service_address(port: int) -> str:
    """The advertised address whose messaging port (+ OFFSET) is ``port``."""
    return f"127.0.0.1:{port - OFFSET}"


def transport_to(port: int, node_id: str = "n1", **kw: Any) -> TcpTransport:
    transport = TcpTransport(node_id, OFFSET, **kw)
    transport.set_address("peer", service_address(port))
    return transport


async def failure(call: Awaitable[Any]) -> tuple[TransportError, float]:
    """Await a call that must fail with TransportError; also return how long it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TransportError) as info:
        await call
    return info.value, loop.time() - start


@contextlib.asynccontextmanager
async def connected(
    handler: Callable[[str, Any], Awaitable[Any]] = echo, node_id: str = "n1", **kw: Any
) -> AsyncIterator[tuple[TcpServer, TcpTransport]]:
    """A started server and a transport to it (as ``"peer"``); both closed at the end."""
    server = await start_server(handler, **kw)
    transport = transport_to(server.port, node_id)
    try:
        yield server, transport
    finally:
        await transport.close()
        await server.close()


class Held:
    """A handler that holds requests until ``release`` is set, then echoes them.

    It holds every request, or only ``Ping(epoch)`` when ``epoch`` is given, and
    sets ``entered`` once a held request reached it. Never released, it never answers.
    """

    def __init__(self, epoch: int | None = None) -> None:
        self.epoch = epoch
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, src: str, msg: Any) -> Any:
        if self.epoch is None or msg.epoch == self.epoch:
            self.entered.set()
            await self.release.wait()
        return Pong(msg.epoch)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (the hang guard bounds it)."""
    while not condition():  # noqa: ASYNC110 (the state polled has no event to wait on)
        await asyncio.sleep(0.001)


async def raw_server(
    protocol: Callable[[], asyncio.Protocol], sock: socket.socket | None = None
) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    if sock is None:
        server = await loop.create_server(protocol, "127.0.0.1", 0)
    else:
        server = await loop.create_server(protocol, sock=sock)
    port: int = server.sockets[0].getsockname()[1]
    return server, port


async def hung_up(reader: asyncio.StreamReader) -> bool:
    """Whether the other end closed the connection (a FIN or a reset)."""
    try:
        return await reader.read() == b""
    except ConnectionResetError:
        return True


def closed_port() -> socket.socket:
    """A socket bound to a loopback port, not listening: connecting there is refused.

    Keeping it bound (the caller closes it) stops anything else taking the port.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class HeldDials:
    """Stands in for the running loop's ``create_connection``: counts the dials and
    holds each until ``release`` is set, then really connects. Never released, a dial
    hangs like a SYN lost in a partition."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loop = asyncio.get_running_loop()
        self._real = loop.create_connection
        self.count = 0
        self.dialing = asyncio.Event()
        self.release = asyncio.Event()
        monkeypatch.setattr(loop, "create_connection", self)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        self.dialing.set()
        await self.release.wait()
        return await self._real(*args, **kwargs)


# -- peer_address -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "offset", "moved"),
    [
        ("h:7101", 2000, "h:9101"),
        ("10.0.0.5:7101", 2000, "10.0.0.5:9101"),
        ("[::1]:7101", 2000, "[::1]:9101"),
        ("node-3.example:1", 65534, "node-3.example:65535"),
        ("h:7101", -7100, "h:1"),
        ("h:7101", 0, "h:7101"),
    ],
)
def test_peer_address_moves_the_port(address: str, offset: int, moved: str) -> None:
    assert peer_address(address, offset) == moved


@pytest.mark.parametrize(
    ("address", "offset"),
    [
        ("7101", 2000),  # no host
        (":7101", 2000),
        ("h:", 2000),  # no port
        ("h", 2000),
        ("", 2000),
        ("h:http", 2000),
        ("h:-1", 2000),
        ("h:7101 ", 2000),
        ("h:63536", 2000),  # 65536
        ("h:7101", -7101),  # 0
        ("h:7101", -8000),
    ],
)
def test_peer_address_rejects_invalid_input(address: str, offset: int) -> None:
    with pytest.raises(ValueError):
        peer_address(address, offset)


# -- request / reply ----------------------------------------------------------------------------


def test_round_trip_with_the_callers_node_id_as_source() -> None:
    seen: list[tuple[str, Any]] = []

    async def handler(src: str, msg: Any) -> Any:
        seen.append((src, msg))
        if isinstance(msg, ReplicaRead):
            return ReplicaReadReply(tuple(k[::-1] for k in msg.pkeys))
        return Pong(msg.epoch + 1)

    async def scenario() -> None:
        async with connected(handler, "n7") as (server, transport):
            assert await transport.call("peer", Ping(41), LONG) == Pong(42)
            reply = await transport.call("peer", ReplicaRead((b"ab", b"", b"\x00\xff")), LONG)
            assert reply == ReplicaReadReply((b"ba", b"", b"\xff\x00"))
            assert len(server.connections) == 1  # both calls on one connection

    run(scenario())
    assert seen == [("n7", Ping(41)), ("n7", ReplicaRead((b"ab", b"", b"\x00\xff")))]


def test_sources_are_told_apart_per_connection() -> None:
    seen: list[str] = []

    async def handler(src: str, msg: Any) -> Any:
        seen.append(src)
        return Pong(msg.epoch)

    async def scenario() -> None:
        async with connected(handler, "a") as (server, a):
            b = transport_to(server.port, "b")
            assert await a.call("peer", Ping(1), LONG) == Pong(1)
            assert await b.call("peer", Ping(2), LONG) == Pong(2)
            assert await a.call("peer", Ping(3), LONG) == Pong(3)
            assert len(server.connections) == 2
            await b.close()

    run(scenario())
    assert seen == ["a", "b", "a"]


def test_concurrent_calls_on_one_connection_complete_out_of_order() -> None:
    n = 40

    async def scenario() -> None:
        arrived = 0
        all_arrived = asyncio.Event()
        answered: list[int] = []

        async def handler(src: str, msg: Any) -> Any:
            nonlocal arrived
            arrived += 1
            if arrived == n:
                all_arrived.set()
            await all_arrived.wait()  # all n requests are in flight at once
            await asyncio.sleep((n - msg.epoch) * 0.002)  # the last sent answers first
            answered.append(msg.epoch)
            return Pong(msg.epoch * 10)

        completed: list[int] = []
        async with connected(handler) as (server, transport):

            async def one(i: int) -> Any:
                reply = await transport.call("peer", Ping(i), LONG)
                completed.append(i)
                return reply

            replies = await asyncio.gather(*(one(i) for i in range(n)))
            assert replies == [Pong(i * 10) for i in range(n)]  # each its own reply
            assert sorted(completed) == list(range(n))
            assert completed == answered  # in the order the handler answered...
            assert completed != sorted(completed)  # ...which is not the order of the requests
            assert len(server.connections) == 1

    run(scenario())


def test_calls_on_a_new_peer_share_one_connect() -> None:
    async def scenario() -> None:
        async with connected() as (server, transport):
            calls = (transport.call("peer", Ping(i), LONG) for i in range(20))
            assert await asyncio.gather(*calls) == [Pong(i) for i in range(20)]
            assert len(server.connections) == 1

    run(scenario())


# -- errors raised by the handler ---------------------------------------------------------------


@pytest.mark.parametrize(
    "err",
    [
        errors.Unavailable(3, 2),
        errors.Timeout(2, 1),
        errors.InvalidArgument("key too long", "key"),
        errors.Overloaded(queue="writes"),
        errors.NotReady("no ring yet"),
        errors.StorageFull("disk full"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_kverror_reaches_the_caller_as_the_same_class_with_its_data(
    err: errors.KVError,
) -> None:
    async def handler(src: str, msg: Any) -> Any:
        raise err

    async def scenario() -> None:
        async with connected(handler) as (_, transport):
            with pytest.raises(errors.KVError) as info:
                await transport.call("peer", Ping(1), LONG)
            assert type(info.value) is type(err)
            assert errors.to_wire(info.value) == errors.to_wire(err)
            # every field as an attribute too: e.g. Unavailable's message, required, alive
            assert vars(info.value) == vars(err)

    run(scenario())


def test_other_exceptions_reach_the_caller_as_internal() -> None:
    async def handler(src: str, msg: Any) -> Any:
        if msg.epoch == 1:
            raise RuntimeError("boom")
        if msg.epoch == 2:
            return object()  # not encodable: fails on the server, not on the wire
        return Pong(msg.epoch)

    async def scenario() -> None:
        async with connected(handler) as (server, transport):
            with pytest.raises(errors.Internal, match="RuntimeError: boom"):
                await transport.call("peer", Ping(1), LONG)
            with pytest.raises(errors.Internal, match="TypeError"):
                await transport.call("peer", Ping(2), LONG)
            assert await transport.call("peer", Ping(3), LONG) == Pong(3)  # connection intact
            assert len(server.connections) == 1

    run(scenario())


def test_an_unencodable_message_fails_before_anything_is_sent() -> None:
    seen: list[Any] = []

    async def handler(src: str, msg: Any) -> Any:
        seen.append(msg)
        return Pong(msg.epoch)

    async def scenario() -> None:
        async with connected(handler) as (server, transport):
            assert await transport.call("peer", Ping(1), LONG) == Pong(1)
            with pytest.raises(TypeError):
                await transport.call("peer", object(), LONG)
            assert await transport.call("peer", Ping(2), LONG) == Pong(2)
            assert len(server.connections) == 1  # the failed encode did not break it

    run(scenario())
    assert seen == [Ping(1), Ping(2)]


# -- unsent failures ----------------------------------------------------------------------------


def test_unknown_node_is_unsent() -> None:
    async def scenario() -> None:
        transport = TcpTransport("n1", OFFSET)
        err, elapsed = await failure(transport.call("nobody", Ping(1), LONG))
        assert err.sent is False
        assert err.dst == "nobody"
        assert elapsed < PROMPT
        await transport.close()

    run(scenario())


def test_connection_refused_is_unsent() -> None:
    async def scenario() -> None:
        with closed_port() as sock:
            transport = transport_to(sock.getsockname()[1])
            for _ in range(2):  # a failed connect is retried by the next call
                err, elapsed = await failure(transport.call("peer", Ping(1), LONG))
                assert err.sent is False
                assert err.dst == "peer"
                assert "cannot connect" in err.reason
                assert elapsed < PROMPT
            await transport.close()

    run(scenario())


def test_connect_that_does_not_complete_times_out_unsent(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        dials = HeldDials(monkeypatch)  # never released
        transport = transport_to(40000)
        first = asyncio.ensure_future(failure(transport.call("peer", Ping(1), 0.2)))
        second = asyncio.ensure_future(failure(transport.call("peer", Ping(2), 0.2)))
        for err, elapsed in await asyncio.gather(first, second):
            assert err.sent is False
            assert "no connection" in err.reason
            assert 0.15 <= elapsed < PROMPT
        assert dials.count == 1  # one connect attempt at a time
        await transport.close()

    run(scenario())


def test_closing_the_transport_while_connecting_fails_the_call_unsent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: the cancelled connect used to reach the caller as CancelledError."""

    async def scenario() -> None:
        dials = HeldDials(monkeypatch)  # never released
        transport = transport_to(40000)
        call = asyncio.ensure_future(failure(transport.call("peer", Ping(1), LONG)))
        await dials.dialing.wait()  # the call is now waiting for the connect
        assert not call.done()
        await transport.close()
        err, elapsed = await call
        assert err.sent is False
        assert elapsed < PROMPT

    run(scenario())


def test_moving_the_peer_while_connecting_fails_the_call_unsent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        server = await start_server()
        dials = HeldDials(monkeypatch)
        transport = transport_to(40000)
        call = asyncio.ensure_future(failure(transport.call("peer", Ping(1), LONG)))
        await dials.dialing.wait()  # the call is now waiting for the connect
        transport.set_address("peer", service_address(server.port))
        err, _ = await call
        assert err.sent is False
        dials.release.set()
        assert await transport.call("peer", Ping(2), LONG) == Pong(2)  # the new address
        await transport.close()
        await server.close()

    run(scenario())


def test_cancelling_a_caller_while_connecting_is_a_plain_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        async with connected() as (server, transport):
            dials = HeldDials(monkeypatch)
            call = asyncio.ensure_future(transport.call("peer", Ping(1), LONG))
            await dials.dialing.wait()  # the call is now waiting for the connect
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            dials.release.set()
            assert await transport.call("peer", Ping(2), LONG) == Pong(2)
            # the first call's connect was not wasted: it went on and the second used it
            assert dials.count == 1
            assert len(server.connections) == 1

    run(scenario())


class _HangUp(asyncio.Protocol):
    """A peer that accepts a connection and closes it at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def test_a_peer_that_hangs_up_on_connect_fails_the_call_at_once_unsent() -> None:
    """Regression: the request used to be queued on the dead connection and wait out its timeout."""

    async def scenario() -> None:
        server, port = await raw_server(_HangUp)
        for _ in range(5):
            transport = transport_to(port)
            err, elapsed = await failure(transport.call("peer", Ping(1), LONG))
            assert elapsed < PROMPT
            assert err.sent is False
            await transport.close()
        server.close()

    run(scenario())


# -- sent (or maybe sent) failures --------------------------------------------------------------


def test_a_handler_that_never_answers_times_out_as_maybe_sent() -> None:
    async def scenario() -> None:
        held = Held(epoch=1)
        async with connected(held) as (server, transport):
            err, elapsed = await failure(transport.call("peer", Ping(1), 0.2))
            assert held.entered.is_set()  # it did reach the handler
            assert err.sent is True
            assert "no reply" in err.reason
            assert 0.15 <= elapsed < PROMPT
            assert await transport.call("peer", Ping(2), LONG) == Pong(2)  # connection kept
            assert len(server.connections) == 1

    run(scenario())


def test_a_late_reply_after_a_timeout_is_ignored() -> None:
    async def scenario() -> None:
        held = Held(epoch=1)
        async with connected(held) as (server, transport):
            err, _ = await failure(transport.call("peer", Ping(1), 0.2))
            assert err.sent is True
            held.release.set()  # now the reply to Ping(1) arrives, with nobody waiting for it
            for i in range(2, 5):
                assert await transport.call("peer", Ping(i), LONG) == Pong(i)
            assert len(server.connections) == 1  # the stray reply broke nothing

    run(scenario())


def test_server_close_with_calls_pending_fails_them_at_once_then_reconnects() -> None:
    async def scenario() -> None:
        entered = 0
        all_entered = asyncio.Event()

        async def stuck(src: str, msg: Any) -> Any:
            nonlocal entered
            entered += 1
            if entered == 3:
                all_entered.set()
            await asyncio.Event().wait()

        server = await start_server(stuck)
        port = server.port
        transport = transport_to(port)
        calls = [
            asyncio.ensure_future(failure(transport.call("peer", Ping(i), LONG))) for i in range(3)
        ]
        await all_entered.wait()
        await server.close()  # the peer goes away with three calls in flight
        for err, elapsed in await asyncio.gather(*calls):
            assert err.sent is True
            assert elapsed < PROMPT

        # while it is down: refused, unsent
        err, _ = await failure(transport.call("peer", Ping(9), LONG))
        assert err.sent is False

        restarted = TcpServer(echo)
        await restarted.start(f"127.0.0.1:{port}")  # same port
        assert await transport.call("peer", Ping(10), LONG) == Pong(10)
        assert len(restarted.connections) == 1
        await transport.close()
        await restarted.close()

    run(scenario())


def test_restart_right_after_the_drop_is_noticed_reconnects() -> None:
    async def scenario() -> None:
        server = await start_server()
        port = server.port
        transport = transport_to(port)
        assert await transport.call("peer", Ping(1), LONG) == Pong(1)
        await server.close()
        restarted = TcpServer(echo)
        await restarted.start(f"127.0.0.1:{port}")
        # the first call may still find the old connection open (the drop not yet
        # read): it then fails as maybe-sent at once; the next one must reconnect
        try:
            assert await transport.call("peer", Ping(2), LONG) == Pong(2)
        except TransportError as err:
            assert err.sent is True, err
        assert await transport.call("peer", Ping(3), LONG) == Pong(3)
        await transport.close()
        await restarted.close()

    run(scenario())


def test_a_dropped_connection_fails_pending_calls_at_once() -> None:
    async def scenario() -> None:
        held = Held()
        async with connected(held) as (server, transport):
            call = asyncio.ensure_future(failure(transport.call("peer", Ping(1), LONG)))
            await held.entered.wait()
            (conn,) = server.connections
            conn.abort()  # a reset connection; the server keeps listening
            err, elapsed = await call
            assert err.sent is True
            assert "connection" in err.reason
            assert elapsed < PROMPT

    run(scenario())


def test_closing_the_transport_fails_pending_calls_at_once() -> None:
    async def scenario() -> None:
        held = Held()
        server = await start_server(held)
        transport = transport_to(server.port)
        call = asyncio.ensure_future(failure(transport.call("peer", Ping(1), LONG)))
        await held.entered.wait()
        await transport.close()
        err, elapsed = await call
        assert err.sent is True
        assert elapsed < PROMPT
        err, _ = await failure(transport.call("peer", Ping(2), LONG))
        assert err.sent is False  # closed: the peer is forgotten
        await until(lambda: not server.connections)
        await server.close()

    run(scenario())


class _Garbler(asyncio.Protocol):
    """A "peer" that answers the first request with bytes that are not a frame."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.frames = codec.stream_decoder(MAX_FRAME)

    def data_received(self, data: bytes) -> None:
        self.frames.feed(data)
        for frame in self.frames:
            if frame[0] == REQUEST:
                self.transport.write(b"\xc1")


def test_garbage_from_the_peer_fails_pending_calls_at_once() -> None:
    async def scenario() -> None:
        server, port = await raw_server(_Garbler)
        transport = transport_to(port)
        err, elapsed = await failure(transport.call("peer", Ping(1), LONG))
        assert err.sent is True
        assert elapsed < PROMPT
        await transport.close()
        server.close()

    run(scenario())


# -- injected partitions ------------------------------------------------------------------------


def test_drops_from_a_source_times_out_its_calls_and_heals() -> None:
    async def scenario() -> None:
        cut = {"a"}
        seen: list[str] = []

        async def handler(src: str, msg: Any) -> Any:
            seen.append(src)
            return Pong(msg.epoch)

        async with connected(handler, "a", drops_from=lambda src: src in cut) as (server, a):
            b = transport_to(server.port, "b")
            err, elapsed = await failure(a.call("peer", Ping(1), 0.2))
            assert err.sent is True
            assert "no reply" in err.reason
            assert elapsed >= 0.15
            assert await b.call("peer", Ping(2), LONG) == Pong(2)  # others unaffected
            assert seen == ["b"]  # the handler never saw a's message
            cut.clear()  # the partition heals: the same connection carries replies again
            assert await a.call("peer", Ping(3), LONG) == Pong(3)
            assert seen == ["b", "a"]
            assert len(server.connections) == 2
            await b.close()

    run(scenario())


# -- malformed input to the server --------------------------------------------------------------

GARBAGE: list[tuple[str, bytes]] = [
    ("never-valid byte", b"\xc1" * 16),
    ("not an array", msgpack.packb(12345)),
    ("text", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("unknown kind", codec.encode((99, 1, Ping(1)))),
    ("reply sent to server", codec.encode((REPLY, 1, Pong(1)))),
    ("error sent to server", codec.encode((ERROR, 1, {"kind": "x", "message": "y"}))),
    ("request too short", codec.encode((REQUEST, 1))),
    # message tags are 1..127, so ext type 0 can never be a registered message
    ("unknown message tag", msgpack.packb([REQUEST, 1, msgpack.ExtType(0, b"\x90")])),
    ("array over the limit", b"\xdd" + (MAX_FRAME + 1).to_bytes(4, "big")),
    ("hello then garbage", codec.encode((HELLO, "x")) + b"\xc1"),
]


@pytest.mark.parametrize("garbage", [g for _, g in GARBAGE], ids=[name for name, _ in GARBAGE])
def test_garbage_closes_only_that_connection(garbage: bytes) -> None:
    async def scenario() -> None:
        held = Held(epoch=1)
        async with connected(held) as (server, transport):
            in_flight = asyncio.ensure_future(transport.call("peer", Ping(1), LONG))
            await held.entered.wait()  # a well-behaved connection with a call in flight

            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await until(lambda: len(server.connections) == 2)
            writer.write(garbage)
            await writer.drain()
            assert await hung_up(reader)  # the server hung up on it
            writer.close()
            await until(lambda: len(server.connections) == 1)

            held.release.set()
            assert await in_flight == Pong(1)  # the other connection is untouched
            assert await transport.call("peer", Ping(2), LONG) == Pong(2)

    run(scenario())


def test_a_frame_over_max_frame_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_transport, "MAX_FRAME", 4096)

    async def scenario() -> None:
        async with connected() as (server, transport):
            assert await transport.call("peer", Ping(1), LONG) == Pong(1)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(codec.encode((HELLO, "big")))
            writer.write(codec.encode((REQUEST, 1, ReplicaRead((b"x" * 8192,)))))
            await writer.drain()
            assert await hung_up(reader)
            writer.close()
            assert await transport.call("peer", Ping(2), LONG) == Pong(2)

    run(scenario())


def test_large_messages_cross_many_reads() -> None:
    async def handler(src: str, msg: Any) -> Any:
        return ReplicaReadReply(tuple(k[::-1] for k in msg.pkeys))

    async def scenario() -> None:
        async with connected(handler) as (_, transport):
            keys = tuple(bytes([i]) * (512 * 1024) + b"end" for i in range(4))  # 2 MiB
            calls = [transport.call("peer", ReplicaRead(keys[i:]), LONG) for i in range(4)]
            for i, reply in enumerate(await asyncio.gather(*calls)):
                assert reply == ReplicaReadReply(tuple(k[::-1] for k in keys[i:]))

    run(scenario())


def test_stream_decoder_reassembles_frames_split_anywhere() -> None:
    frames = [
        (HELLO, "n1"),
        (REQUEST, 1, Ping(7)),
        (REPLY, 1, Pong(7)),
        (REQUEST, 2, ReplicaRead((b"k" * 300, b""))),
        (ERROR, 2, errors.to_wire(errors.Unavailable(3, 2))),
    ]
    stream = b"".join(codec.encode(f) for f in frames)
    for chunk in (1, 2, 7, 64, len(stream)):
        decoder = codec.stream_decoder(MAX_FRAME)
        out: list[Any] = []
        for i in range(0, len(stream), chunk):
            decoder.feed(stream[i : i + chunk])
            out.extend(decoder)
        assert out == frames


def test_stream_decoder_rejects_an_oversized_frame() -> None:
    decoder = codec.stream_decoder(1000)
    decoder.feed(codec.encode((REQUEST, 1, ReplicaRead((b"x" * 900,)))))
    assert len(list(decoder)) == 1  # under the limit
    with pytest.raises((msgpack.exceptions.BufferFull, ValueError)):
        decoder.feed(codec.encode((REQUEST, 2, ReplicaRead((b"x" * 2000,)))))
        list(decoder)
    array_header = codec.stream_decoder(1000)
    array_header.feed(b"\xdd" + (2000).to_bytes(4, "big"))
    with pytest.raises(ValueError):  # refused from its header alone
        list(array_header)


# -- set_address --------------------------------------------------------------------------------


def test_set_address_with_the_same_address_keeps_the_connection() -> None:
    async def scenario() -> None:
        async with connected() as (server, transport):
            assert await transport.call("peer", Ping(1), LONG) == Pong(1)
            before = set(server.connections)
            transport.set_address("peer", service_address(server.port))
            assert await transport.call("peer", Ping(2), LONG) == Pong(2)
            assert set(server.connections) == before  # the same connection, not a new one

    run(scenario())


def test_set_address_with_a_new_address_switches_peers() -> None:
    async def scenario() -> None:
        held = Held(epoch=1)

        async def new_handler(src: str, msg: Any) -> Any:
            return Pong(msg.epoch + 100)

        old = await start_server(held)
        new = await start_server(new_handler)
        transport = transport_to(old.port)
        assert await transport.call("peer", Ping(0), LONG) == Pong(0)
        pending = asyncio.ensure_future(failure(transport.call("peer", Ping(1), LONG)))
        await held.entered.wait()

        transport.set_address("peer", service_address(new.port))
        err, elapsed = await pending  # the old connection is gone with its call
        assert err.sent is True
        assert elapsed < PROMPT
        assert await transport.call("peer", Ping(2), LONG) == Pong(102)
        await until(lambda: not old.connections)
        assert len(new.connections) == 1
        await transport.close()
        await old.close()
        await new.close()

    run(scenario())


def test_set_address_applies_the_offset() -> None:
    async def scenario() -> None:
        server = await start_server()
        transport = TcpTransport("n1", 1)
        transport.set_address("peer", f"127.0.0.1:{server.port - 1}")
        assert await transport.call("peer", Ping(5), LONG) == Pong(5)
        with pytest.raises(ValueError):
            transport.set_address("other", "no-port")
        await transport.close()
        await server.close()

    run(scenario())


# -- a peer that stops reading ------------------------------------------------------------------


class _Deaf(asyncio.Protocol):
    """A peer that accepts connections and never reads from them (SIGSTOP-like)."""

    def __init__(self, accepted: list[asyncio.Transport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.accepted.append(transport)


def test_a_full_send_buffer_fails_new_calls_at_once_unsent() -> None:
    async def scenario() -> None:
        accepted: list[asyncio.Transport] = []
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        listener.bind(("127.0.0.1", 0))
        server, port = await raw_server(lambda: _Deaf(accepted), listener)
        transport = transport_to(port, max_buffer=64 * 1024)
        big = ReplicaRead((b"x" * 1024 * 1024,))

        in_flight: list[asyncio.Future[tuple[TransportError, float]]] = []
        rejected: tuple[TransportError, float] | None = None
        for _ in range(200):  # the kernel's buffers fill after a few MiB
            call = asyncio.ensure_future(failure(transport.call("peer", big, LONG)))
            await asyncio.sleep(0.005)  # connect, write what the socket takes
            if call.done():
                rejected = call.result()
                break
            in_flight.append(call)
        assert rejected is not None, "calls never failed on a full send buffer"
        err, elapsed = rejected
        assert err.sent is False
        assert "not reading" in err.reason
        assert elapsed < PROMPT
        assert in_flight and not any(c.done() for c in in_flight)  # earlier calls still wait

        # and again at once: the buffer does not grow past the bound
        err, elapsed = await failure(transport.call("peer", Ping(1), LONG))
        assert err.sent is False
        assert elapsed < PROMPT

        await transport.close()  # the calls that went out fail as maybe-sent
        for err, _ in await asyncio.gather(*in_flight):
            assert err.sent is True
        for deaf in accepted:
            deaf.abort()
        server.close()

    run(scenario())
