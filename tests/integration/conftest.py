"""Fixtures for integration tests: local clusters of real node processes.

Clusters are started with :mod:`kvcluster.cli.dev` (the launcher shared with
``kvctl dev``), which records every node's PID in ``cluster.json``; a
finalizer stops them by those PIDs (``dev.down``). Data directories live
under pytest's temporary directories. When a test fails, the tail of every
running node's log is attached to its report.

Ports: every module owns a block of ports (see the ``PORT`` constants at the
top of each module), so modules never collide with each other or with other
clusters on the machine. ``start_cluster`` / ``start_module_cluster`` hand out
7400-7499 only (the block of the KV, bad-input, durability, fault and dev
modules). Metrics endpoints are off unless a test asks for one (they would
otherwise take port + 1000).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from kvcluster import Client
from kvcluster.cli import dev
from kvcluster.client import AllowListPolicy
from tests.support import clean_env, wait_until

PORT_MIN, PORT_MAX = 7400, 7499
#: A hang guard for one kvctl process, never a performance assertion.
KVCTL_HANG_GUARD = 120.0


@dataclass(frozen=True)
class KvctlResult:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def json(self) -> Any:
        """stdout parsed as one JSON document."""
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise AssertionError(
                f"kvctl {' '.join(self.args)}: stdout is not JSON: {self.stdout!r} "
                f"(stderr {self.stderr!r})"
            ) from None

    def ok(self) -> KvctlResult:
        """Assert exit status 0 and return self."""
        assert self.code == 0, (
            f"kvctl {' '.join(self.args)} exited {self.code}: "
            f"stdout {self.stdout!r} stderr {self.stderr!r}"
        )
        return self

    def one_line_error(self) -> str:
        """Assert a failure that printed exactly one line on stderr; return that line."""
        assert self.code != 0, f"kvctl {' '.join(self.args)} succeeded: {self.stdout!r}"
        lines = self.stderr_lines
        assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
        assert lines[0].startswith("kvctl: "), lines
        return lines[0]


def run_kvctl(
    *args: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None
) -> KvctlResult:
    """Run ``kvctl ARGS`` as a separate process (as a user would)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kvcluster.cli.kvctl", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        env={**clean_env(), **(env or {})},
        timeout=KVCTL_HANG_GUARD,
        check=False,
    )
    return KvctlResult(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def read_values(
    kv: Client, keys: list[str], r: int | str = "all", settle: float = 20.0
) -> dict[str, list[bytes] | Exception]:
    """key -> values read back; a read that fails is tried again for up to ``settle`` s.

    Right after a restart or a heal, a replica can be marked up while a peer's
    connection to it is still reconnecting, so an ``r=all`` read may time out
    for a moment: that says nothing about the data, unlike a wrong answer.
    Keys still failing after ``settle`` map to their last error.
    """
    out: dict[str, list[bytes] | Exception] = {}
    pending = list(keys)
    end = time.monotonic() + settle
    while pending:
        failed: list[str] = []
        for start in range(0, len(pending), 500):
            chunk = pending[start : start + 500]
            for key, result in zip(chunk, kv.get_many(chunk, r=r), strict=True):
                out[key] = result if isinstance(result, Exception) else result.values
                if isinstance(result, Exception):
                    failed.append(key)
        pending = failed
        if pending and time.monotonic() < end:
            time.sleep(0.2)
        else:
            break
    return out


@dataclass
class Cluster:
    """A running local cluster (``kvctl dev``) and helpers to talk to it."""

    dir: Path
    base_port: int
    size: int
    stopped: bool = field(default=False)

    @property
    def state(self) -> dev.DevCluster:
        return dev.DevCluster.load(self.dir)

    @property
    def ids(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.size)]

    @property
    def addresses(self) -> list[str]:
        return [self.address(i) for i in self.ids]

    def address(self, node_id: str) -> str:
        return f"127.0.0.1:{self.base_port + int(node_id[1:]) - 1}"

    @property
    def nodes_arg(self) -> str:
        return ",".join(self.addresses)

    def client(self, *node_ids: str, **kw: Any) -> Client:
        """A client seeded with the given nodes (default all), routing normally."""
        addrs = [self.address(i) for i in node_ids] if node_ids else self.addresses
        return Client(addrs, **kw)

    def direct_client(self, *node_ids: str, **kw: Any) -> Client:
        """A client that only ever talks to ``node_ids`` (like ``kvctl --direct``)."""
        addrs = [self.address(i) for i in node_ids]
        return Client(addrs, load_balancing=AllowListPolicy(addrs), **kw)

    def kvctl(self, *args: str, nodes: str | None = None, as_json: bool = True) -> KvctlResult:
        head = ["--nodes", nodes or self.nodes_arg]
        if as_json:
            head.append("--json")
        return run_kvctl(*head, *args)

    def status(self, node_id: str, timeout: float = 2.0) -> Any:
        """``Admin.Status`` of one node (protobuf), or None when it does not answer."""
        return dev.node_status(self.address(node_id), timeout=timeout)

    def member_state(self, observer: str, node_id: str) -> str | None:
        st = self.status(observer)
        if st is None:
            return None
        return next((m.state for m in st.members if m.id == node_id), None)

    def wait_state(self, observer: str, node_id: str, state: str, timeout: float = 15.0) -> None:
        wait_until(
            lambda: self.member_state(observer, node_id) == state,
            timeout,
            f"{observer} to see {node_id} {state}",
        )

    def wait_all_up(self, timeout: float = 15.0) -> None:
        """Wait until every node sees every other node up (``timeout`` for each pair)."""
        for observer in self.ids:
            for node_id in self.ids:
                if node_id != observer:
                    self.wait_state(observer, node_id, "up", timeout=timeout)

    def hints_pending(self) -> int:
        """Hints pending summed over every node that answers (-1 if one does not)."""
        total = 0
        for node_id in self.ids:
            st = self.status(node_id)
            if st is None:
                return -1
            total += int(st.hints_pending)
        return total

    def log_tails(self, lines: int = 40) -> str:
        try:
            nodes = self.state.nodes
        except dev.DevError as exc:
            return str(exc)
        return "\n".join(f"--- {n.id} ({n.log})\n{dev.tail(n.log, lines)}" for n in nodes)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            _ACTIVE.pop(self.dir, None)
            dev.down(self.dir)


_ACTIVE: dict[Path, Cluster] = {}


class StartCluster(Protocol):
    def __call__(
        self,
        nodes: int,
        base_port: int,
        *,
        settings: Mapping[str, Any] | None = None,
        n_val: int | None = None,
        r: int | None = None,
        w: int | None = None,
    ) -> Cluster: ...


def _starter(
    make_dir: Callable[[str], Path], started: list[Cluster], ports: tuple[int, int]
) -> StartCluster:
    port_min, port_max = ports

    def start(
        nodes: int,
        base_port: int,
        *,
        settings: Mapping[str, Any] | None = None,
        n_val: int | None = None,
        r: int | None = None,
        w: int | None = None,
    ) -> Cluster:
        assert base_port >= port_min and base_port + nodes - 1 <= port_max, (
            f"these tests use ports {port_min}-{port_max} only"
        )
        directory = make_dir(f"cluster-{base_port}")
        merged = {"metrics_listen": "off", **(settings or {})}
        cluster = Cluster(directory, base_port, nodes)
        started.append(cluster)
        _ACTIVE[directory] = cluster
        try:
            dev.up(directory, nodes, base_port, n_val, r, w, settings=merged, timeout=60.0)
        except dev.DevError as exc:
            pytest.fail(f"could not start a {nodes}-node cluster at port {base_port}:\n{exc}")
        return cluster

    return start


@contextlib.contextmanager
def cluster_starter(
    make_dir: Callable[[str], Path], ports: tuple[int, int] = (PORT_MIN, PORT_MAX)
) -> Iterator[StartCluster]:
    """Start clusters (in ``make_dir(f"cluster-{base_port}")``, on ``ports`` only);
    every one still running is stopped by PID when the block ends."""
    started: list[Cluster] = []
    try:
        yield _starter(make_dir, started, ports)
    finally:
        for cluster in started:
            if (cluster.dir / dev.STATE_FILE).exists():
                cluster.stop()
            else:
                _ACTIVE.pop(cluster.dir, None)


def subdirectory_of(parent: Path) -> Callable[[str], Path]:
    """A ``make_dir`` for :func:`cluster_starter`: new directories under ``parent``."""

    def make_dir(name: str) -> Path:
        d = parent / name
        d.mkdir()
        return d

    return make_dir


@pytest.fixture(autouse=True, scope="session")
def _no_kvcluster_env() -> Iterator[None]:
    """Node processes and clients must not pick up KVCLUSTER_* from the caller's shell."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("KVCLUSTER_")}
    for k in saved:
        del os.environ[k]
    yield
    os.environ.update(saved)


@pytest.fixture
def start_cluster(tmp_path: Path) -> Iterator[StartCluster]:
    """Start clusters that are stopped when the test ends."""
    with cluster_starter(subdirectory_of(tmp_path)) as start:
        yield start


@pytest.fixture(scope="module")
def start_module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartCluster]:
    """Start clusters shared by a module's tests, stopped after its last test."""
    with cluster_starter(tmp_path_factory.mktemp) as start:
        yield start


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the tail of every running node's log to a failed test's report."""
    report = yield
    if report.failed and _ACTIVE:
        for cluster in list(_ACTIVE.values()):
            report.sections.append((f"node logs {cluster.dir}", cluster.log_tails()))
    return report
