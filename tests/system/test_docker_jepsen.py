"""jepsen-lite on the ``docker`` backend: the faults are real, and a run is valid.

The image is the session's kvcluster image (built from this checkout on the
local Debian base image, see conftest.py). The backend runs one container per
node on its own bridge network and cuts links with iptables rules on the host
(``DOCKER-USER``), so these tests also need root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jepsen_lite.backends.docker import LABEL, PID_LABEL, DockerBackend

from kvcluster import Client, errors
from kvcluster.client import AllowListPolicy
from tests.system.dockerlib import run, wait_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


def leftovers(run_id: str) -> list[str]:
    """Anything of this backend run still on the machine."""
    found: list[str] = []
    for cmd in (
        ["docker", "ps", "-aq"],
        ["docker", "network", "ls", "-q"],
        ["docker", "volume", "ls", "-q"],
    ):
        out = run([*cmd, "--filter", f"label={LABEL}={run_id}"]).stdout.split()
        found += [f"{cmd[1]} {x}" for x in out]
    rules = run(["iptables", "-S"], check=False).stdout
    found += [line for line in rules.splitlines() if f"JL-{run_id}" in line]
    return found


@pytest.fixture
def backend(kvcluster_image: str, tmp_path: Path) -> Iterator[DockerBackend]:
    b = DockerBackend(tmp_path / "cluster", image=kvcluster_image)
    try:
        b.start(3, {"request_timeout": 5.0})
        yield b
    finally:
        b.stop()
        assert leftovers(b.run_id) == []


def dropped_packets(b: DockerBackend, node: str) -> int:
    """Packets the node's DROP rules on the host matched so far."""
    listing = run(["iptables", "-L", b._node_chain(node), "-v", "-x", "-n"]).stdout
    return sum(
        int(line.split()[0])
        for line in listing.splitlines()
        if line.split() and line.split()[0].isdigit() and "DROP" in line
    )


def sees(b: DockerBackend, observer: str, node: str, state: str) -> bool:
    st = b.status(observer)
    return st is not None and any(m.id == node and m.state == state for m in st.members)


def test_docker_backend_faults_are_real(backend: DockerBackend) -> None:
    b = backend
    assert b.inprocess_reason is None, f"partitions fell back in-process: {b.inprocess_reason}"
    with Client(b.addresses, timeout=6.0) as kv:
        kv.put("before", "1")
        # a partition cuts node-to-node links on the host's FORWARD path...
        b.partition([["n1"]])
        wait_until(
            lambda: (
                sees(b, "n1", "n2", "down")
                and sees(b, "n1", "n3", "down")
                and sees(b, "n2", "n1", "down")
                and sees(b, "n3", "n1", "down")
            ),
            60.0,
            "n1 and the others to see each other down",
        )
        assert sees(b, "n2", "n3", "up")
        # ...but not the clients: n1 answers, and refuses a strict write it cannot replicate
        n1 = [b.address("n1")]
        with (
            Client(n1, timeout=6.0, load_balancing=AllowListPolicy(n1)) as alone,
            pytest.raises(errors.Unavailable),
        ):
            alone.put("minority", "x", strict=True, w=2)
        majority = [b.address("n2"), b.address("n3")]
        with Client(majority, timeout=6.0, load_balancing=AllowListPolicy(majority)) as two:
            two.put("during", "2", w=2)
        b.heal_partition()
        wait_until(lambda: sees(b, "n1", "n2", "up"), 60.0, "n1 to see n2 up again")
        # pause freezes the container: it stops answering, and answers again after resume
        b.pause("n3")
        assert b.status("n3", timeout=1.0) is None
        b.resume("n3")
        assert b.status("n3") is not None
        # kill + start keeps the node's data (its volume)
        b.kill("n2")
        assert b.status("n2", timeout=1.0) is None
        kv.put("while-n2-down", "3", w=2)
        b.start_node("n2")
        # loss: a fraction of the packets between n1 and its peers is dropped on the host
        # (heartbeats flow all the time, so the DROP rules' counters must move)
        b.set_loss("n1", 0.3)
        wait_until(lambda: dropped_packets(b, "n1") > 0, 60.0, "packets of n1 dropped")
        b.heal()
        kv.put("lossy", "4", w=3)
        wait_until(lambda: set(b.hints_pending().values()) == {0}, 60.0, "hints delivered")
        states = b.replica_states(["before", "during", "while-n2-down", "lossy"])
        assert not states.errors, states.errors
        for node in b.node_ids:
            assert states.states[node] == {
                "before": ["1"],
                "during": ["2"],
                "while-n2-down": ["3"],
                "lossy": ["4"],
            }, node


def test_jepsen_lite_run_on_docker_is_valid(kvcluster_image: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "JEPSEN_LITE_DOCKER_IMAGE": kvcluster_image}
    env = {k: v for k, v in env.items() if not k.startswith("KVCLUSTER_")}
    started = time.monotonic()
    # seed 4 schedules a bridge partition, a pause, a kill and packet loss in 30 s
    with subprocess.Popen(
        [
            sys.executable, "-m", "jepsen_lite.cli", "run",
            "--backend", "docker", "--nodes", "3", "--workload", "set",
            "--nemesis", "partition,kill,pause,loss", "--time-limit", "30", "--seed", "4",
            "--concurrency", "4", "--out", str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the CLI cleans up on SIGTERM
            stdout, stderr = proc.communicate(timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout}\n{stderr[-6000:]}"
    assert "in-process" not in stderr, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["verdict"] == "valid", results
    assert results["backend"] == "docker"
    assert results["summary"]["acknowledged_adds"] > 0
    assert results["summary"]["lost"] == 0
    kinds = {
        json.loads(line)["kind"]
        for line in (out / "nemesis.jsonl").read_text().splitlines()
        if json.loads(line).get("type") == "start"
    }
    assert {"partition", "kill", "pause", "loss"} <= kinds, kinds
    for node in ("n1", "n2", "n3"):
        log = out / "cluster" / node / "node.log"
        assert "serving on 0.0.0.0:7101" in log.read_text(), node
    print(f"jepsen-lite docker run: {results['verdict']} in {elapsed:.0f}s")
    mine = f"label={PID_LABEL}={proc.pid}"
    for kind in ("container", "network", "volume"):
        left = run(["docker", kind, "ls", "-q", "--filter", mine]).stdout.split()
        assert left == [], f"{kind}s left behind: {left}"
