"""The Transport seam: how node logic talks to other nodes.

Node code sends a message (a registered dataclass, see :mod:`kvcluster.net.codec`)
to a node id and awaits the reply. It never opens sockets: the TCP and gRPC
transports (:mod:`kvcluster.net.tcp_transport`, :mod:`kvcluster.net.grpc_transport`)
do that for real nodes and the simulated network (:mod:`kvcluster.sim.network`)
for the deterministic simulator.

A handler on the receiving side answers with a reply message or raises a
:class:`kvcluster.errors.KVError`, which reaches the caller as the same class.
Anything else a handler raises reaches the caller as ``errors.Internal``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

NodeId = str

#: ``handler(source_node, message) -> reply``
Handler = Callable[[NodeId, Any], Awaitable[Any]]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> ``(host, port)``; ValueError unless the port is 0..65535.

    An IPv6 host keeps its brackets (``[::1]:7101`` -> ``("[::1]", 7101)``).
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


class TransportError(Exception):
    """The message could not be delivered or no reply came in time.

    ``sent`` is False only when the message certainly never reached ``dst``
    (unknown node, connection refused); otherwise the receiver may have acted
    on it, which matters for a message that is not idempotent.
    """

    def __init__(self, dst: NodeId, reason: str, sent: bool = True) -> None:
        super().__init__(f"{dst}: {reason}")
        self.dst = dst
        self.reason = reason
        self.sent = sent


class Transport(Protocol):
    """Request/reply messaging between nodes."""

    async def call(self, dst: NodeId, msg: Any, timeout: float) -> Any:
        """Send ``msg`` to ``dst`` and return its reply.

        Raises :class:`TransportError` when ``dst`` is unknown, unreachable or
        does not answer within ``timeout`` seconds, and the handler's
        :class:`~kvcluster.errors.KVError` when the handler rejects the message.
        """
        ...

    def set_address(self, node: NodeId, address: str) -> None:
        """Tell the transport where ``node`` listens (ignored by the simulator)."""
        ...

    async def close(self) -> None: ...
