"""Prometheus metrics of one node.

Each node owns a private registry (the simulator runs many nodes in one
process); the server exposes it over HTTP. Gauges that mirror live state
(hints pending, queue depths) are read at scrape time through callbacks
instead of being updated on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvcluster.storage.base import StorageStats

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    def __init__(self, node_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"node": node_id}
        self.requests = Counter(
            "kvcluster_requests",
            "Client requests handled, by operation and outcome.",
            ["op", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kvcluster_request_seconds",
            "Latency of client requests as seen by the coordinating node.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.read_repairs = Counter(
            "kvcluster_read_repairs",
            "Stale replicas updated by read repair.",
            registry=self.registry,
        )
        self.hints_delivered = Counter(
            "kvcluster_hints_delivered",
            "Hinted records delivered to their owner.",
            registry=self.registry,
        )
        self.hints_pending = Gauge(
            "kvcluster_hints_pending",
            "Hints this node holds, by target node.",
            ["target"],
            registry=self.registry,
        )
        self.hints_dropped = Gauge(
            "kvcluster_hints_dropped",
            "Hints not stored (per-target bound) or expired since start.",
            registry=self.registry,
        )
        self.ring_epoch = Gauge(
            "kvcluster_ring_epoch", "Epoch of the agreed ring.", registry=self.registry
        )
        self.members_up = Gauge(
            "kvcluster_members",
            "Members by liveness as seen by this node.",
            ["state"],
            registry=self.registry,
        )
        self.info = Gauge(
            "kvcluster_node_info",
            "Constant 1, labelled with the node id.",
            list(labels),
            registry=self.registry,
        )
        self.info.labels(**labels).set(1)
        self._refreshers: list[Callable[[], None]] = []

    def watch_storage(self, stats: Callable[[], StorageStats]) -> None:
        """Export the store's counters (read through ``stats`` at each scrape)."""
        self.registry.register(_StorageCollector(stats))

    def on_scrape(self, refresh: Callable[[], None]) -> None:
        """Register a function that updates live gauges before each scrape."""
        self._refreshers.append(refresh)

    def refresh(self) -> None:
        for fn in self._refreshers:
            fn()


class _StorageCollector(Collector):
    """The store's own counters, mirrored at scrape time: writes per commit
    (``writes / commits``) is how well group commit is batching."""

    def __init__(self, stats: Callable[[], StorageStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield CounterMetricFamily(
            "kvcluster_storage_writes",
            "Write functions applied by the store (each one a request's changes).",
            value=s.writes,
        )
        yield CounterMetricFamily(
            "kvcluster_storage_commits",
            "Synced transactions committed: each holds one group commit of writes.",
            value=s.batches,
        )
        yield GaugeMetricFamily(
            "kvcluster_storage_pending", "Writes queued for the store now.", value=s.pending
        )
        yield GaugeMetricFamily(
            "kvcluster_storage_bytes", "Approximate size of the store on disk.", value=s.bytes_used
        )
