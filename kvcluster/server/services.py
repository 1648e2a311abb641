"""gRPC adapters: protobuf <-> core types, KVError <-> status codes.

Nothing here decides anything; each method unpacks a request, calls the
node, and packs the answer. A :class:`~kvcluster.errors.KVError` becomes a
status code plus the ``kvcluster-error-bin`` trailing metadata that the
client turns back into the same exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from kvcluster import errors
from kvcluster.net.faults import Faults, FaultState
from kvcluster.node.coordinator import ReadRequest, ReadResult, WriteRequest, WriteResult
from kvcluster.node.node import Node
from kvcluster.wire.v1 import admin_pb2, admin_pb2_grpc, kv_pb2, kv_pb2_grpc

log = logging.getLogger(__name__)

ERROR_KEY = "kvcluster-error-bin"

STATUS_OF: dict[type[errors.KVError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Timeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotReady: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

T = TypeVar("T")
#: Requests one Stream call may have running at once; more are answered Overloaded.
MAX_STREAM_IN_FLIGHT = 4096
Ctx = grpc.aio.ServicerContext[Any, Any]


def quorum_value(q: kv_pb2.Quorum) -> int | str | None:
    """A request's Quorum as the coordinator takes it (None = node default)."""
    which = q.WhichOneof("value")
    if which == "count":
        return int(q.count)
    if which == "level":
        return {
            kv_pb2.Quorum.LEVEL_ONE: "one",
            kv_pb2.Quorum.LEVEL_QUORUM: "quorum",
            kv_pb2.Quorum.LEVEL_ALL: "all",
        }.get(q.level)
    return None


def _timeout(ms: int) -> float | None:
    return ms / 1000.0 if ms else None


def _read_request(m: kv_pb2.GetRequest) -> ReadRequest:
    return ReadRequest(m.key, quorum_value(m.r), m.strict, _timeout(m.timeout_ms))


def _write_request(m: kv_pb2.PutRequest) -> WriteRequest:
    return WriteRequest(
        m.key, m.value, m.context, quorum_value(m.w), m.strict, _timeout(m.timeout_ms)
    )


def _get_response(result: ReadResult, out: kv_pb2.GetResponse | None = None) -> kv_pb2.GetResponse:
    """``result`` as a GetResponse, filled into ``out`` if given (a batch's item:
    filling it in place saves building a message and copying it in)."""
    msg = kv_pb2.GetResponse() if out is None else out
    msg.SetInParent()  # set even for a key not found (every field empty)
    msg.found = result.found
    msg.values.extend(result.values)
    msg.context = result.context
    return msg


def _put_response(result: WriteResult, out: kv_pb2.PutResponse | None = None) -> kv_pb2.PutResponse:
    """``result`` as a PutResponse, filled into ``out`` if given (see _get_response)."""
    msg = kv_pb2.PutResponse() if out is None else out
    msg.SetInParent()
    msg.context = result.context
    msg.values.extend(result.values)
    return msg


def error_item(err: errors.KVError) -> kv_pb2.ItemError:
    return kv_pb2.ItemError(
        kind=err.kind, message=err.message, details_json=json.dumps(err.details())
    )


async def _abort(context: Ctx, err: errors.KVError) -> None:
    context.set_trailing_metadata(((ERROR_KEY, json.dumps(errors.to_wire(err)).encode()),))
    await context.abort(STATUS_OF.get(type(err), grpc.StatusCode.UNKNOWN), err.message)


class KVService(kv_pb2_grpc.KVServicer):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.metrics = node.metrics

    async def _outcome(self, op: str, call: Callable[[], Awaitable[T]]) -> T | errors.KVError:
        """Run one request: its response or the KVError it failed with (counted in metrics)."""
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await call()
        except errors.KVError as err:
            outcome = err.kind
            return err
        except Exception as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            outcome = "internal"
            log.exception("%s failed", op)
            return errors.Internal(f"{type(exc).__name__}: {exc}")
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(op, outcome).inc()
                self.metrics.latency.labels(op).observe(time.perf_counter() - start)

    async def _run(self, op: str, context: Ctx, call: Callable[[], Awaitable[T]]) -> T:
        result = await self._outcome(op, call)
        if isinstance(result, errors.KVError):
            await _abort(context, result)
            raise AssertionError("unreachable")  # abort() raises
        return result

    async def Get(self, request: kv_pb2.GetRequest, context: Ctx) -> kv_pb2.GetResponse:  # noqa: N802
        return await self._run("get", context, lambda: self._get(request))

    async def _get(self, request: kv_pb2.GetRequest) -> kv_pb2.GetResponse:
        return _get_response(await self.node.coordinator.read(_read_request(request)))

    async def Put(self, request: kv_pb2.PutRequest, context: Ctx) -> kv_pb2.PutResponse:  # noqa: N802
        return await self._run("put", context, lambda: self._put(request))

    async def _put(self, request: kv_pb2.PutRequest) -> kv_pb2.PutResponse:
        return _put_response(await self.node.coordinator.write(_write_request(request)))

    async def Delete(  # noqa: N802
        self, request: kv_pb2.DeleteRequest, context: Ctx
    ) -> kv_pb2.DeleteResponse:
        return await self._run("delete", context, lambda: self._delete(request))

    async def _delete(self, request: kv_pb2.DeleteRequest) -> kv_pb2.DeleteResponse:
        found = await self.node.coordinator.delete(
            request.key,
            request.context,
            w=quorum_value(request.w),
            r=quorum_value(request.r),
            strict=request.strict,
            timeout=_timeout(request.timeout_ms),
        )
        return kv_pb2.DeleteResponse(found=found)

    async def Stream(  # noqa: N802
        self, requests: AsyncIterator[kv_pb2.StreamRequest], context: Ctx
    ) -> AsyncIterator[kv_pb2.StreamResponse]:
        """Pipelining: every request runs as soon as it arrives; replies go out as they finish."""
        replies: asyncio.Queue[kv_pb2.StreamResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "get": self._get,
            "put": self._put,
            "delete": self._delete,
        }

        async def serve(req: kv_pb2.StreamRequest) -> None:
            op = req.WhichOneof("op")
            if op is None:
                err = errors.InvalidArgument("stream request without an operation", "op")
                replies.put_nowait(kv_pb2.StreamResponse(id=req.id, error=error_item(err)))
                return
            result = await self._outcome(op, lambda: handlers[op](getattr(req, op)))
            if isinstance(result, errors.KVError):
                replies.put_nowait(kv_pb2.StreamResponse(id=req.id, error=error_item(result)))
            else:
                replies.put_nowait(kv_pb2.StreamResponse(id=req.id, **{op: result}))

        async def read() -> None:
            loop = asyncio.get_running_loop()
            try:
                async for req in requests:
                    if len(running) >= MAX_STREAM_IN_FLIGHT:
                        busy = errors.Overloaded(
                            f"more than {MAX_STREAM_IN_FLIGHT} requests in flight on one stream",
                            "stream",
                        )
                        replies.put_nowait(kv_pb2.StreamResponse(id=req.id, error=error_item(busy)))
                        continue
                    task = loop.create_task(serve(req))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:  # the caller finished sending: answer what is still running
                    await asyncio.wait(set(running))
            finally:
                replies.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # re-raises a broken request stream
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def PutMany(  # noqa: N802
        self, request: kv_pb2.PutManyRequest, context: Ctx
    ) -> kv_pb2.PutManyResponse:
        async def call() -> kv_pb2.PutManyResponse:
            self._check_batch(len(request.items))
            results = await self.node.coordinator.put_many(
                [_write_request(item) for item in request.items]
            )
            out = kv_pb2.PutManyResponse()
            for result in results:
                if isinstance(result, errors.KVError):
                    out.results.add(error=error_item(result))
                else:
                    _put_response(result, out.results.add().ok)
            return out

        return await self._run("put_many", context, call)

    async def GetMany(  # noqa: N802
        self, request: kv_pb2.GetManyRequest, context: Ctx
    ) -> kv_pb2.GetManyResponse:
        async def call() -> kv_pb2.GetManyResponse:
            self._check_batch(len(request.items))
            results = await self.node.coordinator.get_many(
                [_read_request(item) for item in request.items]
            )
            out = kv_pb2.GetManyResponse()
            for result in results:
                if isinstance(result, errors.KVError):
                    out.results.add(error=error_item(result))
                else:
                    _get_response(result, out.results.add().ok)
            return out

        return await self._run("get_many", context, call)

    def _check_batch(self, count: int) -> None:
        limit = self.node.settings.max_batch_items
        if count > limit:
            raise errors.InvalidArgument(
                f"batch of {count} items exceeds the limit of {limit}", "items"
            )


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, node: Node, faults: FaultState | None = None) -> None:
        self.node = node
        self.faults = faults

    async def SetFaults(  # noqa: N802
        self, request: admin_pb2.Faults, context: Ctx
    ) -> admin_pb2.Faults:
        if self.faults is None:
            await _abort(context, errors.InvalidArgument("fault injection is not enabled"))
            raise AssertionError("unreachable")
        wanted = Faults(
            blocked=frozenset(request.blocked),
            loss=request.loss,
            delay_ms=(request.delay_ms_min, request.delay_ms_max),
            clock_offset_ms=request.clock_offset_ms,
        )
        try:
            self.faults.set(wanted)
        except ValueError as exc:
            await _abort(context, errors.InvalidArgument(str(exc), "faults"))
        if wanted.active:
            log.warning("injected faults on %s: %s", self.node.node_id, wanted)
        else:
            log.info("faults healed on %s", self.node.node_id)
        current = self.faults.faults
        return admin_pb2.Faults(
            blocked=sorted(current.blocked),
            loss=current.loss,
            delay_ms_min=current.delay_ms[0],
            delay_ms_max=current.delay_ms[1],
            clock_offset_ms=current.clock_offset_ms,
        )

    async def Status(  # noqa: N802
        self, request: admin_pb2.StatusRequest, context: Ctx
    ) -> admin_pb2.StatusResponse:
        s = self.node.status()
        return admin_pb2.StatusResponse(
            node_id=s.node_id,
            address=s.address,
            ready=s.ready,
            ring_epoch=s.ring_epoch,
            partitions=s.partitions,
            n_val=s.n_val,
            r=s.r,
            w=s.w,
            members=[
                admin_pb2.MemberStatus(
                    id=m.node_id,
                    address=m.address,
                    state=m.state,
                    phi=m.phi,
                    partitions=m.partitions,
                    primaries=m.primaries,
                    hints_pending=m.hints_pending,
                )
                for m in s.members
            ],
            hints_pending=s.hints_pending,
            hints_dropped=s.hints_dropped,
            keys=s.keys,
            uptime_seconds=s.uptime_seconds,
            version=s.version,
            repairs=[
                admin_pb2.PartitionRepair(partition=p, last_repaired_unix=t)
                for p, t in sorted(s.last_repaired.items())
            ],
        )

    async def Ring(  # noqa: N802
        self, request: admin_pb2.RingRequest, context: Ctx
    ) -> admin_pb2.RingResponse:
        try:
            meta = self.node.membership.require_meta()
        except errors.KVError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        ring = meta.ring
        return admin_pb2.RingResponse(
            epoch=ring.epoch,
            partitions=ring.q,
            n_val=ring.n,
            members=[admin_pb2.RingMember(id=m, address=meta.address_of(m)) for m in ring.members],
            owners=[admin_pb2.PartitionOwners(owners=list(o)) for o in ring.owners],
        )

    async def Repair(  # noqa: N802
        self, request: admin_pb2.RepairRequest, context: Ctx
    ) -> AsyncIterator[admin_pb2.RepairProgress]:
        partition = request.partition if request.HasField("partition") else None
        try:
            async for p in self.node.repair(partition):
                yield admin_pb2.RepairProgress(
                    partitions_done=p.partitions_done,
                    partitions_total=p.partitions_total,
                    keys_compared=p.keys_compared,
                    keys_exchanged=p.keys_exchanged,
                    keys_repaired=p.keys_repaired,
                    bytes_exchanged=p.bytes_exchanged,
                    seconds=p.seconds,
                    done=p.done,
                    errors=p.errors,
                )
        except errors.KVError as err:
            await _abort(context, err)
