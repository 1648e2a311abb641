"""Local development clusters: real node processes on loopback (like ccm / devrel).

``up`` starts N ``kvcluster-node`` processes in the background and records
them in ``<dir>/cluster.json``: a ``nodes`` list with each node's ``id``,
``address``, ``pid``, ``data_dir``, ``log`` and the command that started it,
so ``restart`` can start it again the same way. Every other verb acts only on
the PIDs recorded there, and only after checking that the PID still runs a
kvcluster node (a recycled PID is never signalled).

This module is the launcher shared by ``kvctl dev``, the integration tests,
the benchmarks and jepsen-lite.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvcluster.core.quorum import quorum_size
from kvcluster.wire.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_DIR = Path(".kvcluster") / "dev"
STATE_FILE = "cluster.json"


class DevError(Exception):
    """A launcher operation failed; the message says why and what to do."""


@dataclass
class DevNode:
    id: str
    address: str
    pid: int
    data_dir: str
    log: str
    metrics: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@dataclass
class DevCluster:
    dir: Path
    nodes: list[DevNode]

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def node(self, node_id: str) -> DevNode:
        for n in self.nodes:
            if node_id in (n.id, n.address):
                return n
        known = ", ".join(n.id for n in self.nodes)
        raise DevError(f"no node {node_id!r} in {self.dir / STATE_FILE} (nodes: {known})")

    def save(self) -> None:
        data = {"nodes": [asdict(n) for n in self.nodes]}
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.dir / STATE_FILE)

    @staticmethod
    def load(directory: Path | str) -> DevCluster:
        path = Path(directory) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DevError(
                f"no cluster in {directory}: run 'kvctl dev up --dir {directory}'"
            ) from None
        except ValueError as exc:
            raise DevError(f"{path} is corrupt: {exc}") from None
        return DevCluster(Path(directory), [DevNode(**n) for n in data["nodes"]])


# -- processes ------------------------------------------------------------------------


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could listen on ``host:port`` now (TIME_WAIT leftovers do
    not count: the check binds with SO_REUSEADDR, as the node, gRPC and etcd do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def default_n_val(nodes: int) -> int:
    """N when none is given: 3 replicas, or every node of a smaller cluster (R and W
    then default to a quorum of it). Benchmarks and jepsen-lite use the same rule."""
    return min(3, nodes)


def is_running(pid: int, data_dir: str | None = None) -> bool:
    """True if ``pid`` is a live (not zombie) kvcluster node process.

    With ``data_dir``, only if it is the node of that data directory: a PID
    recycled by another cluster's node (other tests, other users of the
    machine) is not ours to signal.
    """
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except PermissionError:
        return True
    if not cmdline and state != "Z":
        # A process that has just exec'd has no cmdline for a moment (so `restart`
        # saw its own new node as "exited during start"); kernel threads have none
        # either, but they also have no executable.
        try:
            os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return False
        return True
    if data_dir is not None and b"\0" + data_dir.encode() + b"\0" not in b"\0" + cmdline:
        return False
    return state != "Z" and b"kvcluster" in cmdline


def _alive(node: DevNode) -> bool:
    """Whether ``node``'s recorded process is still that node (see :func:`is_running`)."""
    return is_running(node.pid, node.data_dir)


def _signal(node: DevNode, sig: signal.Signals) -> bool:
    if not _alive(node):
        return False
    try:
        os.kill(node.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_exit(node: DevNode, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(node):
            return True
        time.sleep(0.02)
    return not _alive(node)


def _spawn(node: DevNode) -> int:
    Path(node.data_dir).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **node.env, "PYTHONUNBUFFERED": "1"}
    with open(node.log, "ab") as log:
        proc = subprocess.Popen(
            node.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives the launcher, not killed by its ^C
        )
    return proc.pid


def node_status(address: str, timeout: float = 1.0) -> admin_pb2.StatusResponse | None:
    """The node's Admin.Status, or None if it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            return admin_pb2_grpc.AdminStub(channel).Status(
                admin_pb2.StatusRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return None


def wait_ready(
    cluster: DevCluster, nodes: Iterable[DevNode] | None = None, timeout: float = 30.0
) -> None:
    """Wait until the nodes answer and have an agreed ring; DevError with log tails if not."""
    pending = list(nodes if nodes is not None else cluster.nodes)
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        for node in list(pending):
            if not _alive(node):
                raise DevError(f"node {node.id} exited during start:\n{tail(node.log)}")
            status = node_status(node.address, timeout=0.5)
            # the node id guards against another process answering on that port
            if status is not None and status.ready and status.node_id == node.id:
                pending.remove(node)
        if pending:
            time.sleep(0.1)
    if pending:
        names = ", ".join(n.id for n in pending)
        raise DevError(
            f"{names} not ready after {timeout:g}s:\n" + "\n".join(tail(n.log) for n in pending)
        )


def tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"  ({path} missing)"
    return "\n".join(f"  {line}" for line in text)


# -- verbs ---------------------------------------------------------------------------


def up(
    directory: Path | str = DEFAULT_DIR,
    nodes: int = 3,
    base_port: int = 7101,
    n_val: int | None = None,
    r: int | None = None,
    w: int | None = None,
    settings: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    timeout: float = 30.0,
) -> DevCluster:
    """Start ``nodes`` node processes on 127.0.0.1:base_port.. and wait until ready.

    ``settings`` are extra node settings (``{"request_timeout": 2}`` becomes
    ``--request-timeout 2``). N defaults to min(3, nodes), R and W to a quorum.
    """
    if not 1 <= nodes <= 64:
        raise DevError(f"--nodes must be 1..64, got {nodes}")
    directory = Path(directory)
    # (the refusal is raised outside the suppress block: inside, it was swallowed,
    # and a second `up` overwrote cluster.json and orphaned the running nodes)
    running: list[str] = []
    with contextlib.suppress(DevError):
        existing = DevCluster.load(directory)
        running = [n.id for n in existing.nodes if _alive(n)]
    if running:
        raise DevError(
            f"a cluster is already running in {directory} ({', '.join(running)}): "
            f"'kvctl dev down --dir {directory}' first"
        )
    directory.mkdir(parents=True, exist_ok=True)
    n = n_val if n_val is not None else default_n_val(nodes)
    quorum = quorum_size(n)
    ids = [f"n{i + 1}" for i in range(nodes)]
    addresses = [f"127.0.0.1:{base_port + i}" for i in range(nodes)]
    seeds = ",".join(f"{i}={a}" for i, a in zip(ids, addresses, strict=True))
    extra: list[str] = []
    for key, value in sorted((settings or {}).items()):
        extra += [f"--{key.replace('_', '-')}", str(value)]
    cluster = DevCluster(directory.resolve(), [])
    for node_id, address in zip(ids, addresses, strict=True):
        home = cluster.dir / node_id
        home.mkdir(parents=True, exist_ok=True)
        metrics = f"127.0.0.1:{int(address.rsplit(':', 1)[1]) + 1000}"
        argv = [
            sys.executable, "-m", "kvcluster.server.main",
            "--node-id", node_id,
            "--listen", address,
            "--data-dir", str(home / "data"),
            "--seeds", seeds,
            "--metrics-listen", metrics,
            "--n-val", str(n),
            "--r", str(r if r is not None else quorum),
            "--w", str(w if w is not None else quorum),
            *extra,
        ]  # fmt: skip
        cluster.nodes.append(
            DevNode(
                id=node_id,
                address=address,
                pid=0,
                data_dir=str(home / "data"),
                log=str(home / "node.log"),
                metrics=metrics,
                argv=argv,
                env=dict(env or {}),
            )
        )
    for node in cluster.nodes:
        node.pid = _spawn(node)
    cluster.save()
    if wait:
        try:
            wait_ready(cluster, timeout=timeout)
        except DevError:
            down(cluster.dir)
            raise
    return cluster


def status(directory: Path | str = DEFAULT_DIR) -> list[dict[str, Any]]:
    cluster = DevCluster.load(directory)
    out: list[dict[str, Any]] = []
    for node in cluster.nodes:
        running = _alive(node)
        st = node_status(node.address, timeout=0.5) if running else None
        out.append(
            {
                "id": node.id,
                "address": node.address,
                "pid": node.pid,
                "running": running,
                "ready": bool(st and st.ready),
                "keys": int(st.keys) if st else None,
                "hints_pending": int(st.hints_pending) if st else None,
                "data_dir": node.data_dir,
                "log": node.log,
            }
        )
    return out


def kill(directory: Path | str, node_id: str, sig: signal.Signals = signal.SIGKILL) -> DevNode:
    cluster = DevCluster.load(directory)
    node = cluster.node(node_id)
    if not _signal(node, sig):
        raise DevError(f"node {node.id} is not running")
    if sig in (signal.SIGKILL, signal.SIGTERM):
        _wait_exit(node, 10.0)
    return node


def pause(directory: Path | str, node_id: str) -> DevNode:
    return kill(directory, node_id, signal.SIGSTOP)


def resume(directory: Path | str, node_id: str) -> DevNode:
    return kill(directory, node_id, signal.SIGCONT)


def restart(
    directory: Path | str, node_id: str, wait: bool = True, timeout: float = 30.0
) -> DevNode:
    """Stop the node if it runs (SIGTERM, then SIGKILL), start it again, wait until ready."""
    cluster = DevCluster.load(directory)
    node = cluster.node(node_id)
    if _alive(node):
        _signal(node, signal.SIGCONT)
        _signal(node, signal.SIGTERM)
        if not _wait_exit(node, 10.0):
            _signal(node, signal.SIGKILL)
            _wait_exit(node, 5.0)
    node.pid = _spawn(node)
    cluster.save()
    if wait:
        wait_ready(cluster, [node], timeout=timeout)
    return node


def down(directory: Path | str = DEFAULT_DIR, clean: bool = False, timeout: float = 10.0) -> int:
    """Stop every node (SIGTERM, SIGKILL after ``timeout``); with ``clean`` remove the data.

    Returns the number of processes that were running."""
    cluster = DevCluster.load(directory)
    running = [n for n in cluster.nodes if _alive(n)]
    for node in running:
        _signal(node, signal.SIGCONT)  # a paused node cannot act on SIGTERM
        _signal(node, signal.SIGTERM)
    for node in running:
        if not _wait_exit(node, timeout):
            _signal(node, signal.SIGKILL)
            _wait_exit(node, 5.0)
    if clean:
        import shutil

        shutil.rmtree(cluster.dir, ignore_errors=True)
    return len(running)


# -- in-process faults (no root needed; see kvcluster.net.faults) -------------------------


def set_faults(
    address: str,
    *,
    blocked: Iterable[str] = (),
    loss: float = 0.0,
    delay_ms: tuple[float, float] = (0.0, 0.0),
    clock_offset_ms: int = 0,
    timeout: float = 2.0,
) -> admin_pb2.Faults:
    """Replace the faults injected in the node at ``address`` (defaults heal it)."""
    request = admin_pb2.Faults(
        blocked=sorted(blocked),
        loss=loss,
        delay_ms_min=delay_ms[0],
        delay_ms_max=delay_ms[1],
        clock_offset_ms=clock_offset_ms,
    )
    with grpc.insecure_channel(address) as channel:
        try:
            return admin_pb2_grpc.AdminStub(channel).SetFaults(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise DevError(f"{address}: cannot set faults: {exc.details()}") from None


def partition(directory: Path | str, groups: list[list[str]]) -> dict[str, list[str]]:
    """Cut the cluster into ``groups`` of node ids (nodes not named form one more group).

    Each node blocks every node outside its group; returns node -> blocked."""
    cluster = DevCluster.load(directory)
    ids = [n.id for n in cluster.nodes]
    named = {i for g in groups for i in g}
    unknown = sorted(named - set(ids))
    if unknown:
        raise DevError(f"unknown nodes {', '.join(unknown)} (nodes: {', '.join(ids)})")
    rest = [i for i in ids if i not in named]
    all_groups = [list(g) for g in groups] + ([rest] if rest else [])
    blocked: dict[str, list[str]] = {}
    for node in cluster.nodes:
        mine = next(g for g in all_groups if node.id in g)
        blocked[node.id] = [i for i in ids if i not in mine]
        set_faults(node.address, blocked=blocked[node.id])
    return blocked


def heal(directory: Path | str) -> int:
    """Remove every injected fault from every running node; returns nodes healed."""
    cluster = DevCluster.load(directory)
    healed = 0
    for node in cluster.nodes:
        if _alive(node):
            set_faults(node.address)
            healed += 1
    return healed
