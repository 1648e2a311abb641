"""Server-side latency from the nodes' Prometheus metrics, per phase.

``kvcluster_request_seconds`` is the latency each coordinating node saw for
the client requests it handled. Scraping every node before and after a phase
and subtracting gives that phase's server-side count, mean and (bucket
interpolated) percentiles per operation; comparing them with the client's
numbers separates time in the server from time in the client and the network
stack (gRPC on both ends, the event loops, the scheduler).
"""

from __future__ import annotations

import contextlib
import math
import re
import urllib.request
from collections.abc import Iterable
from typing import Any

METRIC = "kvcluster_request_seconds"
WRITES = "kvcluster_storage_writes_total"
COMMITS = "kvcluster_storage_commits_total"
_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Prometheus text format -> {(metric name, sorted labels): value}."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group("labels") or "")))
        with contextlib.suppress(ValueError):
            out[(m.group("name"), labels)] = float(m.group("value"))
    return out


def scrape(addresses: Iterable[str], timeout: float = 2.0) -> list[Samples]:
    """One parsed scrape per node (an empty dict for a node that does not answer)."""
    result = []
    for address in addresses:
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as resp:
                result.append(parse(resp.read().decode()))
        except OSError:
            result.append({})
    return result


def _bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            span = count - prev_count
            frac = 0.0 if span <= 0 else (rank - prev_count) / span
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


def latency_delta(before: list[Samples], after: list[Samples]) -> dict[str, Any]:
    """Per op: requests, mean and p50/p99 (ms) handled by the coordinators between two scrapes."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for b, a in zip(before, after, strict=True):
        for (name, labels), value in a.items():
            if not name.startswith(METRIC):
                continue
            lab = dict(labels)
            op = lab.get("op", "?")
            delta = value - b.get((name, labels), 0.0)
            if name == METRIC + "_sum":
                sums[op] = sums.get(op, 0.0) + delta
            elif name == METRIC + "_count":
                counts[op] = counts.get(op, 0.0) + delta
            elif name == METRIC + "_bucket":
                le = float(lab.get("le", "inf").replace("+Inf", "inf"))
                per = buckets.setdefault(op, {})
                per[le] = per.get(le, 0.0) + delta
    out: dict[str, Any] = {}
    for op, count in sorted(counts.items()):
        if count <= 0:
            continue
        cumulative = sorted(buckets.get(op, {}).items())
        p50 = _bucket_quantile(0.5, cumulative)
        p99 = _bucket_quantile(0.99, cumulative)
        out[op] = {
            "count": int(count),
            "mean_ms": round(1000 * sums.get(op, 0.0) / count, 3),
            "p50_ms": None if p50 is None else round(1000 * p50, 3),
            "p99_ms": None if p99 is None else round(1000 * p99, 3),
        }
    return out


def storage_delta(before: list[Samples], after: list[Samples]) -> dict[str, Any]:
    """Store writes and synced commits on all nodes between two scrapes, and the
    writes per commit (how much group commit gathered)."""
    writes = commits = 0.0
    for b, a in zip(before, after, strict=True):
        writes += a.get((WRITES, ()), 0.0) - b.get((WRITES, ()), 0.0)
        commits += a.get((COMMITS, ()), 0.0) - b.get((COMMITS, ()), 0.0)
    return {
        "writes": int(writes),
        "commits": int(commits),
        "writes_per_commit": round(writes / commits, 2) if commits > 0 else None,
    }
