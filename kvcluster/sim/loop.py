"""A virtual-time asyncio event loop for the deterministic simulator.

:class:`SimLoop` is an ordinary asyncio event loop except for its clock:
``loop.time()`` returns *virtual* seconds, starting at ``0.0``, and when no
callback is ready the loop jumps virtual time straight to the next timer
instead of sleeping. ``await asyncio.sleep(3600)`` therefore returns at once in
real time with ``loop.time() == 3600.0``, and everything built on the loop's
clock -- ``asyncio.sleep``, ``asyncio.timeout``, ``asyncio.wait_for``,
``loop.call_later`` / ``call_at``, :class:`kvcluster.clock.LoopClock` -- runs on
virtual time.

:func:`run_simulation` is the entry point (the simulator's ``asyncio.run``)::

    async def scenario() -> int:
        net = SimNetwork(current_loop().rng)
        ...
        return replies

    result = run_simulation(scenario, seed=42)
    result.value, result.elapsed, result.seed

An exception escaping a simulation carries a note with its seed, and running
the same program with that seed replays it exactly.

Determinism
-----------
Same program + same seed gives the same sequence of events, because:

* the ready queue is a FIFO deque and the loop never polls real I/O;
* timers with *equal* deadlines run in the order they were scheduled. Stock
  asyncio orders its timer heap by deadline only, and ``heapq`` is not stable,
  so equal-deadline timers would come out in an order that depends on the
  heap's history; this loop gives every timer a sequence number and orders by
  ``(deadline, sequence)``;
* tasks created through the loop get deterministic names (``sim-task-N``)
  unless named explicitly, and shutdown cancels leftover tasks in creation
  order;
* all randomness comes from ``loop.rng`` (:class:`random.Random` seeded with the
  simulation seed), or from generators derived from it.

Node code must keep its side of the bargain (``DESIGN.md`` §3):

* **Sort anything whose iteration order could vary.** Python randomises
  ``hash(str)`` and ``hash(bytes)`` per process (``PYTHONHASHSEED``), so
  iterating a ``set`` of node ids or keys gives a different order in every
  process; iterate ``sorted(...)`` instead (dicts keep insertion order and are
  fine). Objects hashed by identity (tasks, futures, plain objects) have
  address-dependent order even within one process: ``asyncio.wait`` returns
  *sets* of tasks and ``asyncio.all_tasks()`` is a set -- keep your own list.
* Never use the global ``random`` module, ``time.time()``, ``time.monotonic()``,
  ``uuid.uuid4()`` or ``os.urandom`` in node logic: take a ``random.Random``
  and a :class:`kvcluster.clock.Clock`.
* Do not rely on when the garbage collector finalises async generators.

Real I/O
--------
The loop never blocks on real I/O. The asyncio APIs that would reach the real
world -- sockets, servers, DNS, subprocesses, signal handlers, pipes,
``run_in_executor`` / ``asyncio.to_thread`` -- raise :class:`RealIOForbidden`,
and ``call_soon_threadsafe`` from another thread raises it too (no thread can
wake a simulation). If every task is waiting and no timer is pending, nothing
can ever happen again and the loop raises :class:`SimulationDeadlock` instead
of waiting forever. Blocking calls that bypass asyncio (``time.sleep``, a
synchronous socket) cannot be intercepted: they block the real thread and do
not advance virtual time, so node code must not make them.

Runaway guard
-------------
``max_time`` (virtual seconds since the start) and ``max_steps`` (loop
iterations; each runs at least one callback or advances the clock) bound a
simulation; exceeding either raises :class:`RunawaySimulation`.

Virtual time is a float and exact: the clock jumps to a timer's deadline, and
a timer runs once the clock has reached its deadline, never earlier (the loop's
clock resolution is one ulp of the current time, not the real clock's).
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import math
import random
import threading
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, TypeVarTuple

if TYPE_CHECKING:
    from asyncio import _CoroutineLike

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Default runaway guards of :func:`run_simulation` and :class:`SimLoop`.
DEFAULT_MAX_TIME = 30 * 24 * 3600.0
DEFAULT_MAX_STEPS = 10_000_000
#: Loop iterations allowed for cancelling leftover tasks once a simulation ends.
_SHUTDOWN_STEPS = 100_000


class SimulationError(RuntimeError):
    """Base class of the errors raised by the simulation machinery itself."""


class RunawaySimulation(SimulationError):
    """The simulation exceeded its virtual-time or step budget."""

    def __init__(self, message: str, *, virtual_time: float, steps: int) -> None:
        super().__init__(message)
        self.virtual_time = virtual_time
        self.steps = steps


class SimulationDeadlock(SimulationError):
    """Every task is waiting and no timer is pending: nothing can ever run again."""


class RealIOForbidden(SimulationError):
    """Code running in the simulation tried to use real I/O or threads."""


class _OrderedTimerHandle(asyncio.TimerHandle):
    """A TimerHandle ordered by ``(deadline, sequence)``: FIFO among equal deadlines."""

    __slots__ = ("_seq",)

    def __init__(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        *,
        context: contextvars.Context | None,
        seq: int,
    ) -> None:
        super().__init__(when, callback, args, loop, context)
        self._seq = seq

    def _key(self) -> tuple[float, int]:
        return (self.when(), self._seq)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, _OrderedTimerHandle):
            return NotImplemented
        return self._key() < other._key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, _OrderedTimerHandle):
            return NotImplemented
        return self._key() <= other._key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, _OrderedTimerHandle):
            return NotImplemented
        return self._key() > other._key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, _OrderedTimerHandle):
            return NotImplemented
        return self._key() >= other._key()


class _VirtualSelector:
    """Stands in for the selector: "waiting" for ``timeout`` advances virtual time.

    ``BaseEventLoop._run_once`` calls ``select(timeout)`` once per iteration with
    ``0`` when callbacks are ready, the delay until the earliest timer otherwise,
    and ``None`` when there is nothing at all to wait for.
    """

    def __init__(self, loop: SimLoop) -> None:
        self._loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        self._loop._advance(timeout)
        return []

    def close(self) -> None:
        pass


class SimLoop(asyncio.BaseEventLoop):
    """An asyncio event loop on virtual time. See the module documentation.

    ``seed`` seeds :attr:`rng`, the simulation's source of randomness.
    ``max_time`` (virtual seconds since 0) and ``max_steps`` (loop iterations,
    ``None`` for no limit) are the runaway guards.
    """

    # Attributes of asyncio.BaseEventLoop that the stubs do not declare.
    _scheduled: list[asyncio.TimerHandle]
    _clock_resolution: float
    _thread_id: int | None
    _selector: _VirtualSelector

    def __init__(
        self,
        seed: int = 0,
        *,
        max_time: float = DEFAULT_MAX_TIME,
        max_steps: int | None = DEFAULT_MAX_STEPS,
    ) -> None:
        super().__init__()
        if not max_time > 0 or (max_steps is not None and max_steps <= 0):
            self.close()
            raise ValueError(
                "need max_time > 0 (math.inf for no limit) and max_steps > 0 (or None), "
                f"not max_time={max_time}, max_steps={max_steps}"
            )
        self._now = 0.0
        # _run_once runs the timers due before ``time() + _clock_resolution``:
        # one ulp makes that exactly the timers whose deadline has been reached.
        self._clock_resolution = math.ulp(0.0)
        self._selector = _VirtualSelector(self)
        self._timer_seq = itertools.count()
        self._task_seq = itertools.count()
        self._task_order: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = (
            weakref.WeakKeyDictionary()
        )
        self.seed = seed
        #: The simulation's seeded random source.
        self.rng = random.Random(seed)
        self.max_time = max_time
        self.max_steps = max_steps
        #: Loop iterations run so far.
        self.steps = 0

    # -- the virtual clock -------------------------------------------------------

    def time(self) -> float:
        """Virtual seconds since the loop was created."""
        return self._now

    def _advance(self, timeout: float | None) -> None:
        """One loop iteration: check the guards, then move the clock forward."""
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            raise RunawaySimulation(
                f"simulation exceeded {self.max_steps} steps at virtual time {self._now:.6f}s",
                virtual_time=self._now,
                steps=self.steps,
            )
        if timeout is None:
            raise SimulationDeadlock(
                f"deadlock at virtual time {self._now:.6f}s: every task is waiting and no "
                f"timer is pending; waiting: {self._describe_tasks()}"
            )
        if timeout <= 0:
            return
        # Nothing is ready: _run_once asked to wait until the earliest timer
        # (capped at a day, a limit for real selectors). Nothing can happen in
        # between, so jump to its deadline exactly (``now + timeout`` may round).
        when = self._scheduled[0].when()
        if when > self.max_time:
            raise RunawaySimulation(
                f"simulation exceeded its virtual time limit of {self.max_time:g}s "
                f"(next timer at {when:.6f}s) after {self.steps} steps",
                virtual_time=self._now,
                steps=self.steps,
            )
        self._now = max(self._now, when)
        self._clock_resolution = math.ulp(self._now)

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    # -- deterministic timers and tasks --------------------------------------------

    def call_at(
        self,
        when: float,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        if when is None:  # same check as BaseEventLoop.call_at
            raise TypeError("when cannot be None")
        if self.is_closed():
            raise RuntimeError("Event loop is closed")
        timer = _OrderedTimerHandle(
            when, callback, args, self, context=context, seq=next(self._timer_seq)
        )
        heapq.heappush(self._scheduled, timer)
        timer._scheduled = True  # type: ignore[attr-defined]
        return timer

    def create_task(
        self,
        coro: _CoroutineLike[T],
        *,
        name: object = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        seq = next(self._task_seq)
        if name is None:
            name = f"sim-task-{seq}"
        task = super().create_task(coro, name=name, context=context)
        self._task_order[task] = seq
        return task

    def pending_tasks(self) -> list[asyncio.Task[Any]]:
        """The loop's unfinished tasks, in creation order (unlike ``asyncio.all_tasks``)."""
        tasks = [t for t in asyncio.all_tasks(self) if not t.done()]
        tasks.sort(key=lambda t: (self._task_order.get(t, -1), t.get_name()))
        return tasks

    def _describe_tasks(self, limit: int = 10) -> str:
        tasks = self.pending_tasks()
        described = [f"{t.get_name()} {t.get_coro()!r}" for t in tasks[:limit]]
        if len(tasks) > limit:
            described.append(f"... and {len(tasks) - limit} more")
        return "; ".join(described) or "(no tasks)"

    # -- no threads, no real I/O ------------------------------------------------------

    def call_soon_threadsafe(
        self,
        callback: Callable[[*Ts], object],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        # asyncio itself uses this from the loop's own thread (async generator
        # finalisation, set_debug); another thread can never wake a simulation.
        owner = self._thread_id
        if owner is not None and owner != threading.get_ident():
            raise RealIOForbidden(
                "call_soon_threadsafe from another thread: threads cannot take part in a simulation"
            )
        return self.call_soon(callback, *args, context=context)


def _forbidden(name: str) -> Callable[..., NoReturn]:
    def method(self: SimLoop, *args: Any, **kwargs: Any) -> NoReturn:
        raise RealIOForbidden(
            f"loop.{name}() is not available in the simulation: node code must reach other "
            "nodes through the Transport and never use real I/O, threads or processes"
        )

    method.__name__ = method.__qualname__ = name
    return method


for _name in (
    "run_in_executor",
    "set_default_executor",
    "getaddrinfo",
    "getnameinfo",
    "create_connection",
    "create_server",
    "create_datagram_endpoint",
    "create_unix_connection",
    "create_unix_server",
    "connect_accepted_socket",
    "connect_read_pipe",
    "connect_write_pipe",
    "subprocess_exec",
    "subprocess_shell",
    "sendfile",
    "start_tls",
    "sock_recv",
    "sock_recv_into",
    "sock_recvfrom",
    "sock_recvfrom_into",
    "sock_sendall",
    "sock_sendto",
    "sock_connect",
    "sock_accept",
    "sock_sendfile",
    "add_reader",
    "add_writer",
    "remove_reader",
    "remove_writer",
    "add_signal_handler",
    "remove_signal_handler",
):
    setattr(SimLoop, _name, _forbidden(_name))
del _name


def current_loop() -> SimLoop:
    """The running :class:`SimLoop`; ``RuntimeError`` outside a simulation."""
    loop = asyncio.get_running_loop()
    if not isinstance(loop, SimLoop):
        raise RuntimeError("not running inside a simulation (the running loop is not a SimLoop)")
    return loop


@dataclass(frozen=True, slots=True)
class SimResult(Generic[T]):
    """The outcome of :func:`run_simulation`."""

    value: T  # what the main coroutine returned
    seed: int  # the seed used (chosen at random when none was given)
    elapsed: float  # virtual seconds from start until the main coroutine returned
    steps: int  # loop iterations until the main coroutine returned


def run_simulation(
    main: Callable[[], Coroutine[Any, Any, T]],
    *,
    seed: int | None = None,
    max_time: float = DEFAULT_MAX_TIME,
    max_steps: int | None = DEFAULT_MAX_STEPS,
    debug: bool = False,
) -> SimResult[T]:
    """Run ``main()`` on a fresh :class:`SimLoop` until it returns, then close the loop.

    ``seed`` seeds ``current_loop().rng``; without one a seed is drawn from the
    OS and reported in the result. Tasks still running when ``main`` returns
    are cancelled (in creation order), as ``asyncio.run`` does. An exception
    escaping ``main`` (or :class:`RunawaySimulation`, :class:`SimulationDeadlock`)
    is re-raised with a note naming the seed that replays it.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    loop = SimLoop(seed, max_time=max_time, max_steps=max_steps)
    loop.set_debug(debug)
    try:
        try:
            value = loop.run_until_complete(loop.create_task(main(), name="sim-main"))
        except BaseException as exc:
            exc.add_note(
                f"simulation seed={seed} (replay: run_simulation(..., seed={seed})); "
                f"virtual time {loop.time():.6f}s after {loop.steps} steps"
            )
            raise
        result = SimResult(value=value, seed=seed, elapsed=loop.time(), steps=loop.steps)
    finally:
        _shutdown(loop)
    return result


def _shutdown(loop: SimLoop) -> None:
    """Cancel leftover tasks, finalise async generators, close the loop."""
    loop.max_time = math.inf
    loop.max_steps = loop.steps + _SHUTDOWN_STEPS
    try:
        tasks = loop.pending_tasks()
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        for task in tasks:
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is not None:
                loop.call_exception_handler(
                    {
                        "message": "unhandled exception during simulation shutdown",
                        "exception": exc,
                        "task": task,
                    }
                )
        loop.run_until_complete(loop.shutdown_asyncgens())
    except SimulationError:
        pass  # a task refusing to stop: abandon it rather than hang
    finally:
        loop.close()
