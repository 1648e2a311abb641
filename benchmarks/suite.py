"""Runs a list of phases against one running system and annotates each result with CPU use."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from benchmarks import promscrape
from benchmarks.drivers import DriverSpec
from benchmarks.runner import WorkerPool, merge_phase
from benchmarks.systems import CpuMeter, RunningSystem
from benchmarks.workloads import Phase


class PhaseHook(Protocol):
    """Called around a phase (the profiler uses it to attach py-spy to the nodes)."""

    def before(self, phase: Phase, system: RunningSystem) -> None: ...

    def after(self, phase: Phase, system: RunningSystem) -> None: ...


def run_phases(
    system: RunningSystem,
    spec: DriverSpec,
    phases: Sequence[Phase],
    procs: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    hook: PhaseHook | None = None,
    idle_baseline: float = 2.0,
) -> list[dict[str, Any]]:
    """Run ``phases`` in order with ``procs`` client processes; one merged result per phase.

    First the servers' CPU use is measured for ``idle_baseline`` seconds without
    load (heartbeats, timers): each result carries it as ``server_idle_cores``
    and also reports server CPU per call with that baseline subtracted."""
    results: list[dict[str, Any]] = []
    idle_cores: float | None = None
    if idle_baseline > 0 and system.pids:
        meter = CpuMeter(system.pids)
        meter.start()
        time.sleep(idle_baseline)
        idle = meter.stop()["server_cpu_s"]
        idle_cores = None if idle is None else idle / idle_baseline
    with WorkerPool(spec, procs) as pool:
        for phase in phases:
            meter = CpuMeter(system.pids)
            if hook is not None:
                hook.before(phase, system)
            scraped = promscrape.scrape(system.metrics) if system.metrics else []
            meter.start()
            t0 = time.monotonic()
            try:
                shares = pool.run(phase)
            finally:
                cpu = meter.stop()
                elapsed = time.monotonic() - t0
                if hook is not None:
                    hook.after(phase, system)
            merged = merge_phase(phase, shares)
            merged["system"] = system.name
            if scraped:
                rescraped = promscrape.scrape(system.metrics)
                merged["server_latency"] = promscrape.latency_delta(scraped, rescraped)
                merged["storage"] = promscrape.storage_delta(scraped, rescraped)
            merged.update(cpu)
            calls = merged["all_calls"]
            server = cpu["server_cpu_s"]
            merged["server_cpu_ms_per_call"] = (
                round(1000 * server / calls, 4) if server is not None and calls else None
            )
            merged["server_idle_cores"] = None if idle_cores is None else round(idle_cores, 3)
            merged["server_cpu_ms_per_call_net"] = (
                round(1000 * max(0.0, server - idle_cores * elapsed) / calls, 4)
                if server is not None and idle_cores is not None and calls
                else None
            )
            merged["server_cores"] = None if server is None else round(server / elapsed, 3)
            client = merged["client_cpu_s"]
            known = (server or 0.0) + client
            merged["other_cpu_s"] = round(max(0.0, cpu["machine_busy_s"] - known), 3)
            results.append(merged)
            if on_result is not None:
                on_result(merged)
    return results
