"""YCSB-style workloads against kvcluster and, with ``--vs etcd``, the same workloads against etcd.

    .venv/bin/python -m benchmarks.ycsb --vs etcd --out .bench/latest

For each system (and each ``--repeat``) it starts a fresh 3-node cluster
(kvcluster: N=3 R=2 W=2 with synced writes, its defaults; etcd: 3 members with
etcd's defaults, which fsync), then runs, through the same load generator and
client stack (grpc.aio):

1. load: inserts ``--records`` records (YCSB's hashed ``user<n>`` keys);
2. the workloads (default A, B, C, F), each bounded by ``--ops`` and ``--duration``,
   keys chosen with YCSB's scrambled zipfian (seeded);
3. batches: ``put_many`` / ``get_many`` of ``--batch-size`` distinct keys
   (etcd: one Txn of up to 128 puts / ranges) - reported in keys/s.

Closed loop at ``--concurrency`` by default. With ``--target-rate`` the
workload phases run open loop: calls start on a fixed schedule and latency is
measured from each call's intended start (coordinated omission corrected).

Outputs: a table of medians over repetitions with kvcluster/etcd ratios, the
issue's targets, and with ``--out DIR`` results.json (every run, with encoded
HdrHistograms), results.png (throughput and latency percentile spectra) and
table.txt. ``--profile DIR`` attaches py-spy to each kvcluster node during
workload A (a profiled run's numbers are not benchmark numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import etcd as etcd_mod
from benchmarks import profiling, report
from benchmarks.drivers import DriverSpec
from benchmarks.suite import PhaseHook, run_phases
from benchmarks.systems import RunningSystem, kvcluster_system, machine_summary, stop_on_sigterm
from benchmarks.workloads import BATCH_KINDS, WORKLOADS, Phase, workload
from benchmarks.zipf import DISTRIBUTIONS

LOAD_PHASE = "load"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ycsb",
        description="YCSB workloads A/B/C/F (+ batches) on kvcluster, optionally vs etcd",
    )
    p.add_argument("--vs", choices=["etcd"], help="also run the same workload against etcd")
    p.add_argument("--only", choices=["kvcluster", "etcd"], help="run one system only")
    p.add_argument(
        "--workloads", default="A,B,C,F", help=f"comma-separated, from {','.join(WORKLOADS)}"
    )
    p.add_argument("--records", type=int, default=5000, help="records loaded (default 5000)")
    p.add_argument("--value-size", type=int, default=1000, help="bytes per record (YCSB: 1000)")
    p.add_argument("--concurrency", type=int, default=64, help="callers (default 64)")
    p.add_argument("--target-rate", type=float, help="open loop at this many calls/s")
    p.add_argument("--max-inflight", type=int, default=1024, help="open loop: in-flight cap")
    p.add_argument("--ops", type=int, default=100_000, help="max calls per workload phase")
    p.add_argument("--duration", type=float, default=15.0, help="max seconds per workload phase")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per phase")
    p.add_argument("--load-duration", type=float, default=120.0, help="max seconds for the load")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="zipfian")
    p.add_argument("--no-batch", dest="batch", action="store_false", help="skip batch phases")
    p.add_argument("--batch-size", type=int, default=100, help="keys per batch call")
    p.add_argument("--batch-concurrency", type=int, default=4, help="batch calls in flight")
    p.add_argument("--batch-duration", type=float, default=10.0, help="max seconds per batch phase")
    p.add_argument("--batch-ops", type=int, default=5000, help="max batch calls per phase")
    p.add_argument("--procs", type=int, default=1, help="client processes (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="runs per system; tables show medians")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0, help="request timeout (s)")
    p.add_argument("--nodes", help="use this running kvcluster (HOST:PORT,...) instead")
    p.add_argument("--cluster-nodes", type=int, default=3, help="kvcluster nodes to start")
    p.add_argument("--base-port", type=int, help="kvcluster first port (default: free, 7701..)")
    p.add_argument("--kv-blind", action="store_true", help="kvcluster updates without context")
    p.add_argument(
        "--kv-pipeline",
        action="store_true",
        help="kvcluster single-key calls pipelined on one stream per node",
    )
    p.add_argument("--etcd-bin", help="etcd binary (default: PATH, else apt-get install)")
    p.add_argument("--no-install", dest="install", action="store_false")
    p.add_argument("--etcd-base-port", type=int, default=etcd_mod.DEFAULT_BASE_PORT)
    p.add_argument("--etcd-endpoints", help="use this running etcd (HOST:PORT,...) instead")
    p.add_argument("--etcd-serializable", action="store_true", help="etcd serializable reads")
    p.add_argument(
        "--etcd-rmw",
        choices=["txn", "put"],
        default="txn",
        help="F on etcd: Range + Txn compare mod_revision (default) or Range + Put",
    )
    p.add_argument("--out", type=Path, help="directory for results.json, results.png, table.txt")
    p.add_argument("--keep-logs", action="store_true", help="copy node/etcd logs to --out/logs")
    p.add_argument("--profile", type=Path, help="py-spy each kvcluster node during workload A")
    p.add_argument("--profile-phase", default="A", help="phase to profile (default A)")
    p.add_argument("--py-spy", help="py-spy binary (default: PATH or /tmp/pyspy-venv/bin/py-spy)")
    p.add_argument("--native", action="store_true", help="py-spy --native (C/Cython frames)")
    p.add_argument("--gil", action="store_true", help="py-spy --gil (only samples holding the GIL)")
    return p.parse_args(argv)


def build_phases(args: argparse.Namespace) -> list[Phase]:
    common: dict[str, Any] = {
        "records": args.records,
        "value_size": args.value_size,
        "distribution": args.distribution,
        "seed": args.seed,
    }
    phases = [
        Phase(
            name=LOAD_PHASE,
            kind="load",
            ops=args.records,
            duration=args.load_duration,
            concurrency=args.concurrency,
            **common,
        )
    ]
    for given in args.workloads.split(","):
        name = given.strip().upper()
        if not name:
            continue
        phases.append(
            Phase(
                name=name,
                kind="mix",
                mix=dict(workload(name)),
                ops=args.ops,
                duration=args.duration,
                warmup=args.warmup,
                concurrency=args.concurrency,
                target_rate=args.target_rate,
                max_inflight=args.max_inflight,
                **common,
            )
        )
    if args.batch:
        for kind in BATCH_KINDS:
            phases.append(
                Phase(
                    name=f"{kind}x{args.batch_size}",
                    kind=kind,
                    ops=args.batch_ops,
                    duration=args.batch_duration,
                    warmup=args.warmup,
                    concurrency=args.batch_concurrency,
                    batch_size=args.batch_size,
                    **common,
                )
            )
    return phases


@contextlib.contextmanager
def start_system(
    name: str, args: argparse.Namespace, stubs_dir: str | None, rep: int
) -> Iterator[RunningSystem]:
    """System ``name`` for run ``rep``: the one named on the command line, else a fresh cluster."""
    logs = args.out / "logs" if args.keep_logs and args.out else None
    prefix = f"run{rep}-"
    if name == "kvcluster":
        with kvcluster_system(
            args.nodes, args.cluster_nodes, args.base_port, logs_to=logs, log_prefix=prefix
        ) as system:
            yield system
    elif args.etcd_endpoints:
        endpoints = args.etcd_endpoints.split(",")
        yield RunningSystem("etcd", endpoints, description=f"etcd at {args.etcd_endpoints}")
    else:
        assert stubs_dir is not None
        with etcd_mod.etcd_cluster(
            stubs_dir,
            3,
            args.etcd_base_port,
            args.etcd_bin,
            args.install,
            logs_to=logs,
            log_prefix=prefix,
        ) as cluster:
            yield RunningSystem(
                "etcd",
                cluster.endpoints,
                pids=cluster.pids,
                description=f"{cluster.version}, 3 members, defaults (fsync on commit)",
            )


def driver_spec(
    system: RunningSystem, args: argparse.Namespace, stubs_dir: str | None
) -> DriverSpec:
    """How the load generator's workers reach ``system``, with its command-line options."""
    endpoints = tuple(system.endpoints)
    if system.name == "kvcluster":
        options = {"blind": args.kv_blind, "pipeline": args.kv_pipeline}
        return DriverSpec("kvcluster", endpoints, args.timeout, options=options)
    options = {"serializable": args.etcd_serializable, "rmw": args.etcd_rmw}
    return DriverSpec("etcd", endpoints, args.timeout, stubs_dir, options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    systems = ["kvcluster"] + (["etcd"] if args.vs else [])
    if args.only:
        systems = [args.only]
    try:
        phases = build_phases(args)
    except ValueError as exc:
        print(f"ycsb: {exc}", file=sys.stderr)
        return 2
    console = report.console()
    hook: PhaseHook | None = None
    profiler: profiling.PySpyHook | None = None
    if args.profile:
        chosen = {p.name for p in phases if p.name.lower() == args.profile_phase.lower()}
        if not chosen:
            names = ", ".join(p.name for p in phases)
            print(f"ycsb: no phase {args.profile_phase!r} to profile ({names})", file=sys.stderr)
            return 2
        try:
            py_spy = profiling.find_py_spy(args.py_spy)
        except RuntimeError as exc:
            print(f"ycsb: {exc}", file=sys.stderr)
            return 2
        profiler = profiling.PySpyHook(
            py_spy, args.profile, chosen, native=args.native, gil=args.gil
        )
        hook = profiler
    machine = machine_summary()
    runs: list[dict[str, Any]] = []
    descriptions: dict[str, str] = {}
    console.print(f"[bold]machine[/]: {machine}")
    mode = (
        f"open loop at {args.target_rate:g} calls/s"
        if args.target_rate
        else f"closed loop, concurrency {args.concurrency}"
    )
    console.print(
        f"[bold]workloads[/]: {args.workloads}, {args.records} records x {args.value_size} B, "
        f"{args.distribution}, {mode}, {args.procs} client process(es), {args.repeat} run(s)"
    )
    started = time.time()
    try:
        with contextlib.ExitStack() as stack:
            stubs_dir = (
                stack.enter_context(etcd_mod.generated_stubs()) if "etcd" in systems else None
            )
            for rep in range(1, args.repeat + 1):
                for name in systems:
                    with start_system(name, args, stubs_dir, rep) as system:
                        spec = driver_spec(system, args, stubs_dir)
                        descriptions[name] = system.description
                        console.print(f"[bold]run {rep}/{args.repeat}: {system.description}[/]")
                        if profiler is not None:
                            profiler.label = f"run{rep}-"
                        results = run_phases(
                            system,
                            spec,
                            phases,
                            procs=args.procs,
                            on_result=lambda r: console.print(report.one_line(r)),
                            hook=hook if name == "kvcluster" else None,
                        )
                    runs.append({"rep": rep, "system": name, "results": results})
    except KeyboardInterrupt:
        print("ycsb: interrupted; clusters stopped", file=sys.stderr)
        return 130
    except etcd_mod.EtcdError as exc:
        print(f"ycsb: {exc}", file=sys.stderr)
        return 1
    finally:
        if profiler is not None:
            profiler.stop()

    summary = report.summarise(runs)
    tables: list[Table] = [report.comparison_table(summary), report.cpu_table(summary)]
    checks: list[dict[str, Any]] = []
    if "kvcluster" in summary and "etcd" in summary and "A" in summary["kvcluster"]:
        checks = report.targets(summary, "A", LOAD_PHASE)
        tables.append(report.targets_table(checks))
    for table in tables:
        console.print(table)
    if profiler is not None:
        profiler.write_summaries()
        console.print(
            f"profiles in {args.profile}: <node>.svg flamegraphs, <node>.summary.txt, "
            "all-nodes.summary.txt"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "machine": machine,
            "systems": descriptions,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "started": started,
            "elapsed_s": round(time.time() - started, 1),
            "summary": summary,
            "targets": checks,
            "runs": runs,
        }
        (args.out / "results.json").write_text(json.dumps(doc, indent=1))
        title = f"{' vs '.join(systems)} - {mode} - {machine.split(',', maxsplit=1)[0]}"
        report.plot(summary, args.out / "results.png", title)
        with open(args.out / "table.txt", "w") as f:
            plain = Console(file=f, width=200, highlight=False, color_system=None)
            plain.print(f"machine: {machine}")
            for name, d in descriptions.items():
                plain.print(f"{name}: {d}")
            for table in tables:
                plain.print(table)
        console.print(f"results in {args.out}/ (results.json, results.png, table.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
