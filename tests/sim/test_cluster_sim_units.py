"""Targeted, deterministic whole-cluster scenarios on the simulator.

Each test builds a :class:`SimCluster` under ``run_simulation`` (virtual time,
fixed seed), drives one situation with the simulated client and asserts what
the cluster did: replies and errors with their numbers, what every replica
stores, hints, ring epochs, virtual time spent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest

from kvcluster import errors
from kvcluster.core.hashing import partition_of
from kvcluster.node.coordinator import WriteRequest
from kvcluster.node.settings import NodeSettings
from kvcluster.sim.cluster import SimCluster, sim_settings
from kvcluster.sim.loop import run_simulation

T = TypeVar("T")

SEED = 20240611


def scenario(
    body: Callable[[SimCluster], Awaitable[T]],
    *,
    nodes: int = 3,
    settings: NodeSettings | None = None,
    seed: int = SEED,
    start: bool = True,
) -> T:
    """Run ``body(cluster)`` on a started cluster in a fresh simulation."""

    async def main() -> T:
        cluster = SimCluster(seed, nodes, settings if settings is not None else sim_settings())
        if start:
            await cluster.start()
        try:
            return await body(cluster)
        finally:
            await cluster.stop()

    return run_simulation(main, seed=seed).value


async def wait_seen_down(
    c: SimCluster, down: Sequence[str], by: Sequence[str] | None = None
) -> None:
    """Wait until every running node of ``by`` (default: all running) sees ``down`` down."""
    observers = [n for n in (by or c.up()) if n not in down]
    await c.wait_for(
        lambda: all(
            not set(down) & c.node(o).membership.up_nodes() for o in observers if c.is_up(o)
        ),
        30.0,
        f"{observers} to see {list(down)} down",
    )


async def wait_all_up(c: SimCluster) -> None:
    await c.wait_for(c.all_see_all_up, 30.0, "every node to see every node up")


def key_in_partition_of(c: SimCluster, key: bytes, index: int) -> bytes:
    """Another key of ``key``'s partition (same owners, same fallbacks)."""
    q = c.settings.partitions
    found = [
        k
        for k in (f"{key.decode()}-{i}".encode() for i in range(10_000))
        if partition_of(k, q) == partition_of(key, q)
    ]
    return found[index]


def values(c: SimCluster, node: str, key: bytes) -> list[bytes]:
    return sorted(c.local_values(node, key))


# -- quorum writes, hints -----------------------------------------------------------------


def test_quorum_write_with_a_crashed_node_succeeds_and_hints_drain_after_restart() -> None:
    async def body(c: SimCluster) -> None:
        c.crash("n3")
        client = c.client(["n1"])
        await client.put(b"k", b"v1")  # W=2 from n1 and n2, before n3 is even suspected
        await wait_seen_down(c, ["n3"])
        await client.put(b"k2", b"v2")  # n3 known down: no fallback in 3 nodes, W=2 still met
        assert values(c, "n1", b"k") == values(c, "n2", b"k") == [b"v1"]
        assert values(c, "n2", b"k2") == [b"v2"]
        await asyncio.sleep(c.settings.request_timeout + 0.5)  # the miss is noted as a hint
        pending = c.node("n1").handoff.pending()
        assert pending == {"n3": 2}
        await c.restart("n3")
        await c.wait_for(lambda: not c.hints_pending(), 30.0, "hints to drain")
        assert values(c, "n3", b"k") == [b"v1"]
        assert values(c, "n3", b"k2") == [b"v2"]
        assert c.node("n1").handoff.delivered >= 2

    scenario(body)


def test_strict_write_with_a_down_primary_fails_with_unavailable_numbers() -> None:
    async def body(c: SimCluster) -> None:
        key = b"strict-key"
        owners = c.owners(key)
        coordinator = owners[0]
        c.crash(owners[2])
        await wait_seen_down(c, [owners[2]])
        client = c.client([coordinator])
        with pytest.raises(errors.Unavailable) as info:
            await client.put(key, b"v", w=3, strict=True)
        assert (info.value.required, info.value.alive) == (3, 2)
        with pytest.raises(errors.Unavailable) as info:
            await client.get(key, r="all", strict=True)
        assert (info.value.required, info.value.alive) == (3, 2)
        # Nothing was written anywhere: Unavailable means "not attempted".
        assert all(c.local_record(n, key) is None for n in c.up())
        # Two primaries are enough for strict W=2; without strict a fallback stands in
        # for the down owner, so even W=3 succeeds (sloppy quorum).
        await client.put(key, b"strict-2", w=2, strict=True)
        await client.put(key, b"sloppy-3", w=3)
        holders = [n for n in c.up() if n not in owners and c.local_record(n, key)]
        assert len(holders) == 1
        assert sorted(c.local_values(holders[0], key)) == [b"sloppy-3", b"strict-2"]  # blind
        assert c.node(holders[0]).handoff.pending() == {owners[2]: 1}

    scenario(body, nodes=5)


# -- partitions and the ring ----------------------------------------------------------------


def test_minority_cannot_form_a_ring() -> None:
    async def body(c: SimCluster) -> None:
        c.partition(["n1"], ["n2", "n3"])
        await c.start(ready=["n2", "n3"])
        assert c.node("n2").membership.epoch == c.node("n3").membership.epoch == 1
        await asyncio.sleep(30.0)
        assert c.node("n1").membership.meta is None
        with pytest.raises(errors.NotReady):
            await c.client(["n1"]).put(b"k", b"v")
        c.heal()
        await c.wait_for(lambda: c.node("n1").membership.epoch == 1, 30.0, "n1 to learn the ring")
        assert c.node("n1").membership.meta == c.node("n2").membership.meta

    scenario(body, start=False)


def test_minority_cannot_change_the_ring_but_the_majority_can() -> None:
    async def body(c: SimCluster) -> None:
        c.partition(["n1"], ["n2", "n3"])
        await wait_seen_down(c, ["n1"], by=["n2", "n3"])
        with pytest.raises(errors.Unavailable):
            await c.node("n1").membership.leave("n3")
        assert [c.node(n).membership.epoch for n in c.node_ids] == [1, 1, 1]
        changed = await c.node("n2").membership.leave("n1")
        assert changed.ring.epoch == 2 and "n1" not in changed.ring.members
        await c.wait_for(lambda: c.node("n3").membership.epoch == 2, 10.0, "n3 to install epoch 2")
        await asyncio.sleep(10.0)
        assert c.node("n1").membership.epoch == 1  # kept the last agreed ring

    scenario(body)


def test_isolated_node_cannot_take_w2_writes_without_a_fallback() -> None:
    async def body(c: SimCluster) -> None:
        c.isolate("n1")
        client = c.client(["n1"])
        with pytest.raises(errors.Timeout) as timeout:  # before n1 notices it is alone
            await client.put(b"k", b"lonely-1")
        assert (timeout.value.required, timeout.value.received) == (2, 1)
        await wait_seen_down(c, ["n2", "n3"], by=["n1"])
        with pytest.raises(errors.Unavailable) as unavailable:
            await client.put(b"k", b"lonely-2")
        assert (unavailable.value.required, unavailable.value.alive) == (2, 1)
        assert c.local_values("n1", b"k") == [b"lonely-1"]  # applied locally, not acknowledged
        majority = c.client(["n2"])
        await majority.put(b"k", b"majority")
        assert (await majority.get(b"k")).values == [b"majority"]

    scenario(body)


# -- read repair, siblings, deletes -----------------------------------------------------------


def test_read_repair_fixes_a_stale_replica() -> None:
    settings = sim_settings(handoff_interval=10_000.0)  # no handoff: only read repair can fix it

    async def body(c: SimCluster) -> None:
        key = b"rr"
        c.network.set_link("n1", "n3", drop=1.0)
        await c.client(["n1"]).put(key, b"fresh")
        c.network.set_link("n1", "n3")
        assert c.local_record("n3", key) is None
        result = await c.client(["n1"]).get(key, r="all")
        assert result.values == [b"fresh"]
        await c.wait_for(lambda: c.local_record("n3", key) is not None, 5.0, "read repair")
        assert c.local_record("n3", key) == c.local_record("n1", key) == c.local_record("n2", key)
        assert c.node("n1").coordinator.read_repairs == 1

    scenario(body, settings=settings)


def test_concurrent_blind_writes_become_siblings_and_a_context_write_replaces_them() -> None:
    async def body(c: SimCluster) -> None:
        key = b"sib"
        a, b = c.client(["n1"]), c.client(["n2"])
        await asyncio.gather(a.put(key, b"from-a"), b.put(key, b"from-b"))
        seen = await a.get(key, r="all")
        assert sorted(seen.values) == [b"from-a", b"from-b"]
        await b.put(key, b"blind")  # no context: a third sibling
        assert sorted((await a.get(key, r="all")).values) == [b"blind", b"from-a", b"from-b"]
        await a.put(key, b"merged", seen.context)  # replaces exactly what it saw
        final = await b.get(key, r="all")
        assert sorted(final.values) == [b"blind", b"merged"]
        await b.put(key, b"one", final.context)
        assert (await a.get(key, r="all")).values == [b"one"]
        assert {c.local_record(n, key) for n in c.node_ids} == {c.local_record("n1", key)}

    scenario(body)


def test_delete_then_repair_never_resurrects_and_tombstones_are_collected() -> None:
    settings = sim_settings(hint_max_age=20.0, tombstone_grace=60.0)

    async def body(c: SimCluster) -> None:
        key = b"zombie"
        client = c.client(["n1"])
        await client.put(key, b"old", w="all")
        assert all(values(c, n, key) == [b"old"] for n in c.node_ids)
        c.crash("n3")  # keeps "old" on its disk
        assert await client.delete(key, (await client.get(key)).context) is True
        assert (await client.get(key)).found is False
        await asyncio.sleep(120.0)  # past the grace period, n3 still down
        problems = await c.repair_all()  # n3 is down: incomplete, nothing collected
        assert problems and all("n3" in p and "down" in p for p in problems)
        assert c.local_record("n1", key) is not None  # the tombstone stays
        await c.restart("n3")
        await wait_all_up(c)
        assert not await c.repair_all()
        await c.wait_for(lambda: not c.hints_pending(), 30.0, "hints to drain")
        for node in c.node_ids:
            assert c.local_values(node, key) == []
        assert not await c.repair_all()  # identical tombstones everywhere, old: collected
        assert all(c.local_record(n, key) is None for n in c.node_ids)
        assert (await client.get(key, r="all")).found is False
        assert not await c.repair_all()
        assert all(c.local_record(n, key) is None for n in c.node_ids)

    scenario(body, settings=settings)


# -- lost disks and slow nodes --------------------------------------------------------------


def test_wiped_node_gets_its_data_back_through_anti_entropy() -> None:
    async def body(c: SimCluster) -> None:
        client = c.client(["n1"])
        keys = [f"key-{i}".encode() for i in range(20)]
        for i, key in enumerate(keys):
            await client.put(key, f"value-{i}".encode(), w="all")
        c.wipe("n2")
        await c.restart("n2")
        await wait_all_up(c)
        assert all(c.local_record("n2", k) is None for k in keys)
        assert c.node("n2").membership.epoch == 1  # learnt the ring from the others
        progress = [p async for p in c.node("n2").repair()]
        assert progress[-1].done and not progress[-1].errors
        assert progress[-1].keys_repaired >= len(keys)
        for i, key in enumerate(keys):
            assert c.local_values("n2", key) == [f"value-{i}".encode()]
            assert c.local_record("n2", key) == c.local_record("n1", key)

    scenario(body)


def test_slow_node_does_not_stall_requests_past_their_timeout() -> None:
    async def body(c: SimCluster) -> None:
        loop = asyncio.get_running_loop()
        for other in ("n1", "n2"):  # SIGSTOP-like: everything n3 sends takes 10 minutes
            c.network.set_link("n3", other, latency=(600.0, 600.0))
        timeout = c.settings.request_timeout
        fast = c.client(["n1"])
        for i in range(20):
            started = loop.time()
            await fast.put(b"k%d" % i, b"v")
            assert (await fast.get(b"k%d" % i)).values == [b"v"]
            assert loop.time() - started < 0.5
        started = loop.time()
        with pytest.raises(errors.Timeout):
            await fast.get(b"k0", r="all")
        assert timeout <= loop.time() - started <= timeout + 0.1
        started = loop.time()
        with pytest.raises(errors.Timeout):
            await c.client(["n3"]).put(b"k0", b"from-the-slow-node")
        assert loop.time() - started <= timeout + 0.1
        started = loop.time()
        await fast.put(b"after", b"v")  # the link to n3 is not clogged
        assert loop.time() - started < 0.5

    scenario(body)


# -- hinted handoff bounds (regressions) ------------------------------------------------------


async def _owners_down_write(c: SimCluster, key: bytes) -> tuple[list[str], list[str]]:
    """Crash every owner of ``key`` (5 nodes: 3 owners, 2 fallbacks) and wait until
    the fallbacks know; returns (owners, fallbacks)."""
    owners = list(c.owners(key))
    fallbacks = [n for n in c.node_ids if n not in owners]
    for owner in owners:
        c.crash(owner)
    await wait_seen_down(c, owners)
    return owners, fallbacks


async def _bring_back(c: SimCluster, nodes: Sequence[str]) -> None:
    for node in nodes:
        await c.restart(node)
    await wait_all_up(c)
    await c.wait_for(lambda: not c.hints_pending(), 60.0, "hints to drain")
    assert not await c.repair_all()


def test_write_held_only_by_fallbacks_survives_hints_older_than_hint_max_age() -> None:
    """Regression: an expired hint made a fallback drop its copy undelivered. With every
    owner down, the two fallbacks hold the only copies of an acknowledged W=2 write;
    anti-entropy never looks at non-owners, so dropping them lost the write."""
    settings = sim_settings(hint_max_age=10.0, tombstone_grace=20.0)

    async def body(c: SimCluster) -> None:
        key = b"outlived"
        owners, fallbacks = await _owners_down_write(c, key)
        await c.client([fallbacks[0]]).put(key, b"acknowledged")
        assert all(c.local_values(f, key) == [b"acknowledged"] for f in fallbacks)
        await asyncio.sleep(30.0)  # the owners stay down longer than hint_max_age
        await _bring_back(c, owners)
        for owner in owners:
            assert c.local_values(owner, key) == [b"acknowledged"]
        assert all(c.local_record(f, key) is None for f in fallbacks)  # handed off, removed

    scenario(body, nodes=5, settings=settings)


def test_owner_hints_still_expire() -> None:
    """The age bound still applies where anti-entropy backs it up: on an owner."""
    settings = sim_settings(hint_max_age=10.0, tombstone_grace=20.0)

    async def body(c: SimCluster) -> None:
        c.crash("n3")
        await c.client(["n1"]).put(b"k", b"v")
        await asyncio.sleep(30.0)
        assert c.node("n1").handoff.pending() == {"n3": 1}
        await c.restart("n3")
        await wait_all_up(c)
        await c.wait_for(lambda: not c.hints_pending(), 10.0, "the expired hint to go")
        assert c.node("n1").handoff.expired == 1 and c.local_record("n3", b"k") is None
        assert not await c.repair_all()
        assert c.local_values("n3", b"k") == [b"v"]

    scenario(body, settings=settings)


def test_fallback_coordinator_without_room_for_its_hint_refuses_the_write() -> None:
    """Regression: a fallback at ``hint_max_per_target`` stored (and acknowledged) a
    write without a hint, so the copy never reached an owner: lost for readers."""
    settings = sim_settings(hint_max_per_target=1)

    async def body(c: SimCluster) -> None:
        first = b"bounded"
        second = key_in_partition_of(c, first, 0)
        owners, fallbacks = await _owners_down_write(c, first)
        client = c.client([fallbacks[0]])
        await client.put(first, b"one")  # takes the one hint each fallback may hold
        with pytest.raises(errors.Overloaded):
            await client.put(second, b"two")
        assert all(c.local_record(f, second) is None for f in fallbacks)  # nothing applied
        await _bring_back(c, owners)
        for owner in owners:
            assert c.local_values(owner, first) == [b"one"]

    scenario(body, nodes=5, settings=settings)


def test_fallback_replica_without_room_for_its_hint_does_not_count_toward_w() -> None:
    """Regression: a fallback at its hint bound merged the record anyway and acknowledged
    it, counting toward W with a copy nobody would hand off (left on it forever)."""
    settings = sim_settings(hint_max_per_target=1)

    async def body(c: SimCluster) -> None:
        first = b"bounded"
        second = key_in_partition_of(c, first, 0)
        owners = list(c.owners(first))
        fallbacks = [n for n in c.node_ids if n not in owners]
        for owner in owners[1:]:
            c.crash(owner)
        await wait_seen_down(c, owners[1:])
        client = c.client([owners[0]])
        await client.put(first, b"one")  # coordinator + fallbacks: each fallback's hint used
        await c.wait_for(
            lambda: all(c.node(f).handoff.pending() for f in fallbacks), 5.0, "fallback hints"
        )
        with pytest.raises(errors.Timeout) as timeout:
            await client.put(second, b"two")  # fallbacks refuse: only the coordinator has it
        assert (timeout.value.required, timeout.value.received) == (2, 1)
        assert all(c.local_record(f, second) is None for f in fallbacks)
        await _bring_back(c, owners[1:])
        for owner in owners:
            assert c.local_values(owner, second) == [b"two"]  # info write, kept and repaired
        assert all(c.local_record(f, k) is None for f in fallbacks for k in (first, second))

    scenario(body, nodes=5, settings=settings)


def test_duplicated_forwarded_write_is_applied_once() -> None:
    """Regression: a ForwardPut delivered twice was coordinated twice, leaving two
    siblings of one write; a client that read one and replaced it with its context
    then saw the other come back (found by the campaign, seed 33 with 5 nodes)."""

    async def body(c: SimCluster) -> None:
        key = b"forwarded"
        owners = c.owners(key)
        outsider = next(n for n in c.node_ids if n not in owners)
        c.network.set_duplicate_rate(1.0)  # every message is delivered twice
        client = c.client([outsider])  # not a replica: it forwards the write
        await client.put(key, b"once")
        first = await client.get(key, r="all")
        assert first.values == [b"once"]
        await client.put(key, b"replaced", first.context)
        assert (await client.get(key, r="all")).values == [b"replaced"]
        await asyncio.sleep(5.0)
        assert all(c.local_values(n, key) == [b"replaced"] for n in owners)

    scenario(body, nodes=5)


def test_node_killed_right_after_acknowledging_restarts_with_the_write() -> None:
    """DESIGN §6: a node killed at any moment restarts with every write it acknowledged."""

    async def body(c: SimCluster) -> None:
        c.crash_after_ack("n1", wipe=False)
        await c.client(["n1"]).put(b"durable", b"acknowledged")
        assert not c.is_up("n1")  # killed before it could run any further
        await c.restart("n1")
        assert c.local_values("n1", b"durable") == [b"acknowledged"]
        await wait_all_up(c)
        assert (await c.client(["n1"]).get(b"durable", r="all")).values == [b"acknowledged"]

    scenario(body)


def test_put_many_replicates_in_one_message_per_peer_and_hints_what_a_peer_missed() -> None:
    """A coordinated batch goes to each peer as one ReplicaWrite (not one per key);
    with a peer down, every key still meets W=2 and each becomes a hint for it."""
    keys = [b"batch-%d" % i for i in range(40)]

    async def body(c: SimCluster) -> None:
        reqs = [WriteRequest(k, b"v-" + k) for k in keys]
        c.network.tracing = True
        results = await c._on("n1", lambda node: node.coordinator.put_many(reqs))
        assert not [r for r in results if isinstance(r, errors.KVError)]
        sent = [
            (e.src, e.dst) for e in c.network.trace if e.event == "send" and e.msg == "ReplicaWrite"
        ]
        assert sorted(sent) == [("n1", "n2"), ("n1", "n3")]
        for node in ("n1", "n2", "n3"):
            assert all(values(c, node, k) == [b"v-" + k] for k in keys)

        c.crash("n3")
        contexts = [r.context for r in results if not isinstance(r, errors.KVError)]
        again = [WriteRequest(k, b"w-" + k, ctx) for k, ctx in zip(keys, contexts, strict=True)]
        results = await c._on("n1", lambda node: node.coordinator.put_many(again))
        assert not [r for r in results if isinstance(r, errors.KVError)]
        assert all(values(c, "n2", k) == [b"w-" + k] for k in keys)
        await asyncio.sleep(c.settings.request_timeout + 0.5)  # misses become hints
        assert c.node("n1").handoff.pending() == {"n3": len(keys)}

    scenario(body)


def test_a_coordinator_whose_own_commit_is_lost_is_decided_by_its_peers() -> None:
    """Records go to the peers once applied locally, before the local sync; if the
    local batch is then lost, the write is acknowledged only if W peers hold it."""

    async def body(c: SimCluster) -> None:
        storage = c.node("n1").replica.storage
        real_write = storage.write

        async def lossy(fn: Any, on_applied: Any = None) -> Any:
            def apply_then_lose(view: Any) -> Any:
                result = fn(view)
                if on_applied is not None:
                    on_applied(result)
                raise errors.StorageFull("the disk failed at commit")

            return await real_write(apply_then_lose)

        storage.write = lossy  # type: ignore[method-assign]
        w2 = [WriteRequest(b"lost-%d" % i, b"v%d" % i) for i in range(5)]
        results = await c._on("n1", lambda node: node.coordinator.put_many(w2))
        assert not [r for r in results if isinstance(r, errors.KVError)]
        for i in range(5):
            key = b"lost-%d" % i
            assert c.local_record("n1", key) is None
            assert values(c, "n2", key) == values(c, "n3", key) == [b"v%d" % i]
        w3 = [WriteRequest(b"lost-w3", b"x", w=3)]
        [outcome] = await c._on("n1", lambda node: node.coordinator.put_many(w3))
        assert isinstance(outcome, errors.Timeout)
        # lost as soon as the local copy failed (3 copies can no longer be had);
        # a Timeout, since the peers may well store it: maybe applied
        assert outcome.required == 3 and outcome.received < 3
        storage.write = real_write  # type: ignore[method-assign]

    scenario(body)
