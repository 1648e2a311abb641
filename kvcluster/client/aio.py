"""The asyncio client: :class:`AsyncClient` (same methods as Client, as coroutines)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from kvcluster import errors
from kvcluster.client import _core as core
from kvcluster.client._core import Bytes, Quorum, ReadResult, WriteResult
from kvcluster.client.pipeline import Pipe, pipelined
from kvcluster.client.policies import (
    Decision,
    DefaultRetryPolicy,
    LoadBalancingPolicy,
    NodeFailure,
    NodeHealth,
    RetryPolicy,
    TokenAwarePolicy,
)
from kvcluster.client.sync import _Sticky, _to_dict
from kvcluster.net.grpc_options import CHANNEL_OPTIONS
from kvcluster.wire.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc


class AsyncClient:
    """An asyncio kvcluster client; see :class:`kvcluster.Client` for the semantics.

    Use ``async with AsyncClient([...]) as kv:``; batch calls (``put_many``,
    ``get_many``) send one message per coordinating node, concurrently.

    ``pipeline=True`` sends single-key calls (``get``, ``put``, ``delete``) as
    messages on one long-lived stream per node instead of one RPC each: same
    results and errors, much less CPU per call on both sides when many calls
    run concurrently (see :mod:`kvcluster.client.pipeline`).
    """

    def __init__(
        self,
        nodes: Sequence[str] | str,
        *,
        timeout: float = 5.0,
        load_balancing: LoadBalancingPolicy | None = None,
        retry: RetryPolicy | None = None,
        ring_refresh: float = 30.0,
        pipeline: bool = False,
    ) -> None:
        if timeout <= 0:
            raise errors.InvalidArgument("timeout must be positive", "timeout")
        self.timeout = timeout
        self.ring_refresh = ring_refresh
        self._router = core.Router(
            core.parse_nodes(nodes), load_balancing or TokenAwarePolicy(), NodeHealth()
        )
        self._retry = retry or DefaultRetryPolicy()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._kv_stubs: dict[str, kv_pb2_grpc.KVAsyncStub] = {}
        self.pipeline = pipeline
        self._pipes: dict[str, Pipe] = {}
        self._ring_stale = True
        self._refreshing: asyncio.Task[core.RingView | None] | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        pipes = list(self._pipes.values())
        self._pipes.clear()
        for pipe in pipes:
            await pipe.close()
        channels = list(self._channels.values())
        self._channels.clear()
        self._kv_stubs.clear()
        for channel in channels:
            await channel.close()

    def _channel(self, address: str) -> grpc.aio.Channel:
        if self._closed:
            raise errors.KVError("client is closed")
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def _kv(self, address: str) -> kv_pb2_grpc.KVAsyncStub:
        stub = self._kv_stubs.get(address)
        if stub is None:
            stub = self._kv_stubs[address] = kv_pb2_grpc.KVStub(self._channel(address))
        return stub

    def _pipe(self, address: str) -> Pipe:
        pipe = self._pipes.get(address)
        if pipe is None:
            pipe = self._pipes[address] = Pipe(self._kv(address), address)
        return pipe

    def _admin(self, address: str) -> admin_pb2_grpc.AdminAsyncStub:
        return admin_pb2_grpc.AdminStub(self._channel(address))

    # -- ring -------------------------------------------------------------------------

    async def refresh_ring(self) -> core.RingView | None:
        router = self._router
        for address in router.health.order(list(router.nodes())):
            try:
                resp = await self._admin(address).Ring(admin_pb2.RingRequest(), timeout=2.0)
            except grpc.RpcError as exc:
                if isinstance(core.translate(exc, address), NodeFailure):
                    router.health.failed(address)
                continue
            seeds = router.seeds_to_identify(resp)
            answers = await asyncio.gather(
                *(
                    self._admin(seed).Status(admin_pb2.StatusRequest(), timeout=1.0)
                    for seed in seeds
                ),
                return_exceptions=True,
            )
            for seed, status in zip(seeds, answers, strict=True):
                if isinstance(status, admin_pb2.StatusResponse):
                    router.learn_alias(status.address, seed)
                # an error: that seed is down now and is identified on a later refresh
            router.ring = core.RingView.from_response(resp, router.aliases)
            break
        router.ring_fetched_at = asyncio.get_running_loop().time()
        self._ring_stale = False
        return router.ring

    async def _maybe_refresh(self) -> None:
        age = asyncio.get_running_loop().time() - self._router.ring_fetched_at
        if (self._ring_stale and age > 1.0) or age > self.ring_refresh:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.ensure_future(self.refresh_ring())
            await asyncio.shield(self._refreshing)

    # -- the retry loop -------------------------------------------------------------------

    async def _call(
        self,
        op: str,
        key: bytes | None,
        method: str,
        request: Any,
        timeout: float,
        sticky: _Sticky | None = None,
    ) -> Any:
        await self._maybe_refresh()
        loop = asyncio.get_running_loop()
        plan = self._router.plan(key)
        if sticky is not None and sticky.address is not None:
            plan = [sticky.address] + [a for a in plan if a != sticky.address]
        deadline = loop.time() + timeout + core.DEADLINE_MARGIN
        last: Exception | None = None
        tried: list[str] = []
        for attempt, address in enumerate(plan, start=1):
            remaining = deadline - loop.time()
            if remaining <= 0.01:
                break
            tried.append(address)
            try:
                if self.pipeline and pipelined(method):
                    response = await self._pipe(address).call(method, request, remaining)
                else:
                    response = await getattr(self._kv(address), method)(request, timeout=remaining)
            except (grpc.RpcError, errors.KVError, NodeFailure) as exc:
                last = core.translate(exc, address) if isinstance(exc, grpc.RpcError) else exc
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

    # -- the API ----------------------------------------------------------------------

    async def get(
        self,
        key: Bytes,
        *,
        r: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
        _sticky: _Sticky | None = None,
    ) -> ReadResult:
        t = timeout or self.timeout
        req = core.get_request(key, r, strict, t)
        return core.read_result(await self._call("get", req.key, "Get", req, t, _sticky))

    async def put(
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
        t = timeout or self.timeout
        req = core.put_request(key, value, context, w, strict, t)
        return core.write_result(await self._call("put", req.key, "Put", req, t, _sticky))

    async def delete(
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
        t = timeout or self.timeout
        req = core.delete_request(key, context, w, r, strict, t)
        resp = await self._call("delete", req.key, "Delete", req, t, _sticky)
        return bool(resp.found)

    async def put_many(
        self,
        items: Iterable[core.PutItem],
        *,
        w: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
    ) -> list[WriteResult | errors.KVError]:
        t = timeout or self.timeout
        reqs = core.put_requests(items, w, strict, t)
        return await self._batched(
            "put_many", "PutMany", reqs, kv_pb2.PutManyRequest, core.write_result, t
        )

    async def get_many(
        self,
        keys: Iterable[Bytes],
        *,
        r: Quorum = None,
        strict: bool = False,
        timeout: float | None = None,
    ) -> list[ReadResult | errors.KVError]:
        t = timeout or self.timeout
        reqs = [core.get_request(k, r, strict, t) for k in keys]
        return await self._batched(
            "get_many", "GetMany", reqs, kv_pb2.GetManyRequest, core.read_result, t
        )

    async def _batched(
        self, op: str, method: str, reqs: list[Any], wrap: Any, convert: Any, timeout: float
    ) -> list[Any]:
        await self._maybe_refresh()
        results: list[Any] = [None] * len(reqs)
        groups = core.group_by_coordinator(self._router, reqs)

        async def send(address: str, indices: list[int]) -> None:
            batch = wrap(items=[reqs[i] for i in indices])
            try:
                resp = await self._call(op, None, method, batch, timeout, _Sticky(address))
            except errors.KVError as exc:
                for i in indices:
                    results[i] = exc
                return
            for i, item in zip(indices, resp.results, strict=True):
                which = item.WhichOneof("result")
                results[i] = convert(item.ok) if which == "ok" else core.item_error(item.error)

        await asyncio.gather(*(send(a, idx) for a, idx in groups.items()))
        return results

    # -- operations -------------------------------------------------------------------

    async def status(self, address: str | None = None) -> dict[str, Any]:
        return await self._admin_call(address, "Status", admin_pb2.StatusRequest())

    async def ring(self, address: str | None = None) -> dict[str, Any]:
        return await self._admin_call(address, "Ring", admin_pb2.RingRequest())

    async def repair(
        self, partition: int | None = None, address: str | None = None, timeout: float = 3600.0
    ) -> AsyncIterator[dict[str, Any]]:
        req = admin_pb2.RepairRequest()
        if partition is not None:
            req.partition = partition
        node = address or self._router.health.order(list(self._router.nodes()))[0]
        try:
            async for progress in self._admin(node).Repair(req, timeout=timeout):
                yield _to_dict(progress)
        except grpc.RpcError as exc:
            raise core.final_error("repair", core.translate(exc, node), [node], timeout) from None

    async def _admin_call(self, address: str | None, method: str, req: Any) -> dict[str, Any]:
        plan = [address] if address else self._router.health.order(list(self._router.nodes()))
        last: Exception | None = None
        for node in plan:
            try:
                resp = await getattr(self._admin(node), method)(req, timeout=self.timeout)
            except grpc.RpcError as exc:
                last = core.translate(exc, node)
                if isinstance(last, NodeFailure):
                    self._router.health.failed(node)
                    continue
                raise last from None
            return _to_dict(resp)
        raise core.final_error(method.lower(), last, plan, self.timeout)

    def session(self) -> AsyncSession:
        return AsyncSession(self)


class AsyncSession:
    """Sticky coordinator for an :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._sticky = _Sticky()

    @property
    def coordinator(self) -> str | None:
        return self._sticky.address

    async def get(self, key: Bytes, **kw: Any) -> ReadResult:
        return await self.client.get(key, _sticky=self._sticky, **kw)

    async def put(self, key: Bytes, value: Bytes, **kw: Any) -> WriteResult:
        return await self.client.put(key, value, _sticky=self._sticky, **kw)

    async def delete(self, key: Bytes, **kw: Any) -> bool:
        return await self.client.delete(key, _sticky=self._sticky, **kw)
