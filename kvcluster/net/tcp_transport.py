"""The Transport over plain TCP: one multiplexed connection per peer.

Node-to-node traffic (replication batches, reads, heartbeats, agreement,
Merkle exchanges) is the hottest path in the cluster. A grpc.aio unary call
costs this machine about 0.27 ms of server CPU and 0.2 ms of client CPU, a
framed message on an asyncio socket about 0.02 ms (``python -m benchmarks.rpc_cost``),
so nodes talk to each other the way Cassandra's storage port and Riak's
disterl do: a long-lived TCP connection per peer carrying request/reply frames
tagged with a request id, many requests in flight at once. Clients still speak
gRPC to the service port.

Every frame is one msgpack array, encoded by :mod:`kvcluster.net.codec`
(msgpack is self-delimiting, so the stream needs no length prefix)::

    (HELLO, node_id)            first frame of a connection, from the dialer
    (REQUEST, rid, message)
    (REPLY, rid, message)
    (ERROR, rid, {"kind", "message", **details})    see errors.to_wire

The peer's messaging address is its advertised address with the port moved by
``offset`` (the same on every node, like Cassandra's ``storage_port``).

Failure semantics follow :class:`~kvcluster.net.transport.TransportError`:
a refused or timed-out connect fails with ``sent=False``; a request written
to a connection that then breaks or stays silent fails with ``sent=True``.
Outgoing bytes per connection are bounded: when a peer stops reading
(SIGSTOP, a partition) and ``max_buffer`` bytes are waiting, new calls fail at
once, unsent, instead of growing the buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from kvcluster import errors
from kvcluster.net import codec
from kvcluster.net.transport import Handler, NodeId, TransportError, split_address

log = logging.getLogger(__name__)

HELLO, REQUEST, REPLY, ERROR = 0, 1, 2, 3
MAX_FRAME = 64 * 1024 * 1024
MAX_BUFFER = 32 * 1024 * 1024


def peer_address(address: str, offset: int) -> str:
    """``host:port`` -> ``host:(port + offset)``: where that node's messaging listens."""
    host, port = split_address(address)
    moved = port + offset
    if not 0 < moved < 65536:
        raise ValueError(f"{address} moved by {offset} is not a valid port")
    return f"{host}:{moved}"


class _Connection(asyncio.Protocol):
    """One TCP connection: frame decoding, batched writes, pending replies."""

    def __init__(self, name: str) -> None:
        self.name = name  # the peer, for errors and logs
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._decoder = codec.stream_decoder(MAX_FRAME)
        self._out: list[bytes] = []
        self._out_bytes = 0  # sum of len(b) for b in _out
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._decoder.feed(data)
            for frame in self._decoder:
                self.frame_received(frame)
        except Exception as exc:  # malformed stream: nothing after it can be trusted
            log.warning("closing connection with %s: bad frame (%s)", self.name, exc)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self._out_bytes = 0

    # -- for subclasses -----------------------------------------------------------

    def frame_received(self, frame: Any) -> None:
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """Queue an encoded frame; frames queued in one loop turn go out in one write."""
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def buffered(self) -> int:
        pending = self.transport.get_write_buffer_size() if self.transport else 0
        return pending + self._out_bytes

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed and self.transport is not None:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
            self.transport.write(data)


class _ClientConnection(_Connection):
    """The dialing side: sends requests, resolves their futures from replies."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self._next_rid = 0

    def request(self, msg: Any) -> tuple[int, asyncio.Future[Any]]:
        self._next_rid += 1
        rid = self._next_rid
        data = codec.encode((REQUEST, rid, msg))  # TypeError here: nothing was sent
        future = self._loop.create_future()
        self.pending[rid] = future
        self.send(data)
        return rid, future

    def frame_received(self, frame: Any) -> None:
        kind, rid, body = frame
        future = self.pending.pop(rid, None)
        if future is None or future.done():
            return  # the caller gave up (timeout) before the reply came
        if kind == REPLY:
            future.set_result(body)
        elif kind == ERROR:
            details = dict(body)
            kind_name = str(details.pop("kind", ""))
            message = str(details.pop("message", ""))
            future.set_exception(errors.from_wire(kind_name, message, details))
        else:
            raise ValueError(f"unexpected frame kind {kind}")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        reason = f"connection lost ({exc})" if exc else "connection closed"
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(TransportError(self.name, reason, sent=True))


class _Peer:
    """Calls to one node: (re)connects on demand, one connect attempt at a time."""

    def __init__(self, owner: TcpTransport, node: NodeId, address: str) -> None:
        self.node = node
        self.address = address
        self._owner = owner
        self._conn: _ClientConnection | None = None
        self._connecting: asyncio.Task[_ClientConnection] | None = None

    async def call(self, msg: Any, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect(timeout)
        if conn.closed:  # it broke between the connect and now: the request would be lost
            raise TransportError(self.node, "connection closed before sending", sent=False)
        if conn.buffered() > self._owner.max_buffer:
            raise TransportError(self.node, "peer is not reading (send buffer full)", sent=False)
        rid, future = conn.request(msg)
        timer = loop.call_at(deadline, _expire, future, self.node, timeout)
        try:
            return await future
        finally:
            timer.cancel()
            conn.pending.pop(rid, None)

    async def _connect(self, timeout: float) -> _ClientConnection:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._dial())
        connecting = self._connecting
        try:
            return await asyncio.wait_for(asyncio.shield(connecting), timeout)
        except asyncio.CancelledError:
            # close() (or set_address) cancelled the dial, not our caller: a failed call
            me = asyncio.current_task()
            if connecting.cancelled() and (me is None or not me.cancelling()):
                raise TransportError(self.node, "closed while connecting", sent=False) from None
            raise
        except TimeoutError:
            reason = f"no connection within {timeout:.3g}s"
            raise TransportError(self.node, reason, sent=False) from None
        except OSError as exc:
            raise TransportError(self.node, f"cannot connect: {exc}", sent=False) from None

    async def _dial(self) -> _ClientConnection:
        host, port = split_address(self.address)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _ClientConnection(self.node), host.strip("[]"), port
        )
        conn.send(codec.encode((HELLO, self._owner.node_id)))
        self._conn = conn
        return conn

    def close(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.abort()
            self._conn = None


def _expire(future: asyncio.Future[Any], node: NodeId, timeout: float) -> None:
    if not future.done():
        future.set_exception(TransportError(node, f"no reply within {timeout:.3g}s"))


class TcpTransport:
    """Client side of node-to-node messaging over TCP."""

    def __init__(self, node_id: NodeId, offset: int, max_buffer: int = MAX_BUFFER) -> None:
        self.node_id = node_id
        self.offset = offset
        self.max_buffer = max_buffer
        self._peers: dict[NodeId, _Peer] = {}

    def set_address(self, node: NodeId, address: str) -> None:
        target = peer_address(address, self.offset)
        old = self._peers.get(node)
        if old is not None and old.address == target:
            return
        if old is not None:
            old.close()
        self._peers[node] = _Peer(self, node, target)

    async def call(self, dst: NodeId, msg: Any, timeout: float) -> Any:
        peer = self._peers.get(dst)
        if peer is None:
            raise TransportError(dst, "unknown node", sent=False)
        return await peer.call(msg, timeout)

    async def close(self) -> None:
        for node in sorted(self._peers):
            self._peers[node].close()
        self._peers.clear()


class _ServerConnection(_Connection):
    """The accepting side: runs the node's handler for each request."""

    def __init__(self, server: TcpServer) -> None:
        super().__init__("?")
        self._server = server
        self._tasks: set[asyncio.Task[None]] = set()

    def frame_received(self, frame: Any) -> None:
        kind = frame[0]
        if kind == HELLO:
            self.name = str(frame[1])
            return
        if kind != REQUEST:
            raise ValueError(f"unexpected frame kind {kind}")
        _, rid, msg = frame
        drops = self._server.drops_from
        if drops is not None and drops(self.name):
            return  # an injected partition: the message is lost, the caller times out
        task = self._loop.create_task(self._serve(rid, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, rid: int, msg: Any) -> None:
        try:
            reply = await self._server.handler(self.name, msg)
            data = codec.encode((REPLY, rid, reply))
        except errors.KVError as exc:
            data = codec.encode((ERROR, rid, errors.to_wire(exc)))
        except Exception as exc:
            log.exception("internal handler failed for a message from %s", self.name)
            err = errors.Internal(f"{type(exc).__name__}: {exc}")
            data = codec.encode((ERROR, rid, errors.to_wire(err)))
        if not self.closed:
            self.send(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)
        for task in list(self._tasks):
            task.cancel()


class TcpServer:
    """Accepts peers' connections and answers their requests with ``handler``."""

    def __init__(
        self, handler: Handler, drops_from: Callable[[NodeId], bool] | None = None
    ) -> None:
        self.handler = handler
        self.drops_from = drops_from
        self.connections: set[_ServerConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, address: str) -> None:
        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), host.strip("[]"), port, reuse_address=True
        )

    @property
    def port(self) -> int:
        """The port it listens on (useful after ``start("host:0")``)."""
        assert self._server is not None, "not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.abort()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.wait_closed()
            self._server = None
