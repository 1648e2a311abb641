"""An in-memory network for the deterministic simulator, with injectable faults.

:class:`SimNetwork` connects the nodes of a simulated cluster. Each node gets a
:class:`SimTransport` (the :class:`kvcluster.net.transport.Transport` of the
simulation) from :meth:`SimNetwork.endpoint`. Every request and every reply is
encoded with :mod:`kvcluster.net.codec` when sent and decoded on arrival, so
serialization is exercised and no object is ever shared between two nodes.

Each message travels with a latency drawn from the network's seeded
:class:`random.Random`, so messages reorder; under :class:`kvcluster.sim.loop.SimLoop`
latencies and timeouts are virtual and a seed replays exactly.

Faults
------
* ``partition(*groups)`` / ``isolate(node)`` / ``heal()``: messages between
  different groups are dropped (checked when sent and again on arrival).
* ``set_drop_rate`` / ``set_duplicate_rate`` / ``set_latency``: global
  behaviour of every link. A dropped reply means the handler ran but the
  caller times out. A duplicated request runs the handler twice; the caller
  gets the first reply to arrive and the other is discarded.
* ``set_link(a, b, drop=..., latency=...)``: an override for the directed link
  ``a -> b`` (requests from ``a`` to ``b`` and replies from ``a`` to ``b``),
  for asymmetric faults.
* ``crash(node)``: the node stops receiving, every handler task it is running
  is cancelled (their replies are never sent), its pending calls fail with
  :class:`TransportError` and so does every call it makes from then on.
  Messages it sent before crashing are still delivered. Stopping the node's
  own tasks (timers, background loops) is the harness's job: the network only
  makes their calls fail.
* ``restart(node, handler)``: a new incarnation of the node with a fresh
  handler and a fresh :class:`SimTransport`. The crashed incarnation's
  transport stays dead (a zombie task of the old incarnation cannot talk), and
  messages addressed to the old incarnation are not delivered to the new one.

A call fails with :class:`TransportError` at once (without advancing virtual
time) when the destination was never registered (as the gRPC transport does for
an unknown node), the caller has crashed or its transport is closed, and after
``timeout`` virtual seconds when the request or reply is lost or the
destination is down. A handler that raises a :class:`kvcluster.errors.KVError`
makes the call raise the same class with the same fields; any other exception
reaches the caller as :class:`kvcluster.errors.Internal` (and a message the
handler side cannot decode as :class:`kvcluster.errors.InvalidArgument`), as
over gRPC.

Trace
-----
With ``trace=True`` (the default) the network records a
:class:`TraceEvent` ``(time, event, src, dst, msg)`` for every send, delivery,
drop, reply, timeout and fault in :attr:`SimNetwork.trace`; comparing traces is
how determinism is checked. Events: ``send``, ``duplicate``, ``deliver``,
``reply``, ``deliver-reply``, ``discard-reply`` (a duplicate or late reply),
``timeout``, ``drop:random``, ``drop:partition``, ``drop:down``, and the
faults ``crash``, ``restart``, ``partition``, ``heal``, ``set-link``.
``msg`` is the message's class name (``!kind`` for an error reply).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvcluster import errors
from kvcluster.net import codec
from kvcluster.net.transport import Handler, NodeId, TransportError

log = logging.getLogger(__name__)


class TraceEvent(NamedTuple):
    time: float  # virtual seconds (loop.time())
    event: str
    src: NodeId
    dst: NodeId
    msg: str  # message class name, "!kind" for an error reply, or a fault description


# How a reply travels: (_OK, encoded reply) / (_ERR, encoded errors.to_wire dict).
# _CRASHED / _CLOSED resolve the pending calls of a crashed node / closed transport.
_OK = "ok"
_ERR = "err"
_CRASHED = "crashed"
_CLOSED = "closed"


class _Reply(NamedTuple):
    kind: str  # _OK or _ERR
    payload: bytes
    name: str  # for the trace


@dataclass(slots=True)
class _Link:
    drop: float | None
    latency: tuple[float, float] | None


@dataclass(eq=False, slots=True)
class _Incarnation:
    """One life of a node: it ends with a crash, a restart starts the next."""

    node: NodeId
    number: int
    handler: Handler
    alive: bool = True
    closed: bool = False
    # Handler tasks running for incoming requests, by serial (creation order).
    serving: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    # Outgoing calls awaiting a reply: call id -> future of (kind, payload).
    calls: dict[int, asyncio.Future[tuple[str, bytes]]] = field(default_factory=dict)


class SimTransport:
    """The :class:`~kvcluster.net.transport.Transport` of one node incarnation."""

    def __init__(self, network: SimNetwork, incarnation: _Incarnation) -> None:
        self._network = network
        self._incarnation = incarnation

    @property
    def node_id(self) -> NodeId:
        return self._incarnation.node

    async def call(self, dst: NodeId, msg: Any, timeout: float) -> Any:
        return await self._network._call(self._incarnation, dst, msg, timeout)

    def set_address(self, node: NodeId, address: str) -> None:
        """Ignored: simulated nodes are addressed by id."""

    async def close(self) -> None:
        """Fail pending and future calls from this transport (incoming ones still arrive)."""
        inc = self._incarnation
        if not inc.closed:
            inc.closed = True
            _resolve_calls(inc, _CLOSED)


def _resolve_calls(inc: _Incarnation, kind: str) -> None:
    for future in inc.calls.values():
        if not future.done():
            future.set_result((kind, b""))


def _check_rate(name: str, rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], not {rate}")
    return rate


def _check_latency(low: float, high: float) -> tuple[float, float]:
    if not 0.0 <= low <= high:
        raise ValueError(f"latency bounds must satisfy 0 <= min <= max, not ({low}, {high})")
    return (low, high)


class SimNetwork:
    """An in-memory network of simulated nodes; see the module documentation.

    All randomness (latency, drops, duplicates) comes from ``rng``, drawn in an
    order that depends only on the sequence of messages sent.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        min_latency: float = 0.001,
        max_latency: float = 0.005,
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        trace: bool = True,
    ) -> None:
        self._rng = rng
        self._latency = _check_latency(min_latency, max_latency)
        self._drop_rate = _check_rate("drop_rate", drop_rate)
        self._duplicate_rate = _check_rate("duplicate_rate", duplicate_rate)
        self._nodes: dict[NodeId, _Incarnation] = {}
        self._groups: dict[NodeId, int] = {}  # partition group; absent = group 0
        self._group_ids = itertools.count(1)
        self._links: dict[tuple[NodeId, NodeId], _Link] = {}
        self._serials = itertools.count(1)
        #: Whether events are recorded in :attr:`trace`.
        self.tracing = trace
        #: The recorded events, oldest first.
        self.trace: list[TraceEvent] = []

    # -- nodes -----------------------------------------------------------------------

    def endpoint(self, node_id: NodeId, handler: Handler) -> SimTransport:
        """Register a node that answers requests with ``handler``; return its transport."""
        if node_id in self._nodes:
            raise ValueError(f"node {node_id!r} is already registered")
        inc = _Incarnation(node_id, 1, handler)
        self._nodes[node_id] = inc
        return SimTransport(self, inc)

    def nodes(self) -> list[NodeId]:
        """Every registered node, in registration order."""
        return list(self._nodes)

    def is_up(self, node: NodeId) -> bool:
        return self._node(node).alive

    def crash(self, node: NodeId) -> None:
        """Crash ``node``: see the module documentation. Crashing a crashed node is a no-op."""
        inc = self._node(node)
        if not inc.alive:
            return
        inc.alive = False
        self._record("crash", node, "", "")
        tasks = list(inc.serving.values())
        inc.serving.clear()
        for task in tasks:
            task.cancel()
        _resolve_calls(inc, _CRASHED)

    def restart(self, node: NodeId, handler: Handler) -> SimTransport:
        """Start a new incarnation of ``node`` (crashing it first if it is up)."""
        old = self._node(node)
        if old.alive:
            self.crash(node)
        inc = _Incarnation(node, old.number + 1, handler)
        self._nodes[node] = inc
        self._record("restart", node, "", "")
        return SimTransport(self, inc)

    # -- faults ------------------------------------------------------------------------

    def partition(self, *groups: Iterable[NodeId]) -> None:
        """Split the network into ``groups``; nodes named in none form one more group.

        Replaces any previous partition. Messages between groups are dropped.
        """
        assigned: dict[NodeId, int] = {}
        described: list[str] = []
        for group in groups:
            if isinstance(group, str):
                raise TypeError(f"partition groups are collections of node ids, not {group!r}")
            members = list(group)
            gid = next(self._group_ids)
            for node in members:
                self._node(node)
                if node in assigned:
                    raise ValueError(f"node {node!r} is in more than one partition group")
                assigned[node] = gid
            described.append("[" + " ".join(members) + "]")
        self._groups = assigned
        self._record("partition", "", "", " ".join(described))

    def isolate(self, node: NodeId) -> None:
        """Cut ``node`` off from every other node (on top of any current partition)."""
        self._node(node)
        self._groups[node] = next(self._group_ids)
        self._record("partition", "", "", f"isolate {node}")

    def heal(self) -> None:
        """Remove partitions and per-link overrides (global rates and latency stay)."""
        self._groups = {}
        self._links = {}
        self._record("heal", "", "", "")

    def set_drop_rate(self, rate: float) -> None:
        self._drop_rate = _check_rate("drop_rate", rate)

    def set_duplicate_rate(self, rate: float) -> None:
        self._duplicate_rate = _check_rate("duplicate_rate", rate)

    def set_latency(self, min_latency: float, max_latency: float) -> None:
        self._latency = _check_latency(min_latency, max_latency)

    def set_link(
        self,
        src: NodeId,
        dst: NodeId,
        *,
        drop: float | None = None,
        latency: tuple[float, float] | None = None,
    ) -> None:
        """Override the drop rate and/or latency of the directed link ``src -> dst``.

        ``None`` keeps the global setting; with neither given the override is removed.
        """
        self._node(src)
        self._node(dst)
        if drop is None and latency is None:
            self._links.pop((src, dst), None)
        else:
            self._links[(src, dst)] = _Link(
                None if drop is None else _check_rate("drop", drop),
                None if latency is None else _check_latency(*latency),
            )
        self._record("set-link", src, dst, f"drop={drop} latency={latency}")

    # -- internals ---------------------------------------------------------------------

    def _node(self, node: NodeId) -> _Incarnation:
        try:
            return self._nodes[node]
        except KeyError:
            raise ValueError(f"unknown node {node!r}") from None

    def _record(self, event: str, src: NodeId, dst: NodeId, msg: str) -> None:
        if self.tracing:
            try:
                now = asyncio.get_running_loop().time()
            except RuntimeError:  # a fault set up before the simulation starts
                now = 0.0
            self.trace.append(TraceEvent(now, event, src, dst, msg))

    def _partitioned(self, a: NodeId, b: NodeId) -> bool:
        return self._groups.get(a, 0) != self._groups.get(b, 0)

    def _transmit(self, src: NodeId, dst: NodeId, name: str) -> float | None:
        """Decide the fate of one message: its latency, or ``None`` when it is lost.

        Always draws the same random numbers (one for loss, one for latency), so
        a fault changes which messages are lost but not the random stream.
        """
        link = self._links.get((src, dst))
        drop_rate = self._drop_rate
        low, high = self._latency
        if link is not None:
            drop_rate = drop_rate if link.drop is None else link.drop
            low, high = self._latency if link.latency is None else link.latency
        lost = self._rng.random() < drop_rate
        latency: float = self._rng.uniform(low, high)
        if self._partitioned(src, dst):
            self._record("drop:partition", src, dst, name)
            return None
        if lost:
            self._record("drop:random", src, dst, name)
            return None
        return latency

    async def _call(self, caller: _Incarnation, dst: NodeId, msg: Any, wait: float) -> Any:
        target = self._nodes.get(dst)
        refusal = None
        if not caller.alive:
            refusal = f"{caller.node} has crashed"
        elif caller.closed:
            refusal = "transport closed"
        elif target is None:
            refusal = "unknown node"
        if refusal is not None or target is None:
            # Yield once, so that a loop retrying at once on this error is a busy
            # loop (caught by SimLoop's step limit) rather than a hang that never
            # returns to the event loop.
            await asyncio.sleep(0)
            raise TransportError(dst, refusal or "unknown node")
        data = codec.encode(msg)
        name = type(msg).__name__
        loop = asyncio.get_running_loop()
        call_id = next(self._serials)
        future: asyncio.Future[tuple[str, bytes]] = loop.create_future()
        caller.calls[call_id] = future
        self._record("send", caller.node, dst, name)
        copies = 2 if self._rng.random() < self._duplicate_rate else 1
        for copy in range(copies):
            if copy:
                self._record("duplicate", caller.node, dst, name)
            latency = self._transmit(caller.node, dst, name)
            if latency is not None:
                loop.call_later(latency, self._deliver_request, caller, target, call_id, data, name)
        try:
            async with asyncio.timeout(wait):
                kind, payload = await future
        except TimeoutError:
            self._record("timeout", caller.node, dst, name)
            raise TransportError(dst, f"no reply within {wait:.3g}s") from None
        finally:
            caller.calls.pop(call_id, None)
        if kind == _OK:
            return codec.decode(payload)
        if kind == _ERR:
            raise _error_from_payload(payload)
        if kind == _CRASHED:
            raise TransportError(dst, f"{caller.node} has crashed")
        raise TransportError(dst, "transport closed")

    def _deliver_request(
        self, caller: _Incarnation, target: _Incarnation, call_id: int, data: bytes, name: str
    ) -> None:
        if not target.alive:
            self._record("drop:down", caller.node, target.node, name)
            return
        if self._partitioned(caller.node, target.node):
            self._record("drop:partition", caller.node, target.node, name)
            return
        self._record("deliver", caller.node, target.node, name)
        serial = next(self._serials)
        task = asyncio.get_running_loop().create_task(
            self._serve(target, caller, call_id, data),
            name=f"sim-serve:{target.node}<-{caller.node}:{name}#{serial}",
        )
        target.serving[serial] = task
        task.add_done_callback(lambda _t: target.serving.pop(serial, None))

    async def _serve(
        self, server: _Incarnation, caller: _Incarnation, call_id: int, data: bytes
    ) -> None:
        try:
            msg = codec.decode(data)
            answer = await server.handler(caller.node, msg)
            reply = _Reply(_OK, codec.encode(answer), type(answer).__name__)
        except errors.KVError as exc:
            reply = _error_reply(exc)
        except codec.CodecError as exc:
            reply = _error_reply(errors.InvalidArgument(str(exc)))
        except Exception as exc:
            log.exception("simulated handler of %s failed", server.node)
            reply = _error_reply(errors.Internal(f"{type(exc).__name__}: {exc}"))
        if not server.alive:  # crashed, and the handler swallowed the cancellation
            return
        self._record("reply", server.node, caller.node, reply.name)
        latency = self._transmit(server.node, caller.node, reply.name)
        if latency is not None:
            asyncio.get_running_loop().call_later(
                latency, self._deliver_reply, server, caller, call_id, reply
            )

    def _deliver_reply(
        self, server: _Incarnation, caller: _Incarnation, call_id: int, reply: _Reply
    ) -> None:
        if not caller.alive:
            self._record("drop:down", server.node, caller.node, reply.name)
            return
        if self._partitioned(server.node, caller.node):
            self._record("drop:partition", server.node, caller.node, reply.name)
            return
        future = caller.calls.get(call_id)
        if future is None or future.done():
            self._record("discard-reply", server.node, caller.node, reply.name)
            return
        self._record("deliver-reply", server.node, caller.node, reply.name)
        future.set_result((reply.kind, reply.payload))


def _error_reply(err: errors.KVError) -> _Reply:
    return _Reply(_ERR, codec.encode(errors.to_wire(err)), f"!{err.kind}")


def _error_from_payload(payload: bytes) -> errors.KVError:
    wire = dict(codec.decode(payload))
    kind = str(wire.pop("kind"))
    message = str(wire.pop("message"))
    return errors.from_wire(kind, message, wire)
