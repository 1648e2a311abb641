"""Pipelining for :class:`~kvcluster.AsyncClient`: single-key calls over one stream per node.

A unary gRPC call costs a Python client and server far more CPU than the
message it carries. With ``AsyncClient(..., pipeline=True)`` every ``get``,
``put`` and ``delete`` to a node travels instead as one message on a
long-lived ``KV.Stream`` call, tagged with an id; the node coordinates each
request on its own and replies as soon as it is done, in any order (the way
Cassandra's native protocol multiplexes requests on a connection).

Semantics are those of the unary calls, including failures:

- an answer with an error item raises that KVError;
- a stream that cannot be opened fails its requests as *unsent*
  (``NodeFailure(sent=False)``: safe to retry elsewhere);
- a stream that breaks fails the requests in flight as *maybe applied*
  (``sent=True``), the ones not yet written as unsent;
- a request with no answer by its deadline fails as maybe applied.

The next call after a failure opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

import grpc

from kvcluster.client import _core as core
from kvcluster.client.policies import NodeFailure
from kvcluster.wire.v1 import kv_pb2, kv_pb2_grpc

_OPS = {"Get": "get", "Put": "put", "Delete": "delete"}


def pipelined(method: str) -> bool:
    """Whether a KV method can travel on a pipeline."""
    return method in _OPS


class Pipe:
    """One ``KV.Stream`` call to a node, shared by every single-key request to it."""

    def __init__(self, stub: kv_pb2_grpc.KVAsyncStub, address: str) -> None:
        self.address = address
        self._stub = stub
        self._ids = itertools.count(1)
        self._call: Any = None  # grpc.aio.StreamStreamCall while open
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._outbox: deque[kv_pb2.StreamRequest] = deque()
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def call(self, method: str, request: Any, timeout: float) -> Any:
        """Send ``request`` (a Get/Put/DeleteRequest) and return the node's response."""
        loop = asyncio.get_running_loop()
        if self._call is None:
            self._open()
        rid = next(self._ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[rid] = future
        self._outbox.append(kv_pb2.StreamRequest(id=rid, **{_OPS[method]: request}))
        self._wakeup.set()
        timer = loop.call_later(timeout, _expire, future, self.address)
        try:
            return await future
        finally:
            timer.cancel()
            self._pending.pop(rid, None)

    def _open(self) -> None:
        call = self._stub.Stream()
        self._call = call
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write(call), name=f"pipe-write-{self.address}"),
            loop.create_task(self._read(call), name=f"pipe-read-{self.address}"),
        ]

    async def _write(self, call: Any) -> None:
        try:
            while True:
                if not self._outbox:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                request = self._outbox[0]
                await call.write(request)
                self._outbox.popleft()  # only now could the node have seen it
        except grpc.RpcError as exc:
            self._broken(call, core.translate(exc, self.address))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. writing to a call grpc already finished
            self._broken(call, NodeFailure(self.address, f"stream failed ({exc})", sent=True))

    async def _read(self, call: Any) -> None:
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise NodeFailure(self.address, "stream closed by the node", sent=True)
                future = self._pending.get(reply.id)
                if future is None or future.done():
                    continue  # its caller gave up
                which = reply.WhichOneof("result")
                if which == "error":
                    future.set_exception(core.item_error(reply.error))
                else:
                    future.set_result(getattr(reply, which))
        except grpc.RpcError as exc:
            self._broken(call, core.translate(exc, self.address))
        except NodeFailure as exc:
            self._broken(call, exc)

    def _broken(self, call: Any, failure: Exception) -> None:
        """Fail what this stream carried; the next request opens a new one."""
        if self._call is not call:
            return
        self._call = None
        unsent = {req.id for req in self._outbox}
        self._outbox.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []
        call.cancel()
        sent = failure.sent if isinstance(failure, NodeFailure) else True
        for rid, future in list(self._pending.items()):
            if future.done():
                continue
            if rid in unsent or not sent:
                reason = failure.reason if isinstance(failure, NodeFailure) else str(failure)
                future.set_exception(NodeFailure(self.address, reason, sent=False))
            else:
                future.set_exception(failure)
        self._pending.clear()

    async def close(self) -> None:
        call, tasks = self._call, self._tasks
        self._call, self._tasks = None, []
        for task in tasks:
            task.cancel()
        if call is not None:
            call.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NodeFailure(self.address, "client closed", sent=True))
        self._pending.clear()
        await asyncio.gather(*tasks, return_exceptions=True)


def _expire(future: asyncio.Future[Any], address: str) -> None:
    if not future.done():
        future.set_exception(NodeFailure(address, "no answer before the deadline", sent=True))
