"""Output: rich tables, medians over repetitions, kvcluster/etcd ratios, JSON and a PNG plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import hist
from benchmarks.workloads import BATCH_KINDS

Summary = dict[str, dict[str, dict[str, Any]]]  # system -> phase -> medians (see summarise)


def console() -> Console:
    """A console for progress and tables; wide enough for the tables when not a terminal."""
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=200)
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def rate(result: dict[str, Any]) -> float:
    """The phase's headline rate: keys/s for batch phases, calls/s otherwise."""
    return float(result["keys_per_s"] if result["kind"] in BATCH_KINDS else result["calls_per_s"])


def one_line(result: dict[str, Any]) -> str:
    a = result["all"]
    unit = "keys/s" if result["kind"] in BATCH_KINDS else "ops/s"
    extra = ""
    if result["errors"]:
        extra += f"  [red]errors {result['errors']}: {result['error_samples'][:1]}[/]"
    if result.get("not_issued"):
        extra += f"  [yellow]not issued {result['not_issued']}[/]"
    cpu = result.get("server_cpu_ms_per_call_net")
    cpu_text = f"  server CPU {cpu:.2f} ms/call" if cpu is not None else ""
    for op, s in (result.get("server_latency") or {}).items():
        cpu_text += f"  [dim]coord {op} p50 {_fmt(s['p50_ms'])} mean {_fmt(s['mean_ms'])}[/]"
    storage = result.get("storage") or {}
    if storage.get("writes_per_commit") is not None:
        cpu_text += f"  [dim]{storage['writes_per_commit']} writes/commit[/]"
    return (
        f"  {result.get('system', '')} {result['name']}: {_fmt(rate(result))} {unit}  "
        f"p50 {_fmt(a['p50_ms'])} p99 {_fmt(a['p99_ms'])} p999 {_fmt(a['p999_ms'])} ms"
        f"{cpu_text}{extra}"
    )


def _table(title: str, cols: Sequence[str], left: Sequence[str] = ("phase",)) -> Table:
    """A table with these columns, right-aligned but for the ``left`` ones."""
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def _stats(phases: dict[str, dict[str, Any]], phase: str, op: str = "all") -> dict[str, Any]:
    """One system's medians for ``op`` in ``phase`` (empty if it did not run it)."""
    stats: dict[str, Any] = phases.get(phase, {}).get("ops", {}).get(op) or {}
    return stats


def _phase_names(summary: Summary, systems: Sequence[str]) -> list[str]:
    """Every phase any of ``systems`` ran, in run order."""
    phases: list[str] = []
    for s in systems:
        phases += [p for p in summary[s] if p not in phases]
    return phases


def _coord(server: dict[str, Any] | None) -> str:
    """Coordinator-side p50/p99 (ms) from the nodes' metrics, for the busiest op."""
    if not server:
        return "-"
    _op, s = max(server.items(), key=lambda kv: kv[1].get("count") or 0)
    return f"{_fmt(s.get('p50_ms'))}/{_fmt(s.get('p99_ms'))}"


def _mode(result: dict[str, Any]) -> str:
    if result.get("open_loop"):
        return f", open loop at {result['target_rate']:g}/s (latency from intended start)"
    return ", closed loop"


def load_table(results: Sequence[dict[str, Any]]) -> Table:
    """benchmarks.load's table: one row per phase (put / get at each concurrency)."""
    mode = _mode(results[0]) if results else ""
    cols = (
        "phase", "calls", "ops/s", "p50", "p99", "p999", "max", "errors", "coord p50/p99",
        "srv CPU ms/op net",
    )  # fmt: skip
    table = _table(f"kvcluster put/get{mode} (latency in ms)", cols)
    for r in results:
        a = r["all"]
        table.add_row(
            r["name"],
            str(r["calls"]),
            _fmt(r["calls_per_s"]),
            _fmt(a["p50_ms"]),
            _fmt(a["p99_ms"]),
            _fmt(a["p999_ms"]),
            _fmt(a["max_ms"]),
            str(r["errors"]),
            _coord(r.get("server_latency")),
            _fmt(r.get("server_cpu_ms_per_call_net")),
        )
    return table


def load_summary_table(phases: dict[str, dict[str, Any]]) -> Table:
    """benchmarks.load's table over repetitions: medians per phase."""
    reps = max((e["reps"] for e in phases.values()), default=1)
    cols = (
        "phase", "ops/s", "p50", "p99", "p999", "errors", "coord p50/p99", "srv CPU ms/op net",
        "runs ops/s",
    )  # fmt: skip
    table = _table(f"kvcluster put/get (latency in ms): median of {reps} runs", cols)
    table.caption = "open loop" if any(e.get("open_loop") for e in phases.values()) else None
    for name, e in phases.items():
        a = e["ops"]["all"]
        table.add_row(
            name,
            _fmt(a["rate"]),
            _fmt(a["p50_ms"]),
            _fmt(a["p99_ms"]),
            _fmt(a["p999_ms"]),
            str(a["errors"]),
            _coord(e.get("server_latency")),
            _fmt(e.get("server_cpu_ms_per_call_net")),
            " ".join(f"{r:.0f}" for r in e["rates"]),
        )
    return table


# -- medians over repetitions ----------------------------------------------------------


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def op_rate(result: dict[str, Any], op: str) -> float:
    """Per-operation throughput (ops of this kind / measured window)."""
    if op == "all":
        return rate(result)
    count = result["ops"][op]["count"]
    return float(count * result["batch_size"] / result["window_s"])  # batch_size is 1 unless batch


def summarise(runs: Sequence[dict[str, Any]]) -> Summary:
    """system -> phase -> {op -> medians over repetitions} (plus merged histograms)."""
    out: Summary = {}
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    order: list[str] = []
    for run in runs:
        for result in run["results"]:
            by.setdefault((run["system"], result["name"]), []).append(result)
            if result["name"] not in order:
                order.append(result["name"])
    for (system, phase), results in by.items():
        ops = ["all", *sorted({op for r in results for op in r["ops"]})]
        entry: dict[str, Any] = {
            "kind": results[0]["kind"],
            "open_loop": results[0].get("open_loop", False),
            "reps": len(results),
            "ops": {},
        }
        for op in ops:
            have = [r for r in results if op == "all" or op in r["ops"]]
            stats = [r["all"] if op == "all" else r["ops"][op] for r in have]
            entry["ops"][op] = {
                "rate": _median(op_rate(r, op) for r in have),
                "p50_ms": _median(s["p50_ms"] for s in stats),
                "p99_ms": _median(s["p99_ms"] for s in stats),
                "p999_ms": _median(s["p999_ms"] for s in stats),
                "errors": sum(r["errors"] if op == "all" else r["ops"][op]["errors"] for r in have),
            }
        entry["server_cpu_ms_per_call"] = _median(r.get("server_cpu_ms_per_call") for r in results)
        server_ops = sorted({op for r in results for op in (r.get("server_latency") or {})})
        entry["server_latency"] = {
            op: {
                key: _median((r.get("server_latency") or {}).get(op, {}).get(key) for r in results)
                for key in ("count", "mean_ms", "p50_ms", "p99_ms")
            }
            for op in server_ops
        }
        entry["server_cpu_ms_per_call_net"] = _median(
            r.get("server_cpu_ms_per_call_net") for r in results
        )
        entry["server_cores"] = _median(r.get("server_cores") for r in results)
        entry["server_idle_cores"] = _median(r.get("server_idle_cores") for r in results)
        entry["client_cpu_ms_per_call"] = _median(r.get("client_cpu_ms_per_call") for r in results)
        entry["other_cpu_s"] = _median(r.get("other_cpu_s") for r in results)
        entry["busy_fraction"] = _median(
            r["machine_busy_s"] / r["machine_cpu_s"] if r.get("machine_cpu_s") else None
            for r in results
        )
        entry["rates"] = [rate(r) for r in results]
        entry["histogram"] = hist.encode(
            hist.merge_encoded(h.encode() for r in results for h in r["histograms"].values())
        ).decode()
        out.setdefault(system, {})[phase] = entry
    # keep phases in run order
    return {s: {p: phases[p] for p in order if p in phases} for s, phases in out.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def comparison_table(summary: Summary, base: str = "kvcluster", other: str = "etcd") -> Table:
    """Medians per phase and op for each system, and base/other ratios."""
    systems = [s for s in (base, other) if s in summary] or list(summary)
    reps = max((e["reps"] for s in systems for e in summary[s].values()), default=1)
    cols = ["phase", "op"] + [f"{s}\n{c}" for s in systems for c in ("ops/s", "p50", "p99", "p999")]
    compare = base in summary and other in summary
    if compare:
        cols += [f"{base}/{other}\n{c}" for c in ("thr", "p50", "p99")]
    table = _table(
        f"throughput (ops/s; keys/s for batches) and latency (ms): median of {reps} run(s)",
        cols,
        left=("phase", "op"),
    )
    for phase in _phase_names(summary, systems):
        ops: list[str] = []
        for s in systems:
            ops += [o for o in summary[s].get(phase, {}).get("ops", {}) if o not in ops]
        if len(ops) == 2:  # "all" and a single op: one row is enough
            ops = ["all"]
        for op in ops:
            row = [phase if op == "all" else "", op]
            cells = {s: _stats(summary[s], phase, op) for s in systems}
            for s in systems:
                row += [
                    _fmt(cells[s].get("rate"), 0),
                    _fmt(cells[s].get("p50_ms")),
                    _fmt(cells[s].get("p99_ms")),
                    _fmt(cells[s].get("p999_ms")),
                ]
            if compare:
                b, o = cells[base], cells[other]
                row += [
                    _fmt(ratio(b.get("rate"), o.get("rate"))),
                    _fmt(ratio(b.get("p50_ms"), o.get("p50_ms"))),
                    _fmt(ratio(b.get("p99_ms"), o.get("p99_ms"))),
                ]
            table.add_row(*row, end_section=op == ops[-1])
    return table


def cpu_table(summary: Summary) -> Table:
    cols = (
        "system", "phase", "server", "server net", "server cores", "idle cores", "client",
        "other procs (s)", "machine busy",
    )  # fmt: skip
    table = _table(
        "CPU per call in ms (server: all members; net: minus idle use) and machine load",
        cols,
        left=("system", "phase"),
    )
    for system, phases in summary.items():
        for phase, e in phases.items():
            busy = e.get("busy_fraction")
            table.add_row(
                system,
                phase,
                _fmt(e.get("server_cpu_ms_per_call"), 3),
                _fmt(e.get("server_cpu_ms_per_call_net"), 3),
                _fmt(e.get("server_cores"), 2),
                _fmt(e.get("server_idle_cores"), 3),
                _fmt(e.get("client_cpu_ms_per_call"), 3),
                _fmt(e.get("other_cpu_s"), 1),
                "-" if busy is None else f"{100 * busy:.0f}%",
            )
    return table


# -- targets ----------------------------------------------------------------------------


def targets(summary: Summary, workload_phase: str, load_phase: str) -> list[dict[str, Any]]:
    """The issue's targets, each with the numbers and whether it was met."""
    kv, etcd = summary.get("kvcluster", {}), summary.get("etcd", {})
    checks: list[dict[str, Any]] = []

    def get(side: dict[str, Any], phase: str, key: str) -> float | None:
        value = _stats(side, phase).get(key)
        return None if value is None else float(value)

    def check(name: str, value: float | None, limit: float, ok: Callable[[float], bool]) -> None:
        checks.append(
            {
                "target": name,
                "value": None if value is None else round(value, 3),
                "limit": limit,
                "met": None if value is None else bool(ok(value)),
            }
        )

    a_ratio = ratio(get(kv, workload_phase, "rate"), get(etcd, workload_phase, "rate"))
    check(f"{workload_phase} throughput kvcluster/etcd >= 0.5", a_ratio, 0.5, lambda v: v >= 0.5)
    p99 = ratio(get(kv, workload_phase, "p99_ms"), get(etcd, workload_phase, "p99_ms"))
    check(f"{workload_phase} p99 kvcluster/etcd <= 2", p99, 2.0, lambda v: v <= 2.0)
    batch = next((p for p, e in kv.items() if e["kind"] == "put_many"), None)
    if batch is not None:
        pm = ratio(get(kv, batch, "rate"), get(etcd, load_phase, "rate"))
        check(
            f"kvcluster {batch} keys/s / etcd single-key put ({load_phase}) >= 3",
            pm,
            3.0,
            lambda v: v >= 3.0,
        )
    return checks


def targets_table(checks: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="targets")
    for col in ("target", "value", "met"):
        table.add_column(col)
    for c in checks:
        met = c["met"]
        mark = "-" if met is None else ("[green]yes[/]" if met else "[red]no[/]")
        table.add_row(c["target"], _fmt(c["value"]), mark)
    return table


# -- plot -------------------------------------------------------------------------------


def _spectrum_x(percentile: float) -> float:
    """HdrHistogram's percentile axis: 1/(1-p), log scale (p=100 is drawn at 99.999)."""
    p = min(percentile, 99.999) / 100.0
    return 1.0 / (1.0 - p)


def plot(summary: Summary, path: Path, title: str) -> None:
    """PNG: throughput per phase (bars, log) and latency percentile spectra per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    systems = list(summary)
    phases = _phase_names(summary, systems)
    cols = min(3, max(1, len(phases)))
    rows = 1 + math.ceil(len(phases) / cols)
    fig = plt.figure(figsize=(5.2 * cols, 3.6 * rows))
    grid = fig.add_gridspec(rows, cols)
    colors = {"kvcluster": "tab:blue", "etcd": "tab:orange"}

    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        xs = [j + i * width for j in range(len(phases))]
        ys = [_stats(summary[s], p).get("rate") or 0 for p in phases]
        ax.bar(xs, ys, width, label=s, color=colors.get(s))
        for x, y in zip(xs, ys, strict=True):
            if y:
                ax.annotate(f"{y:,.0f}", (x, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(phases))])
    ax.set_xticklabels(phases, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ops/s (keys/s for batches)")
    ax.set_title(title, fontsize=10)
    ax.legend()

    ticks = [50.0, 90.0, 99.0, 99.9, 99.99]
    for k, phase in enumerate(phases):
        ax = fig.add_subplot(grid[1 + k // cols, k % cols])
        for s in systems:
            entry = summary[s].get(phase)
            if not entry:
                continue
            curve = hist.percentile_curve(hist.decode(entry["histogram"].encode()))
            if curve:
                ax.plot(
                    [_spectrum_x(p) for p, _ in curve],
                    [v for _, v in curve],
                    marker=".",
                    label=s,
                    color=colors.get(s),
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([_spectrum_x(t) for t in ticks])
        ax.set_xticklabels([f"{t:g}%" for t in ticks], fontsize=7)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
        ax.set_ylabel("latency ms")
        ax.set_title(f"{phase}: latency by percentile", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
