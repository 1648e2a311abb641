"""Property tests of the set, register and session checkers.

Histories come from a correct sequential store (a single replica keeping siblings
the way dotted version vectors do), so every checker must accept them; then one
planted bug (a dropped value, an invented value) must be reported.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jepsen_lite.checkers.register import check_register
from jepsen_lite.checkers.session import check_session
from jepsen_lite.checkers.set_checker import check_set
from jepsen_lite.history import HistoryRecorder, Op, OpType

OUTCOMES: list[tuple[OpType, bool]] = [
    ("ok", True),
    ("ok", True),
    ("ok", True),
    ("info", True),  # took effect, client timed out
    ("info", False),  # timed out, never took effect
    ("fail", False),
]


def _recorder() -> HistoryRecorder:
    ticks = iter(range(0, 1_000_000, 10))
    return HistoryRecorder(clock=lambda: next(ticks))


@st.composite
def sibling_store_histories(draw: st.DrawFn) -> list[Op]:
    """A sequential run against one correct replica of a sibling store."""
    rec = _recorder()
    siblings: set[str] = set()
    ancestors: dict[str, set[str]] = {}  # value -> its causal past
    last_read: dict[int, list[str]] = {}
    procs = draw(st.integers(min_value=1, max_value=4))
    next_proc = procs  # a process that timed out is replaced by a new one
    live = list(range(procs))
    for n in range(draw(st.integers(min_value=1, max_value=30))):
        slot = draw(st.integers(min_value=0, max_value=procs - 1))
        proc = live[slot]
        f = draw(st.sampled_from(["read", "read", "write", "write", "delete"]))
        if f == "read":
            rec.invoke(proc, "read", "k")
            vals = sorted(siblings)
            rec.ok(proc, vals)
            last_read[proc] = vals
            continue
        outcome, applied = draw(st.sampled_from(OUTCOMES))
        use_ctx = proc in last_read and (f == "delete" or draw(st.booleans()))
        if f == "delete" and not use_ctx:
            continue
        seen = last_read.get(proc, []) if use_ctx else None
        value = f"v{n}"
        extra = None if seen is None else {"seen": seen}
        rec.invoke(proc, f, "k", value if f == "write" else None, extra=extra)
        if applied:
            covered = set(seen or ())
            for s in seen or ():
                covered |= ancestors.get(s, set())
            siblings -= covered
            if f == "write":
                ancestors[value] = covered
                siblings.add(value)
        rec.complete(proc, outcome, value if f == "write" else None)
        if outcome == "info":
            live[slot] = next_proc
            next_proc += 1
    # One more blind write, so every history has an acknowledged, unsuperseded value.
    rec.invoke(live[0], "write", "k", "last")
    siblings.add("last")
    rec.ok(live[0], "last")
    for proc in live[:2]:
        rec.invoke(proc, "read", "k", extra={"final": True})
        rec.ok(proc, sorted(siblings))
    return rec.history


def _replace_value(history: list[Op], pos: int, value: Any) -> list[Op]:
    old = history[pos]
    out = list(history)
    out[pos] = Op(old.index, old.type, old.process, old.time, old.f, old.key, value, old.extra)
    return out


@given(sibling_store_histories())
@settings(max_examples=300)
def test_correct_sibling_store_passes_register_and_session_checks(history: list[Op]) -> None:
    reg = check_register(history)
    assert reg.valid is True, reg.to_dict()
    assert reg.present_count >= 1
    ses = check_session(history)
    assert ses.valid is True, ses.to_dict()


@given(sibling_store_histories(), st.data())
@settings(max_examples=200)
def test_dropping_an_unsuperseded_value_from_a_final_read_is_a_lost_write(
    history: list[Op], data: st.DataObject
) -> None:
    last_write = max(i for i, op in enumerate(history) if op.f == "write")
    final_positions = [i for i, op in enumerate(history) if i > last_write and op.type == "ok"]
    pos = data.draw(st.sampled_from(final_positions))
    result = check_register(history)
    present = [
        v
        for v in history[pos].value
        if any(op.f == "write" and op.value == v and op.type == "ok" for op in history)
        and not any(v in op.extra.get("seen", ()) for op in history if op.type == "invoke")
    ]
    assert "last" in present and result.valid is True
    victim = data.draw(st.sampled_from(present))
    broken = _replace_value(history, pos, [v for v in history[pos].value if v != victim])
    result = check_register(broken)
    assert result.valid is False
    assert [a.value for a in result.lost] == [victim]


@given(sibling_store_histories(), st.data())
@settings(max_examples=100)
def test_an_invented_value_in_any_read_is_a_phantom(history: list[Op], data: st.DataObject) -> None:
    reads = [i for i, op in enumerate(history) if op.type == "ok" and op.f == "read"]
    pos = data.draw(st.sampled_from(reads))
    broken = _replace_value(history, pos, [*history[pos].value, "invented"])
    result = check_register(broken)
    assert result.valid is False
    assert [(a.kind, a.value) for a in result.anomalies] == [("phantom", "invented")]


@st.composite
def set_histories(draw: st.DrawFn) -> tuple[list[Op], set[int]]:
    """Adds with random outcomes, then final reads of what was really added."""
    rec = _recorder()
    present: set[int] = set()
    acked: set[int] = set()
    n = draw(st.integers(min_value=1, max_value=30))
    for e in range(n):
        outcome, applied = draw(st.sampled_from(OUTCOMES))
        rec.invoke(e, "add", "s", e)
        if applied:
            present.add(e)
        rec.complete(e, outcome, e)
        if outcome == "ok":
            acked.add(e)
        if draw(st.integers(0, 4)) == 0:
            rec.invoke(1000 + e, "read", "s")
            rec.ok(1000 + e, sorted(present))
    rec.invoke(5000, "read", "s", extra={"final": True})
    rec.ok(5000, sorted(present))
    return rec.history, acked


@given(set_histories(), st.data())
@settings(max_examples=200)
def test_set_checker_accepts_correct_runs_and_finds_a_dropped_element(
    case: tuple[list[Op], set[int]], data: st.DataObject
) -> None:
    history, acked = case
    result = check_set(history)
    assert result.valid is True, result.to_dict()
    assert result.ok_count == len(acked)
    if not acked:
        return
    victim = data.draw(st.sampled_from(sorted(acked)))
    final = len(history) - 1
    broken = _replace_value(history, final, [e for e in history[final].value if e != victim])
    result = check_set(broken)
    assert result.valid is False and result.lost_elements == [victim]
