"""Anti-entropy on real node processes: ``kvctl cluster repair`` (issue "Anti-entropy").

Three nodes, N=3. Background anti-entropy is off (``aae_interval=0``), so only
the explicit ``kvctl cluster repair`` compares Merkle trees. Hinted handoff is
left running but can carry nothing: ``hint_max_per_target=0`` makes every node
drop hints instead of storing them, so a replica that missed writes can only
learn them from the repair. Read repair is kept out of the way by never
reading a replica before the repair; afterwards each node's own copy is read
with the node cut off from the others (``dev.partition``).

- a wiped node is rebuilt by one repair and then serves every key alone;
- deletes made while a replica was away (including values that replica alone
  held) stay deleted after repair, on every node read alone, and after
  further repairs;
- ``cluster status`` shows when each partition was last repaired;
- repairing a partition the node does not own fails with a clear error.

Ports: this module uses 7800-7829 (the block assigned to anti-entropy).
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from kvcluster import Client, ReadResult, errors
from kvcluster.cli import dev
from kvcluster.core.hashing import partition_of
from tests.integration.conftest import Cluster, cluster_starter, subdirectory_of
from tests.support import wait_until

pytestmark = pytest.mark.integration

PORT_MIN, PORT_MAX = 7800, 7829
WIPE_PORT = 7800  # 7800-7802
DELETE_PORT = 7810  # 7810-7812
STATUS_PORT = 7820  # 7820-7822
FOREIGN_PORT = 7825  # 7825-7827
AAE_ONLY = {"aae_interval": 0, "hint_max_per_target": 0}
BATCH = 500  # items per put_many / get_many (the node's limit is 1000)


class Start(Protocol):
    def __call__(self, base_port: int, *, n_val: int = 3, **settings: Any) -> Cluster: ...


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start 3-node clusters in this module's port block; stopped by PID at the end."""
    with cluster_starter(subdirectory_of(tmp_path), (PORT_MIN, PORT_MAX)) as start_cluster:

        def run(base_port: int, *, n_val: int = 3, **settings: Any) -> Cluster:
            cluster = start_cluster(3, base_port, settings={**AAE_ONLY, **settings}, n_val=n_val)
            wait_connected(cluster)
            return cluster

        yield run


def key(prefix: str, i: int) -> bytes:
    return f"{prefix}-{i:05d}".encode()


def value(k: bytes, version: str = "v1") -> bytes:
    return k + b"=" + version.encode() + b"-" + b"x" * 64


def put_all(kv: Client, items: Sequence[tuple[bytes, bytes]], w: int | str) -> None:
    for start in range(0, len(items), BATCH):
        results = kv.put_many(items[start : start + BATCH], w=w)
        failed = [r for r in results if isinstance(r, errors.KVError)]
        assert not failed, failed[:3]


def read_all(kv: Client, keys: Sequence[bytes]) -> dict[bytes, ReadResult]:
    """Every key read with r=1; a failed read fails the test."""
    out: dict[bytes, ReadResult] = {}
    for start in range(0, len(keys), BATCH):
        batch = keys[start : start + BATCH]
        for k, result in zip(batch, kv.get_many(batch, r=1), strict=True):
            assert not isinstance(result, errors.KVError), (k, result)
            out[k] = result
    return out


def node_keys(cluster: Cluster, node_id: str) -> int:
    st = cluster.status(node_id)
    assert st is not None, f"{node_id} does not answer"
    return int(st.keys)


def repair(cluster: Cluster, *args: str, nodes: str | None = None) -> dict[str, Any]:
    """``kvctl --json cluster repair ARGS``: must succeed; returns the summary."""
    summary: dict[str, Any] = cluster.kvctl("cluster", "repair", *args, nodes=nodes).ok().json()
    assert summary["errors"] == []
    return summary


def last_repaired(cluster: Cluster, node_id: str) -> dict[int, float]:
    """Partition -> last repair time, from ``kvctl --json cluster status --node``."""
    st = cluster.kvctl("cluster", "status", "--node", cluster.address(node_id)).ok().json()
    return {int(r["partition"]): float(r["last_repaired_unix"]) for r in st["repairs"]}


def stop(cluster: Cluster, *node_ids: str) -> None:
    for node_id in node_ids:
        dev.kill(cluster.dir, node_id, signal.SIGTERM)


def wait_connected(cluster: Cluster) -> None:
    """Wait until every node reaches every other one.

    A node's channel to a peer that was not listening yet (at start) or was
    down reconnects with a backoff of up to a second, and until then calls to
    that peer fail at once, even though the peer answers everyone else. The
    probe is a read with r=all coordinated by each node in turn, of keys
    chosen so that every other node is one of their replicas.
    """
    with cluster.client() as kv:
        owners = [o["owners"] for o in kv.ring()["owners"]]
    probes: dict[str, bytes] = {}
    i = 0
    while len(probes) < len(cluster.ids):
        k = b"connectivity-probe-%d" % i
        for node_id in owners[partition_of(k, len(owners))]:
            probes.setdefault(node_id, k)
        i += 1

    def connected() -> bool:
        for observer in cluster.ids:
            with cluster.direct_client(observer) as kv:
                for peer, k in probes.items():
                    if peer == observer:
                        continue
                    try:
                        kv.get(k, r="all", timeout=2.0)
                    except errors.KVError:
                        return False
        return True

    wait_until(connected, 30.0, "every node to reach every other one")


def restart(cluster: Cluster, node_id: str) -> None:
    dev.restart(cluster.dir, node_id)
    wait_connected(cluster)


def isolated_reads(cluster: Cluster, keys: Sequence[bytes]) -> dict[str, dict[bytes, ReadResult]]:
    """Each node's own answers: every node cut off from the others, read alone with r=1.

    Only for replicas that should already agree: reads queued to a peer while
    cut off may still reach it after the heal, and read repair would then fix
    what they touched.
    """
    dev.partition(cluster.dir, [[i] for i in cluster.ids])
    try:
        out: dict[str, dict[bytes, ReadResult]] = {}
        for node_id in cluster.ids:
            with cluster.direct_client(node_id) as kv:
                out[node_id] = read_all(kv, keys)
        return out
    finally:
        dev.heal(cluster.dir)


# -- (a) a wiped node ------------------------------------------------------------------------


def test_repair_rebuilds_a_wiped_node_that_then_serves_every_key_alone(start: Start) -> None:
    cluster = start(WIPE_PORT)
    keys = [key("wipe", i) for i in range(5000)]
    with cluster.client() as kv:
        put_all(kv, [(k, value(k)) for k in keys], w="all")
    assert node_keys(cluster, "n3") == 5000

    n3 = cluster.state.node("n3")
    dev.kill(cluster.dir, "n3", signal.SIGKILL)
    shutil.rmtree(n3.data_dir)
    restart(cluster, "n3")
    assert node_keys(cluster, "n3") == 0

    summary = repair(cluster)  # any node may run it: each owns every partition
    assert summary["partitions_compared"] == 64
    assert summary["keys_repaired"] >= 5000
    assert summary["keys_exchanged"] >= 5000
    assert summary["keys_compared"] >= 5000
    assert summary["bytes_exchanged"] >= sum(len(k) + len(value(k)) for k in keys)
    assert summary["seconds"] > 0
    assert node_keys(cluster, "n3") == 5000
    # the node that ran it (kvctl picked one) records every partition as repaired
    runs = {i: last_repaired(cluster, i) for i in cluster.ids}
    assert sorted(len(r) for r in runs.values()) == [0, 0, 64], runs

    stop(cluster, "n1", "n2")
    cluster.wait_state("n3", "n1", "down")
    cluster.wait_state("n3", "n2", "down")
    with cluster.direct_client("n3") as kv:
        results = read_all(kv, keys)
    wrong = [k for k in keys if results[k].values != [value(k)]]
    assert not wrong, f"{len(wrong)} keys read wrong from n3 alone, e.g. {wrong[:3]}"

    # with the other owners down a repair cannot complete, and says so
    failed = cluster.kvctl("cluster", "repair", nodes=cluster.address("n3"))
    assert failed.code == 1
    assert len(failed.json()["errors"]) == 64
    assert failed.stderr_lines[-1].startswith("kvctl: repair incomplete: partition ")


# -- (b) deletes while a replica was away ------------------------------------------------------


def test_deletes_made_while_a_replica_was_away_stay_deleted(start: Start) -> None:
    cluster = start(DELETE_PORT)
    kept = [key("kept", i) for i in range(200)]
    deleted = [key("deleted", i) for i in range(300)]  # n3 down while they are deleted
    updated = [key("updated", i) for i in range(100)]  # n3 down while they are overwritten
    lonely = [key("lonely", i) for i in range(100)]  # only n3 ever held their values
    everything = [*kept, *deleted, *updated, *lonely]
    with cluster.client() as kv:
        put_all(kv, [(k, value(k)) for k in [*kept, *deleted, *updated]], w="all")

    # n3, cut off, takes writes nobody else sees; the client keeps their contexts
    dev.partition(cluster.dir, [["n3"]])
    cluster.wait_state("n3", "n1", "down")
    with cluster.direct_client("n3") as kv:
        contexts = {k: kv.put(k, value(k, "lonely"), w=1).context for k in lonely}
    dev.kill(cluster.dir, "n3", signal.SIGKILL)
    dev.heal(cluster.dir)
    cluster.wait_state("n1", "n3", "down")  # so neither coordinator even tries n3
    cluster.wait_state("n2", "n3", "down")

    with cluster.client("n1", "n2") as kv:
        for k in deleted:
            assert kv.delete(k), k  # reads a quorum first, deletes what it saw
        for k in updated:
            kv.put(k, value(k, "v2"), context=kv.get(k).context)
        for k in lonely:
            assert kv.delete(k, context=contexts[k])  # the delete saw n3's value
        assert not any(r.found for r in read_all(kv, [*deleted, *lonely]).values())
    restart(cluster, "n3")
    assert cluster.hints_pending() == 0  # hints are off: only a repair can help n3

    # Nothing has read n3 since (a read would repair what it touched): exactly
    # the keys n3 missed differ, and the repair changes each of them once.
    summary = repair(cluster)
    assert summary["keys_repaired"] == len(deleted) + len(updated) + len(lonely)

    def check(reads: dict[bytes, ReadResult], where: str) -> None:
        back = [k for k in [*deleted, *lonely] if reads[k].found]
        assert not back, f"{where}: {len(back)} deleted keys are back, e.g. {back[:3]}"
        stale = [k for k in updated if reads[k].values != [value(k, "v2")]]
        assert not stale, f"{where}: {len(stale)} keys not updated, e.g. {stale[:3]}"
        lost = [k for k in kept if reads[k].values != [value(k)]]
        assert not lost, f"{where}: {len(lost)} kept keys wrong, e.g. {lost[:3]}"

    for node_id, reads in isolated_reads(cluster, everything).items():
        check(reads, f"{node_id} alone after the repair")

    again = repair(cluster, "--node", cluster.address("n3"))  # converged: nothing to move
    assert again["keys_repaired"] == 0 and again["keys_exchanged"] == 0
    for node_id, reads in isolated_reads(cluster, everything).items():
        check(reads, f"{node_id} alone after a further repair")

    stop(cluster, "n1", "n2")
    with cluster.direct_client("n3") as kv:
        check(read_all(kv, everything), "n3 with n1 and n2 stopped")


# -- (c) status, (d) a partition the node does not own ------------------------------------------


def test_status_shows_when_each_partition_was_last_repaired(start: Start) -> None:
    cluster = start(STATUS_PORT, n_val=2)
    n1 = cluster.address("n1")
    with cluster.client() as kv:
        put_all(kv, [(key("s", i), b"v") for i in range(300)], w="all")
    ring = cluster.kvctl("cluster", "ring").ok().json()
    owned = [p for p, o in enumerate(ring["owners"]) if "n1" in o["owners"]]
    foreign = [p for p, o in enumerate(ring["owners"]) if "n1" not in o["owners"]]
    assert owned and foreign

    assert last_repaired(cluster, "n1") == {}  # background anti-entropy is off
    t0 = time.time()
    one = repair(cluster, "--partition", str(owned[0]), "--node", n1)
    assert one["partitions_compared"] == 1
    assert list(last_repaired(cluster, "n1")) == [owned[0]]

    text = cluster.kvctl("cluster", "repair", "--node", n1, as_json=False).ok()
    assert "repairing" in text.stdout and "100%" in text.stdout  # the progress bar
    assert f"{len(owned)} partitions compared" in text.stdout.splitlines()[-1]
    t1 = time.time()
    times = last_repaired(cluster, "n1")
    assert sorted(times) == owned
    assert all(t0 - 1 <= t <= t1 + 1 for t in times.values()), times
    assert last_repaired(cluster, "n2") == {}  # only the node that ran the repair records it


def test_repair_of_a_partition_the_node_does_not_own_fails_clearly(start: Start) -> None:
    cluster = start(FOREIGN_PORT, n_val=2)
    n1 = cluster.address("n1")
    ring = cluster.kvctl("cluster", "ring").ok().json()
    foreign = next(p for p, o in enumerate(ring["owners"]) if "n1" not in o["owners"])
    owners = ring["owners"][foreign]["owners"]

    text = cluster.kvctl(
        "cluster", "repair", "--partition", str(foreign), "--node", n1, as_json=False
    )
    line = text.one_line_error()
    assert f"does not own partition {foreign}" in line
    assert all(o in line for o in owners)
    assert text.code == 2

    as_json = cluster.kvctl("cluster", "repair", "--partition", str(foreign), "--node", n1)
    assert as_json.code == 2
    assert as_json.json()["error"]["kind"] == "invalid_argument"

    too_big = cluster.kvctl("cluster", "repair", "--partition", "64", "--node", n1, as_json=False)
    assert "partition must be in 0..63" in too_big.one_line_error()
    assert too_big.code == 2
    negative = cluster.kvctl("cluster", "repair", "--partition", "-1", "--node", n1, as_json=False)
    assert "--partition" in negative.one_line_error()
    assert negative.code == 2
    assert cluster.kvctl("cluster", "status", "--node", n1).ok().json()["repairs"] == []
