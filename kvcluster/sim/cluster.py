"""A whole kvcluster in one process: the deterministic cluster simulation.

:class:`SimCluster` runs N real :class:`kvcluster.node.node.Node` objects on a
:class:`~kvcluster.sim.network.SimNetwork`, each with its own
:class:`~kvcluster.storage.memory.MemoryStorage` (with a small virtual write
delay, so a crash can catch writes in flight), a
:class:`~kvcluster.clock.LoopClock` (optionally skewed) and a
``random.Random`` derived from the seed. Under
:func:`~kvcluster.sim.loop.run_simulation` time is virtual, so minutes of
cluster life take a fraction of a second, and a seed replays exactly.

Fault model (what :meth:`SimCluster.crash`, :meth:`~SimCluster.restart` and
:meth:`~SimCluster.wipe` do):

* **crash** is a SIGKILL: the node's network endpoint dies (nothing more is
  sent or received, handler tasks are cancelled), its store is retired at once
  (writes still waiting for the disk are never applied), its background tasks
  and the client requests it was coordinating are cancelled. What it had
  written durably stays on its "disk".
* **restart** reopens the store and starts a new :class:`Node` over it with a
  fresh network endpoint (a new incarnation).
* **wipe** is a lost disk: the node is crashed and its store replaced by an
  empty one; it comes back (on :meth:`~SimCluster.restart`) as a brand new
  store that must get its data back from the other replicas.

A run (:func:`run_cluster`): start the cluster, run a seeded
:class:`FaultSchedule` and a :class:`Workload` of concurrent clients at the
same time, then heal everything, restart crashed nodes, wait until hinted
handoff drained, move the wall clocks past the tombstone grace period (a
quiet day), run anti-entropy (``node.repair()``) on every node twice (the
replicas converge and tombstones are collected; nothing may come back), read
every key from every replica directly, and check the history with
jepsen-lite's multi-value register checker (no acknowledged write lost unless
causally superseded, no acknowledged delete undone, no phantom or failed
value visible) and its convergence checker (every replica of a key holds the
identical record). The :class:`RunResult` says what happened and the verdict;
``python -m kvcluster.sim --seed N`` replays one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, TypeVar

from jepsen_lite.checkers.convergence import ConvergenceResult, Divergence, check_convergence
from jepsen_lite.checkers.register import FINAL, SEEN, RegisterResult, check_register
from jepsen_lite.history import HistoryRecorder, Op, dumps_jsonl

from kvcluster import errors
from kvcluster.clock import LoopClock
from kvcluster.core.hashing import partition_of, pkey
from kvcluster.core.record import decode_record, live_values
from kvcluster.node.coordinator import ReadResult, WriteResult
from kvcluster.node.node import Node
from kvcluster.node.settings import NodeSettings
from kvcluster.sim.loop import current_loop, run_simulation
from kvcluster.sim.network import SimNetwork, SimTransport, TraceEvent
from kvcluster.storage.memory import MemoryStorage

__all__ = [
    "CoordinatorCrashed",
    "Fault",
    "FaultSchedule",
    "RunResult",
    "SimClient",
    "SimCluster",
    "Workload",
    "WorkloadConfig",
    "derive_rng",
    "replay_command",
    "run_cluster",
    "sim_settings",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Default network latency of the simulated links (seconds, uniform).
LATENCY = (0.001, 0.005)
#: Default virtual duration of one write to a simulated disk (seconds, uniform).
DISK_DELAY = (0.0002, 0.002)
#: Latency of a "slow node" episode's links: ``(x, 1.5 x)`` for x in this tuple.
SLOW_LINKS = (1.0, 3.0)


def sim_settings(**overrides: Any) -> NodeSettings:
    """Node settings for simulated clusters: the defaults, with fewer partitions
    (Q=8 keeps a full anti-entropy pass cheap in real CPU: every exchange builds
    Merkle levels) and shorter request timeouts (more requests per virtual second)."""
    base = NodeSettings(partitions=8, request_timeout=2.0)
    return replace(base, **overrides)


def derive_rng(seed: int, *purpose: object) -> random.Random:
    """A ``random.Random`` for one purpose of one run, derived from the run's seed.

    Seeded with a string (hashed with SHA-512 by ``random``), so it does not depend
    on ``PYTHONHASHSEED``, and independent streams do not disturb each other: adding
    a fault does not change the workload's choices.
    """
    return random.Random(":".join(["kvcluster-sim", str(seed), *map(str, purpose)]))


def replay_command(seed: int, nodes: int, extra: str = "") -> str:
    """The one-line command that replays a run."""
    tail = f" {extra}" if extra else ""
    return f"python -m kvcluster.sim --seed {seed} --nodes {nodes}{tail}"


def _values_of(record: bytes | None) -> list[bytes]:
    """The live values of a stored record (none for an absent one)."""
    return [] if record is None else live_values(decode_record(record))


class CoordinatorCrashed(Exception):
    """The node coordinating a client request crashed before answering (like a
    connection reset): the request may or may not have taken effect."""

    def __init__(self, node: str) -> None:
        super().__init__(f"coordinator {node} crashed during the request")
        self.node = node


# -- the cluster ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Member:
    """One simulated machine: its disk and clock survive crashes, its Node does not."""

    node_id: str
    storage: MemoryStorage
    clock: LoopClock
    node: Node | None = None
    transport: SimTransport | None = None
    lives: int = 0  # incarnations started so far
    wipes: int = 0
    # Client requests this incarnation is coordinating (cancelled by a crash).
    requests: list[asyncio.Task[Any]] = field(default_factory=list)


class SimCluster:
    """N simulated nodes ``n1..nN`` on one simulated network (see the module docs).

    Build it inside a simulation (``run_simulation``) and ``await start()``.
    ``disk_delay`` is the (min, max) virtual duration of a store write;
    ``clock_skew_ms`` gives node ``i`` an initial wall-clock offset drawn from
    ``[-skew, +skew]``.
    """

    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        settings: NodeSettings | None = None,
        *,
        latency: tuple[float, float] = LATENCY,
        disk_delay: tuple[float, float] = DISK_DELAY,
        clock_skew_ms: int = 0,
        trace: bool = False,
    ) -> None:
        if not 1 <= nodes <= 16:
            raise ValueError(f"nodes must be within 1..16, not {nodes}")
        self.seed = seed
        self.settings = settings if settings is not None else sim_settings()
        self.settings.validate()
        self.latency = latency
        self.network = SimNetwork(
            derive_rng(seed, "network"), min_latency=latency[0], max_latency=latency[1], trace=trace
        )
        self.node_ids = [f"n{i}" for i in range(1, nodes + 1)]
        self.seeds = {n: f"sim://{n}" for n in self.node_ids}
        self._disk_delay = disk_delay
        skew_rng = derive_rng(seed, "skew")
        self._members: dict[str, _Member] = {}
        for node_id in self.node_ids:
            offset = skew_rng.randint(-clock_skew_ms, clock_skew_ms) if clock_skew_ms else 0
            self._members[node_id] = _Member(
                node_id, self._new_storage(node_id), LoopClock(offset_ms=offset)
            )
        for member in self._members.values():
            member.transport = self.network.endpoint(member.node_id, self._handler(member))
        #: Faults applied so far, as ``(virtual time, description)``.
        self.events: list[tuple[float, str]] = []
        #: Nodes to crash right after their next acknowledged put, and whether to
        #: wipe them too (see :meth:`crash_after_ack`).
        self._armed: dict[str, bool] = {}
        self._cleanup: list[asyncio.Task[None]] = []
        self._cut: dict[str, float] = {}  # node -> drop rate of its outgoing links

    def _new_storage(self, label: str) -> MemoryStorage:
        """A fresh store; ``label`` names the disk (seeds its write delays)."""
        rng = derive_rng(self.seed, "disk", label)
        low, high = self._disk_delay

        async def delay() -> None:
            await asyncio.sleep(rng.uniform(low, high) if high > 0 else 0)

        return MemoryStorage(delay=delay)

    # -- views ------------------------------------------------------------------------------

    def node(self, node_id: str) -> Node:
        """The running Node ``node_id``; ``LookupError`` if it is crashed."""
        node = self._member(node_id).node
        if node is None:
            raise LookupError(f"{node_id} is not running")
        return node

    def nodes(self) -> list[Node]:
        """The running nodes, in id order."""
        return [m.node for m in self._members.values() if m.node is not None]

    def is_up(self, node_id: str) -> bool:
        return self._member(node_id).node is not None

    def up(self) -> list[str]:
        return [n for n, m in self._members.items() if m.node is not None]

    def down(self) -> list[str]:
        return [n for n, m in self._members.items() if m.node is None]

    def clock(self, node_id: str) -> LoopClock:
        return self._member(node_id).clock

    def storage(self, node_id: str) -> MemoryStorage:
        """The node's current store (the disk; present while crashed too)."""
        return self._member(node_id).storage

    def owners(self, key: bytes) -> tuple[str, ...]:
        """The first N owners of ``key``'s partition, by the agreed ring of an up node."""
        for node in self.nodes():
            ring = node.membership.ring_or_none()
            if ring is not None:
                return ring.owners_of(partition_of(key, ring.q))
        raise errors.NotReady("no running node has an agreed ring")

    def pkey(self, key: bytes) -> bytes:
        return pkey(partition_of(key, self.settings.partitions), key)

    def hints_pending(self) -> dict[str, int]:
        """Hints held per node (running nodes only), for those holding any."""
        out: dict[str, int] = {}
        for node in self.nodes():
            total = sum(node.handoff.pending().values())
            if total:
                out[node.node_id] = total
        return out

    def _member(self, node_id: str) -> _Member:
        try:
            return self._members[node_id]
        except KeyError:
            raise ValueError(f"unknown node {node_id!r}") from None

    def _note(self, what: str) -> None:
        now = asyncio.get_running_loop().time()
        self.events.append((now, what))
        log.debug("%.3f %s", now, what)

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, timeout: float = 60.0, ready: Sequence[str] | None = None) -> None:
        """Start every node; return once each node of ``ready`` (default: all) has
        installed the agreed ring (``TimeoutError`` after ``timeout``)."""
        for node_id in self.node_ids:
            await self._boot(self._members[node_id])
        wanted = list(self.node_ids if ready is None else ready)
        await self.wait_for(
            lambda: all(self.node(n).membership.meta is not None for n in wanted),
            timeout,
            f"{', '.join(wanted)} to install the first ring",
        )

    async def stop(self) -> None:
        """Stop every running node (cancel its tasks); the stores stay."""
        for member in self._members.values():
            node = member.node
            if node is not None:
                member.node = None
                await node.stop()
        for task in self._cleanup:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _handler(self, member: _Member) -> Callable[[str, Any], Awaitable[Any]]:
        """The network handler of ``member``: its current Node (the network never
        delivers a message addressed to an earlier incarnation to a later one)."""

        async def handler(src: str, msg: Any) -> Any:
            node = member.node
            if node is None:  # registered, not started yet
                raise errors.NotReady(f"{member.node_id} is starting")
            return await node.handle(src, msg)

        return handler

    async def _boot(self, member: _Member) -> None:
        member.lives += 1
        if member.lives == 1:
            transport = member.transport
            assert transport is not None
        else:
            transport = self.network.restart(member.node_id, self._handler(member))
        node = Node(
            member.node_id,
            self.seeds[member.node_id],
            self.settings,
            member.storage,
            transport,
            member.clock,
            derive_rng(self.seed, "node", member.node_id, member.lives),
            dict(self.seeds),
        )
        member.node = node
        member.transport = transport
        try:
            await node.start()
        except errors.KVError:
            if member.node is node:
                raise
            # Crashed while starting (its store was retired under it): it stays down.

    def crash(self, node_id: str) -> None:
        """SIGKILL ``node_id`` (see the module docs). A crashed node stays down until
        :meth:`restart`. Synchronous: once this returns the incarnation can neither
        send, receive nor write to its store (its tasks are cancelled soon after)."""
        member = self._member(node_id)
        node = member.node
        if node is None:
            return
        self._note(f"crash {node_id}")
        self.network.crash(node_id)
        # Retire the store now: writes still waiting for the disk are never applied
        # and zombie tasks of this incarnation can no longer touch the data.
        member.storage = member.storage.reopen()
        member.node = None
        requests, member.requests = member.requests, []
        for task in requests:
            task.cancel()
        self._armed.pop(node_id, None)
        # node.stop() cancels every background task before its first await.
        self._cleanup.append(asyncio.get_running_loop().create_task(node.stop()))

    async def restart(self, node_id: str) -> None:
        """Start a new incarnation of a crashed (or wiped) node over its store."""
        member = self._member(node_id)
        if member.node is not None:
            raise RuntimeError(f"{node_id} is running: crash it first")
        self._note(f"restart {node_id}")
        member.storage = member.storage.reopen()
        await self._boot(member)

    def wipe(self, node_id: str) -> None:
        """Lose ``node_id``'s disk: crash it (if up) and give it an empty store."""
        member = self._member(node_id)
        self.crash(node_id)
        self._note(f"wipe {node_id}")
        member.storage.reopen()  # retire the old store for good
        member.wipes += 1
        member.storage = self._new_storage(f"{node_id}.wiped{member.wipes}")

    def crash_after_ack(self, node_id: str, wipe: bool = True) -> None:
        """Arm a trigger: crash ``node_id`` (and with ``wipe`` lose its disk) the
        moment it acknowledges its next client put of a key it owns, before it can
        run any further. A crash disarms it."""
        self._note(f"arm crash-after-ack {node_id}{'' if wipe else ' (keep disk)'}")
        self._armed[node_id] = wipe

    def disarm(self, node_id: str) -> None:
        """Cancel a :meth:`crash_after_ack` trigger that has not fired."""
        if self._armed.pop(node_id, None) is not None:
            self._note(f"disarm {node_id}")

    def note_ack(self, node_id: str, key: bytes) -> None:
        """Called by clients right after ``node_id`` acknowledged a put of ``key``."""
        wipe = self._armed.get(node_id)
        if wipe is None:
            return
        with contextlib.suppress(errors.NotReady):
            if node_id not in self.owners(key):
                return
        self._note(f"crash-after-ack {node_id} key={key.decode(errors='replace')}")
        if wipe:
            self.wipe(node_id)
        else:
            self.crash(node_id)

    # -- network faults (passthroughs, recorded) -----------------------------------------

    def partition(self, *groups: Sequence[str]) -> None:
        self._note("partition " + " | ".join(",".join(g) for g in groups))
        self.network.partition(*groups)

    def isolate(self, node_id: str) -> None:
        self._note(f"isolate {node_id}")
        self.network.isolate(node_id)

    def bridge(self, left: Sequence[str], bridge: str, right: Sequence[str]) -> None:
        """``left`` and ``right`` cannot talk to each other; ``bridge`` talks to both."""
        self._note(f"bridge {','.join(left)} <{bridge}> {','.join(right)}")
        for a in left:
            for b in right:
                self.network.set_link(a, b, drop=1.0)
                self.network.set_link(b, a, drop=1.0)

    def cut_off(self, node_id: str, drop: float = 1.0) -> None:
        """Lose (with probability ``drop``) every message ``node_id`` sends to another
        node (requests and replies); clients still reach it."""
        self._note(f"cut-off {node_id} drop={drop:g}")
        self._cut[node_id] = drop
        self._set_outgoing(node_id, drop)

    def _set_outgoing(self, node_id: str, drop: float | None) -> None:
        """Override the drop rate of every link out of ``node_id`` (``None``: remove
        every override of those links)."""
        for other in self.node_ids:
            if other != node_id:
                self.network.set_link(node_id, other, drop=drop)

    def reconnect(self, node_id: str) -> None:
        """Undo :meth:`cut_off` (and any other override of ``node_id``'s outgoing links)."""
        self._note(f"reconnect {node_id}")
        self._cut.pop(node_id, None)
        self._set_outgoing(node_id, None)

    def heal(self) -> None:
        """Remove every partition and per-link fault, except the nodes cut off by
        :meth:`cut_off` (a fault of its own, undone by :meth:`reconnect`)."""
        self._note("heal")
        self.network.heal()
        for node_id, drop in sorted(self._cut.items()):
            self._set_outgoing(node_id, drop)

    def drops(self, rate: float) -> None:
        self._note(f"drop-rate {rate:.3f}")
        self.network.set_drop_rate(rate)

    def duplicates(self, rate: float) -> None:
        self._note(f"duplicate-rate {rate:.3f}")
        self.network.set_duplicate_rate(rate)

    def set_latency(self, low: float, high: float) -> None:
        self._note(f"latency {low:.4f}..{high:.4f}")
        self.network.set_latency(low, high)

    def slow_link(self, src: str, dst: str, latency: tuple[float, float]) -> None:
        self._note(f"slow-link {src}->{dst} {latency[0]:.3f}..{latency[1]:.3f}")
        self.network.set_link(src, dst, latency=latency)

    def advance_wall_clocks(self, seconds: float) -> None:
        """Move every node's wall clock forward by ``seconds`` (monotonic time, and so
        timers and failure detection, do not notice): what a quiet day does to the
        wall-clock rules (tombstone grace, hint age), without simulating the day."""
        self._note(f"wall clocks +{seconds:g}s")
        for member in self._members.values():
            member.clock.offset_ms += int(seconds * 1000)

    def skew(self, node_id: str, offset_ms: int) -> None:
        self._note(f"skew {node_id} {offset_ms:+d}ms")
        self._member(node_id).clock.offset_ms = offset_ms

    async def heal_all(self) -> None:
        """Undo every fault: heal the network, reset rates and latency, restart the
        crashed nodes (clock skews stay: machines keep their clocks)."""
        self._cut.clear()
        self.heal()
        self.network.set_drop_rate(0.0)
        self.network.set_duplicate_rate(0.0)
        self.network.set_latency(*self.latency)
        self._armed.clear()
        for node_id in self.down():
            await self.restart(node_id)

    # -- waiting ----------------------------------------------------------------------------

    async def wait_for(
        self, condition: Callable[[], bool], timeout: float, what: str, step: float = 0.1
    ) -> None:
        """Poll ``condition`` every ``step`` virtual seconds; TimeoutError after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() >= deadline:
                raise TimeoutError(f"gave up after {timeout:g}s waiting for {what}")
            await asyncio.sleep(step)

    def all_see_all_up(self) -> bool:
        every = frozenset(self.node_ids)
        return (
            all(
                n.membership.meta is not None and n.membership.up_nodes() == every
                for n in self.nodes()
            )
            and not self.down()
        )

    async def settle(self, timeout: float = 120.0) -> dict[str, int]:
        """After :meth:`heal_all`: wait until every node sees every other up and the
        hints drained. Returns the hints still pending (empty when drained)."""
        with contextlib.suppress(TimeoutError):
            await self.wait_for(self.all_see_all_up, timeout / 2, "every node to be seen up")
        with contextlib.suppress(TimeoutError):
            await self.wait_for(lambda: not self.hints_pending(), timeout / 2, "hints to drain")
        return self.hints_pending()

    async def repair_all(self) -> list[str]:
        """Run anti-entropy on every node, one after the other; the errors reported."""
        problems: list[str] = []
        for node in self.nodes():
            async for progress in node.repair():
                if progress.done:
                    problems.extend(f"{node.node_id}: {e}" for e in progress.errors)
        return problems

    # -- reading the final state ----------------------------------------------------------

    def local_record(self, node_id: str, key: bytes) -> bytes | None:
        """``node_id``'s stored record bytes for ``key`` (a direct local read)."""
        return self.node(node_id).replica.read(self.pkey(key))

    def local_values(self, node_id: str, key: bytes) -> list[bytes]:
        return _values_of(self.local_record(node_id, key))

    # -- clients -----------------------------------------------------------------------------

    def client(
        self, node_preference: Sequence[str] | None = None, rng: random.Random | None = None
    ) -> SimClient:
        """A client that sends each request to the first live node of
        ``node_preference``, moving on when that node is crashed. With ``None`` it
        routes like the real client (token-aware): to an owner of the key, picked
        at random with ``rng`` (the first owner without one), then the others."""
        return SimClient(self, node_preference, rng)

    def _coordinator_for(
        self, preference: Sequence[str] | None, key: bytes, rng: random.Random | None = None
    ) -> str:
        order: list[str]
        if preference is None:
            try:
                owners = list(self.owners(key))
            except errors.NotReady:
                owners = []
            if rng is not None and owners:
                first = rng.randrange(len(owners))
                owners = owners[first:] + owners[:first]
            order = owners + [n for n in self.node_ids if n not in owners]
        else:
            order = list(preference) + [n for n in self.node_ids if n not in preference]
        for node_id in order:
            if self._members[node_id].node is not None:
                return node_id
        raise errors.Unreachable(list(order), "every node is down")

    async def _on(self, node_id: str, call: Callable[[Node], Coroutine[Any, Any, T]]) -> T:
        """Run ``call(node)`` as a request coordinated by ``node_id``; a crash of the
        node while it runs raises :class:`CoordinatorCrashed`."""
        member = self._members[node_id]
        node = member.node
        if node is None:
            raise CoordinatorCrashed(node_id)
        task = asyncio.get_running_loop().create_task(call(node))
        member.requests.append(task)
        try:
            await asyncio.wait([task])
        finally:
            if task in member.requests:
                member.requests.remove(task)
            if not task.done():  # the client itself was cancelled
                task.cancel()
        if task.cancelled():
            raise CoordinatorCrashed(node_id)
        return task.result()


class SimClient:
    """Client requests against the simulated cluster (see :meth:`SimCluster.client`)."""

    def __init__(
        self,
        cluster: SimCluster,
        preference: Sequence[str] | None,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.preference = None if preference is None else list(preference)
        self.rng = rng
        #: The node that coordinated the last request.
        self.last_node: str | None = None

    def _pick(self, key: bytes) -> str:
        node = self.cluster._coordinator_for(self.preference, key, self.rng)
        self.last_node = node
        return node

    async def get(self, key: bytes, r: int | str | None = None, strict: bool = False) -> ReadResult:
        node = self._pick(key)
        return await self.cluster._on(node, lambda n: n.coordinator.get(key, r=r, strict=strict))

    async def put(
        self,
        key: bytes,
        value: bytes,
        context: bytes = b"",
        w: int | str | None = None,
        strict: bool = False,
    ) -> WriteResult:
        node = self._pick(key)
        result = await self.cluster._on(
            node, lambda n: n.coordinator.put(key, value, context, w=w, strict=strict)
        )
        self.cluster.note_ack(node, key)
        return result

    async def delete(
        self,
        key: bytes,
        context: bytes = b"",
        w: int | str | None = None,
        strict: bool = False,
    ) -> bool:
        node = self._pick(key)
        return await self.cluster._on(
            node, lambda n: n.coordinator.delete(key, context, w=w, strict=strict)
        )


# -- the fault schedule --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """One step of a fault schedule, applied at virtual time ``at`` (seconds from the
    start of the workload). ``kind`` names the action; see :meth:`FaultSchedule.apply`."""

    at: float
    kind: str
    nodes: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    value: float = 0.0


class FaultSchedule:
    """A seeded sequence of faults over virtual time (always healed at the end).

    Two independent tracks: the *node* track crashes and restarts nodes (at most
    a minority down at once), sometimes crashing a node right after it
    acknowledged a write, and at most once per run wipes a disk; the *network*
    track partitions (isolate one node, majority/minority, a bridge), changes
    the drop and duplicate rates, adds latency spikes and slow links, and skews
    clocks. Every episode undoes itself.
    """

    def __init__(self, faults: Sequence[Fault]) -> None:
        self.faults = sorted(faults, key=lambda f: f.at)

    def __iter__(self) -> Iterator[Fault]:
        return iter(self.faults)

    def __len__(self) -> int:
        return len(self.faults)

    @classmethod
    def generate(
        cls,
        rng: random.Random,
        nodes: Sequence[str],
        duration: float,
        *,
        wipe: bool = True,
        intensity: float = 1.0,
    ) -> FaultSchedule:
        """A random schedule for ``duration`` virtual seconds. ``intensity`` scales
        how often episodes start (1.0: one every few seconds per track)."""
        nodes = list(nodes)
        faults: list[Fault] = []
        max_down = max(1, (len(nodes) - 1) // 2)
        gap = (0.5 / intensity, 3.0 / intensity)
        # -- node track --
        quiet: list[tuple[float, float]] = []  # no network episode overlaps these
        t = rng.uniform(*gap)
        wiped = not wipe
        while t < duration - 1.0:
            end = min(duration - 0.5, t + rng.uniform(0.5, 5.0))
            roll = rng.random()
            victims = rng.sample(nodes, rng.randint(1, max_down))
            if roll < 0.45 and not wiped:
                # The sharpest fault: a node is cut off from the other nodes (clients
                # still reach it, its outgoing messages are lost), then loses its disk
                # while still cut off. Whatever it acknowledged alone is gone.
                victim = victims[0]
                wiped = True
                lost_at = min(t + rng.uniform(0.5, 3.0), duration - 0.4)
                back = min(max(end, lost_at + 0.3), duration - 0.1)
                quiet.append((t, back))
                faults.append(Fault(t, "cut-off", (victim,), value=rng.choice((0.7, 1.0, 1.0))))
                faults.append(Fault(t + 0.1, "crash-after-ack", (victim,)))
                faults.append(Fault(lost_at, "wipe-if-up", (victim,)))
                faults.append(Fault(back, "restart", (victim,)))
                faults.append(Fault(back, "reconnect", (victim,)))
            elif roll < 0.5 and not wiped:
                victim = victims[0]
                wiped = True
                faults.append(Fault(t, "crash-after-ack", (victim,)))
                faults.append(Fault(end, "disarm", (victim,)))
                faults.append(Fault(end, "restart", (victim,)))
            elif roll < 0.7:
                victim = victims[0]
                faults.append(Fault(t, "crash-after-ack-keep", (victim,)))
                faults.append(Fault(end, "disarm", (victim,)))
                faults.append(Fault(end, "restart", (victim,)))
            else:
                for victim in victims:
                    faults.append(Fault(t + rng.uniform(0, 0.3), "crash", (victim,)))
                    faults.append(Fault(end + rng.uniform(0, 0.3), "restart", (victim,)))
                # (end <= duration - 0.5: every restart happens while clients run)
            t = end + 0.6 + rng.uniform(*gap)
        # -- network track --
        t = rng.uniform(*gap)
        while t < duration - 1.0:
            end = min(duration - 0.5, t + rng.uniform(0.5, 6.0))
            clash = [b for a, b in quiet if a < end + 0.2 and t < b + 0.2]
            if clash:
                t = max(clash) + 0.3
                continue
            kind = rng.choices(
                ("isolate", "split", "bridge", "drops", "duplicates", "latency", "slow", "skew"),
                weights=(3, 3, 1, 2, 2, 1, 1, 1),
            )[0]
            shuffled = rng.sample(nodes, len(nodes))
            if kind == "isolate":
                faults.append(Fault(t, "partition", groups=((shuffled[0],), tuple(shuffled[1:]))))
                faults.append(Fault(end, "heal"))
            elif kind == "split" and len(nodes) >= 3:
                cut = rng.randint(1, len(nodes) // 2)
                groups = (tuple(sorted(shuffled[:cut])), tuple(sorted(shuffled[cut:])))
                faults.append(Fault(t, "partition", groups=groups))
                faults.append(Fault(end, "heal"))
            elif kind == "bridge" and len(nodes) >= 3:
                bridge = shuffled[0]
                rest = shuffled[1:]
                cut = max(1, len(rest) // 2)
                faults.append(
                    Fault(t, "bridge", (bridge,), groups=(tuple(rest[:cut]), tuple(rest[cut:])))
                )
                faults.append(Fault(end, "heal"))
            elif kind == "drops":
                faults.append(Fault(t, "drops", value=rng.choice((0.05, 0.1, 0.2, 0.4))))
                faults.append(Fault(end, "drops", value=0.0))
            elif kind == "duplicates":
                faults.append(Fault(t, "duplicates", value=rng.choice((0.1, 0.3, 0.5))))
                faults.append(Fault(end, "duplicates", value=0.0))
            elif kind == "latency":
                faults.append(Fault(t, "latency", value=rng.choice((0.05, 0.2, 0.8))))
                faults.append(Fault(end, "latency", value=0.0))
            elif kind == "slow":
                # A SIGSTOP-like node: everything it sends takes (almost) forever.
                faults.append(Fault(t, "slow", (shuffled[0],), value=rng.choice(SLOW_LINKS)))
                faults.append(Fault(end, "heal"))
            else:
                faults.append(
                    Fault(
                        t,
                        "skew",
                        (shuffled[0],),
                        value=rng.choice((-1, 1)) * rng.randint(1, 90) * 1000,
                    )
                )
            t = end + rng.uniform(*gap)
        return cls(faults)

    async def run(self, cluster: SimCluster) -> None:
        """Apply the faults at their times (relative to now); heals nothing itself."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for fault in self.faults:
            wait = start + fault.at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.apply(cluster, fault)

    @staticmethod
    async def apply(cluster: SimCluster, fault: Fault) -> None:
        kind = fault.kind
        if kind == "crash":
            cluster.crash(fault.nodes[0])
        elif kind == "restart":
            if not cluster.is_up(fault.nodes[0]):
                await cluster.restart(fault.nodes[0])
        elif kind == "crash-after-ack":
            cluster.crash_after_ack(fault.nodes[0])
        elif kind == "crash-after-ack-keep":
            cluster.crash_after_ack(fault.nodes[0], wipe=False)
        elif kind == "disarm":
            cluster.disarm(fault.nodes[0])
        elif kind == "wipe":
            cluster.wipe(fault.nodes[0])
        elif kind == "wipe-if-up":
            if cluster.is_up(fault.nodes[0]):
                cluster.wipe(fault.nodes[0])
        elif kind == "cut-off":
            cluster.cut_off(fault.nodes[0], fault.value)
        elif kind == "reconnect":
            cluster.reconnect(fault.nodes[0])
        elif kind == "partition":
            cluster.partition(*fault.groups)
        elif kind == "bridge":
            cluster.bridge(fault.groups[0], fault.nodes[0], fault.groups[1])
        elif kind == "heal":
            cluster.heal()
        elif kind == "drops":
            cluster.drops(fault.value)
        elif kind == "duplicates":
            cluster.duplicates(fault.value)
        elif kind == "latency":
            if fault.value:
                cluster.set_latency(fault.value / 4, fault.value)
            else:
                cluster.set_latency(*cluster.latency)
        elif kind == "slow":
            node = fault.nodes[0]
            for other in cluster.node_ids:
                if other != node:
                    cluster.slow_link(node, other, (fault.value, fault.value * 1.5))
        elif kind == "skew":
            cluster.skew(fault.nodes[0], int(fault.value))
        else:
            raise ValueError(f"unknown fault kind {kind!r}")


# -- the workload ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Sizes and mix of the simulated client workload."""

    clients: int = 6
    keys: int = 4
    duration: float = 10.0  # virtual seconds of client activity
    think: tuple[float, float] = (0.0, 0.25)  # pause between operations
    # operation mix (relative weights)
    get: float = 3.0
    put_context: float = 4.0  # read, then write with the read's context
    put_blind: float = 2.0
    delete_context: float = 1.0  # read, then delete with the read's context
    delete_blind: float = 1.0  # delete without context (the server reads first)
    #: Share of writes and deletes sent with ``w="all"``, and with ``strict=True``
    #: (only primaries count); of reads sent with ``r=1``, and with ``r="all"``. W is
    #: never below 2: one acknowledged copy may legitimately be lost with its disk.
    w_all: float = 0.1
    strict: float = 0.1
    r_one: float = 0.1
    r_all: float = 0.1
    #: Blind deletes go to this many dedicated keys only (``b0``...): the checker must
    #: assume a blind delete superseded every value written before it, which would
    #: hide lost writes on the keys it touched.
    blind_keys: int = 1


class Workload:
    """Concurrent clients doing gets, puts and deletes on a small key space,
    recording every operation in a jepsen-lite history.

    Outcomes: ``ok``; ``fail`` when the request definitely did not take effect
    (``Unavailable``, ``NotReady``, ``InvalidArgument``, ``Overloaded``,
    ``Unreachable``: rejected before anything was written); ``info`` otherwise
    (``Timeout``, a crashed coordinator, anything unexpected). Write values are
    unique; a write or delete that used a read's context lists the values that
    read returned in ``extra["seen"]``.
    """

    REJECTED = (
        errors.Unavailable,
        errors.NotReady,
        errors.InvalidArgument,
        errors.Overloaded,
        errors.Unreachable,
    )

    def __init__(self, cluster: SimCluster, config: WorkloadConfig, seed: int) -> None:
        self.cluster = cluster
        self.config = config
        self.seed = seed
        self.blind_keys = [f"b{i}" for i in range(config.blind_keys)]
        self.keys = [f"k{i}" for i in range(config.keys)] + self.blind_keys
        self.recorder = HistoryRecorder(clock=lambda: round(current_loop().time() * 1e9))
        #: Exceptions that are not kvcluster errors (bugs), as text.
        self.unexpected: list[str] = []
        self._values = 0

    @property
    def history(self) -> list[Op]:
        return self.recorder.history

    async def run(self) -> None:
        """Run every client until ``duration`` has passed; wait for them to finish."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.config.duration
        nodes = self.cluster.node_ids
        tasks = []
        for i in range(self.config.clients):
            # Half the clients route to an owner of the key (token-aware), the others
            # stick to one node (which forwards writes of keys it does not own).
            preference = None if i % 2 == 0 else [nodes[i % len(nodes)]]
            rng = derive_rng(self.seed, "client", i)
            client = self.cluster.client(preference, derive_rng(self.seed, "routing", i))
            tasks.append(loop.create_task(self._client(i, client, rng, end), name=f"client-{i}"))
        for task in tasks:
            await task

    async def _client(self, index: int, client: SimClient, rng: random.Random, end: float) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        process = index
        ops = ("get", "put_context", "put_blind", "delete_context", "delete_blind")
        weights = [getattr(cfg, op) for op in ops]
        while loop.time() < end:
            await asyncio.sleep(rng.uniform(*cfg.think))
            if loop.time() >= end:
                break
            op = rng.choices(ops, weights=weights)[0]
            if op == "delete_blind":
                if not self.blind_keys:
                    continue
                key = rng.choice(self.blind_keys)
            else:
                key = rng.choice(self.keys)
            if op == "get":
                await self._get(process, client, key, rng)
            elif op == "put_blind":
                process = await self._change(process, client, "write", key, None, None, rng)
            elif op == "delete_blind":
                process = await self._change(process, client, "delete", key, None, None, rng)
            else:
                read = await self._get(process, client, key, rng)
                if read is None:
                    continue
                seen = [v.decode() for v in read.values]
                if op == "put_context":
                    process = await self._change(
                        process, client, "write", key, read.context, seen, rng
                    )
                elif read.context:
                    process = await self._change(
                        process, client, "delete", key, read.context, seen, rng
                    )

    def _next_value(self, process: int) -> str:
        self._values += 1
        return f"v{self._values}-p{process}"

    def _outcome(self, exc: BaseException) -> Literal["fail", "info"]:
        if isinstance(exc, self.REJECTED):
            return "fail"
        if not isinstance(exc, errors.KVError | CoordinatorCrashed):
            self.unexpected.append(f"{type(exc).__name__}: {exc}")
            log.error("unexpected exception from a request", exc_info=exc)
        return "info"

    def _write_options(
        self, seen: list[str] | None, rng: random.Random
    ) -> tuple[str | None, bool, dict[str, Any]]:
        """(w, strict, extra) for one write or delete."""
        extra: dict[str, Any] = {} if seen is None else {SEEN: seen}
        roll = rng.random()
        w = "all" if roll < self.config.w_all else None
        strict = self.config.w_all <= roll < self.config.w_all + self.config.strict
        if w is not None:
            extra["w"] = w
        if strict:
            extra["strict"] = True
        return w, strict, extra

    def _next_process(self, process: int) -> int:
        # Like Jepsen: after an indeterminate outcome the process is abandoned.
        return process + self.config.clients

    async def _get(
        self, process: int, client: SimClient, key: str, rng: random.Random
    ) -> ReadResult | None:
        """One read (``None`` when it failed); a read never abandons its process."""
        roll = rng.random()
        r: int | str | None = None
        if roll < self.config.r_one:
            r = 1
        elif roll < self.config.r_one + self.config.r_all:
            r = "all"
        self.recorder.invoke(process, "read", key, None, {} if r is None else {"r": r})
        try:
            result = await client.get(key.encode(), r=r)
        except Exception as exc:
            # A read changes nothing: a failed one is "fail" whatever the reason.
            self._outcome(exc)
            self.recorder.fail(process, None, {"error": type(exc).__name__})
            return None
        self.recorder.ok(process, [v.decode() for v in result.values])
        return result

    async def _change(
        self,
        process: int,
        client: SimClient,
        f: Literal["write", "delete"],
        key: str,
        context: bytes | None,
        seen: list[str] | None,
        rng: random.Random,
    ) -> int:
        """One put of a new unique value (``f="write"``) or one delete; returns the
        process to go on with."""
        value = self._next_value(process) if f == "write" else None
        w, strict, extra = self._write_options(seen, rng)
        self.recorder.invoke(process, f, key, value, extra)
        try:
            if value is None:
                result: str | bool = await client.delete(
                    key.encode(), context or b"", w=w, strict=strict
                )
            else:
                await client.put(key.encode(), value.encode(), context or b"", w=w, strict=strict)
                result = value
        except Exception as exc:
            kind = self._outcome(exc)
            self.recorder.complete(process, kind, value, {"error": type(exc).__name__})
            return process if kind == "fail" else self._next_process(process)
        self.recorder.ok(process, result, {"node": client.last_node})
        return process


# -- one full run ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """What one simulated run did, and the verdict of the checkers."""

    seed: int
    nodes: int
    settings: NodeSettings
    workload: WorkloadConfig
    generated_faults: bool  # the schedule came from the seed (not given, not off)
    faults: list[Fault]
    events: list[tuple[float, str]]  # faults as applied
    history: list[Op]
    #: key -> node -> hex of the stored record (None: absent), every node
    records: dict[str, dict[str, str | None]]
    #: key -> its owners
    owners: dict[str, list[str]]
    register: RegisterResult
    convergence: ConvergenceResult
    hints_left: dict[str, int]
    repair_errors: list[str]
    unexpected: list[str]
    stray_copies: list[str]  # "key@node": a copy on a node that does not own the key
    tombstones_purged: int  # by anti-entropy once the grace period had passed
    virtual_time: float
    steps: int = 0
    #: The network's events (only when run with ``trace=True``).
    trace: list[TraceEvent] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return (
            self.register.valid is True
            and self.convergence.valid is True
            and not self.hints_left
            and not self.repair_errors
            and not self.unexpected
            and not self.stray_copies
        )

    @property
    def lost(self) -> list[str]:
        """``key=value`` of every acknowledged write the checker found lost."""
        return [f"{a.key}={a.value}" for a in self.register.lost]

    def problems(self) -> list[str]:
        """One line per reason the run is invalid (empty when valid)."""
        out = [
            f"register {a.kind}: key={a.key} value={a.value!r}: {a.detail}"
            for a in self.register.anomalies
        ]
        if self.register.valid is not True and not self.register.anomalies:
            out.append(f"register checker: valid={self.register.valid!r} (unverified writes)")
        out += [
            f"divergent replicas: key={d.key} {json.dumps(d.values, sort_keys=True)}"
            for d in self.convergence.divergent
        ]
        if self.convergence.valid is not True and not self.convergence.divergent:
            out.append(f"convergence checker: valid={self.convergence.valid!r}")
        if self.hints_left:
            out.append(f"hints did not drain: {self.hints_left}")
        out += [f"repair error: {e}" for e in self.repair_errors]
        out += [f"unexpected exception: {e}" for e in self.unexpected]
        out += [
            f"stray copy: {s} (a non-owner still holds the key after handoff drained)"
            for s in self.stray_copies
        ]
        return out

    def summary(self) -> str:
        r = self.register
        return (
            f"seed={self.seed} nodes={self.nodes} valid={self.valid} "
            f"ops={len(self.history) // 2} writes={r.write_count} ok={r.acknowledged_count} "
            f"fail={r.failed_count} info={r.indeterminate_count} "
            f"superseded={r.superseded_count} present={r.present_count} "
            f"recovered={r.recovered_count} lost={len(r.lost)} "
            f"anomalies={len(r.anomalies)} divergent={len(self.convergence.divergent)} "
            f"tombstones-purged={self.tombstones_purged} "
            f"faults={len(self.events)} virtual={self.virtual_time:.1f}s"
        )

    def replay(self) -> str:
        """The command that replays this run (exact for runs the CLI can express:
        default settings but for the planted bugs, a generated or no schedule)."""
        flags = []
        defaults = WorkloadConfig()
        for name in ("clients", "keys", "duration"):
            value = getattr(self.workload, name)
            if value != getattr(defaults, name):
                flags.append(f"--{name} {value:g}")
        if not self.generated_faults and not self.faults:
            flags.append("--no-faults")
        if self.settings.unsafe_ack_before_w:
            flags.append("--unsafe-ack-before-w")
        if self.settings.unsafe_lww:
            flags.append("--unsafe-lww")
        return replay_command(self.seed, self.nodes, " ".join(flags))

    def digest(self) -> str:
        """A hash of the history, the final state and the faults: equal for a replay."""
        h = hashlib.sha256()
        h.update(dumps_jsonl(self.history).encode())
        h.update(json.dumps(self.records, sort_keys=True).encode())
        h.update(json.dumps(self.events).encode())
        return h.hexdigest()


class _FinalState(NamedTuple):
    #: key -> node -> hex of the stored record (None: absent), every node
    records: dict[str, dict[str, str | None]]
    #: key -> its owners
    owners: dict[str, list[str]]
    #: "key@node": a copy on a node that does not own the key
    stray: list[str]
    #: node -> key -> live values (the convergence checker's input)
    values: dict[str, dict[str, list[str]]]


def _final_state(cluster: SimCluster, workload: Workload) -> _FinalState:
    """Read every key from every node directly (once); record the owners' reads as
    final reads in the history."""
    final = _FinalState({}, {}, [], {node_id: {} for node_id in cluster.node_ids})
    process = 1_000_000
    for key in workload.keys:
        kb = key.encode()
        owners = final.owners[key] = sorted(cluster.owners(kb))
        final.records[key] = {}
        for node_id in cluster.node_ids:
            record = cluster.local_record(node_id, kb)
            final.records[key][node_id] = None if record is None else record.hex()
            values = final.values[node_id][key] = [v.decode() for v in _values_of(record)]
            if node_id in owners:
                process += 1
                workload.recorder.invoke(process, "read", key, None, {FINAL: True, "node": node_id})
                workload.recorder.ok(process, values)
            elif record is not None:
                final.stray.append(f"{key}@{node_id}")
    return final


def run_cluster(
    seed: int,
    nodes: int = 3,
    settings: NodeSettings | None = None,
    workload: WorkloadConfig | None = None,
    *,
    faults: bool | FaultSchedule = True,
    trace: bool = False,
) -> RunResult:
    """One full simulated run (see the module docs); deterministic in ``seed``."""
    settings = settings if settings is not None else sim_settings()
    config = workload if workload is not None else WorkloadConfig()

    async def main() -> RunResult:
        cluster = SimCluster(seed, nodes, settings, trace=trace)
        await cluster.start()
        if isinstance(faults, FaultSchedule):
            schedule = faults
        elif faults:
            schedule = FaultSchedule.generate(
                derive_rng(seed, "faults"), cluster.node_ids, config.duration
            )
        else:
            schedule = FaultSchedule([])
        load = Workload(cluster, config, seed)
        loop = asyncio.get_running_loop()
        fault_task = loop.create_task(schedule.run(cluster))
        await load.run()
        await fault_task
        quiet_since = loop.time()
        await cluster.heal_all()
        hints_left = await cluster.settle()
        # Then a quiet day passes: anti-entropy makes the replicas converge and
        # collects the tombstones every owner holds; a second pass must find
        # nothing that comes back (no zombies). The day must not start before the
        # last requests' stragglers (read repair, replication waiting in a peer
        # queue, a message on a slow link) have landed: after a real day nothing
        # sent before it is still in flight.
        in_flight = 2 * settings.request_timeout + max(SLOW_LINKS) * 1.5 + 1.0
        await asyncio.sleep(max(0.0, quiet_since + in_flight - loop.time()))
        cluster.advance_wall_clocks(settings.tombstone_grace + 3600.0)
        repair_errors = await cluster.repair_all()
        repair_errors += await cluster.repair_all()
        purged = sum(n.antientropy.totals.tombstones_purged for n in cluster.nodes())
        final = _final_state(cluster, load)
        history = load.history
        register = check_register(history)
        convergence = check_convergence(final.values, owners=final.owners)
        # Identical records, not just identical values: compare the bytes too.
        byte_divergent = [
            Divergence(key, {n: [by_node[n] or ""] for n in final.owners[key]})
            for key, by_node in final.records.items()
            if len({by_node[n] for n in final.owners[key]}) > 1
            and key not in convergence.divergent_keys
        ]
        if byte_divergent:
            convergence = replace(
                convergence, valid=False, divergent=[*convergence.divergent, *byte_divergent]
            )
        await cluster.stop()
        return RunResult(
            seed=seed,
            nodes=nodes,
            settings=settings,
            workload=config,
            generated_faults=faults is True,
            faults=list(schedule),
            events=cluster.events,
            history=history,
            records=final.records,
            owners=final.owners,
            register=register,
            convergence=convergence,
            hints_left=hints_left,
            repair_errors=repair_errors,
            unexpected=load.unexpected,
            stray_copies=final.stray,
            tombstones_purged=purged,
            virtual_time=loop.time(),
            trace=cluster.network.trace,
        )

    result = run_simulation(main, seed=seed)
    result.value.steps = result.steps
    return result.value
