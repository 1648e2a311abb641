"""``kvctl dev`` end to end: the launcher behind ``make run`` (up, status, kill, restart,
pause, resume, partition, heal, down), run as separate kvctl processes.

``make run`` itself is not run here: it starts its cluster on the default ports
(7101-7103) in the repository's ``.kvcluster/dev``, which other clusters on a
shared machine may be using. It is ``kvctl dev up --nodes 3 --dir .kvcluster/dev``
after creating the virtual environment, and this test drives that command.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcluster.cli import dev
from tests.integration.conftest import run_kvctl
from tests.support import wait_until

pytestmark = pytest.mark.integration

PORT = 7460  # this module uses 7460-7469


@pytest.fixture
def dev_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "dev"
    yield directory
    if (directory / dev.STATE_FILE).exists():
        dev.down(directory)  # stops whatever the test left running, by recorded PID


def kvctl_dev(*args: str, directory: Path) -> dict[str, object] | list[dict[str, object]]:
    result = run_kvctl("--json", "dev", *args, "--dir", str(directory)).ok()
    data: dict[str, object] | list[dict[str, object]] = result.json()
    return data


def statuses(directory: Path) -> dict[str, tuple[bool, bool]]:
    rows = kvctl_dev("status", directory=directory)
    assert isinstance(rows, list)
    return {str(r["id"]): (bool(r["running"]), bool(r["ready"])) for r in rows}


def test_kvctl_dev_lifecycle(dev_dir: Path) -> None:
    up = run_kvctl(
        "--json",
        "dev",
        "up",
        "--nodes",
        "3",
        "--base-port",
        str(PORT),
        "--dir",
        str(dev_dir),
        "--set",
        "metrics_listen=off",
    ).ok()
    nodes = up.json()["nodes"]
    assert [(n["id"], n["address"]) for n in nodes] == [
        (f"n{i + 1}", f"127.0.0.1:{PORT + i}") for i in range(3)
    ]
    pids = {n["id"]: n["pid"] for n in nodes}
    assert all(dev.is_running(pid) for pid in pids.values())

    state = json.loads((dev_dir / dev.STATE_FILE).read_text())
    assert [n["id"] for n in state["nodes"]] == ["n1", "n2", "n3"]
    for n in state["nodes"]:
        assert {"id", "address", "pid", "data_dir", "log"} <= set(n)
        assert Path(n["log"]).exists()
    assert statuses(dev_dir) == {i: (True, True) for i in pids}

    addresses = ",".join(n["address"] for n in nodes)
    run_kvctl("--nodes", addresses, "put", "hello", "world").ok()
    assert run_kvctl("--nodes", addresses, "get", "hello").ok().stdout == "world\n"

    again = run_kvctl("dev", "up", "--nodes", "3", "--base-port", str(PORT), "--dir", str(dev_dir))
    assert "already running" in again.one_line_error()
    assert again.code == 1

    assert kvctl_dev("kill", "n2", directory=dev_dir) == {
        "ok": True,
        "node": "n2",
        "pid": pids["n2"],
    }
    assert not dev.is_running(pids["n2"])
    assert statuses(dev_dir)["n2"] == (False, False)
    restarted = kvctl_dev("restart", "n2", directory=dev_dir)
    assert isinstance(restarted, dict)
    assert restarted["pid"] != pids["n2"]
    assert statuses(dev_dir) == {i: (True, True) for i in pids}

    # paused: the process is there but does not answer; resumed: it answers again
    n3 = {"ok": True, "node": "n3", "pid": pids["n3"]}
    assert kvctl_dev("pause", "n3", directory=dev_dir) == n3
    wait_until(lambda: statuses(dev_dir)["n3"] == (True, False), 30.0, "n3 to stop answering")
    assert kvctl_dev("resume", "n3", directory=dev_dir) == n3
    wait_until(lambda: statuses(dev_dir)["n3"] == (True, True), 30.0, "n3 to answer again")

    blocked = kvctl_dev("partition", "n1", "n2,n3", directory=dev_dir)
    assert blocked == {"n1": ["n2", "n3"], "n2": ["n1"], "n3": ["n1"]}
    assert kvctl_dev("heal", directory=dev_dir) == {"ok": True, "healed": 3}

    current = [n["pid"] for n in json.loads((dev_dir / dev.STATE_FILE).read_text())["nodes"]]
    assert kvctl_dev("down", directory=dev_dir) == {"ok": True, "stopped": 3}
    assert not any(dev.is_running(pid) for pid in current)
    assert statuses(dev_dir) == {i: (False, False) for i in pids}

    # the data survives a down/up: the cluster comes back with its keys
    up_again = run_kvctl(
        "dev", "up", "--nodes", "3", "--base-port", str(PORT), "--dir", str(dev_dir),
        "--set", "metrics_listen=off",
    ).ok()  # fmt: skip
    assert "export KVCLUSTER_NODES=" in up_again.stdout
    assert run_kvctl("--nodes", addresses, "get", "hello").ok().stdout == "world\n"

    down = run_kvctl("dev", "down", "--clean", "--dir", str(dev_dir)).ok()
    assert down.stdout == "stopped 3 nodes\n"
    assert not dev_dir.exists()
