"""The systems under test behind one async interface: kvcluster (AsyncClient) and etcd (gRPC KV).

Both drivers use the same client stack: grpc.aio channels in the same asyncio
loop of the same load generator.

Operation semantics (what a YCSB operation means on each system):

- read: kvcluster ``get`` (R=2 by default); etcd ``Range`` (linearizable by default).
- update: kvcluster ``put`` with the causal context this client last saw for
  the key (from a read or its own previous write); etcd ``Put``.
- insert: kvcluster ``put`` (no context: the key is new); etcd ``Put``.
- rmw: kvcluster ``get`` then ``put`` with the context just read; etcd
  ``Range`` then ``Txn`` comparing mod_revision (or ``Range`` + ``Put``).
- batches: kvcluster ``put_many`` / ``get_many``; etcd one ``Txn`` of up to
  128 puts / ranges per 128 keys.

Why updates carry a context: in kvcluster a put without context never
replaces anything - on an existing key it adds a sibling (DESIGN §2). A
client that only ever wrote blindly would pile up siblings forever, which no
Riak-style application does; it writes back the context it last saw. Passing
the cached context costs no extra round trip. (``blind=True`` reproduces the
blind behaviour for comparison.) Concurrent updates of a hot key may still
create siblings; reads count them.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import itertools
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvcluster import AsyncClient, ReadResult, WriteResult, errors
from kvcluster.net.grpc_options import MAX_MESSAGE_BYTES

#: etcd's default --max-txn-ops: the most operations one Txn may hold.
ETCD_MAX_TXN_OPS = 128
#: Same message size limits as the kvcluster client (kvcluster.net.grpc_options), but
#: gRPC's default reconnect backoff and retries: the rest of that list is kvcluster's policy.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class DriverSpec:
    """Everything a worker process needs to build its own driver (picklable)."""

    system: str  # "kvcluster" | "etcd"
    endpoints: tuple[str, ...]
    timeout: float = 5.0
    stubs_dir: str | None = None  # etcd: where the generated etcdserverpb stubs are
    options: dict[str, Any] = field(default_factory=dict)


class Driver(abc.ABC):
    """One client connection set to the system under test."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect (optional: both clients also connect lazily)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def read(self, key: bytes) -> int:
        """Read ``key``; return how many values it has (0 = absent, >1 = siblings)."""

    @abc.abstractmethod
    async def update(self, key: bytes, value: bytes) -> None: ...

    async def insert(self, key: bytes, value: bytes) -> None:
        await self.update(key, value)

    @abc.abstractmethod
    async def rmw(self, key: bytes, value: bytes) -> bool:
        """Read then write ``key``; False if the write was refused (etcd: compare failed)."""

    @abc.abstractmethod
    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Write a batch of distinct keys; return how many items failed."""

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[bytes]) -> int:
        """Read a batch of distinct keys; return how many items failed."""


class KvclusterDriver(Driver):
    def __init__(self, spec: DriverSpec) -> None:
        self.client = AsyncClient(
            list(spec.endpoints),
            timeout=spec.timeout,
            pipeline=bool(spec.options.get("pipeline", False)),
        )
        self.blind = bool(spec.options.get("blind", False))
        self.contexts: dict[bytes, bytes] = {}

    async def open(self) -> None:
        await self.client.refresh_ring()

    async def close(self) -> None:
        await self.client.close()

    def _context(self, key: bytes) -> bytes | None:
        return None if self.blind else self.contexts.get(key)

    def _remember(self, key: bytes, result: ReadResult | WriteResult) -> None:
        """Keep the context of a write, or of a read that found the key, for the next update."""
        if isinstance(result, WriteResult) or result.found:
            self.contexts[key] = result.context

    def _remember_all(
        self, keys: Iterable[bytes], results: Sequence[ReadResult | WriteResult | errors.KVError]
    ) -> int:
        """:meth:`_remember` every answered item of a batch; return how many failed."""
        failed = 0
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, errors.KVError):
                failed += 1
            else:
                self._remember(key, result)
        return failed

    async def read(self, key: bytes) -> int:
        result = await self.client.get(key)
        self._remember(key, result)
        return len(result.values)

    async def update(self, key: bytes, value: bytes) -> None:
        self._remember(key, await self.client.put(key, value, context=self._context(key)))

    async def rmw(self, key: bytes, value: bytes) -> bool:
        seen = await self.client.get(key)
        context = seen.context if seen.found else None
        self._remember(key, await self.client.put(key, value, context=context))
        return True

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        results = await self.client.put_many([(k, v, self._context(k)) for k, v in items])
        return self._remember_all((k for k, _ in items), results)

    async def get_many(self, keys: Sequence[bytes]) -> int:
        return self._remember_all(keys, await self.client.get_many(keys))


def load_etcd_stubs(stubs_dir: str) -> tuple[Any, Any]:
    """Import the etcdserverpb modules generated into ``stubs_dir`` (see benchmarks.etcd)."""
    if stubs_dir not in sys.path:
        sys.path.insert(0, stubs_dir)
    pb2 = importlib.import_module("etcdserverpb.rpc_pb2")
    pb2_grpc = importlib.import_module("etcdserverpb.rpc_pb2_grpc")
    return pb2, pb2_grpc


class EtcdDriver(Driver):
    """etcd's v3 gRPC KV API, spreading calls round-robin over the members like clientv3."""

    def __init__(self, spec: DriverSpec) -> None:
        if spec.stubs_dir is None:
            raise ValueError("the etcd driver needs generated stubs (stubs_dir)")
        self.pb2, pb2_grpc = load_etcd_stubs(spec.stubs_dir)
        self.timeout = spec.timeout
        self.serializable = bool(spec.options.get("serializable", False))
        self.rmw_mode = str(spec.options.get("rmw", "txn"))
        self.endpoints = spec.endpoints
        self._pb2_grpc = pb2_grpc
        self.channels: list[grpc.aio.Channel] = []
        self._stubs: Iterator[Any] = iter(())

    def _kv(self) -> Any:
        """The next member's KV stub (round-robin)."""
        return next(self._stubs)

    async def open(self) -> None:
        # Channels are made inside the running loop: grpc.aio binds a channel to its loop.
        self.channels = [
            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            for address in self.endpoints
        ]
        self._stubs = itertools.cycle([self._pb2_grpc.KVStub(ch) for ch in self.channels])
        await asyncio.gather(*(ch.channel_ready() for ch in self.channels))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    def _range(self, key: bytes) -> Any:
        return self.pb2.RangeRequest(key=key, serializable=self.serializable)

    async def read(self, key: bytes) -> int:
        resp = await self._kv().Range(self._range(key), timeout=self.timeout)
        return len(resp.kvs)

    async def update(self, key: bytes, value: bytes) -> None:
        await self._kv().Put(self.pb2.PutRequest(key=key, value=value), timeout=self.timeout)

    async def rmw(self, key: bytes, value: bytes) -> bool:
        pb2 = self.pb2
        kv = self._kv()
        seen = await kv.Range(self._range(key), timeout=self.timeout)
        put = pb2.PutRequest(key=key, value=value)
        if self.rmw_mode == "put":
            await kv.Put(put, timeout=self.timeout)
            return True
        # Compare-and-set on the revision just read (mod_revision 0 = the key is absent).
        revision = seen.kvs[0].mod_revision if seen.kvs else 0
        txn = pb2.TxnRequest(
            compare=[
                pb2.Compare(
                    result=pb2.Compare.EQUAL, target=pb2.Compare.MOD, key=key, mod_revision=revision
                )
            ],
            success=[pb2.RequestOp(request_put=put)],
        )
        resp = await kv.Txn(txn, timeout=self.timeout)
        return bool(resp.succeeded)

    async def _txns(self, ops: list[Any]) -> int:
        step = ETCD_MAX_TXN_OPS
        chunks = [ops[i : i + step] for i in range(0, len(ops), step)]

        async def one(chunk: list[Any]) -> int:
            try:
                await self._kv().Txn(self.pb2.TxnRequest(success=chunk), timeout=self.timeout)
            except grpc.RpcError:
                return len(chunk)
            return 0

        return sum(await asyncio.gather(*(one(c) for c in chunks)))

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        pb2 = self.pb2
        ops = [pb2.RequestOp(request_put=pb2.PutRequest(key=k, value=v)) for k, v in items]
        return await self._txns(ops)

    async def get_many(self, keys: Sequence[bytes]) -> int:
        pb2 = self.pb2
        return await self._txns([pb2.RequestOp(request_range=self._range(k)) for k in keys])


def make_driver(spec: DriverSpec) -> Driver:
    if spec.system == "kvcluster":
        return KvclusterDriver(spec)
    if spec.system == "etcd":
        return EtcdDriver(spec)
    raise ValueError(f"unknown system {spec.system!r}")
