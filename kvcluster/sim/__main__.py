"""Replay one simulated cluster run: ``python -m kvcluster.sim --seed N [--nodes 5] [--trace]``.

Prints the fault schedule as applied, a summary of the history, every problem
the checkers found and the verdict; exits 0 when the run is valid, 1 when it
is not. The same seed (and options) always replays the same run, in any
process (``--digest`` prints a hash of the history and final state to compare).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from jepsen_lite.checkers.register import FINAL

from kvcluster.sim.cluster import RunResult, WorkloadConfig, run_cluster, sim_settings

_DEFAULTS = WorkloadConfig()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvcluster.sim",
        description="Run one deterministic whole-cluster simulation and check it.",
    )
    p.add_argument("--seed", type=int, required=True, help="the run's seed")
    p.add_argument("--nodes", type=int, default=3, help="cluster size (default 3)")
    p.add_argument("--clients", type=int, default=_DEFAULTS.clients)
    p.add_argument("--keys", type=int, default=_DEFAULTS.keys)
    p.add_argument("--duration", type=float, default=_DEFAULTS.duration, help="virtual seconds")
    p.add_argument("--no-faults", action="store_true", help="run the workload without faults")
    p.add_argument(
        "--unsafe-ack-before-w",
        action="store_true",
        help="planted bug: acknowledge writes after the local copy only",
    )
    p.add_argument(
        "--unsafe-lww", action="store_true", help="planted bug: resolve siblings last-write-wins"
    )
    p.add_argument(
        "--trace", action="store_true", help="print every fault and operation as it happened"
    )
    p.add_argument(
        "--net-trace",
        action="store_true",
        help="with --trace: also every message the network sent, delivered or lost",
    )
    p.add_argument("--digest", action="store_true", help="print a digest of the run and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log node warnings")
    return p


def _timeline(result: RunResult) -> list[str]:
    lines = [(at, f"{at:9.3f}s  fault  {what}") for at, what in result.events]
    lines += [
        (e.time, f"{e.time:9.3f}s  net    {e.event} {e.src}->{e.dst} {e.msg}")
        for e in result.trace
        if e.event not in ("crash", "restart", "partition", "heal", "set-link")
    ]
    for op in result.history:
        if op.extra.get(FINAL):
            continue
        extra = {k: v for k, v in op.extra.items() if k != "node"}
        node = op.extra.get("node")
        where = f" @{node}" if node else ""
        detail = f" {json.dumps(extra, sort_keys=True)}" if extra else ""
        value = "" if op.value is None else f" {json.dumps(op.value)}"
        lines.append(
            (
                op.time / 1e9,
                f"{op.time / 1e9:9.3f}s  p{op.process:<4} {op.type:6} {op.f:6} {op.key}"
                f"{value}{where}{detail}",
            )
        )
    return [text for _, text in sorted(lines, key=lambda item: item[0])]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )
    settings = sim_settings(
        unsafe_ack_before_w=args.unsafe_ack_before_w, unsafe_lww=args.unsafe_lww
    )
    workload = WorkloadConfig(clients=args.clients, keys=args.keys, duration=args.duration)
    result = run_cluster(
        args.seed,
        args.nodes,
        settings,
        workload,
        faults=not args.no_faults,
        trace=args.net_trace,
    )
    if args.digest:
        print(result.digest())
        return 0
    if args.json:
        print(
            json.dumps(
                {
                    "seed": result.seed,
                    "nodes": result.nodes,
                    "valid": result.valid,
                    "problems": result.problems(),
                    "lost": result.lost,
                    "faults": [f"{at:.3f}s {what}" for at, what in result.events],
                    "register": result.register.to_dict(),
                    "convergence": result.convergence.to_dict(),
                    "hints_left": result.hints_left,
                    "stray_copies": result.stray_copies,
                    "digest": result.digest(),
                },
                indent=2,
                sort_keys=True,
            )
        )
        return 0 if result.valid else 1
    if args.trace:
        print("\n".join(_timeline(result)))
        print()
    else:
        print("faults:")
        for at, what in result.events:
            print(f"  {at:9.3f}s {what}")
    print(result.summary())
    problems = result.problems()
    for line in problems:
        print(f"  {line}")
    print(f"verdict: {'VALID' if result.valid else 'INVALID'}  (replay: {result.replay()})")
    return 0 if result.valid else 1


if __name__ == "__main__":
    sys.exit(main())
