"""The blocking client: :class:`Client`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from kvcluster import errors
from kvcluster.client import _core as core
from kvcluster.client._core import Bytes, Quorum, ReadResult, WriteResult
from kvcluster.client.policies import (
    Decision,
    DefaultRetryPolicy,
    LoadBalancingPolicy,
    NodeFailure,
    NodeHealth,
    RetryPolicy,
    TokenAwarePolicy,
)
from kvcluster.net.grpc_options import CHANNEL_OPTIONS
from kvcluster.wire.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc

T = TypeVar("T")


class _Sticky:
    """The coordinator a session keeps using while it answers."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address


class Client:
    """A blocking kvcluster client.

    ``nodes`` are seed addresses (``"host:port"``, a list or a comma-separated
    string). The client learns the ring from them and sends each request to a
    replica of its key, trying other nodes when one is down. Keys and values
    may be bytes or str (encoded as UTF-8). Errors are
    :mod:`kvcluster.errors` exceptions, never raw gRPC errors.
    """

    def __init__(
        self,
        nodes: Sequence[str] | str,
        *,
        timeout: float = 5.0,
        load_balancing: LoadBalancingPolicy | None = None,
        retry: RetryPolicy | None = None,
        ring_refresh: float = 30.0,
    ) -> None:
        if timeout <= 0:
            raise errors.InvalidArgument("timeout must be positive", "timeout")
        self.timeout = timeout
        self.ring_refresh = ring_refresh
        self._router = core.Router(
            core.parse_nodes(nodes), load_balancing or TokenAwarePolicy(), NodeHealth()
        )
        self._retry = retry or DefaultRetryPolicy()
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._ring_stale = True
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise errors.KVError("client is closed")
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels[address] = channel
            return channel

    def _kv(self, address: str) -> kv_pb2_grpc.KVStub:
        return kv_pb2_grpc.KVStub(self._channel(address))

    def _admin(self, address: str) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self._channel(address))

    # -- ring -----------------------------------------------------------------------

    def refresh_ring(self) -> core.RingView | None:
        """Fetch the ring from the first node that answers (None if none has one)."""
        router = self._router
        for address in router.health.order(list(router.nodes())):
            try:
                resp = self._admin(address).Ring(admin_pb2.RingRequest(), timeout=2.0)
            except grpc.RpcError as exc:
                if isinstance(core.translate(exc, address), NodeFailure):
                    router.health.failed(address)
                continue
            for seed in router.seeds_to_identify(resp):
                try:
                    status = self._admin(seed).Status(admin_pb2.StatusRequest(), timeout=1.0)
                except grpc.RpcError:
                    continue  # down now: identified on a later refresh
                router.learn_alias(status.address, seed)
            router.ring = core.RingView.from_response(resp, router.aliases)
            break
        router.ring_fetched_at = time.monotonic()
        self._ring_stale = False
        return router.ring

    def _maybe_refresh(self) -> None:
        age = time.monotonic() - self._router.ring_fetched_at
        if (self._ring_stale and age > 1.0) or age > self.ring_refresh:
            self.refresh_ring()

    # -- the retry loop ---------------------------------------------------------------

    def _call(
        self,
        op: str,
        key: bytes | None,
        method: str,
        request: Any,
        timeout: float,
        sticky: _Sticky | None = None,
    ) -> Any:
        self._maybe_refresh()
        plan = self._router.plan(key)
        if sticky is not None and sticky.address is not None:
            plan = [sticky.address] + [a for a in plan if a != sticky.address]
        deadline = time.monotonic() + timeout + core.DEADLINE_MARGIN
        last: Exception | None = None
        tried: list[str] = []
        for attempt, address in enumerate(plan, start=1):
            remaining = deadline - time.monotonic()
            if remaining <= 0.01:
                break
            tried.append(address)
            try:
                response = getattr(self._kv(address), method)(request, timeout=remaining)
            except grpc.RpcError as exc:
                last = core.translate(exc, address)
                if isinstance(last, NodeFailure):
                    self._router.health.failed(address)
                    self._ring_stale = True
                if self._retry.decide(op, last, attempt) is Decision.RAISE:
                    break
                continue
            self._router.health.succeeded(address)
            if sticky is not None:
                sticky.address = address
            return response
        raise core.final_error(op, last, tried, timeout)

    # -- the API ------------------------------------------------------------------------

    def get(
        self,
        key: Bytes,
        *,
        r: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
        _sticky: _Sticky | None = None,
    ) -> ReadResult:
        """Read ``key``: every sibling value plus the causal context."""
        t = timeout or self.timeout
        req = core.get_request(key, r, strict, t)
        return core.read_result(self._call("get", req.key, "Get", req, t, _sticky))

    def put(
        self,
        key: Bytes,
        value: Bytes,
        *,
        context: bytes | None = None,
        w: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
        _sticky: _Sticky | None = None,
    ) -> WriteResult:
        """Write ``value``. With the ``context`` of a read, it replaces what that
        read saw; without one it supersedes nothing (existing values stay as
        siblings)."""
        t = timeout or self.timeout
        req = core.put_request(key, value, context, w, strict, t)
        return core.write_result(self._call("put", req.key, "Put", req, t, _sticky))

    def delete(
        self,
        key: Bytes,
        *,
        context: bytes | None = None,
        w: Quorum = None,
        r: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
        _sticky: _Sticky | None = None,
    ) -> bool:
        """Delete ``key`` (what ``context`` saw, or what a quorum read sees).

        Returns False when there was nothing to delete."""
        t = timeout or self.timeout
        req = core.delete_request(key, context, w, r, strict, t)
        resp = self._call("delete", req.key, "Delete", req, t, _sticky)
        return bool(resp.found)

    def put_many(
        self,
        items: Iterable[core.PutItem],
        *,
        w: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
    ) -> list[WriteResult | errors.KVError]:
        """Write many keys in few round trips; one result or error per item, in order."""
        t = timeout or self.timeout
        reqs = core.put_requests(items, w, strict, t)
        return self._batched(
            "put_many", "PutMany", reqs, kv_pb2.PutManyRequest, core.write_result, t
        )

    def get_many(
        self,
        keys: Iterable[Bytes],
        *,
        r: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
    ) -> list[ReadResult | errors.KVError]:
        """Read many keys in few round trips; one result or error per key, in order."""
        t = timeout or self.timeout
        reqs = [core.get_request(k, r, strict, t) for k in keys]
        return self._batched(
            "get_many", "GetMany", reqs, kv_pb2.GetManyRequest, core.read_result, t
        )

    def _batched(
        self,
        op: str,
        method: str,
        reqs: list[Any],
        wrap: Any,
        convert: Any,
        timeout: float,
    ) -> list[Any]:
        self._maybe_refresh()
        results: list[Any] = [None] * len(reqs)
        for address, indices in core.group_by_coordinator(self._router, reqs).items():
            batch = wrap(items=[reqs[i] for i in indices])
            try:
                resp = self._call(op, None, method, batch, timeout, _Sticky(address))
            except errors.KVError as exc:
                for i in indices:
                    results[i] = exc
                continue
            for i, item in zip(indices, resp.results, strict=True):
                which = item.WhichOneof("result")
                results[i] = convert(item.ok) if which == "ok" else core.item_error(item.error)
        return results

    # -- operations ---------------------------------------------------------------------

    def status(self, address: str | None = None) -> dict[str, Any]:
        """One node's view of the cluster (members, liveness, hints, ...)."""
        return self._admin_call(address, "Status", admin_pb2.StatusRequest())

    def ring(self, address: str | None = None) -> dict[str, Any]:
        return self._admin_call(address, "Ring", admin_pb2.RingRequest())

    def repair(
        self, partition: int | None = None, address: str | None = None, timeout: float = 3600.0
    ) -> Iterator[dict[str, Any]]:
        """Run anti-entropy now on one node; yields progress dicts, the last has done=True."""
        req = admin_pb2.RepairRequest()
        if partition is not None:
            req.partition = partition
        for node in self._admin_plan(address):
            try:
                for progress in self._admin(node).Repair(req, timeout=timeout):
                    yield _to_dict(progress)
                return
            except grpc.RpcError as exc:
                err = core.translate(exc, node)
                if isinstance(err, NodeFailure) and address is None and not err.sent:
                    continue
                raise core.final_error("repair", err, [node], timeout) from None
        raise errors.Unreachable(self._admin_plan(address))

    def _admin_plan(self, address: str | None) -> list[str]:
        if address is not None:
            return [address]
        return self._router.health.order(list(self._router.nodes()))

    def _admin_call(self, address: str | None, method: str, req: Any) -> dict[str, Any]:
        last: Exception | None = None
        plan = self._admin_plan(address)
        for node in plan:
            try:
                resp = getattr(self._admin(node), method)(req, timeout=self.timeout)
            except grpc.RpcError as exc:
                last = core.translate(exc, node)
                if isinstance(last, NodeFailure):
                    self._router.health.failed(node)
                    continue
                raise last from None
            return _to_dict(resp)
        raise core.final_error(method.lower(), last, plan, self.timeout)

    def session(self) -> Session:
        """A session: every request goes to one coordinator while it answers."""
        return Session(self)


class Session:
    """Sticky coordinator (see :meth:`Client.session`)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._sticky = _Sticky()

    @property
    def coordinator(self) -> str | None:
        return self._sticky.address

    def get(self, key: Bytes, **kw: Any) -> ReadResult:
        return self.client.get(key, _sticky=self._sticky, **kw)

    def put(self, key: Bytes, value: Bytes, **kw: Any) -> WriteResult:
        return self.client.put(key, value, _sticky=self._sticky, **kw)

    def delete(self, key: Bytes, **kw: Any) -> bool:
        return self.client.delete(key, _sticky=self._sticky, **kw)


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _to_dict(msg: Message) -> dict[str, Any]:
    """A response as plain JSON-able data (64-bit integers as ints, not strings)."""
    data = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _fix_int64(msg.DESCRIPTOR, data)
    return data


def _fix_int64(descriptor: Any, data: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict):
                    _fix_int64(field.message_type, item)
