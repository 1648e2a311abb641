"""Tests of kvcluster.sim.loop: the virtual-time event loop and run_simulation.

Every assertion is about virtual time (``loop.time()``) and event order, never
about how long the test took in real time.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from kvcluster.clock import LoopClock
from kvcluster.sim.loop import (
    RealIOForbidden,
    RunawaySimulation,
    SimLoop,
    SimulationDeadlock,
    current_loop,
    run_simulation,
)

# -- virtual time -------------------------------------------------------------------------


def test_sleeping_an_hour_takes_an_hour_of_virtual_time_and_a_few_steps() -> None:
    seen: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen.append(loop.time())
        await asyncio.sleep(3600)
        seen.append(loop.time())

    result = run_simulation(main, seed=1)
    assert seen == [0.0, 3600.0]
    assert result.elapsed == 3600.0
    # The loop jumped to the timer: it did not tick through the hour.
    assert result.steps <= 4


def test_long_sleeps_jump_straight_to_the_deadline() -> None:
    async def main() -> float:
        await asyncio.sleep(1e9)  # ~31 years; asyncio's selectors cap waits at a day
        return asyncio.get_running_loop().time()

    result = run_simulation(main, seed=1, max_time=math.inf)
    assert result.value == 1e9
    assert result.steps <= 4


def test_the_loop_clock_is_virtual() -> None:
    clock = LoopClock(epoch_ms=1_000_000)

    async def main() -> tuple[int, int, float]:
        before = clock.wall_ms()
        await asyncio.sleep(2.5)
        return before, clock.wall_ms(), clock.monotonic()

    assert run_simulation(main, seed=1).value == (1_000_000, 1_002_500, 2.5)


def test_call_later_runs_in_deadline_order_at_the_deadline() -> None:
    events: list[tuple[float, str]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def record(label: str) -> None:
            events.append((loop.time(), label))

        loop.call_later(3.0, record, "c")
        loop.call_later(1.0, record, "a")
        loop.call_at(2.0, record, "b")
        handle = loop.call_later(1.5, record, "cancelled")
        handle.cancel()
        loop.call_soon(record, "soon")
        await asyncio.sleep(4)

    run_simulation(main, seed=1)
    assert events == [(0.0, "soon"), (1.0, "a"), (2.0, "b"), (3.0, "c")]


def test_timers_with_equal_deadlines_run_in_the_order_they_were_scheduled() -> None:
    order: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(50):
            loop.call_later(1.0, order.append, i)
        loop.call_at(1.0, order.append, 50)
        await asyncio.sleep(2)

    run_simulation(main, seed=1)
    assert order == list(range(51))


def test_timers_run_exactly_at_their_deadline_however_close() -> None:
    events: list[tuple[float, int]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def record(label: int) -> None:
            events.append((loop.time(), label))

        for label, delay in enumerate([3e-9, 1e-9, 2e-9, 1e-9]):
            loop.call_later(delay, record, label)
        await asyncio.sleep(1e6)
        # At 1e6 s successive floats are about 1.2e-10 s apart.
        loop.call_at(1e6 + 2e-9, record, 10)
        loop.call_at(1e6 + 1e-9, record, 11)
        loop.call_at(math.nextafter(1e6, math.inf), record, 12)
        await asyncio.sleep(1)

    run_simulation(main, seed=1, max_time=math.inf)
    assert events == [
        (1e-9, 1),
        (1e-9, 3),
        (2e-9, 2),
        (3e-9, 0),
        (math.nextafter(1e6, math.inf), 12),
        (1e6 + 1e-9, 11),
        (1e6 + 2e-9, 10),
    ]


def test_stock_asyncio_timer_heap_is_not_fifo_for_equal_deadlines() -> None:
    # Why SimLoop numbers its timers: TimerHandle compares deadlines only and
    # heapq is not stable, so equal deadlines come out in heap-history order.
    loop = asyncio.new_event_loop()
    try:
        heap: list[asyncio.TimerHandle] = []
        for i in range(5):
            heapq.heappush(heap, asyncio.TimerHandle(1.0, print, (i,), loop))
        popped = [heapq.heappop(heap)._args[0] for _ in range(5)]
    finally:
        loop.close()
    assert popped != [0, 1, 2, 3, 4]


def test_asyncio_timeout_fires_at_the_virtual_deadline() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.sleep(10)
        fired.append(loop.time())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(loop.time() + 0.25):
                await asyncio.Event().wait()
        fired.append(loop.time())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(10), timeout=2.5)
        fired.append(loop.time())
        # A deadline that is not reached does not fire.
        async with asyncio.timeout(10):
            await asyncio.sleep(1)
        fired.append(loop.time())
        return fired

    assert run_simulation(main, seed=1).value == [5.0, 5.25, 7.75, 8.75]


def test_virtual_time_does_not_advance_to_cancelled_timers() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(100, print, "never").cancel()
        await asyncio.sleep(1)
        return loop.time()

    result = run_simulation(main, seed=1)
    assert result.value == 1.0
    assert result.elapsed == 1.0


# -- determinism --------------------------------------------------------------------------


async def _jittery_workers() -> list[tuple[float, str, int]]:
    """Workers sleeping random (often equal) delays drawn from the simulation's rng."""
    loop = current_loop()
    events: list[tuple[float, str, int]] = []

    async def worker(n: int) -> None:
        for i in range(20):
            await asyncio.sleep(loop.rng.choice([0.0, 0.001, 0.002, 0.5]))
            events.append((loop.time(), asyncio.current_task().get_name(), n * 100 + i))  # type: ignore[union-attr]

    async with asyncio.TaskGroup() as group:
        for n in range(8):
            group.create_task(worker(n))
    return events


def test_same_seed_gives_the_same_event_order() -> None:
    first = run_simulation(_jittery_workers, seed=7)
    second = run_simulation(_jittery_workers, seed=7)
    assert first.value == second.value
    assert (first.elapsed, first.steps) == (second.elapsed, second.steps)
    assert len(first.value) == 160


def test_different_seeds_give_different_event_orders() -> None:
    assert run_simulation(_jittery_workers, seed=7).value != (
        run_simulation(_jittery_workers, seed=8).value
    )


def test_a_random_seed_is_reported_and_replays() -> None:
    first = run_simulation(_jittery_workers)
    assert isinstance(first.seed, int)
    assert run_simulation(_jittery_workers, seed=first.seed).value == first.value


def test_tasks_get_deterministic_names() -> None:
    async def main() -> list[str]:
        async def child() -> str:
            return asyncio.current_task().get_name()  # type: ignore[union-attr]

        loop = asyncio.get_running_loop()
        names = [await loop.create_task(child()) for _ in range(3)]
        names.append(await loop.create_task(child(), name="explicit"))
        return [asyncio.current_task().get_name(), *names]  # type: ignore[union-attr]

    assert run_simulation(main, seed=1).value == [
        "sim-main",
        "sim-task-1",
        "sim-task-2",
        "sim-task-3",
        "explicit",
    ]


# -- the runaway guard, deadlocks and failures -----------------------------------------------


def test_a_busy_loop_is_stopped_by_the_step_limit() -> None:
    spins = 0

    async def spin() -> None:
        nonlocal spins
        while True:
            spins += 1
            await asyncio.sleep(0)

    with pytest.raises(RunawaySimulation, match="1000 steps") as info:
        run_simulation(spin, seed=5, max_steps=1000)
    assert info.value.steps == 1001
    assert spins == 1000
    assert info.value.virtual_time == 0.0
    assert any("seed=5" in note for note in info.value.__notes__)


def test_endless_retries_are_stopped_by_the_virtual_time_limit() -> None:
    attempts = 0

    async def retry_forever() -> None:
        nonlocal attempts
        while True:
            attempts += 1
            await asyncio.sleep(60)

    with pytest.raises(RunawaySimulation, match="virtual time limit of 3600s") as info:
        run_simulation(retry_forever, seed=1, max_time=3600)
    assert info.value.virtual_time == 3600.0
    assert attempts == 61


def test_waiting_on_nothing_is_a_deadlock_not_a_hang() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(SimulationDeadlock, match="sim-main"):
        run_simulation(main, seed=1)


def test_an_exception_escaping_main_carries_the_seed() -> None:
    async def main() -> None:
        await asyncio.sleep(1.5)
        raise KeyError("lost")

    with pytest.raises(KeyError) as info:
        run_simulation(main, seed=1234)
    (note,) = info.value.__notes__
    assert "seed=1234" in note
    assert "virtual time 1.500000s" in note


def test_leftover_tasks_are_cancelled_and_the_loop_closed() -> None:
    cancelled: list[str] = []
    loops: list[SimLoop] = []

    async def background(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def main() -> None:
        loop = current_loop()
        loops.append(loop)
        for name in ("x", "y", "z"):
            loop.create_task(background(name))
        await asyncio.sleep(1)

    result = run_simulation(main, seed=1)
    assert result.elapsed == 1.0
    assert cancelled == ["x", "y", "z"]  # in creation order
    assert loops[0].is_closed()


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_time"):
        SimLoop(max_time=0)
    with pytest.raises(ValueError, match="max_steps"):
        SimLoop(max_steps=0)


def test_current_loop_outside_a_simulation() -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="not running inside a simulation"):
            current_loop()

    asyncio.run(main())


# -- no real I/O ------------------------------------------------------------------------------


async def _to_thread() -> None:
    await asyncio.to_thread(print, "never")


async def _open_connection() -> None:
    await asyncio.open_connection("127.0.0.1", 9)


async def _start_server() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    await asyncio.start_server(serve, "127.0.0.1", 0)


async def _getaddrinfo() -> None:
    await asyncio.get_running_loop().getaddrinfo("localhost", 80)


async def _subprocess() -> None:
    await asyncio.create_subprocess_exec("true")


@pytest.mark.parametrize(
    "attempt", [_to_thread, _open_connection, _start_server, _getaddrinfo, _subprocess]
)
def test_real_io_is_refused(attempt: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with pytest.raises(RealIOForbidden):
        run_simulation(attempt, seed=1)


def test_another_thread_cannot_schedule_callbacks() -> None:
    errors: list[BaseException] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def poke() -> None:
            try:
                loop.call_soon_threadsafe(print, "never")
            except RealIOForbidden as exc:
                errors.append(exc)

        thread = threading.Thread(target=poke)
        thread.start()
        thread.join()
        # From the loop's own thread it is an ordinary call_soon.
        done = loop.create_future()
        loop.call_soon_threadsafe(done.set_result, "ok")
        assert await done == "ok"

    run_simulation(main, seed=1)
    assert len(errors) == 1
