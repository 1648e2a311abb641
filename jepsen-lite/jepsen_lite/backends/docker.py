"""The ``docker`` backend: one kvcluster container per node.

Layout (``<run>`` is unique per run, so runs never collide)::

    host (the harness and its clients)
      └── bridge network jl-<run>, subnet 10.78.X.0/24 (first free X)
            ├── container jl-<run>-n1  10.78.X.11, node n1 on :7101
            ├── container jl-<run>-n2  10.78.X.12, node n2 on :7101
            └── ...

Every node advertises its container IP, which the host reaches directly over
the bridge (Linux): the harness's clients use the advertised addresses, as the
Backend protocol asks, and no port is published. Data lives in one named volume
per node, removed with the containers (the node logs are saved first).

Faults:

- kill: ``docker kill`` (SIGKILL to the node, PID 1 of the container); start:
  ``docker start`` (same IP, same volume); pause / resume: ``docker pause`` /
  ``docker unpause`` (cgroup freezer);
- partitions and packet loss: iptables rules on the *host*, in a chain of this
  run jumped to from Docker's ``DOCKER-USER`` chain: with ``br_netfilter`` (which
  Docker's bridge networks rely on) container-to-container packets cross the
  host's FORWARD chain, where a rule ``-s A -d B -j DROP`` cuts the link A->B and
  the ``statistic`` match drops a fraction of a node's packets. Host-to-container
  traffic (the clients) never crosses FORWARD, so clients always reach every
  node, as in Jepsen; no capability or iptables binary is needed in the image.
  Without root, ``DOCKER-USER`` or ``bridge-nf-call-iptables`` the backend falls
  back to in-process blocking and loss (``Admin.SetFaults``) and says so;
- latency and clock offset: in-process (``Admin.SetFaults``; no netem here).

The image is ``$JEPSEN_LITE_DOCKER_IMAGE`` (default ``kvcluster:latest``; build it
with ``scripts/build-image.sh [--local-base]``). Everything a run creates carries
the label ``org.jepsen-lite.run=<run>`` and is removed by :meth:`stop`;
leftovers of a run whose harness process died are removed at the next start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jepsen_lite.backends.base import (
    Backend,
    NodeFaults,
    bridged_traffic_crosses_iptables,
    replication,
    set_inprocess_faults,
    settings_env,
)
from jepsen_lite.errors import HarnessError

__all__ = ["DockerBackend", "preflight"]

IMAGE_ENV = "JEPSEN_LITE_DOCKER_IMAGE"
DEFAULT_IMAGE = "kvcluster:latest"
PORT = 7101
SUBNET_BASE = "10.78"
LABEL = "org.jepsen-lite.run"
PID_LABEL = "org.jepsen-lite.pid"
HOST_LABEL = "org.jepsen-lite.host"
CHAIN_PREFIX = "JL-"
HOOK_CHAIN = "DOCKER-USER"
#: hang guards for single docker commands (never performance assertions)
DOCKER_TIMEOUT = 120.0
#: per kind of object a run creates: how to list them, the format of their labels, how
#: to remove one
_OBJECTS = {
    "container": (("docker", "ps", "-aq"), "{{json .Config.Labels}}", ("docker", "rm", "-f", "-v")),
    "network": (("docker", "network", "ls", "-q"), "{{json .Labels}}", ("docker", "network", "rm")),
    "volume": (("docker", "volume", "ls", "-q"), "{{json .Labels}}", ("docker", "volume", "rm")),
}


def _run(
    *argv: str, check: bool = True, timeout: float = DOCKER_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{' '.join(argv)} hung for {timeout:g}s") from None
    if check and proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise HarnessError(f"{' '.join(argv)} failed: {msg}")
    return proc


def preflight() -> None:
    """HarnessError unless the docker CLI exists and the engine answers."""
    if shutil.which("docker") is None:
        raise HarnessError("the docker backend needs the docker CLI and a running engine")
    info = _run("docker", "info", "--format", "{{.ServerVersion}}", check=False, timeout=60)
    if info.returncode != 0 or not info.stdout.strip():
        err = (info.stderr.strip() or "no answer").splitlines()[-1]
        raise HarnessError(f"the Docker engine is not reachable: {err}")


def _host_iptables_usable() -> str | None:
    """None if partitions can be host iptables rules, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("iptables") is None:
        return "no iptables on the host"
    if not bridged_traffic_crosses_iptables():
        return "bridged traffic does not cross iptables (bridge-nf-call-iptables is off)"
    if _run("iptables", "-L", HOOK_CHAIN, "-n", check=False).returncode != 0:
        return f"no {HOOK_CHAIN} chain (Docker's iptables integration is off)"
    return None


def _drop_chains(chains: Sequence[str]) -> None:
    """Flush, then delete, these iptables chains (no chain still jumps to another)."""
    for chain in chains:
        _run("iptables", "-F", chain, check=False)
    for chain in chains:
        _run("iptables", "-X", chain, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, workdir: Path, image: str | None = None) -> None:
        super().__init__(workdir)
        self.image = image or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
        self.run_id = uuid.uuid4().hex[:8]
        self.network = f"jl-{self.run_id}"
        self.chain = f"{CHAIN_PREFIX}{self.run_id}"
        self._ips: dict[str, str] = {}
        self._containers: dict[str, str] = {}
        self._volumes: list[str] = []
        self._network_created = False
        self._chains: list[str] = []
        self._hooked = False
        self._subnet: ipaddress.IPv4Network | None = None
        #: why faults on the network are in-process (None: host iptables)
        self.inprocess_reason: str | None = None

    # -- helpers ---------------------------------------------------------------------

    def _labels(self) -> list[str]:
        return [
            *("--label", f"{LABEL}={self.run_id}"),
            *("--label", f"{PID_LABEL}={os.getpid()}"),
            *("--label", f"{HOST_LABEL}={socket.gethostname()}"),
        ]

    def _node_chain(self, node: str) -> str:
        return f"{self.chain}-{node}"

    def _remove_leftovers(self) -> None:
        """Containers, networks and volumes of runs whose harness process is gone
        (started on this host, by a PID that no longer exists)."""
        stale: set[str] = set()
        host = socket.gethostname()
        for kind, (ls, fmt, rm) in _OBJECTS.items():
            for obj in _run(*ls, "--filter", f"label={LABEL}", check=False).stdout.split():
                raw = _run("docker", kind, "inspect", "--format", fmt, obj, check=False).stdout
                try:
                    labels = json.loads(raw or "{}") or {}
                    pid = int(labels.get(PID_LABEL, "0"))
                except (ValueError, TypeError):
                    continue
                if pid and labels.get(HOST_LABEL) == host and not _pid_alive(pid):
                    stale.add(labels.get(LABEL, ""))
                    _run(*rm, obj, check=False)
        if stale and self.inprocess_reason is None:
            rules = _run("iptables", "-S", HOOK_CHAIN, check=False).stdout.splitlines()
            for run_id in sorted(s for s in stale if s):
                chain = f"{CHAIN_PREFIX}{run_id}"
                if any(f"-j {chain}" in r for r in rules):
                    _run("iptables", "-D", HOOK_CHAIN, "-j", chain, check=False)
                self._delete_chains_of(chain)

    def _delete_chains_of(self, chain: str) -> None:
        listing = _run("iptables", "-S", check=False).stdout.splitlines()
        names = [line.split()[1] for line in listing if line.startswith("-N ")]
        _drop_chains(sorted((n for n in names if n == chain or n.startswith(chain + "-")), key=len))

    def _create_network(self) -> None:
        routes = _run("ip", "-4", "route", check=False).stdout if shutil.which("ip") else ""
        last = ""
        for third in range(256):
            subnet = ipaddress.IPv4Network(f"{SUBNET_BASE}.{third}.0/24")
            if f"{SUBNET_BASE}.{third}." in routes:
                continue
            proc = _run(
                "docker",
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                str(subnet),
                "--gateway",
                str(subnet.network_address + 1),
                *self._labels(),
                self.network,
                check=False,
            )
            if proc.returncode == 0:
                self._subnet = subnet
                self._network_created = True
                return
            last = proc.stderr.strip()
            if "overlap" not in last and "in use" not in last:
                break
        raise HarnessError(f"cannot create the docker network {self.network}: {last}")

    def _setup_iptables(self, ids: Sequence[str]) -> None:
        _run("iptables", "-N", self.chain)
        self._chains.append(self.chain)
        for node in ids:
            chain = self._node_chain(node)
            _run("iptables", "-N", chain)
            self._chains.append(chain)
            _run("iptables", "-A", self.chain, "-j", chain)
        _run("iptables", "-I", HOOK_CHAIN, "1", "-j", self.chain)
        self._hooked = True

    def _teardown_iptables(self) -> None:
        if self._hooked:
            while _run("iptables", "-D", HOOK_CHAIN, "-j", self.chain, check=False).returncode == 0:
                pass
            self._hooked = False
        _drop_chains(self._chains[::-1])
        self._chains.clear()

    def _inspect_state(self, node: str) -> dict[str, Any]:
        raw = _run(
            "docker", "inspect", "--format", "{{json .State}}", self._containers[node]
        ).stdout
        state: dict[str, Any] = json.loads(raw)
        return state

    def _exited(self, node: str) -> str | None:
        state = self._inspect_state(node)
        if state.get("Running"):
            return None
        return (
            f"node {node} exited during start (exit {state.get('ExitCode')}):\n"
            f"{self._log_tail(node)}"
        )

    def _wait_ready(self, nodes: Sequence[str], timeout: float = 90.0) -> None:
        self._await_ready(nodes, timeout, exited=self._exited, status_timeout=0.5)

    def _log_tail(self, node: str, lines: int = 30) -> str:
        proc = _run("docker", "logs", "--tail", str(lines), self._containers[node], check=False)
        return (proc.stdout + proc.stderr).strip()

    def _save_logs(self) -> None:
        for node, container in self._containers.items():
            path = self.workdir / node / "node.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as fh:
                subprocess.run(
                    ["docker", "logs", "--timestamps", container],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=DOCKER_TIMEOUT,
                    check=False,
                )

    # -- hooks -----------------------------------------------------------------------------

    def _start_cluster(self, nodes: int, settings: Mapping[str, Any]) -> list[str]:
        preflight()
        if _run("docker", "image", "inspect", self.image, check=False).returncode != 0:
            raise HarnessError(
                f"docker image {self.image} not found: build it with "
                f"scripts/build-image.sh [--local-base] (or set {IMAGE_ENV})"
            )
        self.inprocess_reason = _host_iptables_usable()
        if self.inprocess_reason is not None:
            print(
                f"jepsen-lite: docker backend: partitions and loss in-process "
                f"({self.inprocess_reason})",
                file=sys.stderr,
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        opts, n, r, w = replication(settings, nodes)
        ids = [f"n{i}" for i in range(1, nodes + 1)]
        self._remove_leftovers()
        self._create_network()
        assert self._subnet is not None
        base = self._subnet.network_address
        self._ips = {node: str(base + 10 + i) for i, node in enumerate(ids, start=1)}
        if self.inprocess_reason is None:
            self._setup_iptables(ids)
        seeds = ",".join(f"{node}={self._ips[node]}:{PORT}" for node in ids)
        env = {
            **settings_env(opts),
            "KVCLUSTER_SEEDS": seeds,
            "KVCLUSTER_METRICS_LISTEN": "off",
            "KVCLUSTER_N_VAL": str(n),
            "KVCLUSTER_R": str(r),
            "KVCLUSTER_W": str(w),
        }
        for node in ids:
            volume = f"{self.network}-{node}"
            _run("docker", "volume", "create", *self._labels(), volume)
            self._volumes.append(volume)
            node_env = {
                **env,
                "KVCLUSTER_NODE_ID": node,
                "KVCLUSTER_LISTEN": f"0.0.0.0:{PORT}",
                "KVCLUSTER_ADVERTISE": f"{self._ips[node]}:{PORT}",
            }
            env_args = [a for k, v in sorted(node_env.items()) for a in ("-e", f"{k}={v}")]
            proc = _run(
                "docker",
                "run",
                "--detach",
                "--name",
                f"{self.network}-{node}",
                "--hostname",
                node,
                "--network",
                self.network,
                "--ip",
                self._ips[node],
                "--volume",
                f"{volume}:/var/lib/kvcluster",
                "--restart",
                "no",
                "--stop-timeout",
                "10",
                *self._labels(),
                *env_args,
                self.image,
            )
            self._containers[node] = proc.stdout.strip()
        self._wait_ready(ids)
        return ids

    def address(self, node: str) -> str:
        try:
            return f"{self._ips[node]}:{PORT}"
        except KeyError:
            raise HarnessError(f"unknown node {node!r}") from None

    def _kill_node(self, node: str) -> None:
        _run("docker", "kill", "--signal", "KILL", self._containers[node], check=False)
        end = time.monotonic() + 30.0
        while self._inspect_state(node).get("Running"):
            if time.monotonic() > end:
                raise HarnessError(f"container of {node} still running after docker kill")
            time.sleep(0.1)

    def _start_node(self, node: str) -> None:
        if not self._inspect_state(node).get("Running"):
            _run("docker", "start", self._containers[node])
        self._wait_ready([node])

    def _pause_node(self, node: str) -> None:
        _run("docker", "pause", self._containers[node])

    def _resume_node(self, node: str) -> None:
        _run("docker", "unpause", self._containers[node])

    def _apply_faults(self, node: str, faults: NodeFaults) -> None:
        if self.inprocess_reason is not None:
            set_inprocess_faults(self.address(node), faults)
            return
        me = self._ips[node]
        rules = [["-s", me, "-d", self._ips[b], "-j", "DROP"] for b in sorted(faults.blocked)]
        if faults.loss > 0:
            stat = ["-m", "statistic", "--mode", "random", "--probability", f"{faults.loss:.4f}"]
            subnet = str(self._subnet)
            rules += [
                ["-s", me, "-d", subnet, *stat, "-j", "DROP"],
                ["-s", subnet, "-d", me, *stat, "-j", "DROP"],
            ]
        chain = self._node_chain(node)
        _run("iptables", "-F", chain)
        for rule in rules:
            _run("iptables", "-A", chain, *rule)
        set_inprocess_faults(self.address(node), faults.latency_and_clock())

    def _stop_cluster(self) -> None:
        try:
            self._save_logs()
        finally:
            for container in self._containers.values():
                _run("docker", "rm", "--force", container, check=False)
            for volume in self._volumes:
                _run("docker", "volume", "rm", "--force", volume, check=False)
            self._volumes.clear()
            self._containers.clear()
            if self._network_created:
                _run("docker", "network", "rm", self.network, check=False)
                self._network_created = False
            with contextlib.suppress(HarnessError):
                self._teardown_iptables()

    def logs(self) -> dict[str, Path]:
        return {node: self.workdir / node / "node.log" for node in self._ips}
