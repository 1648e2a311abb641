"""Phi-accrual failure detection (Hayashibara, Défago, Yared, Katayama 2004).

Instead of a yes/no timeout, an accrual detector outputs a suspicion level
``phi`` that grows continuously while a peer stays silent::

    phi(t) = -log10(P(the next heartbeat arrives later than t - last))

so ``phi = 1`` means a 10 % chance that a healthy peer would have been this
late, ``phi = 8`` one in 10^8. The probability comes from a model of the
intervals between the peer's recent heartbeats (a sliding window), so the
detector adapts to each peer's network. Callers pick thresholds: below
``threshold_suspect`` a peer is :attr:`Liveness.UP`, from there up to
``threshold_down`` it is :attr:`Liveness.SUSPECT`, and beyond it is
:attr:`Liveness.DOWN`.

The model: Akka's, not Cassandra's
----------------------------------
Cassandra's detector assumes exponentially distributed intervals (Poisson
arrivals), which gives ``phi = delta / mean * log10(e)``: no variance term,
so it neither learns a peer's jitter nor can be told how long a pause to
forgive, and with periodic heartbeats (whose intervals cluster tightly around
the period - the opposite of memoryless) it convicts only after ~18 mean
intervals at ``phi = 8``. Akka's variant, used here, models intervals as
normal with mean ``mean + acceptable_pause_ms`` and standard deviation
``max(std, min_std_ms)``. The knobs then mean something an operator can
reason about: a peer is declared down roughly
``mean + acceptable_pause + k * std`` after its last heartbeat (``k`` ~ 4 to
6 for the thresholds here), the pause allowance absorbs event-loop stalls and
GC pauses, and the ``min_std_ms`` floor keeps a perfectly regular peer (std
near 0) from being convicted a few milliseconds after one late heartbeat.

The normal CDF ``F`` is computed with the logistic approximation of Bowling
et al. (2009) that Akka uses, ``F(y) ~ 1 / (1 + exp(-z))`` with
``z = y * (1.5976 + 0.070566 * y**2)``: it needs no ``erf``, is strictly
increasing in ``y`` (so ``phi`` grows monotonically with silence, which is
all a threshold detector needs) and its CDF error is below 1.4e-4. Then
``phi = -log10(1 - F) = log10(1 + exp(z))``, which is evaluated here as a
numerically stable softplus: unlike Akka's two-branch formula it never
overflows or takes ``log(0)``, and it stays finite and increasing for any
silence of practical length.

As in Akka, the interval that ends a silence long enough to make the peer
not UP is not recorded (a crash and restart is not a sample of the network),
and the window starts from two synthetic intervals
``first_interval_ms * (1 -+ 1/4)`` so the first seconds after the first
heartbeat are judged against the expected heartbeat period.

Pure: times are milliseconds passed in by the caller (from a monotonic
clock); nothing here reads a clock.

Defaults, for heartbeats every 250 ms: a regular peer becomes SUSPECT about
2.2 s and DOWN about 2.3 s after its last heartbeat; a peer whose heartbeats
arrive with jitter of a few hundred milliseconds, or with occasional stalls
of up to ~1.5 s, stays UP.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "FailureDetectors",
    "Liveness",
    "PhiAccrualDetector",
    "PhiSettings",
    "phi_of",
]

_LN10 = math.log(10.0)

DEFAULT_THRESHOLD_SUSPECT = 5.0
DEFAULT_THRESHOLD_DOWN = 8.0
DEFAULT_WINDOW = 200
DEFAULT_MIN_STD_MS = 100.0
DEFAULT_ACCEPTABLE_PAUSE_MS = 1500.0
DEFAULT_FIRST_INTERVAL_MS = 500.0


class Liveness(enum.Enum):
    """What a detector says about a peer at a given time."""

    UNKNOWN = "unknown"  # no heartbeat ever received
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class PhiSettings:
    """Parameters of a :class:`PhiAccrualDetector` (validated on creation).

    ``threshold_suspect`` / ``threshold_down``: phi levels for SUSPECT / DOWN.
    ``window``: how many recent intervals the model is fitted to.
    ``min_std_ms``: floor of the standard deviation used in the model.
    ``acceptable_pause_ms``: silence forgiven on top of the mean interval.
    ``first_interval_ms``: expected heartbeat interval before any is measured.
    """

    threshold_suspect: float = DEFAULT_THRESHOLD_SUSPECT
    threshold_down: float = DEFAULT_THRESHOLD_DOWN
    window: int = DEFAULT_WINDOW
    min_std_ms: float = DEFAULT_MIN_STD_MS
    acceptable_pause_ms: float = DEFAULT_ACCEPTABLE_PAUSE_MS
    first_interval_ms: float = DEFAULT_FIRST_INTERVAL_MS

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold_suspect < self.threshold_down:
            raise ValueError(
                f"threshold_suspect ({self.threshold_suspect}) must be positive and below "
                f"threshold_down ({self.threshold_down})"
            )
        if not math.isfinite(self.threshold_down):
            raise ValueError("threshold_down must be finite")
        if self.window < 2:
            raise ValueError(f"window ({self.window}) must be at least 2")
        if not (math.isfinite(self.min_std_ms) and self.min_std_ms > 0.0):
            raise ValueError(f"min_std_ms ({self.min_std_ms}) must be positive")
        if not (math.isfinite(self.acceptable_pause_ms) and self.acceptable_pause_ms >= 0.0):
            raise ValueError(
                f"acceptable_pause_ms ({self.acceptable_pause_ms}) must not be negative"
            )
        if not (math.isfinite(self.first_interval_ms) and self.first_interval_ms > 0.0):
            raise ValueError(f"first_interval_ms ({self.first_interval_ms}) must be positive")


def phi_of(elapsed_ms: float, mean_ms: float, std_ms: float) -> float:
    """``-log10(1 - F(elapsed))`` for a normal ``F(mean_ms, std_ms)`` (logistic approx.).

    Non-decreasing in ``elapsed_ms`` (strictly, until it underflows to 0.0 far
    below the mean); ``std_ms`` must be positive.
    """
    y = (elapsed_ms - mean_ms) / std_ms
    z = y * (1.5976 + 0.070566 * y * y)
    # log10(1 + e^z) as a stable softplus: no overflow for large z, no log(0).
    softplus = z + math.log1p(math.exp(-z)) if z > 0.0 else math.log1p(math.exp(z))
    return softplus / _LN10


class PhiAccrualDetector:
    """The failure detector of one peer: feed it heartbeats, ask it for phi."""

    __slots__ = ("_intervals", "_last_ms", "_mean_ms", "_settings", "_std_ms")

    def __init__(
        self,
        *,
        threshold_suspect: float = DEFAULT_THRESHOLD_SUSPECT,
        threshold_down: float = DEFAULT_THRESHOLD_DOWN,
        window: int = DEFAULT_WINDOW,
        min_std_ms: float = DEFAULT_MIN_STD_MS,
        acceptable_pause_ms: float = DEFAULT_ACCEPTABLE_PAUSE_MS,
        first_interval_ms: float = DEFAULT_FIRST_INTERVAL_MS,
    ) -> None:
        self._init(
            PhiSettings(
                threshold_suspect=threshold_suspect,
                threshold_down=threshold_down,
                window=window,
                min_std_ms=min_std_ms,
                acceptable_pause_ms=acceptable_pause_ms,
                first_interval_ms=first_interval_ms,
            )
        )

    @classmethod
    def from_settings(cls, settings: PhiSettings) -> PhiAccrualDetector:
        detector = cls.__new__(cls)
        detector._init(settings)
        return detector

    def _init(self, settings: PhiSettings) -> None:
        self._settings = settings
        self._intervals: deque[float] = deque(maxlen=settings.window)
        self._last_ms: float | None = None
        self._mean_ms = 0.0
        self._std_ms = 0.0

    # -- inputs -----------------------------------------------------------------------

    def heartbeat(self, now_ms: float) -> None:
        """Record that a heartbeat (any sign of life) from the peer arrived at ``now_ms``.

        Times must not go backwards (use a monotonic clock): a heartbeat older
        than the previous one raises ValueError and changes nothing. A second
        heartbeat at the same instant is a no-op.
        """
        if not math.isfinite(now_ms):
            raise ValueError(f"heartbeat time {now_ms!r} is not finite")
        last = self._last_ms
        if last is None:
            first = self._settings.first_interval_ms
            self._intervals.extend((first - first / 4.0, first + first / 4.0))
            self._refit()
        elif now_ms < last:
            raise ValueError(f"heartbeat at {now_ms} ms is older than the last one ({last} ms)")
        elif now_ms == last:
            return
        elif self.phi(now_ms) < self._settings.threshold_suspect:
            # Only intervals that ended while the peer was UP describe the network;
            # the one that ends an outage would inflate the mean and the spread.
            self._intervals.append(now_ms - last)
            self._refit()
        self._last_ms = now_ms

    def _refit(self) -> None:
        n = len(self._intervals)
        mean = math.fsum(self._intervals) / n
        variance = math.fsum((x - mean) ** 2 for x in self._intervals) / n
        self._mean_ms = mean
        self._std_ms = math.sqrt(variance)

    # -- outputs ----------------------------------------------------------------------

    def phi(self, now_ms: float) -> float:
        """The suspicion level at ``now_ms``; 0.0 before the first heartbeat."""
        last = self._last_ms
        if last is None:
            return 0.0
        s = self._settings
        elapsed = max(0.0, now_ms - last)
        return phi_of(elapsed, self._mean_ms + s.acceptable_pause_ms, self.std_ms)

    def status(self, now_ms: float) -> Liveness:
        if self._last_ms is None:
            return Liveness.UNKNOWN
        phi = self.phi(now_ms)
        if phi < self._settings.threshold_suspect:
            return Liveness.UP
        if phi < self._settings.threshold_down:
            return Liveness.SUSPECT
        return Liveness.DOWN

    @property
    def settings(self) -> PhiSettings:
        return self._settings

    @property
    def last_heartbeat_ms(self) -> float | None:
        return self._last_ms

    @property
    def mean_ms(self) -> float:
        """Mean of the recorded intervals (0.0 before the first heartbeat)."""
        return self._mean_ms

    @property
    def std_ms(self) -> float:
        """Standard deviation the model uses (never below ``min_std_ms``)."""
        return max(self._std_ms, self._settings.min_std_ms)

    @property
    def samples(self) -> int:
        """How many intervals the model currently rests on (including the two seeds)."""
        return len(self._intervals)


class FailureDetectors:
    """One :class:`PhiAccrualDetector` per peer, created on its first heartbeat.

    A peer never heard from is :attr:`Liveness.UNKNOWN` with phi 0.0; what
    that means (up or down) is the caller's policy. Iteration is in node-id
    order, so anything derived from it is deterministic.
    """

    __slots__ = ("_detectors", "_settings")

    def __init__(
        self,
        *,
        threshold_suspect: float = DEFAULT_THRESHOLD_SUSPECT,
        threshold_down: float = DEFAULT_THRESHOLD_DOWN,
        window: int = DEFAULT_WINDOW,
        min_std_ms: float = DEFAULT_MIN_STD_MS,
        acceptable_pause_ms: float = DEFAULT_ACCEPTABLE_PAUSE_MS,
        first_interval_ms: float = DEFAULT_FIRST_INTERVAL_MS,
    ) -> None:
        self._settings = PhiSettings(
            threshold_suspect=threshold_suspect,
            threshold_down=threshold_down,
            window=window,
            min_std_ms=min_std_ms,
            acceptable_pause_ms=acceptable_pause_ms,
            first_interval_ms=first_interval_ms,
        )
        self._detectors: dict[str, PhiAccrualDetector] = {}

    @property
    def settings(self) -> PhiSettings:
        return self._settings

    def heartbeat(self, node: str, now_ms: float) -> None:
        detector = self._detectors.get(node)
        if detector is None:
            detector = PhiAccrualDetector.from_settings(self._settings)
            detector.heartbeat(now_ms)  # validates now_ms before the peer is added
            self._detectors[node] = detector
        else:
            detector.heartbeat(now_ms)

    def phi(self, node: str, now_ms: float) -> float:
        detector = self._detectors.get(node)
        return 0.0 if detector is None else detector.phi(now_ms)

    def status(self, node: str, now_ms: float) -> Liveness:
        detector = self._detectors.get(node)
        return Liveness.UNKNOWN if detector is None else detector.status(now_ms)

    def statuses(self, now_ms: float) -> dict[str, Liveness]:
        """Every known peer's status, in node-id order."""
        return {node: self._detectors[node].status(now_ms) for node in self}

    def get(self, node: str) -> PhiAccrualDetector | None:
        return self._detectors.get(node)

    def remove(self, node: str) -> None:
        """Forget a peer (it left the cluster); unknown peers are ignored."""
        self._detectors.pop(node, None)

    def __contains__(self, node: object) -> bool:
        return node in self._detectors

    def __len__(self) -> int:
        return len(self._detectors)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._detectors))
