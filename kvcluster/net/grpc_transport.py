"""The Transport over gRPC (grpc.aio): one ``Internal.Call`` RPC for every message.

Outgoing: one channel per peer address, the caller's node id in the
``kvcluster-from`` metadata, the message encoded by :mod:`kvcluster.net.codec`.
Incoming: :class:`InternalService` decodes the frame, runs the node's handler
and encodes its reply, or the :class:`~kvcluster.errors.KVError` it raised.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import grpc

from kvcluster import errors
from kvcluster.net import codec
from kvcluster.net.grpc_options import CHANNEL_OPTIONS
from kvcluster.net.transport import Handler, NodeId, TransportError
from kvcluster.wire.v1 import internal_pb2, internal_pb2_grpc

log = logging.getLogger(__name__)

FROM_KEY = "kvcluster-from"


class GrpcTransport:
    """Client side of node-to-node messaging."""

    def __init__(self, node_id: NodeId) -> None:
        self.node_id = node_id
        self._addresses: dict[NodeId, str] = {}
        self._stubs: dict[NodeId, internal_pb2_grpc.InternalAsyncStub] = {}
        self._channels: dict[NodeId, grpc.aio.Channel] = {}
        self._retired: list[grpc.aio.Channel] = []
        self._metadata = ((FROM_KEY, node_id),)

    def set_address(self, node: NodeId, address: str) -> None:
        if self._addresses.get(node) == address:
            return
        self._addresses[node] = address
        old = self._channels.pop(node, None)
        self._stubs.pop(node, None)
        if old is not None:
            self._retired.append(old)  # in-flight calls finish; closed with the transport
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._channels[node] = channel
        self._stubs[node] = internal_pb2_grpc.InternalStub(channel)

    async def call(self, dst: NodeId, msg: Any, timeout: float) -> Any:
        stub = self._stubs.get(dst)
        if stub is None:
            raise TransportError(dst, "unknown node", sent=False)
        frame = internal_pb2.Frame(payload=codec.encode(msg))
        try:
            # wait_for_ready: a channel to a peer that just (re)started may still be in
            # reconnect backoff; wait for it (within the deadline) instead of failing
            # at once, which made a fresh cluster fail w=all writes and r=all reads
            reply = await stub.Call(
                frame, timeout=timeout, metadata=self._metadata, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TransportError(dst, f"no reply within {timeout:.3g}s") from None
            details = exc.details() or ""
            sent = not (code == grpc.StatusCode.UNAVAILABLE and never_connected(details))
            raise TransportError(dst, f"{code.name}: {details}", sent=sent) from None
        if reply.error_json:
            raise _error_from_json(reply.error_json)
        return codec.decode(reply.payload)

    async def close(self) -> None:
        channels = list(self._channels.values()) + self._retired
        self._channels.clear()
        self._retired.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close()


class InternalService(internal_pb2_grpc.InternalServicer):
    """Server side: hands each incoming frame to the node's handler."""

    def __init__(
        self, handler: Handler, drops_from: Callable[[NodeId], bool] | None = None
    ) -> None:
        self._handler = handler
        self._drops_from = drops_from

    async def Call(  # noqa: N802 (gRPC method name)
        self, request: internal_pb2.Frame, context: grpc.aio.ServicerContext[Any, Any]
    ) -> internal_pb2.Frame:
        src = ""
        for key, value in context.invocation_metadata() or ():
            if key == FROM_KEY:
                src = str(value)
        if self._drops_from is not None and self._drops_from(src):
            # An injected partition: the message is lost, the caller times out.
            remaining = context.time_remaining()
            await asyncio.sleep(1.0 if remaining is None else remaining + 0.05)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped (injected fault)")
        try:
            msg = codec.decode(request.payload)
            reply = await self._handler(src, msg)
            return internal_pb2.Frame(payload=codec.encode(reply))
        except errors.KVError as exc:
            return internal_pb2.Frame(error_json=_error_to_json(exc))
        except codec.CodecError as exc:
            return internal_pb2.Frame(error_json=_error_to_json(errors.InvalidArgument(str(exc))))
        except Exception as exc:
            log.exception("internal handler failed for a message from %s", src or "?")
            err = errors.Internal(f"{type(exc).__name__}: {exc}")
            return internal_pb2.Frame(error_json=_error_to_json(err))


_CONNECT_FAILURES = (
    "failed to connect",
    "connection refused",
    "dns resolution failed",
    "errors resolving",  # grpcio 1.85: "errors resolving host:port: [... lookup error ...]"
    "connections to all backends failing",
)


def never_connected(details: str) -> bool:
    """Whether a gRPC UNAVAILABLE means the request never left (no connection).

    Other UNAVAILABLE errors (a connection reset or closed mid-call, a server
    shutting down) may come after the request was delivered and acted on.
    """
    text = details.lower()
    return any(marker in text for marker in _CONNECT_FAILURES)


def _error_to_json(err: errors.KVError) -> bytes:
    return json.dumps(errors.to_wire(err)).encode()


def _error_from_json(data: bytes) -> errors.KVError:
    try:
        obj = json.loads(data)
        kind = str(obj.pop("kind"))
        message = str(obj.pop("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return errors.Internal("malformed error frame from peer")
    return errors.from_wire(kind, message, obj)
