"""A 3-node cluster (N=3, R=2, W=2) under node failures and partitions (issue B, "Done when").

- One node SIGKILLed: W=2 writes keep succeeding, strict W=3 writes fail with
  ``Unavailable(required=3, alive=2)`` (from the client and through
  ``kvctl --json``), ``kvctl cluster status`` shows the node down and, after
  ``dev.restart``, up again; the hints written meanwhile drain to zero and
  ``get(r="all")`` returns every write (the restarted node holds every key).
- One node SIGSTOPped: requests do not stall past their timeout; a coordinator
  that is not the paused node still meets W=2 / R=2.
- A partition {n1} | {n2, n3}: the minority node takes neither strict nor W=2
  writes (``Unavailable``) and stores nothing; the majority keeps serving;
  after healing, hints drain and every node answers the same.

Timing: liveness is polled with generous bounds (the failure detector needs
about two seconds); the only wall-clock checks are hang guards far above any
request timeout, never performance assertions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import pytest

from kvcluster import errors
from kvcluster.cli import dev
from tests.integration.conftest import (
    Cluster,
    KvctlResult,
    StartCluster,
    read_values,
    run_kvctl,
)
from tests.support import wait_until

pytestmark = pytest.mark.integration

PORT = 7440  # this module uses 7440-7459: three ports per test
KILL_PORT = PORT
PAUSE_PORT = PORT + 3
PARTITION_PORT = PORT + 6
STATUS_PORT = PORT + 9
SETTINGS = {"request_timeout": 2}
LIVENESS_TIMEOUT = 10.0  # "within a few seconds": the detector needs about 2 s
HINTS_TIMEOUT = 60.0
HANG_MARGIN = 5.0  # a hang guard on top of a request's own timeout, not a performance bound


def kvctl_member_state(cluster: Cluster, observer: str, node_id: str) -> str | None:
    """``node_id``'s state in ``kvctl --json cluster status --node <observer>``."""
    result = cluster.kvctl("cluster", "status", "--node", cluster.address(observer))
    if result.code != 0:
        return None
    return next((m["state"] for m in result.json()["members"] if m["id"] == node_id), None)


def wait_for_hints_to_drain(cluster: Cluster) -> None:
    wait_until(lambda: cluster.hints_pending() == 0, HINTS_TIMEOUT, "hints to drain to zero")


def expect_unavailable(call: Callable[[], Any], required: int, alive: int) -> None:
    with pytest.raises(errors.Unavailable) as info:
        call()
    assert (info.value.required, info.value.alive) == (required, alive), info.value


def assert_kvctl_unavailable(result: KvctlResult, required: int, alive: int) -> None:
    result.one_line_error()
    assert result.code == 1
    err = result.json()["error"]
    assert (err["kind"], err["required"], err["alive"]) == ("unavailable", required, alive)


def values_everywhere(cluster: Cluster, keys: list[str]) -> dict[str, dict[str, Any]]:
    """node -> key -> values, each key read with r=all through that node alone."""
    seen: dict[str, dict[str, Any]] = {}
    for node_id in cluster.ids:
        with cluster.direct_client(node_id) as kv:
            seen[node_id] = read_values(kv, keys)
    return seen


# -- one node killed ------------------------------------------------------------------


def test_killed_node_writes_hints_and_recovery(start_cluster: StartCluster) -> None:
    cluster = start_cluster(3, KILL_PORT, settings=SETTINGS)
    before = {f"pre/{i}": f"pre-{i}".encode() for i in range(30)}
    with cluster.client() as kv:
        for k, v in before.items():
            kv.put(k, v, w="all")

    dev.kill(cluster.dir, "n3")
    wait_until(
        lambda: kvctl_member_state(cluster, "n1", "n3") == "down",
        LIVENESS_TIMEOUT,
        "kvctl cluster status to show n3 down",
    )
    assert kvctl_member_state(cluster, "n1", "n2") == "up"

    during = {f"during/{i}": f"during-{i}".encode() for i in range(100)}
    with cluster.client() as kv:
        for k, v in during.items():
            kv.put(k, v)  # W=2: n1 and n2 suffice
        assert kv.get("during/0").values == [b"during-0"]  # R=2 as well
        expect_unavailable(lambda: kv.put("strict/1", b"x", w=3, strict=True), 3, 2)
        expect_unavailable(lambda: kv.put("strict/2", b"x", w="all", strict=True), 3, 2)
        # no fallback exists with three members: a sloppy W=3 cannot be met either
        expect_unavailable(lambda: kv.put("strict/3", b"x", w=3), 3, 2)
        expect_unavailable(lambda: kv.get("during/0", r="all", strict=True), 3, 2)
    assert_kvctl_unavailable(
        cluster.kvctl("put", "--blind", "--w", "3", "--strict", "strict/kvctl", "x"), 3, 2
    )

    # the missed writes wait as hints for n3 on the nodes that coordinated them
    pending = {i: cluster.status(i) for i in ("n1", "n2")}
    assert sum(int(st.hints_pending) for st in pending.values()) >= len(during)
    for st in pending.values():
        n3 = next(m for m in st.members if m.id == "n3")
        assert n3.state == "down"
        assert n3.hints_pending == st.hints_pending

    dev.restart(cluster.dir, "n3")
    wait_until(
        lambda: kvctl_member_state(cluster, "n1", "n3") == "up",
        LIVENESS_TIMEOUT,
        "kvctl cluster status to show n3 up again",
    )
    wait_for_hints_to_drain(cluster)

    # handoff gave n3 every write it missed: it holds every key, like the others
    written = {**before, **during}
    keys = [int(cluster.status(i).keys) for i in cluster.ids]
    assert keys == [len(written)] * 3, keys
    cluster.wait_all_up(timeout=LIVENESS_TIMEOUT)
    with cluster.client() as kv:
        assert read_values(kv, list(written)) == {k: [v] for k, v in written.items()}
        for k in ("strict/1", "strict/2", "strict/3", "strict/kvctl"):
            assert not kv.get(k, r="all").found, f"{k} was rejected but stored"
        kv.put("after/1", b"x", w=3, strict=True)  # strict writes work again


def test_kvctl_cluster_status_text_shows_down_and_up(start_cluster: StartCluster) -> None:
    cluster = start_cluster(3, STATUS_PORT, settings=SETTINGS)

    def n2_row() -> str:
        result = cluster.kvctl("cluster", "status", "--node", cluster.address("n1"), as_json=False)
        result.ok()
        rows = [line for line in result.stdout.splitlines() if " n2 " in line]
        assert len(rows) == 1, result.stdout
        return rows[0]

    assert " up " in n2_row()
    dev.kill(cluster.dir, "n2")
    wait_until(lambda: " down " in n2_row(), LIVENESS_TIMEOUT, "n2 shown down")
    dev.restart(cluster.dir, "n2")
    wait_until(lambda: " up " in n2_row(), LIVENESS_TIMEOUT, "n2 shown up")

    # dev status agrees: every node runs and is ready again
    rows = run_kvctl("--json", "dev", "status", "--dir", str(cluster.dir)).ok().json()
    assert [(r["id"], r["running"], r["ready"]) for r in rows] == [
        (i, True, True) for i in cluster.ids
    ]


# -- one node paused ---------------------------------------------------------------------


def timed(call: Callable[[], Any]) -> tuple[str, Any, float]:
    """Run ``call``: ("ok", result) or (error class name, error), and the seconds it took."""
    start = time.monotonic()
    try:
        outcome: tuple[str, Any] = ("ok", call())
    except errors.KVError as exc:
        outcome = (type(exc).__name__, exc)
    return outcome[0], outcome[1], time.monotonic() - start


def test_paused_node_does_not_stall_requests(start_cluster: StartCluster) -> None:
    cluster = start_cluster(3, PAUSE_PORT, settings=SETTINGS)
    t = 2.0  # each request's own timeout
    with cluster.client() as kv:
        for i in range(20):
            kv.put(f"p/{i}", b"before", w="all")

    dev.pause(cluster.dir, "n3")
    try:
        # before the detector notices: a coordinator other than n3 still meets W=2 / R=2
        with cluster.direct_client("n1", timeout=t) as kv:
            for i in range(10):
                kind, result, took = timed(functools.partial(kv.put, f"p/new/{i}", b"x"))
                assert kind == "ok", result
                assert took < t + HANG_MARGIN
                kind, result, took = timed(functools.partial(kv.get, f"p/{i}"))
                assert kind == "ok", result
                assert result.values == [b"before"]
                assert took < t + HANG_MARGIN
            # a strict W=3 write cannot succeed: it times out or, once n3 is seen
            # down, is refused up front; either way it returns within its timeout
            kind, result, took = timed(lambda: kv.put("p/strict", b"x", w=3, strict=True))
            assert kind in ("Timeout", "Unavailable"), result
            assert result.required == 3
            assert took < t + HANG_MARGIN

        # a routing client may pick the paused node: it answers or times out, never hangs
        outcomes: set[str] = set()
        with cluster.client(timeout=t) as kv:
            for i in range(20):
                kind, result, took = timed(functools.partial(kv.put, f"p/routed/{i}", b"y"))
                assert kind in ("ok", "Timeout"), result
                assert took < t + HANG_MARGIN
                outcomes.add(kind)
                kind, result, took = timed(functools.partial(kv.get, f"p/{i}"))
                assert kind in ("ok", "Timeout"), result
                assert took < t + HANG_MARGIN
        assert "ok" in outcomes

        cluster.wait_state("n1", "n3", "down", timeout=LIVENESS_TIMEOUT)
        with cluster.direct_client("n1", timeout=t) as kv:
            expect_unavailable(lambda: kv.put("p/strict2", b"x", w=3, strict=True), 3, 2)
            assert kv.get("p/0").values == [b"before"]
    finally:
        dev.resume(cluster.dir, "n3")

    cluster.wait_all_up(timeout=LIVENESS_TIMEOUT)
    wait_for_hints_to_drain(cluster)
    with cluster.client() as kv:
        for i in range(10):
            assert kv.get(f"p/new/{i}", r="all").values == [b"x"]


# -- a partition -------------------------------------------------------------------------


def test_partition_minority_refuses_writes_majority_serves(start_cluster: StartCluster) -> None:
    cluster = start_cluster(3, PARTITION_PORT, settings=SETTINGS)
    with cluster.client() as kv:
        kv.put("part/before", b"0", w="all")

    blocked = dev.partition(cluster.dir, [["n1"], ["n2", "n3"]])
    assert blocked == {"n1": ["n2", "n3"], "n2": ["n1"], "n3": ["n1"]}
    cluster.wait_state("n1", "n2", "down", timeout=LIVENESS_TIMEOUT)
    cluster.wait_state("n1", "n3", "down", timeout=LIVENESS_TIMEOUT)
    cluster.wait_state("n2", "n1", "down", timeout=LIVENESS_TIMEOUT)
    cluster.wait_state("n3", "n1", "down", timeout=LIVENESS_TIMEOUT)

    minority_keys = ["part/minority/strict", "part/minority/w2", "part/minority/w2strict"]
    with cluster.direct_client("n1") as kv:
        expect_unavailable(lambda: kv.put(minority_keys[0], b"x", w=3, strict=True), 3, 1)
        expect_unavailable(lambda: kv.put(minority_keys[1], b"x"), 2, 1)
        expect_unavailable(lambda: kv.put(minority_keys[2], b"x", w=2, strict=True), 2, 1)
        expect_unavailable(lambda: kv.get("part/before"), 2, 1)
    n1 = cluster.address("n1")
    assert_kvctl_unavailable(
        run_kvctl("--nodes", n1, "--direct", "--json", "put", "--blind", "part/minority/k", "x"),
        2,
        1,
    )
    assert_kvctl_unavailable(
        run_kvctl(
            "--nodes",
            n1,
            "--direct",
            "--json",
            "put",
            "--blind",
            "--w",
            "3",
            "--strict",
            "part/minority/s",
            "x",
        ),
        3,
        1,
    )
    minority_keys += ["part/minority/k", "part/minority/s"]

    majority = {f"part/majority/{i}": f"m{i}".encode() for i in range(50)}
    with cluster.direct_client("n2", "n3") as kv:
        for k, v in majority.items():
            kv.put(k, v)  # W=2 from n2 and n3
        kv.put("part/majority/strict", b"s", w=2, strict=True)
        majority["part/majority/strict"] = b"s"
        expect_unavailable(lambda: kv.put("part/majority/w3", b"x", w=3, strict=True), 3, 2)
        assert kv.get("part/before").values == [b"0"]
        assert kv.get("part/majority/0").values == [b"m0"]

    assert dev.heal(cluster.dir) == 3
    cluster.wait_all_up(timeout=LIVENESS_TIMEOUT)
    wait_for_hints_to_drain(cluster)

    # handoff alone (before any read could repair) gave n1 the majority's writes
    counts = [int(cluster.status(i).keys) for i in cluster.ids]
    assert counts == [1 + len(majority)] * 3, counts

    keys = ["part/before", *majority, *minority_keys]
    expected = {
        "part/before": [b"0"],
        **{k: [v] for k, v in majority.items()},
        **{k: [] for k in minority_keys},  # refused writes stored nothing anywhere
    }
    seen = values_everywhere(cluster, keys)
    assert seen == {node_id: expected for node_id in cluster.ids}
