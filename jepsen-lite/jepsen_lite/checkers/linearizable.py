"""Per-key linearizability checking (Wing & Gong search with Porcupine's memoisation).

The history is split per key (linearizability is P-compositional: a history is
linearizable iff every key's sub-history is) and each key is checked on its own
against a sequential :class:`Model`.

Semantics of completions:

- ``ok``: the operation took effect between its invocation and its completion, with
  the observed output;
- ``fail``: the operation did not happen; it is dropped;
- ``info`` (or no completion): the operation may take effect at any moment after its
  invocation, up to the end of the history, or never. It is *pending*: the search may
  linearize it anywhere after its invocation, with an unknown output (:data:`UNKNOWN`),
  or leave it out.

Real-time order is history (list) order: operation A precedes B iff A's completion
comes before B's invocation.

The search (Wing & Gong 1993, Lowe 2017, as in Porcupine) walks a doubly linked list
of call and return events. At a call it tries to linearize that operation next
(``model.step``); at a return of a not-yet-linearized operation it backtracks. A cache
of (set of linearized operations, model state) prunes configurations already explored.
Two further reductions keep the search complete:

- pending operations with identical inputs are interchangeable, so they are
  linearized in invocation order only (the earliest-invoked one can stand in for any
  of them), which removes the symmetric duplicates that make timeouts expensive;
- a completed read-only operation (:meth:`Model.is_read_only`) that fits the current
  state is linearized at once, without trying alternatives: moving a read earlier, to
  a point where its output holds, changes no state and breaks no real-time order. A
  pending read-only operation constrains nothing and is dropped.

Keys are searched round-robin, a slice of steps at a time, so easy keys are decided
while a hard one is still running; by default the check stops at the first key shown
not linearizable (as Porcupine and Knossos do) and reports the undecided keys as
``"unknown"``.

If a step budget or time budget runs out, the verdict is ``"unknown"``, never ``True``.
On a violation the result names the longest linearizable prefix found (operations in
linearization order with the model state after each) and the operation that cannot be
linearized after it.
"""

from __future__ import annotations

import time as _time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from jepsen_lite.history import Op, Pair, Validity, freeze, merge_validity, pairs, thaw

__all__ = [
    "UNKNOWN",
    "CASRegisterModel",
    "Counterexample",
    "KVRegisterModel",
    "KeyResult",
    "LinearizabilityResult",
    "LinearizedOp",
    "Model",
    "check_linearizable",
    "check_pairs",
]

S = TypeVar("S", bound=Hashable)


class _Unknown:
    """The output of a pending (``info``) operation: any output is acceptable."""

    __slots__ = ()
    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()
"""Passed to :meth:`Model.step` as the output of an operation whose outcome is unknown."""


class Model(ABC, Generic[S]):
    """A sequential specification.

    States must be hashable and compare by value (they are memoised). ``step`` returns
    whether the operation with this input may return this output in ``state`` and the
    state afterwards; when ``output is UNKNOWN`` (a pending operation) it must accept
    and return the state after the operation takes effect.
    """

    name: str = "model"

    @abstractmethod
    def init(self) -> S:
        """The state before any operation."""

    @abstractmethod
    def step(self, state: S, inp: Hashable, output: Any) -> tuple[bool, S]:
        """Apply one operation; ``(False, state)`` if the output is impossible."""

    def input(self, invoke: Op) -> Hashable:
        """The operation's input, from its invocation (default: ``(f, frozen value)``)."""
        return (invoke.f, freeze(invoke.value))

    def output(self, completion: Op) -> Any:
        """The operation's output, from its ``ok`` completion (default: frozen value)."""
        return freeze(completion.value)

    def is_read_only(self, inp: Hashable) -> bool:
        """True if every successful step of this input leaves the state unchanged.

        Such an operation (a read) is linearized as soon as it fits, without trying
        alternatives first; that is complete because moving a read earlier, to a point
        where it fits, changes no state. Default: False (no such shortcut).
        """
        return False

    def state_to_json(self, state: S) -> Any:
        """A JSON-able rendering of a state, for reports."""
        return thaw(state)


class CASRegisterModel(Model[Hashable]):
    """A compare-and-set register (Jepsen/Knossos ``cas-register``), initially ``initial``.

    - ``read``: the ``ok`` value is the register's value;
    - ``write v``: sets it to ``v``;
    - ``cas [from, to]``: if the register holds ``from``, sets it to ``to``. An ``ok``
      cas succeeded; a cas that found another value is recorded as ``fail`` and is
      therefore dropped (it did not change anything). A pending cas either swaps (if
      the register holds ``from``) or does nothing.
    """

    name = "cas-register"

    def __init__(self, initial: Any = None) -> None:
        self._initial = freeze(initial)

    def init(self) -> Hashable:
        return self._initial

    def input(self, invoke: Op) -> Hashable:
        f = invoke.f
        if f == "read":
            return ("read", None)
        if f == "write":
            return ("write", freeze(invoke.value))
        if f == "cas":
            v = invoke.value
            if not isinstance(v, list | tuple) or len(v) != 2:
                raise ValueError(f"cas value must be [from, to], got {v!r} in {invoke}")
            return ("cas", (freeze(v[0]), freeze(v[1])))
        raise ValueError(f"{self.name}: unsupported operation {f!r} in {invoke}")

    def output(self, completion: Op) -> Any:
        return freeze(completion.value) if completion.f == "read" else None

    def is_read_only(self, inp: Hashable) -> bool:
        return inp[0] == "read"  # type: ignore[index,no-any-return]

    def step(self, state: Hashable, inp: Hashable, output: Any) -> tuple[bool, Hashable]:
        f, arg = cast("tuple[str, Any]", inp)
        if f == "read":
            return (output is UNKNOWN or output == state), state
        if f == "write":
            return True, arg
        frm, to = arg
        if state == frm:
            return True, to
        # A pending cas that found another value simply did not happen.
        return output is UNKNOWN, state


class KVRegisterModel(Model[Hashable]):
    """A single register of a key-value map (one instance is used per key).

    - ``read`` / ``get``: the ``ok`` value is the current value (``initial`` if unset);
    - ``write`` / ``put``: sets the value;
    - ``append``: appends the string (or list) to the current value;
    - ``delete``: resets to ``initial``.
    """

    name = "kv-register"

    def __init__(self, initial: Any = None) -> None:
        self._initial = freeze(initial)

    def init(self) -> Hashable:
        return self._initial

    def input(self, invoke: Op) -> Hashable:
        f = invoke.f
        if f in ("read", "get"):
            return ("read", None)
        if f in ("write", "put"):
            return ("write", freeze(invoke.value))
        if f == "append":
            if not isinstance(invoke.value, str | list):
                raise ValueError(f"append value must be a string or list, got {invoke}")
            return ("append", freeze(invoke.value))
        if f == "delete":
            return ("delete", None)
        raise ValueError(f"{self.name}: unsupported operation {f!r} in {invoke}")

    def output(self, completion: Op) -> Any:
        return freeze(completion.value) if completion.f in ("read", "get") else None

    def is_read_only(self, inp: Hashable) -> bool:
        return inp[0] == "read"  # type: ignore[index,no-any-return]

    def step(self, state: Hashable, inp: Hashable, output: Any) -> tuple[bool, Hashable]:
        f, arg = cast("tuple[str, Any]", inp)
        if f == "read":
            return (output is UNKNOWN or output == state), state
        if f == "write":
            return True, arg
        if f == "delete":
            return True, self._initial
        # append
        if state is None:
            return True, arg
        if isinstance(state, str) and isinstance(arg, str):
            return True, state + arg
        if isinstance(state, tuple) and isinstance(arg, tuple):
            return True, state + arg
        raise ValueError(f"cannot append {arg!r} to {state!r}")


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LinearizedOp:
    """One operation of a linearization, with the model state after it."""

    pair: Pair
    state_after: Any

    def to_dict(self) -> dict[str, Any]:
        return {**self.pair.to_dict(), "state_after": self.state_after}


@dataclass(frozen=True)
class Counterexample:
    """Why a key is not linearizable.

    ``prefix`` is the longest linearization the search found (operations in
    linearization order), ``state`` the model state after it, ``op`` the completed
    operation that cannot be linearized next (the earliest-returning one not in the
    prefix: every other operation that could go before it was tried), and
    ``candidates`` the not-linearized operations invoked before ``op`` returned.
    """

    prefix: list[LinearizedOp]
    state: Any
    op: Pair
    candidates: list[Pair]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": [x.to_dict() for x in self.prefix],
            "state": self.state,
            "op": self.op.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
        }


@dataclass(frozen=True)
class KeyResult:
    """The verdict for one key's sub-history."""

    key: str | None
    valid: Validity
    op_count: int
    pending_count: int
    steps: int
    elapsed_s: float
    reason: str | None = None
    counterexample: Counterexample | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "valid": self.valid,
            "op_count": self.op_count,
            "pending_count": self.pending_count,
            "steps": self.steps,
            "elapsed_s": round(self.elapsed_s, 6),
            "reason": self.reason,
            "counterexample": (
                None if self.counterexample is None else self.counterexample.to_dict()
            ),
        }


@dataclass(frozen=True)
class LinearizabilityResult:
    """The verdict for a whole history: ``valid`` merges the per-key verdicts."""

    valid: Validity
    model: str
    op_count: int
    key_count: int
    steps: int
    elapsed_s: float
    keys: list[KeyResult] = field(default_factory=list)

    @property
    def invalid_keys(self) -> list[KeyResult]:
        return [k for k in self.keys if k.valid is False]

    @property
    def unknown_keys(self) -> list[KeyResult]:
        return [k for k in self.keys if k.valid == "unknown"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: counts plus the details of invalid and undecided keys."""
        return {
            "checker": "linearizable",
            "valid": self.valid,
            "model": self.model,
            "op_count": self.op_count,
            "key_count": self.key_count,
            "steps": self.steps,
            "elapsed_s": round(self.elapsed_s, 6),
            "invalid_key_count": len(self.invalid_keys),
            "unknown_key_count": len(self.unknown_keys),
            "invalid": [k.to_dict() for k in self.invalid_keys],
            "unknown": [k.to_dict() for k in self.unknown_keys],
        }


# ----------------------------------------------------------------------------- search


_SLICE_STEPS = 20_000
"""Model steps a key's search runs before yielding to the other keys' searches."""


@dataclass
class _Search:
    """The Wing & Gong search over one key's operations, resumable (a generator)."""

    model: Model[Any]
    ops: list[Pair]
    max_steps: int | None
    steps: int = 0
    best: list[int] = field(default_factory=list)

    def run(self) -> Generator[None, None, bool | None]:
        """Yield every :data:`_SLICE_STEPS` steps; return the verdict, ``None`` if the
        step budget ran out."""
        model = self.model
        ops = self.ops
        n = len(ops)
        inputs = [model.input(p.invoke) for p in ops]
        outputs: list[Any] = [
            model.output(p.completion) if p.is_ok and p.completion is not None else UNKNOWN
            for p in ops
        ]
        completed = [p.is_ok for p in ops]
        read_only = [completed[i] and model.is_read_only(inputs[i]) for i in range(n)]

        # Events in real-time order: (history position, op, is_call).
        events: list[tuple[int, int, bool]] = []
        for i, p in enumerate(ops):
            events.append((p.invoke_pos, i, True))
            if completed[i]:
                assert p.complete_pos is not None
                events.append((p.complete_pos, i, False))
        events.sort()

        # Doubly linked list over nodes 1..E; node 0 is the head; -1 is the end.
        size = len(events) + 1
        nxt = [-1] * size
        prv = [-1] * size
        node_op = [-1] * size
        is_call = [False] * size
        ret_node = [-1] * n
        for j, (_, i, call) in enumerate(events, start=1):
            node_op[j] = i
            is_call[j] = call
            if not call:
                ret_node[i] = j
        for j in range(size):
            nxt[j] = j + 1 if j + 1 < size else -1
            prv[j] = j - 1

        # Pending ops with equal inputs go in invocation order: twin[i] must come first.
        twin = [-1] * n
        last_pending: dict[Hashable, int] = {}
        for _, i, call in events:
            if call and not completed[i]:
                twin[i] = last_pending.get(inputs[i], -1)
                last_pending[inputs[i]] = i

        remaining = sum(completed)
        linearized = 0
        state = model.init()
        cache: set[tuple[int, Hashable]] = set()
        # (call node, state before, forced): a forced entry is a read-only op taken
        # greedily, so when it is undone there is nothing else to try at that level.
        stack: list[tuple[int, Hashable, bool]] = []
        steps = 0
        max_steps = self.max_steps
        next_yield = _SLICE_STEPS
        best_len = -1
        step = model.step

        # Phase 1 (reads_first) looks only at read-only calls up to the first return:
        # if one can be linearized now, doing so is without loss of generality. Phase 2
        # then tries the other calls (read-only calls already failed at this state).
        reads_first = True
        entry = nxt[0]
        while remaining > 0:
            backtrack = False
            if is_call[entry]:
                i = node_op[entry]
                t = twin[i]
                if read_only[i] == reads_first and (t < 0 or (linearized >> t) & 1):
                    if steps == next_yield:
                        self.steps = steps
                        yield
                        next_yield += _SLICE_STEPS
                    if max_steps is not None and steps >= max_steps:
                        self.steps = steps
                        return None
                    steps += 1
                    ok, new_state = step(state, inputs[i], outputs[i])
                    if ok:
                        new_lin = linearized | (1 << i)
                        memo = (new_lin, new_state)
                        if memo not in cache:
                            cache.add(memo)
                            stack.append((entry, state, reads_first))
                            state = new_state
                            linearized = new_lin
                            # lift: unlink the call and its return
                            nxt[prv[entry]] = nxt[entry]
                            if nxt[entry] >= 0:
                                prv[nxt[entry]] = prv[entry]
                            r = ret_node[i]
                            if r >= 0:
                                nxt[prv[r]] = nxt[r]
                                if nxt[r] >= 0:
                                    prv[nxt[r]] = prv[r]
                                remaining -= 1
                            if len(stack) > best_len:
                                best_len = len(stack)
                                self.best = [node_op[c] for c, _, _ in stack]
                            reads_first = True
                            entry = nxt[0]
                            continue
                        if reads_first:
                            # A read-only op fits but that configuration already failed.
                            backtrack = True
                if not backtrack:
                    entry = nxt[entry]
                    continue
            elif reads_first:
                reads_first = False
                entry = nxt[0]
                continue
            # The return of an op that is not linearized yet (or a dead end): backtrack.
            while True:
                if not stack:
                    self.steps = steps
                    return False
                entry, state, forced = stack.pop()
                i = node_op[entry]
                linearized &= ~(1 << i)
                r = ret_node[i]
                if r >= 0:
                    nxt[prv[r]] = r
                    if nxt[r] >= 0:
                        prv[nxt[r]] = r
                    remaining += 1
                nxt[prv[entry]] = entry
                if nxt[entry] >= 0:
                    prv[nxt[entry]] = entry
                if not forced:
                    break
            reads_first = False
            entry = nxt[entry]
        self.steps = steps
        return True


def _counterexample(model: Model[Any], ops: list[Pair], best: list[int]) -> Counterexample:
    prefix: list[LinearizedOp] = []
    state = model.init()
    for i in best:
        p = ops[i]
        out = model.output(p.completion) if p.is_ok and p.completion is not None else UNKNOWN
        _, state = model.step(state, model.input(p.invoke), out)
        prefix.append(LinearizedOp(p, model.state_to_json(state)))
    done = set(best)
    rest = [i for i, p in enumerate(ops) if i not in done and p.is_ok]
    # The search always finds a blocked completed op; pick the earliest-returning one.
    blocked = min(rest, key=lambda i: ops[i].complete_pos or 0)
    ret_pos = ops[blocked].complete_pos or 0
    candidates = [
        ops[i]
        for i in range(len(ops))
        if i not in done and i != blocked and ops[i].invoke_pos < ret_pos
    ]
    return Counterexample(prefix, model.state_to_json(state), ops[blocked], candidates)


@dataclass
class _Task:
    key: str | None
    ops: list[Pair]
    pending: int
    search: _Search
    gen: Generator[None, None, bool | None]
    elapsed_s: float = 0.0

    def result(self, valid: bool | None, reason: str | None = None) -> KeyResult:
        n, steps = len(self.ops), self.search.steps
        if valid is None:
            return KeyResult(self.key, "unknown", n, self.pending, steps, self.elapsed_s, reason)
        if valid:
            return KeyResult(self.key, True, n, self.pending, steps, self.elapsed_s)
        cex = _counterexample(self.search.model, self.ops, self.search.best)
        return KeyResult(
            self.key,
            False,
            n,
            self.pending,
            steps,
            self.elapsed_s,
            reason=f"operation at index {cex.op.invoke.index} cannot be linearized",
            counterexample=cex,
        )


def _task(
    model: Model[Any], key: str | None, key_pairs: Sequence[Pair], max_steps: int | None
) -> _Task:
    # Failed ops did not happen; a pending read-only op constrains nothing.
    ops = [
        p
        for p in key_pairs
        if not p.is_fail and not (p.is_indeterminate and model.is_read_only(model.input(p.invoke)))
    ]
    search = _Search(model, ops, max_steps)
    pending = sum(1 for p in ops if not p.is_ok)
    return _Task(key, ops, pending, search, search.run())


def _run_tasks(
    tasks: Sequence[_Task], deadline: float | None, stop_on_first_failure: bool
) -> list[KeyResult]:
    """Run the keys' searches round-robin, a slice of steps at a time.

    Interleaving lets easy keys finish (and a violation be found) while a hard key
    would otherwise use up the whole budget.
    """
    results: dict[int, KeyResult] = {}
    active = deque(range(len(tasks)))
    stop_reason: str | None = None
    while active:
        ti = active.popleft()
        task = tasks[ti]
        t0 = _time.monotonic()
        try:
            next(task.gen)
        except StopIteration as done:
            task.elapsed_s += _time.monotonic() - t0
            verdict: bool | None = done.value
            reason = (
                None if verdict is not None else f"step budget of {task.search.max_steps} exceeded"
            )
            results[ti] = task.result(verdict, reason)
            if verdict is False and stop_on_first_failure and active:
                stop_reason = (
                    f"not decided: stopped after key {task.key!r} was found not linearizable"
                )
                break
            continue
        now = _time.monotonic()
        task.elapsed_s += now - t0
        if deadline is not None and now > deadline:
            stop_reason = "time budget exceeded"
            active.appendleft(ti)
            break
        active.append(ti)
    for ti in active:
        results[ti] = tasks[ti].result(None, stop_reason)
    return [results[i] for i in range(len(tasks))]


def check_pairs(
    model: Model[Any],
    key_pairs: Sequence[Pair],
    *,
    key: str | None = None,
    max_steps: int | None = None,
    time_limit_s: float | None = None,
) -> KeyResult:
    """Check one key's operations (already paired, e.g. by :func:`pairs`) against ``model``.

    ``fail`` operations are dropped; ``info`` and uncompleted ones are pending.
    """
    deadline = None if time_limit_s is None else _time.monotonic() + time_limit_s
    return _run_tasks([_task(model, key, key_pairs, max_steps)], deadline, False)[0]


def check_linearizable(
    history: Sequence[Op],
    model: Model[Any] | None = None,
    *,
    max_steps: int | None = 10_000_000,
    time_limit_s: float | None = 60.0,
    keys: Sequence[str | None] | None = None,
    stop_on_first_failure: bool = True,
) -> LinearizabilityResult:
    """Check that every key's sub-history is linearizable with respect to ``model``.

    ``model`` defaults to a :class:`CASRegisterModel`; every key gets its own state
    from ``model.init()``. The keys are searched round-robin. ``max_steps`` bounds the
    model steps per key and ``time_limit_s`` the wall time of the whole check; a key
    whose budget runs out is ``"unknown"`` (and so is the history, unless some key is
    definitely not linearizable). With ``stop_on_first_failure`` (the default, like
    Porcupine and Knossos) the check ends as soon as one key is shown not linearizable;
    the keys not decided by then are reported ``"unknown"``. ``keys`` restricts the
    check to some keys. Raises :class:`~jepsen_lite.history.HistoryError` on a
    malformed history.
    """
    model = model if model is not None else CASRegisterModel()
    start = _time.monotonic()
    deadline = None if time_limit_s is None else start + time_limit_s
    by_key: dict[str | None, list[Pair]] = defaultdict(list)
    for p in pairs(history):
        by_key[p.key].append(p)
    selected = list(by_key) if keys is None else [k for k in keys if k in by_key]
    selected.sort(key=lambda k: (k is not None, k or ""))
    tasks = [_task(model, k, by_key[k], max_steps) for k in selected]
    results = _run_tasks(tasks, deadline, stop_on_first_failure)
    return LinearizabilityResult(
        valid=merge_validity(r.valid for r in results),
        model=model.name,
        op_count=sum(r.op_count for r in results),
        key_count=len(results),
        steps=sum(r.steps for r in results),
        elapsed_s=_time.monotonic() - start,
        keys=results,
    )
