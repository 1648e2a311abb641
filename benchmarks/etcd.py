"""The etcd peer: find (or install) etcd, run a 3-member cluster on loopback, generate stubs.

Stubs. ``benchmarks/etcdpb`` holds the subset of etcd's ``rpc.proto`` and
``kv.proto`` the benchmarks use (package ``etcdserverpb`` / ``mvccpb`` and
etcd's field numbers). :func:`generated_stubs` compiles them with grpc_tools
into a temporary directory at run time and removes it afterwards. Generating
at run time (rather than committing generated code) means there is nothing to
keep fresh - the repository's ``check-proto`` only covers ``proto/`` - nothing
for ruff and mypy to exclude, and it takes well under a second; grpc_tools is
already a dev dependency that ``make bench`` installs.

Cluster. :func:`etcd_cluster` starts ``members`` etcd processes with their own
data directories under a temporary directory, client and peer ports from
``base_port`` (23791..23796 for three members), etcd's defaults otherwise (it
fsyncs its WAL on every commit), waits for a leader, and on exit - normal,
exception or Ctrl-C - stops exactly the processes it started (by PID) and
removes the directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from benchmarks.drivers import load_etcd_stubs
from benchmarks.systems import keep_logs
from kvcluster.cli.dev import port_free, tail

PROTO_ROOT = Path(__file__).resolve().parent / "etcdpb"
PROTO_FILES = ("mvccpb/kv.proto", "etcdserverpb/rpc.proto")
DEFAULT_BASE_PORT = 23791  # members use base, base+1 (peer), base+2, ... inside 23790-23799


class EtcdError(Exception):
    """etcd could not be found, installed or started; the message says why."""


# -- stubs ----------------------------------------------------------------------------


def generate_stubs(out_dir: Path | str) -> Path:
    """Compile the etcd protos into ``out_dir`` (Python messages + gRPC stubs)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise EtcdError(f"protoc failed on {', '.join(PROTO_FILES)} in {PROTO_ROOT}")
    return out


@contextlib.contextmanager
def generated_stubs() -> Iterator[str]:
    """A temporary directory holding freshly generated etcd stubs; removed on exit."""
    directory = tempfile.mkdtemp(prefix="kvbench-etcdpb-")
    try:
        generate_stubs(directory)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the binary -----------------------------------------------------------------------


def find_etcd(binary: str | None = None, install: bool = True) -> str:
    """The etcd binary: ``binary``, else ``etcd`` on PATH, else apt-get install etcd-server."""
    if binary:
        if not os.access(binary, os.X_OK):
            raise EtcdError(f"{binary} is not an executable")
        return binary
    found = shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None
    )
    if found:
        return found
    if not install:
        raise EtcdError(
            "etcd not found: install it (apt-get install etcd-server) or pass --etcd-bin"
        )
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EtcdError(
            "etcd not found and cannot install it here (needs root and apt-get): "
            "install etcd-server or pass --etcd-bin"
        )
    print("etcd not found: apt-get install etcd-server ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "etcd-server"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise EtcdError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    found = shutil.which("etcd")
    if not found:
        raise EtcdError("etcd-server installed but no etcd binary on PATH")
    return found


def etcd_version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].replace("etcd Version:", "etcd").strip() if first else "etcd (unknown version)"


# -- the cluster ----------------------------------------------------------------------


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


@dataclass
class EtcdCluster:
    directory: Path
    binary: str
    version: str
    members: list[EtcdMember] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def pids(self) -> dict[str, int]:
        return {m.name: m.pid for m in self.members if m.proc is not None}


def stop(cluster: EtcdCluster, timeout: float = 10.0) -> None:
    """Stop every member this cluster started (SIGTERM, then SIGKILL), by PID.

    Popen signals only a child it has not reaped, so a recycled PID is never signalled."""
    running = [m.proc for m in cluster.members if m.proc is not None and m.proc.poll() is None]
    for proc in running:
        proc.terminate()
    for proc in running:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def wait_ready(cluster: EtcdCluster, stubs_dir: str, timeout: float = 30.0) -> None:
    """Wait until every member knows the leader and a linearizable read succeeds."""
    pb2, pb2_grpc = load_etcd_stubs(stubs_dir)
    end = time.monotonic() + timeout
    pending = list(cluster.members)
    while pending and time.monotonic() < end:
        for member in list(pending):
            if member.proc is not None and member.proc.poll() is not None:
                raise EtcdError(f"etcd member {member.name} exited:\n{tail(str(member.log), 10)}")
            with grpc.insecure_channel(member.endpoint) as channel:
                try:
                    status = pb2_grpc.MaintenanceStub(channel).Status(
                        pb2.StatusRequest(), timeout=1.0
                    )
                    if status.leader:
                        pb2_grpc.KVStub(channel).Range(
                            pb2.RangeRequest(key=b"kvbench-ready"), timeout=1.0
                        )
                        pending.remove(member)
                except grpc.RpcError:
                    pass
        if pending:
            time.sleep(0.1)
    if pending:
        names = ", ".join(m.name for m in pending)
        raise EtcdError(
            f"etcd {names} not ready after {timeout:g}s:\n"
            + "\n".join(tail(str(m.log), 10) for m in pending)
        )


@contextlib.contextmanager
def etcd_cluster(
    stubs_dir: str,
    members: int = 3,
    base_port: int = DEFAULT_BASE_PORT,
    binary: str | None = None,
    install: bool = True,
    extra_args: tuple[str, ...] = (),
    logs_to: Path | None = None,
    log_prefix: str = "",
) -> Iterator[EtcdCluster]:
    """A running etcd cluster on loopback for the duration of the ``with`` block.

    With ``logs_to`` the member logs are copied there before the directory is removed."""
    exe = find_etcd(binary, install)
    ports = [base_port + i for i in range(2 * members)]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        raise EtcdError(f"ports {busy} are in use: another etcd running? (--etcd-base-port)")
    directory = Path(tempfile.mkdtemp(prefix="kvbench-etcd-"))
    cluster = EtcdCluster(directory, exe, etcd_version(exe))
    try:
        for i in range(members):
            name = f"e{i + 1}"
            cluster.members.append(
                EtcdMember(
                    name=name,
                    client_port=ports[2 * i],
                    peer_port=ports[2 * i + 1],
                    data_dir=directory / name,
                    log=directory / f"{name}.log",
                )
            )
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in cluster.members)
        token = "kvbench-" + secrets.token_hex(4)
        env = dict(os.environ)
        if os.uname().machine not in ("x86_64", "amd64"):
            env["ETCD_UNSUPPORTED_ARCH"] = os.uname().machine  # etcd 3.4 refuses arm64 without it
        for m in cluster.members:
            client = f"http://127.0.0.1:{m.client_port}"
            peer = f"http://127.0.0.1:{m.peer_port}"
            argv = [
                exe,
                "--name", m.name,
                "--data-dir", str(m.data_dir),
                "--listen-client-urls", client,
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial,
                "--initial-cluster-token", token,
                "--initial-cluster-state", "new",
                *extra_args,
            ]  # fmt: skip
            with open(m.log, "ab") as log:
                m.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # our finally stops it, also after Ctrl-C
                )
        wait_ready(cluster, stubs_dir)
        yield cluster
    finally:
        try:
            stop(cluster)
            keep_logs({f"{log_prefix}etcd-{m.name}.log": m.log for m in cluster.members}, logs_to)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
