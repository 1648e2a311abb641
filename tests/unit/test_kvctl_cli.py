"""kvctl argument handling, without a cluster (click's CliRunner).

Every failure prints exactly one line on stderr and exits non-zero: 2 for bad
usage or input, 1 otherwise; with ``--json`` an error object goes to stdout.
Bad input is caught before any request is sent: every invocation here names
a node address on which nothing listens (127.0.0.1:7499), so a command that
wrongly went to the network would fail with "unreachable" (exit 1) instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kvcluster.cli import dev, kvctl

DEAD = "127.0.0.1:7499"  # nothing listens here (integration tests use 7400-7499)


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def one_line_error(self) -> str:
        assert self.code != 0, self
        lines = self.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("kvctl: "), lines
        return lines[0]


def run(
    args: list[str], env: Mapping[str, str | None] | None = None, stdin: str | None = None
) -> Run:
    """Run kvctl's entry point (``main``) as the installed script would be run."""
    runner = CliRunner()
    env = {"KVCLUSTER_NODES": None, **(env or {})}
    with runner.isolation(input=stdin, env=env) as (out, err, _):
        saved = sys.argv
        sys.argv = ["kvctl", *args]
        try:
            kvctl.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = saved
        return Run(code, out.getvalue().decode(), err.getvalue().decode())


def invoke(args: list[str], env: Mapping[str, str | None] | None = None) -> Run:
    """Invoke the click group directly (CliRunner.invoke)."""
    result = CliRunner().invoke(kvctl.cli, args, env={"KVCLUSTER_NODES": None, **(env or {})})
    return Run(result.exit_code, result.stdout, result.stderr)


# -- usage errors: one line, exit 2 --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["put", "--bogus", "k", "v"],
        ["--bogus", "get", "k"],
        ["get"],
        ["get", "k", "extra"],
        ["get", "k", "--r"],
        ["nosuchcommand"],
        ["--timeout", "soon", "get", "k"],
        ["cluster", "repair", "--partition", "-1"],
        ["cluster", "nosuch"],
        ["dev", "up", "--nodes", "three"],
        ["dev", "kill"],
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str]) -> None:
    result = run(["--nodes", DEAD, *args])
    line = result.one_line_error()
    assert result.code == 2
    assert "--help" in line  # points at the help of the command that failed
    assert result.stdout == ""


def test_usage_error_names_the_unknown_option() -> None:
    line = run(["--nodes", DEAD, "put", "--bogus", "k", "v"]).one_line_error()
    assert "--bogus" in line
    assert "kvctl put --help" in line


# -- bad input: one line, exit 2, nothing sent ---------------------------------------------------

BAD_INPUT: list[tuple[str, list[str], str]] = [
    ("no value", ["put", "k"], "value"),
    ("value and file", ["put", "k", "v", "--file", "-"], "value"),
    ("blind and context", ["put", "--blind", "--context", "AQ==", "k", "v"], "context"),
    ("context not base64", ["put", "--context", "***", "k", "v"], "context"),
    ("context bad padding", ["put", "--context", "AQ=", "k", "v"], "context"),
    ("delete context not base64", ["delete", "--context", "@@", "k"], "context"),
    ("empty key get", ["get", ""], "key"),
    ("empty key put", ["put", "--blind", "", "v"], "key"),
    ("empty key read first", ["put", "", "v"], "key"),
    ("long key", ["get", "k" * 1025], "key"),
    ("long utf-8 key", ["delete", "ж" * 513], "key"),
    ("read quorum word", ["get", "--r", "lots", "k"], "r"),
    ("read quorum zero", ["get", "--r", "0", "k"], "r"),
    ("write quorum zero", ["put", "--blind", "--w", "0", "k", "v"], "w"),
    ("write quorum word", ["delete", "--context", "AQ==", "--w", "most", "k"], "w"),
    ("dev set", ["dev", "up", "--set", "request_timeout"], "set"),
    ("dev delay", ["dev", "fault", "n1", "--delay", "soon"], "delay"),
]


@pytest.mark.parametrize(
    ("args", "field"), [pytest.param(a, f, id=name) for name, a, f in BAD_INPUT]
)
def test_bad_input_is_rejected_before_sending(args: list[str], field: str) -> None:
    text = run(["--nodes", DEAD, *args])
    line = text.one_line_error()
    assert text.code == 2, text
    assert text.stdout == ""

    as_json = run(["--nodes", DEAD, "--json", *args])
    assert as_json.code == 2
    assert as_json.one_line_error() == line
    err = as_json.json()["error"]
    assert err["kind"] == "invalid_argument"
    assert err["field"] == field
    assert line == f"kvctl: {err['message']}"


@pytest.mark.parametrize("nodes", ["nonsense", "127.0.0.1:0", "h:99999", ",", "a:1,b"])
def test_bad_node_addresses(nodes: str) -> None:
    result = run(["--nodes", nodes, "--json", "get", "k"])
    result.one_line_error()
    assert result.code == 2
    assert result.json()["error"]["field"] == "nodes"


def test_nodes_from_the_environment(tmp_path: Path) -> None:
    result = run(["--json", "get", "k"], env={"KVCLUSTER_NODES": "not-an-address"})
    assert result.code == 2
    assert "not-an-address" in result.one_line_error()
    flag_wins = run(["--nodes", DEAD, "--json", "get", ""], env={"KVCLUSTER_NODES": "bad"})
    assert flag_wins.json()["error"]["field"] == "key"


def test_unreachable_node_exit_1() -> None:
    result = run(["--nodes", DEAD, "--json", "--timeout", "1", "get", "k"])
    line = result.one_line_error()
    assert result.code == 1
    err = result.json()["error"]
    assert err["kind"] == "unreachable"
    assert err["addresses"] == [DEAD]
    assert DEAD in line


def test_click_runner_exit_codes_match() -> None:
    """The group invoked directly (CliRunner.invoke) exits the same way."""
    bad = invoke(["--nodes", DEAD, "--json", "get", ""])
    assert bad.code == 2
    assert bad.json()["error"]["field"] == "key"
    assert len(bad.stderr.splitlines()) == 1
    usage = invoke(["--nodes", DEAD, "get"])
    assert usage.code == 2


# -- dev verbs without a cluster -------------------------------------------------------------------


def fake_cluster(directory: Path) -> None:
    """A cluster.json whose node is not running (pid 0 is never signalled)."""
    directory.mkdir(parents=True, exist_ok=True)
    node = {
        "id": "n1",
        "address": "127.0.0.1:7498",
        "pid": 0,
        "data_dir": str(directory / "n1" / "data"),
        "log": str(directory / "n1" / "node.log"),
        "metrics": "127.0.0.1:8498",
        "argv": ["false"],
    }
    (directory / "cluster.json").write_text(json.dumps({"nodes": [node]}))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["dev", "status"], "no cluster in"),
        (["dev", "down"], "no cluster in"),
        (["dev", "kill", "n1"], "no cluster in"),
        (["dev", "heal"], "no cluster in"),
    ],
)
def test_dev_without_a_cluster(tmp_path: Path, args: list[str], needle: str) -> None:
    result = run([*args, "--dir", str(tmp_path / "none")])
    assert needle in result.one_line_error()
    assert result.code == 1
    assert not (tmp_path / "none").exists()  # nothing was created


def test_dev_verbs_on_a_stopped_node(tmp_path: Path) -> None:
    fake_cluster(tmp_path)
    d = ["--dir", str(tmp_path)]
    for verb in ("kill", "pause", "resume"):
        result = run(["dev", verb, "n1", *d])
        assert "n1 is not running" in result.one_line_error()
        assert result.code == 1
    unknown = run(["dev", "kill", "n7", *d])
    assert "no node 'n7'" in unknown.one_line_error()
    partition = run(["dev", "partition", "n9", *d])
    assert "unknown nodes n9" in partition.one_line_error()
    status = run(["--json", "dev", "status", *d])
    assert status.code == 0
    assert [(r["id"], r["running"], r["ready"]) for r in status.json()] == [("n1", False, False)]
    down = run(["--json", "dev", "down", *d])
    assert down.json() == {"ok": True, "stopped": 0}


def test_dev_never_signals_a_recycled_pid(tmp_path: Path) -> None:
    """A PID in cluster.json that now belongs to another kvcluster process (here a
    stand-in whose command line says "kvcluster") is not the recorded node."""
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "kvcluster.server.main"]
    )
    try:
        fake_cluster(tmp_path)
        state = json.loads((tmp_path / "cluster.json").read_text())
        state["nodes"][0]["pid"] = other.pid
        (tmp_path / "cluster.json").write_text(json.dumps(state))
        assert dev.is_running(other.pid)  # it does look like a kvcluster process
        result = run(["dev", "kill", "n1", "--dir", str(tmp_path)])
        assert "n1 is not running" in result.one_line_error()
        assert run(["--json", "dev", "down", "--dir", str(tmp_path)]).json()["stopped"] == 0
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


def test_dev_corrupt_state_file(tmp_path: Path) -> None:
    (tmp_path / "cluster.json").write_text("{not json")
    result = run(["dev", "status", "--dir", str(tmp_path)])
    assert "corrupt" in result.one_line_error()
    assert result.code == 1


def test_dev_up_rejects_a_bad_node_count(tmp_path: Path) -> None:
    for count in ("0", "65"):
        result = run(["dev", "up", "--nodes", count, "--dir", str(tmp_path / "c")])
        assert "--nodes must be 1..64" in result.one_line_error()
        assert result.code != 0
        assert not (tmp_path / "c").exists()


# -- help and version ---------------------------------------------------------------------------


def test_version_and_help() -> None:
    version = run(["--version"])
    assert version.code == 0
    assert "0.1.0" in version.stdout
    for args in ([], ["put"], ["get"], ["delete"], ["cluster"], ["cluster", "status"], ["dev"]):
        result = run([*args, "--help"])
        assert result.code == 0, (args, result)
        assert "Usage:" in result.stdout
    assert "--direct" in run(["--help"]).stdout
