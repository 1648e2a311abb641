"""Latency histograms (HdrHistogram, microseconds) and the helpers that merge and summarise them.

Worker processes send their histograms to the parent in HdrHistogram's
compressed base64 encoding; the parent merges them (``merge``) so that the
percentiles of a run are those of every operation, not an average of
per-process percentiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000  # 2 minutes: anything slower is clipped (and counted as such)
SIGNIFICANT_FIGURES = 3

#: Percentiles drawn in the plots (HdrHistogram-style percentile spectrum).
PLOT_PERCENTILES: Sequence[float] = (
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
)  # fmt: skip


def new() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def record_us(hist: HdrHistogram, micros: float) -> None:
    """Record one latency, clipped into the trackable range."""
    value = int(micros)
    if value < LOWEST_US:
        value = LOWEST_US
    elif value > HIGHEST_US:
        value = HIGHEST_US
    hist.record_value(value)


def encode(hist: HdrHistogram) -> bytes:
    return bytes(hist.encode())


def decode(data: bytes) -> HdrHistogram:
    return HdrHistogram.decode(data)


def merge(hists: Iterable[HdrHistogram]) -> HdrHistogram:
    """One histogram holding every value of ``hists`` (none of them is modified)."""
    out = new()
    for h in hists:
        out.add(h)
    return out


def merge_encoded(blobs: Iterable[bytes]) -> HdrHistogram:
    return merge(decode(b) for b in blobs)


def summary(hist: HdrHistogram) -> dict[str, Any]:
    """Count and latency percentiles in milliseconds (None when empty)."""
    count = int(hist.get_total_count())
    if count == 0:
        return {
            "count": 0, "mean_ms": None, "p50_ms": None, "p90_ms": None,
            "p99_ms": None, "p999_ms": None, "max_ms": None,
        }  # fmt: skip

    def ms(p: float) -> float:
        return round(float(hist.get_value_at_percentile(p)) / 1000.0, 3)

    return {
        "count": count,
        "mean_ms": round(float(hist.get_mean_value()) / 1000.0, 3),
        "p50_ms": ms(50.0),
        "p90_ms": ms(90.0),
        "p99_ms": ms(99.0),
        "p999_ms": ms(99.9),
        "max_ms": round(hist.get_max_value() / 1000.0, 3),
    }


def percentile_curve(
    hist: HdrHistogram, percentiles: Sequence[float] = PLOT_PERCENTILES
) -> list[tuple[float, float]]:
    """(percentile, latency ms) points for a percentile-spectrum plot; empty when no values."""
    if hist.get_total_count() == 0:
        return []
    return [(p, hist.get_value_at_percentile(p) / 1000.0) for p in percentiles]
