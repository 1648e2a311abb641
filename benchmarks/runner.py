"""Runs phases against a driver: closed or open loop, in this process or in worker processes.

A :class:`Worker` owns one driver and one asyncio loop and runs its share of
each phase; a :class:`WorkerPool` runs one worker in-process (``procs=1``) or
one per spawned process, hands every worker its share of the phase and
returns their :class:`WorkerResult` s. :func:`merge_phase` merges those into
one result (histograms merged, counters summed).

Latency is measured with ``time.perf_counter`` around each call. Closed loop:
from the call's start to its end (service time). Open loop: from the call's
*intended* start on the fixed schedule to its end, so calls that had to wait
behind a slow server or a full in-flight window are charged for the wait
(coordinated omission corrected, as in wrk2 and HdrHistogram); the service
time is kept in a second histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from benchmarks import hist
from benchmarks.drivers import Driver, DriverSpec, make_driver
from benchmarks.systems import self_cpu_seconds
from benchmarks.workloads import BATCH_KINDS, OpChooser, Phase
from benchmarks.zipf import chooser, key_name

MAX_ERROR_SAMPLES = 5

_LOOPS: list[asyncio.AbstractEventLoop] = []


def _process_loop() -> asyncio.AbstractEventLoop:
    """This process's one event loop: grpc.aio binds itself to the first loop that uses it,
    so in-process workers of successive pools (kvcluster, then etcd) must share it."""
    if not _LOOPS or _LOOPS[0].is_closed():
        _LOOPS[:] = [asyncio.new_event_loop()]
        asyncio.set_event_loop(_LOOPS[0])
    return _LOOPS[0]


@dataclass
class WorkerResult:
    """One worker's share of a phase (picklable: histograms are encoded)."""

    phase: str
    hists: dict[str, bytes] = field(default_factory=dict)
    service_hists: dict[str, bytes] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    calls: int = 0  # successful calls that started inside the measured window
    all_calls: int = 0  # every completed call, warm-up and failures included
    keys: int = 0  # keys moved by those calls (batch calls move batch_size keys)
    failed_keys: int = 0
    window_start: float = 0.0  # perf_counter times (same clock in every process)
    window_end: float = 0.0
    timeline: list[int] = field(default_factory=list)  # completed calls per second
    cpu_s: float = 0.0
    not_issued: int = 0  # open loop: scheduled before the deadline, never started
    reads: int = 0
    read_misses: int = 0
    sibling_reads: int = 0
    max_values: int = 0
    rmw_refused: int = 0


@functools.lru_cache(maxsize=4)
def _key_names(records: int) -> tuple[bytes, ...]:
    """Every record's YCSB key, hashed once per process rather than once per call."""
    return tuple(key_name(r) for r in range(records))


class _Values:
    """A small pool of random values (so value generation costs nothing per call)."""

    def __init__(self, size: int, rng: random.Random, pool: int = 64) -> None:
        self.values = [rng.randbytes(size) for _ in range(pool)]
        self._i = 0

    def next(self) -> bytes:
        self._i = (self._i + 1) % len(self.values)
        return self.values[self._i]


class Worker:
    """Runs its share of phases with its own driver."""

    def __init__(self, spec: DriverSpec, index: int = 0, workers: int = 1) -> None:
        self.spec = spec
        self.index = index
        self.workers = workers
        self.driver: Driver = make_driver(spec)

    async def open(self) -> None:
        await self.driver.open()

    async def close(self) -> None:
        await self.driver.close()

    def _my_records(self, records: int) -> list[int]:
        """The records this worker loads / batches: every ``workers``-th one."""
        return list(range(self.index, records, self.workers))

    async def run(self, phase: Phase) -> WorkerResult:
        """Run this worker's share of ``phase`` (already split with Phase.for_worker)."""
        rng = random.Random(phase.seed)
        values = _Values(phase.value_size, rng)
        result = WorkerResult(phase.name)
        hists: dict[str, HdrHistogram] = {}
        service: dict[str, HdrHistogram] = {}
        timeline: dict[int, int] = {}
        make_call = self._call_factory(phase, rng, values, result)
        keys_per_call = phase.keys_per_call

        loop_start = time.perf_counter()
        measure_from = loop_start + phase.warmup
        deadline = loop_start + phase.duration
        last_end = [measure_from]

        async def timed(op: str, coro: Coroutine[Any, Any, int], intended: float | None) -> None:
            start = time.perf_counter()
            try:
                failed = await coro
            except Exception as exc:  # every failure is counted, none stops the run
                end = time.perf_counter()
                result.errors[op] = result.errors.get(op, 0) + 1
                if len(result.error_samples) < MAX_ERROR_SAMPLES:
                    result.error_samples.append(f"{op}: {type(exc).__name__}: {exc}"[:300])
                result.all_calls += 1
                return
            end = time.perf_counter()
            result.all_calls += 1
            sec = int(end - loop_start)
            timeline[sec] = timeline.get(sec, 0) + 1
            origin = intended if intended is not None else start
            if origin < measure_from:
                return
            if op not in hists:
                hists[op] = hist.new()
            hist.record_us(hists[op], (end - origin) * 1e6)
            if intended is not None:
                if op not in service:
                    service[op] = hist.new()
                hist.record_us(service[op], (end - start) * 1e6)
            result.calls += 1
            result.keys += keys_per_call - failed
            result.failed_keys += failed
            last_end[0] = max(last_end[0], end)

        cpu0 = self_cpu_seconds()
        if phase.open_loop:
            await self._open_loop(
                phase, make_call, timed, loop_start, measure_from, deadline, result
            )
        else:
            remaining = [phase.ops]  # measured calls: warm-up calls come on top

            async def caller() -> None:
                while remaining[0] > 0:
                    now = time.perf_counter()
                    if now >= deadline:
                        break
                    if now >= measure_from:
                        remaining[0] -= 1
                    op, coro = make_call()
                    await timed(op, coro, None)

            await asyncio.gather(*(caller() for _ in range(phase.concurrency)))
        result.cpu_s = self_cpu_seconds() - cpu0
        result.window_start = measure_from
        result.window_end = last_end[0]
        result.hists = {op: hist.encode(h) for op, h in hists.items()}
        result.service_hists = {op: hist.encode(h) for op, h in service.items()}
        span = max(timeline) + 1 if timeline else 0
        result.timeline = [timeline.get(s, 0) for s in range(span)]
        return result

    async def _open_loop(
        self,
        phase: Phase,
        make_call: Callable[[], tuple[str, Coroutine[Any, Any, int]]],
        timed: Callable[[str, Coroutine[Any, Any, int], float | None], Coroutine[Any, Any, None]],
        start: float,
        measure_from: float,
        deadline: float,
        result: WorkerResult,
    ) -> None:
        assert phase.target_rate is not None
        interval = 1.0 / phase.target_rate
        # Calls scheduled during the warm-up come on top of the ``ops`` measured ones.
        warmup_calls = math.ceil((measure_from - start) / interval - 1e-9) if interval else 0
        window = asyncio.Semaphore(phase.max_inflight)
        tasks: set[asyncio.Task[None]] = set()

        async def one(op: str, coro: Coroutine[Any, Any, int], intended: float) -> None:
            try:
                await timed(op, coro, intended)
            finally:
                window.release()

        limit = phase.ops + warmup_calls
        i = 0
        while i < limit:
            intended = start + i * interval
            if intended >= deadline:
                break
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await window.acquire()  # a full window delays the call; its latency still counts
            if time.perf_counter() >= deadline:
                window.release()
                break
            op, coro = make_call()
            task = asyncio.ensure_future(one(op, coro, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        scheduled = min(limit, math.ceil((deadline - start) / interval - 1e-9))
        result.not_issued = max(0, scheduled - i)
        if tasks:
            await asyncio.gather(*tasks)

    def _call_factory(
        self, phase: Phase, rng: random.Random, values: _Values, result: WorkerResult
    ) -> Callable[[], tuple[str, Coroutine[Any, Any, int]]]:
        """A function returning the next (op name, call coroutine) of ``phase``."""
        driver = self.driver
        names = _key_names(phase.records)

        async def read(key: bytes) -> int:
            n = await driver.read(key)
            result.reads += 1
            if n == 0:
                result.read_misses += 1
            elif n > 1:
                result.sibling_reads += 1
                result.max_values = max(result.max_values, n)
            return 0

        async def update(key: bytes) -> int:
            await driver.update(key, values.next())
            return 0

        async def insert(key: bytes) -> int:
            await driver.insert(key, values.next())
            return 0

        async def rmw(key: bytes) -> int:
            if not await driver.rmw(key, values.next()):
                result.rmw_refused += 1
            return 0

        if phase.kind in ("load", "put"):
            label = "insert" if phase.kind == "load" else "put"
            seq: Iterator[bytes] = itertools.cycle(
                [names[r] for r in self._my_records(phase.records)]
            )

            def sequential() -> tuple[str, Coroutine[Any, Any, int]]:
                return label, insert(next(seq))

            return sequential

        if phase.kind in BATCH_KINDS:
            mine = self._my_records(phase.records)
            size = phase.batch_size  # at most len(mine): see Phase.for_worker
            twice = mine * 2  # the last batch wraps around: every batch has `size` distinct keys
            batches = [[names[r] for r in twice[i : i + size]] for i in range(0, len(mine), size)]
            cycle = itertools.cycle(batches)
            if phase.kind == "put_many":

                def put_batch() -> tuple[str, Coroutine[Any, Any, int]]:
                    keys = next(cycle)
                    return "put_many", driver.put_many([(k, values.next()) for k in keys])

                return put_batch

            def get_batch() -> tuple[str, Coroutine[Any, Any, int]]:
                return "get_many", driver.get_many(next(cycle))

            return get_batch

        keys = chooser(phase.distribution, phase.records, rng)
        if phase.kind == "get":

            def get() -> tuple[str, Coroutine[Any, Any, int]]:
                return "get", read(names[keys.next()])

            return get

        ops = OpChooser(phase.mix, rng)
        table: dict[str, Callable[[bytes], Coroutine[Any, Any, int]]] = {
            "read": read,
            "update": update,
            "insert": insert,
            "rmw": rmw,
        }
        unknown = sorted(set(phase.mix) - set(table))
        if unknown:
            raise ValueError(f"unknown operations in the mix: {', '.join(unknown)}")

        def mixed() -> tuple[str, Coroutine[Any, Any, int]]:
            op = ops.next()
            return op, table[op](names[keys.next()])

        return mixed


# -- pools ----------------------------------------------------------------------------


def _child_main(
    conn: multiprocessing.connection.Connection, spec: DriverSpec, index: int, workers: int
) -> None:
    """A worker process: build the driver, then run every phase the parent sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    loop = _process_loop()
    worker: Worker | None = None
    try:
        worker = Worker(spec, index, workers)
        loop.run_until_complete(worker.open())
        conn.send(("ready", None))
        while True:
            phase = conn.recv()
            if phase is None:
                break
            try:
                conn.send(("ok", loop.run_until_complete(worker.run(phase))))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (EOFError, BrokenPipeError):
        pass  # the parent went away
    except Exception:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
    finally:
        if worker is not None:
            with contextlib.suppress(Exception):
                loop.run_until_complete(worker.close())
        loop.close()


class WorkerPool:
    """``procs`` workers sharing every phase; use as a context manager."""

    def __init__(self, spec: DriverSpec, procs: int = 1) -> None:
        if procs < 1:
            raise ValueError("procs must be at least 1")
        self.spec = spec
        self.procs = procs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: Worker | None = None
        self._children: list[tuple[Any, multiprocessing.connection.Connection]] = []

    def __enter__(self) -> WorkerPool:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        """Worker process ids (this process when procs == 1)."""
        if self.procs == 1:
            return [os.getpid()]
        return [int(p.pid) for p, _ in self._children if p.pid is not None]

    def start(self) -> None:
        if self.procs == 1:
            self._loop = _process_loop()
            self._worker = Worker(self.spec)
            self._loop.run_until_complete(self._worker.open())
            return
        ctx = multiprocessing.get_context("spawn")  # grpc does not survive fork
        for index in range(self.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_child_main, args=(child, self.spec, index, self.procs), daemon=True
            )
            proc.start()
            child.close()
            self._children.append((proc, parent))
        for _proc, conn in self._children:
            self._receive(conn, timeout=60.0)

    def _receive(self, conn: multiprocessing.connection.Connection, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise RuntimeError(f"a worker process did not answer within {timeout:g}s")
        try:
            status, payload = conn.recv()
        except EOFError:
            raise RuntimeError("a worker process exited unexpectedly") from None
        if status == "error":
            raise RuntimeError(f"worker failed:\n{payload}")
        return payload

    def run(self, phase: Phase) -> list[WorkerResult]:
        if self.procs == 1:
            assert self._loop is not None and self._worker is not None
            return [self._loop.run_until_complete(self._worker.run(phase.for_worker(0, 1)))]
        for index, (_proc, conn) in enumerate(self._children):
            conn.send(phase.for_worker(index, self.procs))
        # Calls still in flight at the deadline may take up to the request timeout.
        limit = phase.duration + self.spec.timeout * 3 + 60.0
        return [self._receive(conn, limit) for _proc, conn in self._children]

    def close(self) -> None:
        if self._loop is not None:
            if self._worker is not None:
                with contextlib.suppress(Exception):
                    self._loop.run_until_complete(self._worker.close())
            self._loop = None  # the loop stays open for the next pool (see _process_loop)
            self._worker = None
        for _proc, conn in self._children:
            with contextlib.suppress(Exception):
                conn.send(None)
        for proc, conn in self._children:
            proc.join(5.0)
            if proc.is_alive():
                proc.terminate()  # by its own pid
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
            conn.close()
        self._children = []


# -- merging --------------------------------------------------------------------------


def merge_phase(phase: Phase, results: list[WorkerResult]) -> dict[str, Any]:
    """One phase result from every worker's share: merged histograms, summed counters."""
    ops = sorted({op for r in results for op in r.hists} | {op for r in results for op in r.errors})
    per_op: dict[str, Any] = {}
    merged_all: list[HdrHistogram] = []
    encoded: dict[str, str] = {}
    for op in ops:
        h = hist.merge_encoded([r.hists[op] for r in results if op in r.hists])
        merged_all.append(h)
        encoded[op] = hist.encode(h).decode()
        entry = hist.summary(h)
        entry["errors"] = sum(r.errors.get(op, 0) for r in results)
        svc = [r.service_hists[op] for r in results if op in r.service_hists]
        if svc:
            entry["service"] = hist.summary(hist.merge_encoded(svc))
        per_op[op] = entry
    everything = hist.merge(merged_all)
    start = min((r.window_start for r in results), default=0.0)
    end = max((r.window_end for r in results), default=0.0)
    window = max(end - start, 1e-9)
    calls = sum(r.calls for r in results)
    keys = sum(r.keys for r in results)
    span = max((len(r.timeline) for r in results), default=0)
    timeline = [sum(r.timeline[s] for r in results if s < len(r.timeline)) for s in range(span)]
    client_cpu = sum(r.cpu_s for r in results)
    all_calls = sum(r.all_calls for r in results)
    # what each worker's calls moved (Phase.for_worker caps batches alike for all workers)
    keys_per_call = phase.for_worker(0, max(1, len(results))).keys_per_call
    out: dict[str, Any] = {
        "name": phase.name,
        "kind": phase.kind,
        "open_loop": phase.open_loop,
        "target_rate": phase.target_rate,
        "concurrency": phase.concurrency,
        "batch_size": keys_per_call,
        "workers": len(results),
        "calls": calls,
        "all_calls": all_calls,
        "keys": keys,
        "failed_keys": sum(r.failed_keys for r in results),
        "window_s": round(window, 3),
        "calls_per_s": round(calls / window, 1),
        "keys_per_s": round(keys / window, 1),
        "errors": sum(sum(r.errors.values()) for r in results),
        "error_samples": [s for r in results for s in r.error_samples][:MAX_ERROR_SAMPLES],
        "not_issued": sum(r.not_issued for r in results),
        "all": hist.summary(everything),
        "ops": per_op,
        "histograms": encoded,
        "timeline": timeline,
        "client_cpu_s": round(client_cpu, 3),
        "client_cpu_ms_per_call": round(1000 * client_cpu / all_calls, 4) if all_calls else None,
        "reads": {
            "total": sum(r.reads for r in results),
            "misses": sum(r.read_misses for r in results),
            "with_siblings": sum(r.sibling_reads for r in results),
            "max_values": max((r.max_values for r in results), default=0),
        },
        "rmw_refused": sum(r.rmw_refused for r in results),
    }
    return out
