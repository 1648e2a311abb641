"""The benchmarks' pure helpers: histograms, phase shares, batch key counts, op mixes, profiles."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

from benchmarks import hist, runner
from benchmarks.drivers import Driver, DriverSpec
from benchmarks.profiling import component, parse_collapsed, summarise
from benchmarks.runner import Worker, WorkerResult, merge_phase
from benchmarks.workloads import BATCH_KINDS, WORKLOADS, OpChooser, Phase, PhaseKind


def _hist_of(values: list[int]) -> HdrHistogram:
    h = hist.new()
    for v in values:
        hist.record_us(h, v)
    return h


def test_merged_histogram_equals_the_histogram_of_all_values() -> None:
    rng = random.Random(1)
    a = [rng.randint(100, 5_000) for _ in range(3000)]
    b = [rng.randint(2_000, 900_000) for _ in range(1000)]
    merged = hist.merge([_hist_of(a), _hist_of(b)])
    direct = _hist_of(a + b)
    assert merged.get_total_count() == 4000
    for p in (50.0, 90.0, 99.0, 99.9, 100.0):
        assert merged.get_value_at_percentile(p) == direct.get_value_at_percentile(p)


def test_encoded_histograms_round_trip_and_merge() -> None:
    a, b = _hist_of([1000] * 10), _hist_of([3000] * 30)
    back = hist.decode(hist.encode(a))
    assert back.get_total_count() == 10
    assert back.get_value_at_percentile(50) == a.get_value_at_percentile(50)
    merged = hist.merge_encoded([hist.encode(a), hist.encode(b)])
    assert merged.get_total_count() == 40
    assert merged.get_value_at_percentile(50) == b.get_value_at_percentile(50)
    assert a.get_total_count() == 10  # inputs untouched


def test_values_outside_the_range_are_clipped_not_dropped() -> None:
    h = hist.new()
    hist.record_us(h, 0.2)
    hist.record_us(h, 10 * hist.HIGHEST_US)
    assert h.get_total_count() == 2
    assert h.get_max_value() >= hist.HIGHEST_US * 0.999


def test_summary_in_milliseconds() -> None:
    assert hist.summary(hist.new())["p50_ms"] is None
    s = hist.summary(_hist_of([1000] * 99 + [50_000]))
    assert s["count"] == 100
    assert s["p50_ms"] == pytest.approx(1.0, rel=0.01)
    assert s["max_ms"] == pytest.approx(50.0, rel=0.01)
    assert hist.percentile_curve(hist.new()) == []
    curve = hist.percentile_curve(_hist_of([1000, 2000]))
    assert curve[0][0] == 0.0 and curve[-1][0] == 100.0


def test_phase_shares_add_up_to_the_whole() -> None:
    phase = Phase("A", "mix", ops=1001, duration=5, concurrency=64, records=10, target_rate=900)
    shares = [phase.for_worker(i, 3) for i in range(3)]
    assert sum(s.ops for s in shares) == 1001
    assert sum(s.concurrency for s in shares) == 64
    assert sum(s.target_rate or 0 for s in shares) == pytest.approx(900)
    assert len({s.seed for s in shares}) == 3


class _BatchRecorder(Driver):
    """A driver that only records the batches it is sent."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []

    async def close(self) -> None:
        pass

    async def read(self, key: bytes) -> int:
        raise NotImplementedError

    async def update(self, key: bytes, value: bytes) -> None:
        raise NotImplementedError

    async def rmw(self, key: bytes, value: bytes) -> bool:
        raise NotImplementedError

    async def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        self.batches.append([k for k, _ in items])
        return 0

    async def get_many(self, keys: Sequence[bytes]) -> int:
        self.batches.append(list(keys))
        return 0


@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_batch_keys_count_what_was_sent_when_workers_have_fewer_records_than_a_batch(
    kind: PhaseKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    drivers: list[_BatchRecorder] = []

    def recorder(spec: DriverSpec) -> _BatchRecorder:
        drivers.append(_BatchRecorder())
        return drivers[-1]

    monkeypatch.setattr(runner, "make_driver", recorder)
    phase = Phase("b", kind, ops=7, duration=30, concurrency=1, records=31, batch_size=100)
    spec = DriverSpec("kvcluster", ("127.0.0.1:1",))
    results = [asyncio.run(Worker(spec, i, 2).run(phase.for_worker(i, 2))) for i in range(2)]
    for driver, result in zip(drivers, results, strict=True):
        assert all(len(b) == len(set(b)) == 15 for b in driver.batches)  # 31 // 2, distinct
        assert result.calls == len(driver.batches) > 0
        assert result.keys == sum(len(b) for b in driver.batches)
    merged = merge_phase(phase, results)
    assert merged["batch_size"] == 15
    assert merged["keys"] == 15 * merged["calls"]


def test_op_chooser_follows_the_mix_and_the_seed() -> None:
    mix = WORKLOADS["B"]
    chooser = OpChooser(mix, random.Random(5))
    draws = Counter(chooser.next() for _ in range(20_000))
    assert abs(draws["update"] / 20_000 - 0.05) < 0.01
    a, b = OpChooser(mix, random.Random(9)), OpChooser(mix, random.Random(9))
    assert [a.next() for _ in range(50)] == [b.next() for _ in range(50)]
    with pytest.raises(ValueError):
        OpChooser({}, random.Random(1))


def test_merge_phase_sums_workers_and_merges_their_histograms() -> None:
    phase = Phase("A", "mix", ops=10, duration=5, concurrency=2, records=10)
    r1 = WorkerResult(
        "A",
        hists={"read": hist.encode(_hist_of([1000] * 3))},
        calls=3,
        keys=3,
        all_calls=3,
        window_start=10.0,
        window_end=11.0,
        timeline=[1, 2],
    )
    r2 = WorkerResult("A", hists={"read": hist.encode(_hist_of([3000] * 1)),
                                  "update": hist.encode(_hist_of([5000] * 2))},
                      errors={"update": 1}, calls=3, keys=3, all_calls=4,
                      window_start=10.5, window_end=12.0, timeline=[3])  # fmt: skip
    merged = merge_phase(phase, [r1, r2])
    assert merged["calls"] == 6
    assert merged["window_s"] == pytest.approx(2.0)
    assert merged["calls_per_s"] == pytest.approx(3.0)
    assert merged["ops"]["read"]["count"] == 4
    assert merged["ops"]["update"]["errors"] == 1
    assert merged["all"]["count"] == 6
    assert merged["timeline"] == [4, 2]
    assert merged["errors"] == 1


def test_profile_summary_from_collapsed_stacks(tmp_path: Path) -> None:
    raw = tmp_path / "n1.txt"
    raw.write_text(
        "thread (0x1);run (asyncio/base_events.py);handle (kvcluster/server/services.py);"
        "SerializeToString (google/protobuf/message.py) 30\n"
        "thread (0x1);run (asyncio/base_events.py);_run_once (asyncio/base_events.py) 50\n"
        "thread (0x2);write (kvcluster/storage/lmdb_store.py) 20\n"
    )
    assert parse_collapsed(["a;b 3", "", "garbage"]) == [(["a", "b"], 3)]
    s = summarise(raw)
    assert s["samples"] == 100
    assert dict(s["components"]) == {
        "asyncio event loop": 50.0,
        "protobuf": 30.0,
        "kvcluster.storage.lmdb_store": 20.0,
    }
    assert dict(s["inclusive"])["asyncio/base_events.py:run"] == 80.0
    assert dict(s["kvcluster_deepest"])["kvcluster/server/services.py:handle"] == 30.0
    assert component("grpc/aio/_server.py:_handle") == "grpc (python + cython)"


def test_server_latency_from_two_scrapes() -> None:
    from benchmarks.promscrape import latency_delta, parse

    def text(count: float, fast: float, total: float) -> str:
        return (
            "# HELP kvcluster_request_seconds x\n"
            f'kvcluster_request_seconds_bucket{{op="put",le="0.001"}} {fast}\n'
            f'kvcluster_request_seconds_bucket{{op="put",le="0.01"}} {count}\n'
            f'kvcluster_request_seconds_bucket{{op="put",le="+Inf"}} {count}\n'
            f'kvcluster_request_seconds_count{{op="put"}} {count}\n'
            f'kvcluster_request_seconds_sum{{op="put"}} {total}\n'
        )

    before = [parse(text(10, 10, 0.005))]
    after = [parse(text(110, 60, 0.305))]  # 100 more: 50 under 1 ms, 50 in 1..10 ms
    delta = latency_delta(before, after)
    assert delta["put"]["count"] == 100
    assert delta["put"]["mean_ms"] == pytest.approx(3.0)
    assert delta["put"]["p50_ms"] == pytest.approx(1.0)
    assert delta["put"]["p99_ms"] == pytest.approx(1.0 + 9.0 * 49 / 50)


def test_writes_per_commit_from_two_scrapes() -> None:
    from benchmarks.promscrape import parse, storage_delta

    def text(writes: int, commits: int) -> str:
        return (
            "# TYPE kvcluster_storage_writes counter\n"
            f"kvcluster_storage_writes_total {writes}.0\n"
            f"kvcluster_storage_commits_total {commits}.0\n"
        )

    before = [parse(text(100, 40)), parse(text(7, 7))]
    after = [parse(text(400, 100)), parse(text(107, 47))]  # 400 writes in 100 commits
    assert storage_delta(before, after) == {
        "writes": 400,
        "commits": 100,
        "writes_per_commit": 4.0,
    }
    # a node that does not answer (empty scrape) adds nothing
    assert storage_delta([{}], [{}])["writes_per_commit"] is None
