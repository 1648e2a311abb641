"""Property tests of the linearizability checker.

- A history made from a sequential execution, with every operation's invocation and
  completion moved randomly around its linearization point (and some completions
  turned into timeouts, plus writes that failed or timed out without effect), is
  always linearizable.
- A strictly sequential history with one read result corrupted never is.
- On small random concurrent histories the checker agrees with a brute-force search
  over all orders (this guards the search's shortcuts: memoisation, greedy reads,
  interchangeable pending operations).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from functools import cache
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from jepsen_lite.checkers.linearizable import (
    UNKNOWN,
    CASRegisterModel,
    KVRegisterModel,
    Model,
    check_linearizable,
)
from jepsen_lite.history import Op, OpType, freeze, pairs, validate

VALUES = st.integers(min_value=0, max_value=3)


@dataclass
class Planned:
    """One operation of a generated history, with its times and outcome."""

    f: str
    key: str
    arg: Any
    result: Any
    outcome: OpType  # ok | fail | info
    invoke_t: int
    complete_t: int | None  # None: the history ends before it completes


def _render(plans: list[Planned]) -> list[Op]:
    """Turn planned operations into a valid history: events sorted by time, each op on
    a process that is free at its invocation."""
    events: list[tuple[int, int, int]] = []  # (time, 0=invoke/1=complete, plan index)
    for i, p in enumerate(plans):
        events.append((p.invoke_t, 0, i))
        if p.complete_t is not None:
            events.append((p.complete_t, 1, i))
    events.sort()
    free: list[int] = []
    next_proc = 0
    proc_of: dict[int, int] = {}
    history: list[Op] = []
    for t, kind, i in events:
        p = plans[i]
        if kind == 0:
            if free:
                proc = free.pop(0)
            else:
                proc, next_proc = next_proc, next_proc + 1
            proc_of[i] = proc
            history.append(Op(len(history), "invoke", proc, t, p.f, p.key, p.arg))
        else:
            proc = proc_of[i]
            value = p.result if p.outcome == "ok" else p.arg
            history.append(Op(len(history), p.outcome, proc, t, p.f, p.key, value))
            if p.outcome != "info":  # a process that timed out is not reused
                free.append(proc)
    validate(history)
    return history


@st.composite
def sequential_cas_histories(draw: st.DrawFn) -> list[Op]:
    keys = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2, unique=True))
    state: dict[str, Any] = dict.fromkeys(keys)
    plans: list[Planned] = []
    n = draw(st.integers(min_value=1, max_value=24))
    for k in range(n):
        t = 100 * (k + 1)  # linearization point
        key = draw(st.sampled_from(keys))
        f = draw(st.sampled_from(["read", "write", "cas"]))
        outcome: OpType = "ok"
        arg: Any
        result: Any
        if f == "read":
            arg, result = None, state[key]
        elif f == "write":
            arg = draw(VALUES)
            result = arg
            state[key] = arg
        else:
            frm, to = draw(VALUES), draw(VALUES)
            arg = [frm, to]
            result = arg
            if state[key] == frm:
                state[key] = to
            else:
                outcome = "fail"  # did not happen
        inv = t - draw(st.integers(min_value=0, max_value=250))
        done: int | None = t + draw(st.integers(min_value=0, max_value=250))
        if outcome == "ok" and f != "read" and draw(st.integers(0, 5)) == 0:
            # It took effect but the client timed out (or never heard back).
            outcome = "info"
            done = None if draw(st.booleans()) else done
        plans.append(Planned(f, key, arg, result, outcome, inv, done))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        # Writes that never took effect: failed, or timed out.
        inv = draw(st.integers(min_value=0, max_value=100 * (n + 1)))
        outcome = draw(st.sampled_from(["fail", "info"]))
        done = inv + draw(st.integers(min_value=0, max_value=200))
        plans.append(Planned("write", draw(st.sampled_from(keys)), 9, 9, outcome, inv, done))
    return _render(plans)


@st.composite
def sequential_kv_histories(draw: st.DrawFn) -> list[Op]:
    state = ""
    plans: list[Planned] = []
    n = draw(st.integers(min_value=1, max_value=20))
    for k in range(n):
        t = 100 * (k + 1)
        f = draw(st.sampled_from(["get", "put", "append", "append"]))
        if f == "get":
            arg, result = None, state
        else:
            arg = f"<{k}>"
            result = arg
            state = arg if f == "put" else state + arg
        inv = t - draw(st.integers(min_value=0, max_value=300))
        done = t + draw(st.integers(min_value=0, max_value=300))
        plans.append(Planned(f, "k", arg, result, "ok", inv, done))
    return _render(plans)


@given(sequential_cas_histories())
@settings(max_examples=300)
def test_histories_from_a_sequential_execution_are_linearizable(history: list[Op]) -> None:
    result = check_linearizable(history, CASRegisterModel(), max_steps=None, time_limit_s=None)
    assert result.valid is True, result.to_dict()


@given(sequential_kv_histories())
@settings(max_examples=200)
def test_kv_histories_from_a_sequential_execution_are_linearizable(history: list[Op]) -> None:
    result = check_linearizable(
        history, KVRegisterModel(initial=""), max_steps=None, time_limit_s=None
    )
    assert result.valid is True, result.to_dict()


@given(st.data())
@settings(max_examples=200)
def test_corrupted_read_in_a_sequential_history_is_detected(data: st.DataObject) -> None:
    state: Any = None
    history: list[Op] = []
    read_positions: list[tuple[int, Any]] = []
    n = data.draw(st.integers(min_value=1, max_value=15))
    for k in range(n):
        f = data.draw(st.sampled_from(["read", "write"])) if k < n - 1 else "read"
        proc = data.draw(st.integers(min_value=0, max_value=3))
        i = len(history)
        if f == "read":
            history.append(Op(i, "invoke", proc, i, "read", "k"))
            history.append(Op(i + 1, "ok", proc, i + 1, "read", "k", state))
            read_positions.append((i + 1, state))
        else:
            v = data.draw(VALUES)
            history.append(Op(i, "invoke", proc, i, "write", "k", v))
            history.append(Op(i + 1, "ok", proc, i + 1, "write", "k", v))
            state = v
    pos, correct = data.draw(st.sampled_from(read_positions))
    wrong = data.draw(st.sampled_from([v for v in [None, 0, 1, 2, 3, 4] if v != correct]))
    old = history[pos]
    history[pos] = Op(old.index, old.type, old.process, old.time, old.f, old.key, wrong)
    result = check_linearizable(history, max_steps=None, time_limit_s=None)
    assert result.valid is False
    cex = result.invalid_keys[0].counterexample
    assert cex is not None and cex.op.completion == history[pos]


# ----------------------------------------------------------------------------- brute force


def brute_force_linearizable(model: Model[Any], history: list[Op]) -> bool:
    """Try every real-time-respecting order of every subset of pending operations."""
    ops = [p for p in pairs(history) if not p.is_fail]
    n = len(ops)
    inputs = [model.input(p.invoke) for p in ops]
    outputs = [
        model.output(p.completion) if p.is_ok and p.completion is not None else UNKNOWN for p in ops
    ]
    must_have = sum(1 << i for i, p in enumerate(ops) if p.is_ok)
    # before[i]: completed ops that returned before op i was invoked.
    before = [
        sum(
            1 << j
            for j, q in enumerate(ops)
            if q.is_ok and q.complete_pos is not None and q.complete_pos < p.invoke_pos
        )
        for p in ops
    ]

    @cache
    def search(done: int, state: Hashable) -> bool:
        if done & must_have == must_have:
            return True
        for i in range(n):
            if done >> i & 1 or before[i] & ~done:
                continue
            ok, nxt = model.step(state, inputs[i], outputs[i])
            if ok and search(done | 1 << i, nxt):
                return True
        return False

    return search(0, model.init())


@st.composite
def random_concurrent_histories(draw: st.DrawFn) -> list[Op]:
    """Arbitrary (mostly non-linearizable) single-key CAS-register histories."""
    procs = draw(st.integers(min_value=1, max_value=4))
    budget = draw(st.integers(min_value=1, max_value=8))
    outstanding: dict[int, Op] = {}
    retired: set[int] = set()
    history: list[Op] = []
    invoked = 0
    while invoked < budget or outstanding:
        free = [p for p in range(procs * 3) if p not in outstanding and p not in retired]
        can_invoke = invoked < budget and free
        if can_invoke and (not outstanding or draw(st.booleans())):
            proc = draw(st.sampled_from(free[:procs]))
            f = draw(st.sampled_from(["read", "write", "write", "cas"]))
            arg: Any = None
            if f == "write":
                arg = draw(VALUES)
            elif f == "cas":
                arg = [draw(VALUES), draw(VALUES)]
            op = Op(len(history), "invoke", proc, len(history), f, "k", arg)
            outstanding[proc] = op
            history.append(op)
            invoked += 1
            continue
        if not outstanding:
            break
        proc = draw(st.sampled_from(sorted(outstanding)))
        inv = outstanding.pop(proc)
        outcome: OpType = draw(st.sampled_from(["ok", "ok", "ok", "info", "fail"]))
        if outcome == "info" and draw(st.booleans()):
            retired.add(proc)
            continue  # never completes
        value = draw(st.one_of(st.none(), VALUES)) if inv.f == "read" else inv.value
        history.append(Op(len(history), outcome, proc, len(history), inv.f, "k", value))
        if outcome == "info":
            retired.add(proc)
    validate(history)
    return history


@given(random_concurrent_histories())
@settings(max_examples=1500)
def test_checker_agrees_with_brute_force(history: list[Op]) -> None:
    model = CASRegisterModel()
    expected = brute_force_linearizable(model, history)
    result = check_linearizable(history, model, max_steps=None, time_limit_s=None)
    assert result.valid is expected, [op.to_dict() for op in history]


def test_brute_force_reference_is_not_vacuous() -> None:
    """The reference search itself tells the two simplest cases apart."""
    ok = [
        Op(0, "invoke", 0, 0, "write", "k", 1),
        Op(1, "ok", 0, 1, "write", "k", 1),
        Op(2, "invoke", 0, 2, "read", "k"),
        Op(3, "ok", 0, 3, "read", "k", 1),
    ]
    bad = [*ok[:3], Op(3, "ok", 0, 3, "read", "k", 2)]
    assert brute_force_linearizable(CASRegisterModel(), ok) is True
    assert brute_force_linearizable(CASRegisterModel(), bad) is False
    assert freeze([1]) == (1,)
