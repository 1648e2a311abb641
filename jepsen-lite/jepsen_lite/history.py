"""The history model of jepsen-lite: operations, JSON-lines files, pairing, validation.

A *history* is the list of operations a test recorded, in the order they happened
(real-time order). It mirrors Jepsen:

- A client *process* invokes an operation (``type="invoke"``) and later completes it
  with exactly one of

  - ``"ok"``: the operation took effect (and for a read, ``value`` is what it saw);
  - ``"fail"``: the operation *definitely did not* take effect;
  - ``"info"``: the outcome is unknown (a timeout, a crash, a lost connection). The
    operation may take effect at any moment after its invocation, or never. A timeout
    is always ``info``, never ``fail``.

- A process has at most one outstanding invocation. An invocation that has no
  completion at the end of the history is treated like ``info``.
- ``index`` increases strictly along the history and ``time`` (nanoseconds from one
  monotonic clock) never decreases; checkers use list order as real-time order, and
  validation makes sure the two agree.

On disk a history is ``history.jsonl``: one JSON object per line with the fields of
:class:`Op` (``extra`` is omitted when empty).
"""

from __future__ import annotations

import json
import threading
import time as _time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast

__all__ = [
    "COMPLETION_TYPES",
    "OP_TYPES",
    "HistoryError",
    "HistoryRecorder",
    "Op",
    "OpType",
    "Pair",
    "Validity",
    "dump_jsonl",
    "dumps_jsonl",
    "freeze",
    "load_jsonl",
    "loads_jsonl",
    "merge_validity",
    "pairs",
    "sort_key",
    "thaw",
    "validate",
]

OpType: TypeAlias = Literal["invoke", "ok", "fail", "info"]
OP_TYPES: frozenset[str] = frozenset({"invoke", "ok", "fail", "info"})
COMPLETION_TYPES: frozenset[str] = frozenset({"ok", "fail", "info"})

_FIELDS = ("index", "type", "process", "time", "f", "key", "value", "extra")


class HistoryError(ValueError):
    """A history is malformed (bad field, unpaired completion, overlapping invocations...)."""


@dataclass(frozen=True, slots=True)
class Op:
    """One history event: an invocation or a completion.

    ``value`` must be JSON-able. For an invocation it is the argument (the value to
    write or add, ``[from, to]`` for a compare-and-set, ``None`` for a read); for an
    ``ok`` completion it is the result (what a read returned; the argument again for
    a write). ``extra`` carries workload-specific data, e.g. ``{"seen": [...]}`` for a
    write that passed a causal context (see :mod:`jepsen_lite.checkers.register`) or
    ``{"final": True}`` for a read done after the cluster healed.
    """

    index: int
    type: OpType
    process: int
    time: int
    f: str
    key: str | None = None
    value: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        # ``value`` and ``extra`` may hold lists and dicts; equal ops agree on these.
        return hash((self.index, self.type, self.process, self.time, self.f, self.key))

    @property
    def is_invoke(self) -> bool:
        return self.type == "invoke"

    @property
    def is_ok(self) -> bool:
        return self.type == "ok"

    @property
    def is_fail(self) -> bool:
        return self.type == "fail"

    @property
    def is_info(self) -> bool:
        return self.type == "info"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this op (``extra`` only when non-empty)."""
        d: dict[str, Any] = {
            "index": self.index,
            "type": self.type,
            "process": self.process,
            "time": self.time,
            "f": self.f,
            "key": self.key,
            "value": self.value,
        }
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "op") -> Op:
        """Build an op from its JSON object, with a clear :class:`HistoryError` if malformed."""
        if not isinstance(d, Mapping):
            raise HistoryError(f"{where}: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise HistoryError(f"{where}: unknown field(s) {unknown}")
        for name in ("index", "type", "process", "time", "f"):
            if name not in d:
                raise HistoryError(f"{where}: missing field {name!r}")
        index, typ, process, t, f = d["index"], d["type"], d["process"], d["time"], d["f"]
        for name, v in (("index", index), ("process", process), ("time", t)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise HistoryError(f"{where}: {name} must be an integer, got {v!r}")
        if typ not in OP_TYPES:
            raise HistoryError(f"{where}: type must be one of {sorted(OP_TYPES)}, got {typ!r}")
        if not isinstance(f, str) or not f:
            raise HistoryError(f"{where}: f must be a non-empty string, got {f!r}")
        key = d.get("key")
        if key is not None and not isinstance(key, str):
            raise HistoryError(f"{where}: key must be a string or null, got {key!r}")
        extra = d.get("extra") or {}
        if not isinstance(extra, Mapping):
            raise HistoryError(f"{where}: extra must be a JSON object, got {extra!r}")
        return cls(
            index=index,
            type=cast(OpType, typ),
            process=process,
            time=t,
            f=f,
            key=key,
            value=d.get("value"),
            extra=dict(extra),
        )


@dataclass(frozen=True, slots=True)
class Pair:
    """An invocation with its completion (``None`` if the history ended first).

    ``invoke_pos`` / ``complete_pos`` are positions in the history list (the
    real-time order); ``complete_pos`` is ``None`` when there is no completion.
    """

    invoke: Op
    completion: Op | None
    invoke_pos: int
    complete_pos: int | None

    @property
    def type(self) -> str:
        """``ok``, ``fail`` or ``info``; an invocation without completion counts as ``info``."""
        return "info" if self.completion is None else self.completion.type

    @property
    def is_ok(self) -> bool:
        return self.completion is not None and self.completion.type == "ok"

    @property
    def is_fail(self) -> bool:
        return self.completion is not None and self.completion.type == "fail"

    @property
    def is_indeterminate(self) -> bool:
        """``info`` or never completed: may or may not have taken effect."""
        return self.completion is None or self.completion.type == "info"

    @property
    def f(self) -> str:
        return self.invoke.f

    @property
    def key(self) -> str | None:
        return self.invoke.key

    @property
    def process(self) -> int:
        return self.invoke.process

    def to_dict(self) -> dict[str, Any]:
        return {
            "invoke": self.invoke.to_dict(),
            "completion": None if self.completion is None else self.completion.to_dict(),
        }


def _describe(op: Op, pos: int) -> str:
    return (
        f"op at position {pos} (index {op.index}, process {op.process}, "
        f"{op.type} {op.f} key={op.key!r})"
    )


def pairs(history: Sequence[Op]) -> list[Pair]:
    """Pair every invocation with its completion, in invocation order.

    Raises :class:`HistoryError` for a malformed history: a completion without an
    outstanding invocation of its process, a second invocation while one is
    outstanding, a completion whose ``f`` or ``key`` differs from its invocation,
    indices that do not increase or times that go backwards.
    """
    result: list[Pair | None] = []
    outstanding: dict[int, tuple[int, int]] = {}  # process -> (slot in result, history pos)
    prev: Op | None = None
    for pos, op in enumerate(history):
        if not isinstance(op, Op):
            raise HistoryError(f"position {pos}: expected an Op, got {type(op).__name__}")
        if op.type not in OP_TYPES:
            raise HistoryError(f"{_describe(op, pos)}: unknown type {op.type!r}")
        if prev is not None:
            if op.index <= prev.index:
                raise HistoryError(
                    f"{_describe(op, pos)}: index {op.index} does not increase "
                    f"(previous op has index {prev.index})"
                )
            if op.time < prev.time:
                raise HistoryError(
                    f"{_describe(op, pos)}: time {op.time} goes backwards "
                    f"(previous op has time {prev.time})"
                )
        prev = op
        if op.type == "invoke":
            if op.process in outstanding:
                _, ipos = outstanding[op.process]
                raise HistoryError(
                    f"{_describe(op, pos)}: process {op.process} already has an "
                    f"outstanding invocation ({_describe(history[ipos], ipos)})"
                )
            outstanding[op.process] = (len(result), pos)
            result.append(None)
            continue
        if op.process not in outstanding:
            raise HistoryError(
                f"{_describe(op, pos)}: completion without an outstanding invocation "
                f"by process {op.process}"
            )
        slot, ipos = outstanding.pop(op.process)
        inv = history[ipos]
        if inv.f != op.f or inv.key != op.key:
            raise HistoryError(
                f"{_describe(op, pos)}: completes {_describe(inv, ipos)} but f/key differ"
            )
        result[slot] = Pair(inv, op, ipos, pos)
    for slot, ipos in outstanding.values():
        result[slot] = Pair(history[ipos], None, ipos, None)
    return [p for p in result if p is not None]


def validate(history: Sequence[Op]) -> None:
    """Raise :class:`HistoryError` if the history is malformed (see :func:`pairs`)."""
    pairs(history)


# ----------------------------------------------------------------------------- JSON lines


def dumps_jsonl(history: Iterable[Op]) -> str:
    """The JSON-lines text of a history (one compact JSON object per line)."""
    return "".join(
        json.dumps(op.to_dict(), separators=(",", ":"), sort_keys=False, allow_nan=False) + "\n"
        for op in history
    )


def dump_jsonl(history: Iterable[Op], path: str | Path) -> None:
    """Write a history to ``path`` (usually ``history.jsonl``)."""
    Path(path).write_text(dumps_jsonl(history), encoding="utf-8")


def _iter_jsonl(lines: Iterable[str], source: str) -> Iterator[Op]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HistoryError(f"{where}: invalid JSON: {e.msg}") from e
        yield Op.from_dict(obj, where=where)


def loads_jsonl(text: str, *, source: str = "<string>", check: bool = True) -> list[Op]:
    """Parse JSON-lines text; with ``check`` (default) also :func:`validate` it."""
    history = list(_iter_jsonl(text.splitlines(), source))
    if check:
        validate(history)
    return history


def load_jsonl(path: str | Path, *, check: bool = True) -> list[Op]:
    """Read ``history.jsonl``; with ``check`` (default) also :func:`validate` it."""
    p = Path(path)
    with p.open(encoding="utf-8") as fh:
        history = list(_iter_jsonl(fh, str(p)))
    if check:
        validate(history)
    return history


# ----------------------------------------------------------------------------- recording


class HistoryRecorder:
    """Thread-safe builder of a valid history, for client workers and tests.

    ``clock`` returns nanoseconds (default :func:`time.monotonic_ns`); pass a fake
    clock for deterministic tests. Indices are assigned 0, 1, 2, ... and times are
    clamped so they never decrease.
    """

    def __init__(self, clock: Callable[[], int] = _time.monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ops: list[Op] = []
        self._outstanding: dict[int, Op] = {}
        self._last_time = 0

    def _append(self, make: Callable[[int, int], Op]) -> Op:
        t = self._clock()
        if self._ops:
            t = max(t, self._last_time)
        op = make(len(self._ops), t)
        self._last_time = t
        self._ops.append(op)
        return op

    def invoke(
        self,
        process: int,
        f: str,
        key: str | None = None,
        value: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Op:
        """Record an invocation by ``process``; raises if it already has one outstanding."""
        with self._lock:
            if process in self._outstanding:
                raise HistoryError(f"process {process} already has an outstanding invocation")
            op = self._append(
                lambda i, t: Op(i, "invoke", process, t, f, key, value, dict(extra or {}))
            )
            self._outstanding[process] = op
            return op

    def complete(
        self,
        process: int,
        type: OpType,
        value: Any = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Op:
        """Record the completion (``ok`` / ``fail`` / ``info``) of ``process``'s invocation."""
        if type not in COMPLETION_TYPES:
            raise HistoryError(f"completion type must be ok, fail or info, got {type!r}")
        with self._lock:
            inv = self._outstanding.pop(process, None)
            if inv is None:
                raise HistoryError(f"process {process} has no outstanding invocation")
            return self._append(
                lambda i, t: Op(i, type, process, t, inv.f, inv.key, value, dict(extra or {}))
            )

    def ok(self, process: int, value: Any = None, extra: Mapping[str, Any] | None = None) -> Op:
        return self.complete(process, "ok", value, extra)

    def fail(self, process: int, value: Any = None, extra: Mapping[str, Any] | None = None) -> Op:
        return self.complete(process, "fail", value, extra)

    def info(self, process: int, value: Any = None, extra: Mapping[str, Any] | None = None) -> Op:
        return self.complete(process, "info", value, extra)

    @property
    def history(self) -> list[Op]:
        """A copy of the ops recorded so far."""
        with self._lock:
            return list(self._ops)


# ----------------------------------------------------------------------------- shared helpers

Validity: TypeAlias = bool | Literal["unknown"]
"""A checker verdict: ``True``, ``False`` or ``"unknown"`` (could not decide)."""


def merge_validity(values: Iterable[Validity]) -> Validity:
    """Combine verdicts: any ``False`` wins, then any ``"unknown"``, else ``True``.

    A definite violation stays definite even if another part could not be decided;
    ``True`` is only returned when every part was actually shown valid.
    """
    seen_unknown = False
    for v in values:
        if v is False:
            return False
        if v is not True:
            seen_unknown = True
    return "unknown" if seen_unknown else True


def freeze(value: Any) -> Hashable:
    """A hashable form of a JSON-able value: lists become tuples, objects sorted item tuples."""
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, Mapping):
        return (_MAP_TAG, tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
    if isinstance(value, set | frozenset):
        return frozenset(freeze(v) for v in value)
    return cast(Hashable, value)


def thaw(value: Any) -> Any:
    """Inverse of :func:`freeze` (frozensets become sorted lists), giving a JSON-able value."""
    if isinstance(value, tuple):
        if len(value) == 2 and value[0] is _MAP_TAG:
            return {k: thaw(v) for k, v in value[1]}
        return [thaw(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted((thaw(v) for v in value), key=sort_key)
    return value


def sort_key(value: Any) -> str:
    """A total order on JSON-able values of mixed types (by canonical JSON text)."""
    return json.dumps(value, sort_keys=True, default=repr)


class _MapTag:
    """Marks a frozen JSON object inside :func:`freeze` output."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<map>"


_MAP_TAG = _MapTag()
