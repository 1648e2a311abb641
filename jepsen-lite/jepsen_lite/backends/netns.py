"""The ``netns`` backend: one network namespace per node, real packet loss.

Layout (all names reserved for jepsen-lite on this machine)::

    host: bridge kvj0 10.77.0.1/24  (the harness and its clients live here)
      ├── veth kvjh1 ── namespace kvj-n1: eth0 10.77.0.11, node n1 on :7500
      ├── veth kvjh2 ── namespace kvj-n2: eth0 10.77.0.12, node n2 on :7500
      └── ...

Node processes run inside their namespace (``ip netns exec``). Partitions and
packet loss are iptables rules inside the namespaces (chains ``KVJ-PART``: DROP
to/from the blocked peers; ``KVJ-LOSS``: the ``statistic`` match, random DROP),
on node-to-node traffic only: clients on the host always reach every node.
Latency and clock offset are in-process (``Admin.SetFaults``): this kernel has no
netem, and libfaketime hangs threaded Python.

If the host bridges packets through iptables (``br_netfilter`` with a FORWARD
policy of DROP, as Docker sets up), one rule accepting kvj0-to-kvj0 traffic is
inserted in the host's FORWARD chain for the run.

Everything created is recorded and removed by :meth:`NetnsBackend.stop` (also
after a failed start; the CLI calls it on Ctrl-C and SIGTERM). One netns run at
a time: a lock file serialises runs; leftovers of a run that was killed with
SIGKILL are removed at the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from jepsen_lite.backends.base import (
    Backend,
    NodeFaults,
    bridged_traffic_crosses_iptables,
    replication,
    set_inprocess_faults,
    settings_env,
)
from jepsen_lite.errors import HarnessError
from kvcluster.cli import dev

__all__ = ["NetnsBackend", "preflight"]

BRIDGE = "kvj0"
SUBNET_PREFIX = "10.77.0"
HOST_IP = f"{SUBNET_PREFIX}.1"
NS_PREFIX = "kvj-"
PORT = 7500
LOCK_FILE = Path("/run/jepsen-lite-netns.lock")
FORWARD_RULE = [
    "-i",
    BRIDGE,
    "-o",
    BRIDGE,
    "-m",
    "comment",
    "--comment",
    "jepsen-lite",
    "-j",
    "ACCEPT",
]


def preflight() -> None:
    """HarnessError unless we are root and ``ip`` and ``iptables`` exist."""
    if os.geteuid() != 0:
        raise HarnessError("the netns backend needs root (network namespaces, iptables)")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            raise HarnessError(
                f"the netns backend needs '{tool}' (Debian: apt-get install "
                f"{'iproute2' if tool == 'ip' else 'iptables'})"
            )


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass
class _Node:
    id: str
    ns: str
    ip: str
    veth: str
    data_dir: Path
    log: Path
    argv: list[str]
    env: dict[str, str]
    pid: int = 0
    proc: subprocess.Popen[bytes] | None = None


class NetnsBackend(Backend):
    name = "netns"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self._nodes: dict[str, _Node] = {}
        self._lock_fh: IO[str] | None = None
        self._created_ns: list[str] = []
        self._created_veths: list[str] = []
        self._bridge = False
        self._forward_rule = False

    # -- setup / teardown --------------------------------------------------------------

    def _acquire(self, timeout: float = 300.0) -> None:
        fh = open(LOCK_FILE, "w")  # noqa: SIM115 (held for the run)
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > end:
                    fh.close()
                    raise HarnessError(f"another netns run holds {LOCK_FILE}") from None
                time.sleep(0.5)
        self._lock_fh = fh

    def _remove_leftovers(self) -> None:
        """Namespaces and links named kvj-*/kvj0 left by a run that was SIGKILLed."""
        listing = _run("ip", "netns", "list", check=False).stdout.split("\n")
        for line in listing:
            ns = line.split(" ", 1)[0].strip()
            if ns.startswith(NS_PREFIX):
                self._delete_ns(ns)
        links = _run("ip", "-o", "link", "show", check=False).stdout
        for line in links.splitlines():
            name = line.split(":", 2)[1].strip().split("@", 1)[0] if ":" in line else ""
            if name.startswith("kvjh") or name == BRIDGE:
                _run("ip", "link", "del", name, check=False)
        while _run("iptables", "-D", "FORWARD", *FORWARD_RULE, check=False).returncode == 0:
            pass

    def _delete_ns(self, ns: str) -> None:
        pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run("ip", "netns", "del", ns, check=False)

    def _setup_network(self, nodes: Sequence[_Node]) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self._bridge = True
        _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        if bridged_traffic_crosses_iptables():
            _run("iptables", "-I", "FORWARD", "1", *FORWARD_RULE)
            self._forward_rule = True
        for node in nodes:
            ns, veth = node.ns, node.veth
            _run("ip", "netns", "add", ns)
            self._created_ns.append(ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._created_veths.append(veth)
            _run("ip", "link", "set", veth, "master", BRIDGE, "up")
            inside = ("ip", "netns", "exec", ns)
            _run(*inside, "ip", "addr", "add", f"{node.ip}/24", "dev", "eth0")
            _run(*inside, "ip", "link", "set", "eth0", "up")
            _run(*inside, "ip", "link", "set", "lo", "up")
            for chain in ("KVJ-PART", "KVJ-LOSS"):
                _run(*inside, "iptables", "-N", chain)
                _run(*inside, "iptables", "-A", "INPUT", "-j", chain)
                _run(*inside, "iptables", "-A", "OUTPUT", "-j", chain)

    def _teardown_network(self) -> None:
        for veth in reversed(self._created_veths):
            _run("ip", "link", "del", veth, check=False)
        self._created_veths.clear()
        for ns in reversed(self._created_ns):
            self._delete_ns(ns)
        self._created_ns.clear()
        if self._forward_rule:
            _run("iptables", "-D", "FORWARD", *FORWARD_RULE, check=False)
            self._forward_rule = False
        if self._bridge:
            _run("ip", "link", "del", BRIDGE, check=False)
            self._bridge = False

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, node: _Node) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVCLUSTER_")}
        env.update(node.env)
        env["PYTHONUNBUFFERED"] = "1"
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(
                node.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        node.pid = node.proc.pid  # ip netns exec execs the node: same PID

    def _running(self, node: _Node) -> bool:
        if node.proc is not None and node.proc.poll() is not None:
            return False
        return dev.is_running(node.pid)

    def _signal(self, node: _Node, sig: signal.Signals) -> None:
        if self._running(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, sig)

    def _wait_exit(self, node: _Node, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self._running(node):
                return True
            time.sleep(0.02)
        return not self._running(node)

    def _exited(self, node_id: str) -> str | None:
        node = self._nodes[node_id]
        if self._running(node):
            return None
        return f"node {node.id} exited during start:\n{dev.tail(str(node.log))}"

    def _wait_ready(self, nodes: Sequence[str], timeout: float = 60.0) -> None:
        self._await_ready(nodes, timeout, exited=self._exited, status_timeout=0.5, interval=0.1)

    # -- hooks --------------------------------------------------------------------------

    def _start_cluster(self, nodes: int, settings: Mapping[str, Any]) -> list[str]:
        preflight()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._acquire()
        self._remove_leftovers()
        opts, n, r, w = replication(settings, nodes)
        ids = [f"n{i}" for i in range(1, nodes + 1)]
        ips = {f"n{i}": f"{SUBNET_PREFIX}.{10 + i}" for i in range(1, nodes + 1)}
        seeds = ",".join(f"{i}={ips[i]}:{PORT}" for i in ids)
        for i, node_id in enumerate(ids, start=1):
            home = self.workdir.resolve() / node_id
            home.mkdir(parents=True, exist_ok=True)
            ns = f"{NS_PREFIX}n{i}"
            argv = [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "kvcluster.server.main",
                "--node-id",
                node_id,
                "--listen",
                f"{ips[node_id]}:{PORT}",
                "--data-dir",
                str(home / "data"),
                "--seeds",
                seeds,
                "--metrics-listen",
                "off",
                "--n-val",
                str(n),
                "--r",
                str(r),
                "--w",
                str(w),
            ]
            self._nodes[node_id] = _Node(
                node_id,
                ns,
                ips[node_id],
                f"kvjh{i}",
                home / "data",
                home / "node.log",
                argv,
                settings_env(opts),
            )
        self._setup_network(list(self._nodes.values()))
        for node in self._nodes.values():
            self._spawn(node)
        self._wait_ready(ids)
        return ids

    def address(self, node: str) -> str:
        return f"{self._nodes[node].ip}:{PORT}"

    def _kill_node(self, node: str) -> None:
        n = self._nodes[node]
        self._signal(n, signal.SIGKILL)
        if not self._wait_exit(n, 10.0):
            raise HarnessError(f"node {node} (pid {n.pid}) did not die on SIGKILL")

    def _start_node(self, node: str) -> None:
        n = self._nodes[node]
        if self._running(n):
            return
        self._spawn(n)
        self._wait_ready([node])

    def _pause_node(self, node: str) -> None:
        self._signal(self._nodes[node], signal.SIGSTOP)

    def _resume_node(self, node: str) -> None:
        self._signal(self._nodes[node], signal.SIGCONT)

    def _iptables(self, node: _Node, chain: str, rules: list[list[str]]) -> None:
        inside = ("ip", "netns", "exec", node.ns, "iptables")
        _run(*inside, "-F", chain)
        for rule in rules:
            _run(*inside, "-A", chain, *rule)

    def _apply_faults(self, node: str, faults: NodeFaults) -> None:
        n = self._nodes[node]
        peers = [self._nodes[p] for p in sorted(self._nodes) if p != node]
        blocked = [self._nodes[b].ip for b in sorted(faults.blocked)]
        part = [r for ip in blocked for r in (["-s", ip, "-j", "DROP"], ["-d", ip, "-j", "DROP"])]
        self._iptables(n, "KVJ-PART", part)
        loss: list[list[str]] = []
        if faults.loss > 0:
            p = f"{faults.loss:.4f}"
            stat = ["-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP"]
            for peer in peers:
                loss += [["-s", peer.ip, *stat], ["-d", peer.ip, *stat]]
        self._iptables(n, "KVJ-LOSS", loss)
        set_inprocess_faults(self.address(node), faults.latency_and_clock())

    def _stop_cluster(self) -> None:
        try:
            nodes = list(self._nodes.values())
            for node in nodes:
                self._signal(node, signal.SIGCONT)
                self._signal(node, signal.SIGTERM)
            for node in nodes:
                if not self._wait_exit(node, 10.0):
                    self._signal(node, signal.SIGKILL)
                    self._wait_exit(node, 5.0)
                if node.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        node.proc.wait(timeout=1.0)
            self._teardown_network()
        finally:
            if self._lock_fh is not None:
                self._lock_fh.close()
                self._lock_fh = None

    def logs(self) -> dict[str, Path]:
        return {n.id: n.log for n in self._nodes.values()}
