"""Tests of kvcluster.core.phi: the phi-accrual failure detector.

Every time is an explicit millisecond value; jitter comes from a seeded
``random.Random``, so each test sees the same heartbeat trace on every run.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable

import pytest

from kvcluster.core.phi import (
    FailureDetectors,
    Liveness,
    PhiAccrualDetector,
    PhiSettings,
    phi_of,
)

INTERVAL = 250.0  # NodeSettings.heartbeat_interval, in ms


def fed(times: Iterable[float], **kwargs: float) -> PhiAccrualDetector:
    detector = PhiAccrualDetector(first_interval_ms=INTERVAL, **kwargs)  # type: ignore[arg-type]
    for t in times:
        detector.heartbeat(t)
    return detector


def regular(count: int, interval: float = INTERVAL, start: float = 0.0) -> list[float]:
    return [start + i * interval for i in range(count)]


def first_time_at(detector: PhiAccrualDetector, status: Liveness, since: float) -> float:
    """The first whole millisecond after ``since`` at which ``status`` is reached."""
    for step in range(60_000):
        if detector.status(since + step) is status:
            return since + step
    raise AssertionError(f"never {status.name} within a minute")


# -- the phi function ---------------------------------------------------------------------


def test_phi_of_is_about_0_3_at_the_mean() -> None:
    # 1 - F(mean) = 1/2, so phi = log10(2)
    assert phi_of(1000.0, 1000.0, 100.0) == pytest.approx(math.log10(2.0))


def test_phi_of_matches_the_normal_tail() -> None:
    # The logistic approximation is within a few per cent of -log10(1 - Phi(y)).
    for y in (1.0, 2.0, 3.0, 4.0):
        exact = -math.log10(0.5 * math.erfc(y / math.sqrt(2.0)))
        assert phi_of(y * 100.0, 0.0, 100.0) == pytest.approx(exact, rel=0.06)


def test_phi_of_is_monotonic_and_finite_far_into_the_tail() -> None:
    values = [phi_of(float(t), 1000.0, 100.0) for t in range(0, 100_000, 50)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert all(math.isfinite(v) and v >= 0.0 for v in values)
    assert values[-1] > 1e6  # an hour-long silence is "very dead", not NaN or an error


# -- regular heartbeats ----------------------------------------------------------------------


def test_unknown_before_any_heartbeat() -> None:
    detector = PhiAccrualDetector()
    assert detector.status(0.0) is Liveness.UNKNOWN
    assert detector.status(1e9) is Liveness.UNKNOWN
    assert detector.phi(1e9) == 0.0
    assert detector.last_heartbeat_ms is None


def test_first_heartbeat_is_judged_against_the_expected_interval() -> None:
    detector = fed([1000.0])
    assert detector.mean_ms == pytest.approx(INTERVAL)
    assert detector.samples == 2
    assert detector.status(1000.0 + INTERVAL) is Liveness.UP
    assert detector.status(1000.0 + 60_000.0) is Liveness.DOWN


def test_regular_heartbeats_keep_phi_low_and_status_up() -> None:
    times = regular(400)
    detector = fed([])
    for t in times:
        detector.heartbeat(t)
        # checked just before the next heartbeat is due: the worst point of the cycle
        assert detector.phi(t + INTERVAL - 1) < 0.01
        assert detector.status(t + INTERVAL - 1) is Liveness.UP
    assert detector.mean_ms == pytest.approx(INTERVAL)
    assert detector.samples == detector.settings.window  # the window is bounded


# -- silence ---------------------------------------------------------------------------------


def test_silence_makes_phi_grow_monotonically() -> None:
    detector = fed(regular(50))
    last = regular(50)[-1]
    values = [detector.phi(last + dt) for dt in range(0, 20_000, 10)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert values[-1] > values[0]
    # strictly increasing once it is distinguishable from zero
    visible = [v for v in values if v > 1e-9]
    assert all(a < b for a, b in itertools.pairwise(visible))


def test_silence_goes_up_then_suspect_then_down_at_the_thresholds() -> None:
    detector = fed(regular(50))
    last = regular(50)[-1]
    suspect_at = first_time_at(detector, Liveness.SUSPECT, last)
    down_at = first_time_at(detector, Liveness.DOWN, last)
    assert last < suspect_at < down_at
    s = detector.settings
    assert detector.phi(suspect_at - 1) < s.threshold_suspect <= detector.phi(suspect_at)
    assert detector.phi(down_at - 1) < s.threshold_down <= detector.phi(down_at)
    assert detector.status(suspect_at - 1) is Liveness.UP
    assert detector.status(down_at - 1) is Liveness.SUSPECT
    # once down, staying silent never brings it back
    assert all(detector.status(down_at + dt) is Liveness.DOWN for dt in range(0, 600_000, 997))


def test_defaults_detect_a_dead_node_within_a_few_seconds_but_not_before_the_pause() -> None:
    detector = fed(regular(100))
    last = regular(100)[-1]
    down_after = first_time_at(detector, Liveness.DOWN, last) - last
    suspect_after = first_time_at(detector, Liveness.SUSPECT, last) - last
    pause = detector.settings.acceptable_pause_ms
    # never before one interval plus the acceptable pause, always within 3 s
    assert INTERVAL + pause < suspect_after < down_after <= 3000.0


def test_custom_thresholds_shift_the_verdicts() -> None:
    eager = fed(regular(50), threshold_suspect=1.0, threshold_down=2.0)
    lax = fed(regular(50), threshold_suspect=10.0, threshold_down=20.0)
    last = regular(50)[-1]
    assert first_time_at(eager, Liveness.DOWN, last) < first_time_at(lax, Liveness.SUSPECT, last)


def test_a_longer_acceptable_pause_delays_detection_by_that_much() -> None:
    short = fed(regular(50), acceptable_pause_ms=500.0)
    long = fed(regular(50), acceptable_pause_ms=2500.0)
    last = regular(50)[-1]
    delay = first_time_at(long, Liveness.DOWN, last) - first_time_at(short, Liveness.DOWN, last)
    assert delay == pytest.approx(2000.0, abs=2.0)


# -- recovery -------------------------------------------------------------------------------


def test_recovery_after_heartbeats_resume() -> None:
    detector = fed(regular(50))
    last = regular(50)[-1]
    outage_end = last + 30_000.0
    assert detector.status(outage_end) is Liveness.DOWN
    mean_before = detector.mean_ms
    samples_before = detector.samples

    detector.heartbeat(outage_end)
    assert detector.status(outage_end) is Liveness.UP
    assert detector.phi(outage_end) < 0.01
    # the 30 s gap is not a sample of the network: the model is unchanged
    assert detector.mean_ms == mean_before
    assert detector.samples == samples_before

    for t in regular(20, start=outage_end + INTERVAL):
        assert detector.status(t) is Liveness.UP
        detector.heartbeat(t)
    assert detector.samples == samples_before + 20
    # and it is detected again after a new silence, as quickly as before
    again = outage_end + 20 * INTERVAL
    fresh = fed(regular(50))
    expected = first_time_at(fresh, Liveness.DOWN, last) - last
    assert first_time_at(detector, Liveness.DOWN, again) - again == pytest.approx(expected, abs=5)


def test_a_heartbeat_while_suspect_is_not_recorded_either() -> None:
    detector = fed(regular(50))
    last = regular(50)[-1]
    suspect_at = first_time_at(detector, Liveness.SUSPECT, last)
    assert detector.status(suspect_at) is Liveness.SUSPECT
    samples = detector.samples
    detector.heartbeat(suspect_at)
    assert detector.samples == samples
    assert detector.status(suspect_at) is Liveness.UP


# -- jitter ---------------------------------------------------------------------------------


def jittered(count: int, jitter: float, seed: int, stall_every: int = 0) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        gap = INTERVAL + rng.uniform(-jitter, jitter)
        if stall_every and i % stall_every == stall_every - 1:
            gap += 1000.0  # an event-loop stall or GC pause on the sender
        t += gap
        out.append(t)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_jittery_heartbeats_are_never_suspect(seed: int) -> None:
    times = jittered(2000, jitter=200.0, seed=seed, stall_every=97)
    detector = fed(times[:1])
    for prev, nxt in itertools.pairwise(times):
        # the highest phi of each gap is just before the next heartbeat
        assert detector.status(nxt - 0.001) is Liveness.UP, (prev, nxt)
        detector.heartbeat(nxt)


def test_jitter_widens_the_model_and_delays_detection() -> None:
    calm = fed(regular(200))
    noisy_times = jittered(200, jitter=240.0, seed=7)
    noisy = fed(noisy_times)
    assert noisy.std_ms > calm.std_ms == calm.settings.min_std_ms
    calm_delay = first_time_at(calm, Liveness.DOWN, regular(200)[-1]) - regular(200)[-1]
    noisy_delay = first_time_at(noisy, Liveness.DOWN, noisy_times[-1]) - noisy_times[-1]
    assert noisy_delay > calm_delay


def test_two_signals_per_interval_ping_and_pong_are_tolerated() -> None:
    # membership feeds both the peer's pings and its pongs: very uneven intervals
    times = sorted([*regular(400), *regular(400, start=37.0)])
    detector = fed([])
    for prev, nxt in itertools.pairwise(times):
        detector.heartbeat(prev)
        assert detector.status(nxt) is Liveness.UP
    detector.heartbeat(times[-1])
    assert first_time_at(detector, Liveness.DOWN, times[-1]) - times[-1] <= 3000.0


# -- determinism and input checks --------------------------------------------------------------


def test_deterministic_for_the_same_trace() -> None:
    times = jittered(500, jitter=150.0, seed=3)
    a, b = fed(times), fed(times)
    probes = [times[-1] + dt for dt in range(0, 5000, 7)]
    assert [a.phi(t) for t in probes] == [b.phi(t) for t in probes]
    assert (a.mean_ms, a.std_ms, a.samples) == (b.mean_ms, b.std_ms, b.samples)


def test_time_going_backwards_is_rejected_and_changes_nothing() -> None:
    detector = fed(regular(10))
    before = (detector.last_heartbeat_ms, detector.mean_ms, detector.samples)
    with pytest.raises(ValueError, match="older"):
        detector.heartbeat(regular(10)[-1] - 1.0)
    with pytest.raises(ValueError, match="finite"):
        detector.heartbeat(math.nan)
    assert (detector.last_heartbeat_ms, detector.mean_ms, detector.samples) == before


def test_a_duplicate_heartbeat_is_a_no_op() -> None:
    detector = fed(regular(10))
    before = (detector.last_heartbeat_ms, detector.mean_ms, detector.samples)
    detector.heartbeat(regular(10)[-1])
    assert (detector.last_heartbeat_ms, detector.mean_ms, detector.samples) == before


def test_asking_about_a_time_before_the_last_heartbeat_is_up() -> None:
    detector = fed(regular(10))
    assert detector.status(0.0) is Liveness.UP


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold_suspect": 8.0, "threshold_down": 8.0}, "threshold_suspect"),
        ({"threshold_suspect": 0.0}, "threshold_suspect"),
        ({"threshold_down": math.inf}, "finite"),
        ({"window": 1}, "window"),
        ({"min_std_ms": 0.0}, "min_std_ms"),
        ({"acceptable_pause_ms": -1.0}, "acceptable_pause_ms"),
        ({"first_interval_ms": 0.0}, "first_interval_ms"),
        ({"first_interval_ms": math.nan}, "first_interval_ms"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PhiAccrualDetector(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        FailureDetectors(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        PhiSettings(**kwargs)  # type: ignore[arg-type]


def test_from_settings_equals_keyword_construction() -> None:
    settings = PhiSettings(threshold_suspect=3.0, threshold_down=9.0, window=10)
    a = PhiAccrualDetector.from_settings(settings)
    b = PhiAccrualDetector(threshold_suspect=3.0, threshold_down=9.0, window=10)
    assert a.settings == b.settings == settings
    for t in regular(30):
        a.heartbeat(t)
        b.heartbeat(t)
    assert a.phi(10_000.0) == b.phi(10_000.0)
    assert a.samples == 10


# -- FailureDetectors ---------------------------------------------------------------------------


def test_failure_detectors_track_each_node_separately() -> None:
    detectors = FailureDetectors(first_interval_ms=INTERVAL)
    for t in regular(40):
        detectors.heartbeat("n1", t)
        if t < 5000.0:
            detectors.heartbeat("n2", t)
    now = regular(40)[-1] + 100.0
    assert detectors.status("n1", now) is Liveness.UP
    assert detectors.status("n2", now) is Liveness.DOWN
    assert detectors.status("n3", now) is Liveness.UNKNOWN
    assert detectors.phi("n3", now) == 0.0
    assert detectors.phi("n2", now) > detectors.phi("n1", now)
    assert detectors.statuses(now) == {"n1": Liveness.UP, "n2": Liveness.DOWN}
    assert len(detectors) == 2
    assert "n1" in detectors
    assert "n3" not in detectors


def test_failure_detectors_iterate_in_node_order_and_forget_removed_nodes() -> None:
    detectors = FailureDetectors()
    for node in ("c", "a", "b"):
        detectors.heartbeat(node, 0.0)
    assert list(detectors) == ["a", "b", "c"]
    assert list(detectors.statuses(0.0)) == ["a", "b", "c"]
    detectors.remove("b")
    detectors.remove("never-seen")
    assert list(detectors) == ["a", "c"]
    assert detectors.status("b", 0.0) is Liveness.UNKNOWN
    assert detectors.get("b") is None


def test_failure_detectors_share_their_settings() -> None:
    detectors = FailureDetectors(threshold_suspect=2.0, threshold_down=4.0, window=7)
    detectors.heartbeat("n1", 0.0)
    detector = detectors.get("n1")
    assert detector is not None
    assert detector.settings == detectors.settings == PhiSettings(2.0, 4.0, 7)


def test_a_bad_first_heartbeat_does_not_add_the_node() -> None:
    detectors = FailureDetectors()
    with pytest.raises(ValueError):
        detectors.heartbeat("n1", math.inf)
    assert "n1" not in detectors
