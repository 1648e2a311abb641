"""CPU per message of the three ways a node can exchange messages, on this machine.

    python -m benchmarks.rpc_cost [--messages 20000] [--concurrency 64]

An echo server runs in a child process; a client sends ``--messages`` 1000-byte
messages with ``--concurrency`` in flight and the script prints throughput and
CPU per message on each side (from /proc and getrusage):

- ``grpc-unary``:  one grpc.aio unary call per message (kvcluster's public API);
- ``grpc-stream``: messages on one bidirectional grpc.aio stream (``KV.Stream``);
- ``tcp``:         msgpack frames on one asyncio TCP connection (node-to-node).

This is why node-to-node traffic uses :mod:`kvcluster.net.tcp_transport` and why
``AsyncClient(pipeline=True)`` exists. Everything stays on 127.0.0.1 and both
processes exit when the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from benchmarks.systems import process_cpu_seconds, self_cpu_seconds
from kvcluster.net import codec
from kvcluster.net.grpc_options import SERVER_OPTIONS
from kvcluster.net.messages import ReplicaRead

PAYLOAD = b"x" * 1000

Echo = Callable[[], Awaitable[Any]]  # one round trip


def _ident(data: bytes) -> bytes:
    return data


async def _grpc_server(port: int, ready: Any, stop: Any) -> None:
    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def stream(requests: Any, context: Any) -> Any:
        async for request in requests:
            yield request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=_ident, response_serializer=_ident
            ),
            "Stream": grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=_ident, response_serializer=_ident
            ),
        },
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)  # a taken port fails, as for a node
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    await asyncio.to_thread(stop.wait)
    await server.stop(0)


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.decoder = codec.stream_decoder(1 << 20)

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        self.transport.write(b"".join(codec.encode(frame) for frame in self.decoder))


async def _tcp_server(port: int, ready: Any, stop: Any) -> None:
    server = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", port)
    ready.set()
    await asyncio.to_thread(stop.wait)
    server.close()


def _serve(kind: str, port: int, ready: Any, stop: Any) -> None:
    main = _tcp_server if kind == "tcp" else _grpc_server
    asyncio.run(main(port, ready, stop))


async def _connect(kind: str, port: int) -> tuple[Echo, Callable[[], Awaitable[None]]]:
    """One echo round trip over ``kind`` (callable concurrently), and how to close it."""
    address = f"127.0.0.1:{port}"
    if kind == "grpc-unary":
        channel = grpc.aio.insecure_channel(address)
        call = channel.unary_unary(
            "/bench.Echo/Unary", request_serializer=_ident, response_deserializer=_ident
        )
        return lambda: call(PAYLOAD), channel.close

    # grpc-stream and tcp: one connection, replies in the order of the requests
    loop = asyncio.get_running_loop()
    waiters: deque[asyncio.Future[Any]] = deque()
    if kind == "grpc-stream":
        channel = grpc.aio.insecure_channel(address)
        stream = channel.stream_stream(
            "/bench.Echo/Stream", request_serializer=_ident, response_deserializer=_ident
        )()
        outbox: asyncio.Queue[bytes] = asyncio.Queue()

        async def writer() -> None:  # one write at a time on a grpc.aio stream
            while True:
                await stream.write(await outbox.get())

        async def reader() -> None:
            while (reply := await stream.read()) is not grpc.aio.EOF:
                waiters.popleft().set_result(reply)

        tasks = [loop.create_task(writer()), loop.create_task(reader())]

        def send(msg: bytes) -> None:
            outbox.put_nowait(msg)

        async def disconnect() -> None:
            await channel.close()

    else:
        reader_s, writer_s = await asyncio.open_connection("127.0.0.1", port)
        decoder = codec.stream_decoder(1 << 20)

        async def tcp_reader() -> None:
            while data := await reader_s.read(65536):
                decoder.feed(data)
                for frame in decoder:
                    waiters.popleft().set_result(frame)

        tasks = [loop.create_task(tcp_reader())]

        def send(msg: bytes) -> None:
            writer_s.write(codec.encode((1, 1, ReplicaRead((msg,)))))

        async def disconnect() -> None:
            writer_s.close()
            await writer_s.wait_closed()

    async def echo() -> Any:
        future = loop.create_future()
        waiters.append(future)
        send(PAYLOAD)
        return await future

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await disconnect()

    return echo, close


async def _client(kind: str, port: int, messages: int, concurrency: int) -> float:
    """Seconds to echo ``messages`` messages over ``kind`` with ``concurrency`` in flight."""
    echo, close = await _connect(kind, port)
    try:
        await echo()  # connected: the timing below is of messages only
        left = messages

        async def sender() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await echo()

        start = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        return time.perf_counter() - start
    finally:
        await close()


def _server_cpu(pid: int) -> float:
    cpu = process_cpu_seconds(pid)
    if cpu is None:
        raise RuntimeError(f"the echo server (pid {pid}) has exited")
    return cpu


def measure(kind: str, messages: int, concurrency: int, port: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(target=_serve, args=(kind, port, ready, stop), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError(f"{kind} echo server did not start")
        server_cpu, client_cpu = _server_cpu(server.pid or 0), self_cpu_seconds()
        elapsed = asyncio.run(_client(kind, port, messages, concurrency))
        server_cpu = _server_cpu(server.pid or 0) - server_cpu
        client_cpu = self_cpu_seconds() - client_cpu
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.kill()
            server.join()
    return {
        "messages_per_s": messages / elapsed,
        "server_ms": 1000 * server_cpu / messages,
        "client_ms": 1000 * client_cpu / messages,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--port", type=int, default=7990, help="echo server port on 127.0.0.1")
    args = p.parse_args()
    if not 1 <= args.messages <= 1_000_000:
        p.error("--messages must be within 1..1000000")
    print(f"{args.messages} messages of {len(PAYLOAD)} B, {args.concurrency} in flight")
    print(f"{'transport':<12} {'msgs/s':>9} {'server ms/msg':>14} {'client ms/msg':>14}")
    for kind in ("grpc-unary", "grpc-stream", "tcp"):
        r = measure(kind, args.messages, args.concurrency, args.port)
        rate, server_ms, client_ms = r["messages_per_s"], r["server_ms"], r["client_ms"]
        print(f"{kind:<12} {rate:>9,.0f} {server_ms:>14.3f} {client_ms:>14.3f}")


if __name__ == "__main__":
    main()
