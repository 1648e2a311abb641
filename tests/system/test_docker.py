"""The container quick start, end to end: Dockerfile + docker-compose.yml.

The image is built from this checkout on the local Debian base image, the
repository's docker-compose.yml runs three nodes under a unique project name
with client ports published on 127.0.0.1:76xx, and the tests drive it the way
an operator would: ``kvctl`` on the host through the published ports,
``docker kill`` / ``docker start``, and ``docker network disconnect`` /
``connect`` of the internal node-to-node network.

The tests share one cluster and run in file order; each leaves every node
running and connected.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from kvcluster import Client, errors
from kvcluster.cli import dev
from kvcluster.client import AllowListPolicy
from tests.support import clean_env
from tests.system import dockerlib
from tests.system.dockerlib import ComposeCluster, run, wait_until

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

#: How long failure detection, restarts and hint delivery may take here (hang guards).
SETTLE = 120.0


def kvctl(*args: str) -> subprocess.CompletedProcess[str]:
    """``kvctl ARGS`` as a separate process on the host, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kvcluster.cli.kvctl", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}: stdout {proc.stdout!r} stderr {proc.stderr!r}"
    )
    return proc.stdout


def status(c: ComposeCluster, node: str) -> Any:
    """Admin.Status of one node through its published port (None if it does not answer)."""
    return dev.node_status(c.address(node), timeout=2.0)


def sees(c: ComposeCluster, observer: str, node: str, state: str) -> bool:
    st = status(c, observer)
    return st is not None and any(m.id == node and m.state == state for m in st.members)


def hints(c: ComposeCluster) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for n in c.ids:
        st = status(c, n)
        out[n] = None if st is None else int(st.hints_pending)
    return out


def direct(c: ComposeCluster, *nodes: str) -> Client:
    """A client that only talks to ``nodes`` (kvctl --direct)."""
    addrs = [c.address(n) for n in nodes]
    return Client(addrs, timeout=5.0, load_balancing=AllowListPolicy(addrs))


@pytest.fixture
def client(compose_cluster: ComposeCluster) -> Iterator[Client]:
    with Client(compose_cluster.addresses, timeout=5.0) as kv:
        yield kv


def test_compose_defaults_publish_on_loopback_only(docker_available: None) -> None:
    """Without overrides the quick start publishes 7101-7103 on 127.0.0.1 only."""
    compose = dockerlib.compose_command()
    assert compose is not None
    env = {k: v for k, v in os.environ.items() if not (k.startswith("KVC_") or k == "COMPOSE_FILE")}
    proc = subprocess.run(
        [*compose, "-f", str(dockerlib.ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    text = proc.stdout
    assert "image: kvcluster:latest" in text
    for port in (7101, 7102, 7103):
        # compose v1 prints the short syntax, v2 the long one
        short = f"127.0.0.1:{port}:7101" in text
        long = "host_ip: 127.0.0.1" in text and re.search(rf"published: \W?{port}\b", text)
        assert short or long, text
    assert "0.0.0.0" not in text.replace("KVCLUSTER_LISTEN: 0.0.0.0:7101", "")


def test_nodes_are_healthy_non_root_with_named_volumes(compose_cluster: ComposeCluster) -> None:
    c = compose_cluster
    for n in c.ids:
        info = c.inspect(n)
        assert info["State"]["Health"]["Status"] == "healthy"
        assert info["Config"]["User"] == "kvcluster"
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        data = mounts["/var/lib/kvcluster"]
        assert data["Type"] == "volume"
        assert data["Name"] == f"{c.project}_{n}-data"
        uid = run(["docker", "exec", c.container(n), "id", "-u"]).stdout.strip()
        assert uid != "0"
        # the image's HEALTHCHECK command itself, as the engine runs it
        probe = run(
            [
                "docker",
                "exec",
                c.container(n),
                "/opt/kvcluster/bin/python",
                "/opt/kvcluster/healthcheck.py",
            ],
            check=False,
        )
        assert probe.returncode == 0 and "SERVING" in probe.stdout, probe
    # every node agrees on one ring of the three, and advertises its cluster-network name
    st = json.loads(ok(kvctl("--nodes", c.address("n1"), "--json", "cluster", "status")))
    assert st["ready"] is True
    assert sorted((m["id"], m["address"], m["state"]) for m in st["members"]) == [
        ("n1", "n1.cluster:7101", "self"),
        ("n2", "n2.cluster:7101", "up"),
        ("n3", "n3.cluster:7101", "up"),
    ]


def test_kvctl_on_the_host_puts_and_gets_through_published_ports(
    compose_cluster: ComposeCluster,
) -> None:
    """The ring lists nX.cluster addresses, which the host cannot resolve: the client
    reaches every member through the published port it was given as a seed."""
    c = compose_cluster
    nodes = c.nodes_arg
    assert ok(kvctl("--nodes", nodes, "put", "greeting", "hello")).strip() == "OK"
    assert ok(kvctl("--nodes", nodes, "get", "greeting")).strip() == "hello"
    got = json.loads(ok(kvctl("--nodes", nodes, "--json", "get", "--r", "all", "greeting")))
    assert got["values"] == ["hello"]
    assert ok(kvctl("--nodes", nodes, "put", "greeting", "bonjour")).strip() == "OK"
    assert ok(kvctl("--nodes", nodes, "get", "greeting")).strip() == "bonjour"
    ok(kvctl("--nodes", nodes, "delete", "greeting"))
    assert kvctl("--nodes", nodes, "get", "greeting").returncode == 1
    # each published port leads to its own node
    for n in c.ids:
        st = status(c, n)
        assert st is not None and st.node_id == n


def test_killed_node_misses_writes_then_hints_deliver_them(
    compose_cluster: ComposeCluster, client: Client
) -> None:
    c = compose_cluster
    victim = c.container("n2")
    run(["docker", "kill", victim])
    try:
        wait_until(
            lambda: sees(c, "n1", "n2", "down") and sees(c, "n3", "n2", "down"),
            SETTLE,
            "n1 and n3 to see n2 down",
        )
        written = {f"kill:{i}": f"v{i}" for i in range(30)}
        for key, value in written.items():
            client.put(key, value, w=2)  # W=2 of N=3 with one node down: succeeds
        assert ok(kvctl("--nodes", c.nodes_arg, "put", "--w", "2", "kill:cli", "x")).strip() == "OK"
        written["kill:cli"] = "x"
        held = hints(c)
        assert (held["n1"] or 0) + (held["n3"] or 0) > 0, f"no hints for the missed writes: {held}"
    finally:
        run(["docker", "start", victim])
    c.wait_healthy(["n2"])
    wait_until(lambda: hints(c) == {"n1": 0, "n2": 0, "n3": 0}, SETTLE, "every hint delivered")
    # before any read could repair it, n2 holds what it missed: as many keys as n1
    keys = {n: status(c, n).keys for n in c.ids}
    assert keys["n2"] == keys["n1"] == keys["n3"], keys
    for key, value in written.items():
        assert client.get(key, r="all").values == [value.encode()], key


def test_partitioned_node_refuses_strict_writes_majority_serves_then_converges(
    compose_cluster: ComposeCluster, client: Client
) -> None:
    c = compose_cluster
    victim = c.container("n3")
    run(["docker", "network", "disconnect", c.cluster_network, victim])
    try:
        wait_until(
            lambda: (
                sees(c, "n3", "n1", "down")
                and sees(c, "n3", "n2", "down")
                and sees(c, "n1", "n3", "down")
                and sees(c, "n2", "n3", "down")
            ),
            SETTLE,
            "both sides to see the partition",
        )
        # n3 is still reachable through its published port (the clients network),
        # but alone it cannot reach W=2 primaries: a clear Unavailable, nothing attempted
        with direct(c, "n3") as minority, pytest.raises(errors.Unavailable) as exc:
            minority.put("part:minority", "lost", strict=True, w=2)
        assert (exc.value.required, exc.value.alive) == (2, 1)
        proc = kvctl(
            "--direct",
            "--nodes",
            c.address("n3"),
            "put",
            "--strict",
            "--blind",
            "part:minority",
            "lost",
        )
        assert proc.returncode == 1
        assert proc.stderr.strip().startswith("kvctl: not enough replicas available"), proc
        # the majority side keeps serving strict writes and quorum reads
        written = {f"part:{i}": f"m{i}" for i in range(20)}
        with direct(c, "n1", "n2") as majority:
            for key, value in written.items():
                majority.put(key, value, strict=True, w=2)
            for key, value in written.items():
                assert majority.get(key, r=2).values == [value.encode()]
        ok(
            kvctl(
                "--direct",
                "--nodes",
                f"{c.address('n1')},{c.address('n2')}",
                "put",
                "--strict",
                "part:cli",
                "m-cli",
            )
        )
        written["part:cli"] = "m-cli"
    finally:
        run(["docker", "network", "connect", "--alias", "n3.cluster", c.cluster_network, victim])
    wait_until(
        lambda: all(sees(c, a, b, "up") for a in c.ids for b in c.ids if a != b),
        SETTLE,
        "every node to see every other up",
    )
    wait_until(lambda: hints(c) == {"n1": 0, "n2": 0, "n3": 0}, SETTLE, "every hint delivered")
    summary = json.loads(
        ok(kvctl("--direct", "--nodes", c.address("n3"), "--json", "cluster", "repair"))
    )
    assert not summary.get("errors"), summary
    keys = {n: status(c, n).keys for n in c.ids}
    assert keys["n1"] == keys["n2"] == keys["n3"], keys
    with direct(c, "n3") as healed:
        for key, value in written.items():
            assert healed.get(key, r="all").values == [value.encode()], key
    for key, value in written.items():
        assert client.get(key, r="all", strict=True).values == [value.encode()], key
    # the minority's refused strict writes were never attempted: stored nowhere
    assert not client.get("part:minority", r="all", strict=True).found
