"""``report.html``: one self-contained page per run, viewable offline.

Plots are PNGs rendered with matplotlib and embedded as ``data:`` URIs:

- *latency*: every operation at its invocation time, its latency on a log scale,
  coloured by outcome (ok / fail / info), with the nemesis fault windows shaded;
- *throughput*: completions per second by outcome, same shading;
- *timeline*: one row per worker thread (process mod concurrency, final reads on
  their own row), a bar per operation from invocation to completion.

Below: the verdict, counts, every anomaly with its operations (first 200), the
nemesis events and the run configuration. Once the page has loaded, a small
script checks every plot's natural size and colours a 24-pixel square in the
top-right corner green (all plots decoded) or red (used by the rendering test),
recording the sizes in ``#image-check[data-sizes]``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from jepsen_lite.history import Op, load_jsonl, pairs
from jepsen_lite.nemesis import fault_windows, load_events
from jepsen_lite.runner import FINAL_PROCESS_BASE

__all__ = ["render_report", "write_report"]

OUTCOME_COLORS = {"ok": "#2b8a3e", "fail": "#c92a2a", "info": "#e67700"}
FAULT_COLORS = {
    "partition": "#4dabf7",
    "kill": "#f06595",
    "pause": "#9775fa",
    "loss": "#ffd43b",
    "latency": "#63e6be",
    "clock": "#ffa94d",
}
MAX_POINTS = 60_000
MAX_ANOMALIES_SHOWN = 200


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _shade(ax: Any, windows: Sequence[Mapping[str, Any]]) -> None:
    for w in windows:
        ax.axvspan(
            w["start"] / 1e9,
            w["end"] / 1e9,
            color=FAULT_COLORS.get(w["kind"], "#adb5bd"),
            alpha=0.25,
            lw=0,
        )


def _fault_legend(windows: Sequence[Mapping[str, Any]]) -> list[Patch]:
    kinds = sorted({w["kind"] for w in windows})
    return [Patch(color=FAULT_COLORS.get(k, "#adb5bd"), alpha=0.35, label=k) for k in kinds]


def _sample(items: list[Any], keep: Any, limit: int) -> list[Any]:
    """At most ``limit`` items: all for which ``keep`` is true, a seeded sample of the rest."""
    if len(items) <= limit:
        return items
    must = [x for x in items if keep(x)]
    rest = [x for x in items if not keep(x)]
    room = max(0, limit - len(must))
    return must + random.Random(0).sample(rest, min(room, len(rest)))


def _latency_plot(ops: list[dict[str, Any]], windows: list[dict[str, Any]], end: float) -> str:
    fig, ax = plt.subplots(figsize=(13, 4.8))
    _shade(ax, windows)
    shown = _sample(ops, lambda o: o["type"] != "ok", MAX_POINTS)
    for outcome, color in OUTCOME_COLORS.items():
        xs = [o["start"] for o in shown if o["type"] == outcome]
        ys = [max(o["latency_ms"], 0.01) for o in shown if o["type"] == outcome]
        if xs:
            ax.scatter(
                xs,
                ys,
                s=4 if outcome == "ok" else 9,
                c=color,
                alpha=0.6,
                lw=0,
                label=f"{outcome} ({sum(1 for o in ops if o['type'] == outcome)})",
            )
    ax.set_yscale("log")
    ax.set_xlim(0, max(end, 1.0))
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Operation latency (fault windows shaded)")
    handles, _labels = ax.get_legend_handles_labels()
    ax.legend(handles=handles + _fault_legend(windows), loc="upper left", fontsize=8, ncol=2)
    ax.grid(True, which="major", alpha=0.3)
    return _png(fig)


def _throughput_plot(ops: list[dict[str, Any]], windows: list[dict[str, Any]], end: float) -> str:
    fig, ax = plt.subplots(figsize=(13, 3.2))
    _shade(ax, windows)
    width = max(1, int(end // 300) + 1)  # seconds per bucket
    buckets = int(end // width) + 1
    for outcome, color in OUTCOME_COLORS.items():
        counts = [0] * buckets
        for o in ops:
            if o["type"] == outcome:
                counts[min(buckets - 1, int(o["end"] // width))] += 1
        ax.plot(
            [i * width for i in range(buckets)],
            [c / width for c in counts],
            color=color,
            label=outcome,
            lw=1.2,
        )
    ax.set_xlim(0, max(end, 1.0))
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("completions / s")
    ax.set_title("Throughput by outcome")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    return _png(fig)


def _timeline_plot(
    ops: list[dict[str, Any]], windows: list[dict[str, Any]], end: float, concurrency: int
) -> str:
    rows = sorted({o["row"] for o in ops}, key=lambda r: (r == "final", r))
    index = {r: i for i, r in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(13, max(2.5, 0.38 * len(rows) + 1.2)))
    _shade(ax, windows)
    bars: dict[tuple[str, Any], list[tuple[float, float]]] = defaultdict(list)
    for o in _sample(ops, lambda o: o["type"] != "ok", MAX_POINTS):
        bars[o["type"], o["row"]].append((o["start"], max(o["end"] - o["start"], end / 4000)))
    for outcome, color in OUTCOME_COLORS.items():
        for r in rows:
            if bars.get((outcome, r)):
                ax.broken_barh(
                    bars[outcome, r], (index[r] - 0.4, 0.8), facecolors=color, alpha=0.85
                )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"worker {r}" if r != "final" else "final reads" for r in rows])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.invert_yaxis()
    ax.set_xlim(0, max(end, 1.0))
    ax.set_xlabel("time since start (s)")
    ax.set_title(f"Per-process timeline ({concurrency} workers; new process after each info)")
    legend = [Patch(color=c, label=k) for k, c in OUTCOME_COLORS.items()]
    ax.legend(handles=legend + _fault_legend(windows), loc="upper right", fontsize=8, ncol=3)
    return _png(fig)


def _ops(history: Sequence[Op], concurrency: int, final_base: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    last = history[-1].time if history else 0
    for p in pairs(history):
        start = p.invoke.time / 1e9
        stop = (p.completion.time if p.completion is not None else last) / 1e9
        proc = p.process
        row: Any = "final" if proc >= final_base else proc % max(1, concurrency)
        out.append(
            {
                "start": start,
                "end": stop,
                "latency_ms": (stop - start) * 1000,
                "type": p.type,
                "f": p.f,
                "row": row,
            }
        )
    return out


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, list | dict):
        text = json.dumps(value, default=str)
        return text if len(text) <= 300 else text[:297] + "..."
    return str(value)


def _anomaly_title(a: Mapping[str, Any]) -> str:
    head = f"{a.get('checker')}: {a.get('kind')} — key {a.get('key')!s}"
    for name in ("element", "value", "values", "reason"):
        if a.get(name) is not None:
            return f"{head}: {_fmt(a[name])}"
    return head


def render_report(out: Path) -> str:
    """The HTML of the report of the run in ``out`` (needs run.json and results.json)."""
    run_info = json.loads((out / "run.json").read_text())
    results = json.loads((out / "results.json").read_text())
    history = load_jsonl(out / "history.jsonl", check=False)
    events = load_events(out / "nemesis.jsonl")
    config = run_info["config"]
    concurrency = int(config.get("concurrency", 1))
    end_ns = max([history[-1].time if history else 0] + [int(e["time"]) for e in events])
    windows = fault_windows(events, end_ns)
    ops = _ops(history, concurrency, FINAL_PROCESS_BASE)
    end = end_ns / 1e9
    plots = [
        ("Latency", _latency_plot(ops, windows, end)),
        ("Throughput", _throughput_plot(ops, windows, end)),
        ("Timeline", _timeline_plot(ops, windows, end, concurrency)),
    ]
    verdict = str(results.get("verdict", "unknown"))
    color = {"valid": "#2b8a3e", "invalid": "#c92a2a"}.get(verdict, "#e67700")
    title = (
        f"jepsen-lite: {config['workload']} on {config['backend']} "
        f"({config['nodes']} nodes, nemesis {','.join(config['nemeses']) or 'none'}"
        f"{', UNSAFE ' + ','.join(config['unsafe']) if config['unsafe'] else ''})"
    )
    body: list[str] = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="verdict" style="background:{color}">{html.escape(verdict.upper())}'
        f" — {results.get('anomaly_count', 0)} anomalies</p>",
        "<h2>Summary</h2>",
        _table(sorted(results.get("summary", {}).items()), ["", ""]),
        "<h2>Operations</h2>",
        _table(
            [
                [f, c["invoke"], c["ok"], c["fail"], c["info"]]
                for f, c in sorted(results.get("operation_counts", {}).items())
            ],
            ["f", "invoked", "ok", "fail", "info"],
        ),
    ]
    for name, data in plots:
        body.append(f"<h2>{name}</h2>")
        body.append(f'<img class="plot" alt="{name} plot" src="data:image/png;base64,{data}">')
    body.append(f"<h2>Anomalies ({results.get('anomaly_count', 0)})</h2>")
    anomalies = results.get("anomalies", [])
    if not anomalies:
        body.append("<p>None.</p>")
    for a in anomalies[:MAX_ANOMALIES_SHOWN]:
        body.append(
            f"<details><summary>{html.escape(_anomaly_title(a))}</summary>"
            f"<pre>{html.escape(json.dumps(a, indent=1, default=str))}</pre></details>"
        )
    if len(anomalies) > MAX_ANOMALIES_SHOWN:
        body.append(f"<p>… and {len(anomalies) - MAX_ANOMALIES_SHOWN} more in results.json.</p>")
    for key, heading in (
        ("harness_problems", "Harness problems (no verdict)"),
        ("harness_warnings", "Harness warnings"),
    ):
        items = results.get(key) or []
        if items:
            body.append(f"<h2>{heading}</h2>")
            body.append("".join(f"<pre>{html.escape(str(p))}</pre>" for p in items))
    body.append("<h2>Faults</h2>")
    body.append(
        _table(
            [
                [
                    w["id"],
                    w["kind"],
                    ",".join(w["nodes"]),
                    w["start"] / 1e9,
                    w["end"] / 1e9,
                    w.get("detail", {}),
                ]
                for w in windows
            ],
            ["#", "fault", "nodes", "start (s)", "end (s)", "detail"],
        )
    )
    body.append("<h2>Events</h2>")
    body.append(
        _table(
            [
                [
                    e["time"] / 1e9,
                    e["type"],
                    {k: v for k, v in e.items() if k not in ("time", "wall", "type")},
                ]
                for e in events
            ],
            ["time (s)", "type", "detail"],
        )
    )
    body.append("<h2>Checkers</h2>")
    body.append(f"<pre>{html.escape(json.dumps(results.get('checkers', {}), indent=1))}</pre>")
    body.append("<h2>Run</h2>")
    body.append(f"<pre>{html.escape(json.dumps(run_info, indent=1, default=str))}</pre>")
    return _PAGE.format(title=html.escape(title), body="\n".join(body))


def write_report(out: Path) -> Path:
    path = out / "report.html"
    path.write_text(render_report(out), encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #212529; max-width: 1250px; }}
h1 {{ font-size: 1.35em; }} h2 {{ font-size: 1.1em; margin-top: 1.6em; }}
.verdict {{ color: white; font-weight: bold; padding: .5em 1em; display: inline-block;
           border-radius: 4px; font-size: 1.2em; }}
table {{ border-collapse: collapse; font-size: .85em; }}
td, th {{ border: 1px solid #dee2e6; padding: .2em .6em; text-align: left;
          vertical-align: top; }}
img.plot {{ max-width: 100%; border: 1px solid #dee2e6; }}
pre {{ background: #f8f9fa; padding: .5em; overflow-x: auto; font-size: .8em; }}
details summary {{ cursor: pointer; font-size: .9em; }}
</style></head>
<body>
{body}
<div id="image-check" title="plot check"
     style="position:fixed; top:0; right:0; width:24px; height:24px; background:#ffffff"></div>
<script>
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  var sizes = images.map(function (img) {{ return img.naturalWidth + "x" + img.naturalHeight; }});
  var ok = images.length > 0 && images.every(function (img) {{
    return img.complete && img.naturalWidth > 0 && img.naturalHeight > 0;
  }});
  var box = document.getElementById("image-check");
  box.setAttribute("data-sizes", sizes.join(" "));
  box.title = ok ? "all " + images.length + " plots loaded" : "a plot failed to load";
  box.style.background = ok ? "#00c800" : "#ff0000";
}});
</script>
</body></html>
"""
