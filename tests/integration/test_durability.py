"""No acknowledged write is lost when a node dies (issue A, "Done when" 3 and 4).

A writer process streams writes through the real client and prints a write
only after ``put`` returned (after it was acknowledged). The test SIGKILLs the
node(s) at a point drawn from a fixed seed, restarts them with ``dev.restart``
and reads back every acknowledged write:

- on one node, across several kill/restart rounds on the same store;
- on three nodes with ``w=all``: every node is killed, then each is restarted
  *alone* and must serve every acknowledged write from its own store (the
  other replicas are down, so nothing can be filled in from them).

SIGTERM is a clean shutdown: exit status 0, and every write is there after a
restart.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvcluster import Client, ReadResult
from kvcluster.cli import dev
from tests.integration.conftest import StartCluster, read_values
from tests.support import clean_env, wait_until

pytestmark = pytest.mark.integration

PORT = 7420  # this module uses 7420-7434
SINGLE_PORT = PORT  # 1 node
TRIO_PORT = PORT + 1  # 3 nodes: 7421-7423
TERM_PORT = PORT + 5  # a node started directly (its exit status is checked)
SEED = 20_261_125
HANG_GUARD = 120.0  # seconds; a safety net against hanging, never an assertion

WRITER = r"""
import asyncio
import sys

from kvcluster import AsyncClient, errors

nodes, prefix, streams, w = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]


async def stream(kv, s):
    i = 0
    while True:
        key = f"{prefix}/{s}/{i}"
        try:
            await kv.put(key, (key + "=value").encode(), w=w)
        except errors.KVError as exc:
            print(f"{s} {i} {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.05)
        else:
            sys.stdout.write(f"{s} {i}\n")  # only once the put was acknowledged
            sys.stdout.flush()
        i += 1


async def main():
    async with AsyncClient(nodes, timeout=2.0) as kv:
        await asyncio.gather(*(stream(kv, s) for s in range(streams)))


asyncio.run(main())
"""


@dataclass
class Writer:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    prefix: str

    def acked(self) -> list[str]:
        """Keys of the complete lines printed so far (a line cut by a kill is ignored)."""
        lines = self.out.read_text().split("\n")[:-1]
        return [f"{self.prefix}/{s}/{i}" for s, i in (line.split() for line in lines)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=HANG_GUARD)


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for w in started:
        w.stop()


def start_writer(
    started: list[Writer], tmp_path: Path, nodes: str, prefix: str, streams: int, w: str
) -> Writer:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out, err = tmp_path / f"{prefix}.acks", tmp_path / f"{prefix}.errors"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), nodes, prefix, str(streams), w],
            stdout=stdout,
            stderr=stderr,
            env=clean_env(),
        )
    writer = Writer(proc, out, err, prefix)
    started.append(writer)
    return writer


def wait_for_acks(writer: Writer, count: int) -> None:
    def enough() -> bool:
        assert writer.proc.poll() is None, f"writer exited: {writer.err.read_text()[-2000:]}"
        return len(writer.acked()) >= count

    wait_until(enough, HANG_GUARD, f"{count} acknowledged writes", interval=0.01)


def missing_writes(kv: Client, keys: list[str], r: str | int) -> list[str]:
    """The keys whose acknowledged value cannot be read back (with what was read instead).

    :func:`read_values` tries a failed read again for a while (it says nothing
    about the data); a read that answers with anything but the acknowledged
    value is a lost write at once.
    """
    got = read_values(kv, keys, r=r)
    return [f"{k}: {v!r}" for k, v in got.items() if v != [(k + "=value").encode()]]


def test_acknowledged_writes_survive_sigkill_of_a_single_node(
    start_cluster: StartCluster, writers: list[Writer], tmp_path: Path
) -> None:
    cluster = start_cluster(1, SINGLE_PORT)
    rng = random.Random(SEED)
    acked: list[str] = []
    for round_ in range(3):
        kill_at = rng.randint(50, 600)
        print(f"seed {SEED} round {round_}: SIGKILL after {kill_at} acknowledged writes")
        writer = start_writer(writers, tmp_path, cluster.nodes_arg, f"r{round_}", 8, "all")
        wait_for_acks(writer, kill_at)
        dev.kill(cluster.dir, "n1", signal.SIGKILL)
        writer.stop()
        acked += writer.acked()
        assert len(acked) >= kill_at

        dev.restart(cluster.dir, "n1")
        with cluster.client() as kv:
            assert missing_writes(kv, acked, r="all") == [], f"seed {SEED} round {round_}"


def test_acknowledged_writes_survive_sigkill_of_every_replica(
    start_cluster: StartCluster, writers: list[Writer], tmp_path: Path
) -> None:
    cluster = start_cluster(3, TRIO_PORT)
    kill_at = random.Random(SEED + 1).randint(100, 500)
    writer = start_writer(writers, tmp_path, cluster.nodes_arg, "all3", 8, "all")
    wait_for_acks(writer, kill_at)
    order = random.Random(SEED + 2).sample(cluster.ids, 3)
    for node_id in order:
        dev.kill(cluster.dir, node_id, signal.SIGKILL)
    writer.stop()
    acked = writer.acked()
    print(f"seed {SEED}: killed {order} after {len(acked)} acknowledged writes (w=all)")
    assert len(acked) >= kill_at

    # each replica alone: whatever it answers comes from its own store
    for node_id in cluster.ids:
        dev.restart(cluster.dir, node_id)
        with cluster.direct_client(node_id) as kv:
            assert missing_writes(kv, acked, r=1) == [], f"{node_id} lost writes (seed {SEED})"
        dev.kill(cluster.dir, node_id, signal.SIGKILL)

    for node_id in cluster.ids:
        dev.restart(cluster.dir, node_id)
    cluster.wait_all_up()  # r=all needs every replica reachable again
    with cluster.client() as kv:
        assert missing_writes(kv, acked, r="all") == []


# -- SIGTERM -------------------------------------------------------------------------------


@dataclass
class DirectNode:
    """A kvcluster-node started by this test (not via dev), so its exit status is ours."""

    proc: subprocess.Popen[bytes]
    log: Path
    address: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def direct_nodes() -> Iterator[list[DirectNode]]:
    started: list[DirectNode] = []
    yield started
    for node in started:
        if node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=HANG_GUARD)


def start_direct(started: list[DirectNode], data_dir: Path, log: Path) -> DirectNode:
    address = f"127.0.0.1:{TERM_PORT}"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvcluster.server.main",
                "--listen",
                address,
                "--data-dir",
                str(data_dir),
                "--metrics-listen",
                "off",
                # one node alone holds one replica: quorums of one (as `kvctl dev up` does)
                "--n-val",
                "1",
                "--r",
                "1",
                "--w",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    node = DirectNode(proc, log, address)
    started.append(node)

    def ready() -> bool:
        assert proc.poll() is None, f"node exited with {proc.returncode}:\n{node.log_text()}"
        status = dev.node_status(address, timeout=0.5)
        return status is not None and status.ready

    wait_until(ready, 60.0, f"the node at {address} to be ready")
    return node


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_shuts_down_cleanly_and_keeps_data(
    direct_nodes: list[DirectNode], tmp_path: Path, sig: signal.Signals
) -> None:
    data, log = tmp_path / "data", tmp_path / "node.log"
    node = start_direct(direct_nodes, data, log)
    keys = [f"term/{i}" for i in range(200)]
    with Client(node.address) as kv:
        written = kv.put_many([(k, (k + "=value").encode()) for k in keys])
        assert all(not isinstance(w, Exception) for w in written)
        for k in keys[:20]:
            assert kv.delete(k) is True

    os.kill(node.proc.pid, sig)
    code = node.proc.wait(timeout=HANG_GUARD)
    assert code == 0, node.log_text()
    assert "stopped" in node.log_text().splitlines()[-1]

    again = start_direct(direct_nodes, data, log)
    with Client(again.address) as kv:
        assert missing_writes(kv, keys[20:], r="all") == []
        deleted = kv.get_many(keys[:20])
        assert all(isinstance(r, ReadResult) and not r.found for r in deleted), deleted
        assert kv.status()["keys"] == len(keys)  # live keys plus the 20 tombstones
    os.kill(again.proc.pid, signal.SIGTERM)
    assert again.proc.wait(timeout=HANG_GUARD) == 0


def test_sigterm_during_a_write_stream_loses_no_acknowledged_write(
    direct_nodes: list[DirectNode], writers: list[Writer], tmp_path: Path
) -> None:
    data, log = tmp_path / "data", tmp_path / "node.log"
    node = start_direct(direct_nodes, data, log)
    writer = start_writer(writers, tmp_path, node.address, "term", 8, "all")
    wait_for_acks(writer, 200)
    os.kill(node.proc.pid, signal.SIGTERM)
    assert node.proc.wait(timeout=HANG_GUARD) == 0, node.log_text()
    writer.stop()
    acked = writer.acked()

    start_direct(direct_nodes, data, log)
    with Client(node.address) as kv:
        assert missing_writes(kv, acked, r="all") == []


def test_restart_keeps_a_node_identity(start_cluster: StartCluster) -> None:
    """dev.restart (SIGTERM, then start) brings back the same store and ring."""
    cluster = start_cluster(1, SINGLE_PORT + 14)
    with cluster.client() as kv:
        kv.put("identity", b"x")
        epoch = kv.status()["ring_epoch"]
    old_pid = cluster.state.node("n1").pid
    dev.restart(cluster.dir, "n1")
    new_pid = cluster.state.node("n1").pid
    assert new_pid != old_pid
    assert not dev.is_running(old_pid)
    with cluster.client() as kv:
        assert kv.get("identity").values == [b"x"]
        assert kv.status()["ring_epoch"] == epoch
