"""Tests of kvcluster.sim.network: the simulated network and its faults.

A toy protocol -- nodes that ping each other and count replies -- runs on
:class:`SimNetwork` under :func:`run_simulation`; assertions are about replies,
errors, handler runs, virtual time and the trace.

Run as a script (``python test_sim_network.py SEED sorted|unsorted``) this module
prints the trace of :func:`chaos` as JSON; the cross-process tests compare such
traces from interpreters with different ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kvcluster import errors
from kvcluster.net import codec
from kvcluster.net.transport import Handler, TransportError
from kvcluster.sim.loop import RunawaySimulation, current_loop, run_simulation
from kvcluster.sim.network import SimNetwork, SimTransport, TraceEvent

T = TypeVar("T")

# -- the toy protocol ---------------------------------------------------------------------


@codec.message(120)
@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    note: str = ""


@codec.message(121)
@dataclass(frozen=True, slots=True)
class Pong:
    seq: int
    by: str


@codec.message(122)
@dataclass(frozen=True, slots=True)
class Slow:
    """Answered with a Pong after ``delay`` virtual seconds."""

    seq: int
    delay: float


@codec.message(123)
@dataclass(frozen=True, slots=True)
class Fail:
    """The handler raises the error named by ``kind``."""

    kind: str


@dataclass(frozen=True, slots=True)
class NotRegistered:
    value: int


class ToyNode:
    """Answers Ping/Slow with Pong, counts what it handled, raises on Fail."""

    def __init__(self, node_id: str, attach: Callable[[str, Handler], SimTransport]) -> None:
        """``attach`` is ``net.endpoint`` for a new node, ``net.restart`` for a restart."""
        self.id = node_id
        self.pings: list[tuple[str, int]] = []  # (source, seq) in arrival order
        self.received: list[Any] = []  # every decoded message, as received
        self.slow_started = 0
        self.slow_cancelled = 0
        self.transport = attach(node_id, self.handle)

    async def handle(self, src: str, msg: Any) -> Any:
        self.received.append(msg)
        if isinstance(msg, Ping):
            self.pings.append((src, msg.seq))
            return Pong(msg.seq, self.id)
        if isinstance(msg, Slow):
            self.slow_started += 1
            try:
                await asyncio.sleep(msg.delay)
            except asyncio.CancelledError:
                self.slow_cancelled += 1
                raise
            return Pong(msg.seq, self.id)
        if isinstance(msg, Fail):
            raise _failure(msg.kind)
        raise errors.InvalidArgument(f"unexpected {type(msg).__name__}")


def _failure(kind: str) -> Exception:
    if kind == "unavailable":
        return errors.Unavailable(required=3, alive=2)
    if kind == "timeout":
        return errors.Timeout(required=2, received=1)
    if kind == "invalid":
        return errors.InvalidArgument("bad key", field="key")
    if kind == "overloaded":
        return errors.Overloaded(queue="replica")
    if kind == "not_ready":
        return errors.NotReady("no ring yet")
    return RuntimeError(f"boom: {kind}")


def simulate(body: Callable[[], Awaitable[T]], seed: int = 1) -> T:
    async def main() -> T:
        return await body()

    return run_simulation(main, seed=seed, max_time=24 * 3600).value


def now() -> float:
    return asyncio.get_running_loop().time()


def cluster(net: SimNetwork, *names: str) -> dict[str, ToyNode]:
    return {name: ToyNode(name, net.endpoint) for name in names}


async def ping(node: ToyNode, dst: str, seq: int = 0, wait: float = 1.0) -> Any:
    return await node.transport.call(dst, Ping(seq), wait)


async def ping_outcome(node: ToyNode, dst: str, seq: int = 0, wait: float = 1.0) -> str:
    try:
        reply = await ping(node, dst, seq, wait)
    except TransportError:
        return "lost"
    assert reply == Pong(seq, dst)
    return "ok"


# -- delivery -----------------------------------------------------------------------------


def test_a_call_round_trips_through_the_codec_with_virtual_latency() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng, min_latency=0.001, max_latency=0.005)
        nodes = cluster(net, "a", "b")
        sent = Ping(7, "hello")
        reply = await nodes["a"].transport.call("b", sent, timeout=1.0)
        assert reply == Pong(7, "b")
        assert 0.002 <= now() <= 0.010
        # The handler got an equal message, not the caller's object.
        (received,) = nodes["b"].received
        assert received == sent
        assert received is not sent
        assert [e.event for e in net.trace] == ["send", "deliver", "reply", "deliver-reply"]
        assert net.trace[0] == TraceEvent(0.0, "send", "a", "b", "Ping")
        assert net.trace[-1][1:] == ("deliver-reply", "b", "a", "Pong")

    simulate(body)


def test_random_latency_reorders_messages() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        replies = await asyncio.gather(*(ping(nodes["a"], "b", seq) for seq in range(30)))
        assert replies == [Pong(seq, "b") for seq in range(30)]
        arrival = [seq for _, seq in nodes["b"].pings]
        assert sorted(arrival) == list(range(30))
        assert arrival != list(range(30))

    simulate(body)


def test_set_latency_bounds_the_round_trip() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        net.set_latency(0.5, 0.5)
        await ping(nodes["a"], "b", wait=5)
        assert now() == 1.0

    simulate(body)


def test_an_unknown_node_fails_at_once() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a")
        with pytest.raises(TransportError, match="unknown node") as info:
            await ping(nodes["a"], "nobody")
        assert info.value.dst == "nobody"
        assert now() == 0.0

    simulate(body)


def test_an_unencodable_request_is_the_callers_bug() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        with pytest.raises(TypeError, match="NotRegistered"):
            await nodes["a"].transport.call("b", NotRegistered(1), 1.0)

    simulate(body)


# -- errors -------------------------------------------------------------------------------


def test_kv_errors_reach_the_caller_as_the_same_class_with_their_fields() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        call = nodes["a"].transport.call

        with pytest.raises(errors.Unavailable) as unavailable:
            await call("b", Fail("unavailable"), 1.0)
        assert (unavailable.value.required, unavailable.value.alive) == (3, 2)
        assert unavailable.value.message == "not enough replicas available: required 3, alive 2"

        with pytest.raises(errors.Timeout) as timeout:
            await call("b", Fail("timeout"), 1.0)
        assert (timeout.value.required, timeout.value.received) == (2, 1)

        with pytest.raises(errors.InvalidArgument) as invalid:
            await call("b", Fail("invalid"), 1.0)
        assert (invalid.value.message, invalid.value.field) == ("bad key", "key")

        with pytest.raises(errors.Overloaded) as overloaded:
            await call("b", Fail("overloaded"), 1.0)
        assert overloaded.value.queue == "replica"

        with pytest.raises(errors.NotReady, match="no ring yet"):
            await call("b", Fail("not_ready"), 1.0)

    simulate(body)


def test_other_handler_exceptions_arrive_as_internal() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        with pytest.raises(errors.Internal) as info:
            await nodes["a"].transport.call("b", Fail("kaput"), 1.0)
        assert info.value.message == "RuntimeError: boom: kaput"
        assert net.trace[-1].msg == "!internal"

    simulate(body)


def test_an_unencodable_reply_arrives_as_internal() -> None:
    async def handler(src: str, msg: Any) -> Any:
        return NotRegistered(1)

    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        a = net.endpoint("a", handler)
        net.endpoint("b", handler)
        with pytest.raises(errors.Internal, match="cannot encode NotRegistered"):
            await a.call("b", Ping(1), 1.0)

    simulate(body)


# -- drops, duplicates, links ---------------------------------------------------------------


def test_with_every_message_dropped_calls_time_out_after_the_timeout() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng, drop_rate=1.0)
        nodes = cluster(net, "a", "b")
        with pytest.raises(TransportError, match=r"no reply within 2\.5s"):
            await ping(nodes["a"], "b", wait=2.5)
        assert now() == 2.5
        assert nodes["b"].pings == []
        assert [e.event for e in net.trace] == ["send", "drop:random", "timeout"]

    simulate(body)


def test_a_lossy_network_loses_some_calls() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        net.set_drop_rate(0.3)
        outcomes = await asyncio.gather(*(ping_outcome(nodes["a"], "b", s) for s in range(200)))
        ok = outcomes.count("ok")
        # Each call needs two messages through: about 0.7 ** 2 of them succeed.
        assert 60 < ok < 140
        events = [e.event for e in net.trace]
        assert events.count("timeout") == 200 - ok
        assert events.count("deliver-reply") == ok
        # A handler ran for every request that was not dropped.
        assert len(nodes["b"].pings) == events.count("deliver")

    simulate(body)


def test_duplicated_requests_run_the_handler_twice_and_one_reply_is_discarded() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng, duplicate_rate=1.0)
        nodes = cluster(net, "a", "b")
        replies = [await ping(nodes["a"], "b", seq) for seq in range(5)]
        assert replies == [Pong(seq, "b") for seq in range(5)]
        await asyncio.sleep(1)  # let the last late reply arrive
        assert sorted(seq for _, seq in nodes["b"].pings) == sorted([*range(5), *range(5)])
        events = [e.event for e in net.trace]
        assert events.count("duplicate") == 5
        assert events.count("deliver-reply") == 5
        assert events.count("discard-reply") == 5

    simulate(body)


def test_an_asymmetric_link_loses_the_replies_but_not_the_requests() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        net.set_link("b", "a", drop=1.0)
        # a -> b arrives and runs the handler, the reply b -> a is lost.
        assert await ping_outcome(nodes["a"], "b", 1) == "lost"
        assert nodes["b"].pings == [("a", 1)]
        # b -> a is lost on the way in.
        assert await ping_outcome(nodes["b"], "a", 2) == "lost"
        assert nodes["a"].pings == []
        net.set_link("b", "a")  # neither drop nor latency: override removed
        assert await ping_outcome(nodes["b"], "a", 3) == "ok"

    simulate(body)


def test_link_latency_overrides_the_global_latency_one_way() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng, min_latency=0.25, max_latency=0.25)
        nodes = cluster(net, "a", "b")
        net.set_link("a", "b", latency=(2.0, 2.0))
        await ping(nodes["a"], "b", wait=5)
        assert now() == 2.25
        net.heal()  # clears link overrides
        start = now()
        await ping(nodes["a"], "b", wait=5)
        assert now() - start == 0.5

    simulate(body)


def test_settings_are_validated() -> None:
    net = SimNetwork(random.Random(1))
    ToyNode("a", net.endpoint)
    with pytest.raises(ValueError):
        net.set_drop_rate(1.5)
    with pytest.raises(ValueError):
        net.set_duplicate_rate(-0.1)
    with pytest.raises(ValueError):
        net.set_latency(0.2, 0.1)
    with pytest.raises(ValueError):
        net.set_link("a", "b", drop=0.5)  # b is unknown
    with pytest.raises(ValueError, match="already registered"):
        ToyNode("a", net.endpoint)
    with pytest.raises(ValueError):
        SimNetwork(random.Random(1), drop_rate=2)


# -- partitions -----------------------------------------------------------------------------


def test_partitioned_nodes_get_transport_errors_and_heal_restores_them() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b", "c", "d")
        net.partition(["a", "b"], ["c"])  # d is named nowhere: a group of its own
        start = now()
        with pytest.raises(TransportError, match="no reply within 1s") as info:
            await ping(nodes["a"], "c")
        assert info.value.dst == "c"
        assert now() == start + 1.0
        assert await ping_outcome(nodes["a"], "b") == "ok"
        assert await ping_outcome(nodes["c"], "d") == "lost"
        assert await ping_outcome(nodes["d"], "a") == "lost"
        assert nodes["c"].pings == []
        net.heal()
        assert [await ping_outcome(nodes["a"], dst) for dst in "bcd"] == ["ok"] * 3

    simulate(body)


def test_unnamed_nodes_form_one_group_together() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b", "c")
        net.partition(["a"])
        assert await ping_outcome(nodes["b"], "c") == "ok"
        assert await ping_outcome(nodes["b"], "a") == "lost"

    simulate(body)


def test_isolate_cuts_one_node_off_on_top_of_a_partition() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b", "c", "d")
        net.partition(["a", "b"], ["c", "d"])
        net.isolate("a")
        assert await ping_outcome(nodes["a"], "b") == "lost"
        assert await ping_outcome(nodes["c"], "d") == "ok"
        assert await ping_outcome(nodes["b"], "c") == "lost"

    simulate(body)


def test_a_partition_cuts_messages_already_in_flight() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng, min_latency=1.0, max_latency=1.0)
        nodes = cluster(net, "a", "b")
        call = asyncio.create_task(ping_outcome(nodes["a"], "b", wait=5))
        await asyncio.sleep(0.5)
        net.partition(["a"], ["b"])
        assert await call == "lost"
        assert nodes["b"].pings == []
        assert ("drop:partition", "a", "b", "Ping") in [e[1:] for e in net.trace]

    simulate(body)


def test_partition_groups_are_validated() -> None:
    net = SimNetwork(random.Random(1))
    cluster(net, "a", "b")
    with pytest.raises(TypeError, match="collections of node ids"):
        net.partition("ab")
    with pytest.raises(ValueError, match="more than one"):
        net.partition(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="unknown node"):
        net.partition(["a"], ["zz"])


# -- crash and restart ------------------------------------------------------------------------


def test_crash_cancels_in_flight_handlers_and_their_replies() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        calls = [
            asyncio.create_task(nodes["a"].transport.call("b", Slow(seq, 10.0), 30.0))
            for seq in range(3)
        ]
        await asyncio.sleep(1)
        assert nodes["b"].slow_started == 3
        net.crash("b")
        assert not net.is_up("b")
        await asyncio.sleep(0)
        assert nodes["b"].slow_cancelled == 3
        for call in calls:
            with pytest.raises(TransportError, match="no reply within 30s"):
                await call
        assert now() == pytest.approx(30.0, abs=0.01)  # the callers' timeouts
        assert "reply" not in [e.event for e in net.trace]

    simulate(body)


def test_a_crashed_node_receives_nothing_and_cannot_call() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        pending = asyncio.create_task(nodes["b"].transport.call("a", Slow(1, 5.0), 30.0))
        await asyncio.sleep(0.5)
        net.crash("b")
        net.crash("b")  # idempotent
        # b's pending call fails at once, and so does any call it makes.
        with pytest.raises(TransportError, match="b has crashed"):
            await pending
        assert now() == 0.5
        with pytest.raises(TransportError, match="b has crashed"):
            await ping(nodes["b"], "a")
        # Calls to b are not answered.
        assert await ping_outcome(nodes["a"], "b") == "lost"
        assert nodes["b"].pings == []
        assert ("drop:down", "a", "b", "Ping") in [e[1:] for e in net.trace]

    simulate(body)


def test_a_zombie_retrying_at_once_is_caught_by_the_step_guard() -> None:
    # A task of a crashed node that retries without pausing must not hang the
    # real thread: every refused call yields to the loop, so the guard sees it.
    async def main() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        net.crash("b")
        while True:
            with contextlib.suppress(TransportError):
                await ping(nodes["b"], "a")

    with pytest.raises(RunawaySimulation):
        run_simulation(main, seed=1, max_steps=10_000)


def test_restart_gives_a_fresh_incarnation() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng, min_latency=1.0, max_latency=1.0)
        nodes = cluster(net, "a", "b")
        old = nodes["b"]
        # A request to the old incarnation, still in flight at the restart, is lost.
        in_flight = asyncio.create_task(ping_outcome(nodes["a"], "b", 1, wait=5))
        await asyncio.sleep(0.5)
        net.crash("b")
        new = ToyNode("b", net.restart)
        assert net.is_up("b")
        assert await in_flight == "lost"
        assert old.pings == []
        assert new.pings == []
        # The new incarnation answers, and can call.
        assert await ping_outcome(nodes["a"], "b", 2, wait=5) == "ok"
        assert new.pings == [("a", 2)]
        assert await ping_outcome(new, "a", 3, wait=5) == "ok"
        # The crashed incarnation's transport stays dead.
        with pytest.raises(TransportError, match="b has crashed"):
            await ping(old, "a")
        assert [e.event for e in net.trace].count("restart") == 1

    simulate(body)


def test_restart_of_a_running_node_crashes_it_first() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        call = asyncio.create_task(nodes["a"].transport.call("b", Slow(1, 10.0), 30.0))
        await asyncio.sleep(1)
        new = ToyNode("b", net.restart)
        await asyncio.sleep(0)
        assert nodes["b"].slow_cancelled == 1
        with pytest.raises(TransportError):
            await call
        assert await ping_outcome(nodes["a"], "b") == "ok"
        assert new.pings == [("a", 0)]
        events = [e.event for e in net.trace]
        assert events.index("crash") < events.index("restart")

    simulate(body)


def test_a_closed_transport_fails_its_calls() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng)
        nodes = cluster(net, "a", "b")
        pending = asyncio.create_task(nodes["a"].transport.call("b", Slow(1, 5.0), 30.0))
        await asyncio.sleep(0.1)
        nodes["a"].transport.set_address("b", "ignored:1")
        await nodes["a"].transport.close()
        with pytest.raises(TransportError, match="transport closed"):
            await pending
        with pytest.raises(TransportError, match="transport closed"):
            await ping(nodes["a"], "b")
        # Incoming calls still reach a node whose own transport is closed.
        assert await ping_outcome(nodes["b"], "a") == "ok"

    simulate(body)


# -- trace and determinism --------------------------------------------------------------------


async def chaos(sort_peers: bool = True) -> list[TraceEvent]:
    """Five nodes ping each other for 10 virtual seconds under every kind of fault."""
    net = SimNetwork(current_loop().rng, drop_rate=0.05, duplicate_rate=0.05)
    names = ["n1", "n2", "n3", "n4", "n5"]
    nodes = cluster(net, *names)
    replies = {name: 0 for name in names}

    async def gossip(node: ToyNode) -> None:
        peers = {name for name in names if name != node.id}
        seq = 0
        while True:
            # The point of sort_peers: set iteration order of str depends on the
            # process's hash seed, so only the sorted variant is deterministic.
            for peer in sorted(peers) if sort_peers else peers:
                seq += 1
                try:
                    await node.transport.call(peer, Ping(seq), 0.05)
                    replies[node.id] += 1
                except TransportError:
                    pass
            await asyncio.sleep(current_loop().rng.uniform(0.05, 0.15))

    tasks = [asyncio.create_task(gossip(nodes[name])) for name in names]
    await asyncio.sleep(2)
    net.partition(["n1", "n2"], ["n3", "n4"])
    await asyncio.sleep(1)
    net.crash("n3")
    tasks[2].cancel()  # the crashed node's own loop dies with it
    await asyncio.sleep(1)
    net.heal()
    net.set_link("n5", "n1", drop=0.5, latency=(0.01, 0.02))
    await asyncio.sleep(1)
    nodes["n3"] = ToyNode("n3", net.restart)
    tasks[2] = asyncio.create_task(gossip(nodes["n3"]))
    await asyncio.sleep(5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert all(count > 0 for count in replies.values())
    return net.trace


def _chaos_trace(seed: int, sort_peers: bool = True) -> list[TraceEvent]:
    return run_simulation(lambda: chaos(sort_peers), seed=seed).value


def test_the_trace_records_every_kind_of_event() -> None:
    events = {e.event for e in _chaos_trace(3)}
    assert events >= {
        "send",
        "duplicate",
        "deliver",
        "reply",
        "deliver-reply",
        "discard-reply",
        "timeout",
        "drop:random",
        "drop:partition",
        "drop:down",
        "crash",
        "restart",
        "partition",
        "heal",
        "set-link",
    }


def test_same_seed_same_trace() -> None:
    first = _chaos_trace(11)
    assert len(first) > 1000
    assert _chaos_trace(11) == first


def test_different_seed_different_trace() -> None:
    assert _chaos_trace(11) != _chaos_trace(12)


def test_tracing_can_be_disabled() -> None:
    async def body() -> None:
        net = SimNetwork(current_loop().rng, trace=False)
        nodes = cluster(net, "a", "b")
        await ping(nodes["a"], "b")
        net.crash("b")
        assert net.trace == []

    simulate(body)


def _trace_in_subprocess(hash_seed: str, seed: int, mode: str) -> list[list[Any]]:
    repo = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, __file__, str(seed), mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    trace: list[list[Any]] = json.loads(done.stdout)
    return trace


def test_same_seed_same_trace_across_processes_with_different_hash_seeds() -> None:
    first = _trace_in_subprocess("1", 21, "sorted")
    second = _trace_in_subprocess("2", 21, "sorted")
    assert len(first) > 1000
    assert first == second
    # ... and the same as in this process.
    assert first == [list(event) for event in _chaos_trace(21)]


def test_iterating_a_set_of_str_breaks_determinism_across_processes() -> None:
    # The control for the test above: code that iterates a set of node ids
    # (instead of sorting it) gives different traces under different hash seeds,
    # so the cross-process comparison does detect that mistake.
    assert _trace_in_subprocess("1", 21, "unsorted") != _trace_in_subprocess("2", 21, "unsorted")


if __name__ == "__main__":
    _seed, _mode = int(sys.argv[1]), sys.argv[2]
    _trace = _chaos_trace(_seed, sort_peers=_mode == "sorted")
    json.dump([list(event) for event in _trace], sys.stdout)
    sys.stdout.write("\n")
