"""The ``jepsen-lite`` command line.

::

    jepsen-lite run --backend local|netns --nodes 3 --workload set|register|lin-register \\
        --nemesis partition,kill,pause,loss,latency,clock --time-limit 60 --seed 1 \\
        --concurrency 8 --out DIR [--unsafe ack-before-w|lww]
    jepsen-lite check DIR      # re-check a saved history, rewrite results.json
    jepsen-lite report DIR     # re-render report.html

Exit status: 0 the history is valid, 1 anomalies were found, 2 the harness failed
or could not reach a verdict (including Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from jepsen_lite.backends import BACKENDS
from jepsen_lite.errors import HarnessError
from jepsen_lite.history import HistoryError
from jepsen_lite.nemesis import NEMESES, parse_nemeses
from jepsen_lite.runner import UNSAFE, RunConfig, check_dir, exit_code, run
from jepsen_lite.workloads import WORKLOADS

__all__ = ["main"]


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    parsed: Any = value
    for convert in (int, float):
        try:
            parsed = convert(value)
            break
        except ValueError:
            continue
    if value.lower() in ("true", "false"):
        parsed = value.lower() == "true"
    return key.replace("-", "_"), parsed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jepsen-lite",
        description="Jepsen-style fault-injection tests for kvcluster.",
        epilog="Exit status: 0 valid, 1 anomalies found, 2 harness error or no verdict.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a test: cluster, workload, nemesis, checkers, report")
    r.add_argument("--backend", choices=BACKENDS, default="local")
    r.add_argument("--nodes", type=int, default=3)
    r.add_argument("--workload", choices=sorted(WORKLOADS), default="set")
    r.add_argument(
        "--nemesis",
        default="partition,kill,pause",
        help=f"comma-separated faults from {','.join(NEMESES)}, 'all' or 'none'",
    )
    r.add_argument("--time-limit", type=float, default=60.0, help="seconds of workload")
    r.add_argument("--seed", type=int, default=1, help="seeds the fault schedule and workers")
    r.add_argument("--concurrency", type=int, default=8, help="client worker threads")
    r.add_argument("--out", type=Path, default=None, help="output directory (must be empty)")
    r.add_argument(
        "--unsafe",
        action="append",
        default=[],
        metavar="|".join(UNSAFE),
        help="start the nodes with a deliberately unsafe setting (repeatable)",
    )
    r.add_argument(
        "--sloppy",
        action="store_true",
        help="sloppy instead of strict (primary-only) quorums: only final reads are judged",
    )
    r.add_argument("--client-timeout", type=float, default=2.0, help="seconds per request")
    r.add_argument(
        "--set",
        dest="settings",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra node setting (see kvcluster-node --help), e.g. --set aae_interval=5",
    )
    r.add_argument(
        "--option",
        dest="options",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workload option, e.g. --option active_keys=5",
    )
    r.add_argument("--drain-timeout", type=float, default=60.0)
    r.add_argument("--keep-data", action="store_true", help="keep the nodes' data directories")
    c = sub.add_parser("check", help="re-check the saved history of a run")
    c.add_argument("dir", type=Path)
    c.add_argument("--no-report", action="store_true", help="do not re-render report.html")
    rep = sub.add_parser("report", help="re-render report.html of a run")
    rep.add_argument("dir", type=Path)
    return p


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _print_results(results: dict[str, Any], out: Path) -> None:
    summary = results.get("summary", {})
    short = {k: v for k, v in summary.items() if not isinstance(v, list) or len(v) <= 20}
    print(
        json.dumps(
            {
                "verdict": results["verdict"],
                "anomaly_count": results["anomaly_count"],
                "anomaly_kinds": results.get("anomaly_kinds", {}),
                **short,
            },
            indent=2,
        )
    )
    print(f"results: {out / 'results.json'}")
    print(f"report:  {out / 'report.html'}")


def _run(args: argparse.Namespace) -> int:
    unsafe = [u.strip() for item in args.unsafe for u in item.split(",") if u.strip()]
    try:
        nemeses = parse_nemeses(args.nemesis)
    except ValueError as exc:
        raise HarnessError(str(exc)) from None
    out = args.out
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(".kvcluster") / "jepsen" / f"{args.workload}-{args.backend}-{stamp}"
    config = RunConfig(
        out=out,
        backend=args.backend,
        nodes=args.nodes,
        workload=args.workload,
        nemeses=nemeses,
        time_limit=args.time_limit,
        seed=args.seed,
        concurrency=args.concurrency,
        unsafe=unsafe,
        strict=not args.sloppy,
        client_timeout=args.client_timeout,
        settings=dict(args.settings),
        workload_options=dict(args.options),
        drain_timeout=args.drain_timeout,
        keep_data=args.keep_data,
    )
    results = run(config)
    _print_results(results, out)
    return exit_code(results["valid"])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            results = check_dir(args.dir)
            if not args.no_report:
                from jepsen_lite.report import write_report

                write_report(args.dir)
            _print_results(results, args.dir)
            return exit_code(results["valid"])
        if args.command == "report":
            from jepsen_lite.report import write_report

            if not (args.dir / "results.json").exists():
                check_dir(args.dir)
            print(write_report(args.dir))
            return 0
        return 2
    except HarnessError as exc:
        print(f"jepsen-lite: error: {exc}", file=sys.stderr)
        return 2
    except HistoryError as exc:
        print(f"jepsen-lite: error: malformed history: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jepsen-lite: interrupted; the cluster was stopped", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
