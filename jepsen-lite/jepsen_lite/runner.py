"""One test run: start the cluster, run workers and nemesis, heal, check, report.

Phases (each logged in ``nemesis.jsonl`` as a ``phase`` event):

1. ``setup``: the backend starts N nodes and waits until they are ready;
2. ``workload``: ``concurrency`` worker threads record operations for
   ``time_limit`` seconds while the nemesis plays its seeded schedule;
3. ``heal``: workers stop, the current fault is undone, then *every* fault (paused
   nodes resumed, killed nodes started, partitions, loss, latency, clocks);
4. ``drain``: wait until no node holds hints (Admin ``Status.hints_pending``);
5. ``repair``: anti-entropy on every node (``Admin.Repair``, as ``kvctl cluster repair``);
6. ``final-reads``: the workload reads every key once more, r = all;
7. ``replicas``: every owner's own copy of every key, for the convergence checker;
8. ``check``: the workload's checkers; ``results.json`` and ``report.html``.

Files in the output directory: ``run.json`` (configuration, schedule, timings),
``history.jsonl``, ``nemesis.jsonl``, ``replicas.json``, ``results.json``,
``report.html`` and ``cluster/`` (node logs; data directories are removed unless
``keep_data``).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jepsen_lite.backends import Backend, ReplicaStates, make_backend
from jepsen_lite.errors import HarnessError
from jepsen_lite.history import HistoryRecorder, Op, Validity, dump_jsonl, load_jsonl
from jepsen_lite.nemesis import EventLog, NemesisRunner, make_schedule, parse_nemeses
from jepsen_lite.workloads import WorkloadOptions, workload_class
from jepsen_lite.workloads.base import SafeRetryPolicy, WorkerContext, Workload
from kvcluster import Client

__all__ = ["UNSAFE", "RunConfig", "check_dir", "exit_code", "run"]

UNSAFE = {"ack-before-w": "unsafe_ack_before_w", "lww": "unsafe_lww"}
FINAL_PROCESS_BASE = 1_000_000
MAX_ANOMALIES = 1000


@dataclass
class RunConfig:
    out: Path
    backend: str = "local"
    nodes: int = 3
    workload: str = "set"
    nemeses: list[str] = field(default_factory=lambda: ["partition", "kill", "pause"])
    time_limit: float = 60.0
    seed: int = 1
    concurrency: int = 8
    unsafe: list[str] = field(default_factory=list)
    strict: bool = True
    client_timeout: float = 2.0
    settings: dict[str, Any] = field(default_factory=dict)  # extra node settings
    workload_options: dict[str, Any] = field(default_factory=dict)
    drain_timeout: float = 60.0
    keep_data: bool = False

    def validate(self) -> None:
        if not 1 <= self.nodes <= 9:
            raise HarnessError(f"--nodes must be within 1..9, got {self.nodes}")
        if not 1 <= self.concurrency <= 64:
            raise HarnessError(f"--concurrency must be within 1..64, got {self.concurrency}")
        if not 0 < self.time_limit <= 24 * 3600:
            raise HarnessError(f"--time-limit must be within 0..86400 s, got {self.time_limit}")
        unknown = [u for u in self.unsafe if u not in UNSAFE]
        if unknown:
            raise HarnessError(f"unknown --unsafe {unknown} (choose from {', '.join(UNSAFE)})")
        try:
            parse_nemeses(",".join(self.nemeses))
        except ValueError as exc:
            raise HarnessError(str(exc)) from None
        workload_class(self.workload)

    def node_settings(self, workload: Workload) -> dict[str, Any]:
        settings: dict[str, Any] = {"aae_interval": 15.0}
        settings.update(workload.node_settings())
        for u in self.unsafe:
            settings[UNSAFE[u]] = True
        settings.update(self.settings)
        return settings

    def workload_opts(self) -> WorkloadOptions:
        return WorkloadOptions(
            concurrency=self.concurrency,
            seed=self.seed,
            strict=self.strict,
            client_timeout=self.client_timeout,
            extra=dict(self.workload_options),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ----------------------------------------------------------------------------- helpers


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _say(msg: str) -> None:
    print(f"jepsen-lite: {msg}", file=sys.stderr, flush=True)


def exit_code(valid: Validity) -> int:
    """0 valid, 1 anomalies found, 2 no verdict (``unknown``)."""
    if valid is True:
        return 0
    if valid is False:
        return 1
    return 2


def op_counts(history: Sequence[Op]) -> dict[str, dict[str, int]]:
    """``{f: {ok, fail, info, invoke}}`` (an invocation without completion is ``info``)."""
    counts: dict[str, Counter[str]] = {}
    open_: dict[int, str] = {}
    for op in history:
        c = counts.setdefault(op.f, Counter())
        if op.type == "invoke":
            open_[op.process] = op.f
            c["invoke"] += 1
        else:
            open_.pop(op.process, None)
            c[op.type] += 1
    for f in open_.values():
        counts[f]["info"] += 1
    return {f: {k: int(c[k]) for k in ("invoke", "ok", "fail", "info")} for f, c in counts.items()}


def _trim(anomaly: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(anomaly)
    for name, limit in (("reads", 3), ("ops", 12)):
        items = out.get(name)
        if isinstance(items, list) and len(items) > limit:
            out[name] = items[:limit]
            out[f"{name}_total"] = len(items)
    return out


# ----------------------------------------------------------------------------- checking


def check_dir(out: Path, *, write: bool = True) -> dict[str, Any]:
    """Check the saved history of a run (``run.json``, ``history.jsonl``,
    ``replicas.json``) and write ``results.json``; returns the results."""
    try:
        run_info = json.loads((out / "run.json").read_text())
    except FileNotFoundError:
        raise HarnessError(f"{out} has no run.json: not a jepsen-lite run directory") from None
    config = run_info["config"]
    history = load_jsonl(out / "history.jsonl")
    replicas: ReplicaStates | None = None
    rpath = out / "replicas.json"
    if rpath.exists():
        replicas = ReplicaStates.from_dict(json.loads(rpath.read_text()))
    wclass = workload_class(config["workload"])
    options = WorkloadOptions.from_dict(run_info["workload_options"])
    started = time.monotonic()
    outcome = wclass.check(history, replicas, options)
    harness = run_info.get("harness", {})
    valid = outcome.valid
    problems = list(harness.get("problems", []))
    if problems and valid is True:
        valid = "unknown"
    anomalies = [_trim(a) for a in outcome.anomalies]
    results: dict[str, Any] = {
        "valid": valid,
        "verdict": "valid" if valid is True else "invalid" if valid is False else "unknown",
        "workload": config["workload"],
        "backend": config["backend"],
        "nodes": config["nodes"],
        "nemeses": config["nemeses"],
        "unsafe": config["unsafe"],
        "seed": config["seed"],
        "time_limit": config["time_limit"],
        "summary": outcome.summary,
        "operation_counts": op_counts(history),
        "anomaly_count": len(anomalies),
        "anomaly_kinds": dict(Counter(f"{a.get('checker')}:{a.get('kind')}" for a in anomalies)),
        "anomalies": anomalies[:MAX_ANOMALIES],
        "anomalies_truncated": max(0, len(anomalies) - MAX_ANOMALIES),
        "checkers": outcome.checkers,
        "harness_problems": problems,
        "harness_warnings": list(harness.get("warnings", [])),
        "check_seconds": round(time.monotonic() - started, 3),
    }
    if write:
        _write_json(out / "results.json", results)
    return results


# ----------------------------------------------------------------------------- running


class _Workers:
    def __init__(
        self,
        workload: Workload,
        recorder: HistoryRecorder,
        addresses: list[str],
        config: RunConfig,
    ) -> None:
        self.workload = workload
        self.recorder = recorder
        self.addresses = addresses
        self.config = config
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(i,), name=f"worker-{i}", daemon=True)
            for i in range(config.concurrency)
        ]

    def context(
        self, worker: int, client: Client, base: int = 0, stop: threading.Event | None = None
    ) -> WorkerContext:
        return WorkerContext(
            worker=worker,
            concurrency=self.config.concurrency if base == 0 else 1,
            recorder=self.recorder,
            client=client,
            rng=random.Random(f"jepsen-lite-worker-{self.config.seed}-{worker}-{base}"),
            stop=self.stop if stop is None else stop,
            base=base,
        )

    def client(self) -> Client:
        return Client(self.addresses, timeout=self.config.client_timeout, retry=SafeRetryPolicy())

    def _run(self, worker: int) -> None:
        try:
            with self.client() as client:
                self.workload.run_worker(self.context(worker, client))
        except Exception:
            self.errors.append(f"worker {worker} crashed:\n{traceback.format_exc()}")

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> list[str]:
        self.stop.set()
        end = time.monotonic() + timeout
        stuck = []
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
            if t.is_alive():
                stuck.append(t.name)
        return stuck


def _drain(backend: Backend, timeout: float) -> dict[str, Any]:
    start = time.monotonic()
    last: dict[str, int | None] = {}
    while time.monotonic() - start < timeout:
        last = backend.hints_pending()
        if all(v == 0 for v in last.values()):
            return {"drained": True, "seconds": round(time.monotonic() - start, 2)}
        time.sleep(0.5)
    return {"drained": False, "seconds": round(time.monotonic() - start, 2), "pending": last}


def _progress(recorder: HistoryRecorder, log: EventLog) -> str:
    ops = recorder.history
    c = Counter(op.type for op in ops)
    active = {e["fault"]: e for e in log.events if e["type"] == "start"}
    for e in log.events:
        if e["type"] == "end":
            active.pop(e["fault"], None)
    faults = ", ".join(f"{e['kind']} {','.join(e.get('nodes', []))}" for e in active.values())
    return f"ok {c['ok']} fail {c['fail']} info {c['info']}" + (
        f" | nemesis: {faults}" if faults else ""
    )


def run(config: RunConfig, say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run one test; returns the results (also written to ``config.out``)."""
    config.validate()
    out = config.out
    if out.exists() and any(out.iterdir()):
        raise HarnessError(f"output directory {out} is not empty")
    backend = make_backend(config.backend, out / "cluster")  # checks root, tools, ...
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic_ns()

    def clock() -> int:
        return time.monotonic_ns() - t0

    log = EventLog(out / "nemesis.jsonl", clock)
    workload = workload_class(config.workload)(config.workload_opts())
    recorder = HistoryRecorder(clock)
    settings = config.node_settings(workload)
    run_info: dict[str, Any] = {
        "config": config.to_dict(),
        "workload_options": config.workload_opts().to_dict(),
        "node_settings": settings,
        "argv": sys.argv,
        "started_unix": time.time(),
        "timings": {},
        "harness": {"problems": [], "warnings": []},
    }
    # problems make a verdict impossible (a worker crashed); warnings weaken the test
    # without invalidating what was checked (a fault or a repair could not be done)
    problems: list[str] = run_info["harness"]["problems"]
    warnings: list[str] = run_info["harness"]["warnings"]
    timings: dict[str, float] = run_info["timings"]
    _write_json(out / "run.json", run_info)
    workers: _Workers | None = None
    nemesis: NemesisRunner | None = None
    replicas: ReplicaStates | None = None

    def phase(name: str) -> None:
        timings[name] = round((time.monotonic_ns() - t0) / 1e9, 3)
        log.phase(name)
        say(f"[{timings[name]:7.1f}s] {name}")

    try:
        phase("setup")
        backend.start(config.nodes, settings)
        run_info["nodes"] = {n: backend.address(n) for n in backend.node_ids}
        run_info["logs"] = {n: str(p) for n, p in backend.logs().items()}
        schedule = make_schedule(config.nemeses, backend.node_ids, config.time_limit, config.seed)
        run_info["schedule"] = [f.to_dict() for f in schedule]
        _write_json(out / "run.json", run_info)

        phase("workload")
        workers = _Workers(workload, recorder, backend.addresses, config)
        nemesis = NemesisRunner(backend, schedule, log, time.monotonic())
        nemesis.start()
        workers.start()
        end = time.monotonic() + config.time_limit
        while (left := end - time.monotonic()) > 0:
            workers.stop.wait(min(10.0, left))
            say(f"  {_progress(recorder, log)}")
        stuck = workers.join(config.client_timeout * 4 + 10.0)
        if stuck:
            problems.append(f"workers still busy after the time limit: {', '.join(stuck)}")
        problems.extend(workers.errors)

        phase("heal")
        nemesis.stop()
        warnings.extend(f"nemesis: {e}" for e in nemesis.errors)
        for attempt in range(3):
            try:
                actions = backend.heal()
                backend.wait_ready(timeout=60.0)
                log.emit("note", heal=actions)
                break
            except HarnessError as exc:
                if attempt == 2:
                    raise
                log.emit("note", heal_error=str(exc))
                time.sleep(2.0)

        phase("drain")
        drain = _drain(backend, config.drain_timeout)
        run_info["harness"]["drain"] = drain
        log.emit("note", drain=drain)

        phase("repair")
        repairs: dict[str, Any] = {}
        for node in backend.node_ids:
            try:
                repairs[node] = backend.repair(node)
            except Exception as exc:
                repairs[node] = {"error": str(exc)}
                warnings.append(f"repair on {node} failed: {exc}")
        run_info["harness"]["repair"] = repairs

        phase("final-reads")
        with workers.client() as client:
            ctx = workers.context(0, client, base=FINAL_PROCESS_BASE, stop=threading.Event())
            workload.final_reads(ctx)

        phase("replicas")
        replicas = backend.replica_states(workload.keys())
        _write_json(out / "replicas.json", replicas.to_dict())
    finally:
        if workers is not None:
            workers.stop.set()
        if nemesis is not None and nemesis.is_alive():
            nemesis.stop(timeout=30.0)
        dump_jsonl(recorder.history, out / "history.jsonl")
        try:
            backend.stop()
        finally:
            if not config.keep_data:
                for node_dir in (out / "cluster").glob("n*"):
                    shutil.rmtree(node_dir / "data", ignore_errors=True)
            timings["stopped"] = round((time.monotonic_ns() - t0) / 1e9, 3)
            _write_json(out / "run.json", run_info)

    phase("check")
    _write_json(out / "run.json", run_info)
    results = check_dir(out)
    log.close()
    from jepsen_lite.report import write_report

    write_report(out)
    return results
