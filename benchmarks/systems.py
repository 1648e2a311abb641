"""Systems under test as context managers, and CPU accounting from /proc.

:func:`kvcluster_cluster` starts a dev cluster (``kvcluster.cli.dev``) in a
temporary directory on a free block of ports in 7700-7799 and always stops it
and removes its data, also on an exception or Ctrl-C; :func:`kvcluster_external`
wraps a cluster somebody else runs (``--nodes``). Both yield a
:class:`RunningSystem` with the node PIDs when known, so the runner can
charge server CPU time to each phase.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from kvcluster.cli import dev
from kvcluster.core.quorum import quorum_size

KV_PORT_RANGE = (7700, 7799)
METRICS_OFFSET = 1000  # the dev launcher puts each node's metrics on its port + 1000
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class RunningSystem:
    name: str  # "kvcluster" | "etcd"
    endpoints: list[str]
    pids: dict[str, int] = field(default_factory=dict)  # member name -> pid (when local)
    description: str = ""
    metrics: list[str] = field(default_factory=list)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind through the finally blocks that stop clusters


def stop_on_sigterm() -> None:
    """Make SIGTERM stop a benchmark like Ctrl-C, through the blocks that stop its clusters."""
    signal.signal(signal.SIGTERM, _interrupt)


def pick_base_port(nodes: int, lo: int = KV_PORT_RANGE[0], hi: int = KV_PORT_RANGE[1]) -> int:
    """The first base port in lo..hi (steps of 10) whose node and metrics ports are all free."""
    for base in range(lo + 1, hi - nodes + 2, 10):
        ports = [base + i for i in range(nodes)]
        if all(dev.port_free(p) and dev.port_free(p + METRICS_OFFSET) for p in ports):
            return base
    raise RuntimeError(f"no {nodes} free ports in {lo}-{hi}: other dev clusters running?")


def keep_logs(logs: Mapping[str, Path], to: Path | None) -> None:
    """Copy log files (``{name in to: log}``) to ``to`` before a data dir is removed."""
    if to is None:
        return
    to.mkdir(parents=True, exist_ok=True)
    for name, log in logs.items():
        with contextlib.suppress(OSError):
            shutil.copyfile(log, to / name)


@contextlib.contextmanager
def kvcluster_cluster(
    nodes: int = 3,
    base_port: int | None = None,
    settings: Mapping[str, Any] | None = None,
    n_val: int | None = None,
    r: int | None = None,
    w: int | None = None,
    logs_to: Path | None = None,
    log_prefix: str = "",
) -> Iterator[RunningSystem]:
    """A dev cluster of real node processes for the duration of the ``with`` block.

    With ``logs_to`` the node logs are copied there before the directory is removed."""
    base = base_port if base_port is not None else pick_base_port(nodes)
    directory = tempfile.mkdtemp(prefix="kvbench-kv-")
    try:
        cluster = dev.up(
            directory, nodes=nodes, base_port=base, n_val=n_val, r=r, w=w, settings=settings
        )
        n = n_val if n_val is not None else dev.default_n_val(nodes)
        quorum = quorum_size(n)
        yield RunningSystem(
            name="kvcluster",
            endpoints=cluster.addresses,
            pids={node.id: node.pid for node in cluster.nodes},
            description=(
                f"kvcluster {nodes} nodes, N={n} R={r or quorum} W={w or quorum}, synced LMDB"
            ),
            metrics=[node.metrics for node in cluster.nodes],
        )
    finally:
        try:
            with contextlib.suppress(dev.DevError):
                dev.down(directory)
            logs = sorted(Path(directory).glob("*/node.log"))
            keep_logs({f"{log_prefix}{log.parent.name}-{log.name}": log for log in logs}, logs_to)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def kvcluster_external(addresses: Sequence[str]) -> Iterator[RunningSystem]:
    yield RunningSystem(
        name="kvcluster",
        endpoints=list(addresses),
        description=f"kvcluster at {', '.join(addresses)} (external, not started here)",
    )


def kvcluster_system(
    nodes: str | None,
    cluster_nodes: int = 3,
    base_port: int | None = None,
    logs_to: Path | None = None,
    log_prefix: str = "",
) -> contextlib.AbstractContextManager[RunningSystem]:
    """The running cluster at ``nodes`` (``HOST:PORT,...``: --nodes), else a new dev cluster."""
    if nodes:
        return kvcluster_external(nodes.split(","))
    return kvcluster_cluster(cluster_nodes, base_port, logs_to=logs_to, log_prefix=log_prefix)


# -- CPU accounting -------------------------------------------------------------------


def stat_cpu_seconds(stat: Path) -> float | None:
    """User + system CPU seconds from a ``/proc/<pid>[/task/<tid>]/stat`` file, None if gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), None if gone."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def self_cpu_seconds() -> float:
    """User + system CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in parts[:8]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    busy = user + nice + system + irq + softirq + steal
    return busy / _CLK_TCK, (busy + idle + iowait) / _CLK_TCK


class CpuMeter:
    """CPU used by given processes and by the whole machine between start() and stop()."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._procs: dict[str, float | None] = {}
        self._machine = (0.0, 0.0)
        self._load0 = 0.0

    def start(self) -> None:
        self._procs = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_cpu_seconds()
        self._load0 = os.getloadavg()[0]

    def stop(self) -> dict[str, Any]:
        per: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            now, before = process_cpu_seconds(pid), self._procs.get(name)
            per[name] = None if now is None or before is None else round(now - before, 3)
        busy, total = machine_cpu_seconds()
        busy0, total0 = self._machine
        known = [v for v in per.values() if v is not None]
        return {
            "server_cpu_s": round(sum(known), 3) if known else None,
            "server_cpu_by_process": per,
            "machine_busy_s": round(busy - busy0, 3),
            "machine_cpu_s": round(total - total0, 3),
            "loadavg_1m": [round(self._load0, 2), round(os.getloadavg()[0], 2)],
        }


def fsync_latency_ms(directory: str | None = None, rounds: int = 30) -> float:
    """Median time (ms) to write 4 KiB and fdatasync it, in a temp dir on the data disk."""
    with tempfile.TemporaryDirectory(prefix="kvbench-fsync-", dir=directory) as tmp:
        path = Path(tmp) / "probe"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            times = []
            block = os.urandom(4096)
            for i in range(rounds):
                t = time.perf_counter()
                os.pwrite(fd, block, i * 4096)
                os.fdatasync(fd)
                times.append(time.perf_counter() - t)
        finally:
            os.close(fd)
    times.sort()
    return 1000 * times[len(times) // 2]


def machine_description() -> str:
    cpus = os.cpu_count() or 0
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_gb = int(first.split()[1]) / 1024 / 1024
    return (
        f"{cpus} vCPU {model}, {mem_gb:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def machine_summary() -> str:
    """The machine and its disk's fdatasync latency: the first line of every benchmark's output."""
    return f"{machine_description()}; disk fdatasync(4 KiB) p50 {fsync_latency_ms():.2f} ms"
