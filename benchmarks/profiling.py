"""Where the node processes spend CPU: py-spy attached to every node during a phase.

py-spy is not a project dependency: install it outside the repository, e.g.

    python3 -m venv /tmp/pyspy-venv && /tmp/pyspy-venv/bin/pip install py-spy

and pass ``--py-spy /tmp/pyspy-venv/bin/py-spy`` (or put it on PATH). For each
node the hook records a flamegraph (``<node>.svg``) and collapsed stacks
(``<node>.txt``), and :func:`summarise` turns the collapsed stacks into a
top-N table by self and inclusive time plus a breakdown by component
(gRPC, protobuf, asyncio, kvcluster modules, ...). Samples of idle threads are
excluded (py-spy's default), so percentages are of the time the process was
running Python (or, with ``--native``, native) code.

Without ``--native`` the time spent inside a C extension (grpc's Cython core,
upb protobuf, lmdb, msgpack) is charged to the Python function that called
it, so "self" time of e.g. ``codec.py:decode`` includes msgpack's C decoder.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.systems import RunningSystem, stat_cpu_seconds
from benchmarks.workloads import Phase

DEFAULT_PY_SPY = ("py-spy", "/tmp/pyspy-venv/bin/py-spy")


def find_py_spy(path: str | None) -> str:
    candidates = [path] if path else list(DEFAULT_PY_SPY)
    for c in candidates:
        found = shutil.which(c) if c else None
        if found:
            return found
    raise RuntimeError(
        "py-spy not found: python3 -m venv /tmp/pyspy-venv && "
        "/tmp/pyspy-venv/bin/pip install py-spy, then --py-spy /tmp/pyspy-venv/bin/py-spy"
    )


@dataclass
class PySpyHook:
    """Attach py-spy to every node of the system during the phases named in ``phases``."""

    py_spy: str
    out_dir: Path
    phases: set[str]
    rate: int = 100
    native: bool = False
    gil: bool = False
    label: str = ""
    _started: float = 0.0
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _threads: dict[Path, tuple[int, dict[int, float]]] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)

    def before(self, phase: Phase, system: RunningSystem) -> None:
        if phase.name not in self.phases or not system.pids:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        seconds = max(1, int(phase.duration))
        for node, pid in sorted(system.pids.items()):
            stem = self.out_dir / f"{self.label}{system.name}-{phase.name}-{node}"
            common = [
                self.py_spy, "record", "--pid", str(pid), "--rate", str(self.rate),
                "--duration", str(seconds),
            ]  # fmt: skip
            if self.native:
                common.append("--native")  # needs py-spy to pause the process per sample
            else:
                common.append("--nonblocking")
            if self.gil:
                common.append("--gil")
            runs = [
                [*common, "--format", "raw", "--nolineno", "--threads", "-o", f"{stem}.txt"],
                [*common, "--format", "flamegraph", "-o", f"{stem}.svg"],
            ]
            for argv in runs:
                log = open(f"{stem}.py-spy.log", "ab")  # noqa: SIM115 - closed with the process
                try:
                    self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
                finally:
                    log.close()
            self.outputs.append(Path(f"{stem}.txt"))
            self._threads[Path(f"{stem}.threads.json")] = (pid, thread_cpu_seconds(pid))
        self._started = time.monotonic()

    def after(self, phase: Phase, system: RunningSystem) -> None:
        """Record per-thread CPU; wait for the recorders (they stop after the phase's duration)."""
        if phase.name not in self.phases:
            return
        elapsed = time.monotonic() - self._started
        for path, (pid, before) in self._threads.items():
            now = thread_cpu_seconds(pid)
            delta = {tid: round(now[tid] - before.get(tid, 0.0), 3) for tid in now}
            doc = {
                "pid": pid,
                "window_s": round(elapsed, 3),
                "cpu_s": delta,
                "comm": thread_names(pid),
            }
            path.write_text(json.dumps(doc))
        self._threads.clear()
        self.stop(wait=phase.duration + 30.0)

    def stop(self, wait: float = 0.0) -> None:
        for proc in self._procs:
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    proc.wait(10.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5.0)
        self._procs = []

    def write_summaries(self) -> None:
        """``<node>.summary.txt`` for every recorded node and ``all-nodes.summary.txt``."""
        raws = [raw for raw in self.outputs if raw.exists()]
        for raw in raws:
            write_summary(raw)
        if raws:
            write_summary(merge_raw(raws, self.out_dir / "all-nodes.txt"), top=40)


def thread_names(pid: int) -> dict[int, str]:
    """OS thread names (``comm``) of ``pid``'s threads: grpc's C threads name themselves."""
    out: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                out[int(task.name)] = (task / "comm").read_text().strip()
    return out


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User+system CPU seconds of every thread of ``pid`` (from /proc/<pid>/task)."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            cpu = stat_cpu_seconds(task / "stat")
            if cpu is not None:
                out[int(task.name)] = cpu
    return out


# -- summarising collapsed stacks --------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")

#: (component, predicate on "file:function") - first match wins; checked on the leaf frame.
COMPONENTS: list[tuple[str, re.Pattern[str]]] = [
    ("grpc (python + cython)", re.compile(r"(^|/)grpc/|cygrpc|grpc_core|grpc_|_cython")),
    ("protobuf", re.compile(r"google/protobuf|upb|_pb2")),
    ("msgpack", re.compile(r"msgpack")),
    ("lmdb", re.compile(r"(^|/)lmdb|mdb_")),
    ("prometheus_client", re.compile(r"prometheus_client")),
    ("asyncio event loop", re.compile(r"asyncio/|selectors\.py|uvloop")),
    ("threading / concurrent", re.compile(r"threading\.py|concurrent/|queue\.py")),
    ("logging", re.compile(r"logging/")),
]


def frame_key(frame: str) -> str:
    """``func (path)`` -> ``path:func`` (paths shortened to the package part by py-spy)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('file')}:{m.group('func')}"


def component(key: str) -> str:
    m = re.search(r"kvcluster/([a-z_]+)/([a-z_]+)\.py", key)
    if m:
        return f"kvcluster.{m.group(1)}.{m.group(2)}"
    for name, pattern in COMPONENTS:
        if pattern.search(key):
            return name
    if re.search(r"python3\.\d+/|<frozen", key):
        return "python stdlib"
    return "other"


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        stacks.append((stack.split(";"), n))
    return stacks


def summarise(path: Path, top: int = 25) -> dict[str, Any]:
    """Self / inclusive top functions and a component breakdown of one py-spy raw file."""
    stacks = parse_collapsed(path.read_text(errors="replace").splitlines())
    total = sum(n for _, n in stacks)
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    components: Counter[str] = Counter()
    # kvcluster functions charged with everything below them, by the deepest kvcluster frame
    kv_deepest: Counter[str] = Counter()
    for stack, n in stacks:
        thread = next((f for f in stack if f.startswith("thread ")), "thread ?")
        frames = [f for f in stack if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        threads[thread] += n
        keys = [frame_key(f) for f in frames]
        leaf = keys[-1]
        self_time[leaf] += n
        components[component(leaf)] += n
        for k in set(keys):
            inclusive[k] += n
        kv = [k for k in keys if "kvcluster/" in k]
        if kv:
            kv_deepest[kv[-1]] += n

    def pct(counter: Counter[str], limit: int) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(limit)]

    # Exact CPU per thread over the same window, from /proc (names from py-spy's thread frames).
    thread_cpu: list[tuple[str, float]] = []
    threads_file = path.with_suffix(".threads.json")
    if threads_file.exists():
        data = json.loads(threads_file.read_text())
        names = {
            int(m.group(1)): m.group(2)
            for m in (re.match(r"thread \((\d+)\): (.*)", t) for t in threads)
            if m
        }
        comm = {int(k): v for k, v in data.get("comm", {}).items()}
        window = float(data["window_s"]) or 1.0
        cpu = sorted(((float(v), int(k)) for k, v in data["cpu_s"].items()), reverse=True)
        thread_cpu = [
            (
                f"{names.get(tid, comm.get(tid, '?'))} (tid {tid}): {v:.2f} s",
                round(100.0 * v / window, 1),
            )
            for v, tid in cpu
            if v > 0
        ]

    return {
        "thread_cpu_pct_of_one_core": thread_cpu,
        "file": str(path),
        "samples": total,
        "threads": pct(threads, 10),
        "components": pct(components, 30),
        "self": pct(self_time, top),
        "inclusive": pct(inclusive, top * 2),
        "kvcluster_deepest": pct(kv_deepest, top),
    }


def render(summary: dict[str, Any]) -> str:
    """Plain-text report of :func:`summarise` (what gets pasted into an issue)."""
    out = [f"{summary['file']}: {summary['samples']} samples"]
    for title, key in (
        ("CPU by thread, % of one core (from /proc)", "thread_cpu_pct_of_one_core"),
        ("threads", "threads"),
        ("by component (leaf frame)", "components"),
        ("top self time", "self"),
        ("top inclusive time", "inclusive"),
        ("deepest kvcluster frame (kvcluster code + the libraries it calls)", "kvcluster_deepest"),
    ):
        out.append(f"  {title}:")
        out += [f"    {p:5.1f}%  {k}" for k, p in summary.get(key, [])]
    return "\n".join(out)


def write_summary(raw: Path, top: int = 25) -> None:
    """:func:`render` of :func:`summarise` next to ``raw``, as ``<raw stem>.summary.txt``."""
    raw.with_suffix(".summary.txt").write_text(render(summarise(raw, top)) + "\n")


def merge_raw(paths: Iterable[Path], out: Path) -> Path:
    """Concatenate several collapsed-stack files (e.g. all nodes) into one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as dst:
        for p in paths:
            dst.write(p.read_text(errors="replace"))
    return out
