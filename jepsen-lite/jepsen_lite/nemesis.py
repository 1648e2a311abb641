"""Nemeses: faults injected on a seeded schedule, and the log of what happened.

:func:`make_schedule` turns the enabled nemeses, the node ids, the time limit and a
seed into a list of :class:`Fault` windows: which fault, on which nodes, with which
parameters, from when and for how long. The schedule depends on nothing else, so
a seed always replays the same faults (the interleaving with client operations is
of course not replayed). Faults come one at a time, separated by quiet gaps:

- ``kill``: SIGKILL a node (a minority of them on larger clusters), start it again
  at the end of the window;
- ``pause``: SIGSTOP a node, SIGCONT at the end;
- ``partition``: one of the shapes ``isolate`` (one node alone), ``halves`` (a
  minority and a majority), ``ring`` (majorities ring: every node sees a majority,
  no two the same; needs 5+ nodes) and ``bridge`` (two halves that only one
  node connects);
- ``loss``: drop a fraction of node-to-node messages on some nodes;
- ``latency``: delay node-to-node messages on every node;
- ``clock``: skew each node's wall clock by up to ±30 s.

:class:`NemesisRunner` plays a schedule against a backend in a thread and records
every start and end in an :class:`EventLog` (``nemesis.jsonl``; times in the same
nanosecond clock as the history). When stopped it heals the current fault.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from jepsen_lite.backends.base import Backend

__all__ = [
    "NEMESES",
    "EventLog",
    "Fault",
    "NemesisRunner",
    "fault_windows",
    "load_events",
    "make_schedule",
    "parse_nemeses",
]

NEMESES = ("partition", "kill", "pause", "loss", "latency", "clock")
PARTITION_SHAPES = ("isolate", "halves", "ring", "bridge")


def parse_nemeses(text: str) -> list[str]:
    """``"partition,kill"`` -> ``["partition", "kill"]``; ``""``/``"none"`` -> ``[]``."""
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != "none"]
    if names == ["all"]:
        return list(NEMESES)
    unknown = [n for n in names if n not in NEMESES]
    if unknown:
        raise ValueError(f"unknown nemesis {', '.join(unknown)} (choose from {', '.join(NEMESES)})")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Fault:
    """One fault window of the schedule (times in seconds from the workload start)."""

    id: int
    kind: str
    start: float
    duration: float
    nodes: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> float:
        return self.start + self.duration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- shapes


def _symmetric(ids: Sequence[str], connected: Callable[[str, str], bool]) -> dict[str, list[str]]:
    return {a: sorted(b for b in ids if b != a and not connected(a, b)) for a in ids}


def partition_shape(shape: str, ids: Sequence[str], rng: random.Random) -> dict[str, list[str]]:
    """The blocked-peers map (symmetric) of a partition shape over ``ids``."""
    nodes = list(ids)
    rng.shuffle(nodes)
    n = len(nodes)
    if shape == "isolate":
        alone = nodes[0]
        return _symmetric(ids, lambda a, b: alone not in (a, b))
    if shape == "halves":
        minority = set(nodes[: n // 2] if n > 1 else [])
        return _symmetric(ids, lambda a, b: (a in minority) == (b in minority))
    if shape == "ring":
        # Every node talks to the nodes within distance d on a ring: a majority.
        d = (n // 2 + 1) // 2
        pos = {node: i for i, node in enumerate(nodes)}

        def near(a: str, b: str) -> bool:
            k = abs(pos[a] - pos[b])
            return min(k, n - k) <= d

        return _symmetric(ids, near)
    if shape == "bridge":
        bridge = nodes[0]
        left = set(nodes[1 : 1 + (n - 1) // 2])

        def linked(a: str, b: str) -> bool:
            return bridge in (a, b) or (a in left) == (b in left)

        return _symmetric(ids, linked)
    raise ValueError(f"unknown partition shape {shape!r}")


def _shapes_for(n: int) -> list[str]:
    if n < 3:
        return ["isolate"]
    return ["isolate", "halves", "bridge"] + (["ring"] if n >= 5 else [])


# ----------------------------------------------------------------------------- schedule


def _make_fault(
    fid: int, kind: str, ids: Sequence[str], rng: random.Random, start: float, duration: float
) -> Fault:
    n = len(ids)
    minority = max(1, (n - 1) // 2)
    if kind in ("kill", "pause"):
        nodes = sorted(rng.sample(list(ids), rng.randint(1, minority)))
        return Fault(fid, kind, start, duration, nodes)
    if kind == "partition":
        shape = rng.choice(_shapes_for(n))
        blocked = partition_shape(shape, ids, rng)
        cut = sorted(a for a, peers in blocked.items() if peers)
        links = sorted(f"{a}|{b}" for a, peers in blocked.items() for b in peers if a < b)
        params = {"shape": shape, "cut_links": links, "blocked": blocked}
        return Fault(fid, kind, start, duration, cut, params)
    if kind == "loss":
        nodes = sorted(rng.sample(list(ids), rng.randint(1, n)))
        p = round(rng.uniform(0.1, 0.4), 3)
        return Fault(fid, kind, start, duration, nodes, {"probability": p})
    if kind == "latency":
        lo = round(rng.uniform(5, 50), 1)
        hi = round(lo + rng.uniform(50, 250), 1)
        return Fault(fid, kind, start, duration, list(ids), {"delay_ms": [lo, hi]})
    if kind == "clock":
        offsets = {node: rng.randint(-30_000, 30_000) for node in ids}
        return Fault(fid, kind, start, duration, list(ids), {"offsets_ms": offsets})
    raise ValueError(f"unknown nemesis {kind!r}")


def make_schedule(
    nemeses: Sequence[str],
    ids: Sequence[str],
    time_limit: float,
    seed: int,
    *,
    quiet: tuple[float, float] = (1.0, 4.0),
    hold: tuple[float, float] = (3.0, 8.0),
) -> list[Fault]:
    """The fault windows for a run (deterministic in its arguments).

    Faults start after a quiet gap of U(quiet) seconds, last U(hold) seconds and end
    at least one second before ``time_limit``; for runs shorter than 40 s both
    ranges shrink in proportion (at most 10-20 % and 30-50 % of the run).
    """
    rng = random.Random(f"jepsen-lite-nemesis-{seed}")
    faults: list[Fault] = []
    if not nemeses or not ids:
        return faults
    # Short runs (tests) get proportionally shorter gaps and faults.
    quiet = (min(quiet[0], 0.1 * time_limit), min(quiet[1], 0.2 * time_limit))
    hold = (min(hold[0], 0.3 * time_limit), min(hold[1], 0.5 * time_limit))
    t = rng.uniform(*quiet)
    while True:
        duration = rng.uniform(*hold)
        if t + duration > time_limit - 1.0:
            duration = time_limit - 1.0 - t
            if duration < min(2.0, hold[0]):
                break
        kind = rng.choice(list(nemeses))
        faults.append(_make_fault(len(faults), kind, ids, rng, round(t, 3), round(duration, 3)))
        t += duration + rng.uniform(*quiet)
    return faults


# ----------------------------------------------------------------------------- events


class EventLog:
    """Thread-safe log of nemesis and phase events, streamed to a JSON-lines file.

    Every event has ``time`` (ns, same clock as the history), ``type`` (``start``,
    ``end``, ``phase`` or ``note``) and more fields depending on the type.
    """

    def __init__(self, path: Path | None, clock: Callable[[], int]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self._fh: IO[str] | None = open(path, "w", encoding="utf-8") if path else None  # noqa: SIM115

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            event = {"time": self.clock(), "wall": time.time(), "type": type_, **fields}
            self.events.append(event)
            if self._fh is not None:
                self._fh.write(json.dumps(event, default=str) + "\n")
                self._fh.flush()
            return event

    def phase(self, name: str, **fields: Any) -> None:
        self.emit("phase", name=name, **fields)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


_WINDOW_SKIP = {"time", "wall", "type", "fault", "kind", "nodes", "blocked"}


def _window(start: Mapping[str, Any], end: int) -> dict[str, Any]:
    detail = {k: v for k, v in start.items() if k not in _WINDOW_SKIP}
    return {
        "id": start["fault"],
        "kind": start["kind"],
        "nodes": start.get("nodes", []),
        "start": start["time"],
        "end": end,
        "detail": detail,
    }


def load_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fault_windows(events: Sequence[Mapping[str, Any]], end_time: int) -> list[dict[str, Any]]:
    """``[{kind, start, end, nodes, id}]`` (ns) from start/end events; an unfinished
    fault lasts until ``end_time``."""
    open_: dict[int, Mapping[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for e in events:
        if e.get("type") == "start":
            open_[int(e["fault"])] = e
        elif e.get("type") == "end" and int(e["fault"]) in open_:
            s = open_.pop(int(e["fault"]))
            out.append(_window(s, e["time"]))
    for s in open_.values():
        out.append(_window(s, end_time))
    return sorted(out, key=lambda w: (w["start"], w["id"]))


# ----------------------------------------------------------------------------- runner


def apply_fault(backend: Backend, fault: Fault) -> None:
    if fault.kind == "kill":
        for node in fault.nodes:
            backend.kill(node)
    elif fault.kind == "pause":
        for node in fault.nodes:
            backend.pause(node)
    elif fault.kind == "partition":
        backend.set_partition(fault.params["blocked"])
    elif fault.kind == "loss":
        for node in fault.nodes:
            backend.set_loss(node, float(fault.params["probability"]))
    elif fault.kind == "latency":
        lo, hi = fault.params["delay_ms"]
        for node in fault.nodes:
            backend.set_latency(node, float(lo), float(hi))
    elif fault.kind == "clock":
        for node, offset in sorted(fault.params["offsets_ms"].items()):
            backend.set_clock_offset(node, int(offset))
    else:
        raise ValueError(f"unknown nemesis {fault.kind!r}")


def heal_fault(backend: Backend, fault: Fault) -> None:
    if fault.kind == "kill":
        for node in fault.nodes:
            backend.start_node(node)
    elif fault.kind == "pause":
        for node in fault.nodes:
            backend.resume(node)
    elif fault.kind == "partition":
        backend.heal_partition()
    elif fault.kind == "loss":
        for node in fault.nodes:
            backend.set_loss(node, 0.0)
    elif fault.kind == "latency":
        for node in fault.nodes:
            backend.set_latency(node, 0.0, 0.0)
    elif fault.kind == "clock":
        for node in fault.nodes:
            backend.set_clock_offset(node, 0)


class NemesisRunner(threading.Thread):
    """Plays a schedule against a backend; :meth:`stop` heals the current fault."""

    def __init__(
        self, backend: Backend, schedule: Sequence[Fault], log: EventLog, origin: float
    ) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.backend = backend
        self.schedule = list(schedule)
        self.log = log
        self.origin = origin  # time.monotonic() of the workload start
        self._stop_event = threading.Event()
        self.errors: list[str] = []

    def stop(self, timeout: float = 120.0) -> None:
        self._stop_event.set()
        self.join(timeout)

    def _wait_until(self, t: float) -> bool:
        """Sleep until ``t`` seconds after the origin; False if stopped first."""
        delay = self.origin + t - time.monotonic()
        return not self._stop_event.wait(max(0.0, delay))

    def _do(self, what: str, fault: Fault, action: Callable[[Backend, Fault], None]) -> None:
        try:
            action(self.backend, fault)
        except Exception as exc:
            msg = f"{what} {fault.kind} #{fault.id}: {type(exc).__name__}: {exc}"
            self.errors.append(msg)
            self.log.emit("note", fault=fault.id, kind=fault.kind, error=msg)

    def run(self) -> None:
        for fault in self.schedule:
            if not self._wait_until(fault.start):
                return
            self.log.emit(
                "start", fault=fault.id, kind=fault.kind, nodes=fault.nodes, **fault.params
            )
            self._do("start", fault, apply_fault)
            self._wait_until(fault.end)
            self.log.emit("end", fault=fault.id, kind=fault.kind, nodes=fault.nodes)
            self._do("end", fault, heal_fault)
