"""A load generator: put and get throughput and latency at chosen concurrencies.

    .venv/bin/python -m benchmarks.load --concurrency 1,16,64 --ops 20000 --duration 15

Starts a 3-node dev cluster (N=3 R=2 W=2, synced writes) on free ports in
7700-7799 and removes it afterwards, unless ``--nodes`` names a running
cluster. For each concurrency it runs a put phase (``--keys`` keys written in
order, then again with the context last written) and a get phase (keys chosen
uniformly or with YCSB's zipfian), each bounded by ``--ops`` and
``--duration``, and prints calls/s and p50/p99/p999 latency. Closed loop by
default; ``--target-rate`` makes it open loop (latency from the intended start).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report
from benchmarks.drivers import DriverSpec
from benchmarks.suite import run_phases
from benchmarks.systems import kvcluster_system, machine_summary, stop_on_sigterm
from benchmarks.workloads import Phase
from benchmarks.zipf import DISTRIBUTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="put/get load against a kvcluster (starts a 3-node dev cluster unless --nodes)",
    )
    p.add_argument("--nodes", help="HOST:PORT[,...] of a running cluster (default: start one)")
    p.add_argument("--cluster-nodes", type=int, default=3, help="nodes to start (default 3)")
    p.add_argument("--base-port", type=int, help="first node port (default: free block 7701..)")
    p.add_argument("--concurrency", default="16", help="comma-separated concurrencies (default 16)")
    p.add_argument("--ops", type=int, default=20_000, help="max calls per phase (default 20000)")
    p.add_argument("--duration", type=float, default=15.0, help="max seconds per phase")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds not measured (default 1)")
    p.add_argument("--keys", type=int, default=10_000, help="key space (default 10000)")
    p.add_argument("--value-size", type=int, default=100, help="value bytes (default 100)")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="uniform")
    p.add_argument("--procs", type=int, default=1, help="client processes (default 1)")
    p.add_argument("--target-rate", type=float, help="open loop: calls/s over all clients")
    p.add_argument("--timeout", type=float, default=5.0, help="request timeout (s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="fresh-cluster runs; table shows medians")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        print("load: --concurrency must list positive integers", file=sys.stderr)
        return 2
    phases: list[Phase] = []
    for c in levels:
        common: dict[str, Any] = {
            "ops": args.ops,
            "duration": args.duration,
            "warmup": args.warmup,
            "concurrency": c,
            "records": args.keys,
            "value_size": args.value_size,
            "distribution": args.distribution,
            "target_rate": args.target_rate,
            "seed": args.seed,
        }
        phases.append(Phase(name=f"put c={c}", kind="put", **common))
        phases.append(Phase(name=f"get c={c}", kind="get", **common))
    console = report.console()
    machine = machine_summary()
    console.print(f"machine: {machine}")
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(1, args.repeat + 1):
            with kvcluster_system(args.nodes, args.cluster_nodes, args.base_port) as system:
                console.print(f"[bold]run {rep}/{args.repeat}: {system.description}[/]")
                spec = DriverSpec("kvcluster", tuple(system.endpoints), timeout=args.timeout)
                results = run_phases(
                    system,
                    spec,
                    phases,
                    procs=args.procs,
                    on_result=lambda r: console.print(report.one_line(r)),
                )
            runs.append({"rep": rep, "system": "kvcluster", "results": results})
    except KeyboardInterrupt:
        print("load: interrupted; cluster stopped", file=sys.stderr)
        return 130
    if args.repeat == 1:
        console.print(report.load_table(runs[0]["results"]))
    else:
        console.print(report.load_summary_table(report.summarise(runs)["kvcluster"]))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
